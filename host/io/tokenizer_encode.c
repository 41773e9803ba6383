/* tokenizer_encode.c: text to ids and back for the byte-level BPE tokenizer (steps 1-5
 * of the pipeline described in tokenizer.c): added tokens cut out, pre-tokenizer steps run
 * depth first, each final piece merged by rank as Word::merge_all does. */
#include <utf8proc.h>

#include "loupe/textfile.h"
#include "io/tokenizer_bpe.h"
#include "io/tokenizer_merge.h"

/* Rust's char::is_numeric: general categories Nd, Nl, No. */
static int is_numeric(int32_t c) {
    utf8proc_category_t k = utf8proc_category(c);
    return k == UTF8PROC_CATEGORY_ND || k == UTF8PROC_CATEGORY_NL || k == UTF8PROC_CATEGORY_NO;
}

typedef struct { int32_t id, prev, next, gone; } symbol;

typedef struct {
    const lp_tokenizer *t;
    tok_ids out;
    pcre2_match_data *md;
    symbol *sym;
    size_t sym_cap;
    tok_merge_heap heap;
} encoder;

static lp_status push_pair(encoder *e, int32_t pos) {
    const symbol *s = &e->sym[pos];
    const pm_slot *m = pm_get(&e->t->merges, s->id, e->sym[s->next].id);
    return m ? tok_heap_push(&e->heap, (tok_merge){m->rank, pos, m->id}) : LP_OK;
}

/* One pre-token (vocabulary form) to ids: BPE::tokenize_with_cache and Word::merge_all. */
static lp_status bpe_word(encoder *e, const char *w, size_t n) {
    const lp_tokenizer *t = e->t;
    if (t->ignore_merges) {
        int32_t id = sm_get(&t->vocab, w, n);
        if (id >= 0) return tok_ids_push(&e->out, id);
    }
    if (n > e->sym_cap) {
        symbol *s = realloc(e->sym, n * sizeof *s);
        if (!s) LP_FAIL(LP_ERR_OOM, "tokenize: out of memory");
        e->sym = s, e->sym_cap = n;
    }
    int32_t ns = 0, unk_open = 0;
    for (size_t i = 0; i < n;) {
        int32_t cp;
        int k = utf8_decode(w + i, &cp);
        int32_t id = cp < 324 && t->cp_byte[cp] >= 0 ? t->byte_id[t->cp_byte[cp]] : sm_get(&t->vocab, w + i, (size_t)k);
        i += (size_t)k;
        if (id < 0) {
            if (t->unk < 0) continue; /* no unk token: the character is dropped */
            if (unk_open && t->fuse_unk) continue;
            id = t->unk, unk_open = 1;
        } else {
            unk_open = 0;
        }
        e->sym[ns] = (symbol){id, ns - 1, ns + 1, 0};
        ns++;
    }
    if (ns == 0) return LP_OK;
    e->sym[ns - 1].next = -1;
    e->heap.n = 0;
    for (int32_t i = 0; i + 1 < ns; i++) LP_CHECK(push_pair(e, i));
    while (e->heap.n) {
        tok_merge top = tok_heap_pop(&e->heap);
        symbol *s = &e->sym[top.pos];
        if (s->gone || s->next < 0) continue;
        symbol *right = &e->sym[s->next];
        const pm_slot *m = pm_get(&t->merges, s->id, right->id);
        if (!m || m->id != top.id) continue; /* an expired entry */
        s->id = top.id;
        s->next = right->next;
        right->gone = 1;
        if (s->next >= 0) e->sym[s->next].prev = top.pos;
        if (s->prev >= 0) LP_CHECK(push_pair(e, s->prev));
        if (s->next >= 0) LP_CHECK(push_pair(e, top.pos));
    }
    for (int32_t i = 0; i < ns; i++)
        if (!e->sym[i].gone) LP_CHECK(tok_ids_push(&e->out, e->sym[i].id));
    return LP_OK;
}

static lp_status pretokenize(encoder *e, int step, const char *s, size_t n);

/* Regex split with Isolated behaviour: matches and the gaps between them are pieces;
 * empty pieces are dropped. Empty matches are handled as Oniguruma's find_iter does. */
static lp_status byte_level(encoder *e, int next_step, const char *s, size_t n, int prefix_space);

/* A piece found by a split goes on to the next step, through the byte map first when the
 * split is ByteLevel's own. */
static lp_status emit(encoder *e, int next_step, int map_bytes, const char *s, size_t n) {
    return map_bytes ? byte_level(e, next_step, s, n, 0) : pretokenize(e, next_step, s, n);
}

static lp_status split_regex(encoder *e, const pcre2_code *re, int next_step, int map_bytes, const char *s, size_t n) {
    size_t prev = 0, from = 0;
    long last_match_end = -1;
    while (from <= n) {
        int rc = pcre2_match(re, (PCRE2_SPTR)s, n, from, PCRE2_NO_UTF_CHECK, e->md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            LP_FAIL(LP_ERR_INTERNAL, "%s: pre-tokenizer regex failed: %s", e->t->source, (char *)msg);
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->md);
        size_t ms = ov[0], me = ov[1];
        if (ms == me && last_match_end == (long)me) {
            if (from >= n) break;
            int32_t cp;
            from += (size_t)utf8_decode(s + from, &cp);
            continue;
        }
        if (prev < ms) LP_CHECK(emit(e, next_step, map_bytes, s + prev, ms - prev));
        if (ms < me) LP_CHECK(emit(e, next_step, map_bytes, s + ms, me - ms));
        prev = me, from = me, last_match_end = (long)me;
    }
    if (prev < n) LP_CHECK(emit(e, next_step, map_bytes, s + prev, n - prev));
    return LP_OK;
}

/* ByteLevel: each byte to its character in the GPT-2 alphabet. */
static lp_status byte_level(encoder *e, int next_step, const char *s, size_t n, int prefix_space) {
    char small[512], *buf = 2 * (n + 1) <= sizeof small ? small : malloc(2 * (n + 1));
    if (!buf) LP_FAIL(LP_ERR_OOM, "tokenize: out of memory");
    size_t k = 0;
    if (prefix_space) k += (size_t)tok_utf8_put(buf, e->t->byte_cp[' ']);
    for (size_t i = 0; i < n; i++) k += (size_t)tok_utf8_put(buf + k, e->t->byte_cp[(unsigned char)s[i]]);
    lp_status st = pretokenize(e, next_step, buf, k);
    if (buf != small) free(buf);
    return st;
}

static lp_status pretokenize(encoder *e, int step, const char *s, size_t n) {
    const lp_tokenizer *t = e->t;
    if (n == 0) return LP_OK;
    if (step == t->n_pre) return bpe_word(e, s, n);
    const pre_step *p = &t->pre[step];
    switch (p->kind) {
    case PRE_SPLIT:
        return split_regex(e, p->re, step + 1, 0, s, n);
    case PRE_DIGITS: {
        size_t start = 0;
        int run_numeric = -1;
        for (size_t i = 0; i < n;) {
            int32_t cp;
            int k = utf8_decode(s + i, &cp);
            int num = is_numeric(cp);
            /* a boundary before every numeric character when individual, else at each change */
            if (i > start && (num != run_numeric || (num && p->individual_digits))) {
                LP_CHECK(pretokenize(e, step + 1, s + start, i - start));
                start = i;
            }
            run_numeric = num;
            i += (size_t)k;
        }
        return pretokenize(e, step + 1, s + start, n - start);
    }
    case PRE_BYTELEVEL: {
        int prefix = p->add_prefix_space && s[0] != ' ';
        if (!p->re) return byte_level(e, step + 1, s, n, prefix);
        if (!prefix) return split_regex(e, p->re, step + 1, 1, s, n);
        char *buf = malloc(n + 1);
        if (!buf) LP_FAIL(LP_ERR_OOM, "tokenize: out of memory");
        buf[0] = ' ';
        memcpy(buf + 1, s, n);
        lp_status st = split_regex(e, p->re, step + 1, 1, buf, n + 1);
        free(buf);
        return st;
    }
    }
    return LP_OK;
}

/* Added tokens are cut out by tokenizer_added.c: raw ones from the text first, then, in
 * each gap, normalized ones from the normalized gap; each token's id goes to the output. */
static lp_status push_added(void *e, int32_t id) { return tok_ids_push(&((encoder *)e)->out, id); }

static lp_status after_norm_split(void *e, const char *s, size_t n) { return pretokenize(e, 0, s, n); }

/* A piece between raw added tokens: normalize, then cut out the normalized added tokens. */
static lp_status after_raw_split(void *ctx, const char *s, size_t n) {
    encoder *e = ctx;
    if (!e->t->nfc) return added_split(&e->t->match, 1, s, n, after_norm_split, push_added, e);
    char *norm;
    size_t len;
    LP_CHECK(tok_nfc(s, n, &norm, &len));
    lp_status st = added_split(&e->t->match, 1, norm, len, after_norm_split, push_added, e);
    free(norm);
    return st;
}

lp_status lp_tokenize(const lp_tokenizer *t, const char *text, size_t len, int32_t **ids, size_t *n) {
    if (t->spm) return spm_tokenize(t->spm, text, len, ids, n);
    *ids = NULL, *n = 0;
    size_t bad = lp_utf8_invalid_at(text, len);
    if (bad != len)
        LP_FAIL(LP_ERR_FORMAT, "tokenize: the text is not valid UTF-8: byte 0x%02x at offset %zu",
                (unsigned char)text[bad], bad);
    encoder e = {.t = t};
    lp_status st = LP_OK;
    if (!(e.md = pcre2_match_data_create(1, NULL))) LP_FAIL(LP_ERR_OOM, "tokenize: out of memory");
    for (int i = 0; i < t->n_prefix; i++) LP_TRY(st, out, tok_ids_push(&e.out, t->prefix[i]));
    LP_TRY(st, out, added_split(&t->match, 0, text, len, after_raw_split, push_added, &e));
    for (int i = 0; i < t->n_suffix; i++) LP_TRY(st, out, tok_ids_push(&e.out, t->suffix[i]));
    if (!e.out.v) { /* a valid pointer even for no ids */
        LP_TRY(st, out, tok_ids_push(&e.out, 0));
        e.out.n = 0;
    }
out:
    pcre2_match_data_free(e.md);
    free(e.sym), free(e.heap.v);
    if (st != LP_OK) {
        free(e.out.v);
        return st;
    }
    *ids = e.out.v, *n = e.out.n;
    return LP_OK;
}

lp_status lp_detokenize(const lp_tokenizer *t, const int32_t *ids, size_t n, char **text, size_t *len) {
    if (t->spm) return spm_detokenize(t->spm, ids, n, text, len);
    *text = NULL, *len = 0;
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_ids || !t->dec[ids[i]])
            LP_FAIL(LP_ERR_ARG, "detokenize: id %d at position %zu is not in the vocabulary of %s (%d ids)", ids[i], i,
                    t->source, t->n_ids);
        total += t->dec_len[ids[i]];
    }
    char *out = malloc(total + 1);
    if (!out) LP_FAIL(LP_ERR_OOM, "detokenize: out of memory for %zu bytes", total);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        memcpy(out + k, t->dec[ids[i]], t->dec_len[ids[i]]);
        k += t->dec_len[ids[i]];
    }
    out[k] = 0;
    *text = out, *len = k;
    return LP_OK;
}
