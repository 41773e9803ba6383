/* tokenizer_spm.h: SentencePiece-style BPE with byte fallback (Gemma), as Hugging Face
 * `tokenizers` runs the tokenizer.json that transformers writes for it, read from a
 * tokenizer.json or from a Gemma GGUF's tokenizer.ggml.* metadata. Internal: tokenizer.c
 * hands such files to these functions, and lp_tokenize & co. to the lp_spm it holds.
 *
 * tokenizer_spm.c holds the model (vocabulary, merge ranks, encoding, decoding);
 * tokenizer_spm_load.c reads the two file formats into it. */
#ifndef LOUPE_TOKENIZER_SPM_H
#define LOUPE_TOKENIZER_SPM_H

#include <cjson/cJSON.h>
#include <stdint.h>

#include "loupe/gguf.h"
#include "io/tokenizer_added.h"

#define SPM_MAX_REPLACE 4
#define SPM_MAX_AFFIX 4

typedef enum { SPM_SPLIT_NONE, SPM_SPLIT_REMOVED, SPM_SPLIT_ISOLATED, SPM_SPLIT_PREVIOUS, SPM_SPLIT_NEXT } spm_split;

/* string -> id; keys point into the strings of lp_spm.text */
typedef struct { const char *s; uint32_t len; int32_t id; } spm_str_slot;
typedef struct { spm_str_slot *slot; size_t cap, n; } spm_strmap;
/* (left id, right id) -> (rank, merged id) */
typedef struct { int32_t a, b, rank, id; } spm_pair_slot; /* a < 0: empty */
typedef struct { spm_pair_slot *slot; size_t cap; } spm_pairmap;

typedef struct { char *from, *to; size_t from_len, to_len; } spm_replace;

typedef struct lp_spm {
    char *source;              /* file name for messages */
    int32_t n_ids;             /* max id + 1 */
    int32_t ids_cap;           /* entries allocated in text, text_len */
    char **text;               /* id -> vocabulary string, NULL for unused ids */
    uint32_t *text_len;
    spm_strmap vocab;          /* the BPE model's vocabulary */
    spm_pairmap merges;        /* tokenizer.json's merges (by rank of listing) */
    int rank_by_id;            /* no merge list: any a + b in the vocabulary merges, ranked (id(a+b), -len(a)) */
    int32_t unk;               /* -1: none */
    int fuse_unk;
    int32_t byte_id[256];      /* id of <0xXX>, -1 when missing */
    spm_replace norm[SPM_MAX_REPLACE];   /* normalizer: Replace steps in order */
    int n_norm;
    spm_split split;           /* pre-tokenizer: Split on a string, or none */
    char *split_str;
    size_t split_len;
    spm_replace dec;           /* decoder: one Replace step (n_dec 0 or 1) */
    int n_dec, dec_bytes;      /* dec_bytes: ByteFallback (<0xXX> tokens decode to their byte) */
    lp_added_set added;
    int32_t prefix[SPM_MAX_AFFIX], suffix[SPM_MAX_AFFIX];   /* the template around the text */
    int n_prefix, n_suffix;
    int32_t bos, eos;
} lp_spm;

/* ---- tokenizer_spm.c ---- */
lp_status spm_new(lp_spm **out, const char *source);
void spm_free(lp_spm *s);
/* Grows the id table to n_ids, then sets text[id] (copied). */
lp_status spm_set_text(lp_spm *s, int32_t id, const char *text, size_t len);
/* Adds text[id] to the vocabulary (a later duplicate wins, as in a Rust HashMap). */
lp_status spm_vocab_put(lp_spm *s, int32_t id);
int32_t spm_vocab_get(const lp_spm *s, const char *text, size_t len);
lp_status spm_merges_init(lp_spm *s, size_t n);
/* One listed merge "a" + "b" of the given rank; a, b and a + b must be in the vocabulary. */
lp_status spm_merge_add(lp_spm *s, const char *a, size_t na, const char *b, size_t nb, int32_t rank, const char *key);
/* Applies the normalizer's Replace steps to s[0..n); *out is malloc'ed. */
lp_status spm_normalize(const lp_spm *s, const char *in, size_t n, char **out, size_t *out_len);
/* After loading: byte tokens, the match strings of normalized added tokens, the search order. */
lp_status spm_finish(lp_spm *s);

lp_status spm_tokenize(const lp_spm *s, const char *text, size_t len, int32_t **ids, size_t *n);
lp_status spm_detokenize(const lp_spm *s, const int32_t *ids, size_t n, char **text, size_t *len);

/* ---- tokenizer_spm_load.c ---- */
/* A tokenizer.json whose model is BPE with byte_fallback and whose pre-tokenizer has no
 * ByteLevel step: SentencePiece-style, read here. */
int spm_json_applies(const cJSON *root);
/* json_len: the file's size, which bounds the ids of a dense vocabulary (a larger id is refused). */
lp_status spm_from_json(lp_spm **out, const cJSON *root, const char *path, size_t json_len);
/* tokenizer.ggml.model "llama" (SentencePiece): Gemma's, as transformers converts it. */
lp_status spm_from_gguf(lp_spm **out, const lp_gguf *g);

#endif
