/* tokenizer_added.h: added tokens (special or not) cut out of text before the model's own
 * pieces are made, as Hugging Face `tokenizers`' AddedVocabulary::find_matches does it:
 * leftmost match first, the longest token at that position, then the single_word, lstrip
 * and rstrip rules. Internal to the tokenizers (tokenizer_encode.c, tokenizer_spm.c). */
#ifndef LOUPE_TOKENIZER_ADDED_H
#define LOUPE_TOKENIZER_ADDED_H

#include <stddef.h>
#include <stdint.h>

#include "loupe/status.h"

typedef struct {
    char *content;    /* as given, NUL-terminated */
    size_t len;
    char *match;      /* what is searched for: content, or content normalized (normalized=true) */
    size_t match_len;
    int32_t id;
    int special, lstrip, rstrip, single_word, normalized;
} lp_added_tok;

typedef struct {
    lp_added_tok *tok;
    int n, cap;
    int *slot;            /* open-addressing hash of the contents: index into tok + 1, 0: empty */
    size_t n_slot;        /* a power of two, more than twice n */
    int *order[2];        /* [normalized] indices into tok, bucketed by first byte, longest first */
    int start[2][257];    /* order[k][start[k][c] .. start[k][c+1]) begin with byte c */
} lp_added_set;

/* Adds a token, or updates the flags and id of one with the same content (a token once
 * special stays special). match starts as the content. */
lp_status added_put(lp_added_set *s, const char *content, size_t len, int32_t id, int special, int lstrip,
                       int rstrip, int single_word, int normalized, const char *source);
/* The content's entry, or NULL. */
const lp_added_tok *added_find(const lp_added_set *s, const char *content, size_t len);
/* After every added_put and after the match strings are final: builds the search order. */
lp_status added_index(lp_added_set *s, const char *source);
void added_free(lp_added_set *s);

/* Splits text[0..n) (valid UTF-8) at the tokens whose normalized flag is `normalized`:
 * each gap between matches goes to gap(ctx, ...), each match's id to tok(ctx, id), in order. */
typedef lp_status (*lp_added_gap_fn)(void *ctx, const char *s, size_t n);
typedef lp_status (*lp_added_tok_fn)(void *ctx, int32_t id);
lp_status added_split(const lp_added_set *s, int normalized, const char *text, size_t n, lp_added_gap_fn gap,
                         lp_added_tok_fn tok, void *ctx);

/* Decodes one character of valid UTF-8 at s; returns its length in bytes. */
int utf8_decode(const char *s, int32_t *cp);

#endif
