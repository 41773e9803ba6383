/* host/sae/: SAEs and transcoders, above model/ and store/: their parameters and files
 * (SAELens, sparsify, Gemma Scope), running them (sae_runner.c), training from a store or
 * live from the model (sae_train*.c, sae_checkpoint.c) and evaluation (sae_eval.c).
 *
 * sae.c: SAE and transcoder parameters: the architecture names, the config check, and
 * the one device allocation that holds every parameter (see sae.h). The files are read by
 * sae_read.c (shared helpers), sae_files.c (SAELens and sparsify directories, lp_sae_load)
 * and sae_npz.c (Gemma Scope), and written by sae_save.c. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/sae.h"
#include "sae/sae_internal.h"
#include "sae/sae_read.h"

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
size_t sae_carve(lp_sae *s, float *base) {
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
    s->n_floats = sae_carve(s, NULL);
    size_t bytes = s->n_floats * sizeof(float);
    lp_status st = lp_ctx_alloc(c, bytes, &s->mem);
    if (st == LP_OK) st = lp_ctx_memset0(c, s->mem, bytes);
    if (st != LP_OK) {
        lp_sae_free(s, c);
        return st;
    }
    sae_carve(s, s->mem);
    *out = s;
    return LP_OK;
}

void lp_sae_free(lp_sae *s, lp_ctx *c) {
    if (!s) return;
    sae_runner_free(s->runner_cache);
    lp_ctx_release(c, s->scratch);
    lp_ctx_release(c, s->mem);
    free(s);
}
