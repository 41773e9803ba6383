/* safetensors.h: reading and writing the safetensors format.
 *
 * Format: 8-byte little-endian header length N, N bytes of JSON mapping each tensor
 * name to {dtype, shape, data_offsets: [begin, end)} relative to the data section that
 * follows, plus an optional "__metadata__" object of strings.
 * The reader validates the whole header (well-formed JSON, known dtypes, sizes that
 * match shapes, offsets inside the file and non-overlapping) before any tensor data is
 * touched; tensor data is read through mmap. The writer writes under "<path>.tmp" and
 * renames when complete, so a reader never sees a partial file. */
#ifndef LOUPE_SAFETENSORS_H
#define LOUPE_SAFETENSORS_H

#include <stddef.h>
#include "loupe/output.h" /* lp_read_file, lp_write_file_atomic, lp_mkdir_p (host/core/output.c) */
#include "loupe/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lp_st_tensor {
    char *name;
    lp_dtype dtype;
    int ndim;
    int64_t shape[LP_MAX_DIMS];
    const void *data; /* inside the mapping */
    size_t nbytes;
} lp_st_tensor;

typedef struct lp_st_file {
    char *path;
    void *map;
    size_t size;
    lp_st_tensor *tensors;
    int n;
} lp_st_file;

lp_status lp_st_open(lp_st_file *f, const char *path);
const lp_st_tensor *lp_st_find(const lp_st_file *f, const char *name);
void lp_st_close(lp_st_file *f);

/* A checkpoint directory: model.safetensors, or the shards named by
 * model.safetensors.index.json. */
typedef struct lp_st_set {
    lp_st_file *files;
    int n;
} lp_st_set;

lp_status lp_st_set_open(lp_st_set *s, const char *dir);
/* Finds a tensor in any file of the set; *file receives its file (may be NULL). */
const lp_st_tensor *lp_st_set_find(const lp_st_set *s, const char *name, const lp_st_file **file);
void lp_st_set_close(lp_st_set *s);

/* ---- writing ---- */
typedef struct lp_st_spec {
    const char *name;
    lp_dtype dtype;
    int ndim;
    int64_t shape[LP_MAX_DIMS];
} lp_st_spec;

typedef struct lp_st_writer {
    char *path, *tmp;
    int fd;
    int n;
    size_t *offsets; /* absolute file offset of each tensor's data */
    size_t *sizes;
} lp_st_writer;

/* Creates "<path>.tmp.<pid>.<random>" sized for the tensors and writes the header. metadata is a
 * NULL-terminated list of key, value string pairs, or NULL. */
lp_status lp_st_writer_open(lp_st_writer *w, const char *path, const lp_st_spec *specs, int n,
                            const char *const *metadata);
/* Writes bytes of tensor idx's data starting at byte offset off within that tensor. */
lp_status lp_st_writer_put(lp_st_writer *w, int idx, size_t off, const void *data, size_t bytes);
/* Flushes, closes and renames to the final path. */
lp_status lp_st_writer_commit(lp_st_writer *w);
/* Closes and removes the temporary file. */
void lp_st_writer_abort(lp_st_writer *w);
/* All in one: each spec's data from datas[i]. */
lp_status lp_st_write(const char *path, const lp_st_spec *specs, const void *const *datas, int n,
                      const char *const *metadata);


#ifdef __cplusplus
}
#endif
#endif
