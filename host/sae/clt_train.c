/* clt_train.c: the transcoder-set trainer (clt_train.h). The GEMMs, activations and Adam go
 * through the dispatched ops; the tanh sparsity penalty, which no op computes, is evaluated on
 * the host from copies of the features and decoders (plain memory on the CPU). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "loupe/clt_train.h"
#include "loupe/ops.h"
#include "loupe/sae_ops.h"
#include "loupe/sae_train.h"
#include "core/rng.h"

void lp_clt_train_defaults(lp_clt_train_cfg *t) {
    memset(t, 0, sizeof *t);
    t->clt.kind = LP_CLT_CROSS_LAYER, t->clt.act = LP_CLT_RELU;
    snprintf(t->clt.input_hook, sizeof t->clt.input_hook, "mlp.hook_in");
    snprintf(t->clt.output_hook, sizeof t->clt.output_hook, "hook_mlp_out");
    t->lr = 1e-3, t->adam_beta1 = 0.9, t->adam_beta2 = 0.999, t->adam_eps = 1e-8;
    t->sparsity_coefficient = 1e-3, t->sparsity_c = 1.0;
    t->jumprelu_init_threshold = 0.03, t->jumprelu_bandwidth = 0.03;
    t->tokens = 100000, t->batch_tokens = 1024, t->log_every = 50, t->seed = 0;
}

lp_status lp_clt_train_check(const lp_clt_train_cfg *t) {
    lp_status st = lp_clt_cfg_check(&t->clt);
    if (st != LP_OK) return st;
    if (t->clt.act == LP_CLT_TOPK) LP_FAIL(LP_ERR_ARG, "sae.architecture: the transcoder trainer takes relu or jumprelu, not topk");
    if (t->clt.kind == LP_CLT_CROSS_LAYER && t->clt.skip)
        LP_FAIL(LP_ERR_ARG, "sae.skip: circuit-tracer's cross-layer files have no skip connection");
    if (!t->out || !t->out[0]) LP_FAIL(LP_ERR_ARG, "train.out: required");
    if (!(t->lr > 0) || !isfinite(t->lr)) LP_FAIL(LP_ERR_ARG, "train.lr = %g, must be > 0", t->lr);
    if (!(t->adam_beta1 >= 0 && t->adam_beta1 < 1) || !(t->adam_beta2 >= 0 && t->adam_beta2 < 1))
        LP_FAIL(LP_ERR_ARG, "train.adam_beta1/2 must be in [0, 1)");
    if (!(t->sparsity_coefficient >= 0) || !isfinite(t->sparsity_coefficient))
        LP_FAIL(LP_ERR_ARG, "train.sparsity_coefficient = %g, must be >= 0", t->sparsity_coefficient);
    if (!(t->sparsity_c > 0) || !isfinite(t->sparsity_c)) LP_FAIL(LP_ERR_ARG, "train.sparsity_c = %g, must be > 0", t->sparsity_c);
    if (t->sparsity_warm_up_steps < 0) LP_FAIL(LP_ERR_ARG, "train.sparsity_warm_up_steps must be >= 0");
    if (t->clt.act == LP_CLT_JUMPRELU && (!(t->jumprelu_bandwidth > 0) || !(t->jumprelu_init_threshold >= 0)))
        LP_FAIL(LP_ERR_ARG, "sae.jumprelu_bandwidth must be > 0 and train.jumprelu_init_threshold >= 0");
    if (t->batch_tokens <= 0 || t->batch_tokens > (1 << 20)) LP_FAIL(LP_ERR_ARG, "train.batch_tokens = %d, must be in 1..2^20", t->batch_tokens);
    if (t->tokens < t->batch_tokens) LP_FAIL(LP_ERR_ARG, "train.tokens = %lld, must be >= train.batch_tokens (%d)", (long long)t->tokens, t->batch_tokens);
    if (t->log_every <= 0) LP_FAIL(LP_ERR_ARG, "train.log_every must be > 0");
    double need = (double)t->clt.n_layers * t->batch_tokens * ((double)4 * t->clt.d_model + 3.0 * t->clt.d_sae);
    if (need * 4 > 0x1p40) LP_FAIL(LP_ERR_ARG, "train.batch_tokens: %.3g bytes of batch buffers is too much", need * 4);
    return LP_OK;
}

typedef struct trainer {
    const lp_clt_train_cfg *cf;
    lp_ctx *c;
    lp_clt *t, *g, *m, *v;          /* parameters, gradients, Adam moments (same carving) */
    int L, D, S, N;
    void *mem;                      /* device batch buffers */
    float *x, *y, *pre, *f, *dy, *df, *dpre, *tmp, *negones;
    float *hx, *hy, *hf, *hdf, *hdec, *hgdec, *norms; /* host */
    double sse, var, l0, pen;       /* this step */
    float *s_in, *s_out;            /* [L]: per-layer scales of inputs and outputs (host) */
} trainer;

static float urand(uint64_t *s, float a) { return ((float)(rng_next(s) >> 40) / (float)(1 << 24) * 2.0f - 1.0f) * a; }

/* W_enc ~ U(+-1/sqrt(D)), W_dec ~ U(+-1/sqrt(S * n_out)) (the CLT paper's scales); biases 0. */
static lp_status init_params(trainer *r) {
    const lp_clt_cfg *cf = &r->t->cfg;
    float *h = malloc(r->t->n_floats * sizeof *h);
    if (!h) LP_FAIL(LP_ERR_OOM, "out of host memory");
    memset(h, 0, r->t->n_floats * sizeof *h);
    uint64_t s = r->cf->seed * 0x9E3779B97F4A7C15ull + 1;
    float *base = r->t->mem;
    size_t SD = (size_t)r->S * r->D;
    for (int l = 0; l < r->L; l++) {
        lp_clt_layer *y = &r->t->layer[l];
        float *e = h + (y->W_enc - base), *d = h + (y->W_dec - base);
        for (size_t i = 0; i < SD; i++) e[i] = urand(&s, 1.0f / sqrtf((float)r->D));
        for (size_t i = 0; i < (size_t)y->n_out * SD; i++) d[i] = urand(&s, 1.0f / sqrtf((float)r->S * y->n_out));
        if (y->threshold)
            for (int i = 0; i < r->S; i++) h[(y->threshold - base) + i] = (float)r->cf->jumprelu_init_threshold;
        (void)cf;
    }
    lp_status st = lp_ctx_to_device(r->c, base, h, r->t->n_floats * sizeof *h);
    free(h);
    return st;
}

static lp_status trainer_new(trainer *r, const lp_clt_train_cfg *cf, lp_ctx *c) {
    memset(r, 0, sizeof *r);
    r->cf = cf, r->c = c;
    r->L = cf->clt.n_layers, r->D = cf->clt.d_model, r->S = cf->clt.d_sae, r->N = cf->batch_tokens;
    LP_CHECK(lp_clt_alloc(&r->t, &cf->clt, c));
    LP_CHECK(lp_clt_alloc(&r->g, &cf->clt, c));
    LP_CHECK(lp_clt_alloc(&r->m, &cf->clt, c));
    LP_CHECK(lp_clt_alloc(&r->v, &cf->clt, c));
    size_t L = r->L, N = r->N, D = r->D, S = r->S, no = (size_t)lp_clt_n_out(r->t, 0);
    size_t nd = L * N * D, ns = L * N * S;
    size_t nf = nd * 3 + ns * 3 + N * S + (N * (D > S ? D : S)) + D;
    LP_CHECK(lp_ctx_alloc(c, nf * sizeof(float), &r->mem));
    float *p = r->mem;
    r->x = p, p += nd, r->y = p, p += nd, r->dy = p, p += nd;
    r->pre = p, p += ns, r->f = p, p += ns, r->df = p, p += ns;
    r->dpre = p, p += N * S, r->tmp = p, p += N * (D > S ? D : S), r->negones = p;
    r->hx = malloc(nd * sizeof(float)), r->hy = malloc(nd * sizeof(float));
    r->hf = malloc(N * S * sizeof(float)), r->hdf = malloc(N * S * sizeof(float));
    r->hdec = malloc(no * S * D * sizeof(float)), r->hgdec = malloc(no * S * D * sizeof(float));
    r->norms = malloc(S * sizeof(float));
    r->s_in = malloc(L * sizeof(float)), r->s_out = malloc(L * sizeof(float));
    if (!r->s_in || !r->s_out || !r->hx || !r->hy || !r->hf || !r->hdf || !r->hdec || !r->hgdec || !r->norms) LP_FAIL(LP_ERR_OOM, "out of host memory");
    for (size_t i = 0; i < N * S; i++) r->hf[i] = -1.0f; /* scratch for the constant */
    LP_CHECK(lp_ctx_to_device(c, r->negones, r->hf, D * sizeof(float)));
    return init_params(r);
}

static void trainer_free(trainer *r) {
    lp_clt_free(r->t, r->c), lp_clt_free(r->g, r->c), lp_clt_free(r->m, r->c), lp_clt_free(r->v, r->c);
    if (r->mem) lp_ctx_release(r->c, r->mem);
    free(r->hx), free(r->hy), free(r->hf), free(r->hdf), free(r->hdec), free(r->hgdec), free(r->norms);
    free(r->s_in), free(r->s_out);
}

#define XL(p, l, w) ((p) + (size_t)(l) * r->N * (w))

/* The tanh penalty of layer l and its gradients: added to df_l (device) and to the
 * gradient of W_dec_l (device), through host copies. */
static lp_status sparsity(trainer *r, int l, double lambda) {
    lp_ctx *c = r->c;
    const lp_clt_layer *y = &r->t->layer[l];
    int N = r->N, S = r->S, D = r->D, T = y->n_out;
    size_t ns = (size_t)N * S, dec = (size_t)T * S * D;
    double cc = r->cf->sparsity_c;
    LP_CHECK(lp_ctx_to_host(c, r->hf, XL(r->f, l, S), ns * 4));
    LP_CHECK(lp_ctx_to_host(c, r->hdec, y->W_dec, dec * 4));
    for (int s = 0; s < S; s++) {
        double q = 0;
        for (int t = 0; t < T; t++)
            for (int d = 0; d < D; d++) q += (double)r->hdec[((size_t)t * S + s) * D + d] * r->hdec[((size_t)t * S + s) * D + d];
        r->norms[s] = (float)sqrt(q);
    }
    /* dpen/df[n,s] = lambda/N c r_s (1 - tanh^2);  dpen/dr_s = lambda/N sum_n c f (1 - tanh^2) */
    double *dr = calloc((size_t)S, sizeof *dr);
    if (!dr) LP_FAIL(LP_ERR_OOM, "out of host memory");
    double pen = 0, k = lambda / N;
    for (size_t i = 0; i < ns; i++) {
        int s = (int)(i % (size_t)S);
        double fv = r->hf[i], th = tanh(cc * fv * r->norms[s]), sech2 = 1 - th * th;
        pen += th;
        r->l0 += fv != 0;
        r->hdf[i] = (float)(k * cc * r->norms[s] * sech2);
        dr[s] += k * cc * fv * sech2;
    }
    r->pen += k * pen;
    lp_status st = lp_ctx_to_device(c, r->tmp, r->hdf, ns * 4);
    if (st == LP_OK) st = lp_add(c, XL(r->df, l, S), XL(r->df, l, S), r->tmp, ns);
    if (st == LP_OK && lambda > 0) {
        st = lp_ctx_to_host(c, r->hgdec, r->g->layer[l].W_dec, dec * 4);
        for (int t = 0; st == LP_OK && t < T; t++)
            for (int s = 0; s < S; s++)
                if (r->norms[s] > 0)
                    for (int d = 0; d < D; d++) {
                        size_t i = ((size_t)t * S + s) * D + d;
                        r->hgdec[i] += (float)(dr[s] * r->hdec[i] / r->norms[s]);
                    }
        if (st == LP_OK) st = lp_ctx_to_device(c, r->g->layer[l].W_dec, r->hgdec, dec * 4);
    }
    free(dr);
    return st;
}

/* One step on the batch in r->x, r->y (device). */
static lp_status step(trainer *r, int64_t t_step) {
    lp_ctx *c = r->c;
    lp_clt *t = r->t, *g = r->g;
    int L = r->L, N = r->N, D = r->D, S = r->S, CL = t->cfg.kind == LP_CLT_CROSS_LAYER;
    size_t nd = (size_t)N * D, ns = (size_t)N * S;
    const float *fl[4096];
    r->sse = r->var = r->l0 = r->pen = 0;
    for (int l = 0; l < L; l++) {
        LP_CHECK(lp_clt_encode(t, c, l, XL(r->x, l, D), N, XL(r->pre, l, S), 1));
        if (t->cfg.act == LP_CLT_JUMPRELU) LP_CHECK(lp_sae_jumprelu(c, XL(r->f, l, S), XL(r->pre, l, S), t->layer[l].threshold, N, S));
        else LP_CHECK(lp_sae_relu(c, XL(r->f, l, S), XL(r->pre, l, S), ns));
        fl[l] = XL(r->f, l, S);
    }
    /* dy_j = 2/N (y_hat_j - y_j) */
    for (int j = 0; j < L; j++) {
        double sums[4];
        LP_CHECK(lp_clt_decode(t, c, j, fl, XL(r->x, j, D), N, XL(r->dy, j, D)));
        LP_CHECK(lp_sae_recon_sums(c, sums, XL(r->y, j, D), XL(r->dy, j, D), N, D));
        r->sse += sums[0], r->var += sums[1];
        LP_CHECK(lp_affine(c, r->tmp, XL(r->y, j, D), r->negones, NULL, N, D));
        LP_CHECK(lp_add(c, XL(r->dy, j, D), XL(r->dy, j, D), r->tmp, nd));
        LP_CHECK(lp_sae_scale(c, XL(r->dy, j, D), 2.0f / N, nd));
    }
    LP_CHECK(lp_ctx_memset0(c, g->mem, g->n_floats * sizeof(float)));
    double lambda = r->cf->sparsity_coefficient;
    if (r->cf->sparsity_warm_up_steps > 0 && t_step < r->cf->sparsity_warm_up_steps)
        lambda *= (double)(t_step + 1) / (double)r->cf->sparsity_warm_up_steps;
    for (int l = 0; l < L; l++) {
        lp_clt_layer *y = &t->layer[l], *gy = &g->layer[l];
        float *dfl = XL(r->df, l, S);
        for (int k = 0; k < y->n_out; k++) {
            const float *dyj = XL(r->dy, l + k, D);
            const float *W = y->W_dec + (size_t)k * S * D;
            LP_CHECK(lp_matmul_at(c, gy->W_dec + (size_t)k * S * D, fl[l], dyj, N, S, D, 0));
            LP_CHECK(lp_matmul(c, k ? r->tmp : dfl, dyj, W, NULL, N, D, S, 1));
            if (k) LP_CHECK(lp_add(c, dfl, dfl, r->tmp, ns));
        }
        LP_CHECK(lp_col_sum(c, gy->b_dec, XL(r->dy, l, D), N, D, 0));
        if (y->W_skip) LP_CHECK(lp_matmul_at(c, gy->W_skip, XL(r->dy, l, D), XL(r->x, l, D), N, D, D, 0));
        LP_CHECK(sparsity(r, l, lambda));
        if (y->threshold)
            LP_CHECK(lp_sae_jumprelu_grad(c, r->dpre, gy->threshold, dfl, XL(r->pre, l, S), y->threshold,
                                          (float)r->cf->jumprelu_bandwidth, 0.0f, N, S));
        else LP_CHECK(lp_sae_relu_grad(c, r->dpre, dfl, XL(r->pre, l, S), ns));
        LP_CHECK(lp_matmul_at(c, gy->W_enc, r->dpre, XL(r->x, l, D), N, S, D, 0));
        LP_CHECK(lp_col_sum(c, gy->b_enc, r->dpre, N, S, 0));
    }
    (void)CL;
    return lp_adam_step(c, t->mem, g->mem, r->m->mem, r->v->mem, t->n_floats, (float)r->cf->lr, (float)r->cf->adam_beta1,
                        (float)r->cf->adam_beta2, (float)r->cf->adam_eps, (int)(t_step + 1));
}

/* Activations of real models differ by orders of magnitude between layers (and their MLP
 * outputs more): every layer's inputs and outputs are trained at mean norm sqrt(D), with
 * scales taken from the first batch (SAELens's expected_average_only_in, per layer and side),
 * and the scales are folded into the weights before they are written. */
static void take_scales(trainer *r) {
    size_t N = r->N, D = r->D;
    for (int l = 0; l < r->L; l++)
        for (int side = 0; side < 2; side++) {
            const float *p = (side ? r->hy : r->hx) + (size_t)l * N * D;
            double sum = 0;
            for (size_t n = 0; n < N; n++) {
                double q = 0;
                for (size_t d = 0; d < D; d++) q += (double)p[n * D + d] * p[n * D + d];
                sum += sqrt(q);
            }
            double mean = sum / N, s = mean > 0 ? sqrt((double)D) / mean : 1.0;
            (side ? r->s_out : r->s_in)[l] = (float)s;
        }
}

static void apply_scales(trainer *r) {
    size_t ND = (size_t)r->N * r->D;
    for (int l = 0; l < r->L; l++)
        for (size_t i = 0; i < ND; i++) r->hx[l * ND + i] *= r->s_in[l], r->hy[l * ND + i] *= r->s_out[l];
}

/* pre = (s_in x) W_enc^T + b_enc: W_enc *= s_in. y = (f W_dec + b_dec (+ s_in x W_skip^T)) / s_out. */
static lp_status fold_scales(trainer *r) {
    lp_ctx *c = r->c;
    size_t SD = (size_t)r->S * r->D, DD = (size_t)r->D * r->D;
    for (int l = 0; l < r->L; l++) {
        lp_clt_layer *y = &r->t->layer[l];
        LP_CHECK(lp_sae_scale(c, y->W_enc, r->s_in[l], SD));
        for (int k = 0; k < y->n_out; k++) LP_CHECK(lp_sae_scale(c, y->W_dec + (size_t)k * SD, 1.0f / r->s_out[l + k], SD));
        LP_CHECK(lp_sae_scale(c, y->b_dec, 1.0f / r->s_out[l], (size_t)r->D));
        if (y->W_skip) LP_CHECK(lp_sae_scale(c, y->W_skip, r->s_in[l] / r->s_out[l], DD));
    }
    return LP_OK;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

lp_status lp_clt_train(const lp_clt_train_cfg *cf, lp_ctx *c, lp_clt_batch_fn next, void *user, lp_clt_train_report *rep,
                       lp_clt **trained) {
    memset(rep, 0, sizeof *rep);
    if (trained) *trained = NULL;
    LP_CHECK(lp_clt_train_check(cf));
    trainer r;
    lp_status st = trainer_new(&r, cf, c);
    int64_t steps = cf->tokens / cf->batch_tokens;
    size_t nd = (size_t)r.L * r.N * r.D;
    double t0 = now_s(), w_loss = 0, w_sse = 0, w_var = 0, w_l0 = 0;
    int64_t w_n = 0;
    for (int64_t s = 0; st == LP_OK && s < steps; s++) {
        st = next(user, r.N, r.hx, r.hy);
        if (st == LP_OK && s == 0) take_scales(&r);
        if (st == LP_OK) apply_scales(&r);
        if (st == LP_OK) st = lp_ctx_to_device(c, r.x, r.hx, nd * 4);
        if (st == LP_OK) st = lp_ctx_to_device(c, r.y, r.hy, nd * 4);
        if (st == LP_OK) st = step(&r, s);
        if (st != LP_OK) break;
        double loss = r.sse / r.N + r.pen;
        if (!isfinite(loss)) {
            st = LP_ERR(LP_ERR_ARG, "train.lr: the loss became %g at step %lld; lower train.lr", loss, (long long)s);
            break;
        }
        if (s == 0) rep->first_loss = loss;
        w_loss += loss, w_sse += r.sse, w_var += r.var, w_l0 += r.l0, w_n++;
        int last = s + 1 == steps;
        if ((s + 1) % cf->log_every == 0 || last) {
            rep->loss = w_loss / w_n, rep->mse = w_sse / (w_n * (double)r.N);
            rep->explained_variance = w_var > 0 ? 1 - w_sse / w_var : 0;
            rep->l0 = w_l0 / ((double)w_n * r.N * r.L);
            rep->steps = s + 1, rep->tokens = (s + 1) * (int64_t)r.N;
            rep->tokens_per_s = rep->tokens / fmax(now_s() - t0, 1e-9);
            if (cf->on_progress) {
                lp_train_progress p = {rep->tokens, steps * (int64_t)r.N, s + 1, steps, rep->tokens_per_s, rep->loss, rep->l0, 0, last};
                cf->on_progress(&p, cf->progress_user);
            }
            w_loss = w_sse = w_var = w_l0 = 0, w_n = 0;
        }
    }
    if (st == LP_OK) st = fold_scales(&r);
    if (st == LP_OK) st = lp_clt_save(r.t, c, cf->out);
    if (st == LP_OK && trained) *trained = r.t, r.t = NULL;
    trainer_free(&r);
    return st;
}
