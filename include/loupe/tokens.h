/* tokens.h: token files as DESIGN.md defines them.
 *   .npy of int32, int64, uint16 or uint32 (C order), shape [n_seq, ctx] or [n_tokens];
 *        a flat file is cut into rows of `context` tokens (a short tail is dropped);
 *   .bin raw little-endian ids of a given dtype ("uint16", "int32", ...), always flat.
 * Ids are held as int32 and checked to be in [0, vocab). */
#ifndef LOUPE_TOKENS_H
#define LOUPE_TOKENS_H

#include "loupe/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lp_tokens {
    int32_t *ids;     /* [n_seq, ctx] */
    int64_t n_seq;
    int ctx;
    int64_t dropped;  /* tokens of a flat file's tail that did not fill a row */
} lp_tokens;

/* context: row length for flat files (without strict_context, a flat file shorter than
 * that is one row), and the required row length of a 2-D file when > 0 and strict_context
 * is set; bin_dtype names the element type of .bin files. */
lp_status lp_tokens_load(lp_tokens *t, const char *path, int context, int strict_context,
                         const char *bin_dtype);
/* Every id must be in [0, vocab); the error names the file, row and position. */
lp_status lp_tokens_check(const lp_tokens *t, int vocab, const char *path);
void lp_tokens_free(lp_tokens *t);

/* A token stream (a text's ids) cut into rows of ctx tokens; bos >= 0 starts every row
 * with it, followed by the next ctx - 1 tokens of the stream (as TransformerLens's
 * prepend_bos and SAELens's context handling give). ctx 0: one row when the whole stream
 * fits max_ctx, else rows of max_ctx. A short tail is dropped (t->dropped counts it);
 * t->ids is a copy. */
lp_status lp_tokens_from_stream(lp_tokens *t, const int32_t *ids, size_t n, int ctx, int max_ctx, int32_t bos,
                                const char *path);

/* Writes int32 ids [n_seq, ctx] as .npy (temporary name, then rename); n_seq < 0 writes
 * a flat [ctx] array. */
lp_status lp_npy_write_i32(const char *path, const int32_t *ids, int64_t n_seq, int ctx);

#ifdef __cplusplus
}
#endif
#endif
