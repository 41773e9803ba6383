/* sae_save.c: writing an SAE or transcoder in the SAELens layout (lp_sae_save).
 *
 * What is written follows SAELens 6.5.3 (`SAE.save_model`): cfg.json with d_in, d_sae,
 * dtype, device, apply_b_dec_to_input, normalize_activations, reshape_activations,
 * metadata {sae_lens_version, sae_lens_training_version, model_name, hook_name,
 * hook_name_out, hook_head_index, context_size}, k (topk), d_out (transcoders) and
 * architecture; sae_weights.safetensors with W_dec, W_enc, b_dec, b_enc, threshold and
 * W_skip, F32, in the order Python's safetensors writes them (by name).
 *
 * Architecture names written:
 *   SAE (d_out = d_in, no skip, no hook_name_out): standard, topk, jumprelu; batchtopk is
 *   written as jumprelu with threshold[0], its global threshold, in every latent (as
 *   SAELens exports BatchTopK).
 *   Transcoder: transcoder (standard), skip_transcoder (standard + W_skip),
 *   jumprelu_transcoder; and, where SAELens 6.5.3 has none: jumprelu_skip_transcoder (the
 *   name later SAELens releases use), topk_transcoder and topk_skip_transcoder (loupe's
 *   own; SAELens cannot load those). W_skip is stored [d_out, d_in] as SAELens does.
 *   SAELens transcoders never subtract b_dec from the input, so a transcoder with
 *   apply_b_dec_to_input is written with the subtraction folded into b_enc
 *   (b_enc - b_dec W_enc) and apply_b_dec_to_input false: the same function.
 *
 * Scale folding: an SAE (its target is its input) was trained on x * s and reconstructs
 * x * s, so the fold is SAELens's fold_activation_norm_scaling_factor: W_enc * s, W_dec / s,
 * b_dec / s; b_enc, threshold and W_skip unchanged. A transcoder (hook_name_out set, or
 * d_out != d_in) was trained on x * s to predict its raw target (as host/sae/sae_train.c does),
 * so only its input side folds: W_enc * s and W_skip * s; W_dec, b_dec, b_enc and threshold
 * unchanged. (SAELens 6.5.3 trains no transcoders; its inherited fold would also divide
 * W_dec and b_dec, which is right only if the target had been scaled as well.)
 *
 * A save never leaves a half-written SAE under the final name: a new directory is built
 * under a temporary name and renamed; into an existing directory both files are written
 * under temporary names first, cfg.json is removed, the weights renamed into place, and
 * cfg.json renamed last, so a crash leaves the old SAE, the new one, or a directory
 * without cfg.json, which no loader takes for an SAE. */
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

#define SAELENS_FORMAT_VERSION "6.5.3"
#include "sae/sae_read.h"

/* Written with a SAELens transcoder architecture (SAELens keeps W_skip only there). */
static int is_transcoder(const lp_sae_cfg *c) { return c->d_out != c->d_in || c->skip || c->hook_name_out[0]; }
/* Reconstructs another hook than it reads (its target was not scaled in training). */
static int has_own_target(const lp_sae_cfg *c) { return c->d_out != c->d_in || c->hook_name_out[0]; }

/* ---- saving ---- */

/* A float as the shortest decimal that reads back to it ("0.05", not 0.0500000007). */
static double float_for_json(float f) {
    char buf[32];
    for (int prec = 6; prec <= 9; prec++) {
        snprintf(buf, sizeof buf, "%.*g", prec, (double)f);
        if ((float)strtod(buf, NULL) == f) break;
    }
    return strtod(buf, NULL);
}

static const char *saelens_arch_name(const lp_sae_cfg *c) {
    if (!is_transcoder(c)) return c->arch == LP_SAE_STANDARD ? "standard" : c->arch == LP_SAE_TOPK ? "topk" : "jumprelu";
    switch (c->arch) {
    case LP_SAE_STANDARD: return c->skip ? "skip_transcoder" : "transcoder";
    case LP_SAE_TOPK: return c->skip ? "topk_skip_transcoder" : "topk_transcoder";
    default: return c->skip ? "jumprelu_skip_transcoder" : "jumprelu_transcoder";
    }
}

static char *cfg_json(const lp_sae_cfg *c, int apply_b_dec) {
    int tc = is_transcoder(c);
    cJSON *root = cJSON_CreateObject(), *md;
    cJSON_AddNumberToObject(root, "d_in", c->d_in);
    cJSON_AddNumberToObject(root, "d_sae", c->d_sae);
    cJSON_AddStringToObject(root, "dtype", "float32");
    cJSON_AddStringToObject(root, "device", "cpu");
    cJSON_AddBoolToObject(root, "apply_b_dec_to_input", apply_b_dec);
    cJSON_AddStringToObject(root, "normalize_activations", "none"); /* the scale is folded in */
    /* SAELens flattens [.., n_heads, d_head] itself for hook_z SAEs (its pre-6.0 default) */
    cJSON_AddStringToObject(root, "reshape_activations", !tc && sae_ends_with(c->hook_name, "hook_z") ? "hook_z" : "none");
    md = cJSON_AddObjectToObject(root, "metadata");
    cJSON_AddStringToObject(md, "sae_lens_version", SAELENS_FORMAT_VERSION);
    cJSON_AddNullToObject(md, "sae_lens_training_version");
    if (c->model_name[0]) cJSON_AddStringToObject(md, "model_name", c->model_name);
    if (c->hook_name[0]) cJSON_AddStringToObject(md, "hook_name", c->hook_name);
    if (c->hook_name_out[0]) cJSON_AddStringToObject(md, "hook_name_out", c->hook_name_out);
    cJSON_AddNullToObject(md, "hook_head_index");
    if (c->context_size > 0) cJSON_AddNumberToObject(md, "context_size", c->context_size);
    if (c->arch == LP_SAE_TOPK) cJSON_AddNumberToObject(root, "k", c->k);
    if (tc) cJSON_AddNumberToObject(root, "d_out", c->d_out);
    if (c->arch == LP_SAE_JUMPRELU) /* not read by SAELens at inference; kept for loupe */
        cJSON_AddNumberToObject(root, "jumprelu_bandwidth", float_for_json(c->jumprelu_bandwidth));
    cJSON_AddStringToObject(root, "architecture", saelens_arch_name(c));
    char *txt = cJSON_Print(root);
    cJSON_Delete(root);
    if (!txt) return NULL;
    size_t n = strlen(txt);
    char *withnl = realloc(txt, n + 2);
    if (!withnl) {
        free(txt);
        return NULL;
    }
    withnl[n] = '\n', withnl[n + 1] = 0;
    return withnl;
}

static lp_status fsync_path(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) LP_FAIL(LP_ERR_IO, "%s: cannot open to flush: %s", path, strerror(errno));
    int r = fsync(fd);
    close(fd);
    if (r != 0 && errno != EINVAL) LP_FAIL(LP_ERR_WRITE, "%s: cannot flush: %s", path, strerror(errno));
    return LP_OK;
}

/* mkdir -p of the directory that will hold `path`. */
static lp_status make_parents(const char *path) {
    char p[4096];
    snprintf(p, sizeof p, "%s", path);
    char *slash = strrchr(p, '/');
    if (!slash || slash == p) return LP_OK;
    *slash = 0;
    return lp_mkdir_p(p);
}

/* Writes cfg.json and sae_weights.safetensors into dir, which exists: both under
 * temporary names, then cfg.json removed, weights renamed, cfg.json renamed. */
static lp_status write_files(const char *dir, const char *cfg, const lp_st_spec *specs, const void *const *datas, int n) {
    char *cfgp = sae_join(dir, "cfg.json"), *cfgtmp = sae_join(dir, "cfg.json.tmp"), *wp = sae_join(dir, "sae_weights.safetensors");
    lp_status st = LP_OK;
    lp_st_writer w;
    int wopen = 0, cfgtmp_made = 0;
    if (!cfgp || !cfgtmp || !wp) LP_TRY(st, done, LP_ERR(LP_ERR_OOM, "out of host memory"));
    int fd = open(cfgtmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) LP_TRY(st, done, LP_ERR(lp_write_status(errno), "%s: cannot create: %s", cfgtmp, strerror(errno)));
    cfgtmp_made = 1;
    size_t len = strlen(cfg), off = 0;
    while (off < len) {
        ssize_t k = write(fd, cfg + off, len - off);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) break;
        off += (size_t)k;
    }
    int bad = off < len || fsync(fd) != 0;
    int err = off < len && errno == 0 ? ENOSPC : errno;
    if (close(fd) != 0 && !bad) bad = 1, err = errno;
    if (bad) LP_TRY(st, done, LP_ERR(LP_ERR_WRITE, "%s: write failed: %s", cfgtmp, strerror(err)));
    LP_TRY(st, done, lp_st_writer_open(&w, wp, specs, n, NULL));
    wopen = 1;
    for (int i = 0; i < n; i++) LP_TRY(st, done, lp_st_writer_put(&w, i, 0, datas[i], w.sizes[i]));
    if (unlink(cfgp) != 0 && errno != ENOENT)
        LP_TRY(st, done, LP_ERR(LP_ERR_IO, "%s: cannot replace: %s", cfgp, strerror(errno)));
    wopen = 0;
    LP_TRY(st, done, lp_st_writer_commit(&w));
    if (rename(cfgtmp, cfgp) != 0)
        LP_TRY(st, done, LP_ERR(LP_ERR_WRITE, "%s: cannot rename to %s: %s", cfgtmp, cfgp, strerror(errno)));
    cfgtmp_made = 0;
    st = fsync_path(dir);
done:
    if (wopen) lp_st_writer_abort(&w);
    if (cfgtmp_made) unlink(cfgtmp);
    free(cfgp), free(cfgtmp), free(wp);
    return st;
}

/* The parameters as SAELens reads them (see the top of this file): b_dec folded into b_enc
 * for a transcoder that subtracts it, the scale folded, BatchTopK's global threshold in
 * every latent, W_skip transposed into skipT. Returns apply_b_dec_to_input as written. */
static int to_saelens(lp_sae *h, const lp_sae_cfg *cfg, float scale, float *skipT) {
    int apply = cfg->apply_b_dec_to_input;
    if (is_transcoder(cfg) && apply) { /* SAELens transcoders cannot subtract b_dec: fold it into b_enc */
        /* (x s - b_dec) W_enc + b_enc = x (s W_enc) + (b_enc - b_dec W_enc) */
        for (int j = 0; j < cfg->d_sae; j++) {
            double acc = h->b_enc[j];
            for (int i = 0; i < cfg->d_in; i++) acc -= (double)h->b_dec[i] * h->W_enc[(size_t)i * cfg->d_sae + j];
            h->b_enc[j] = (float)acc;
        }
        apply = 0;
    }
    /* fold the normalization factor (see the top of this file) */
    if (scale != 1.0f) {
        for (size_t i = 0; i < (size_t)cfg->d_in * cfg->d_sae; i++) h->W_enc[i] *= scale;
        if (!has_own_target(cfg)) {
            for (size_t i = 0; i < (size_t)cfg->d_sae * cfg->d_out; i++) h->W_dec[i] /= scale;
            for (int i = 0; i < cfg->d_out; i++) h->b_dec[i] /= scale;
        } else if (h->W_skip) {
            for (size_t i = 0; i < (size_t)cfg->d_in * cfg->d_out; i++) h->W_skip[i] *= scale;
        }
    }
    if (cfg->arch == LP_SAE_BATCHTOPK) /* the global threshold in every latent */
        for (int j = 1; j < cfg->d_sae; j++) h->threshold[j] = h->threshold[0];
    if (skipT) /* loupe [d_in, d_out] -> SAELens [d_out, d_in] */
        for (int i = 0; i < cfg->d_in; i++)
            for (int o = 0; o < cfg->d_out; o++) skipT[(size_t)o * cfg->d_in + i] = h->W_skip[(size_t)i * cfg->d_out + o];
    return apply;
}

/* A new directory: built under a temporary name and renamed when complete; on a failure
 * before the rename, what was written is removed. */
static lp_status write_new_dir(const char *dir, const char *json, const lp_st_spec *specs, const void *const *datas, int n) {
    LP_CHECK(make_parents(dir));
    size_t tl = strlen(dir) + 16;
    char *tmpdir = malloc(tl);
    if (!tmpdir) return LP_ERR(LP_ERR_OOM, "out of host memory");
    snprintf(tmpdir, tl, "%s.tmp-XXXXXX", dir);
    if (!mkdtemp(tmpdir)) {
        lp_status st = LP_ERR(LP_ERR_IO, "%s: cannot create: %s", tmpdir, strerror(errno));
        free(tmpdir);
        return st;
    }
    chmod(tmpdir, 0755);
    lp_status st = write_files(tmpdir, json, specs, datas, n);
    if (st == LP_OK && rename(tmpdir, dir) != 0)
        st = LP_ERR(LP_ERR_WRITE, "%s: cannot rename to %s: %s", tmpdir, dir, strerror(errno));
    if (st != LP_OK) {
        char *a = sae_join(tmpdir, "cfg.json"), *b = sae_join(tmpdir, "sae_weights.safetensors");
        if (a) unlink(a);
        if (b) unlink(b);
        free(a), free(b);
        rmdir(tmpdir);
        free(tmpdir);
        return st;
    }
    free(tmpdir);
    char *parent = strdup(dir), *sl = parent ? strrchr(parent, '/') : NULL;
    if (parent) {
        if (sl) *sl = 0;
        fsync_path(sl ? (parent[0] ? parent : "/") : ".");
        free(parent);
    }
    return LP_OK;
}

lp_status lp_sae_save(const lp_sae *s, lp_ctx *c, const char *dir, float scale) {
    LP_CHECK(lp_sae_cfg_check(&s->cfg));
    if (!isfinite(scale) || scale <= 0)
        LP_FAIL(LP_ERR_ARG, "%s: scale = %g, must be a finite number > 0", dir, (double)scale);
    const lp_sae_cfg *cfg = &s->cfg;
    char dirbuf[4096];
    size_t dl = strlen(dir);
    while (dl > 1 && dir[dl - 1] == '/') dl--; /* "out/" names the directory "out" */
    if (dl >= sizeof dirbuf) LP_FAIL(LP_ERR_ARG, "%.64s...: path too long", dir);
    memcpy(dirbuf, dir, dl);
    dirbuf[dl] = 0;
    dir = dirbuf;
    lp_sae h = {.cfg = *cfg};
    h.n_floats = sae_carve(&h, NULL);
    float *img = malloc((h.n_floats ? h.n_floats : 1) * sizeof *img);
    float *skipT = cfg->skip ? malloc((size_t)cfg->d_in * cfg->d_out * sizeof *skipT) : NULL;
    char *json = NULL;
    lp_status st = LP_OK;
    if (!img || (cfg->skip && !skipT)) LP_TRY(st, done, LP_ERR(LP_ERR_OOM, "out of host memory"));
    sae_carve(&h, img);
    LP_TRY(st, done, lp_ctx_to_host(c, img, s->mem, h.n_floats * sizeof(float)));

    int apply = to_saelens(&h, cfg, scale, skipT);

    /* by name, as Python's safetensors orders them */
    lp_st_spec specs[6];
    const void *datas[6];
    int n = 0;
    specs[n] = (lp_st_spec){"W_dec", LP_F32, 2, {cfg->d_sae, cfg->d_out}}, datas[n++] = h.W_dec;
    specs[n] = (lp_st_spec){"W_enc", LP_F32, 2, {cfg->d_in, cfg->d_sae}}, datas[n++] = h.W_enc;
    if (skipT) specs[n] = (lp_st_spec){"W_skip", LP_F32, 2, {cfg->d_out, cfg->d_in}}, datas[n++] = skipT;
    specs[n] = (lp_st_spec){"b_dec", LP_F32, 1, {cfg->d_out}}, datas[n++] = h.b_dec;
    specs[n] = (lp_st_spec){"b_enc", LP_F32, 1, {cfg->d_sae}}, datas[n++] = h.b_enc;
    if (h.threshold) specs[n] = (lp_st_spec){"threshold", LP_F32, 1, {cfg->d_sae}}, datas[n++] = h.threshold;
    for (int i = 0; i < n; i++) {
        const float *d = datas[i];
        size_t cnt = (size_t)lp_shape_numel(specs[i].shape, specs[i].ndim);
        for (size_t k = 0; k < cnt; k++)
            if (!isfinite(d[k]))
                LP_TRY(st, done, LP_ERR(LP_ERR_ARG, "%s: refusing to write: tensor '%s' has a non-finite value (%g) at flat index %zu%s",
                                              dir, specs[i].name, (double)d[k], k, scale != 1.0f ? " after folding the scale" : ""));
    }
    json = cfg_json(cfg, apply);
    if (!json) LP_TRY(st, done, LP_ERR(LP_ERR_OOM, "out of host memory"));

    struct stat sb;
    if (stat(dir, &sb) == 0) {
        if (!S_ISDIR(sb.st_mode)) LP_TRY(st, done, LP_ERR(LP_ERR_IO, "%s: exists and is not a directory", dir));
        st = write_files(dir, json, specs, datas, n);
    } else {
        st = write_new_dir(dir, json, specs, datas, n);
    }
done:
    free(json);
    free(skipT);
    free(img);
    return st;
}
