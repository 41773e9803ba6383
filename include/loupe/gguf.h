/* gguf.h: reading GGUF files (llama.cpp's checkpoint format) and dequantizing
 * the ggml block formats.
 *
 *   lp_gguf *g;
 *   lp_gguf_open("model.gguf", &g);          // header, metadata, tensor infos validated
 *   int64_t n; lp_gguf_get_int(g, "llama.block_count", &n);
 *   const lp_gguf_tensor *t = lp_gguf_find_tensor(g, "blk.0.attn_q.weight");
 *   lp_dequant(ctx, dst, LP_F32, t->data, t->type, t->n_elems);
 *
 * Everything in the header is checked against the file size before use: version,
 * counts, string lengths, array lengths, tensor dims, offsets, alignment and sizes.
 * The file is mmapped; tensor data pointers point into the mapping. */
#ifndef LOUPE_GGUF_H
#define LOUPE_GGUF_H

#include "loupe/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Metadata value types, numbered as in the GGUF specification. */
typedef enum lp_gguf_vtype {
    LP_GGUF_U8 = 0, LP_GGUF_I8 = 1, LP_GGUF_U16 = 2, LP_GGUF_I16 = 3, LP_GGUF_U32 = 4, LP_GGUF_I32 = 5,
    LP_GGUF_F32 = 6, LP_GGUF_BOOL = 7, LP_GGUF_STRING = 8, LP_GGUF_ARRAY = 9, LP_GGUF_U64 = 10,
    LP_GGUF_I64 = 11, LP_GGUF_F64 = 12,
} lp_gguf_vtype;

/* Tensor types, numbered as ggml numbers them. */
typedef enum lp_ggml_type {
    LP_GGML_F32 = 0, LP_GGML_F16 = 1, LP_GGML_Q4_0 = 2, LP_GGML_Q4_1 = 3, LP_GGML_Q5_0 = 6,
    LP_GGML_Q5_1 = 7, LP_GGML_Q8_0 = 8, LP_GGML_Q8_1 = 9, LP_GGML_Q2_K = 10, LP_GGML_Q3_K = 11,
    LP_GGML_Q4_K = 12, LP_GGML_Q5_K = 13, LP_GGML_Q6_K = 14, LP_GGML_Q8_K = 15, LP_GGML_BF16 = 30,
} lp_ggml_type;

typedef struct lp_gguf_tensor {
    const char *name;   /* NUL-terminated copy */
    int n_dims;         /* 1..4 */
    int64_t ne[4];      /* ggml order: ne[0] is the contiguous (innermost) dimension; unused = 1 */
    int type;           /* lp_ggml_type value as stored (may be unsupported) */
    uint64_t offset;    /* from the start of the data section */
    const void *data;   /* into the mapping */
    size_t n_bytes;
    int64_t n_elems;
} lp_gguf_tensor;

typedef struct lp_gguf lp_gguf;

lp_status lp_gguf_open(const char *path, lp_gguf **out);
/* Whether the file at path starts with the GGUF magic (whatever it is named). */
int lp_gguf_is_file(const char *path);
/* The same checks on a GGUF image already in memory (which must outlive the handle;
 * tensor data pointers point into it); `name` stands for the path in messages. */
lp_status lp_gguf_open_memory(const void *data, size_t size, const char *name, lp_gguf **out);
void lp_gguf_close(lp_gguf *g);
const char *lp_gguf_path(const lp_gguf *g);
uint32_t lp_gguf_version(const lp_gguf *g);

int lp_gguf_n_tensors(const lp_gguf *g);
const lp_gguf_tensor *lp_gguf_tensor_at(const lp_gguf *g, int i);
const lp_gguf_tensor *lp_gguf_find_tensor(const lp_gguf *g, const char *name); /* NULL if absent */

/* Metadata. Each getter fails with LP_ERR_NOT_FOUND when the key is absent and with
 * LP_ERR_FORMAT when it has an incompatible type; both messages name the file and key.
 * Integers of any width (and bool) read through get_int; floats and integers through
 * get_float. Strings are not NUL-terminated in the file: use the returned length. */
int lp_gguf_has(const lp_gguf *g, const char *key);
int lp_gguf_n_kv(const lp_gguf *g);
const char *lp_gguf_key_at(const lp_gguf *g, int i);
lp_status lp_gguf_get_int(const lp_gguf *g, const char *key, int64_t *out);
lp_status lp_gguf_get_float(const lp_gguf *g, const char *key, double *out);
lp_status lp_gguf_get_str(const lp_gguf *g, const char *key, const char **s, size_t *len);
/* Arrays: element type and length; then element i (O(1), also for string arrays). */
lp_status lp_gguf_get_arr(const lp_gguf *g, const char *key, lp_gguf_vtype *elem, uint64_t *n);
lp_status lp_gguf_arr_int(const lp_gguf *g, const char *key, uint64_t i, int64_t *out);
lp_status lp_gguf_arr_float(const lp_gguf *g, const char *key, uint64_t i, double *out);
lp_status lp_gguf_arr_str(const lp_gguf *g, const char *key, uint64_t i, const char **s, size_t *len);

/* ---- ggml block formats (host/ops/ggml_types.c) ---- */
const char *lp_ggml_type_name(int type);     /* "Q4_K", or "type 99" style text for unknown */
int lp_ggml_supported(int type);              /* F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q4_K Q5_K Q6_K */
/* The supported types as one string, for error messages. */
#define LP_GGML_SUPPORTED_LIST "F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q4_K Q5_K Q6_K"
int lp_ggml_block_elems(int type);            /* 1, 32 or 256; 0 if unknown */
size_t lp_ggml_block_bytes(int type);         /* 0 if unknown */
/* Bytes of n elements; 0 if the type is unknown or n is not a multiple of the block. */
size_t lp_ggml_bytes(int type, int64_t n);

/* Dequantizes n elements (a multiple of the block size) of ggml type `type` from src to
 * dst in dst_dtype (F32, BF16 or F16), both on the context's device: the CPU reference
 * (host/cpu/dequant.c) or the CUDA kernel (kernels/dequant.cu). */
lp_status lp_dequant(lp_ctx *c, void *dst, lp_dtype dst_dtype, const void *src, int type, int64_t n);

#ifdef __cplusplus
}
#endif
#endif
