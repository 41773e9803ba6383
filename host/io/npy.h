/* npy.h: the .npy header, the one parser of it, shared by the token-file reader (tokens.c),
 * the Gemma Scope params.npz reader (sae_npz.c) and the probe's label files
 * (analysis/probe_data.c). Every size is checked against the bytes that hold it. */
#ifndef LOUPE_NPY_H
#define LOUPE_NPY_H

#include <stddef.h>
#include <stdint.h>

#include "loupe/tensor.h"

typedef struct lp_npy {
    char descr[8];            /* the dtype string, e.g. "<i4" */
    int ndim;
    int64_t shape[LP_MAX_DIMS];
    size_t data_off;          /* where the data starts, from the start of the .npy */
    size_t data_avail;        /* bytes from data_off to the end */
} lp_npy;

/* Parses the header of the .npy held in p[0, n). `what` names it in messages ("path" or
 * "path: entry 'W_enc'"). Refuses bad magic, versions other than 1-3, a header that runs
 * past n, keys missing or malformed, Fortran order, and more than LP_MAX_DIMS dims. */
lp_status npy_parse_buf(const unsigned char *p, size_t n, const char *what, lp_npy *h);

/* The data bytes the shape needs at `itemsize` bytes each, or an LP_ERR_FORMAT naming
 * `what` when that overflows or is more than the file holds after the header. */
lp_status npy_data_bytes(const lp_npy *h, size_t itemsize, const char *what, size_t *bytes);

#endif
