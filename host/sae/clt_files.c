/* clt_files.c: transcoder sets in circuit-tracer's layout (clt.h): read (every header
 * and shape checked before anything is allocated) and written (each file atomically,
 * config.yaml last). A per-layer set whose config lists .npz files is Gemma Scope's
 * transcoders, read as circuit-tracer's load_gemma_scope_transcoder reads them: params.npz
 * with W_enc [d_model, d_sae] (transposed on reading), W_dec [d_sae, d_model], b_enc, b_dec
 * and threshold [d_sae]: JumpReLU, no skip. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/safetensors.h"
#include "sae/clt_internal.h"
#include "sae/sae_read.h"

#define MAX_LAYERS 4096

typedef struct clt_src {
    lp_st_file enc, dec;   /* per-layer: enc holds everything; CLT: W_enc_l and W_dec_l */
    int has_enc, has_dec;
    int npz;               /* Gemma Scope's params.npz: enc is a view of z's entries */
    npz_file z;
} clt_src;

static int is_float(lp_dtype d) { return d == LP_F32 || d == LP_F64 || d == LP_BF16 || d == LP_F16; }

/* Checks that `name` in f has the expected shape (or is absent when !required: *present
 * says which). */
static lp_status check_t(const lp_st_file *f, const char *name, int ndim, const int64_t *shape, int required, int *present) {
    const lp_st_tensor *t = lp_st_find(f, name);
    char got[96], want[96];
    lp_shape_str(shape, ndim, want, sizeof want);
    if (present) *present = t != NULL;
    if (!t) {
        if (required) LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' %s is missing", f->path, name, want);
        return LP_OK;
    }
    if (!is_float(t->dtype))
        LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' has dtype %s (expected F32, F64, F16 or BF16)", f->path, name, lp_dtype_name(t->dtype));
    int ok = t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = t->shape[i] == shape[i];
    if (!ok) LP_FAIL(LP_ERR_SHAPE, "%s: tensor '%s' has shape %s, expected %s", f->path, name,
                     lp_shape_str(t->shape, t->ndim, got, sizeof got), want);
    return LP_OK;
}

/* The length of a 1-d tensor, for the dims circuit-tracer infers from the biases. */
static lp_status dim_of(const lp_st_file *f, const char *name, int64_t *n) {
    const lp_st_tensor *t = lp_st_find(f, name);
    if (!t) LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' is missing", f->path, name);
    if (t->ndim != 1 || t->shape[0] <= 0 || t->shape[0] > (1 << 30))
        LP_FAIL(LP_ERR_SHAPE, "%s: tensor '%s' must be 1-d with 1..2^30 entries", f->path, name);
    *n = t->shape[0];
    return LP_OK;
}

/* a tensor name with the layer number */
#define NM(fmt, l) (snprintf(nm, sizeof nm, fmt, (l)), nm)

static src_set src_of(const lp_st_file *f) { return (src_set){f->path, f->tensors, f->n, f->size}; }

/* A [rows, cols] or [rows] tensor into dst (F32), finite values only. */
static lp_status take(const lp_st_file *f, const char *name, int ndim, int64_t rows, int64_t cols, float *dst) {
    src_set s = src_of(f);
    return sae_take(&s, name, ndim, rows, cols, 0, dst, "");
}

/* Gemma Scope's encoder [D, S] as circuit-tracer's [S, D]. */
static lp_status take_t(const lp_st_file *f, const char *name, int64_t rows, int64_t cols, float *dst) {
    src_set s = src_of(f);
    return sae_take(&s, name, 2, rows, cols, 1, dst, "(d_model, d_sae)");
}

/* circuit-tracer's CLT decoder [S, T, D] into loupe's [T, S, D]. */
static lp_status take_dec3(const lp_st_file *f, const char *name, int64_t S, int64_t T, int64_t D, float *dst) {
    const lp_st_tensor *t = lp_st_find(f, name);
    for (int64_t s = 0; s < S; s++)
        for (int64_t k = 0; k < T; k++)
            for (int64_t d = 0; d < D; d++) {
                double v = sae_load_elem(t, (size_t)((s * T + k) * D + d));
                if (!isfinite(v) || !isfinite((float)v))
                    LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' has a non-finite value at [%lld, %lld, %lld]", f->path, name,
                            (long long)s, (long long)k, (long long)d);
                dst[(size_t)((k * S + s) * D + d)] = (float)v;
            }
    return LP_OK;
}

static char *path_of(const char *dir, const char *fmt, int l) {
    char name[64];
    snprintf(name, sizeof name, fmt, l);
    return sae_join(dir, name);
}

static lp_status open_st(lp_st_file *f, const char *path, int *flag) {
    if (!path) LP_FAIL(LP_ERR_OOM, "out of memory");
    if (!sae_is_file(path)) LP_FAIL(LP_ERR_IO, "%s: no such file", path);
    LP_CHECK(lp_st_open(f, path));
    *flag = 1;
    return LP_OK;
}

/* A Gemma Scope params.npz, seen through src->enc (the tensors are the archive's). */
static lp_status open_npz(clt_src *src, const char *path) {
    if (!path) LP_FAIL(LP_ERR_OOM, "out of memory");
    if (!sae_is_file(path)) LP_FAIL(LP_ERR_IO, "%s: no such file", path);
    LP_CHECK(sae_npz_open(&src->z, path));
    src->npz = 1;
    src->enc = (lp_st_file){.path = strdup(path), .size = src->z.size, .tensors = src->z.t, .n = src->z.n};
    if (!src->enc.path) LP_FAIL(LP_ERR_OOM, "out of memory");
    return LP_OK;
}

/* Gemma Scope's tensors of one layer ([D, S] encoder, a threshold, no skip). */
static lp_status check_npz_layer(const lp_st_file *f, int64_t S, int64_t D) {
    int64_t ds[2] = {D, S}, sd[2] = {S, D}, s1[1] = {S}, d1[1] = {D};
    LP_CHECK(check_t(f, "W_enc", 2, ds, 1, NULL));
    LP_CHECK(check_t(f, "W_dec", 2, sd, 1, NULL));
    LP_CHECK(check_t(f, "b_enc", 1, s1, 1, NULL));
    LP_CHECK(check_t(f, "b_dec", 1, d1, 1, NULL));
    return check_t(f, "threshold", 1, s1, 1, NULL);
}

/* The shapes of every layer's tensors; fills cfg's dims and activation. */
static lp_status check_layers(clt_src *src, lp_clt_cfg *cfg, int y_act, int has_act) {
    int L = cfg->n_layers, CL = cfg->kind == LP_CLT_CROSS_LAYER;
    int64_t S, D;
    char nm[64];
    if (CL) {
        LP_CHECK(dim_of(&src[0].enc, "b_enc_0", &S));
        LP_CHECK(dim_of(&src[0].enc, "b_dec_0", &D));
    } else {
        LP_CHECK(dim_of(&src[0].enc, "b_enc", &S));
        LP_CHECK(dim_of(&src[0].enc, "b_dec", &D));
    }
    cfg->d_sae = (int)S, cfg->d_model = (int)D;
    int thr0 = 0, skip0 = 0;
    for (int l = 0; l < L; l++) {
        const lp_st_file *f = &src[l].enc;
        int64_t sd[2] = {S, D}, dd[2] = {D, D}, s1[1] = {S}, d1[1] = {D};
        int thr, skip = 0;
        if (CL) {
            int64_t s3[3] = {S, L - l, D};
            LP_CHECK(check_t(f, NM("W_enc_%d", l), 2, sd, 1, NULL));
            LP_CHECK(check_t(f, NM("b_enc_%d", l), 1, s1, 1, NULL));
            LP_CHECK(check_t(f, NM("b_dec_%d", l), 1, d1, 1, NULL));
            LP_CHECK(check_t(f, NM("threshold_%d", l), 1, s1, 0, &thr));
            LP_CHECK(check_t(&src[l].dec, NM("W_dec_%d", l), 3, s3, 1, NULL));
        } else if (src[l].npz != src[0].npz) {
            LP_FAIL(LP_ERR_FORMAT, "%s: a %s among %s files: every layer must be in one format", f->path,
                    src[l].npz ? ".npz" : "safetensors file", src[0].npz ? ".npz" : "safetensors");
        } else if (src[l].npz) {
            LP_CHECK(check_npz_layer(f, S, D));
            thr = 1;
        } else {
            LP_CHECK(check_t(f, "W_enc", 2, sd, 1, NULL));
            LP_CHECK(check_t(f, "W_dec", 2, sd, 1, NULL));
            LP_CHECK(check_t(f, "b_enc", 1, s1, 1, NULL));
            LP_CHECK(check_t(f, "b_dec", 1, d1, 1, NULL));
            LP_CHECK(check_t(f, "activation_function.threshold", 1, s1, 0, &thr));
            LP_CHECK(check_t(f, "W_skip", 2, dd, 0, &skip));
        }
        if (l == 0) thr0 = thr, skip0 = skip;
        if (thr != thr0) LP_FAIL(LP_ERR_FORMAT, "%s: %s a threshold but layer 0 %s", f->path, thr ? "has" : "lacks", thr0 ? "has" : "lacks");
        if (skip != skip0) LP_FAIL(LP_ERR_FORMAT, "%s: %s W_skip but layer 0 %s", f->path, skip ? "has" : "lacks", skip0 ? "has" : "lacks");
    }
    cfg->skip = skip0;
    if (thr0) {
        if (has_act && y_act != LP_CLT_JUMPRELU)
            LP_FAIL(LP_ERR_FORMAT, "%s: the files hold thresholds but config.yaml says activation_function %s", src[0].enc.path,
                    lp_clt_act_name(y_act));
        cfg->act = LP_CLT_JUMPRELU;
    } else {
        if (has_act && y_act == LP_CLT_JUMPRELU) LP_FAIL(LP_ERR_FORMAT, "%s: jumprelu without a threshold", src[0].enc.path);
        cfg->act = has_act ? y_act : LP_CLT_RELU;
    }
    return LP_OK;
}

/* One layer's host image (the device carving, relocated to img), then uploaded. */
static lp_status fill_layer(lp_clt *t, lp_ctx *c, clt_src *src, int l, float *img) {
    const lp_clt_cfg *cf = &t->cfg;
    const lp_clt_layer *y = &t->layer[l];
    int64_t S = cf->d_sae, D = cf->d_model;
    float *base = y->W_enc;
    size_t n = (size_t)(S * D + S + (int64_t)y->n_out * S * D + D + (y->threshold ? S : 0) + (y->W_skip ? D * D : 0));
#define HOST(p) (img + ((p) - base))
    char nm[64];
    if (cf->kind == LP_CLT_CROSS_LAYER) {
        LP_CHECK(take(&src[l].enc, NM("W_enc_%d", l), 2, S, D, HOST(y->W_enc)));
        LP_CHECK(take(&src[l].enc, NM("b_enc_%d", l), 1, S, 1, HOST(y->b_enc)));
        LP_CHECK(take(&src[l].enc, NM("b_dec_%d", l), 1, D, 1, HOST(y->b_dec)));
        if (y->threshold) LP_CHECK(take(&src[l].enc, NM("threshold_%d", l), 1, S, 1, HOST(y->threshold)));
        LP_CHECK(take_dec3(&src[l].dec, NM("W_dec_%d", l), S, y->n_out, D, HOST(y->W_dec)));
    } else if (src[l].npz) {
        const lp_st_file *f = &src[l].enc;
        LP_CHECK(take_t(f, "W_enc", D, S, HOST(y->W_enc)));
        LP_CHECK(take(f, "b_enc", 1, S, 1, HOST(y->b_enc)));
        LP_CHECK(take(f, "W_dec", 2, S, D, HOST(y->W_dec)));
        LP_CHECK(take(f, "b_dec", 1, D, 1, HOST(y->b_dec)));
        LP_CHECK(take(f, "threshold", 1, S, 1, HOST(y->threshold)));
    } else {
        const lp_st_file *f = &src[l].enc;
        LP_CHECK(take(f, "W_enc", 2, S, D, HOST(y->W_enc)));
        LP_CHECK(take(f, "b_enc", 1, S, 1, HOST(y->b_enc)));
        LP_CHECK(take(f, "W_dec", 2, S, D, HOST(y->W_dec)));
        LP_CHECK(take(f, "b_dec", 1, D, 1, HOST(y->b_dec)));
        if (y->threshold) LP_CHECK(take(f, "activation_function.threshold", 1, S, 1, HOST(y->threshold)));
        if (y->W_skip) LP_CHECK(take(f, "W_skip", 2, D, D, HOST(y->W_skip)));
    }
#undef HOST
    return lp_ctx_to_device(c, base, img, n * sizeof(float));
}

/* Which files: the config's list, else layer_{l} / W_enc_{l} counted from 0. */
static lp_status open_all(const char *dir, clt_yaml *y, lp_clt_cfg *cfg, clt_src **out) {
    int CL = cfg->kind == LP_CLT_CROSS_LAYER, L = 0;
    if (y->paths && CL) LP_FAIL(LP_ERR_FORMAT, "%s/config.yaml: a 'transcoders' list is not read for a cross-layer transcoder", dir);
    if (y->paths) L = y->n_paths;
    else {
        for (; L < MAX_LAYERS; L++) {
            char *p = path_of(dir, CL ? "W_enc_%d.safetensors" : "layer_%d.safetensors", L);
            int ok = p && sae_is_file(p);
            free(p);
            if (!ok) break;
        }
        if (L == 0) LP_FAIL(LP_ERR_IO, "%s: no %s", dir, CL ? "W_enc_0.safetensors" : "layer_0.safetensors");
    }
    clt_src *src = calloc((size_t)L, sizeof *src);
    if (!src) LP_FAIL(LP_ERR_OOM, "out of memory");
    *out = src, cfg->n_layers = L;
    for (int l = 0; l < L; l++) {
        char *p = y->paths ? (y->paths[l][0] == '/' ? strdup(y->paths[l]) : sae_join(dir, y->paths[l]))
                           : path_of(dir, CL ? "W_enc_%d.safetensors" : "layer_%d.safetensors", l);
        lp_status st = p && sae_ends_with(p, ".npz") ? open_npz(&src[l], p) : open_st(&src[l].enc, p, &src[l].has_enc);
        free(p);
        LP_CHECK(st);
        if (CL) {
            p = path_of(dir, "W_dec_%d.safetensors", l);
            st = open_st(&src[l].dec, p, &src[l].has_dec);
            free(p);
            LP_CHECK(st);
        }
    }
    return LP_OK;
}

static void close_all(clt_src *src, int L) {
    for (int l = 0; src && l < L; l++) {
        if (src[l].has_enc) lp_st_close(&src[l].enc);
        if (src[l].npz) free(src[l].enc.path), sae_npz_close(&src[l].z);
        if (src[l].has_dec) lp_st_close(&src[l].dec);
    }
    free(src);
}

static lp_status read_config(const char *dir, clt_yaml *y) {
    memset(y, 0, sizeof *y);
    char *cp = sae_join(dir, "config.yaml");
    if (!cp) LP_FAIL(LP_ERR_OOM, "out of memory");
    lp_status st = LP_OK;
    if (sae_is_file(cp)) {
        size_t n = 0;
        char *text = lp_read_file(cp, &n);
        st = text ? clt_yaml_parse(text, n, cp, y) : LP_ERR(LP_ERR_IO, "%s: cannot be read", cp);
        free(text);
        if (st == LP_OK && !y->has_kind) st = LP_ERR(LP_ERR_FORMAT, "%s: key 'model_kind' is missing", cp);
    } else {
        /* no config: by the files, with circuit-tracer's default hooks */
        char *p = path_of(dir, "W_enc_%d.safetensors", 0);
        y->cfg.kind = p && sae_is_file(p) ? LP_CLT_CROSS_LAYER : LP_CLT_PER_LAYER;
        free(p);
    }
    if (st == LP_OK && !y->cfg.input_hook[0]) snprintf(y->cfg.input_hook, sizeof y->cfg.input_hook, "hook_resid_mid");
    if (st == LP_OK && !y->cfg.output_hook[0]) snprintf(y->cfg.output_hook, sizeof y->cfg.output_hook, "hook_mlp_out");
    free(cp);
    if (st != LP_OK) clt_yaml_free(y);
    return st;
}

lp_status lp_clt_load(lp_clt **out, lp_ctx *c, const char *dir) {
    *out = NULL;
    if (!dir) LP_FAIL(LP_ERR_ARG, "transcoders: no directory given");
    clt_yaml y;
    LP_CHECK(read_config(dir, &y));
    lp_clt_cfg cfg = y.cfg;
    clt_src *src = NULL;
    lp_clt *t = NULL;
    float *img = NULL;
    lp_status st;
    LP_TRY(st, done, open_all(dir, &y, &cfg, &src));
    LP_TRY(st, done, check_layers(src, &cfg, y.act, y.has_act));
    st = lp_clt_cfg_check(&cfg);
    if (st != LP_OK) {
        st = sae_prefix_error(LP_ERR_FORMAT, dir);
        goto done;
    }
    LP_TRY(st, done, lp_clt_alloc(&t, &cfg, c));
    size_t most = 0;
    for (int l = 0; l < cfg.n_layers; l++) {
        size_t n = (size_t)((t->layer[l].n_out + 1) * (size_t)cfg.d_sae * cfg.d_model + 2 * (size_t)cfg.d_sae + cfg.d_model +
                            (cfg.skip ? (size_t)cfg.d_model * cfg.d_model : 0));
        if (n > most) most = n;
    }
    img = malloc(most * sizeof *img);
    if (!img) {
        st = LP_ERR(LP_ERR_OOM, "%s: out of host memory for %zu parameters", dir, most);
        goto done;
    }
    for (int l = 0; l < cfg.n_layers; l++) LP_TRY(st, done, fill_layer(t, c, src, l, img));
    *out = t, t = NULL;
done:
    free(img);
    lp_clt_free(t, c);
    close_all(src, cfg.n_layers);
    clt_yaml_free(&y);
    return st;
}

/* ---- writing ---- */

static lp_status to_host(lp_ctx *c, const float *dev, size_t n, float **out) {
    *out = malloc(n ? n * sizeof(float) : 1);
    if (!*out) LP_FAIL(LP_ERR_OOM, "out of host memory");
    lp_status st = lp_ctx_to_host(c, *out, dev, n * sizeof(float));
    if (st != LP_OK) free(*out), *out = NULL;
    return st;
}

static lp_status save_layer(const lp_clt *t, lp_ctx *c, const char *dir, int l) {
    const lp_clt_cfg *cf = &t->cfg;
    const lp_clt_layer *y = &t->layer[l];
    int64_t S = cf->d_sae, D = cf->d_model, T = y->n_out;
    size_t n = (size_t)(S * D + S + T * S * D + D + (y->threshold ? S : 0) + (y->W_skip ? D * D : 0));
    float *h, *dec = NULL;
    LP_CHECK(to_host(c, y->W_enc, n, &h));
    const float *enc = h, *benc = h + S * D, *wdec = benc + S, *bdec = wdec + T * S * D, *thr = bdec + D;
    const float *skip = y->threshold ? thr + S : thr;
    char nm[5][64];
    lp_status st = LP_OK;
    char *p = NULL;
    if (cf->kind == LP_CLT_PER_LAYER) {
        lp_st_spec sp[6] = {{"W_enc", LP_F32, 2, {S, D}}, {"W_dec", LP_F32, 2, {S, D}}, {"b_enc", LP_F32, 1, {S}},
                            {"b_dec", LP_F32, 1, {D}}};
        const void *da[6] = {enc, wdec, benc, bdec};
        int k = 4;
        if (y->threshold) sp[k] = (lp_st_spec){"activation_function.threshold", LP_F32, 1, {S}}, da[k++] = thr;
        if (y->W_skip) sp[k] = (lp_st_spec){"W_skip", LP_F32, 2, {D, D}}, da[k++] = skip;
        p = path_of(dir, "layer_%d.safetensors", l);
        st = p ? lp_st_write(p, sp, da, k, NULL) : LP_ERR(LP_ERR_OOM, "out of memory");
    } else {
        snprintf(nm[0], 64, "W_enc_%d", l), snprintf(nm[1], 64, "b_enc_%d", l), snprintf(nm[2], 64, "b_dec_%d", l);
        snprintf(nm[3], 64, "threshold_%d", l), snprintf(nm[4], 64, "W_dec_%d", l);
        lp_st_spec sp[4] = {{nm[0], LP_F32, 2, {S, D}}, {nm[1], LP_F32, 1, {S}}, {nm[2], LP_F32, 1, {D}}, {nm[3], LP_F32, 1, {S}}};
        const void *da[4] = {enc, benc, bdec, thr};
        p = path_of(dir, "W_enc_%d.safetensors", l);
        st = p ? lp_st_write(p, sp, da, y->threshold ? 4 : 3, NULL) : LP_ERR(LP_ERR_OOM, "out of memory");
        free(p);
        p = NULL;
        /* loupe's [T, S, D] back to circuit-tracer's [S, T, D] */
        if (st == LP_OK && !(dec = malloc((size_t)(T * S * D) * sizeof *dec))) st = LP_ERR(LP_ERR_OOM, "out of host memory");
        for (int64_t k = 0; st == LP_OK && k < T; k++)
            for (int64_t s = 0; s < S; s++) memcpy(dec + (s * T + k) * D, wdec + (k * S + s) * D, (size_t)D * sizeof *dec);
        lp_st_spec sd = {nm[4], LP_F32, 3, {S, T, D}};
        const void *dd = dec;
        if (st == LP_OK) p = path_of(dir, "W_dec_%d.safetensors", l);
        if (st == LP_OK) st = p ? lp_st_write(p, &sd, &dd, 1, NULL) : LP_ERR(LP_ERR_OOM, "out of memory");
    }
    free(p), free(dec), free(h);
    return st;
}

lp_status lp_clt_save(const lp_clt *t, lp_ctx *c, const char *dir) {
    if (!t || !dir) LP_FAIL(LP_ERR_ARG, "transcoders: nothing to save or no directory");
    LP_CHECK(lp_clt_cfg_check(&t->cfg));
    if (t->cfg.kind == LP_CLT_CROSS_LAYER && t->cfg.skip)
        LP_FAIL(LP_ERR_ARG, "%s: circuit-tracer's cross-layer files have no skip connection; this CLT has one", dir);
    LP_CHECK(lp_mkdir_p(dir));
    for (int l = 0; l < t->cfg.n_layers; l++) LP_CHECK(save_layer(t, c, dir, l));
    char *cp = sae_join(dir, "config.yaml");
    if (!cp) LP_FAIL(LP_ERR_OOM, "out of memory");
    lp_status st = clt_yaml_write(&t->cfg, cp);
    free(cp);
    return st;
}
