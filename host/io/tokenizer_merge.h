/* tokenizer_merge.h: what both BPE encoders (tokenizer_encode.c, tokenizer_spm.c) run the
 * same way: the queue of candidate merges, a min-heap on (rank, pos) in the order of
 * tokenizers' Word::merge_all, and the growing list of output ids. Internal. */
#ifndef LOUPE_TOKENIZER_MERGE_H
#define LOUPE_TOKENIZER_MERGE_H

#include <stddef.h>
#include <stdint.h>

#include "loupe/status.h"

typedef struct { int64_t rank; int32_t pos, id; } tok_merge;
typedef struct { tok_merge *v; size_t n, cap; } tok_merge_heap;

lp_status tok_heap_push(tok_merge_heap *h, tok_merge m);
/* The lowest (rank, pos); h->n must be > 0. */
tok_merge tok_heap_pop(tok_merge_heap *h);

typedef struct { int32_t *v; size_t n, cap; } tok_ids;
lp_status tok_ids_push(tok_ids *ids, int32_t id);

#endif
