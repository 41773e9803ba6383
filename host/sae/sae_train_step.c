/* sae_train_step.c: the math of SAE training: schedules, parameter and data-statistics
 * initialisation (b_dec, activation scale), and one Adam step with its losses. */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "loupe/hooks.h"
#include "loupe/ops.h"
#include "loupe/output.h"
#include "loupe/safetensors.h"
#include "loupe/sae_ops.h"
#include "loupe/sae_train.h"
#include "loupe/store.h"
#include "core/rng.h"
#include "sae/sae_internal.h"
#include "sae/sae_trainer.h"

double sae_lr_at(const lp_sae_train_cfg *t, int64_t step, int64_t total) {
    double lr = t->lr;
    if (step < t->lr_warm_up_steps) return lr * (double)(step + 1) / (double)t->lr_warm_up_steps;
    int64_t decay0 = total - t->lr_decay_steps;
    if (t->lr_decay_steps > 0 && step >= decay0 && strcmp(t->lr_scheduler, "constant") != 0) {
        double p = (double)(step - decay0) / (double)t->lr_decay_steps;
        if (strcmp(t->lr_scheduler, "linear") == 0) return lr * (1 - p);
        return lr * 0.5 * (1 + cos(M_PI * p));
    }
    return lr;
}

/* Decoder rows with Kaiming-uniform entries, normalised to unit length; the encoder their
 * transpose (SAELens's init_encoder_as_decoder_transpose). */
lp_status sae_init_params(trainer *tr) {
    lp_sae *s = tr->s;
    const lp_sae_cfg *cf = &s->cfg;
    size_t S = cf->d_sae, D = cf->d_in, Do = cf->d_out, s0 = tr->s0, S_all = tr->full.d_sae;
    /* a latent shard (sae_shard.c): the rows of the whole SAE's draw, its own kept */
    float *wd = malloc(S * Do * sizeof(float)), *we = malloc(D * S * sizeof(float)), *spare = malloc(Do * sizeof(float)); /* another shard's row */
    lp_status st = wd && we && spare ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory");
    uint64_t rng = tr->t->seed ^ 0xD1B54A32D192ED03ull;
    double bound = 1.0 / sqrt((double)Do);
    for (size_t gi = 0; st == LP_OK && gi < S_all; gi++) {
        float *row = gi >= s0 && gi < s0 + S ? wd + (gi - s0) * Do : spare;
        double nrm = 0;
        for (size_t j = 0; j < Do; j++) {
            double u = rng_uniform(&rng);
            row[j] = (float)((2 * u - 1) * bound);
            nrm += (double)row[j] * row[j];
        }
        nrm = sqrt(nrm);
        for (size_t j = 0; j < Do; j++) row[j] = (float)(row[j] / nrm);
    }
    free(spare);
    /* W_enc [D, S] = W_dec^T (for a transcoder, the first min(D, Do) rows of it). Where many
     * latents fire at once (all but topk), SAELens's decoder_init_norm of 0.1 keeps the first
     * reconstructions from being d_sae/d_in times too large; with a unit-norm decoder that
     * factor goes on the encoder. */
    float g = cf->arch == LP_SAE_TOPK ? 1.0f : 0.1f;
    for (size_t d = 0; st == LP_OK && d < D; d++)
        for (size_t i = 0; i < S; i++) we[d * S + i] = d < Do ? g * wd[i * Do + d] : 0.0f;
    if (st == LP_OK) st = lp_ctx_to_device(tr->c, s->W_dec, wd, S * Do * 4);
    if (st == LP_OK) st = lp_ctx_to_device(tr->c, s->W_enc, we, D * S * 4);
    if (st == LP_OK && s->threshold && cf->arch == LP_SAE_JUMPRELU) {
        for (size_t i = 0; i < S; i++) wd[i] = (float)tr->t->jumprelu_init_threshold;
        st = lp_ctx_to_device(tr->c, s->threshold, wd, S * 4);
    }
    free(wd);
    free(we);
    return st;
}

/* Scale (expected_average_only_in: E||x|| = sqrt(d_in) after scaling) and b_dec from the
 * first window's tokens, before shuffling. */
lp_status sae_init_data_stats(trainer *tr) {
    const lp_sae_train_cfg *t = tr->t;
    int64_t n = tr->W < 20000 ? tr->W : 20000;
    int D = tr->D, Do = tr->Do;
    float *x = malloc((size_t)n * D * sizeof(float));
    if (!x) LP_FAIL(LP_ERR_OOM, "out of memory");
    lp_status st = sae_src_read(tr, 0, 0, n, x);
    if (st == LP_OK) st = sae_check_finite(tr, x, (size_t)n * D, D, 0, tr->s->cfg.hook_name);
    tr->scale = 1.0;
    if (st == LP_OK && strcmp(tr->s->cfg.normalize, "expected_average_only_in") == 0) {
        double sum = 0;
        for (int64_t i = 0; i < n; i++) {
            double q = 0;
            for (int d = 0; d < D; d++) q += (double)x[i * D + d] * x[i * D + d];
            sum += sqrt(q);
        }
        if (sum > 0) tr->scale = sqrt((double)D) / (sum / n);
    }
    /* b_dec lives in the output space: for a transcoder, statistics of the output hook */
    const float *src = x;
    float *y = NULL;
    int dd = D;
    if (st == LP_OK && tr->transcoder) {
        y = malloc((size_t)n * Do * sizeof(float));
        st = y ? sae_src_read(tr, 1, 0, n, y) : LP_ERR(LP_ERR_OOM, "out of memory");
        src = y, dd = Do;
    }
    double sc = tr->transcoder ? 1.0 : tr->scale;
    double *med = calloc(dd, sizeof(double));
    if (st == LP_OK && !med) st = LP_ERR(LP_ERR_OOM, "out of memory");
    if (st == LP_OK && strcmp(t->b_dec_init, "zeros") != 0) {
        for (int64_t i = 0; i < n; i++)
            for (int d = 0; d < dd; d++) med[d] += src[i * dd + d] * sc / n;
        if (strcmp(t->b_dec_init, "geometric_median") == 0) { /* Weiszfeld iterations from the mean */
            double *next = calloc(dd, sizeof(double));
            for (int it = 0; it < 100 && next; it++) {
                double wsum = 0, moved = 0;
                memset(next, 0, dd * sizeof(double));
                for (int64_t i = 0; i < n; i++) {
                    double q = 0;
                    for (int d = 0; d < dd; d++) {
                        double diff = src[i * dd + d] * sc - med[d];
                        q += diff * diff;
                    }
                    double w = 1.0 / (sqrt(q) > 1e-12 ? sqrt(q) : 1e-12);
                    wsum += w;
                    for (int d = 0; d < dd; d++) next[d] += w * src[i * dd + d] * sc;
                }
                for (int d = 0; d < dd; d++) {
                    next[d] /= wsum;
                    moved += (next[d] - med[d]) * (next[d] - med[d]);
                    med[d] = next[d];
                }
                if (sqrt(moved) < 1e-6) break;
            }
            free(next);
        }
    }
    if (st == LP_OK) {
        float *b = malloc(dd * sizeof(float));
        for (int d = 0; b && d < dd; d++) b[d] = (float)med[d];
        st = b ? lp_ctx_to_device(tr->c, tr->s->b_dec, b, (size_t)dd * 4) : LP_ERR(LP_ERR_OOM, "out of memory");
        free(b);
    }
    free(med);
    free(x);
    free(y);
    return st;
}

/* x_in = x - b_dec: d b_dec -= sum_n dx_in[n] = sum_n W_enc dpre[n] = W_enc (sum_n dpre[n]),
 * and sum_n dpre[n] is d b_enc, complete at this point (nothing else has added to it yet):
 * one matrix-vector product instead of the [N, d_in] input gradient and its column sum. */
static lp_status b_dec_through_input(trainer *tr) {
    sae_runner *r = tr->r;
    lp_ctx *c = tr->c;
    LP_CHECK(lp_matmul(c, r->nbdec, tr->gview.b_enc, tr->s->W_enc, NULL, 1, tr->S, tr->D, 1));
    if (tr->tp > 1) LP_CHECK(lp_dist_allreduce_sum_dev(tr->t->dist, LP_DIST_TP, c, r->nbdec, (size_t)tr->D)); /* over every shard's latents */
    return lp_affine(c, tr->gview.b_dec, r->nbdec, r->neg1, tr->gview.b_dec, 1, tr->D);
}

/* The gradients behind the latents: through the top-k selection, or the dense latents with
 * their sparsity penalty (L1 on decoder-norm-weighted activations, JumpReLU's L0, or
 * BatchTopK's mask), into W_enc, b_enc and (apply_b_dec_to_input) b_dec. r->dxhat holds
 * dL/dx_hat; the L1 term's sum goes to the tracking block. */
static lp_status latent_grads(trainer *tr, double l1) {
    sae_runner *r = tr->r;
    lp_sae *s = tr->s, *g = &tr->gview;
    lp_ctx *c = tr->c;
    const lp_sae_cfg *cf = &s->cfg;
    int N = tr->Nl, D = tr->D, Do = tr->Do, S = tr->S, K = r->K;
    if (cf->arch == LP_SAE_TOPK) {
        /* one set of latent-major lists serves both weight gradients (no atomics on either) */
        LP_CHECK(lp_sae_latent_lists(c, r->lists, r->idx, N, K, S));
        LP_CHECK(lp_sae_decode_sparse_grad_lists(c, r->dval, g->W_dec, r->dxhat, r->idx, r->lists, r->val, s->W_dec, N, K, Do, S));
        LP_CHECK(lp_sae_relu_grad(c, r->dval, r->dval, r->val, (size_t)N * K)); /* the relu of the top-k values */
        LP_CHECK(lp_sae_encode_sparse_grad_lists(c, g->W_enc, g->b_enc, r->xin_used, r->lists, r->dval, N, K, D, S));
        if (cf->apply_b_dec_to_input) LP_CHECK(b_dec_through_input(tr));
    } else {
        /* dense: dW_dec = f^T dx_hat, df = dx_hat W_dec^T */
        LP_CHECK(lp_matmul_at(c, g->W_dec, r->f, r->dxhat, N, S, Do, 1.0f));
        LP_CHECK(lp_matmul(c, r->df, r->dxhat, s->W_dec, NULL, N, Do, S, 1));
        if (cf->arch == LP_SAE_STANDARD) {
            /* L1 weighted by decoder norms: l1 * mean_n sum_s f ||W_dec[s]||; its W_dec gradient is
             * parallel to each row and removed below, so only df changes. One pass over [N, d_sae]
             * gives dpre, the b_enc gradient and the column sums of f for the loss. */
            LP_CHECK(lp_rows_norm(c, r->norms, s->W_dec, S, Do));
            /* r->thr (batchtopk's alone) holds the norms scaled by l1 / N: the loss wants them unscaled */
            LP_CHECK(lp_ctx_copy(c, r->thr, r->norms, (size_t)S * 4));
            LP_CHECK(lp_sae_scale(c, r->thr, (float)(l1 / N), (size_t)S));
            LP_CHECK(lp_sae_l1_relu_grad(c, r->df, g->b_enc, r->colsum, r->df, r->pre, r->thr, N, S));
            LP_CHECK(lp_sae_l1_term(c, tr->trk, r->colsum, r->norms, S)); /* the loss: l1 * that / N */
        } else if (cf->arch == LP_SAE_JUMPRELU) { /* the loss: l0_coefficient * L0 */
            LP_CHECK(lp_sae_jumprelu_grad(c, r->df, g->threshold, r->df, r->pre, s->threshold, cf->jumprelu_bandwidth,
                                          (float)(tr->t->l0_coefficient / N), N, S));
            LP_CHECK(lp_sae_relu_grad(c, r->df, r->df, r->pre, (size_t)N * S)); /* the relu in front */
        } else { /* batchtopk: the selection is a mask */
            /* colsum is scratch for the (unused) threshold pseudo-gradient */
            LP_CHECK(lp_sae_jumprelu_grad(c, r->df, r->colsum, r->df, r->pre, r->thr, 1.0f, 0.0f, N, S));
        }
        LP_CHECK(lp_matmul_at(c, g->W_enc, r->xin_used, r->df, N, D, S, 1.0f));
        if (cf->arch != LP_SAE_STANDARD) LP_CHECK(lp_col_sum(c, g->b_enc, r->df, N, S, 1.0f)); /* standard's is added above */
        if (cf->apply_b_dec_to_input) LP_CHECK(b_dec_through_input(tr));
    }
    return LP_OK;
}

/* AuxK: the dead latents' top activations reconstruct the residual y - x_hat; adds its
 * gradient, and its loss's sums to the tracking block. The selection reads the dead latents'
 * columns of pre in place (their list r->cand and its length, made on the device by
 * lp_sae_dead_update), with no masked [N, d_sae] copy, and no read of the dead count: each
 * row takes min(Ka, n_dead) latents and pads the rest of its Ka entries with value 0, which
 * add nothing to x_hat's reconstruction or to any gradient (their relu gradient is 0), so
 * the step is the one over exactly min(Ka, n_dead) latents; with no dead latent the loss is
 * 0 (lp_sae_track_step) and the gradients receive only zeros. The weight
 * w = aux_k_coefficient * min(n_dead / min(Ka, n_dead), 1) is aux_k_coefficient whenever a
 * latent is dead. Against the former masked copy (pre on dead latents, 0 elsewhere) it keeps
 * the same latents with positive values in the same order; where fewer than ka dead
 * latents are positive the copy filled up with live latents at 0 and this with dead ones
 * below 0, both of value relu = 0, which add nothing to the loss or the gradients. */
static lp_status auxk_step(trainer *tr, const float *y) {
    sae_runner *r = tr->r;
    lp_sae *s = tr->s, *g = &tr->gview;
    lp_ctx *c = tr->c;
    int N = tr->Nl, D = tr->D, Do = tr->Do, S = tr->S, ka = r->Ka;
    if (tr->tp > 1) { /* a shard's own dead latents first, then the group's best of them (sae_shard.c) */
        int kl = ka < S ? ka : S;
        LP_CHECK(lp_sae_topk_among_counted(c, r->idx_aux, r->val_aux, r->pre, r->cand, tr->trk + LP_TRK_N_DEAD, N, S, kl));
        LP_CHECK(shard_select(tr, r->idx_aux, r->val_aux, kl, ka));
    } else {
        LP_CHECK(lp_sae_topk_among_counted(c, r->idx_aux, r->val_aux, r->pre, r->cand, tr->trk + LP_TRK_N_DEAD, N, S, ka));
    }
    LP_CHECK(lp_affine(c, r->e, r->xhat, r->neg1, NULL, N, Do));
    LP_CHECK(lp_add(c, r->e, r->e, y, (size_t)N * Do)); /* e = y - x_hat, held fixed */
    LP_CHECK(lp_sae_decode_sparse(c, r->ehat, r->idx_aux, r->val_aux, s->W_dec, NULL, N, ka, Do));
    if (tr->tp > 1) LP_CHECK(lp_dist_allreduce_sum_dev(tr->t->dist, LP_DIST_TP, c, r->ehat, (size_t)N * Do));
    LP_CHECK(lp_sae_recon_sums_dev(c, tr->trk + LP_TRK_AUX, r->e, r->ehat, N, Do));
    double w = tr->t->aux_k_coefficient;
    /* d aux / d e_hat = 2 w (e_hat - e) / N */
    LP_CHECK(lp_affine(c, r->e, r->e, r->neg1, NULL, N, Do));
    LP_CHECK(lp_add(c, r->ehat, r->ehat, r->e, (size_t)N * Do));
    LP_CHECK(lp_sae_scale(c, r->ehat, (float)(2.0 * w / N), (size_t)N * Do));
    LP_CHECK(lp_sae_latent_lists(c, r->lists, r->idx_aux, N, ka, S));
    LP_CHECK(lp_sae_decode_sparse_grad_lists(c, r->dval_aux, g->W_dec, r->ehat, r->idx_aux, r->lists, r->val_aux, s->W_dec, N,
                                             ka, Do, S));
    LP_CHECK(lp_sae_relu_grad(c, r->dval_aux, r->dval_aux, r->val_aux, (size_t)N * ka));
    LP_CHECK(lp_sae_encode_sparse_grad_lists(c, g->W_enc, g->b_enc, r->xin_used, r->lists, r->dval_aux, N, ka, D, S));
    return LP_OK;
}

/* Data parallelism: each rank's gradients and losses are means over its equal slice of the
 * batch, so their average over the ranks is the global batch's mean; the sums of squares add.
 * v: this rank's mse, sparsity, aux, sse, sst (read from the tracking block), made global. */
static lp_status dp_average(trainer *tr, const float *y, double *v) {
    lp_dist *d = tr->t->dist;
    int Do = tr->Do;
    LP_CHECK(lp_dist_allreduce_sum_dev(d, LP_DIST_DP, tr->c, tr->grad, tr->s->n_floats));
    LP_CHECK(lp_sae_scale(tr->c, tr->grad, (float)(1.0 / tr->dp), tr->s->n_floats));
    LP_CHECK(lp_dist_allreduce_sum(d, LP_DIST_DP, v, 5, LP_F64));
    v[0] /= tr->dp, v[1] /= tr->dp, v[2] /= tr->dp;
    /* each rank's sst is about its own slice's mean m_r; about the global mean m (equal
     * slices of n): sst = sum_r sst_r + n (sum_r |m_r|^2 - |sum_r m_r|^2 / dp) */
    double *m = tr->ysum_host, n = tr->Nl;
    LP_CHECK(lp_col_sum(tr->c, tr->ysum, y, tr->Nl, Do, 0.0f));
    LP_CHECK(lp_ctx_to_host(tr->c, tr->ysum_f, tr->ysum, (size_t)Do * 4));
    m[Do] = 0;
    for (int j = 0; j < Do; j++) m[j] = tr->ysum_f[j] / n, m[Do] += m[j] * m[j];
    LP_CHECK(lp_dist_allreduce_sum(d, LP_DIST_DP, m, (size_t)Do + 1, LP_F64));
    double between = m[Do];
    for (int j = 0; j < Do; j++) between -= m[j] * m[j] / tr->dp;
    v[4] += n * between;
    return LP_OK;
}

/* The fire counts of this batch into the dead-latent counters (on the device; with DP the
 * counts are all-reduced first, through the host). *aux: AuxK runs this step, once some
 * latent may have gone dead_feature_window tokens without firing (since_bound; until then
 * none can be dead and the step is the one without AuxK, as before). */
static lp_status dead_latents(trainer *tr, int *aux) {
    sae_runner *r = tr->r;
    lp_ctx *c = tr->c;
    const lp_sae_cfg *cf = &tr->s->cfg;
    int N = tr->Nl, S = tr->S, K = r->K;
    int64_t window = tr->t->dead_feature_window;
    LP_CHECK(lp_ctx_memset0(c, r->counts, (size_t)S * 8));
    LP_CHECK(lp_sae_fire_counts(c, r->counts, cf->arch == LP_SAE_TOPK ? r->idx : NULL, r->val, r->f, N, K, S));
    if (tr->dp > 1) { /* the global batch's firings */
        LP_CHECK(lp_ctx_to_host(c, tr->counts_host, r->counts, (size_t)S * 8));
        LP_CHECK(lp_dist_allreduce_sum(tr->t->dist, LP_DIST_DP, tr->counts_host, (size_t)S, LP_I64));
        LP_CHECK(lp_ctx_to_device(c, r->counts, tr->counts_host, (size_t)S * 8));
    }
    int on = r->Ka > 0 && tr->t->aux_k_coefficient > 0;
    LP_CHECK(lp_sae_dead_update(c, tr->since_dev, on ? r->cand : NULL, tr->trk, r->counts, S, tr->N, window));
    tr->since_bound += tr->N; /* a counter grows by the batch at most (exact again at each log read) */
    *aux = on && tr->since_bound >= window;
    return LP_OK;
}

/* The step's figures into the tracking block (the log window's sums with them); with DP,
 * read back, made global and summed on the host instead. */
static lp_status track(trainer *tr, const float *y, double l1, int aux) {
    const lp_sae_cfg *cf = &tr->s->cfg;
    lp_sae_track_step_args a = {.step = tr->step, .n = tr->Nl, .n_global = tr->N, .l1 = l1,
                                .l0_coef = tr->t->l0_coefficient, .aux = aux, .aux_k = tr->r->Ka > 0 ? tr->r->Ka : 1,
                                .aux_coef = tr->t->aux_k_coefficient, .accumulate = !tr->host_acc,
                                /* the exported threshold: a running mean of the batch thresholds */
                                .batchtopk = cf->arch == LP_SAE_BATCHTOPK};
    a.sparse = cf->arch == LP_SAE_STANDARD ? 1 : cf->arch == LP_SAE_JUMPRELU ? 2 : 0;
    LP_CHECK(lp_sae_track_step(tr->c, tr->trk, &a));
    if (!tr->host_acc) return LP_OK;
    double *v = tr->trk_host + LP_TRK_STEP;
    LP_CHECK(lp_ctx_to_host(tr->c, v, tr->trk + LP_TRK_STEP, 6 * sizeof(double)));
    double w[5] = {v[0], v[1], v[2], v[3], v[4]};
    if (tr->dp > 1) LP_CHECK(dp_average(tr, y, w));
    memcpy(tr->step_v, w, sizeof w);
    tr->step_v[5] = v[5];
    return LP_OK;
}

/* One step: forward, losses, gradients, Adam, decoder renormalisation, dead tracking. The
 * losses go to the tracking block on the device (with host_acc to step_v). */
lp_status sae_train_step(trainer *tr, double lr, double l1) {
    sae_runner *r = tr->r;
    lp_sae *s = tr->s, *g = &tr->gview;
    lp_ctx *c = tr->c;
    const lp_sae_cfg *cf = &s->cfg;
    /* N: this rank's rows (the whole batch in one process) */
    int N = tr->Nl, D = tr->D, Do = tr->Do, S = tr->S;
    const float *y = tr->transcoder ? r->y : r->x;
    LP_CHECK(lp_ctx_memset0(c, tr->grad, s->n_floats * 4));
    LP_CHECK(tr->tp > 1 ? shard_forward(tr) : sae_runner_forward(r, N, 1));

    /* reconstruction: mse = sum_d (x_hat - y)^2, mean over tokens; dL/dx_hat = 2 (x_hat - y) / N */
    LP_CHECK(lp_sae_recon_sums_dev(c, tr->trk + LP_TRK_RECON, y, r->xhat, N, Do));
    LP_CHECK(lp_affine(c, r->dxhat, y, r->neg1, NULL, N, Do));           /* -y */
    LP_CHECK(lp_add(c, r->dxhat, r->dxhat, r->xhat, (size_t)N * Do));    /* x_hat - y */
    LP_CHECK(lp_sae_scale(c, r->dxhat, (float)(2.0 / N), (size_t)N * Do));
    LP_CHECK(lp_col_sum(c, g->b_dec, r->dxhat, N, Do, 1.0f));
    if (cf->skip) LP_CHECK(lp_matmul_at(c, g->W_skip, r->x, r->dxhat, N, D, Do, 1.0f));

    /* fired latents this batch: L0 and the dead latents (no firing for dead_feature_window tokens) */
    int aux;
    LP_CHECK(dead_latents(tr, &aux));
    LP_CHECK(latent_grads(tr, l1));
    if (aux) LP_CHECK(auxk_step(tr, y));
    if (tr->tp > 1) LP_CHECK(shard_track(tr)); /* the group's dead count, firings and L1 term */
    LP_CHECK(track(tr, y, l1, aux));

    /* unit-norm decoder: no gradient along the rows, Adam, renormalise */
    LP_CHECK(lp_rows_remove_parallel(c, g->W_dec, s->W_dec, S, Do));
    LP_CHECK(lp_adam_step(c, (float *)s->mem, tr->grad, tr->adam_m, tr->adam_v, s->n_floats, (float)lr, (float)tr->t->adam_beta1,
                          (float)tr->t->adam_beta2, (float)tr->t->adam_eps, (int)(tr->step + 1)));
    LP_CHECK(lp_rows_unit_norm(c, s->W_dec, S, Do));
    LP_CHECK(sae_runner_refresh_bf16(r)); /* the bf16 encoder copy follows the master weights */
    return LP_OK;
}

lp_status sae_loss_error(const trainer *tr, int64_t step, int is_nan) {
    const lp_sae_train_cfg *t = tr->t;
    int64_t tok = tr->tokens_done - (tr->step - step) * tr->N; /* the tokens before that step */
    LP_FAIL(LP_ERR_FORMAT, "%s: step %lld (batch of tokens %lld..%lld): the loss is %s; the last good checkpoint is kept in %s/checkpoints",
            t->out, (long long)step, (long long)tok, (long long)(tok + tr->N - 1), is_nan ? "NaN" : "infinite", t->out);
}

lp_status sae_read_track(trainer *tr) {
    double *h = tr->trk_host;
    LP_CHECK(lp_ctx_to_host(tr->c, h, tr->trk, (LP_TRK_THR_EMA + 1) * sizeof(double)));
    if (h[LP_TRK_BAD_STEP] >= 0) return sae_loss_error(tr, (int64_t)h[LP_TRK_BAD_STEP], h[LP_TRK_BAD_NAN] != 0);
    tr->r->n_dead = (int)h[LP_TRK_N_DEAD];
    tr->since_bound = (int64_t)h[LP_TRK_MAX_SINCE]; /* read after a step: the counters' largest */
    tr->thr_ema = h[LP_TRK_THR_EMA];
    if (tr->host_acc) return LP_OK;
    tr->acc_mse = h[LP_TRK_ACC_MSE], tr->acc_sse = h[LP_TRK_ACC_SSE], tr->acc_sst = h[LP_TRK_ACC_SST];
    tr->acc_l0 = h[LP_TRK_ACC_L0], tr->acc_sparsity = h[LP_TRK_ACC_SPARSE], tr->acc_aux = h[LP_TRK_ACC_AUX];
    return LP_OK;
}
