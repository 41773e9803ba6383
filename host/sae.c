/* sae.c: SAE and transcoder parameters (one device allocation) and their files: the
 * SAELens layout (read and written), Gemma Scope (params.npz / params.safetensors) and
 * EleutherAI sparsify (cfg.json + sae.safetensors), read. See sae.h.
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
 * d_out != d_in) was trained on x * s to predict its raw target (as host/sae_train.c does),
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
#include "npy.h"

#define SAELENS_FORMAT_VERSION "6.5.3"

/* ---- architectures and config ---- */

static const char *const g_arch[] = {"standard", "topk", "batchtopk", "jumprelu"};

const char *lp_sae_arch_name(lp_sae_arch a) {
    return (unsigned)a < sizeof g_arch / sizeof *g_arch ? g_arch[a] : "unknown";
}

int lp_sae_arch_parse(const char *name) {
    for (int i = 0; name && i < (int)(sizeof g_arch / sizeof *g_arch); i++)
        if (strcmp(name, g_arch[i]) == 0) return i;
    return -1;
}

static int has_threshold(lp_sae_arch a) { return a == LP_SAE_JUMPRELU || a == LP_SAE_BATCHTOPK; }
/* Written with a SAELens transcoder architecture (SAELens keeps W_skip only there). */
static int is_transcoder(const lp_sae_cfg *c) { return c->d_out != c->d_in || c->skip || c->hook_name_out[0]; }
/* Reconstructs another hook than it reads (its target was not scaled in training). */
static int has_own_target(const lp_sae_cfg *c) { return c->d_out != c->d_in || c->hook_name_out[0]; }

static int str_ok(const char *s, size_t n) { return memchr(s, 0, n) != NULL; }

lp_status lp_sae_cfg_check(const lp_sae_cfg *c) {
    if (!c) LP_FAIL(LP_ERR_ARG, "sae config: NULL");
    if ((unsigned)c->arch >= sizeof g_arch / sizeof *g_arch)
        LP_FAIL(LP_ERR_ARG, "sae config: architecture %d is not standard, topk, batchtopk or jumprelu", (int)c->arch);
    if (c->d_in <= 0) LP_FAIL(LP_ERR_ARG, "sae config: d_in = %d, must be > 0", c->d_in);
    if (c->d_sae <= 0) LP_FAIL(LP_ERR_ARG, "sae config: d_sae = %d, must be > 0", c->d_sae);
    if (c->d_out <= 0) LP_FAIL(LP_ERR_ARG, "sae config: d_out = %d, must be > 0 (d_in for an SAE)", c->d_out);
    if ((c->arch == LP_SAE_TOPK || c->arch == LP_SAE_BATCHTOPK) && (c->k <= 0 || c->k > c->d_sae))
        LP_FAIL(LP_ERR_ARG, "sae config: k = %d, must be in 1..d_sae (%d) for %s", c->k, c->d_sae, lp_sae_arch_name(c->arch));
    if (c->apply_b_dec_to_input != 0 && c->apply_b_dec_to_input != 1)
        LP_FAIL(LP_ERR_ARG, "sae config: apply_b_dec_to_input = %d, must be 0 or 1", c->apply_b_dec_to_input);
    if (c->apply_b_dec_to_input && c->d_out != c->d_in)
        LP_FAIL(LP_ERR_ARG, "sae config: apply_b_dec_to_input needs d_out = d_in (b_dec has %d entries, the input %d)",
                c->d_out, c->d_in);
    if (c->skip != 0 && c->skip != 1) LP_FAIL(LP_ERR_ARG, "sae config: skip = %d, must be 0 or 1", c->skip);
    if (!isfinite(c->jumprelu_bandwidth) || c->jumprelu_bandwidth < 0)
        LP_FAIL(LP_ERR_ARG, "sae config: jumprelu_bandwidth = %g, must be finite and >= 0", (double)c->jumprelu_bandwidth);
    if (!str_ok(c->normalize, sizeof c->normalize) ||
        (strcmp(c->normalize, "none") != 0 && strcmp(c->normalize, "expected_average_only_in") != 0))
        LP_FAIL(LP_ERR_ARG, "sae config: normalize = '%.31s', must be 'none' or 'expected_average_only_in'", c->normalize);
    if (!str_ok(c->model_name, sizeof c->model_name)) LP_FAIL(LP_ERR_ARG, "sae config: model_name is not NUL-terminated");
    if (!str_ok(c->hook_name, sizeof c->hook_name)) LP_FAIL(LP_ERR_ARG, "sae config: hook_name is not NUL-terminated");
    if (!str_ok(c->hook_name_out, sizeof c->hook_name_out))
        LP_FAIL(LP_ERR_ARG, "sae config: hook_name_out is not NUL-terminated");
    if (c->context_size < 0) LP_FAIL(LP_ERR_ARG, "sae config: context_size = %d, must be >= 0", c->context_size);
    /* every parameter count (and the total, in bytes) must fit */
    double n = (double)c->d_in * c->d_sae + c->d_sae + (double)c->d_sae * c->d_out + c->d_out + c->d_sae +
               (double)c->d_in * c->d_out;
    if (n * sizeof(float) >= (double)SIZE_MAX / 2 || (double)c->d_in * c->d_sae >= 0x1p62)
        LP_FAIL(LP_ERR_ARG, "sae config: d_in %d, d_sae %d, d_out %d are too large", c->d_in, c->d_sae, c->d_out);
    return LP_OK;
}

/* ---- parameters ---- */

/* Points the parameter pointers into base (device or host memory) in the documented
 * order and returns the float count. With base NULL only the count is computed: pointer
 * arithmetic on NULL is undefined, so no pointers are formed then. */
static size_t carve(lp_sae *s, float *base) {
    const lp_sae_cfg *c = &s->cfg;
    size_t o = 0;
#define PART(field, n, present) \
    do { \
        s->field = base && (present) ? base + o : NULL; \
        if (present) o += (size_t)(n); \
    } while (0)
    PART(W_enc, (size_t)c->d_in * c->d_sae, 1);
    PART(b_enc, c->d_sae, 1);
    PART(W_dec, (size_t)c->d_sae * c->d_out, 1);
    PART(b_dec, c->d_out, 1);
    PART(threshold, c->d_sae, has_threshold(c->arch));
    PART(W_skip, (size_t)c->d_in * c->d_out, c->skip);
#undef PART
    return o;
}

lp_status lp_sae_alloc(lp_sae **out, const lp_sae_cfg *cfg, lp_ctx *c) {
    *out = NULL;
    LP_CHECK(lp_sae_cfg_check(cfg));
    lp_sae *s = calloc(1, sizeof *s);
    if (!s) LP_FAIL(LP_ERR_OOM, "out of host memory");
    s->cfg = *cfg;
    s->device = c->device;
    s->n_floats = carve(s, NULL);
    size_t bytes = s->n_floats * sizeof(float);
    lp_status st = lp_ctx_alloc(c, bytes, &s->mem);
    if (st == LP_OK) st = lp_ctx_memset0(c, s->mem, bytes);
    if (st != LP_OK) {
        lp_sae_free(s, c);
        return st;
    }
    carve(s, s->mem);
    *out = s;
    return LP_OK;
}

void lp_sae_free(lp_sae *s, lp_ctx *c) {
    if (!s) return;
    lp_ctx_release(c, s->mem);
    free(s);
}

/* ---- small helpers ---- */

static char *join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static int is_file(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}


static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* The message of the last error, prefixed: "path: <message>" (the record is reused). */
static lp_status prefix_error(lp_status st, const char *path) {
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", lp_last_error());
    return lp_set_error(st, __FILE__, __LINE__, "%s: %s", path, msg);
}

/* ---- reading tensors ---- */

/* One tensor from any source (safetensors or .npy inside .npz); lp_st_tensor's fields. */
typedef struct src_set {
    const char *path;          /* for messages */
    const lp_st_tensor *t;
    int n;
    size_t file_bytes;         /* the weights file's size: all its tensors can hold */
} src_set;

static const lp_st_tensor *src_find(const src_set *s, const char *name) {
    for (int i = 0; i < s->n; i++)
        if (strcmp(s->t[i].name, name) == 0) return &s->t[i];
    return NULL;
}

static double load_elem(const lp_st_tensor *t, size_t i) {
    const unsigned char *p = (const unsigned char *)t->data;
    switch (t->dtype) {
    case LP_F32: { float v; memcpy(&v, p + 4 * i, 4); return v; }
    case LP_F64: { double v; memcpy(&v, p + 8 * i, 8); return v; }
    case LP_BF16: { uint16_t v; memcpy(&v, p + 2 * i, 2); return lp_bf16_to_f32(v); }
    case LP_F16: { uint16_t v; memcpy(&v, p + 2 * i, 2); return lp_f16_to_f32(v); }
    default: return NAN;
    }
}

/* Copies tensor `name` (shape [rows] or [rows, cols] as it is stored) into dst as F32,
 * transposed to [cols, rows] if `transpose`. Names the tensor, its shape and the
 * expected one on failure; refuses NaN and Inf. `what` explains the expected dims. */
static lp_status take(const src_set *s, const char *name, int ndim, int64_t rows, int64_t cols, int transpose,
                      float *dst, const char *what) {
    const lp_st_tensor *t = src_find(s, name);
    char got[96], want[96];
    int64_t wshape[2] = {rows, cols};
    lp_shape_str(wshape, ndim, want, sizeof want);
    if (!t) LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' %s is missing", s->path, name, want);
    if (t->dtype != LP_F32 && t->dtype != LP_F64 && t->dtype != LP_BF16 && t->dtype != LP_F16)
        LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' has dtype %s (expected F32, F64, F16 or BF16)", s->path, name,
                lp_dtype_name(t->dtype));
    if (t->ndim != ndim || t->shape[0] != rows || (ndim == 2 && t->shape[1] != cols))
        LP_FAIL(LP_ERR_SHAPE, "%s: tensor '%s' has shape %s, expected %s %s", s->path, name,
                lp_shape_str(t->shape, t->ndim, got, sizeof got), want, what);
    size_t n = (size_t)rows * (size_t)(ndim == 2 ? cols : 1);
    for (size_t i = 0; i < n; i++) {
        double v = load_elem(t, i);
        if (!isfinite(v) || !isfinite((float)v)) {
            if (ndim == 2)
                LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' has a non-finite value (%g) at [%zu, %zu]", s->path, name, v,
                        i / (size_t)cols, i % (size_t)cols);
            LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' has a non-finite value (%g) at [%zu]", s->path, name, v, i);
        }
        if (transpose) dst[(i % (size_t)cols) * (size_t)rows + i / (size_t)cols] = (float)v;
        else dst[i] = (float)v;
    }
    return LP_OK;
}

/* The first of `names` present in s (NULL if none). */
static const char *pick(const src_set *s, const char *const *names) {
    for (int i = 0; names[i]; i++)
        if (src_find(s, names[i])) return names[i];
    return NULL;
}

/* Allocates the SAE for cfg on c, fills a host image through fill(), checks and copies it
 * over. The image uses the same carving as the device memory. */
typedef lp_status (*fill_fn)(lp_sae *host, const src_set *s, const void *arg);

/* Every weight matrix is read from a tensor of 2 bytes an element or more, so sizes (from
 * cfg.json) that need more than the weights file holds are bad input: refused before the
 * allocation they would size, which could otherwise ask for terabytes. */
static lp_status check_fits(const lp_sae_cfg *cfg, const src_set *s, const char *where) {
    double need = 2.0 * ((double)cfg->d_in * cfg->d_sae + (double)cfg->d_sae * cfg->d_out +
                         (cfg->skip ? (double)cfg->d_in * cfg->d_out : 0));
    if (need > (double)s->file_bytes)
        LP_FAIL(LP_ERR_FORMAT, "%s: d_in = %d, d_sae = %d, d_out = %d need %.0f weight bytes or more, but %s has %zu",
                where, cfg->d_in, cfg->d_sae, cfg->d_out, need, s->path, s->file_bytes);
    return LP_OK;
}

static lp_status build(lp_sae **out, lp_ctx *c, const lp_sae_cfg *cfg, const src_set *s, fill_fn fill, const void *arg,
                       const char *where) {
    lp_status st = lp_sae_cfg_check(cfg);
    if (st != LP_OK) return prefix_error(st == LP_ERR_ARG ? LP_ERR_FORMAT : st, where);
    LP_CHECK(check_fits(cfg, s, where));
    lp_sae host = {.cfg = *cfg};
    host.n_floats = carve(&host, NULL);
    float *img = calloc(host.n_floats ? host.n_floats : 1, sizeof *img);
    if (!img) LP_FAIL(LP_ERR_OOM, "%s: out of host memory for %zu parameters", where, host.n_floats);
    carve(&host, img);
    lp_sae *dev = NULL;
    LP_TRY(st, done, fill(&host, s, arg));
    LP_TRY(st, done, lp_sae_alloc(&dev, cfg, c));
    LP_TRY(st, done, lp_ctx_to_device(c, dev->mem, img, host.n_floats * sizeof(float)));
    *out = dev;
    dev = NULL;
done:
    lp_sae_free(dev, c);
    free(img);
    return st;
}

/* ---- JSON fields ---- */

static lp_status json_int(const cJSON *o, const char *key, const char *path, int required, int dflt, int *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v || cJSON_IsNull(v)) {
        if (required) LP_FAIL(LP_ERR_FORMAT, "%s: field '%s' is missing", path, key);
        *out = dflt;
        return LP_OK;
    }
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= -2147483648.0 && v->valuedouble <= 2147483647.0) ||
        v->valuedouble != (double)(int)v->valuedouble)
        LP_FAIL(LP_ERR_FORMAT, "%s: field '%s' is not an integer", path, key);
    *out = (int)v->valuedouble;
    return LP_OK;
}

static lp_status json_bool(const cJSON *o, const char *key, const char *path, int dflt, int *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v || cJSON_IsNull(v)) *out = dflt;
    else if (cJSON_IsBool(v)) *out = cJSON_IsTrue(v);
    else LP_FAIL(LP_ERR_FORMAT, "%s: field '%s' is not true or false", path, key);
    return LP_OK;
}

/* A string field copied into dst[n] ("" when absent or null). */
static lp_status json_str(const cJSON *o, const char *key, const char *path, char *dst, size_t n) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    dst[0] = 0;
    if (!v || cJSON_IsNull(v)) return LP_OK;
    if (!cJSON_IsString(v)) LP_FAIL(LP_ERR_FORMAT, "%s: field '%s' is not a string", path, key);
    if (strlen(v->valuestring) >= n)
        LP_FAIL(LP_ERR_FORMAT, "%s: field '%s' is longer than %zu bytes", path, key, n - 1);
    memcpy(dst, v->valuestring, strlen(v->valuestring) + 1);
    return LP_OK;
}

/* metadata.key if cfg.json has it there, else the top-level key (SAELens before 6.0). */
static const cJSON *meta_or_top(const cJSON *root, const char *key) {
    const cJSON *md = cJSON_GetObjectItemCaseSensitive(root, "metadata");
    if (cJSON_IsObject(md) && cJSON_GetObjectItemCaseSensitive(md, key)) return md;
    return root;
}

static cJSON *read_json(const char *path, lp_status *st) {
    size_t len = 0;
    char *txt = lp_read_file(path, &len);
    if (!txt) {
        *st = lp_set_error(LP_ERR_IO, __FILE__, __LINE__, "%s: cannot read: %s", path, strerror(errno));
        return NULL;
    }
    cJSON *root = cJSON_ParseWithLength(txt, len);
    free(txt);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        *st = lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__, "%s: not a well-formed JSON object", path);
        return NULL;
    }
    *st = LP_OK;
    return root;
}

/* ---- SAELens ---- */

typedef struct saelens_arg {
    int threshold_scalar; /* batchtopk training checkpoint: "topk_threshold" [] */
} saelens_arg;

static lp_status fill_saelens(lp_sae *h, const src_set *s, const void *argp) {
    const saelens_arg *arg = argp;
    const lp_sae_cfg *c = &h->cfg;
    LP_CHECK(take(s, "W_enc", 2, c->d_in, c->d_sae, 0, h->W_enc, "(d_in, d_sae)"));
    LP_CHECK(take(s, "b_enc", 1, c->d_sae, 0, 0, h->b_enc, "(d_sae)"));
    LP_CHECK(take(s, "W_dec", 2, c->d_sae, c->d_out, 0, h->W_dec, c->d_out == c->d_in ? "(d_sae, d_in)" : "(d_sae, d_out)"));
    LP_CHECK(take(s, "b_dec", 1, c->d_out, 0, 0, h->b_dec, c->d_out == c->d_in ? "(d_in)" : "(d_out)"));
    if (h->threshold && arg->threshold_scalar) {
        const lp_st_tensor *t = src_find(s, "topk_threshold");
        if (t->ndim != 0 && !(t->ndim == 1 && t->shape[0] == 1)) {
            char got[96];
            LP_FAIL(LP_ERR_SHAPE, "%s: tensor 'topk_threshold' has shape %s, expected a scalar", s->path,
                    lp_shape_str(t->shape, t->ndim, got, sizeof got));
        }
        double v = load_elem(t, 0);
        if (!isfinite(v)) LP_FAIL(LP_ERR_FORMAT, "%s: tensor 'topk_threshold' is not finite", s->path);
        for (int i = 0; i < c->d_sae; i++) h->threshold[i] = (float)v;
    } else if (h->threshold) {
        LP_CHECK(take(s, "threshold", 1, c->d_sae, 0, 0, h->threshold, "(d_sae)"));
    }
    if (h->W_skip) LP_CHECK(take(s, "W_skip", 2, c->d_out, c->d_in, 1, h->W_skip, "(d_out, d_in)"));
    /* an old finetuning scaling factor: harmless when all ones (SAELens drops it then) */
    const lp_st_tensor *sf = src_find(s, "scaling_factor");
    if (!sf) sf = src_find(s, "finetuning_scaling_factor");
    if (sf) {
        size_t n = (size_t)lp_shape_numel(sf->shape, sf->ndim);
        for (size_t i = 0; i < n; i++)
            if (load_elem(sf, i) != 1.0)
                LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' (a finetuning scaling factor) is not all ones; not supported",
                        s->path, sf->name);
    }
    return LP_OK;
}

/* SAELens architecture names: loupe arch, skip, transcoder. */
typedef struct arch_map { const char *name; lp_sae_arch arch; int skip, transcoder; } arch_map;
static const arch_map g_saelens_arch[] = {
    {"standard", LP_SAE_STANDARD, 0, 0},
    {"topk", LP_SAE_TOPK, 0, 0},
    {"batchtopk", LP_SAE_BATCHTOPK, 0, 0},
    {"jumprelu", LP_SAE_JUMPRELU, 0, 0},
    {"transcoder", LP_SAE_STANDARD, 0, 1},
    {"skip_transcoder", LP_SAE_STANDARD, 1, 1},
    {"jumprelu_transcoder", LP_SAE_JUMPRELU, 0, 1},
    {"jumprelu_skip_transcoder", LP_SAE_JUMPRELU, 1, 1},
    {"topk_transcoder", LP_SAE_TOPK, 0, 1},
    {"topk_skip_transcoder", LP_SAE_TOPK, 1, 1},
};

static lp_status parse_saelens_cfg(const cJSON *root, const char *path, lp_sae_cfg *c, int *batchtopk) {
    memset(c, 0, sizeof *c);
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(root, "architecture");
    const char *arch = "standard"; /* SAELens's own default for configs that lack it */
    if (a && !cJSON_IsNull(a)) {
        if (!cJSON_IsString(a)) LP_FAIL(LP_ERR_FORMAT, "%s: field 'architecture' is not a string", path);
        arch = a->valuestring;
    }
    const arch_map *m = NULL;
    for (size_t i = 0; i < sizeof g_saelens_arch / sizeof *g_saelens_arch; i++)
        if (strcmp(arch, g_saelens_arch[i].name) == 0) m = &g_saelens_arch[i];
    if (!m)
        LP_FAIL(LP_ERR_FORMAT, "%s: architecture '%.64s' is not supported (loupe reads standard, topk, batchtopk, "
                "jumprelu, transcoder, skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder)", path, arch);
    c->arch = m->arch;
    c->skip = m->skip;
    /* before SAELens 6, a TopK SAE was "standard" with activation_fn "topk" */
    const cJSON *fn = cJSON_GetObjectItemCaseSensitive(root, "activation_fn");
    if (!fn) fn = cJSON_GetObjectItemCaseSensitive(root, "activation_fn_str");
    if (cJSON_IsString(fn) && c->arch == LP_SAE_STANDARD) {
        if (strcmp(fn->valuestring, "topk") == 0) c->arch = LP_SAE_TOPK;
        else if (strcmp(fn->valuestring, "relu") != 0)
            LP_FAIL(LP_ERR_FORMAT, "%s: activation_fn '%.64s' is not supported (relu or topk)", path, fn->valuestring);
    }
    LP_CHECK(json_int(root, "d_in", path, 1, 0, &c->d_in));
    LP_CHECK(json_int(root, "d_sae", path, 1, 0, &c->d_sae));
    if (c->d_in <= 0) LP_FAIL(LP_ERR_FORMAT, "%s: field 'd_in' = %d, must be > 0", path, c->d_in);
    if (c->d_sae <= 0) LP_FAIL(LP_ERR_FORMAT, "%s: field 'd_sae' = %d, must be > 0", path, c->d_sae);
    LP_CHECK(json_int(root, "d_out", path, 0, c->d_in, &c->d_out));
    if (!m->transcoder) c->d_out = c->d_in; /* SAELens ignores d_out for an SAE */
    if (c->d_out <= 0) LP_FAIL(LP_ERR_FORMAT, "%s: field 'd_out' = %d, must be > 0", path, c->d_out);
    if (c->arch == LP_SAE_TOPK || c->arch == LP_SAE_BATCHTOPK) {
        const cJSON *kw = cJSON_GetObjectItemCaseSensitive(root, "activation_fn_kwargs");
        if (!cJSON_GetObjectItemCaseSensitive(root, "k") && cJSON_IsObject(kw))
            LP_CHECK(json_int(kw, "k", path, 1, 0, &c->k));
        else LP_CHECK(json_int(root, "k", path, 1, 0, &c->k));
        if (c->k <= 0 || c->k > c->d_sae)
            LP_FAIL(LP_ERR_FORMAT, "%s: field 'k' = %d, must be in 1..d_sae (%d)", path, c->k, c->d_sae);
    }
    LP_CHECK(json_bool(root, "apply_b_dec_to_input", path, 1, &c->apply_b_dec_to_input));
    if (c->apply_b_dec_to_input && c->d_out != c->d_in)
        LP_FAIL(LP_ERR_FORMAT, "%s: field 'apply_b_dec_to_input' is true but b_dec has d_out = %d entries, not d_in = %d",
                path, c->d_out, c->d_in);
    const cJSON *na = cJSON_GetObjectItemCaseSensitive(root, "normalize_activations");
    if (!na || cJSON_IsNull(na) || cJSON_IsFalse(na) || (cJSON_IsString(na) && strcmp(na->valuestring, "none") == 0))
        strcpy(c->normalize, "none");
    else if (cJSON_IsTrue(na) || (cJSON_IsString(na) && strcmp(na->valuestring, "expected_average_only_in") == 0))
        strcpy(c->normalize, "expected_average_only_in");
    else
        LP_FAIL(LP_ERR_FORMAT, "%s: field 'normalize_activations' = '%.64s' is not supported (none or expected_average_only_in)",
                path, cJSON_IsString(na) ? na->valuestring : "?");
    const cJSON *ra = cJSON_GetObjectItemCaseSensitive(root, "reshape_activations");
    if (ra && !cJSON_IsNull(ra) &&
        !(cJSON_IsString(ra) && (strcmp(ra->valuestring, "none") == 0 || strcmp(ra->valuestring, "hook_z") == 0)))
        LP_FAIL(LP_ERR_FORMAT, "%s: field 'reshape_activations' is not 'none' or 'hook_z'", path);
    const cJSON *bw = cJSON_GetObjectItemCaseSensitive(root, "jumprelu_bandwidth");
    c->jumprelu_bandwidth = 0.05f; /* SAELens's training default */
    if (bw && !cJSON_IsNull(bw)) {
        if (!cJSON_IsNumber(bw) || !isfinite(bw->valuedouble) || bw->valuedouble < 0)
            LP_FAIL(LP_ERR_FORMAT, "%s: field 'jumprelu_bandwidth' is not a number >= 0", path);
        c->jumprelu_bandwidth = (float)bw->valuedouble;
    }
    LP_CHECK(json_str(meta_or_top(root, "model_name"), "model_name", path, c->model_name, sizeof c->model_name));
    const cJSON *hn = meta_or_top(root, "hook_name");
    if (cJSON_GetObjectItemCaseSensitive(hn, "hook_name"))
        LP_CHECK(json_str(hn, "hook_name", path, c->hook_name, sizeof c->hook_name));
    else /* SAELens before 6.0 */
        LP_CHECK(json_str(root, "hook_point", path, c->hook_name, sizeof c->hook_name));
    LP_CHECK(json_str(meta_or_top(root, "hook_name_out"), "hook_name_out", path, c->hook_name_out, sizeof c->hook_name_out));
    LP_CHECK(json_int(meta_or_top(root, "context_size"), "context_size", path, 0, 0, &c->context_size));
    if (c->context_size < 0) LP_FAIL(LP_ERR_FORMAT, "%s: field 'context_size' = %d, must be >= 0", path, c->context_size);
    *batchtopk = m->arch == LP_SAE_BATCHTOPK;
    return LP_OK;
}

static lp_status load_saelens(lp_sae **out, lp_ctx *ctx, const char *dir) {
    char *cfgp = join(dir, "cfg.json"), *wp = join(dir, "sae_weights.safetensors");
    lp_status st = LP_OK;
    cJSON *root = NULL;
    lp_st_file f = {0};
    int open = 0;
    if (!cfgp || !wp) LP_TRY(st, done, lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of host memory"));
    root = read_json(cfgp, &st);
    if (!root) goto done;
    lp_sae_cfg cfg;
    int batchtopk = 0;
    LP_TRY(st, done, parse_saelens_cfg(root, cfgp, &cfg, &batchtopk));
    if (!is_file(wp))
        LP_TRY(st, done, lp_set_error(LP_ERR_IO, __FILE__, __LINE__, "%s: missing (cfg.json is there but not its weights)", wp));
    LP_TRY(st, done, lp_st_open(&f, wp));
    open = 1;
    src_set s = {wp, f.tensors, f.n, f.size};
    saelens_arg arg = {0};
    if (batchtopk && !lp_st_find(&f, "threshold") && lp_st_find(&f, "topk_threshold")) arg.threshold_scalar = 1;
    st = build(out, ctx, &cfg, &s, fill_saelens, &arg, cfgp);
done:
    if (open) lp_st_close(&f);
    cJSON_Delete(root);
    free(cfgp);
    free(wp);
    return st;
}

/* ---- Gemma Scope: params.npz (numpy savez: a zip of stored .npy) or params.safetensors ---- */

typedef struct npz_file {
    void *map;
    size_t size;
    lp_st_tensor *t;
    int n;
} npz_file;

static void npz_close(npz_file *z) {
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
    LP_CHECK(lp_npy_parse(p, n, what, &h));
    static const struct { const char *np; lp_dtype dt; } types[] = {
        {"<f4", LP_F32}, {"<f8", LP_F64}, {"<f2", LP_F16}, {"|f4", LP_F32}};
    int dt = -1;
    for (size_t i = 0; i < sizeof types / sizeof *types; i++)
        if (strcmp(h.descr, types[i].np) == 0) dt = (int)types[i].dt;
    if (dt < 0) LP_FAIL(LP_ERR_FORMAT, "%s has dtype '%s' (expected little-endian float)", what, h.descr);
    t->dtype = (lp_dtype)dt;
    t->ndim = h.ndim;
    memcpy(t->shape, h.shape, sizeof t->shape);
    LP_CHECK(lp_npy_data_bytes(&h, lp_dtype_size(t->dtype), what, &t->nbytes));
    t->data = p + h.data_off;
    return LP_OK;
}

/* Reads the central directory of a zip (with zip64 records, as numpy writes them) and
 * parses every stored "*.npy" entry. Compressed entries (np.savez_compressed) are refused. */
static lp_status npz_open(npz_file *z, const char *path) {
    memset(z, 0, sizeof *z);
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
    const unsigned char *b = z->map;
    size_t size = z->size, eocd = SIZE_MAX;
    size_t lo = size > 22 + 65535 ? size - 22 - 65535 : 0;
    for (size_t i = size - 22 + 1; i-- > lo;)
        if (rd(b + i, 4) == 0x06054b50) { eocd = i; break; }
    lp_status st = LP_OK;
    if (eocd == SIZE_MAX) {
        npz_close(z);
        LP_FAIL(LP_ERR_FORMAT, "%s: not a zip archive (.npz): no end-of-central-directory record (truncated?)", path);
    }
    uint64_t count = rd(b + eocd + 10, 2), cd_size = rd(b + eocd + 12, 4), cd_off = rd(b + eocd + 16, 4);
    if ((count == 0xffff || cd_size == 0xffffffff || cd_off == 0xffffffff) && eocd >= 20 &&
        rd(b + eocd - 20, 4) == 0x07064b50) {
        uint64_t z64 = rd(b + eocd - 20 + 8, 8);
        if (size < 56 || z64 > size - 56 || rd(b + z64, 4) != 0x06064b50) { /* the record is 56 bytes */
            npz_close(z);
            LP_FAIL(LP_ERR_FORMAT, "%s: bad zip64 end-of-central-directory record", path);
        }
        count = rd(b + z64 + 32, 8), cd_size = rd(b + z64 + 40, 8), cd_off = rd(b + z64 + 48, 8);
    }
    if (cd_off > size || cd_size > size - cd_off || count > cd_size / 46) {
        npz_close(z);
        LP_FAIL(LP_ERR_FORMAT, "%s: zip central directory lies outside the file (truncated?)", path);
    }
    z->t = calloc(count ? count : 1, sizeof *z->t);
    if (!z->t) {
        npz_close(z);
        LP_FAIL(LP_ERR_OOM, "out of host memory");
    }
    size_t p = (size_t)cd_off, end = (size_t)(cd_off + cd_size);
    for (uint64_t e = 0; e < count; e++) {
        if (p + 46 > end || rd(b + p, 4) != 0x02014b50) {
            st = lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__, "%s: bad zip central directory entry %llu", path,
                              (unsigned long long)e);
            break;
        }
        unsigned flags = (unsigned)rd(b + p + 8, 2), method = (unsigned)rd(b + p + 10, 2);
        uint64_t csize = rd(b + p + 20, 4), usize = rd(b + p + 24, 4), loff = rd(b + p + 42, 4);
        size_t nlen = (size_t)rd(b + p + 28, 2), xlen = (size_t)rd(b + p + 30, 2), clen = (size_t)rd(b + p + 32, 2);
        if (p + 46 + nlen + xlen + clen > end) {
            st = lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__, "%s: bad zip central directory entry %llu", path,
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
        if (!ends_with(name, ".npy")) continue;
        if (flags & 1) {
            st = lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__, "%s: entry '%s' is encrypted", path, name);
            break;
        }
        if (method != 0) {
            st = lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__,
                              "%s: entry '%s' is compressed (zip method %u); loupe reads np.savez archives, not "
                              "np.savez_compressed: re-save with np.savez or as params.safetensors", path, name, method);
            break;
        }
        if (size < 30 || loff > size - 30 || rd(b + loff, 4) != 0x04034b50) { /* the local header is 30 bytes */
            st = lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__, "%s: entry '%s' has a bad local header (truncated?)", path, name);
            break;
        }
        uint64_t data = loff + 30 + rd(b + loff + 26, 2) + rd(b + loff + 28, 2);
        if (csize != usize || data > size || usize > size - data) {
            st = lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__, "%s: entry '%s' runs past the end of the file (truncated?)",
                              path, name);
            break;
        }
        lp_st_tensor *t = &z->t[z->n];
        name[strlen(name) - 4] = 0; /* "W_enc.npy" -> "W_enc" */
        if ((st = npy_parse(path, name, b + data, (size_t)usize, t)) != LP_OK) break;
        t->name = strdup(name);
        z->n++;
    }
    if (st != LP_OK) npz_close(z);
    return st;
}

static lp_status fill_gemmascope(lp_sae *h, const src_set *s, const void *arg) {
    const lp_sae_cfg *c = &h->cfg;
    static const char *const enc[] = {"W_enc", "w_enc", NULL}, *const dec[] = {"W_dec", "w_dec", NULL};
    LP_CHECK(take(s, pick(s, enc), 2, c->d_in, c->d_sae, 0, h->W_enc, "(d_in, d_sae)"));
    LP_CHECK(take(s, "b_enc", 1, c->d_sae, 0, 0, h->b_enc, "(d_sae)"));
    LP_CHECK(take(s, pick(s, dec), 2, c->d_sae, c->d_out, 0, h->W_dec, "(d_sae, d_in)"));
    LP_CHECK(take(s, "b_dec", 1, c->d_out, 0, 0, h->b_dec, "(d_in)"));
    LP_CHECK(take(s, "threshold", 1, c->d_sae, 0, 0, h->threshold, "(d_sae)"));
    return LP_OK;
}

/* Gemma Scope JumpReLU: pre = x W_enc + b_enc, f = relu(pre) * (pre > threshold),
 * x_hat = f W_dec + b_dec; no b_dec subtraction. Sizes come from the tensors. */
static lp_status load_gemmascope(lp_sae **out, lp_ctx *ctx, const char *path) {
    int npz = ends_with(path, ".npz");
    npz_file z = {0};
    lp_st_file f = {0};
    src_set s = {path, NULL, 0, 0};
    if (npz) {
        LP_CHECK(npz_open(&z, path));
        s.t = z.t, s.n = z.n, s.file_bytes = z.size;
    } else {
        LP_CHECK(lp_st_open(&f, path));
        s.t = f.tensors, s.n = f.n, s.file_bytes = f.size;
    }
    lp_status st = LP_OK;
    static const char *const enc[] = {"W_enc", "w_enc", NULL}, *const dec[] = {"W_dec", "w_dec", NULL},
                             *const skip[] = {"W_skip", "w_skip", NULL};
    const char *en = pick(&s, enc), *dn = pick(&s, dec);
    const lp_st_tensor *we = en ? src_find(&s, en) : NULL, *wd = dn ? src_find(&s, dn) : NULL;
    lp_sae_cfg cfg = {.arch = LP_SAE_JUMPRELU, .jumprelu_bandwidth = 0.05f, .normalize = "none"};
    if (!we) st = lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__, "%s: tensor 'W_enc' is missing", path);
    else if (!wd) st = lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__, "%s: tensor 'W_dec' is missing", path);
    else if (pick(&s, skip))
        st = lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__, "%s: tensor '%s' (an affine skip) is not supported", path,
                          pick(&s, skip));
    else if (we->ndim != 2 || wd->ndim != 2 || we->shape[0] <= 0 || we->shape[1] <= 0 || we->shape[0] > 0x7fffffff ||
             we->shape[1] > 0x7fffffff || wd->shape[1] <= 0 || wd->shape[1] > 0x7fffffff) {
        char a[96], b[96];
        st = lp_set_error(LP_ERR_SHAPE, __FILE__, __LINE__, "%s: tensors '%s' %s and '%s' %s are not [d_in, d_sae] and [d_sae, d_in]",
                          path, en, lp_shape_str(we->shape, we->ndim, a, sizeof a), dn,
                          lp_shape_str(wd->shape, wd->ndim, b, sizeof b));
    } else {
        cfg.d_in = (int)we->shape[0], cfg.d_sae = (int)we->shape[1], cfg.d_out = (int)wd->shape[1];
        st = build(out, ctx, &cfg, &s, fill_gemmascope, NULL, path);
    }
    if (npz) npz_close(&z);
    else lp_st_close(&f);
    return st;
}

/* ---- sparsify (EleutherAI) ---- */

static lp_status fill_sparsify(lp_sae *h, const src_set *s, const void *arg) {
    const lp_sae_cfg *c = &h->cfg;
    LP_CHECK(take(s, "encoder.weight", 2, c->d_sae, c->d_in, 1, h->W_enc, "(num_latents, d_in)"));
    LP_CHECK(take(s, "encoder.bias", 1, c->d_sae, 0, 0, h->b_enc, "(num_latents)"));
    LP_CHECK(take(s, "W_dec", 2, c->d_sae, c->d_out, 0, h->W_dec, "(num_latents, d_in)"));
    LP_CHECK(take(s, "b_dec", 1, c->d_out, 0, 0, h->b_dec, "(d_in)"));
    if (h->W_skip) LP_CHECK(take(s, "W_skip", 2, c->d_out, c->d_in, 1, h->W_skip, "(d_in, d_in)"));
    return LP_OK;
}

/* sparsify's SparseCoder: pre = relu((x - b_dec?) encoder.weight^T + encoder.bias), the top
 * k kept; x_hat = f W_dec + b_dec (+ x W_skip^T). transcode: no b_dec subtraction. */
static lp_status load_sparsify(lp_sae **out, lp_ctx *ctx, const char *dir) {
    char *cfgp = join(dir, "cfg.json"), *wp = join(dir, "sae.safetensors");
    lp_status st = LP_OK;
    cJSON *root = NULL;
    lp_st_file f = {0};
    int open = 0;
    if (!cfgp || !wp) LP_TRY(st, done, lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of host memory"));
    root = read_json(cfgp, &st);
    if (!root) goto done;
    lp_sae_cfg cfg = {.arch = LP_SAE_TOPK, .jumprelu_bandwidth = 0.05f, .normalize = "none"};
    int num_latents, expansion, transcode, signed_;
    LP_TRY(st, done, json_int(root, "d_in", cfgp, 1, 0, &cfg.d_in));
    LP_TRY(st, done, json_int(root, "num_latents", cfgp, 0, 0, &num_latents));
    LP_TRY(st, done, json_int(root, "expansion_factor", cfgp, 0, 32, &expansion));
    LP_TRY(st, done, json_int(root, "k", cfgp, 1, 0, &cfg.k));
    LP_TRY(st, done, json_bool(root, "skip_connection", cfgp, 0, &cfg.skip));
    LP_TRY(st, done, json_bool(root, "transcode", cfgp, 0, &transcode));
    LP_TRY(st, done, json_bool(root, "signed", cfgp, 0, &signed_));
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(root, "activation");
    if (act && !(cJSON_IsString(act) && strcmp(act->valuestring, "topk") == 0))
        LP_TRY(st, done, lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__, "%s: field 'activation' = '%.32s' is not supported (topk)",
                                      cfgp, cJSON_IsString(act) ? act->valuestring : "?"));
    if (signed_) LP_TRY(st, done, lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__, "%s: field 'signed' is true; not supported", cfgp));
    if (cfg.d_in <= 0) LP_TRY(st, done, lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__, "%s: field 'd_in' = %d, must be > 0", cfgp, cfg.d_in));
    if (num_latents < 0 || (num_latents == 0 && (expansion <= 0 || (double)expansion * cfg.d_in > 0x7fffffff)))
        LP_TRY(st, done, lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__,
                                      "%s: fields 'num_latents' (%d) and 'expansion_factor' (%d) give no latent count", cfgp,
                                      num_latents, expansion));
    cfg.d_sae = num_latents ? num_latents : expansion * cfg.d_in;
    cfg.d_out = cfg.d_in;
    cfg.apply_b_dec_to_input = !transcode;
    if (cfg.k <= 0 || cfg.k > cfg.d_sae)
        LP_TRY(st, done, lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__, "%s: field 'k' = %d, must be in 1..%d", cfgp, cfg.k, cfg.d_sae));
    /* the hookpoint is the directory's name (an HF module path); the run's config.json is beside it */
    char hp[256];
    size_t e = strlen(dir);
    while (e > 1 && dir[e - 1] == '/') e--; /* "layers.3/" */
    size_t b0 = e;
    while (b0 > 0 && dir[b0 - 1] != '/') b0--;
    snprintf(hp, sizeof hp, "%.*s", (int)(e - b0), dir + b0);
    int layer;
    char tail;
    if (strcmp(hp, "embed_tokens") == 0) snprintf(cfg.hook_name, sizeof cfg.hook_name, "hook_embed");
    else if ((sscanf(hp, "layers.%d%c", &layer, &tail) == 1 || sscanf(hp, "layers_%d%c", &layer, &tail) == 1) && layer >= 0 && !transcode)
        snprintf(cfg.hook_name, sizeof cfg.hook_name, "blocks.%d.hook_resid_post", layer);
    char *parent_cfg = join(dir, "../config.json");
    if (parent_cfg && is_file(parent_cfg)) {
        lp_status pst;
        cJSON *run = read_json(parent_cfg, &pst);
        if (run) {
            const cJSON *mn = cJSON_GetObjectItemCaseSensitive(run, "model");
            if (cJSON_IsString(mn)) snprintf(cfg.model_name, sizeof cfg.model_name, "%s", mn->valuestring);
            const cJSON *cl = cJSON_GetObjectItemCaseSensitive(run, "ctx_len");
            if (cJSON_IsNumber(cl) && cl->valuedouble > 0 && cl->valuedouble < 1e9) cfg.context_size = (int)cl->valuedouble;
        }
        cJSON_Delete(run);
    }
    free(parent_cfg);
    if (!is_file(wp))
        LP_TRY(st, done, lp_set_error(LP_ERR_IO, __FILE__, __LINE__, "%s: missing (cfg.json is there but not its weights)", wp));
    LP_TRY(st, done, lp_st_open(&f, wp));
    open = 1;
    src_set s = {wp, f.tensors, f.n, f.size};
    st = build(out, ctx, &cfg, &s, fill_sparsify, NULL, cfgp);
done:
    if (open) lp_st_close(&f);
    cJSON_Delete(root);
    free(cfgp);
    free(wp);
    return st;
}

/* ---- lp_sae_load: which layout ---- */

lp_status lp_sae_load(lp_sae **out, lp_ctx *c, const char *path) {
    *out = NULL;
    struct stat sb;
    if (stat(path, &sb) != 0) LP_FAIL(LP_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    if (S_ISREG(sb.st_mode)) {
        const char *base = strrchr(path, '/');
        base = base ? base + 1 : path;
        if (strcmp(base, "cfg.json") == 0 || strcmp(base, "sae_weights.safetensors") == 0 || strcmp(base, "sae.safetensors") == 0) {
            char *dir = strndup(path, (size_t)(base - path));
            if (!dir) LP_FAIL(LP_ERR_OOM, "out of host memory");
            if (!dir[0]) {
                free(dir);
                dir = strdup(".");
            }
            lp_status st = lp_sae_load(out, c, dir);
            free(dir);
            return st;
        }
        if (ends_with(path, ".npz") || ends_with(path, ".safetensors")) return load_gemmascope(out, c, path);
        LP_FAIL(LP_ERR_FORMAT, "%s: not an SAE: expected a directory, a Gemma Scope params.npz or params.safetensors, "
                "or an SAELens/sparsify directory's cfg.json", path);
    }
    if (!S_ISDIR(sb.st_mode)) LP_FAIL(LP_ERR_IO, "%s: not a file or directory", path);
    char *cfgp = join(path, "cfg.json"), *sl = join(path, "sae_weights.safetensors"), *sp = join(path, "sae.safetensors"),
         *gst = join(path, "params.safetensors"), *gnpz = join(path, "params.npz");
    lp_status st;
    if (!cfgp || !sl || !sp || !gst || !gnpz) st = lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of host memory");
    else if (is_file(cfgp) && is_file(sp) && !is_file(sl)) st = load_sparsify(out, c, path);
    else if (is_file(cfgp) && is_file(sl)) st = load_saelens(out, c, path);
    else if (is_file(cfgp))
        st = lp_set_error(LP_ERR_IO, __FILE__, __LINE__,
                          "%s: cfg.json without its weights (sae_weights.safetensors for SAELens, sae.safetensors for sparsify)",
                          path);
    else if (is_file(gst)) st = load_gemmascope(out, c, gst);
    else if (is_file(gnpz)) st = load_gemmascope(out, c, gnpz);
    else if (is_file(sl) || is_file(sp))
        st = lp_set_error(LP_ERR_IO, __FILE__, __LINE__, "%s: no cfg.json beside the weights (an interrupted save?)", path);
    else
        st = lp_set_error(LP_ERR_IO, __FILE__, __LINE__,
                          "%s: no SAE here: expected cfg.json with sae_weights.safetensors (SAELens) or sae.safetensors "
                          "(sparsify), or params.npz / params.safetensors (Gemma Scope)", path);
    free(cfgp), free(sl), free(sp), free(gst), free(gnpz);
    return st;
}

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
    cJSON_AddStringToObject(root, "reshape_activations", !tc && ends_with(c->hook_name, "hook_z") ? "hook_z" : "none");
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
    char *cfgp = join(dir, "cfg.json"), *cfgtmp = join(dir, "cfg.json.tmp"), *wp = join(dir, "sae_weights.safetensors");
    lp_status st = LP_OK;
    lp_st_writer w;
    int wopen = 0, cfgtmp_made = 0;
    if (!cfgp || !cfgtmp || !wp) LP_TRY(st, done, lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of host memory"));
    int fd = open(cfgtmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) LP_TRY(st, done, lp_set_error(lp_write_status(errno), __FILE__, __LINE__, "%s: cannot create: %s", cfgtmp, strerror(errno)));
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
    if (bad) LP_TRY(st, done, lp_set_error(LP_ERR_WRITE, __FILE__, __LINE__, "%s: write failed: %s", cfgtmp, strerror(err)));
    LP_TRY(st, done, lp_st_writer_open(&w, wp, specs, n, NULL));
    wopen = 1;
    for (int i = 0; i < n; i++) LP_TRY(st, done, lp_st_writer_put(&w, i, 0, datas[i], w.sizes[i]));
    if (unlink(cfgp) != 0 && errno != ENOENT)
        LP_TRY(st, done, lp_set_error(LP_ERR_IO, __FILE__, __LINE__, "%s: cannot replace: %s", cfgp, strerror(errno)));
    wopen = 0;
    LP_TRY(st, done, lp_st_writer_commit(&w));
    if (rename(cfgtmp, cfgp) != 0)
        LP_TRY(st, done, lp_set_error(LP_ERR_WRITE, __FILE__, __LINE__, "%s: cannot rename to %s: %s", cfgtmp, cfgp, strerror(errno)));
    cfgtmp_made = 0;
    st = fsync_path(dir);
done:
    if (wopen) lp_st_writer_abort(&w);
    if (cfgtmp_made) unlink(cfgtmp);
    free(cfgp), free(cfgtmp), free(wp);
    return st;
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
    h.n_floats = carve(&h, NULL);
    float *img = malloc((h.n_floats ? h.n_floats : 1) * sizeof *img);
    float *skipT = cfg->skip ? malloc((size_t)cfg->d_in * cfg->d_out * sizeof *skipT) : NULL;
    char *json = NULL, *tmpdir = NULL;
    lp_status st = LP_OK;
    if (!img || (cfg->skip && !skipT)) LP_TRY(st, done, lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of host memory"));
    carve(&h, img);
    LP_TRY(st, done, lp_ctx_to_host(c, img, s->mem, h.n_floats * sizeof(float)));

    int apply = cfg->apply_b_dec_to_input;
    if (is_transcoder(cfg) && apply) { /* SAELens transcoders cannot subtract b_dec: fold it into b_enc */
        /* (x s - b_dec) W_enc + b_enc = x (s W_enc) + (b_enc - b_dec W_enc) */
        for (int j = 0; j < cfg->d_sae; j++) {
            double acc = h.b_enc[j];
            for (int i = 0; i < cfg->d_in; i++) acc -= (double)h.b_dec[i] * h.W_enc[(size_t)i * cfg->d_sae + j];
            h.b_enc[j] = (float)acc;
        }
        apply = 0;
    }
    /* fold the normalization factor (see the top of this file) */
    if (scale != 1.0f) {
        for (size_t i = 0; i < (size_t)cfg->d_in * cfg->d_sae; i++) h.W_enc[i] *= scale;
        if (!has_own_target(cfg)) {
            for (size_t i = 0; i < (size_t)cfg->d_sae * cfg->d_out; i++) h.W_dec[i] /= scale;
            for (int i = 0; i < cfg->d_out; i++) h.b_dec[i] /= scale;
        } else if (h.W_skip) {
            for (size_t i = 0; i < (size_t)cfg->d_in * cfg->d_out; i++) h.W_skip[i] *= scale;
        }
    }
    if (cfg->arch == LP_SAE_BATCHTOPK) /* the global threshold in every latent */
        for (int j = 1; j < cfg->d_sae; j++) h.threshold[j] = h.threshold[0];
    if (skipT) /* loupe [d_in, d_out] -> SAELens [d_out, d_in] */
        for (int i = 0; i < cfg->d_in; i++)
            for (int o = 0; o < cfg->d_out; o++) skipT[(size_t)o * cfg->d_in + i] = h.W_skip[(size_t)i * cfg->d_out + o];

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
                LP_TRY(st, done, lp_set_error(LP_ERR_ARG, __FILE__, __LINE__,
                                              "%s: refusing to write: tensor '%s' has a non-finite value (%g) at flat index %zu%s",
                                              dir, specs[i].name, (double)d[k], k, scale != 1.0f ? " after folding the scale" : ""));
    }
    json = cfg_json(cfg, apply);
    if (!json) LP_TRY(st, done, lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of host memory"));

    struct stat sb;
    if (stat(dir, &sb) == 0) {
        if (!S_ISDIR(sb.st_mode)) LP_TRY(st, done, lp_set_error(LP_ERR_IO, __FILE__, __LINE__, "%s: exists and is not a directory", dir));
        st = write_files(dir, json, specs, datas, n);
    } else {
        /* a new directory: build it under a temporary name, rename when complete */
        LP_TRY(st, done, make_parents(dir));
        size_t tl = strlen(dir) + 16;
        tmpdir = malloc(tl);
        if (!tmpdir) {
            st = lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of host memory");
            goto done;
        }
        snprintf(tmpdir, tl, "%s.tmp-XXXXXX", dir);
        if (!mkdtemp(tmpdir)) {
            st = lp_set_error(LP_ERR_IO, __FILE__, __LINE__, "%s: cannot create: %s", tmpdir, strerror(errno));
            free(tmpdir);
            tmpdir = NULL;
            goto done;
        }
        chmod(tmpdir, 0755);
        LP_TRY(st, done, write_files(tmpdir, json, specs, datas, n));
        if (rename(tmpdir, dir) != 0)
            LP_TRY(st, done, lp_set_error(LP_ERR_WRITE, __FILE__, __LINE__, "%s: cannot rename to %s: %s", tmpdir, dir, strerror(errno)));
        free(tmpdir);
        tmpdir = NULL;
        char *parent = strdup(dir), *sl = parent ? strrchr(parent, '/') : NULL;
        if (parent) {
            if (sl) *sl = 0;
            fsync_path(sl ? (parent[0] ? parent : "/") : ".");
            free(parent);
        }
    }
done:
    if (tmpdir) { /* failed before the rename: remove what was written */
        char *a = join(tmpdir, "cfg.json"), *b = join(tmpdir, "sae_weights.safetensors");
        if (a) unlink(a);
        if (b) unlink(b);
        free(a), free(b);
        rmdir(tmpdir);
        free(tmpdir);
    }
    free(json);
    free(skipT);
    free(img);
    return st;
}
