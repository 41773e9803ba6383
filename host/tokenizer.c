/* tokenizer.c: byte-level BPE (GPT-2, Llama 3, SmolLM/SmolLM2, Qwen2) as Hugging Face
 * `tokenizers` 0.20.3 runs it, read from tokenizer.json or from GGUF metadata (see tokenizer.h).
 * SentencePiece-style BPE (Gemma: byte_fallback without a ByteLevel step, or a GGUF whose
 * tokenizer.ggml.model is 'llama') is handed to tokenizer_spm.c, which then does all the work.
 *
 * The pipeline follows tokenizers' encode(text, add_special_tokens=True) step by step:
 *   1. added tokens with normalized=false are cut out of the raw text (leftmost-longest,
 *      then the single_word / lstrip / rstrip rules of AddedVocabulary::find_matches);
 *   2. each remaining piece is normalized (NFC or nothing) and added tokens with
 *      normalized=true are cut out of it the same way;
 *   3. each remaining piece runs through the pre-tokenizer steps in order (Split, Digits,
 *      ByteLevel), depth first: a step's pieces go to the next step one by one, which is
 *      what PreTokenizedString::split does breadth first. ByteLevel maps the bytes of its
 *      pieces to the GPT-2 byte alphabet, so the steps after it see the mapped text;
 *   4. each final piece is one BPE word: whole if ignore_merges and it is in the vocabulary,
 *      else characters merged by rank with the same priority queue as Word::merge_all;
 *   5. the TemplateProcessing template (if any) puts its special tokens around the ids.
 * Regexes are the tokenizer's own patterns (Oniguruma syntax in tokenizers) run by PCRE2
 * with UTF+UCP; one difference of class membership is patched (see fix_pattern).
 *
 * Choices where tokenizers gives no single answer for us:
 *   - lp_detokenize returns raw bytes (tokenizers' decode replaces invalid UTF-8 by U+FFFD):
 *     a caller decoding token by token can then join the pieces into valid text;
 *   - tokenizer_config.json gives only the bos/eos ids reported by lp_tokenizer_bos/eos;
 *     its add_bos_token changes nothing, as in tokenizers (the post_processor decides);
 *   - "truncation" and "padding" in tokenizer.json are ignored (they limit batches, not text);
 *   - GGUF files carry no unk token for BPE that tokenizers would use: bytes missing from the
 *     vocabulary are dropped, as tokenizers drops them without unk_token. */
#define PCRE2_CODE_UNIT_WIDTH 8
#include <cjson/cJSON.h>
#include <errno.h>
#include <pcre2.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <utf8proc.h>

#include "loupe/safetensors.h"
#include "loupe/tokenizer.h"
#include "tokenizer_spm.h"

#define MAX_PRE_STEPS 16
#define MAX_VOCAB_ID (1 << 26)

static const char *GPT2_PATTERN =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
static const char *LLAMA3_PATTERN =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char *QWEN2_PATTERN =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/* ---- small open-addressing hash maps ---- */

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

/* string -> id; keys point into strings the tokenizer owns */
typedef struct { const char *s; uint32_t len; int32_t id; } sm_slot;
typedef struct { sm_slot *slot; size_t cap, n; } strmap;

static int sm_init(strmap *m, size_t expect) {
    m->cap = pow2_at_least(2 * expect + 1);
    m->n = 0;
    m->slot = calloc(m->cap, sizeof *m->slot);
    return m->slot != NULL;
}
static sm_slot *sm_find(const strmap *m, const char *s, size_t n) {
    size_t mask = m->cap - 1, i = hash_bytes(s, n) & mask;
    for (;; i = (i + 1) & mask) {
        sm_slot *e = &m->slot[i];
        if (!e->s || (e->len == n && memcmp(e->s, s, n) == 0)) return e;
    }
}
static int sm_get(const strmap *m, const char *s, size_t n) {
    if (!m->slot) return -1;
    sm_slot *e = sm_find(m, s, n);
    return e->s ? e->id : -1;
}
/* Inserts or overwrites (a later duplicate wins, as in a Rust HashMap built by collect). */
static int sm_put(strmap *m, const char *s, size_t n, int32_t id) {
    if (2 * (m->n + 1) > m->cap) {
        strmap bigger;
        bigger.cap = m->cap * 2, bigger.n = 0;
        if (!(bigger.slot = calloc(bigger.cap, sizeof *bigger.slot))) return 0;
        for (size_t i = 0; i < m->cap; i++)
            if (m->slot[i].s) *sm_find(&bigger, m->slot[i].s, m->slot[i].len) = m->slot[i], bigger.n++;
        free(m->slot);
        *m = bigger;
    }
    sm_slot *e = sm_find(m, s, n);
    if (!e->s) m->n++;
    *e = (sm_slot){s, (uint32_t)n, id};
    return 1;
}

/* (left id, right id) -> (rank, merged id) */
typedef struct { int32_t a, b, rank, id; } pm_slot; /* a < 0: empty */
typedef struct { pm_slot *slot; size_t cap; } pairmap;

static uint64_t pair_hash(int32_t a, int32_t b) {
    uint64_t x = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    x ^= x >> 33, x *= 0xff51afd7ed558ccdull, x ^= x >> 33, x *= 0xc4ceb9fe1a85ec53ull;
    return x ^ (x >> 33);
}
static pm_slot *pm_find(const pairmap *m, int32_t a, int32_t b) {
    size_t mask = m->cap - 1, i = pair_hash(a, b) & mask;
    for (;; i = (i + 1) & mask) {
        pm_slot *e = &m->slot[i];
        if (e->a < 0 || (e->a == a && e->b == b)) return e;
    }
}
static const pm_slot *pm_get(const pairmap *m, int32_t a, int32_t b) {
    if (!m->slot) return NULL;
    const pm_slot *e = pm_find(m, a, b);
    return e->a < 0 ? NULL : e;
}

/* ---- the tokenizer ---- */

typedef struct {
    char *content;       /* as given */
    size_t len;
    char *match;         /* what is searched for: content, normalized when normalized=true */
    size_t match_len;
    int32_t id;
    int special, lstrip, rstrip, single_word, normalized;
} added_tok;

/* Added tokens searched in one pass, bucketed by first byte, longest first. */
typedef struct {
    int *order;          /* indices into t->added */
    int start[257];      /* order[start[c] .. start[c+1]) begin with byte c */
} match_set;

typedef enum { PRE_SPLIT, PRE_BYTELEVEL, PRE_DIGITS } pre_kind;
typedef struct {
    pre_kind kind;
    pcre2_code *re;      /* SPLIT, or BYTELEVEL with use_regex */
    int add_prefix_space;
    int individual_digits;
} pre_step;

struct lp_tokenizer {
    char *source;        /* file name for messages */
    int32_t n_ids;       /* max id + 1 */
    int32_t cap_ids;     /* text has room for this many (zeroed past n_ids) */
    char **text;         /* id -> token string (vocabulary form), NULL for unused ids */
    char **retired;      /* replaced strings still keyed in vocab */
    int n_retired;
    char **dec;          /* id -> decoded bytes (ByteLevel decoder) */
    uint32_t *dec_len;
    size_t model_vocab_n;
    strmap vocab;        /* the BPE model's vocabulary */
    pairmap merges;
    int32_t unk;         /* -1: characters outside the vocabulary are dropped */
    int fuse_unk, ignore_merges;
    added_tok *added;
    int n_added, cap_added;
    strmap added_at;     /* content -> index into added (keys: added[i].content) */
    int32_t max_added;   /* the largest id given to an added token, -1: none yet */
    match_set raw, norm; /* normalized=false / normalized=true added tokens */
    int nfc;
    pre_step pre[MAX_PRE_STEPS];
    int n_pre;
    int32_t *prefix, *suffix; /* template around the sequence */
    int n_prefix, n_suffix;
    int32_t bos, eos;
    int32_t byte_id[256];     /* id of the one-character token of each byte, or -1 */
    uint16_t byte_cp[256];    /* GPT-2 bytes_to_unicode */
    int16_t cp_byte[324];     /* its inverse, -1 elsewhere */
    lp_spm *spm;              /* SentencePiece-style BPE (Gemma): everything is there */
};

static void init_byte_map(lp_tokenizer *t) {
    for (int i = 0; i < 324; i++) t->cp_byte[i] = -1;
    int n = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        t->byte_cp[b] = (uint16_t)(printable ? b : 256 + n++);
        t->cp_byte[t->byte_cp[b]] = (int16_t)b;
    }
}

static void free_set(match_set *s) { free(s->order); }

void lp_tokenizer_free(lp_tokenizer *t) {
    if (!t) return;
    if (t->text) for (int32_t i = 0; i < t->n_ids; i++) free(t->text[i]);
    if (t->dec) for (int32_t i = 0; i < t->n_ids; i++) free(t->dec[i]);
    for (int i = 0; i < t->n_retired; i++) free(t->retired[i]);
    free(t->retired), free(t->text), free(t->dec), free(t->dec_len);
    free(t->vocab.slot), free(t->merges.slot);
    for (int i = 0; i < t->n_added; i++) {
        if (t->added[i].match != t->added[i].content) free(t->added[i].match);
        free(t->added[i].content);
    }
    free(t->added), free(t->added_at.slot);
    free_set(&t->raw), free_set(&t->norm);
    for (int i = 0; i < t->n_pre; i++) pcre2_code_free(t->pre[i].re);
    free(t->prefix), free(t->suffix), free(t->source);
    lp_spm_free(t->spm);
    free(t);
}

static lp_status new_tokenizer(lp_tokenizer **out, const char *source) {
    lp_tokenizer *t = calloc(1, sizeof *t);
    if (!t || !(t->source = strdup(source))) {
        free(t);
        LP_FAIL(LP_ERR_OOM, "%s: out of memory", source);
    }
    t->unk = t->bos = t->eos = -1;
    init_byte_map(t);
    *out = t;
    return LP_OK;
}

/* ---- UTF-8 ---- */

/* Offset of the first invalid byte, or n when s[0..n) is valid UTF-8 (as Rust's str). */
static size_t utf8_invalid_at(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) { i++; continue; }
        size_t k;
        uint32_t cp, min;
        if (c >= 0xC2 && c <= 0xDF) k = 1, cp = c & 0x1F, min = 0x80;
        else if (c >= 0xE0 && c <= 0xEF) k = 2, cp = c & 0x0F, min = 0x800;
        else if (c >= 0xF0 && c <= 0xF4) k = 3, cp = c & 0x07, min = 0x10000;
        else return i;
        if (i + k >= n) return i; /* truncated */
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xC0) != 0x80) return i;
            cp = (cp << 6) | (s[i + j] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
        i += k + 1;
    }
    return n;
}

/* Decodes one character of valid UTF-8 at s; returns its length. */
static int utf8_next(const char *s, int32_t *cp) {
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
static int utf8_put(char *dst, int32_t cp) {
    if (cp < 0x80) { dst[0] = (char)cp; return 1; }
    if (cp < 0x800) { dst[0] = (char)(0xC0 | (cp >> 6)); dst[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        dst[0] = (char)(0xE0 | (cp >> 12)), dst[1] = (char)(0x80 | ((cp >> 6) & 0x3F)), dst[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    dst[0] = (char)(0xF0 | (cp >> 18)), dst[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    dst[2] = (char)(0x80 | ((cp >> 6) & 0x3F)), dst[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Rust's char::is_whitespace / regex \s: the Unicode White_Space property. */
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
/* Rust's char::is_numeric: general categories Nd, Nl, No. */
static int is_numeric(int32_t c) {
    utf8proc_category_t k = utf8proc_category(c);
    return k == UTF8PROC_CATEGORY_ND || k == UTF8PROC_CATEGORY_NL || k == UTF8PROC_CATEGORY_NO;
}

/* NFC of s[0..n) (valid UTF-8, NULs allowed) into a malloc'ed buffer. */
static lp_status nfc(const char *s, size_t n, char **out, size_t *out_len) {
    utf8proc_uint8_t *dst = NULL;
    utf8proc_ssize_t r = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &dst,
                                      UTF8PROC_STABLE | UTF8PROC_COMPOSE);
    if (r < 0) LP_FAIL(LP_ERR_INTERNAL, "NFC normalization failed: %s", utf8proc_errmsg(r));
    *out = (char *)dst, *out_len = (size_t)r;
    return LP_OK;
}

/* ---- regexes ---- */

/* tokenizers runs its patterns with Oniguruma, whose \s is the White_Space property; PCRE2's
 * UCP \s also takes U+180E (MONGOLIAN VOWEL SEPARATOR, a format character since Unicode 6.3).
 * Spelling \s and \S out as White_Space keeps the two engines on the same classes. */
#define WS_CLASS "\\t-\\r\\x{20}\\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}\\x{202f}\\x{205f}\\x{3000}"
static char *fix_pattern(const char *p) {
    size_t n = strlen(p), cap = n * 8 + sizeof WS_CLASS * 4 + 16;
    char *o = malloc(cap), *w = o;
    if (!o) return NULL;
    int in_class = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '\\' && i + 1 < n) {
            char c = p[i + 1];
            size_t left = cap - (size_t)(w - o);
            if (c == 's' || (c == 'S' && !in_class)) {
                if (left < sizeof WS_CLASS + 8) { /* grow: patterns are short, this is rare */
                    size_t off = (size_t)(w - o);
                    cap *= 2;
                    char *bigger = realloc(o, cap);
                    if (!bigger) { free(o); return NULL; }
                    o = bigger, w = o + off;
                }
                if (in_class) w += sprintf(w, "%s", WS_CLASS);
                else w += sprintf(w, c == 's' ? "[%s]" : "[^%s]", WS_CLASS);
            } else {
                *w++ = p[i], *w++ = c; /* \S inside a class is left to PCRE2 */
            }
            i++;
            continue;
        }
        if (p[i] == '[' && !in_class) {
            in_class = 1;
            *w++ = p[i];
            if (i + 1 < n && p[i + 1] == '^') *w++ = p[++i];
            if (i + 1 < n && p[i + 1] == ']') *w++ = p[++i]; /* a leading ] is literal */
            continue;
        }
        if (p[i] == '[' && in_class && i + 1 < n && p[i + 1] == ':') { /* [:alpha:] inside a class */
            const char *end = strstr(p + i + 2, ":]");
            if (end) {
                size_t k = (size_t)(end + 2 - (p + i));
                memcpy(w, p + i, k);
                w += k, i += k - 1;
                continue;
            }
        }
        if (p[i] == ']' && in_class) in_class = 0;
        *w++ = p[i];
    }
    *w = 0;
    return o;
}

static lp_status compile_regex(pcre2_code **re, const char *pattern, int literal, const char *src, const char *key) {
    char *fixed = literal ? strdup(pattern) : fix_pattern(pattern);
    if (!fixed) LP_FAIL(LP_ERR_OOM, "%s: out of memory", src);
    int err;
    PCRE2_SIZE off;
    *re = pcre2_compile((PCRE2_SPTR)fixed, PCRE2_ZERO_TERMINATED,
                        PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0), &err, &off, NULL);
    free(fixed);
    if (!*re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        LP_FAIL(LP_ERR_FORMAT, "%s: %s: cannot compile the pattern '%s': %s", src, key, pattern, (char *)msg);
    }
    pcre2_jit_compile(*re, PCRE2_JIT_COMPLETE); /* the interpreter stays as the fallback */
    return LP_OK;
}

/* ---- loading helpers shared by both formats ---- */

/* The vocabulary map's keys point at these strings: a replaced one is retired, not freed
 * (an added token may take a model id whose string differs, when the vocabulary has gaps). */
static lp_status set_id_text(lp_tokenizer *t, int32_t id, const char *s, size_t n) {
    char *old = t->text[id];
    if (old && strlen(old) == n && memcmp(old, s, n) == 0) return LP_OK;
    char *c = malloc(n + 1);
    if (!c) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
    memcpy(c, s, n);
    c[n] = 0;
    if (old) {
        char **r = realloc(t->retired, (size_t)(t->n_retired + 1) * sizeof *r);
        if (!r) {
            free(c);
            LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
        }
        t->retired = r;
        t->retired[t->n_retired++] = old;
    }
    t->text[id] = c;
    return LP_OK;
}

/* Room for ids below n_ids. The capacity doubles: added tokens arrive one id at a time. */
static lp_status grow_ids(lp_tokenizer *t, int32_t n_ids) {
    if (n_ids <= t->n_ids) return LP_OK;
    if (n_ids > t->cap_ids) {
        int32_t cap = t->cap_ids && t->cap_ids <= INT32_MAX / 2 ? 2 * t->cap_ids : n_ids;
        if (cap < n_ids) cap = n_ids;
        char **text = realloc(t->text, (size_t)cap * sizeof *text);
        if (!text) LP_FAIL(LP_ERR_OOM, "%s: out of memory for %d tokens", t->source, n_ids);
        memset(text + t->cap_ids, 0, (size_t)(cap - t->cap_ids) * sizeof *text);
        t->text = text, t->cap_ids = cap;
    }
    t->n_ids = n_ids;
    return LP_OK;
}

/* Adds one merge "a" + "b" with the given rank; both parts and their concatenation must be
 * in the vocabulary (tokenizers: MergeTokenOutOfVocabulary). */
static lp_status add_merge(lp_tokenizer *t, const char *a, size_t na, const char *b, size_t nb, int32_t rank,
                           const char *key) {
    int32_t ia = sm_get(&t->vocab, a, na), ib = sm_get(&t->vocab, b, nb);
    if (ia < 0 || ib < 0) {
        const char *bad = ia < 0 ? a : b;
        int nbad = (int)(ia < 0 ? na : nb);
        LP_FAIL(LP_ERR_FORMAT, "%s: %s[%d] names '%.*s', which is not in the vocabulary", t->source, key, rank, nbad, bad);
    }
    char buf[512], *cat = na + nb < sizeof buf ? buf : malloc(na + nb);
    if (!cat) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
    memcpy(cat, a, na), memcpy(cat + na, b, nb);
    int32_t id = sm_get(&t->vocab, cat, na + nb);
    if (id < 0) {
        lp_status st = lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__,
                                    "%s: %s[%d] makes '%.*s', which is not in the vocabulary", t->source, key, rank,
                                    (int)(na + nb), cat);
        if (cat != buf) free(cat);
        return st;
    }
    if (cat != buf) free(cat);
    pm_slot *e = pm_find(&t->merges, ia, ib);
    *e = (pm_slot){ia, ib, rank, id}; /* a repeated pair keeps its last rank, as tokenizers does */
    return LP_OK;
}

static lp_status init_merges(lp_tokenizer *t, size_t n) {
    t->merges.cap = pow2_at_least(2 * n + 1);
    t->merges.slot = malloc(t->merges.cap * sizeof *t->merges.slot);
    if (!t->merges.slot) LP_FAIL(LP_ERR_OOM, "%s: out of memory for %zu merges", t->source, n);
    for (size_t i = 0; i < t->merges.cap; i++) t->merges.slot[i].a = -1;
    return LP_OK;
}

/* Adds an added token the way AddedVocabulary::add_tokens does: an existing entry (added or
 * in the model vocabulary) keeps its id, a new one takes the next id after the vocabulary.
 * want_id >= 0 (GGUF: the token's own row) overrides that, for vocabularies with duplicates.
 * The entry is found through a hash of the contents and the largest id so far is kept, so a
 * file with 100k added tokens loads in linear time. max_added is a running maximum: ids only
 * change with want_id (GGUF), where it is not used. */
static lp_status add_token(lp_tokenizer *t, const char *content, size_t len, int32_t want_id, int special, int lstrip,
                           int rstrip, int single_word, int normalized) {
    if (len == 0) return LP_OK;
    if (t->n_added == 0) t->max_added = -1; /* calloc'ed: 0 would read as an id */
    int32_t id = -1, max_added = t->max_added;
    int at = sm_get(&t->added_at, content, len);
    if (want_id >= 0) id = want_id;
    else if (at >= 0) id = t->added[at].id;
    else id = sm_get(&t->vocab, content, len);
    if (id < 0) {
        int32_t vs = (int32_t)t->model_vocab_n;
        id = max_added < 0 ? vs : (max_added >= vs || vs == 0 ? max_added + 1 : vs);
    }
    if (id >= MAX_VOCAB_ID) LP_FAIL(LP_ERR_FORMAT, "%s: added token '%.*s' would get id %d, too large", t->source, (int)len, content, id);
    if (at < 0) {
        if (t->n_added == t->cap_added) {
            int cap = t->cap_added ? 2 * t->cap_added : 16;
            added_tok *a = realloc(t->added, (size_t)cap * sizeof *a);
            if (!a) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
            t->added = a, t->cap_added = cap;
        }
        if (!t->added_at.slot && !sm_init(&t->added_at, 16)) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
        added_tok *a = &t->added[t->n_added];
        memset(a, 0, sizeof *a);
        if (!(a->content = malloc(len + 1))) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
        memcpy(a->content, content, len);
        a->content[len] = 0;
        a->len = len;
        at = t->n_added++; /* counted once content is set: lp_tokenizer_free frees it */
        if (!sm_put(&t->added_at, a->content, len, at)) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
    }
    added_tok *a = &t->added[at];
    a->id = id;
    if (id > t->max_added) t->max_added = id;
    a->special = a->special || special; /* once special, always special (special_tokens_set) */
    a->lstrip = lstrip, a->rstrip = rstrip, a->single_word = single_word, a->normalized = normalized;
    LP_CHECK(grow_ids(t, id + 1));
    return set_id_text(t, id, content, len);
}

typedef struct { size_t len; int i; } by_len;
static int longest_first(const void *x, const void *y) {
    const by_len *a = x, *b = y;
    if (a->len != b->len) return a->len < b->len ? 1 : -1;
    return (a->i > b->i) - (a->i < b->i);
}

static lp_status build_set(lp_tokenizer *t, match_set *s, int normalized) {
    int n = 0;
    for (int i = 0; i < t->n_added; i++) n += t->added[i].normalized == normalized;
    s->order = malloc((size_t)(n ? n : 1) * sizeof *s->order);
    by_len *ix = malloc((size_t)(n ? n : 1) * sizeof *ix);
    if (!s->order || !ix) {
        free(ix);
        LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
    }
    int count[257] = {0}, k = 0;
    for (int i = 0; i < t->n_added; i++)
        if (t->added[i].normalized == normalized) count[(unsigned char)t->added[i].match[0]]++, ix[k++] = (by_len){t->added[i].match_len, i};
    s->start[0] = 0;
    for (int c = 0; c < 256; c++) s->start[c + 1] = s->start[c] + count[c];
    /* longest first within a bucket, ties in the order added: sorted once (a bucket can
     * hold every added token, all "<...>"), then dealt into the buckets in that order */
    qsort(ix, (size_t)n, sizeof *ix, longest_first);
    int fill[256];
    memcpy(fill, s->start, sizeof fill);
    for (int j = 0; j < n; j++) s->order[fill[(unsigned char)t->added[ix[j].i].match[0]]++] = ix[j].i;
    free(ix);
    return LP_OK;
}

/* After the vocabulary, merges, added tokens and normalizer are known: match strings,
 * match sets, the byte -> id table and the decoded form of every token. */
static lp_status finish(lp_tokenizer *t) {
    for (int i = 0; i < t->n_added; i++) {
        added_tok *a = &t->added[i];
        a->match = a->content, a->match_len = a->len;
        if (a->normalized && t->nfc) {
            LP_CHECK(nfc(a->content, a->len, &a->match, &a->match_len));
            if (a->match_len == 0) { /* cannot happen for NFC, but an empty pattern must not match */
                free(a->match);
                a->match = a->content, a->match_len = a->len;
            }
        }
    }
    LP_CHECK(build_set(t, &t->raw, 0));
    LP_CHECK(build_set(t, &t->norm, 1));
    for (int b = 0; b < 256; b++) {
        char c[4];
        int n = utf8_put(c, t->byte_cp[b]);
        t->byte_id[b] = sm_get(&t->vocab, c, (size_t)n);
    }
    t->dec = calloc((size_t)t->n_ids, sizeof *t->dec);
    t->dec_len = calloc((size_t)t->n_ids, sizeof *t->dec_len);
    if (!t->dec || !t->dec_len) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
    for (int32_t id = 0; id < t->n_ids; id++) {
        const char *s = t->text[id];
        if (!s) continue;
        size_t n = strlen(s), k = 0;
        if (!(t->dec[id] = malloc(n + 1))) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
        /* ByteLevel decoder: a token whose characters are all in the byte alphabet becomes
         * those bytes; any other token is kept as its UTF-8 text. */
        int all = 1;
        for (size_t i = 0; i < n && all;) {
            int32_t cp;
            i += (size_t)utf8_next(s + i, &cp);
            if (cp < 324 && t->cp_byte[cp] >= 0) t->dec[id][k++] = (char)t->cp_byte[cp];
            else all = 0;
        }
        if (!all) memcpy(t->dec[id], s, n), k = n;
        t->dec_len[id] = (uint32_t)k;
    }
    return LP_OK;
}

/* ---- tokenizer.json ---- */

static int json_bool(const cJSON *o, const char *key, int dflt) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsBool(v) ? cJSON_IsTrue(v) : dflt;
}
static const char *json_type(const cJSON *o) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, "type");
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static lp_status load_normalizer(lp_tokenizer *t, const cJSON *n, const char *key) {
    if (!n || cJSON_IsNull(n)) return LP_OK;
    const char *ty = json_type(n);
    if (!ty) LP_FAIL(LP_ERR_FORMAT, "%s: %s has no type", t->source, key);
    if (strcmp(ty, "NFC") == 0) {
        t->nfc = 1;
        return LP_OK;
    }
    if (strcmp(ty, "Sequence") == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(n, "normalizers"), *e;
        if (!cJSON_IsArray(list)) LP_FAIL(LP_ERR_FORMAT, "%s: %s.normalizers is not a list", t->source, key);
        cJSON_ArrayForEach(e, list) LP_CHECK(load_normalizer(t, e, "normalizer.normalizers[]"));
        return LP_OK;
    }
    LP_FAIL(LP_ERR_FORMAT, "%s: %s type '%s' is not supported (only NFC, or a Sequence of NFC)", t->source, key, ty);
}

static lp_status add_pre(lp_tokenizer *t, pre_step s) {
    if (t->n_pre == MAX_PRE_STEPS) {
        pcre2_code_free(s.re);
        LP_FAIL(LP_ERR_FORMAT, "%s: pre_tokenizer has more than %d steps", t->source, MAX_PRE_STEPS);
    }
    t->pre[t->n_pre++] = s;
    return LP_OK;
}

static lp_status load_pre(lp_tokenizer *t, const cJSON *p, const char *key) {
    const char *ty = json_type(p);
    if (!ty) LP_FAIL(LP_ERR_FORMAT, "%s: %s has no type", t->source, key);
    if (strcmp(ty, "Sequence") == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(p, "pretokenizers"), *e;
        if (!cJSON_IsArray(list)) LP_FAIL(LP_ERR_FORMAT, "%s: %s.pretokenizers is not a list", t->source, key);
        cJSON_ArrayForEach(e, list) LP_CHECK(load_pre(t, e, "pre_tokenizer.pretokenizers[]"));
        return LP_OK;
    }
    pre_step s = {0};
    if (strcmp(ty, "ByteLevel") == 0) {
        s.kind = PRE_BYTELEVEL;
        s.add_prefix_space = json_bool(p, "add_prefix_space", 1);
        if (json_bool(p, "use_regex", 1)) LP_CHECK(compile_regex(&s.re, GPT2_PATTERN, 0, t->source, key));
        return add_pre(t, s);
    }
    if (strcmp(ty, "Digits") == 0) {
        s.kind = PRE_DIGITS;
        s.individual_digits = json_bool(p, "individual_digits", 0);
        return add_pre(t, s);
    }
    if (strcmp(ty, "Split") == 0) {
        const cJSON *pat = cJSON_GetObjectItemCaseSensitive(p, "pattern");
        const cJSON *re = cJSON_GetObjectItemCaseSensitive(pat, "Regex");
        const cJSON *str = cJSON_GetObjectItemCaseSensitive(pat, "String");
        const cJSON *beh = cJSON_GetObjectItemCaseSensitive(p, "behavior");
        if (!cJSON_IsString(re) && !cJSON_IsString(str))
            LP_FAIL(LP_ERR_FORMAT, "%s: %s Split.pattern needs a Regex or a String", t->source, key);
        if (!cJSON_IsString(beh) || strcmp(beh->valuestring, "Isolated") != 0)
            LP_FAIL(LP_ERR_FORMAT, "%s: %s Split.behavior '%s' is not supported (only Isolated)", t->source, key,
                    cJSON_IsString(beh) ? beh->valuestring : "?");
        if (json_bool(p, "invert", 0))
            LP_FAIL(LP_ERR_FORMAT, "%s: %s Split.invert = true is not supported", t->source, key);
        s.kind = PRE_SPLIT;
        if (cJSON_IsString(re)) LP_CHECK(compile_regex(&s.re, re->valuestring, 0, t->source, "pre_tokenizer Split.pattern.Regex"));
        else {
            if (!str->valuestring[0]) LP_FAIL(LP_ERR_FORMAT, "%s: %s Split.pattern.String is empty", t->source, key);
            LP_CHECK(compile_regex(&s.re, str->valuestring, 1, t->source, "pre_tokenizer Split.pattern.String"));
        }
        return add_pre(t, s);
    }
    LP_FAIL(LP_ERR_FORMAT, "%s: %s type '%s' is not supported (only ByteLevel, Split, Digits and Sequence)",
            t->source, key, ty);
}

/* TemplateProcessing: the "single" template as ids before and after $A. */
static lp_status load_template(lp_tokenizer *t, const cJSON *p) {
    if (t->prefix || t->suffix)
        LP_FAIL(LP_ERR_FORMAT, "%s: post_processor has more than one TemplateProcessing", t->source);
    const cJSON *single = cJSON_GetObjectItemCaseSensitive(p, "single"), *item;
    const cJSON *specials = cJSON_GetObjectItemCaseSensitive(p, "special_tokens");
    if (!cJSON_IsArray(single)) LP_FAIL(LP_ERR_FORMAT, "%s: post_processor TemplateProcessing.single is not a list", t->source);
    int seen_a = 0;
    cJSON_ArrayForEach(item, single) {
        const cJSON *sp = cJSON_GetObjectItemCaseSensitive(item, "SpecialToken");
        const cJSON *seq = cJSON_GetObjectItemCaseSensitive(item, "Sequence");
        if (seq) {
            const cJSON *id = cJSON_GetObjectItemCaseSensitive(seq, "id");
            if (!cJSON_IsString(id) || strcmp(id->valuestring, "A") != 0 || seen_a)
                LP_FAIL(LP_ERR_FORMAT, "%s: post_processor TemplateProcessing.single must hold $A exactly once", t->source);
            seen_a = 1;
            continue;
        }
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(sp, "id");
        if (!cJSON_IsString(name))
            LP_FAIL(LP_ERR_FORMAT, "%s: post_processor TemplateProcessing.single has an item that is neither SpecialToken nor Sequence", t->source);
        const cJSON *entry = cJSON_GetObjectItemCaseSensitive(specials, name->valuestring);
        const cJSON *ids = cJSON_GetObjectItemCaseSensitive(entry, "ids"), *id;
        if (!cJSON_IsArray(ids))
            LP_FAIL(LP_ERR_FORMAT, "%s: post_processor TemplateProcessing.special_tokens has no ids for '%s'", t->source, name->valuestring);
        cJSON_ArrayForEach(id, ids) {
            if (!cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble >= MAX_VOCAB_ID)
                LP_FAIL(LP_ERR_FORMAT, "%s: post_processor TemplateProcessing.special_tokens['%s'].ids holds a bad id", t->source, name->valuestring);
            int32_t **dst = seen_a ? &t->suffix : &t->prefix;
            int *cnt = seen_a ? &t->n_suffix : &t->n_prefix;
            int32_t *grown = realloc(*dst, (size_t)(*cnt + 1) * sizeof **dst);
            if (!grown) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
            *dst = grown;
            (*dst)[(*cnt)++] = (int32_t)id->valuedouble;
        }
    }
    if (!seen_a) LP_FAIL(LP_ERR_FORMAT, "%s: post_processor TemplateProcessing.single has no $A", t->source);
    return LP_OK;
}

static lp_status load_post(lp_tokenizer *t, const cJSON *p, const char *key) {
    if (!p || cJSON_IsNull(p)) return LP_OK;
    const char *ty = json_type(p);
    if (!ty) LP_FAIL(LP_ERR_FORMAT, "%s: %s has no type", t->source, key);
    if (strcmp(ty, "ByteLevel") == 0) return LP_OK; /* offsets only */
    if (strcmp(ty, "TemplateProcessing") == 0) return load_template(t, p);
    if (strcmp(ty, "Sequence") == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(p, "processors"), *e;
        if (!cJSON_IsArray(list)) LP_FAIL(LP_ERR_FORMAT, "%s: %s.processors is not a list", t->source, key);
        cJSON_ArrayForEach(e, list) LP_CHECK(load_post(t, e, "post_processor.processors[]"));
        return LP_OK;
    }
    LP_FAIL(LP_ERR_FORMAT, "%s: %s type '%s' is not supported (only ByteLevel, TemplateProcessing and Sequence)",
            t->source, key, ty);
}

/* A string from the JSON as vocabulary text: valid UTF-8 (cJSON passes any bytes through,
 * and the decoder walks tokens character by character), no NUL inside. */
static lp_status check_text(const lp_tokenizer *t, const char *s, const char *what) {
    size_t n = strlen(s), bad = utf8_invalid_at((const unsigned char *)s, n);
    if (bad != n)
        LP_FAIL(LP_ERR_FORMAT, "%s: %s is not valid UTF-8 (byte 0x%02x at offset %zu)", t->source, what,
                (unsigned char)s[bad], bad);
    return LP_OK;
}

/* json_len: the file's size. A vocabulary is dense, and each entry takes bytes of the
 * file, so an id at or past the size is a sparse one whose id table would be sized by a
 * number, not by the file: refused. */
static lp_status load_model(lp_tokenizer *t, const cJSON *m, size_t json_len) {
    const char *ty = json_type(m);
    if (!cJSON_IsObject(m)) LP_FAIL(LP_ERR_FORMAT, "%s: has no model", t->source);
    if (!ty || strcmp(ty, "BPE") != 0)
        LP_FAIL(LP_ERR_FORMAT, "%s: model.type '%s' is not supported (only byte-level BPE)", t->source, ty ? ty : "(none)");
    const cJSON *v;
    v = cJSON_GetObjectItemCaseSensitive(m, "dropout");
    if (v && !cJSON_IsNull(v) && !(cJSON_IsNumber(v) && v->valuedouble == 0))
        LP_FAIL(LP_ERR_FORMAT, "%s: model.dropout = %g is not supported (BPE dropout is random)", t->source, cJSON_IsNumber(v) ? v->valuedouble : -1.0);
    const char *affix[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int i = 0; i < 2; i++) {
        v = cJSON_GetObjectItemCaseSensitive(m, affix[i]);
        if (v && !cJSON_IsNull(v) && !(cJSON_IsString(v) && !v->valuestring[0]))
            LP_FAIL(LP_ERR_FORMAT, "%s: model.%s is not supported by byte-level BPE", t->source, affix[i]);
    }
    if (json_bool(m, "byte_fallback", 0))
        LP_FAIL(LP_ERR_FORMAT, "%s: model.byte_fallback = true is SentencePiece-style BPE; only byte-level BPE is supported", t->source);
    t->fuse_unk = json_bool(m, "fuse_unk", 0);
    t->ignore_merges = json_bool(m, "ignore_merges", 0);

    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(m, "vocab"), *e;
    if (!cJSON_IsObject(vocab)) LP_FAIL(LP_ERR_FORMAT, "%s: model.vocab is not an object", t->source);
    size_t n = (size_t)cJSON_GetArraySize(vocab);
    int32_t max_id = -1;
    cJSON_ArrayForEach(e, vocab) {
        if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble >= MAX_VOCAB_ID || e->valuedouble != (double)(int32_t)e->valuedouble)
            LP_FAIL(LP_ERR_FORMAT, "%s: model.vocab['%s'] is not a token id", t->source, e->string);
        if ((int32_t)e->valuedouble > max_id) max_id = (int32_t)e->valuedouble;
        if ((size_t)max_id >= json_len)
            LP_FAIL(LP_ERR_FORMAT, "%s: model.vocab['%s'] = %d is beyond any dense vocabulary a %zu-byte file can hold",
                    t->source, e->string, max_id, json_len);
        char what[64];
        snprintf(what, sizeof what, "the model.vocab key of id %d", (int32_t)e->valuedouble);
        LP_CHECK(check_text(t, e->string, what));
    }
    LP_CHECK(grow_ids(t, max_id + 1));
    if (!sm_init(&t->vocab, n)) LP_FAIL(LP_ERR_OOM, "%s: out of memory for %zu tokens", t->source, n);
    cJSON_ArrayForEach(e, vocab) {
        int32_t id = (int32_t)e->valuedouble;
        if (t->text[id]) LP_FAIL(LP_ERR_FORMAT, "%s: model.vocab gives id %d to both '%s' and '%s'", t->source, id, t->text[id], e->string);
        LP_CHECK(set_id_text(t, id, e->string, strlen(e->string)));
        if (!sm_put(&t->vocab, t->text[id], strlen(t->text[id]), id)) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
    }
    t->model_vocab_n = t->vocab.n;

    v = cJSON_GetObjectItemCaseSensitive(m, "unk_token");
    if (cJSON_IsString(v)) {
        t->unk = sm_get(&t->vocab, v->valuestring, strlen(v->valuestring));
        if (t->unk < 0) LP_FAIL(LP_ERR_FORMAT, "%s: model.unk_token '%s' is not in the vocabulary", t->source, v->valuestring);
    }

    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(m, "merges");
    if (!cJSON_IsArray(merges)) LP_FAIL(LP_ERR_FORMAT, "%s: model.merges is not a list", t->source);
    LP_CHECK(init_merges(t, (size_t)cJSON_GetArraySize(merges)));
    int32_t rank = 0;
    cJSON_ArrayForEach(e, merges) {
        if (cJSON_IsString(e)) { /* "a b": exactly one space, as convert_merges_to_hashmap */
            const char *s = e->valuestring, *sp = strchr(s, ' ');
            if (!sp || strchr(sp + 1, ' '))
                LP_FAIL(LP_ERR_FORMAT, "%s: model.merges[%d] '%s' is not two tokens separated by one space", t->source, rank, s);
            LP_CHECK(add_merge(t, s, (size_t)(sp - s), sp + 1, strlen(sp + 1), rank, "model.merges"));
        } else if (cJSON_IsArray(e) && cJSON_GetArraySize(e) == 2 && cJSON_IsString(cJSON_GetArrayItem(e, 0)) &&
                   cJSON_IsString(cJSON_GetArrayItem(e, 1))) {
            const char *a = cJSON_GetArrayItem(e, 0)->valuestring, *b = cJSON_GetArrayItem(e, 1)->valuestring;
            LP_CHECK(add_merge(t, a, strlen(a), b, strlen(b), rank, "model.merges"));
        } else {
            LP_FAIL(LP_ERR_FORMAT, "%s: model.merges[%d] is neither \"a b\" nor [\"a\", \"b\"]", t->source, rank);
        }
        rank++;
    }
    return LP_OK;
}

/* bos_token / eos_token: a string or {"content": ...}; the id through the added tokens, then the vocabulary. */
static int32_t config_token(const lp_tokenizer *t, const cJSON *cfg, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
    if (cJSON_IsObject(v)) v = cJSON_GetObjectItemCaseSensitive(v, "content");
    if (!cJSON_IsString(v)) return -1;
    size_t n = strlen(v->valuestring);
    for (int i = 0; i < t->n_added; i++)
        if (t->added[i].len == n && memcmp(t->added[i].content, v->valuestring, n) == 0) return t->added[i].id;
    return sm_get(&t->vocab, v->valuestring, n);
}

static lp_status load_json(lp_tokenizer *t, const char *path) {
    size_t len;
    char *buf = lp_read_file(path, &len);
    if (!buf) LP_FAIL(LP_ERR_IO, "%s: cannot read: %s", path, strerror(errno));
    cJSON *root = cJSON_ParseWithLength(buf, len);
    lp_status st = LP_OK;
    if (!root || !cJSON_IsObject(root)) {
        const char *at = cJSON_GetErrorPtr();
        long off = root ? 0 : (at && at >= buf && at <= buf + len ? (long)(at - buf) : -1);
        cJSON_Delete(root);
        free(buf);
        LP_FAIL(LP_ERR_FORMAT, "%s: is not a JSON object (parse error near byte %ld)", path, off);
    }
    free(buf);
    if (lp_spm_json_applies(root)) {
        st = lp_spm_from_json(&t->spm, root, path, len);
        goto out;
    }
    const cJSON *e;
    LP_TRY(st, out, load_model(t, cJSON_GetObjectItemCaseSensitive(root, "model"), len));
    LP_TRY(st, out, load_normalizer(t, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), "normalizer"));
    const cJSON *pre = cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer");
    if (pre && !cJSON_IsNull(pre)) LP_TRY(st, out, load_pre(t, pre, "pre_tokenizer"));
    int has_bytelevel = 0;
    for (int i = 0; i < t->n_pre; i++) has_bytelevel |= t->pre[i].kind == PRE_BYTELEVEL;
    if (!has_bytelevel) {
        st = lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__,
                          "%s: pre_tokenizer has no ByteLevel step; only byte-level BPE is supported", path);
        goto out;
    }
    const cJSON *dec = cJSON_GetObjectItemCaseSensitive(root, "decoder");
    if (dec && !cJSON_IsNull(dec) && (!json_type(dec) || strcmp(json_type(dec), "ByteLevel") != 0)) {
        st = lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__, "%s: decoder type '%s' is not supported (only ByteLevel)",
                          path, json_type(dec) ? json_type(dec) : "(none)");
        goto out;
    }
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
    if (added && !cJSON_IsArray(added)) {
        st = lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__, "%s: added_tokens is not a list", path);
        goto out;
    }
    cJSON_ArrayForEach(e, added) {
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(e, "content");
        if (!cJSON_IsString(c)) {
            st = lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__, "%s: added_tokens has an entry without content", path);
            goto out;
        }
        LP_TRY(st, out, check_text(t, c->valuestring, "an added_tokens content"));
        int special = json_bool(e, "special", 0);
        LP_TRY(st, out, add_token(t, c->valuestring, strlen(c->valuestring), -1, special, json_bool(e, "lstrip", 0),
                                  json_bool(e, "rstrip", 0), json_bool(e, "single_word", 0),
                                  json_bool(e, "normalized", !special)));
    }
    LP_TRY(st, out, load_post(t, cJSON_GetObjectItemCaseSensitive(root, "post_processor"), "post_processor"));
    for (int i = 0; i < t->n_prefix + t->n_suffix; i++) {
        int32_t id = i < t->n_prefix ? t->prefix[i] : t->suffix[i - t->n_prefix];
        if (id >= t->n_ids || !t->text[id]) {
            st = lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__,
                              "%s: post_processor TemplateProcessing adds id %d, which is not in the vocabulary", path, id);
            goto out;
        }
    }
    LP_TRY(st, out, finish(t));

    /* tokenizer_config.json beside it: which tokens are BOS and EOS */
    t->bos = t->n_prefix ? t->prefix[0] : -1;
    t->eos = t->n_suffix ? t->suffix[t->n_suffix - 1] : -1;
    {
        char cfg_path[4096];
        const char *slash = strrchr(path, '/');
        snprintf(cfg_path, sizeof cfg_path, "%.*stokenizer_config.json", slash ? (int)(slash - path + 1) : 0, path);
        char *cbuf = lp_read_file(cfg_path, &len);
        if (cbuf) {
            cJSON *cfg = cJSON_ParseWithLength(cbuf, len);
            free(cbuf);
            if (!cJSON_IsObject(cfg)) {
                cJSON_Delete(cfg);
                st = lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__, "%s: is not a JSON object", cfg_path);
                goto out;
            }
            if (cJSON_GetObjectItemCaseSensitive(cfg, "bos_token")) t->bos = config_token(t, cfg, "bos_token");
            if (cJSON_GetObjectItemCaseSensitive(cfg, "eos_token")) t->eos = config_token(t, cfg, "eos_token");
            cJSON_Delete(cfg);
        }
    }
out:
    cJSON_Delete(root);
    return st;
}

lp_status lp_tokenizer_from_json(lp_tokenizer **out, const char *tokenizer_json) {
    lp_tokenizer *t;
    *out = NULL;
    LP_CHECK(new_tokenizer(&t, tokenizer_json));
    lp_status st = load_json(t, tokenizer_json);
    if (st != LP_OK) {
        lp_tokenizer_free(t);
        return st;
    }
    *out = t;
    return LP_OK;
}

/* ---- GGUF ---- */

static lp_status gguf_pre(lp_tokenizer *t, const char *pre, size_t n) {
    pre_step s = {0};
#define IS(name) (n == strlen(name) && memcmp(pre, name, n) == 0)
    if (IS("default") || IS("gpt-2") || IS("gpt2")) {
        s.kind = PRE_BYTELEVEL;
        LP_CHECK(compile_regex(&s.re, GPT2_PATTERN, 0, t->source, "tokenizer.ggml.pre"));
        return add_pre(t, s);
    }
    if (IS("smollm")) {
        LP_CHECK(add_pre(t, (pre_step){.kind = PRE_DIGITS, .individual_digits = 1}));
        s.kind = PRE_BYTELEVEL;
        LP_CHECK(compile_regex(&s.re, GPT2_PATTERN, 0, t->source, "tokenizer.ggml.pre"));
        return add_pre(t, s);
    }
    const char *pattern = NULL;
    if (IS("llama-bpe") || IS("llama3") || IS("llama-v3")) pattern = LLAMA3_PATTERN, t->ignore_merges = 1;
    else if (IS("qwen2")) pattern = QWEN2_PATTERN, t->nfc = 1;
#undef IS
    if (!pattern)
        LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.pre '%.*s' is not supported (known: default, gpt-2, llama-bpe, llama3, smollm, qwen2)",
                t->source, (int)n, pre);
    s.kind = PRE_SPLIT;
    LP_CHECK(compile_regex(&s.re, pattern, 0, t->source, "tokenizer.ggml.pre"));
    LP_CHECK(add_pre(t, s));
    return add_pre(t, (pre_step){.kind = PRE_BYTELEVEL});
}

static lp_status gguf_opt_int(const lp_gguf *g, const char *key, int64_t *v, int64_t dflt) {
    *v = dflt;
    if (!lp_gguf_has(g, key)) return LP_OK;
    return lp_gguf_get_int(g, key, v);
}

static lp_status load_gguf(lp_tokenizer *t, const lp_gguf *g) {
    const char *s;
    size_t n;
    LP_CHECK(lp_gguf_get_str(g, "tokenizer.ggml.model", &s, &n));
    if (n == 5 && memcmp(s, "llama", 5) == 0) return lp_spm_from_gguf(&t->spm, g);
    if (!(n == 4 && memcmp(s, "gpt2", 4) == 0))
        LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.model '%.*s' is not supported; only byte-level BPE ('gpt2') is", t->source, (int)n, s);

    lp_gguf_vtype et;
    uint64_t n_tok, n_types = 0, n_merges;
    LP_CHECK(lp_gguf_get_arr(g, "tokenizer.ggml.tokens", &et, &n_tok));
    if (et != LP_GGUF_STRING) LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.tokens is not a list of strings", t->source);
    if (n_tok == 0 || n_tok >= MAX_VOCAB_ID) LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.tokens has %llu entries", t->source, (unsigned long long)n_tok);
    int has_types = lp_gguf_has(g, "tokenizer.ggml.token_type");
    if (has_types) {
        LP_CHECK(lp_gguf_get_arr(g, "tokenizer.ggml.token_type", &et, &n_types));
        if (n_types != n_tok)
            LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.token_type has %llu entries but tokenizer.ggml.tokens has %llu",
                    t->source, (unsigned long long)n_types, (unsigned long long)n_tok);
    }
    LP_CHECK(grow_ids(t, (int32_t)n_tok));
    if (!sm_init(&t->vocab, n_tok)) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
    for (uint64_t i = 0; i < n_tok; i++) {
        LP_CHECK(lp_gguf_arr_str(g, "tokenizer.ggml.tokens", i, &s, &n));
        if (utf8_invalid_at((const unsigned char *)s, n) != n || memchr(s, 0, n))
            LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.tokens[%llu] is not valid UTF-8 text", t->source, (unsigned long long)i);
        LP_CHECK(set_id_text(t, (int32_t)i, s, n));
        if (!sm_put(&t->vocab, t->text[i], n, (int32_t)i)) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
    }
    t->model_vocab_n = t->vocab.n;

    LP_CHECK(lp_gguf_get_arr(g, "tokenizer.ggml.merges", &et, &n_merges));
    if (et != LP_GGUF_STRING) LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.merges is not a list of strings", t->source);
    LP_CHECK(init_merges(t, n_merges));
    for (uint64_t i = 0; i < n_merges; i++) {
        LP_CHECK(lp_gguf_arr_str(g, "tokenizer.ggml.merges", i, &s, &n));
        const char *sp = memchr(s, ' ', n);
        if (!sp || memchr(sp + 1, ' ', n - (size_t)(sp + 1 - s)))
            LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.merges[%llu] '%.*s' is not two tokens separated by one space",
                    t->source, (unsigned long long)i, (int)n, s);
        LP_CHECK(add_merge(t, s, (size_t)(sp - s), sp + 1, n - (size_t)(sp + 1 - s), (int32_t)i, "tokenizer.ggml.merges"));
    }

    const char *pre = "default";
    size_t pre_len = 7;
    if (lp_gguf_has(g, "tokenizer.ggml.pre")) LP_CHECK(lp_gguf_get_str(g, "tokenizer.ggml.pre", &pre, &pre_len));
    LP_CHECK(gguf_pre(t, pre, pre_len));

    /* control (3) tokens are special, user-defined (4) ones are not; both are matched whole */
    for (uint64_t i = 0; i < n_types; i++) {
        int64_t ty;
        LP_CHECK(lp_gguf_arr_int(g, "tokenizer.ggml.token_type", i, &ty));
        if (ty == 3 || ty == 4) LP_CHECK(add_token(t, t->text[i], strlen(t->text[i]), (int32_t)i, ty == 3, 0, 0, 0, 0));
    }

    int64_t bos, eos, add_bos, add_eos;
    LP_CHECK(gguf_opt_int(g, "tokenizer.ggml.bos_token_id", &bos, -1));
    LP_CHECK(gguf_opt_int(g, "tokenizer.ggml.eos_token_id", &eos, -1));
    LP_CHECK(gguf_opt_int(g, "tokenizer.ggml.add_bos_token", &add_bos, 0));
    LP_CHECK(gguf_opt_int(g, "tokenizer.ggml.add_eos_token", &add_eos, 0));
    if (bos >= (int64_t)n_tok || bos < -1) LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.bos_token_id %lld is outside the vocabulary", t->source, (long long)bos);
    if (eos >= (int64_t)n_tok || eos < -1) LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.eos_token_id %lld is outside the vocabulary", t->source, (long long)eos);
    t->bos = (int32_t)bos, t->eos = (int32_t)eos;
    if (add_bos) {
        if (bos < 0) LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.add_bos_token is set but there is no bos_token_id", t->source);
        if (!(t->prefix = malloc(sizeof *t->prefix))) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
        t->prefix[0] = t->bos, t->n_prefix = 1;
    }
    if (add_eos) {
        if (eos < 0) LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.add_eos_token is set but there is no eos_token_id", t->source);
        if (!(t->suffix = malloc(sizeof *t->suffix))) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
        t->suffix[0] = t->eos, t->n_suffix = 1;
    }
    return finish(t);
}

lp_status lp_tokenizer_from_gguf(lp_tokenizer **out, const lp_gguf *g) {
    lp_tokenizer *t;
    *out = NULL;
    LP_CHECK(new_tokenizer(&t, lp_gguf_path(g)));
    lp_status st = load_gguf(t, g);
    if (st != LP_OK) {
        lp_tokenizer_free(t);
        return st;
    }
    *out = t;
    return LP_OK;
}

lp_status lp_tokenizer_load(lp_tokenizer **out, const char *path) {
    struct stat sb;
    *out = NULL;
    if (stat(path, &sb) != 0) LP_FAIL(LP_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    if (S_ISDIR(sb.st_mode)) {
        char p[4096];
        snprintf(p, sizeof p, "%s/tokenizer.json", path);
        if (stat(p, &sb) != 0) LP_FAIL(LP_ERR_IO, "%s: has no tokenizer.json", path);
        return lp_tokenizer_from_json(out, p);
    }
    FILE *f = fopen(path, "rb");
    if (!f) LP_FAIL(LP_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    fclose(f);
    if (lp_gguf_is_file(path)) {
        lp_gguf *g;
        LP_CHECK(lp_gguf_open(path, &g));
        lp_status st = lp_tokenizer_from_gguf(out, g);
        lp_gguf_close(g);
        return st;
    }
    return lp_tokenizer_from_json(out, path);
}

/* ---- encoding ---- */

typedef struct { int32_t *v; size_t n, cap; } idvec;
typedef struct { int32_t id, prev, next, gone; } symbol;
typedef struct { int32_t rank, pos, id; } merge_item;

typedef struct {
    const lp_tokenizer *t;
    idvec out;
    pcre2_match_data *md;
    symbol *sym;
    size_t sym_cap;
    merge_item *heap;
    size_t heap_n, heap_cap;
} encoder;

static lp_status push_id(encoder *e, int32_t id) {
    if (e->out.n == e->out.cap) {
        size_t cap = e->out.cap ? 2 * e->out.cap : 256;
        int32_t *v = realloc(e->out.v, cap * sizeof *v);
        if (!v) LP_FAIL(LP_ERR_OOM, "tokenize: out of memory for %zu ids", cap);
        e->out.v = v, e->out.cap = cap;
    }
    e->out.v[e->out.n++] = id;
    return LP_OK;
}

/* min-heap on (rank, pos): the order of Merge in tokenizers' Word::merge_all */
static int heap_less(const merge_item *a, const merge_item *b) {
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}
static lp_status heap_push(encoder *e, merge_item m) {
    if (e->heap_n == e->heap_cap) {
        size_t cap = e->heap_cap ? 2 * e->heap_cap : 64;
        merge_item *h = realloc(e->heap, cap * sizeof *h);
        if (!h) LP_FAIL(LP_ERR_OOM, "tokenize: out of memory");
        e->heap = h, e->heap_cap = cap;
    }
    size_t i = e->heap_n++;
    while (i > 0 && heap_less(&m, &e->heap[(i - 1) / 2])) {
        e->heap[i] = e->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    e->heap[i] = m;
    return LP_OK;
}
static merge_item heap_pop(encoder *e) {
    merge_item top = e->heap[0], last = e->heap[--e->heap_n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= e->heap_n) break;
        if (c + 1 < e->heap_n && heap_less(&e->heap[c + 1], &e->heap[c])) c++;
        if (!heap_less(&e->heap[c], &last)) break;
        e->heap[i] = e->heap[c];
        i = c;
    }
    if (e->heap_n) e->heap[i] = last;
    return top;
}

static lp_status push_pair(encoder *e, int32_t pos) {
    const symbol *s = &e->sym[pos];
    const pm_slot *m = pm_get(&e->t->merges, s->id, e->sym[s->next].id);
    return m ? heap_push(e, (merge_item){m->rank, pos, m->id}) : LP_OK;
}

/* One pre-token (vocabulary form) to ids: BPE::tokenize_with_cache and Word::merge_all. */
static lp_status bpe_word(encoder *e, const char *w, size_t n) {
    const lp_tokenizer *t = e->t;
    if (t->ignore_merges) {
        int32_t id = sm_get(&t->vocab, w, n);
        if (id >= 0) return push_id(e, id);
    }
    if (n > e->sym_cap) {
        symbol *s = realloc(e->sym, n * sizeof *s);
        if (!s) LP_FAIL(LP_ERR_OOM, "tokenize: out of memory");
        e->sym = s, e->sym_cap = n;
    }
    int32_t ns = 0, unk_open = 0;
    for (size_t i = 0; i < n;) {
        int32_t cp;
        int k = utf8_next(w + i, &cp);
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
    e->heap_n = 0;
    for (int32_t i = 0; i + 1 < ns; i++) LP_CHECK(push_pair(e, i));
    while (e->heap_n) {
        merge_item top = heap_pop(e);
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
        if (!e->sym[i].gone) LP_CHECK(push_id(e, e->sym[i].id));
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
            from += (size_t)utf8_next(s + from, &cp);
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
    if (prefix_space) k += (size_t)utf8_put(buf, e->t->byte_cp[' ']);
    for (size_t i = 0; i < n; i++) k += (size_t)utf8_put(buf + k, e->t->byte_cp[(unsigned char)s[i]]);
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
            int k = utf8_next(s + i, &cp);
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

/* Leftmost-longest matches of a set of added tokens in s, with find_matches' flag rules;
 * each text gap goes to `gap`, each token's id to the output. */
typedef lp_status (*gap_fn)(encoder *e, const char *s, size_t n);

static int starts_with_word(const char *s, size_t n) {
    int32_t cp;
    return n > 0 && (utf8_next(s, &cp), is_word_char(cp));
}
static int ends_with_word(const char *s, size_t n) {
    int32_t cp;
    return n > 0 && (utf8_next(s + utf8_prev(s, n), &cp), is_word_char(cp));
}

static lp_status split_added(encoder *e, const match_set *set, const char *s, size_t n, gap_fn gap) {
    const lp_tokenizer *t = e->t;
    size_t start_offset = 0, pos = 0;
    while (pos < n) {
        /* the leftmost position where some token matches, and the longest token there */
        const added_tok *hit = NULL;
        size_t at = pos;
        for (; at < n && !hit; at++) {
            unsigned c = (unsigned char)s[at];
            for (int k = set->start[c]; k < set->start[c + 1]; k++) {
                const added_tok *a = &t->added[set->order[k]];
                if (a->match_len <= n - at && memcmp(s + at, a->match, a->match_len) == 0) {
                    hit = a;
                    break;
                }
            }
        }
        if (!hit) break;
        at--;
        size_t start = at, stop = at + hit->match_len;
        pos = stop; /* the search resumes after the match, whatever the flags do below */
        if (hit->single_word && ((start > 0 && ends_with_word(s, start)) || (stop < n && starts_with_word(s + stop, n - stop))))
            continue;
        if (hit->lstrip) {
            size_t ns = start;
            while (ns > 0) {
                int32_t cp;
                size_t p = utf8_prev(s, ns);
                utf8_next(s + p, &cp);
                if (!is_white_space(cp)) break;
                ns = p;
            }
            start = ns > start_offset ? ns : start_offset;
        }
        if (hit->rstrip) {
            while (stop < n) {
                int32_t cp;
                int k = utf8_next(s + stop, &cp);
                if (!is_white_space(cp)) break;
                stop += (size_t)k;
            }
        }
        if (start_offset < start) LP_CHECK(gap(e, s + start_offset, start - start_offset));
        LP_CHECK(push_id(e, hit->id));
        start_offset = stop;
    }
    if (start_offset < n) LP_CHECK(gap(e, s + start_offset, n - start_offset));
    return LP_OK;
}

static lp_status after_norm_split(encoder *e, const char *s, size_t n) { return pretokenize(e, 0, s, n); }

/* A piece between raw added tokens: normalize, then cut out the normalized added tokens. */
static lp_status after_raw_split(encoder *e, const char *s, size_t n) {
    if (!e->t->nfc) return split_added(e, &e->t->norm, s, n, after_norm_split);
    char *norm;
    size_t len;
    LP_CHECK(nfc(s, n, &norm, &len));
    lp_status st = split_added(e, &e->t->norm, norm, len, after_norm_split);
    free(norm);
    return st;
}

lp_status lp_tokenize(const lp_tokenizer *t, const char *text, size_t len, int32_t **ids, size_t *n) {
    if (t->spm) return lp_spm_tokenize(t->spm, text, len, ids, n);
    *ids = NULL, *n = 0;
    size_t bad = utf8_invalid_at((const unsigned char *)text, len);
    if (bad != len)
        LP_FAIL(LP_ERR_FORMAT, "tokenize: the text is not valid UTF-8: byte 0x%02x at offset %zu",
                (unsigned char)text[bad], bad);
    encoder e = {.t = t};
    lp_status st = LP_OK;
    if (!(e.md = pcre2_match_data_create(1, NULL))) LP_FAIL(LP_ERR_OOM, "tokenize: out of memory");
    for (int i = 0; i < t->n_prefix; i++) LP_TRY(st, out, push_id(&e, t->prefix[i]));
    LP_TRY(st, out, split_added(&e, &t->raw, text, len, after_raw_split));
    for (int i = 0; i < t->n_suffix; i++) LP_TRY(st, out, push_id(&e, t->suffix[i]));
    if (!e.out.v) { /* a valid pointer even for no ids */
        LP_TRY(st, out, push_id(&e, 0));
        e.out.n = 0;
    }
out:
    pcre2_match_data_free(e.md);
    free(e.sym), free(e.heap);
    if (st != LP_OK) {
        free(e.out.v);
        return st;
    }
    *ids = e.out.v, *n = e.out.n;
    return LP_OK;
}

lp_status lp_detokenize(const lp_tokenizer *t, const int32_t *ids, size_t n, char **text, size_t *len) {
    if (t->spm) return lp_spm_detokenize(t->spm, ids, n, text, len);
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

int lp_tokenizer_vocab_size(const lp_tokenizer *t) { return t->spm ? t->spm->n_ids : t->n_ids; }
int lp_tokenizer_bos(const lp_tokenizer *t) { return t->spm ? t->spm->bos : t->bos; }
int lp_tokenizer_eos(const lp_tokenizer *t) { return t->spm ? t->spm->eos : t->eos; }
const char *lp_tokenizer_token(const lp_tokenizer *t, int id) {
    if (t->spm) return id >= 0 && id < t->spm->n_ids ? t->spm->text[id] : NULL;
    return id >= 0 && id < t->n_ids ? t->text[id] : NULL;
}
int lp_tokenizer_adds_bos(const lp_tokenizer *t) {
    int first = t->spm ? (t->spm->n_prefix ? t->spm->prefix[0] : -1) : (t->n_prefix ? t->prefix[0] : -1);
    return first >= 0 && first == lp_tokenizer_bos(t);
}
