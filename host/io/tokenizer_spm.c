/* tokenizer_spm.c: SentencePiece-style BPE with byte fallback (see tokenizer_spm.h), as
 * `tokenizers` encodes with the tokenizer.json transformers writes for Gemma:
 *   1. added tokens with normalized=false are cut out of the raw text;
 *   2. each remaining piece is normalized (Gemma: Replace " " -> "\u2581"; no dummy prefix)
 *      and added tokens with normalized=true are cut out of it;
 *   3. the pre-tokenizer, a Split on a literal string or none, makes the BPE words (Gemma's
 *      splits on " ", which never remains after its normalizer: the whole piece is one word);
 *   4. each word is split into characters; a character outside the vocabulary becomes its
 *      UTF-8 bytes as <0xXX> tokens (byte fallback), or unk when one is missing; then pairs
 *      merge by rank with the priority queue of tokenizers' Word::merge_all, so a 100 KB
 *      word costs O(n log n);
 *   5. the template (BOS) goes around the ids.
 * Merge ranks: a tokenizer.json lists its merges; a Gemma GGUF has none, and transformers
 * rebuilds them from the vocabulary (generate_merges): every split of a piece into two
 * pieces, ranked by the id of the merged piece, then the longer left part first. Here a
 * pair (a, b) is looked up as the string a + b, ranked (id(a + b), -len(a)), which is that
 * order without listing the 515k merges.
 * Decoding: <0xXX> tokens give their byte (ByteFallback), others their text with the
 * decoder's Replace steps ("\u2581" -> " "); raw bytes, as lp_detokenize promises. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/textfile.h"
#include "io/tokenizer_merge.h"
#include "io/tokenizer_spm.h"

static uint64_t hash_bytes(const char *s, size_t n) { /* FNV-1a */
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h ^ (h >> 29);
}
static size_t pow2_at_least(size_t n) {
    size_t c = 16;
    while (c < n) c <<= 1;
    return c;
}
static spm_str_slot *str_find(const spm_strmap *m, const char *s, size_t n) {
    size_t mask = m->cap - 1, i = hash_bytes(s, n) & mask;
    for (;; i = (i + 1) & mask) {
        spm_str_slot *e = &m->slot[i];
        if (!e->s || (e->len == n && memcmp(e->s, s, n) == 0)) return e;
    }
}
int32_t spm_vocab_get(const lp_spm *s, const char *text, size_t len) {
    if (!s->vocab.slot) return -1;
    const spm_str_slot *e = str_find(&s->vocab, text, len);
    return e->s ? e->id : -1;
}
lp_status spm_vocab_put(lp_spm *s, int32_t id) {
    spm_strmap *m = &s->vocab;
    if (2 * (m->n + 1) > m->cap) {
        spm_strmap bigger = {calloc(m->cap ? 2 * m->cap : 1024, sizeof *bigger.slot), m->cap ? 2 * m->cap : 1024, m->n};
        if (!bigger.slot) LP_FAIL(LP_ERR_OOM, "%s: out of memory", s->source);
        for (size_t i = 0; i < m->cap; i++)
            if (m->slot[i].s) *str_find(&bigger, m->slot[i].s, m->slot[i].len) = m->slot[i];
        free(m->slot);
        *m = bigger;
    }
    spm_str_slot *e = str_find(m, s->text[id], s->text_len[id]);
    if (!e->s) m->n++;
    *e = (spm_str_slot){s->text[id], s->text_len[id], id};
    return LP_OK;
}

static uint64_t pair_hash(int32_t a, int32_t b) {
    uint64_t x = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    x ^= x >> 33, x *= 0xff51afd7ed558ccdull, x ^= x >> 33, x *= 0xc4ceb9fe1a85ec53ull;
    return x ^ (x >> 33);
}
static spm_pair_slot *pair_find(const spm_pairmap *m, int32_t a, int32_t b) {
    size_t mask = m->cap - 1, i = pair_hash(a, b) & mask;
    for (;; i = (i + 1) & mask) {
        spm_pair_slot *e = &m->slot[i];
        if (e->a < 0 || (e->a == a && e->b == b)) return e;
    }
}
lp_status spm_merges_init(lp_spm *s, size_t n) {
    s->merges.cap = pow2_at_least(2 * n + 1);
    if (!(s->merges.slot = malloc(s->merges.cap * sizeof *s->merges.slot)))
        LP_FAIL(LP_ERR_OOM, "%s: out of memory for %zu merges", s->source, n);
    for (size_t i = 0; i < s->merges.cap; i++) s->merges.slot[i].a = -1;
    return LP_OK;
}

lp_status spm_merge_add(lp_spm *s, const char *a, size_t na, const char *b, size_t nb, int32_t rank, const char *key) {
    int32_t ia = spm_vocab_get(s, a, na), ib = spm_vocab_get(s, b, nb);
    if (ia < 0 || ib < 0)
        LP_FAIL(LP_ERR_FORMAT, "%s: %s[%d] names '%.*s', which is not in the vocabulary", s->source, key, rank,
                (int)(ia < 0 ? na : nb), ia < 0 ? a : b);
    char *cat = malloc(na + nb + 1);
    if (!cat) LP_FAIL(LP_ERR_OOM, "%s: out of memory", s->source);
    memcpy(cat, a, na), memcpy(cat + na, b, nb);
    int32_t id = spm_vocab_get(s, cat, na + nb);
    lp_status st = LP_OK;
    if (id < 0)
        st = LP_ERR(LP_ERR_FORMAT, "%s: %s[%d] makes '%.*s', which is not in the vocabulary",
                          s->source, key, rank, (int)(na + nb), cat);
    else
        *pair_find(&s->merges, ia, ib) = (spm_pair_slot){ia, ib, rank, id}; /* a repeated pair keeps its last rank */
    free(cat);
    return st;
}

lp_status spm_new(lp_spm **out, const char *source) {
    lp_spm *s = calloc(1, sizeof *s);
    if (!s || !(s->source = strdup(source))) {
        free(s);
        LP_FAIL(LP_ERR_OOM, "%s: out of memory", source);
    }
    s->unk = s->bos = s->eos = -1;
    *out = s;
    return LP_OK;
}

static void free_replace(spm_replace *r, int n) {
    for (int i = 0; i < n; i++) free(r[i].from), free(r[i].to);
}
void spm_free(lp_spm *s) {
    if (!s) return;
    if (s->text) for (int32_t i = 0; i < s->ids_cap; i++) free(s->text[i]);
    free(s->text), free(s->text_len), free(s->vocab.slot), free(s->merges.slot);
    free_replace(s->norm, s->n_norm), free_replace(&s->dec, s->n_dec);
    added_free(&s->added);
    free(s->split_str), free(s->source);
    free(s);
}

lp_status spm_set_text(lp_spm *s, int32_t id, const char *text, size_t len) {
    if (id >= s->ids_cap) {
        int32_t cap = id + 1 > 2 * s->ids_cap ? id + 1 : 2 * s->ids_cap;
        char **t = realloc(s->text, (size_t)cap * sizeof *t);
        if (t) s->text = t;
        uint32_t *l = t ? realloc(s->text_len, (size_t)cap * sizeof *l) : NULL;
        if (!l) LP_FAIL(LP_ERR_OOM, "%s: out of memory for %d tokens", s->source, cap);
        s->text_len = l;
        memset(s->text + s->ids_cap, 0, (size_t)(cap - s->ids_cap) * sizeof *s->text);
        memset(s->text_len + s->ids_cap, 0, (size_t)(cap - s->ids_cap) * sizeof *s->text_len);
        s->ids_cap = cap;
    }
    if (id >= s->n_ids) s->n_ids = id + 1;
    if (s->text[id]) return LP_OK; /* an added token on a model id keeps the model's string (the loaders check they agree) */
    char *c = malloc(len + 1);
    if (!c) LP_FAIL(LP_ERR_OOM, "%s: out of memory", s->source);
    memcpy(c, text, len);
    c[len] = 0;
    s->text[id] = c, s->text_len[id] = (uint32_t)len;
    return LP_OK;
}

lp_status spm_normalize(const lp_spm *s, const char *in, size_t n, char **out, size_t *out_len) {
    char *cur = malloc(n + 1);
    if (!cur) LP_FAIL(LP_ERR_OOM, "tokenize: out of memory for %zu bytes", n);
    memcpy(cur, in, n);
    size_t len = n;
    for (int r = 0; r < s->n_norm; r++) {
        const spm_replace *rp = &s->norm[r];
        size_t hits = 0;
        for (size_t i = 0; i + rp->from_len <= len;)
            if (memcmp(cur + i, rp->from, rp->from_len) == 0) hits++, i += rp->from_len;
            else i++;
        if (!hits) continue;
        size_t grown = len - hits * rp->from_len + hits * rp->to_len, k = 0;
        char *next = malloc(grown + 1);
        if (!next) {
            free(cur);
            LP_FAIL(LP_ERR_OOM, "tokenize: out of memory for %zu bytes", grown);
        }
        for (size_t i = 0; i < len;)
            if (i + rp->from_len <= len && memcmp(cur + i, rp->from, rp->from_len) == 0) {
                memcpy(next + k, rp->to, rp->to_len);
                k += rp->to_len, i += rp->from_len;
            } else {
                next[k++] = cur[i++];
            }
        free(cur);
        cur = next, len = k;
    }
    *out = cur, *out_len = len;
    return LP_OK;
}

lp_status spm_finish(lp_spm *s) {
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        s->byte_id[b] = spm_vocab_get(s, name, 6);
    }
    for (int i = 0; i < s->added.n; i++) {
        lp_added_tok *a = &s->added.tok[i];
        if (!a->normalized || !s->n_norm) continue;
        char *m;
        size_t len;
        LP_CHECK(spm_normalize(s, a->content, a->len, &m, &len));
        a->match = m, a->match_len = len;
    }
    return added_index(&s->added, s->source);
}

/* ---- encoding ---- */

typedef struct { int32_t id, prev, next, gone; } symbol;

typedef struct {
    const lp_spm *s;
    tok_ids out;
    symbol *sym;
    size_t sym_cap;
    tok_merge_heap heap;
    char *cat;           /* a + b, for rank_by_id */
    size_t cat_cap;
} encoder;

static lp_status push_id(void *ctx, int32_t id) { return tok_ids_push(&((encoder *)ctx)->out, id); }

/* The merge of (a, b): 1 with its rank and merged id, 0 when none (-1: out of memory). */
static int find_merge(encoder *e, int32_t a, int32_t b, int64_t *rank, int32_t *id) {
    const lp_spm *s = e->s;
    if (!s->rank_by_id) {
        if (!s->merges.slot) return 0;
        const spm_pair_slot *m = pair_find(&s->merges, a, b);
        if (m->a < 0) return 0;
        *rank = m->rank, *id = m->id;
        return 1;
    }
    size_t na = s->text_len[a], nb = s->text_len[b];
    if (na + nb > e->cat_cap) {
        char *c = realloc(e->cat, 2 * (na + nb));
        if (!c) return -1;
        e->cat = c, e->cat_cap = 2 * (na + nb);
    }
    memcpy(e->cat, s->text[a], na), memcpy(e->cat + na, s->text[b], nb);
    int32_t m = spm_vocab_get(s, e->cat, na + nb);
    if (m < 0) return 0;
    *rank = ((int64_t)m << 32) | (int64_t)(UINT32_MAX - (uint32_t)na); /* id(a + b), then longer a first */
    *id = m;
    return 1;
}

static lp_status push_pair(encoder *e, int32_t pos) {
    int64_t rank;
    int32_t id;
    int r = find_merge(e, e->sym[pos].id, e->sym[e->sym[pos].next].id, &rank, &id);
    if (r < 0) LP_FAIL(LP_ERR_OOM, "tokenize: out of memory");
    return r ? tok_heap_push(&e->heap, (tok_merge){rank, pos, id}) : LP_OK;
}

static void add_symbol(encoder *e, int32_t *ns, int32_t id) {
    e->sym[*ns] = (symbol){id, *ns - 1, *ns + 1, 0};
    (*ns)++;
}

/* The characters of one word as symbols: BPE::merge_word with byte_fallback. An unknown
 * character that byte fallback cannot spell becomes unk (fused with a following one when
 * fuse_unk); the pending unk is written before the next known character, as tokenizers does. */
static int32_t word_symbols(encoder *e, const char *w, size_t n) {
    const lp_spm *s = e->s;
    int32_t ns = 0, unk_open = 0;
    for (size_t i = 0; i < n;) {
        int32_t cp;
        size_t k = (size_t)utf8_decode(w + i, &cp);
        int32_t id = spm_vocab_get(s, w + i, k);
        if (id >= 0) {
            if (unk_open) add_symbol(e, &ns, s->unk), unk_open = 0;
            add_symbol(e, &ns, id);
        } else {
            int all = 1;
            for (size_t j = 0; j < k; j++) all &= s->byte_id[(unsigned char)w[i + j]] >= 0;
            if (all) {
                for (size_t j = 0; j < k; j++) add_symbol(e, &ns, s->byte_id[(unsigned char)w[i + j]]);
            } else if (s->unk >= 0) {
                if (unk_open && !s->fuse_unk) add_symbol(e, &ns, s->unk);
                unk_open = 1;
            }
        }
        i += k;
    }
    if (unk_open) add_symbol(e, &ns, s->unk);
    return ns;
}

static lp_status bpe_word(encoder *e, const char *w, size_t n) {
    if (n > e->sym_cap) { /* at most one symbol per byte */
        symbol *sy = realloc(e->sym, n * sizeof *sy);
        if (!sy) LP_FAIL(LP_ERR_OOM, "tokenize: out of memory for a word of %zu bytes", n);
        e->sym = sy, e->sym_cap = n;
    }
    int32_t ns = word_symbols(e, w, n);
    if (ns == 0) return LP_OK;
    e->sym[ns - 1].next = -1;
    e->heap.n = 0;
    for (int32_t i = 0; i + 1 < ns; i++) LP_CHECK(push_pair(e, i));
    while (e->heap.n) {
        tok_merge top = tok_heap_pop(&e->heap);
        symbol *sy = &e->sym[top.pos];
        if (sy->gone || sy->next < 0) continue;
        symbol *right = &e->sym[sy->next];
        int64_t rank;
        int32_t id;
        int r = find_merge(e, sy->id, right->id, &rank, &id);
        if (r < 0) LP_FAIL(LP_ERR_OOM, "tokenize: out of memory");
        if (!r || id != top.id) continue; /* an expired entry */
        sy->id = top.id;
        sy->next = right->next;
        right->gone = 1;
        if (sy->next >= 0) e->sym[sy->next].prev = top.pos;
        if (sy->prev >= 0) LP_CHECK(push_pair(e, sy->prev));
        if (sy->next >= 0) LP_CHECK(push_pair(e, top.pos));
    }
    for (int32_t i = 0; i < ns; i++)
        if (!e->sym[i].gone) LP_CHECK(push_id(e, e->sym[i].id));
    return LP_OK;
}

/* The pre-tokenizer: a Split on a literal string with the given behaviour, or none. */
static lp_status pretokenize(void *ctx, const char *w, size_t n) {
    encoder *e = ctx;
    const lp_spm *s = e->s;
    if (s->split == SPM_SPLIT_NONE) return bpe_word(e, w, n);
    size_t start = 0, i = 0;
    while (i + s->split_len <= n) {
        if (memcmp(w + i, s->split_str, s->split_len) != 0) {
            i++;
            continue;
        }
        size_t end = i + s->split_len;
        switch (s->split) {
        case SPM_SPLIT_PREVIOUS: /* the match closes the current piece */
            LP_CHECK(bpe_word(e, w + start, end - start));
            start = end;
            break;
        case SPM_SPLIT_NEXT: /* the match opens the next piece */
            if (i > start) LP_CHECK(bpe_word(e, w + start, i - start));
            start = i;
            break;
        default: /* Isolated: the match is a piece of its own; Removed: dropped */
            if (i > start) LP_CHECK(bpe_word(e, w + start, i - start));
            if (s->split == SPM_SPLIT_ISOLATED) LP_CHECK(bpe_word(e, w + i, s->split_len));
            start = end;
        }
        i = end;
    }
    return start < n ? bpe_word(e, w + start, n - start) : LP_OK;
}

static lp_status after_raw_split(void *ctx, const char *w, size_t n) {
    encoder *e = ctx;
    char *norm;
    size_t len;
    LP_CHECK(spm_normalize(e->s, w, n, &norm, &len));
    lp_status st = added_split(&e->s->added, 1, norm, len, pretokenize, push_id, e);
    free(norm);
    return st;
}

lp_status spm_tokenize(const lp_spm *s, const char *text, size_t len, int32_t **ids, size_t *n) {
    *ids = NULL, *n = 0;
    size_t bad = lp_utf8_invalid_at(text, len);
    if (bad != len)
        LP_FAIL(LP_ERR_FORMAT, "tokenize: the text is not valid UTF-8: byte 0x%02x at offset %zu", (unsigned char)text[bad],
                bad);
    encoder e = {.s = s};
    lp_status st = LP_OK;
    for (int i = 0; i < s->n_prefix; i++) LP_TRY(st, out, push_id(&e, s->prefix[i]));
    LP_TRY(st, out, added_split(&s->added, 0, text, len, after_raw_split, push_id, &e));
    for (int i = 0; i < s->n_suffix; i++) LP_TRY(st, out, push_id(&e, s->suffix[i]));
    if (!e.out.v) { /* a valid pointer even for no ids */
        LP_TRY(st, out, push_id(&e, 0));
        e.out.n = 0;
    }
out:
    free(e.sym), free(e.heap.v), free(e.cat);
    if (st != LP_OK) {
        free(e.out.v);
        return st;
    }
    *ids = e.out.v, *n = e.out.n;
    return LP_OK;
}

/* ---- decoding ---- */

/* <0xXX> (either case of hex digit, as ByteFallback parses it): the byte, else -1. */
static int byte_token(const char *t, size_t n) {
    if (n != 6 || memcmp(t, "<0x", 3) != 0 || t[5] != '>') return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = t[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (d < 0) return -1;
        v = 16 * v + d;
    }
    return v;
}

/* Writes the decoded form of one token to dst (NULL: only counts); returns its length. */
static size_t decode_one(const lp_spm *s, int32_t id, char *dst) {
    const char *t = s->text[id];
    size_t n = s->text_len[id];
    int b = s->dec_bytes ? byte_token(t, n) : -1;
    if (b >= 0) {
        if (dst) dst[0] = (char)b;
        return 1;
    }
    size_t k = 0;
    const spm_replace *r = &s->dec;
    for (size_t i = 0; i < n;) { /* the decoder's Replace step */
        if (s->n_dec && r->from_len <= n - i && memcmp(t + i, r->from, r->from_len) == 0) {
            if (dst) memcpy(dst + k, r->to, r->to_len);
            k += r->to_len, i += r->from_len;
        } else {
            if (dst) dst[k] = t[i];
            k++, i++;
        }
    }
    return k;
}

lp_status spm_detokenize(const lp_spm *s, const int32_t *ids, size_t n, char **text, size_t *len) {
    *text = NULL, *len = 0;
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= s->n_ids || !s->text[ids[i]])
            LP_FAIL(LP_ERR_ARG, "detokenize: id %d at position %zu is not in the vocabulary of %s (%d ids)", ids[i], i,
                    s->source, s->n_ids);
        total += decode_one(s, ids[i], NULL);
    }
    char *out = malloc(total + 1);
    if (!out) LP_FAIL(LP_ERR_OOM, "detokenize: out of memory for %zu bytes", total);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) k += decode_one(s, ids[i], out + k);
    out[k] = 0;
    *text = out, *len = k;
    return LP_OK;
}
