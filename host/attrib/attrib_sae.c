/* attrib_sae.c: SAE latents as attribution nodes. The SAE is not spliced into the forward:
 * with its reconstruction error as a node of its own, the spliced model computes exactly
 * the original one, so the hook's gradient from the ordinary backward gives every latent's
 * gradient as W_dec times it (see attrib.h). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/attrib.h"
#include "loupe/hooks.h"
#include "loupe/ops.h"
#include "loupe/sae.h"
#include "sae/sae_internal.h"

void lp_sae_attrib_free(lp_sae_attrib *r) {
    free(r->top), free(r->error_atp);
    r->top = NULL, r->error_atp = NULL;
}

/* Dense latents f [n, S] and reconstructions x_hat [n, D] (host F32) of x [n, D] (host). */
static lp_status sae_run(sae_runner *r, lp_ctx *c, const float *x, int n, float *f, float *xhat) {
    const lp_sae_cfg *cf = &r->s->cfg;
    int D = cf->d_in, S = cf->d_sae;
    LP_CHECK(lp_ctx_to_device(c, r->x, x, (size_t)n * D * 4));
    LP_CHECK(sae_runner_forward(r, n, 0));
    LP_CHECK(lp_ctx_to_host(c, xhat, r->xhat, (size_t)n * cf->d_out * 4));
    if (cf->arch != LP_SAE_TOPK) return lp_ctx_to_host(c, f, r->f, (size_t)n * S * 4);
    int K = r->K;
    int32_t *ix = malloc((size_t)n * K * sizeof(int32_t));
    float *v = malloc((size_t)n * K * sizeof(float));
    lp_status st = ix && v ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory");
    if (st == LP_OK) st = lp_ctx_to_host(c, ix, r->idx, (size_t)n * K * 4);
    if (st == LP_OK) st = lp_ctx_to_host(c, v, r->val, (size_t)n * K * 4);
    if (st == LP_OK) {
        memset(f, 0, (size_t)n * S * sizeof(float));
        for (size_t i = 0; i < (size_t)n * K; i++) f[(i / K) * S + ix[i]] = v[i];
    }
    free(ix), free(v);
    return st;
}

static int by_abs_atp(const void *a, const void *b) {
    float x = fabsf(((const lp_sae_node *)a)->atp), y = fabsf(((const lp_sae_node *)b)->atp);
    return x < y ? 1 : x > y ? -1 : 0;
}

lp_status lp_attrib_sae(lp_model *m, struct lp_sae *sae, lp_ctx *c, const int32_t *clean, const int32_t *corrupted, int B, int T,
                        const lp_metric *mt, int n_top, lp_sae_attrib *res) {
    const lp_sae_cfg *cf = &sae->cfg;
    const char *hook = cf->hook_name;
    if (cf->hook_name_out[0]) LP_FAIL(LP_ERR_ARG, "SAE attribution is for SAEs; '%s' is a transcoder", hook);
    int id = lp_hook_find(m, hook);
    if (id < 0) LP_FAIL(LP_ERR_NOT_FOUND, "the model has no hook '%s' (the SAE's hook_name)", hook);
    int64_t shape[LP_MAX_DIMS];
    int nd = lp_hook_shape(m, id, 1, 1, shape);
    if ((int)lp_shape_numel(shape + 2, nd - 2) != cf->d_in)
        LP_FAIL(LP_ERR_SHAPE, "'%s' has %lld values per token but the SAE's d_in is %d", hook, (long long)lp_shape_numel(shape + 2, nd - 2), cf->d_in);
    int N = B * T, D = cf->d_in, S = cf->d_sae;
    size_t ND = (size_t)N * D, NS = (size_t)N * S;
    float *xc = malloc(ND * 4), *xx = malloc(ND * 4), *gx = malloc(ND * 4), *hc = malloc(ND * 4), *hx = malloc(ND * 4);
    float *fc = malloc(NS * 4), *fx = malloc(NS * 4), *gf = malloc(NS * 4);
    double *mc = malloc(B * sizeof(double)), *mx = malloc(B * sizeof(double));
    sae_runner *r = NULL;
    void *scr = NULL;
    lp_status st = xc && xx && gx && hc && hx && fc && fx && gf && mc && mx ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory");
    for (int b = 0; b < B; b++) memset(&res[b], 0, sizeof res[b]);
    /* the hook's value on both runs, and its gradient at the corrupted run: on the model as
     * it is, so edits the caller registered would be lost; refused instead */
    for (int h = 0; st == LP_OK && h < lp_hook_count(m); h++)
        if (lp_hook_is_edited(m, h))
            st = LP_ERR(LP_ERR_ARG, "SAE attribution: %s has an edit registered; this method runs its own forwards and would "
                        "discard it (lp_hooks_clear first)", lp_hook_name(m, h));
    if (st == LP_OK) lp_hooks_clear(m);
    if (st == LP_OK) st = lp_hook_capture(m, hook, NULL, 0, NULL);
    if (st == LP_OK) st = lp_model_metric(m, clean, B, T, mt, mc);
    if (st == LP_OK) st = lp_capture_read_f32(m, hook, xc, ND);
    if (st == LP_OK) st = lp_model_grad(m, corrupted, B, T, mt, hook, mx);
    if (st == LP_OK) st = lp_capture_read_f32(m, hook, xx, ND);
    lp_tensor g;
    if (st == LP_OK) st = lp_grad_get(m, hook, &g);
    if (st == LP_OK) memcpy(gx, g.data, ND * 4);
    lp_hooks_clear(m);
    /* latents of both runs, and d metric / d f = grad_x W_dec^T */
    if (st == LP_OK) st = sae_runner_cached(sae, c, N, &r);
    if (st == LP_OK) st = sae_run(r, c, xc, N, fc, hc);
    if (st == LP_OK) st = sae_run(r, c, xx, N, fx, hx);
    if (st == LP_OK) st = sae_scratch(sae, c, (ND + NS) * 4, &scr);
    float *gdev = scr, *gfdev = gdev ? gdev + ND : NULL;
    if (st == LP_OK) st = lp_ctx_to_device(c, gdev, gx, ND * 4);
    if (st == LP_OK) st = lp_matmul(c, gfdev, gdev, sae->W_dec, NULL, N, D, S, 1);
    if (st == LP_OK) st = lp_ctx_to_host(c, gf, gfdev, NS * 4);
    for (int b = 0; st == LP_OK && b < B; b++) {
        lp_sae_attrib *o = &res[b];
        o->metric_clean = mc[b], o->metric_corrupted = mx[b];
        o->error_atp = calloc(T, sizeof(float));
        size_t cap = (size_t)(n_top > 0 ? n_top : 1);
        lp_sae_node *all = malloc((size_t)T * S * sizeof *all);
        if (!o->error_atp || !all) {
            free(all);
            st = LP_ERR(LP_ERR_OOM, "out of memory");
            break;
        }
        double total = 0;
        size_t k = 0;
        for (int t = 0; t < T; t++) {
            size_t row = (size_t)b * T + t;
            double e = 0;
            for (int d = 0; d < D; d++) { /* the error node: err = x - x_hat */
                double ec = xc[row * D + d] - hc[row * D + d], ex = xx[row * D + d] - hx[row * D + d];
                e += (ec - ex) * gx[row * D + d];
            }
            o->error_atp[t] = (float)e;
            total += e;
            for (int s = 0; s < S; s++) {
                float dfv = fc[row * S + s] - fx[row * S + s], gv = gf[row * S + s];
                total += (double)dfv * gv;
                if (dfv != 0 || fx[row * S + s] != 0) all[k++] = (lp_sae_node){t, s, dfv * gv, fx[row * S + s] * gv};
            }
        }
        qsort(all, k, sizeof *all, by_abs_atp);
        o->n_top = (int)(k < cap ? k : cap);
        lp_sae_node *top = realloc(all, (o->n_top ? o->n_top : 1) * sizeof *all);
        o->top = top ? top : all; /* shrinking cannot really fail; keep the larger block if it does */
        o->total_atp = total;
    }
    free(xc), free(xx), free(gx), free(hc), free(hx), free(fc), free(fx), free(gf), free(mc), free(mx);
    if (st != LP_OK)
        for (int b = 0; b < B; b++) lp_sae_attrib_free(&res[b]);
    return st;
}
