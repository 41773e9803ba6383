/* tokenizer_merge.c: the merge queue and id list of the BPE encoders (see tokenizer_merge.h). */
#include <stdlib.h>

#include "io/tokenizer_merge.h"

static int heap_less(const tok_merge *a, const tok_merge *b) {
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

lp_status tok_heap_push(tok_merge_heap *h, tok_merge m) {
    if (h->n == h->cap) {
        size_t cap = h->cap ? 2 * h->cap : 64;
        tok_merge *v = realloc(h->v, cap * sizeof *v);
        if (!v) LP_FAIL(LP_ERR_OOM, "tokenize: out of memory");
        h->v = v, h->cap = cap;
    }
    size_t i = h->n++;
    while (i > 0 && heap_less(&m, &h->v[(i - 1) / 2])) {
        h->v[i] = h->v[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h->v[i] = m;
    return LP_OK;
}

tok_merge tok_heap_pop(tok_merge_heap *h) {
    tok_merge top = h->v[0], last = h->v[--h->n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= h->n) break;
        if (c + 1 < h->n && heap_less(&h->v[c + 1], &h->v[c])) c++;
        if (!heap_less(&h->v[c], &last)) break;
        h->v[i] = h->v[c];
        i = c;
    }
    if (h->n) h->v[i] = last;
    return top;
}

lp_status tok_ids_push(tok_ids *ids, int32_t id) {
    if (ids->n == ids->cap) {
        size_t cap = ids->cap ? 2 * ids->cap : 256;
        int32_t *v = realloc(ids->v, cap * sizeof *v);
        if (!v) LP_FAIL(LP_ERR_OOM, "tokenize: out of memory for %zu ids", cap);
        ids->v = v, ids->cap = cap;
    }
    ids->v[ids->n++] = id;
    return LP_OK;
}
