/* sae_npz.c: Gemma Scope SAEs: params.npz (numpy savez, a zip of stored .npy, read
 * through npy.h) or params.safetensors. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loupe/output.h"
#include "loupe/sae.h"
#include "loupe/safetensors.h"
#include "io/npy.h"
#include "sae/sae_read.h"

/* ---- Gemma Scope: params.npz (numpy savez: a zip of stored .npy) or params.safetensors ---- */

void sae_npz_close(npz_file *z) {
    for (int i = 0; i < z->n; i++) free(z->t[i].name);
    free(z->t);
    if (z->map) munmap(z->map, z->size);
    memset(z, 0, sizeof *z);
}

static uint64_t rd(const unsigned char *p, int bytes) {
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

/* Parses one .npy held in [p, p+n) into t (data points into the mapping). */
static lp_status npy_parse(const char *path, const char *name, const unsigned char *p, size_t n, lp_st_tensor *t) {
    char what[600];
    snprintf(what, sizeof what, "%s: entry '%s'", path, name);
    lp_npy h;
    LP_CHECK(npy_parse_buf(p, n, what, &h));
    static const struct { const char *np; lp_dtype dt; } types[] = {
        {"<f4", LP_F32}, {"<f8", LP_F64}, {"<f2", LP_F16}, {"|f4", LP_F32}};
    int dt = -1;
    for (size_t i = 0; i < sizeof types / sizeof *types; i++)
        if (strcmp(h.descr, types[i].np) == 0) dt = (int)types[i].dt;
    if (dt < 0) LP_FAIL(LP_ERR_FORMAT, "%s has dtype '%s' (expected little-endian float)", what, h.descr);
    t->dtype = (lp_dtype)dt;
    t->ndim = h.ndim;
    memcpy(t->shape, h.shape, sizeof t->shape);
    LP_CHECK(npy_data_bytes(&h, lp_dtype_size(t->dtype), what, &t->nbytes));
    t->data = p + h.data_off;
    return LP_OK;
}

/* Maps path whole into z->map, z->size; refuses what is too short to be a zip. */
static lp_status npz_map(npz_file *z, const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) LP_FAIL(LP_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        LP_FAIL(LP_ERR_IO, "%s: not a regular file", path);
    }
    z->size = (size_t)sb.st_size;
    if (z->size < 22) {
        close(fd);
        LP_FAIL(LP_ERR_FORMAT, "%s: truncated: %zu bytes is too short for a zip archive (.npz)", path, z->size);
    }
    z->map = mmap(NULL, z->size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (z->map == MAP_FAILED) {
        z->map = NULL;
        LP_FAIL(LP_ERR_IO, "%s: cannot map: %s", path, strerror(errno));
    }
    return LP_OK;
}

/* Where the central directory is (entries, bytes, offset): from the end-of-central-directory
 * record, or its zip64 form; checked to lie inside the file. */
static lp_status zip_central_dir(const unsigned char *b, size_t size, const char *path, uint64_t *count_out,
                                 uint64_t *cd_size_out, uint64_t *cd_off_out) {
    size_t eocd = SIZE_MAX;
    size_t lo = size > 22 + 65535 ? size - 22 - 65535 : 0;
    for (size_t i = size - 22 + 1; i-- > lo;)
        if (rd(b + i, 4) == 0x06054b50) { eocd = i; break; }
    if (eocd == SIZE_MAX)
        LP_FAIL(LP_ERR_FORMAT, "%s: not a zip archive (.npz): no end-of-central-directory record (truncated?)", path);
    uint64_t count = rd(b + eocd + 10, 2), cd_size = rd(b + eocd + 12, 4), cd_off = rd(b + eocd + 16, 4);
    if ((count == 0xffff || cd_size == 0xffffffff || cd_off == 0xffffffff) && eocd >= 20 &&
        rd(b + eocd - 20, 4) == 0x07064b50) {
        uint64_t z64 = rd(b + eocd - 20 + 8, 8);
        if (size < 56 || z64 > size - 56 || rd(b + z64, 4) != 0x06064b50) /* the record is 56 bytes */
            LP_FAIL(LP_ERR_FORMAT, "%s: bad zip64 end-of-central-directory record", path);
        count = rd(b + z64 + 32, 8), cd_size = rd(b + z64 + 40, 8), cd_off = rd(b + z64 + 48, 8);
    }
    if (cd_off > size || cd_size > size - cd_off || count > cd_size / 46)
        LP_FAIL(LP_ERR_FORMAT, "%s: zip central directory lies outside the file (truncated?)", path);
    *count_out = count, *cd_size_out = cd_size, *cd_off_out = cd_off;
    return LP_OK;
}

/* Reads the central directory of a zip (with zip64 records, as numpy writes them) and
 * parses every stored "*.npy" entry. Compressed entries (np.savez_compressed) are refused. */
lp_status sae_npz_open(npz_file *z, const char *path) {
    memset(z, 0, sizeof *z);
    LP_CHECK(npz_map(z, path));
    const unsigned char *b = z->map;
    size_t size = z->size;
    uint64_t count = 0, cd_size = 0, cd_off = 0;
    lp_status st = zip_central_dir(b, size, path, &count, &cd_size, &cd_off);
    if (st != LP_OK) {
        sae_npz_close(z);
        return st;
    }
    z->t = calloc(count ? count : 1, sizeof *z->t);
    if (!z->t) {
        sae_npz_close(z);
        LP_FAIL(LP_ERR_OOM, "out of host memory");
    }
    size_t p = (size_t)cd_off, end = (size_t)(cd_off + cd_size);
    for (uint64_t e = 0; e < count; e++) {
        if (p + 46 > end || rd(b + p, 4) != 0x02014b50) {
            st = LP_ERR(LP_ERR_FORMAT, "%s: bad zip central directory entry %llu", path,
                              (unsigned long long)e);
            break;
        }
        unsigned flags = (unsigned)rd(b + p + 8, 2), method = (unsigned)rd(b + p + 10, 2);
        uint64_t csize = rd(b + p + 20, 4), usize = rd(b + p + 24, 4), loff = rd(b + p + 42, 4);
        size_t nlen = (size_t)rd(b + p + 28, 2), xlen = (size_t)rd(b + p + 30, 2), clen = (size_t)rd(b + p + 32, 2);
        if (p + 46 + nlen + xlen + clen > end) {
            st = LP_ERR(LP_ERR_FORMAT, "%s: bad zip central directory entry %llu", path,
                              (unsigned long long)e);
            break;
        }
        char name[256];
        snprintf(name, sizeof name, "%.*s", (int)(nlen < 255 ? nlen : 255), (const char *)b + p + 46);
        /* zip64 extra field: the 0xffffffff fields, in order usize, csize, offset */
        for (size_t x = p + 46 + nlen; x + 4 <= p + 46 + nlen + xlen;) {
            unsigned id = (unsigned)rd(b + x, 2), len = (unsigned)rd(b + x + 2, 2);
            if (x + 4 + len > p + 46 + nlen + xlen) break;
            if (id == 0x0001) {
                size_t q = x + 4, qe = x + 4 + len;
                if (usize == 0xffffffff && q + 8 <= qe) usize = rd(b + q, 8), q += 8;
                if (csize == 0xffffffff && q + 8 <= qe) csize = rd(b + q, 8), q += 8;
                if (loff == 0xffffffff && q + 8 <= qe) loff = rd(b + q, 8), q += 8;
            }
            x += 4 + len;
        }
        p += 46 + nlen + xlen + clen;
        if (!sae_ends_with(name, ".npy")) continue;
        if (flags & 1) {
            st = LP_ERR(LP_ERR_FORMAT, "%s: entry '%s' is encrypted", path, name);
            break;
        }
        if (method != 0) {
            st = LP_ERR(LP_ERR_FORMAT, "%s: entry '%s' is compressed (zip method %u); loupe reads np.savez archives, not "
                              "np.savez_compressed: re-save with np.savez (an SAE may also be params.safetensors)", path, name, method);
            break;
        }
        if (size < 30 || loff > size - 30 || rd(b + loff, 4) != 0x04034b50) { /* the local header is 30 bytes */
            st = LP_ERR(LP_ERR_FORMAT, "%s: entry '%s' has a bad local header (truncated?)", path, name);
            break;
        }
        uint64_t data = loff + 30 + rd(b + loff + 26, 2) + rd(b + loff + 28, 2);
        if (csize != usize || data > size || usize > size - data) {
            st = LP_ERR(LP_ERR_FORMAT, "%s: entry '%s' runs past the end of the file (truncated?)",
                              path, name);
            break;
        }
        lp_st_tensor *t = &z->t[z->n];
        name[strlen(name) - 4] = 0; /* "W_enc.npy" -> "W_enc" */
        if ((st = npy_parse(path, name, b + data, (size_t)usize, t)) != LP_OK) break;
        if (!(t->name = strdup(name))) {
            st = LP_ERR(LP_ERR_OOM, "%s: out of memory", path);
            break;
        }
        z->n++;
    }
    if (st != LP_OK) sae_npz_close(z);
    return st;
}

static lp_status fill_gemmascope(lp_sae *h, const src_set *s, const void *arg) {
    const lp_sae_cfg *c = &h->cfg;
    static const char *const enc[] = {"W_enc", "w_enc", NULL}, *const dec[] = {"W_dec", "w_dec", NULL};
    LP_CHECK(sae_take(s, sae_pick(s, enc), 2, c->d_in, c->d_sae, 0, h->W_enc, "(d_in, d_sae)"));
    LP_CHECK(sae_take(s, "b_enc", 1, c->d_sae, 0, 0, h->b_enc, "(d_sae)"));
    LP_CHECK(sae_take(s, sae_pick(s, dec), 2, c->d_sae, c->d_out, 0, h->W_dec, "(d_sae, d_in)"));
    LP_CHECK(sae_take(s, "b_dec", 1, c->d_out, 0, 0, h->b_dec, "(d_in)"));
    LP_CHECK(sae_take(s, "threshold", 1, c->d_sae, 0, 0, h->threshold, "(d_sae)"));
    return LP_OK;
}

/* Gemma Scope JumpReLU: pre = x W_enc + b_enc, f = relu(pre) * (pre > threshold),
 * x_hat = f W_dec + b_dec; no b_dec subtraction. Sizes come from the tensors. */
lp_status sae_load_gemmascope(lp_sae **out, lp_ctx *ctx, const char *path) {
    int npz = sae_ends_with(path, ".npz");
    npz_file z = {0};
    lp_st_file f = {0};
    src_set s = {path, NULL, 0, 0};
    if (npz) {
        LP_CHECK(sae_npz_open(&z, path));
        s.t = z.t, s.n = z.n, s.file_bytes = z.size;
    } else {
        LP_CHECK(lp_st_open(&f, path));
        s.t = f.tensors, s.n = f.n, s.file_bytes = f.size;
    }
    lp_status st = LP_OK;
    static const char *const enc[] = {"W_enc", "w_enc", NULL}, *const dec[] = {"W_dec", "w_dec", NULL},
                             *const skip[] = {"W_skip", "w_skip", NULL};
    const char *en = sae_pick(&s, enc), *dn = sae_pick(&s, dec);
    const lp_st_tensor *we = en ? sae_src_find(&s, en) : NULL, *wd = dn ? sae_src_find(&s, dn) : NULL;
    lp_sae_cfg cfg = {.arch = LP_SAE_JUMPRELU, .jumprelu_bandwidth = 0.05f, .normalize = "none"};
    if (!we) st = LP_ERR(LP_ERR_FORMAT, "%s: tensor 'W_enc' is missing", path);
    else if (!wd) st = LP_ERR(LP_ERR_FORMAT, "%s: tensor 'W_dec' is missing", path);
    else if (sae_pick(&s, skip))
        st = LP_ERR(LP_ERR_FORMAT, "%s: tensor '%s' (an affine skip) is not supported", path,
                          sae_pick(&s, skip));
    else if (we->ndim != 2 || wd->ndim != 2 || we->shape[0] <= 0 || we->shape[1] <= 0 || we->shape[0] > 0x7fffffff ||
             we->shape[1] > 0x7fffffff || wd->shape[1] <= 0 || wd->shape[1] > 0x7fffffff) {
        char a[96], b[96];
        st = LP_ERR(LP_ERR_SHAPE, "%s: tensors '%s' %s and '%s' %s are not [d_in, d_sae] and [d_sae, d_in]",
                          path, en, lp_shape_str(we->shape, we->ndim, a, sizeof a), dn,
                          lp_shape_str(wd->shape, wd->ndim, b, sizeof b));
    } else {
        cfg.d_in = (int)we->shape[0], cfg.d_sae = (int)we->shape[1], cfg.d_out = (int)wd->shape[1];
        st = sae_build(out, ctx, &cfg, &s, fill_gemmascope, NULL, path);
    }
    if (npz) sae_npz_close(&z);
    else lp_st_close(&f);
    return st;
}
