/* sae_files.c: SAE directories with a cfg.json: SAELens (read; sae_save.c writes it) and
 * EleutherAI sparsify, and lp_sae_load, which tells the layouts apart (Gemma Scope files go
 * to sae_npz.c). */
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
#include "io/json.h"
#include "io/npy.h"
#include "sae/sae_read.h"

/* ---- SAELens ---- */

typedef struct saelens_arg {
    int threshold_scalar; /* batchtopk training checkpoint: "topk_threshold" [] */
} saelens_arg;

static lp_status fill_saelens(lp_sae *h, const src_set *s, const void *argp) {
    const saelens_arg *arg = argp;
    const lp_sae_cfg *c = &h->cfg;
    LP_CHECK(sae_take(s, "W_enc", 2, c->d_in, c->d_sae, 0, h->W_enc, "(d_in, d_sae)"));
    LP_CHECK(sae_take(s, "b_enc", 1, c->d_sae, 0, 0, h->b_enc, "(d_sae)"));
    LP_CHECK(sae_take(s, "W_dec", 2, c->d_sae, c->d_out, 0, h->W_dec, c->d_out == c->d_in ? "(d_sae, d_in)" : "(d_sae, d_out)"));
    LP_CHECK(sae_take(s, "b_dec", 1, c->d_out, 0, 0, h->b_dec, c->d_out == c->d_in ? "(d_in)" : "(d_out)"));
    if (h->threshold && arg->threshold_scalar) {
        const lp_st_tensor *t = sae_src_find(s, "topk_threshold");
        if (t->ndim != 0 && !(t->ndim == 1 && t->shape[0] == 1)) {
            char got[96];
            LP_FAIL(LP_ERR_SHAPE, "%s: tensor 'topk_threshold' has shape %s, expected a scalar", s->path,
                    lp_shape_str(t->shape, t->ndim, got, sizeof got));
        }
        double v = sae_load_elem(t, 0);
        if (!isfinite(v)) LP_FAIL(LP_ERR_FORMAT, "%s: tensor 'topk_threshold' is not finite", s->path);
        for (int i = 0; i < c->d_sae; i++) h->threshold[i] = (float)v;
    } else if (h->threshold) {
        LP_CHECK(sae_take(s, "threshold", 1, c->d_sae, 0, 0, h->threshold, "(d_sae)"));
    }
    if (h->W_skip) LP_CHECK(sae_take(s, "W_skip", 2, c->d_out, c->d_in, 1, h->W_skip, "(d_out, d_in)"));
    /* an old finetuning scaling factor: harmless when all ones (SAELens drops it then) */
    const lp_st_tensor *sf = sae_src_find(s, "scaling_factor");
    if (!sf) sf = sae_src_find(s, "finetuning_scaling_factor");
    if (sf) {
        size_t n = (size_t)lp_shape_numel(sf->shape, sf->ndim);
        for (size_t i = 0; i < n; i++)
            if (sae_load_elem(sf, i) != 1.0)
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
    LP_CHECK(sae_json_int(root, "d_in", path, 1, 0, &c->d_in));
    LP_CHECK(sae_json_int(root, "d_sae", path, 1, 0, &c->d_sae));
    if (c->d_in <= 0) LP_FAIL(LP_ERR_FORMAT, "%s: field 'd_in' = %d, must be > 0", path, c->d_in);
    if (c->d_sae <= 0) LP_FAIL(LP_ERR_FORMAT, "%s: field 'd_sae' = %d, must be > 0", path, c->d_sae);
    LP_CHECK(sae_json_int(root, "d_out", path, 0, c->d_in, &c->d_out));
    if (!m->transcoder) c->d_out = c->d_in; /* SAELens ignores d_out for an SAE */
    if (c->d_out <= 0) LP_FAIL(LP_ERR_FORMAT, "%s: field 'd_out' = %d, must be > 0", path, c->d_out);
    if (c->arch == LP_SAE_TOPK || c->arch == LP_SAE_BATCHTOPK) {
        const cJSON *kw = cJSON_GetObjectItemCaseSensitive(root, "activation_fn_kwargs");
        if (!cJSON_GetObjectItemCaseSensitive(root, "k") && cJSON_IsObject(kw))
            LP_CHECK(sae_json_int(kw, "k", path, 1, 0, &c->k));
        else LP_CHECK(sae_json_int(root, "k", path, 1, 0, &c->k));
        if (c->k <= 0 || c->k > c->d_sae)
            LP_FAIL(LP_ERR_FORMAT, "%s: field 'k' = %d, must be in 1..d_sae (%d)", path, c->k, c->d_sae);
    }
    LP_CHECK(sae_json_bool(root, "apply_b_dec_to_input", path, 1, &c->apply_b_dec_to_input));
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
    LP_CHECK(sae_json_str(sae_meta_or_top(root, "model_name"), "model_name", path, c->model_name, sizeof c->model_name));
    const cJSON *hn = sae_meta_or_top(root, "hook_name");
    if (cJSON_GetObjectItemCaseSensitive(hn, "hook_name"))
        LP_CHECK(sae_json_str(hn, "hook_name", path, c->hook_name, sizeof c->hook_name));
    else /* SAELens before 6.0 */
        LP_CHECK(sae_json_str(root, "hook_point", path, c->hook_name, sizeof c->hook_name));
    LP_CHECK(sae_json_str(sae_meta_or_top(root, "hook_name_out"), "hook_name_out", path, c->hook_name_out, sizeof c->hook_name_out));
    LP_CHECK(sae_json_int(sae_meta_or_top(root, "context_size"), "context_size", path, 0, 0, &c->context_size));
    if (c->context_size < 0) LP_FAIL(LP_ERR_FORMAT, "%s: field 'context_size' = %d, must be >= 0", path, c->context_size);
    *batchtopk = m->arch == LP_SAE_BATCHTOPK;
    return LP_OK;
}

static lp_status load_saelens(lp_sae **out, lp_ctx *ctx, const char *dir) {
    char *cfgp = sae_join(dir, "cfg.json"), *wp = sae_join(dir, "sae_weights.safetensors");
    lp_status st = LP_OK;
    cJSON *root = NULL;
    lp_st_file f = {0};
    int open = 0;
    if (!cfgp || !wp) LP_TRY(st, done, LP_ERR(LP_ERR_OOM, "out of host memory"));
    LP_TRY(st, done, jcfg_open(cfgp, &root));
    lp_sae_cfg cfg;
    int batchtopk = 0;
    LP_TRY(st, done, parse_saelens_cfg(root, cfgp, &cfg, &batchtopk));
    if (!sae_is_file(wp))
        LP_TRY(st, done, LP_ERR(LP_ERR_IO, "%s: missing (cfg.json is there but not its weights)", wp));
    LP_TRY(st, done, lp_st_open(&f, wp));
    open = 1;
    src_set s = {wp, f.tensors, f.n, f.size};
    saelens_arg arg = {0};
    if (batchtopk && !lp_st_find(&f, "threshold") && lp_st_find(&f, "topk_threshold")) arg.threshold_scalar = 1;
    st = sae_build(out, ctx, &cfg, &s, fill_saelens, &arg, cfgp);
done:
    if (open) lp_st_close(&f);
    cJSON_Delete(root);
    free(cfgp);
    free(wp);
    return st;
}

/* ---- sparsify (EleutherAI) ---- */

static lp_status fill_sparsify(lp_sae *h, const src_set *s, const void *arg) {
    const lp_sae_cfg *c = &h->cfg;
    LP_CHECK(sae_take(s, "encoder.weight", 2, c->d_sae, c->d_in, 1, h->W_enc, "(num_latents, d_in)"));
    LP_CHECK(sae_take(s, "encoder.bias", 1, c->d_sae, 0, 0, h->b_enc, "(num_latents)"));
    LP_CHECK(sae_take(s, "W_dec", 2, c->d_sae, c->d_out, 0, h->W_dec, "(num_latents, d_in)"));
    LP_CHECK(sae_take(s, "b_dec", 1, c->d_out, 0, 0, h->b_dec, "(d_in)"));
    if (h->W_skip) LP_CHECK(sae_take(s, "W_skip", 2, c->d_out, c->d_in, 1, h->W_skip, "(d_in, d_in)"));
    return LP_OK;
}

/* sparsify's SparseCoder: pre = relu((x - b_dec?) encoder.weight^T + encoder.bias), the top
 * k kept; x_hat = f W_dec + b_dec (+ x W_skip^T). transcode: no b_dec subtraction. */
static lp_status load_sparsify(lp_sae **out, lp_ctx *ctx, const char *dir) {
    char *cfgp = sae_join(dir, "cfg.json"), *wp = sae_join(dir, "sae.safetensors");
    lp_status st = LP_OK;
    cJSON *root = NULL;
    lp_st_file f = {0};
    int open = 0;
    if (!cfgp || !wp) LP_TRY(st, done, LP_ERR(LP_ERR_OOM, "out of host memory"));
    LP_TRY(st, done, jcfg_open(cfgp, &root));
    lp_sae_cfg cfg = {.arch = LP_SAE_TOPK, .jumprelu_bandwidth = 0.05f, .normalize = "none"};
    int num_latents, expansion, transcode, signed_;
    LP_TRY(st, done, sae_json_int(root, "d_in", cfgp, 1, 0, &cfg.d_in));
    LP_TRY(st, done, sae_json_int(root, "num_latents", cfgp, 0, 0, &num_latents));
    LP_TRY(st, done, sae_json_int(root, "expansion_factor", cfgp, 0, 32, &expansion));
    LP_TRY(st, done, sae_json_int(root, "k", cfgp, 1, 0, &cfg.k));
    LP_TRY(st, done, sae_json_bool(root, "skip_connection", cfgp, 0, &cfg.skip));
    LP_TRY(st, done, sae_json_bool(root, "transcode", cfgp, 0, &transcode));
    LP_TRY(st, done, sae_json_bool(root, "signed", cfgp, 0, &signed_));
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(root, "activation");
    if (act && !(cJSON_IsString(act) && strcmp(act->valuestring, "topk") == 0))
        LP_TRY(st, done, LP_ERR(LP_ERR_FORMAT, "%s: field 'activation' = '%.32s' is not supported (topk)",
                                      cfgp, cJSON_IsString(act) ? act->valuestring : "?"));
    if (signed_) LP_TRY(st, done, LP_ERR(LP_ERR_FORMAT, "%s: field 'signed' is true; not supported", cfgp));
    if (cfg.d_in <= 0) LP_TRY(st, done, LP_ERR(LP_ERR_FORMAT, "%s: field 'd_in' = %d, must be > 0", cfgp, cfg.d_in));
    if (num_latents < 0 || (num_latents == 0 && (expansion <= 0 || (double)expansion * cfg.d_in > 0x7fffffff)))
        LP_TRY(st, done, LP_ERR(LP_ERR_FORMAT, "%s: fields 'num_latents' (%d) and 'expansion_factor' (%d) give no latent count", cfgp,
                                      num_latents, expansion));
    cfg.d_sae = num_latents ? num_latents : expansion * cfg.d_in;
    cfg.d_out = cfg.d_in;
    cfg.apply_b_dec_to_input = !transcode;
    if (cfg.k <= 0 || cfg.k > cfg.d_sae)
        LP_TRY(st, done, LP_ERR(LP_ERR_FORMAT, "%s: field 'k' = %d, must be in 1..%d", cfgp, cfg.k, cfg.d_sae));
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
    char *parent_cfg = sae_join(dir, "../config.json");
    if (parent_cfg && sae_is_file(parent_cfg)) {
        cJSON *run = NULL;
        if (jcfg_open(parent_cfg, &run) == LP_OK) {
            const cJSON *mn = cJSON_GetObjectItemCaseSensitive(run, "model");
            if (cJSON_IsString(mn)) snprintf(cfg.model_name, sizeof cfg.model_name, "%s", mn->valuestring);
            const cJSON *cl = cJSON_GetObjectItemCaseSensitive(run, "ctx_len");
            if (cJSON_IsNumber(cl) && cl->valuedouble > 0 && cl->valuedouble < 1e9) cfg.context_size = (int)cl->valuedouble;
        }
        cJSON_Delete(run);
    }
    free(parent_cfg);
    if (!sae_is_file(wp))
        LP_TRY(st, done, LP_ERR(LP_ERR_IO, "%s: missing (cfg.json is there but not its weights)", wp));
    LP_TRY(st, done, lp_st_open(&f, wp));
    open = 1;
    src_set s = {wp, f.tensors, f.n, f.size};
    st = sae_build(out, ctx, &cfg, &s, fill_sparsify, NULL, cfgp);
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
                if (!(dir = strdup("."))) LP_FAIL(LP_ERR_OOM, "out of host memory");
            }
            lp_status st = lp_sae_load(out, c, dir);
            free(dir);
            return st;
        }
        if (sae_ends_with(path, ".npz") || sae_ends_with(path, ".safetensors")) return sae_load_gemmascope(out, c, path);
        LP_FAIL(LP_ERR_FORMAT, "%s: not an SAE: expected a directory, a Gemma Scope params.npz or params.safetensors, "
                "or an SAELens/sparsify directory's cfg.json", path);
    }
    if (!S_ISDIR(sb.st_mode)) LP_FAIL(LP_ERR_IO, "%s: not a file or directory", path);
    char *cfgp = sae_join(path, "cfg.json"), *sl = sae_join(path, "sae_weights.safetensors"), *sp = sae_join(path, "sae.safetensors"),
         *gst = sae_join(path, "params.safetensors"), *gnpz = sae_join(path, "params.npz");
    lp_status st;
    if (!cfgp || !sl || !sp || !gst || !gnpz) st = LP_ERR(LP_ERR_OOM, "out of host memory");
    else if (sae_is_file(cfgp) && sae_is_file(sp) && !sae_is_file(sl)) st = load_sparsify(out, c, path);
    else if (sae_is_file(cfgp) && sae_is_file(sl)) st = load_saelens(out, c, path);
    else if (sae_is_file(cfgp))
        st = LP_ERR(LP_ERR_IO, "%s: cfg.json without its weights (sae_weights.safetensors for SAELens, sae.safetensors for sparsify)",
                          path);
    else if (sae_is_file(gst)) st = sae_load_gemmascope(out, c, gst);
    else if (sae_is_file(gnpz)) st = sae_load_gemmascope(out, c, gnpz);
    else if (sae_is_file(sl) || sae_is_file(sp))
        st = LP_ERR(LP_ERR_IO, "%s: no cfg.json beside the weights (an interrupted save?)", path);
    else
        st = LP_ERR(LP_ERR_IO, "%s: no SAE here: expected cfg.json with sae_weights.safetensors (SAELens) or sae.safetensors "
                          "(sparsify), or params.npz / params.safetensors (Gemma Scope)", path);
    free(cfgp), free(sl), free(sp), free(gst), free(gnpz);
    return st;
}
