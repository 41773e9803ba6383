/* tokenizer_bpe.h: the byte-level BPE tokenizer's state, shared by the files that make it
 * up (internal to the library):
 *   tokenizer.c          the vocabulary, merges and added tokens, read from tokenizer.json
 *                        or GGUF metadata, and the public load / query functions;
 *   tokenizer_pipeline.c the normalizer, pre-tokenizer and post-processor settings of
 *                        tokenizer.json and tokenizer.ggml.pre, and the text helpers (NFC,
 *                        the pre-tokenizer regexes);
 *   tokenizer_encode.c   lp_tokenize and lp_detokenize.
 * Added tokens are found in text by tokenizer_added.c; SentencePiece-style vocabularies go to
 * tokenizer_spm.c. */
#ifndef LOUPE_TOKENIZER_BPE_H
#define LOUPE_TOKENIZER_BPE_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <cjson/cJSON.h>
#include <pcre2.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/gguf.h"
#include "loupe/tokenizer.h"
#include "io/tokenizer_added.h"
#include "io/tokenizer_spm.h"

#define MAX_PRE_STEPS 16
#define MAX_VOCAB_ID (1 << 26)

/* ---- small open-addressing hash maps (lookups here; building in tokenizer.c) ---- */

static inline uint64_t hash_bytes(const char *s, size_t n) { /* FNV-1a */
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h ^ (h >> 29);
}

/* string -> id; keys point into strings the tokenizer owns */
typedef struct { const char *s; uint32_t len; int32_t id; } sm_slot;
typedef struct { sm_slot *slot; size_t cap, n; } strmap;

static inline sm_slot *sm_find(const strmap *m, const char *s, size_t n) {
    size_t mask = m->cap - 1, i = hash_bytes(s, n) & mask;
    for (;; i = (i + 1) & mask) {
        sm_slot *e = &m->slot[i];
        if (!e->s || (e->len == n && memcmp(e->s, s, n) == 0)) return e;
    }
}
static inline int sm_get(const strmap *m, const char *s, size_t n) {
    if (!m->slot) return -1;
    sm_slot *e = sm_find(m, s, n);
    return e->s ? e->id : -1;
}

/* (left id, right id) -> (rank, merged id) */
typedef struct { int32_t a, b, rank, id; } pm_slot; /* a < 0: empty */
typedef struct { pm_slot *slot; size_t cap; } pairmap;

static inline uint64_t pair_hash(int32_t a, int32_t b) {
    uint64_t x = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    x ^= x >> 33, x *= 0xff51afd7ed558ccdull, x ^= x >> 33, x *= 0xc4ceb9fe1a85ec53ull;
    return x ^ (x >> 33);
}
static inline pm_slot *pm_find(const pairmap *m, int32_t a, int32_t b) {
    size_t mask = m->cap - 1, i = pair_hash(a, b) & mask;
    for (;; i = (i + 1) & mask) {
        pm_slot *e = &m->slot[i];
        if (e->a < 0 || (e->a == a && e->b == b)) return e;
    }
}
static inline const pm_slot *pm_get(const pairmap *m, int32_t a, int32_t b) {
    if (!m->slot) return NULL;
    const pm_slot *e = pm_find(m, a, b);
    return e->a < 0 ? NULL : e;
}
/* An added token: content, the string searched for (normalized when normalized=true), id
 * and the find_matches flags. */
typedef lp_added_tok added_tok;

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
    lp_added_set match;  /* the search order over added[] (tok borrows added; built by finish) */
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

/* ---- tokenizer_pipeline.c ---- */

/* A boolean member of o, or dflt when it is missing or not a boolean. */
int tok_json_bool(const cJSON *o, const char *key, int dflt);
/* o's "type" string, or NULL. */
const char *tok_json_type(const cJSON *o);
/* tokenizer.json's normalizer, pre_tokenizer and post_processor objects (key names the
 * object in messages); a NULL or null normalizer or post_processor is none. */
lp_status tok_load_normalizer(lp_tokenizer *t, const cJSON *n, const char *key);
lp_status tok_load_pre(lp_tokenizer *t, const cJSON *p, const char *key);
lp_status tok_load_post(lp_tokenizer *t, const cJSON *p, const char *key);
/* GGUF tokenizer.ggml.pre (pre[0..n)): the pre-tokenizer steps llama.cpp names so. */
lp_status tok_gguf_pre(lp_tokenizer *t, const char *pre, size_t n);
/* NFC of s[0..n) (valid UTF-8, NULs allowed) into a malloc'ed buffer. */
lp_status tok_nfc(const char *s, size_t n, char **out, size_t *out_len);
/* Encodes code point cp as UTF-8 at dst; returns its length. */
int tok_utf8_put(char *dst, int32_t cp);

#endif
