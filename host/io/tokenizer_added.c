/* tokenizer_added.c: finding added tokens in text (see tokenizer_added.h). The search is
 * one pass over the text with the tokens bucketed by first byte; the flag rules follow
 * AddedVocabulary::find_matches of `tokenizers` 0.20: a match the single_word rule rejects
 * is skipped (the search resumes after it), lstrip takes the white space before a match
 * (not past the end of the previous one), rstrip the white space after it. */
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "io/tokenizer_added.h"

int utf8_decode(const char *s, int32_t *cp) {
    const unsigned char *u = (const unsigned char *)s;
    if (u[0] < 0x80) { *cp = u[0]; return 1; }
    if (u[0] < 0xE0) { *cp = ((u[0] & 0x1F) << 6) | (u[1] & 0x3F); return 2; }
    if (u[0] < 0xF0) { *cp = ((u[0] & 0x0F) << 12) | ((u[1] & 0x3F) << 6) | (u[2] & 0x3F); return 3; }
    *cp = ((u[0] & 0x07) << 18) | ((u[1] & 0x3F) << 12) | ((u[2] & 0x3F) << 6) | (u[3] & 0x3F);
    return 4;
}
/* Start of the character that ends at s[n) (n > 0). */
static size_t utf8_prev(const char *s, size_t n) {
    do n--;
    while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80);
    return n;
}
/* Rust's char::is_whitespace: the Unicode White_Space property. */
static int is_white_space(int32_t c) {
    return (c >= 9 && c <= 13) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
           c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}
/* regex \w: Alphabetic, marks, decimal digits, connector punctuation, join controls. */
static int is_word_char(int32_t c) {
    if (c == 0x200C || c == 0x200D) return 1;
    switch (utf8proc_category(c)) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT: case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_MN: case UTF8PROC_CATEGORY_MC:
    case UTF8PROC_CATEGORY_ME: case UTF8PROC_CATEGORY_ND: case UTF8PROC_CATEGORY_PC:
        return 1;
    default: return 0;
    }
}

static size_t hash_content(const char *s, size_t n) { /* FNV-1a */
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return (size_t)(h ^ (h >> 29));
}

/* The slot of the content: its entry's, or the empty one where it would go. */
static int *find_slot(const lp_added_set *s, const char *content, size_t len) {
    size_t mask = s->n_slot - 1;
    for (size_t i = hash_content(content, len) & mask;; i = (i + 1) & mask) {
        int *e = &s->slot[i];
        if (!*e || (s->tok[*e - 1].len == len && memcmp(s->tok[*e - 1].content, content, len) == 0)) return e;
    }
}

/* Room for one more token in tok and in the hash (both doubled when full): a file with
 * 100k added tokens loads in linear time. */
static lp_status reserve_one(lp_added_set *s, const char *source) {
    if (s->n == s->cap) {
        int cap = s->cap ? 2 * s->cap : 16;
        lp_added_tok *grown = realloc(s->tok, (size_t)cap * sizeof *grown);
        if (!grown) LP_FAIL(LP_ERR_OOM, "%s: out of memory", source);
        s->tok = grown, s->cap = cap;
    }
    if (2 * ((size_t)s->n + 1) > s->n_slot) {
        size_t n_slot = s->n_slot ? 2 * s->n_slot : 32;
        int *old = s->slot;
        size_t old_n = s->n_slot;
        if (!(s->slot = calloc(n_slot, sizeof *s->slot))) {
            s->slot = old;
            LP_FAIL(LP_ERR_OOM, "%s: out of memory", source);
        }
        s->n_slot = n_slot;
        for (size_t i = 0; i < old_n; i++)
            if (old[i]) *find_slot(s, s->tok[old[i] - 1].content, s->tok[old[i] - 1].len) = old[i];
        free(old);
    }
    return LP_OK;
}

const lp_added_tok *added_find(const lp_added_set *s, const char *content, size_t len) {
    if (!s->n_slot) return NULL;
    int e = *find_slot(s, content, len);
    return e ? &s->tok[e - 1] : NULL;
}

lp_status added_put(lp_added_set *s, const char *content, size_t len, int32_t id, int special, int lstrip,
                       int rstrip, int single_word, int normalized, const char *source) {
    lp_added_tok *a = (lp_added_tok *)added_find(s, content, len);
    if (!a) {
        LP_CHECK(reserve_one(s, source));
        a = &s->tok[s->n];
        memset(a, 0, sizeof *a);
        if (!(a->content = malloc(len + 1))) LP_FAIL(LP_ERR_OOM, "%s: out of memory", source);
        memcpy(a->content, content, len);
        a->content[len] = 0;
        a->len = len;
        a->match = a->content, a->match_len = len;
        s->n++;
        *find_slot(s, a->content, len) = s->n;
    }
    a->id = id;
    a->special = a->special || special;
    a->lstrip = lstrip, a->rstrip = rstrip, a->single_word = single_word, a->normalized = normalized;
    return LP_OK;
}

void added_free(lp_added_set *s) {
    for (int i = 0; i < s->n; i++) {
        if (s->tok[i].match != s->tok[i].content) free(s->tok[i].match);
        free(s->tok[i].content);
    }
    free(s->tok), free(s->slot), free(s->order[0]), free(s->order[1]);
    memset(s, 0, sizeof *s);
}

typedef struct { size_t len; int i; } by_len;
static int longest_first(const void *x, const void *y) {
    const by_len *a = x, *b = y;
    if (a->len != b->len) return a->len < b->len ? 1 : -1;
    return (a->i > b->i) - (a->i < b->i);
}

lp_status added_index(lp_added_set *s, const char *source) {
    by_len *ix = malloc((size_t)(s->n ? s->n : 1) * sizeof *ix);
    if (!ix) LP_FAIL(LP_ERR_OOM, "%s: out of memory", source);
    for (int k = 0; k < 2; k++) {
        int *order = malloc((size_t)(s->n ? s->n : 1) * sizeof *order), *start = s->start[k], count[257] = {0}, n = 0;
        if (!order) {
            free(ix);
            LP_FAIL(LP_ERR_OOM, "%s: out of memory", source);
        }
        free(s->order[k]);
        s->order[k] = order;
        for (int i = 0; i < s->n; i++)
            if (s->tok[i].normalized == k && s->tok[i].match_len)
                count[(unsigned char)s->tok[i].match[0]]++, ix[n++] = (by_len){s->tok[i].match_len, i};
        start[0] = 0;
        for (int c = 0; c < 256; c++) start[c + 1] = start[c] + count[c];
        /* longest first within a bucket, ties in the order added: sorted once (a bucket can
         * hold every added token, all "<...>"), then dealt into the buckets in that order */
        qsort(ix, (size_t)n, sizeof *ix, longest_first);
        int fill[256];
        memcpy(fill, start, sizeof fill);
        for (int j = 0; j < n; j++) order[fill[(unsigned char)s->tok[ix[j].i].match[0]]++] = ix[j].i;
    }
    free(ix);
    return LP_OK;
}

static int starts_with_word(const char *s, size_t n) {
    int32_t cp;
    return n > 0 && (utf8_decode(s, &cp), is_word_char(cp));
}
static int ends_with_word(const char *s, size_t n) {
    int32_t cp;
    return n > 0 && (utf8_decode(s + utf8_prev(s, n), &cp), is_word_char(cp));
}

/* The leftmost position at or after pos where a token matches, and the longest one there. */
static const lp_added_tok *next_match(const lp_added_set *set, int k, const char *s, size_t n, size_t pos, size_t *at) {
    for (size_t i = pos; i < n; i++) {
        unsigned c = (unsigned char)s[i];
        for (int j = set->start[k][c]; j < set->start[k][c + 1]; j++) {
            const lp_added_tok *a = &set->tok[set->order[k][j]];
            if (a->match_len <= n - i && memcmp(s + i, a->match, a->match_len) == 0) {
                *at = i;
                return a;
            }
        }
    }
    return NULL;
}

lp_status added_split(const lp_added_set *set, int normalized, const char *s, size_t n, lp_added_gap_fn gap,
                         lp_added_tok_fn tok, void *ctx) {
    int k = normalized ? 1 : 0;
    size_t start_offset = 0, pos = 0, at;
    const lp_added_tok *hit;
    while (pos < n && set->order[k] && (hit = next_match(set, k, s, n, pos, &at))) {
        size_t start = at, stop = at + hit->match_len;
        pos = stop; /* the search resumes after the match, whatever the flags do below */
        if (hit->single_word && ((start > 0 && ends_with_word(s, start)) || (stop < n && starts_with_word(s + stop, n - stop))))
            continue;
        if (hit->lstrip) {
            size_t ns = start;
            while (ns > 0) {
                int32_t cp;
                size_t p = utf8_prev(s, ns);
                utf8_decode(s + p, &cp);
                if (!is_white_space(cp)) break;
                ns = p;
            }
            start = ns > start_offset ? ns : start_offset;
        }
        while (hit->rstrip && stop < n) {
            int32_t cp;
            int len = utf8_decode(s + stop, &cp);
            if (!is_white_space(cp)) break;
            stop += (size_t)len;
        }
        if (start_offset < start) LP_CHECK(gap(ctx, s + start_offset, start - start_offset));
        LP_CHECK(tok(ctx, hit->id));
        start_offset = stop;
    }
    if (start_offset < n) LP_CHECK(gap(ctx, s + start_offset, n - start_offset));
    return LP_OK;
}
