/* sae_eval.c: running a trained SAE: reconstruction metrics over an activation store,
 * the model's loss with the SAE spliced in at its hook, top-k latents for `loupe
 * encode`, and plain reconstruction. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/hooks.h"
#include "loupe/ops.h"
#include "loupe/sae_ops.h"
#include "loupe/sae_train.h"
#include "loupe/store.h"
#include "sae/sae_internal.h"

/* The mean of each of the Do values per token over the first n_tokens of st (buf: scratch
 * for batch tokens): total variance needs it before the pass that sums squares. */
static lp_status target_mean(lp_store *st, int64_t n_tokens, int batch, int Do, float *buf, double *mean) {
    for (int64_t t0 = 0; t0 < n_tokens; t0 += batch) {
        int n = (int)(n_tokens - t0 < batch ? n_tokens - t0 : batch);
        LP_CHECK(lp_store_read(st, t0, n, buf));
        for (int64_t i = 0; i < (int64_t)n * Do; i++) mean[i % Do] += buf[i];
    }
    for (int d = 0; d < Do; d++) mean[d] /= (double)n_tokens;
    return LP_OK;
}

/* The metrics of out from the sums over n_tokens tokens and each latent's fire count. */
static void eval_summary(lp_sae_eval *out, int64_t n_tokens, double sse, double sst, double cos, double ratio, double l1,
                         double l0, const int64_t *fired, int S) {
    double N = (double)n_tokens;
    out->n_tokens = n_tokens;
    out->mse = sse / N, out->explained_variance = sst > 0 ? 1 - sse / sst : 0, out->fvu = sst > 0 ? sse / sst : 0;
    out->l0 = l0 / N, out->l1 = l1 / N, out->cos_sim = cos / N, out->norm_ratio = ratio / N;
    for (int i = 0; i < S; i++) {
        double freq = fired[i] / N;
        out->dead += fired[i] == 0;
        out->dense += freq > 0.1;
        /* bin 0: never fired or below 1e-10; [-10,-9) -> 1, ..., [-1, 0) -> 10; 11: every token */
        int b = freq <= 0 ? 0 : (int)floor(log10(freq)) + 11;
        if (b < 0) b = 0;
        if (b > 11) b = 11;
        out->density_hist[b]++;
    }
}

lp_status lp_sae_eval_store(lp_sae *s, lp_ctx *c, const char *store, const char *hook, const char *hook_out, int64_t n_tokens,
                            int batch, lp_sae_eval *out) {
    memset(out, 0, sizeof *out);
    const lp_sae_cfg *cf = &s->cfg;
    if (batch < 1) LP_FAIL(LP_ERR_ARG, "eval.batch_tokens = %d: must be positive", batch);
    if (!hook || !hook[0]) hook = cf->hook_name;
    if ((!hook_out || !hook_out[0]) && cf->hook_name_out[0]) hook_out = cf->hook_name_out;
    lp_store *in = NULL, *os = NULL;
    LP_CHECK(lp_store_open(&in, store, hook));
    lp_status st = LP_OK;
    if (lp_store_d(in) != cf->d_in)
        st = LP_ERR(LP_ERR_SHAPE, "%s: '%s' has %d values per token but the SAE's d_in is %d", store, hook,
                          lp_store_d(in), cf->d_in);
    if (st == LP_OK && hook_out && hook_out[0]) {
        st = lp_store_open(&os, store, hook_out);
        if (st == LP_OK && lp_store_d(os) != cf->d_out)
            st = LP_ERR(LP_ERR_SHAPE, "%s: '%s' has %d values per token but the transcoder's d_out is %d", store,
                              hook_out, lp_store_d(os), cf->d_out);
    }
    if (st != LP_OK) {
        lp_store_close(in);
        lp_store_close(os);
        return st;
    }
    int64_t total = lp_store_n_tokens(in);
    if (n_tokens <= 0 || n_tokens > total) n_tokens = total;
    sae_runner *r = NULL;
    st = sae_runner_new(&r, s, c, batch, 0, 0);
    int S = cf->d_sae, D = cf->d_in, Do = cf->d_out, K = r ? r->K : 0;
    float *hx = malloc((size_t)batch * D * sizeof(float)), *hy = os ? malloc((size_t)batch * Do * sizeof(float)) : NULL;
    float *hs = malloc((size_t)(S > batch * K ? S : batch * K) * sizeof(float));
    int64_t *cnt = calloc(S, sizeof(int64_t)), *fired = calloc(S, sizeof(int64_t));
    float *ydev = NULL;
    if (st == LP_OK && (!hx || (os && !hy) || !hs || !cnt || !fired)) st = LP_ERR(LP_ERR_OOM, "out of memory");
    if (st == LP_OK && os) st = lp_ctx_alloc(c, (size_t)batch * Do * 4, (void **)&ydev);
    double sse = 0, cos = 0, ratio = 0, l1 = 0, l0 = 0;
    /* total variance needs the mean: a first pass over the targets */
    double *mean = calloc(Do, sizeof(double)), sst = 0;
    if (st == LP_OK && !mean) st = LP_ERR(LP_ERR_OOM, "out of memory");
    if (st == LP_OK) st = target_mean(os ? os : in, n_tokens, batch, Do, os ? hy : hx, mean);
    for (int64_t t0 = 0; st == LP_OK && t0 < n_tokens; t0 += batch) {
        int n = (int)(n_tokens - t0 < batch ? n_tokens - t0 : batch);
        st = lp_store_read(in, t0, n, hx);
        if (st == LP_OK && os) st = lp_store_read(os, t0, n, hy);
        for (int64_t i = 0; st == LP_OK && i < (int64_t)n * D; i++)
            if (!isfinite(hx[i])) st = LP_ERR(LP_ERR_FORMAT, "%s: '%s' has a non-finite value at token %lld", store, hook, (long long)(t0 + i / D));
        if (st == LP_OK) st = lp_ctx_to_device(c, r->x, hx, (size_t)n * D * 4);
        if (st == LP_OK && os) st = lp_ctx_to_device(c, ydev, hy, (size_t)n * Do * 4);
        if (st == LP_OK) st = sae_runner_forward(r, n, 0);
        double sums[4];
        if (st == LP_OK) st = lp_sae_recon_sums(c, sums, os ? ydev : r->x, r->xhat, n, Do);
        if (st != LP_OK) break;
        sse += sums[0], cos += sums[2], ratio += sums[3];
        const float *tgt = os ? hy : hx;
        for (int64_t i = 0; i < (int64_t)n * Do; i++) {
            double dv = tgt[i] - mean[i % Do];
            sst += dv * dv;
        }
        st = lp_ctx_memset0(c, r->counts, (size_t)S * 8);
        if (st == LP_OK) st = lp_sae_fire_counts(c, r->counts, cf->arch == LP_SAE_TOPK ? r->idx : NULL, r->val, r->f, n, K, S);
        if (st == LP_OK) st = lp_ctx_to_host(c, cnt, r->counts, (size_t)S * 8);
        if (st != LP_OK) break;
        for (int i = 0; i < S; i++) fired[i] += cnt[i], l0 += cnt[i];
        if (cf->arch == LP_SAE_TOPK) {
            st = lp_ctx_to_host(c, hs, r->val, (size_t)n * K * 4);
            for (int64_t i = 0; st == LP_OK && i < (int64_t)n * K; i++) l1 += fabs(hs[i]);
        } else {
            st = lp_col_sum(c, r->thr, r->f, n, S, 0.0f); /* thr is free scratch outside batchtopk training */
            if (st == LP_OK) st = lp_ctx_to_host(c, hs, r->thr, (size_t)S * 4);
            for (int i = 0; st == LP_OK && i < S; i++) l1 += fabs(hs[i]);
        }
    }
    if (st == LP_OK) eval_summary(out, n_tokens, sse, sst, cos, ratio, l1, l0, fired, S);
    free(mean);
    free(hx);
    free(hy);
    free(hs);
    free(cnt);
    free(fired);
    lp_ctx_release(c, ydev);
    sae_runner_free(r);
    lp_store_close(in);
    lp_store_close(os);
    return st;
}

lp_status lp_sae_reconstruct(lp_sae *s, lp_ctx *c, const float *x, int n, float *x_hat) {
    sae_runner *r;
    LP_CHECK(sae_runner_new(&r, s, c, n, 0, 0));
    lp_status st = lp_ctx_copy(c, r->x, x, (size_t)n * s->cfg.d_in * 4);
    if (st == LP_OK) st = sae_runner_forward(r, n, 0);
    if (st == LP_OK) st = lp_ctx_copy(c, x_hat, r->xhat, (size_t)n * s->cfg.d_out * 4);
    if (st == LP_OK) st = lp_ctx_sync(c);
    sae_runner_free(r);
    return st;
}

lp_status lp_sae_encode_topk_host(lp_sae *s, lp_ctx *c, const float *x, int n, int k, int32_t *idx, float *val) {
    const lp_sae_cfg *cf = &s->cfg;
    if (k < 1 || k > cf->d_sae) LP_FAIL(LP_ERR_ARG, "encode.k = %d: must be in [1, d_sae = %d]", k, cf->d_sae);
    sae_runner *r;
    LP_CHECK(sae_runner_new(&r, s, c, n, 0, 0));
    lp_status st = lp_ctx_copy(c, r->x, x, (size_t)n * cf->d_in * 4);
    if (st == LP_OK) st = sae_runner_forward(r, n, 0);
    int32_t *di = NULL;
    float *dv = NULL;
    if (st == LP_OK && cf->arch == LP_SAE_TOPK && k == r->K) {
        st = lp_ctx_to_host(c, idx, r->idx, (size_t)n * k * 4);
        if (st == LP_OK) st = lp_ctx_to_host(c, val, r->val, (size_t)n * k * 4);
    } else if (st == LP_OK) { /* the k largest activations (zeros where fewer fired) */
        const float *acts = r->f;
        if (cf->arch == LP_SAE_TOPK) { /* a different k: re-select from the pre-activations */
            acts = r->pre;
        }
        st = lp_ctx_alloc(c, (size_t)n * k * 4, (void **)&di);
        if (st == LP_OK) st = lp_ctx_alloc(c, (size_t)n * k * 4, (void **)&dv);
        if (st == LP_OK) st = lp_sae_topk(c, di, dv, acts, n, cf->d_sae, k);
        if (st == LP_OK) st = lp_ctx_to_host(c, idx, di, (size_t)n * k * 4);
        if (st == LP_OK) st = lp_ctx_to_host(c, val, dv, (size_t)n * k * 4);
    }
    lp_ctx_release(c, di);
    lp_ctx_release(c, dv);
    sae_runner_free(r);
    return st;
}

/* ---- the model with the SAE spliced in ---- */

typedef struct splice {
    sae_runner *r;
    lp_ctx *c;
    lp_status err;
} splice;

static lp_status splice_fn(const char *hook, lp_tensor *act, void *user) {
    splice *sp = user;
    sae_runner *r = sp->r;
    int64_t numel = lp_shape_numel(act->shape, act->ndim);
    int D = r->D;
    if (act->dtype != LP_F32 || act->device != r->c->device)
        LP_FAIL(LP_ERR_ARG, "%s: the SAE splice needs the model's activations in F32 on the SAE's device (use --model.dtype=f32)", hook);
    if (numel % D) LP_FAIL(LP_ERR_SHAPE, "%s: %lld values are not whole tokens of the SAE's d_in %d", hook, (long long)numel, D);
    int n = (int)(numel / D);
    if (n > r->N) LP_FAIL(LP_ERR_ARG, "%s: %d tokens exceed the splice buffer of %d", hook, n, r->N);
    LP_CHECK(lp_ctx_copy(r->c, r->x, act->data, (size_t)numel * 4));
    LP_CHECK(sae_runner_forward(r, n, 0));
    LP_CHECK(lp_ctx_copy(r->c, act->data, r->xhat, (size_t)numel * 4));
    return lp_ctx_sync(r->c);
}

/* KL(p || q) of two logit rows, in double. */
static double kl_row(const float *p, const float *q, int V) {
    double mp = -INFINITY, mq = -INFINITY, zp = 0, zq = 0, kl = 0;
    for (int v = 0; v < V; v++) mp = fmax(mp, p[v]), mq = fmax(mq, q[v]);
    for (int v = 0; v < V; v++) zp += exp(p[v] - mp), zq += exp(q[v] - mq);
    double lzp = log(zp) + mp, lzq = log(zq) + mq;
    for (int v = 0; v < V; v++) {
        double lp = p[v] - lzp, lq = q[v] - lzq;
        kl += exp(lp) * (lp - lq);
    }
    return kl;
}

lp_status lp_sae_eval_model(lp_model *m, lp_sae *s, lp_ctx *c, const int32_t *tokens, int64_t n_seq, int ctx,
                            lp_sae_splice_eval *out) {
    memset(out, 0, sizeof *out);
    const lp_sae_cfg *cf = &s->cfg;
    if (cf->hook_name_out[0]) LP_FAIL(LP_ERR_ARG, "the spliced model loss is for SAEs; '%s' is a transcoder", cf->hook_name);
    if (lp_hook_find(m, cf->hook_name) < 0) LP_FAIL(LP_ERR_NOT_FOUND, "the model has no hook '%s' (the SAE's hook_name)", cf->hook_name);
    if (ctx < 2) LP_FAIL(LP_ERR_ARG, "rows of %d tokens leave nothing to predict", ctx);
    int V = lp_model_config(m)->d_vocab;
    size_t rowsV = (size_t)ctx * V;
    float *clean = malloc(rowsV * sizeof(float));
    if (!clean) LP_FAIL(LP_ERR_OOM, "out of memory for %d x %d logits", ctx, V);
    splice sp = {.c = c};
    lp_status st = sae_runner_new(&sp.r, s, c, ctx, 0, 0);
    double ce[3] = {0}, kl[2] = {0};
    int64_t n_pred = 0;
    for (int64_t b = 0; st == LP_OK && b < n_seq; b++) {
        const int32_t *row = tokens + b * ctx;
        for (int mode = 0; mode < 3 && st == LP_OK; mode++) { /* clean, SAE spliced, zero-ablated */
            lp_hooks_clear(m);
            if (mode == 1) {
                lp_edit_spec e = {.fn = splice_fn, .user = &sp};
                st = lp_hook_edit(m, cf->hook_name, &e);
            } else if (mode == 2) {
                lp_edit_spec e = {.kind = LP_EDIT_ZERO};
                st = lp_hook_edit(m, cf->hook_name, &e);
            }
            if (st == LP_OK) st = lp_model_forward(m, row, 1, ctx, LP_WANT_LOSS | LP_WANT_LOGITS);
            if (st != LP_OK) break;
            const float *l = lp_model_losses(m), *lg = lp_model_logits(m);
            for (int i = 0; i < ctx - 1; i++) ce[mode] += l[i];
            if (mode == 0) memcpy(clean, lg, rowsV * sizeof(float));
            else
                for (int i = 0; i < ctx - 1; i++) kl[mode - 1] += kl_row(clean + (size_t)i * V, lg + (size_t)i * V, V);
        }
        n_pred += ctx - 1;
    }
    lp_hooks_clear(m);
    if (st == LP_OK) {
        out->n_tokens = n_pred;
        out->ce_clean = ce[0] / n_pred, out->ce_sae = ce[1] / n_pred, out->ce_zero = ce[2] / n_pred;
        out->ce_recovered = (out->ce_zero - out->ce_sae) / (out->ce_zero - out->ce_clean);
        out->kl_sae = kl[0] / n_pred, out->kl_zero = kl[1] / n_pred;
    }
    sae_runner_free(sp.r);
    free(clean);
    return st;
}

/* ---- lp_sae_splice: the SAE in the model's forward, with clamps ---- */

struct lp_sae_splice {
    sae_runner *r;
    lp_model *m;
    int with_error, n_clamp, all_pos, n_ctx;
    int *clamp;          /* [n_clamp] latents */
    float *value;        /* [n_clamp] */
    float *wdec;         /* [n_clamp, d_out]: their decoder rows, on the host */
    unsigned char *sel;  /* [n_ctx]: position spliced */
    float *hx, *ha, *hf; /* host rows: x_hat, x, latent activations (d_sae or k per token) */
    int32_t *hi;         /* top-k indices */
};

/* The activation of latent j of token t after the runner's forward (rows on the host). */
static float latent_of(const lp_sae_splice *sp, int t, int j) {
    const sae_runner *r = sp->r;
    if (r->s->cfg.arch != LP_SAE_TOPK) return sp->hf[(size_t)t * r->S + j];
    for (int i = 0; i < r->K; i++)
        if (sp->hi[(size_t)t * r->K + i] == j) return sp->hf[(size_t)t * r->K + i];
    return 0.0f;
}

static lp_status splice_edit(const char *hook, lp_tensor *act, void *user) {
    lp_sae_splice *sp = user;
    sae_runner *r = sp->r;
    int D = r->D, first = lp_hook_first_pos(sp->m);
    int64_t numel = lp_shape_numel(act->shape, act->ndim);
    if (act->dtype != LP_F32 || act->device != r->c->device)
        LP_FAIL(LP_ERR_ARG, "%s: the SAE splice needs the model's activations in F32 on the SAE's device (use --model.dtype=f32)", hook);
    if (numel % D) LP_FAIL(LP_ERR_SHAPE, "%s: %lld values are not whole tokens of the SAE's d_in %d", hook, (long long)numel, D);
    int n = (int)(numel / D), T = (int)act->shape[1];
    if (n > r->N) LP_FAIL(LP_ERR_ARG, "%s: %d tokens exceed the splice buffer of %d", hook, n, r->N);
    size_t bytes = (size_t)numel * 4;
    LP_CHECK(lp_ctx_copy(r->c, r->x, act->data, bytes));
    LP_CHECK(sae_runner_forward(r, n, 0));
    int plain = !sp->with_error && !sp->n_clamp && sp->all_pos;
    if (plain) { /* x_hat as it is, without a trip to the host */
        LP_CHECK(lp_ctx_copy(r->c, act->data, r->xhat, bytes));
        return lp_ctx_sync(r->c);
    }
    LP_CHECK(lp_ctx_to_host(r->c, sp->hx, r->xhat, bytes));
    LP_CHECK(lp_ctx_to_host(r->c, sp->ha, act->data, bytes));
    if (sp->n_clamp && r->s->cfg.arch == LP_SAE_TOPK) {
        LP_CHECK(lp_ctx_to_host(r->c, sp->hf, r->val, (size_t)n * r->K * 4));
        LP_CHECK(lp_ctx_to_host(r->c, sp->hi, r->idx, (size_t)n * r->K * 4));
    } else if (sp->n_clamp) {
        LP_CHECK(lp_ctx_to_host(r->c, sp->hf, r->f, (size_t)n * r->S * 4));
    }
    for (int t = 0; t < n; t++) {
        int p = first + t % T; /* the absolute position of row t (rows are [batch, pos]) */
        float *x = sp->ha + (size_t)t * D, *xh = sp->hx + (size_t)t * D;
        if (!sp->all_pos && (p >= sp->n_ctx || !sp->sel[p])) continue;
        float *base = sp->with_error ? x : xh; /* x_hat + (x - x_hat) = x */
        for (int i = 0; i < sp->n_clamp; i++) {
            float dv = sp->value[i] - latent_of(sp, t, sp->clamp[i]);
            const float *w = sp->wdec + (size_t)i * D;
            for (int d = 0; d < D; d++) base[d] += dv * w[d];
        }
        if (!sp->with_error) memcpy(x, xh, (size_t)D * 4);
    }
    return lp_ctx_to_device(r->c, act->data, sp->ha, bytes);
}

void lp_sae_splice_free(lp_sae_splice *sp) {
    if (!sp) return;
    sae_runner_free(sp->r);
    free(sp->clamp), free(sp->value), free(sp->wdec), free(sp->sel);
    free(sp->hx), free(sp->ha), free(sp->hf), free(sp->hi);
    free(sp);
}

/* The SAE fits the model: its hook exists with d_in values per token, clamps in range. */
static lp_status splice_check(lp_model *m, const lp_sae *s, const lp_sae_splice_opts *o) {
    const lp_sae_cfg *cf = &s->cfg;
    if (cf->hook_name_out[0]) LP_FAIL(LP_ERR_ARG, "%s: a transcoder (reads '%s', writes '%s') cannot be spliced in as an SAE", cf->hook_name,
                                      cf->hook_name, cf->hook_name_out);
    int id = lp_hook_find(m, cf->hook_name);
    if (id < 0) LP_FAIL(LP_ERR_NOT_FOUND, "the model has no hook '%s' (the SAE's hook_name)", cf->hook_name);
    int64_t sh[LP_MAX_DIMS];
    int nd = lp_hook_shape(m, id, 1, 1, sh);
    int64_t w = 1;
    for (int i = 2; i < nd; i++) w *= sh[i];
    if (strstr(cf->hook_name, "hook_attn_scores") || strstr(cf->hook_name, "hook_pattern") || w != cf->d_in)
        LP_FAIL(LP_ERR_SHAPE, "%s: the SAE's d_in is %d but the model's hook has %lld values per position", cf->hook_name, cf->d_in, (long long)w);
    if (o->n_clamp < 0 || (o->n_clamp && (!o->clamp_latents || !o->clamp_values))) LP_FAIL(LP_ERR_ARG, "the SAE splice's clamps are incomplete");
    for (int i = 0; i < o->n_clamp; i++) {
        if (o->clamp_latents[i] < 0 || o->clamp_latents[i] >= cf->d_sae)
            LP_FAIL(LP_ERR_ARG, "latent %d is out of range: the SAE has latents 0..%d", o->clamp_latents[i], cf->d_sae - 1);
        if (!isfinite(o->clamp_values[i])) LP_FAIL(LP_ERR_ARG, "latent %d: the clamp value is not finite", o->clamp_latents[i]);
    }
    return LP_OK;
}

static lp_status splice_buffers(lp_sae_splice *sp, lp_sae *s, lp_ctx *c, const lp_sae_splice_opts *o) {
    int N = sp->n_ctx, D = s->cfg.d_in, S = s->cfg.d_sae, nc = o->n_clamp;
    sp->clamp = malloc((nc ? nc : 1) * sizeof(int));
    sp->value = malloc((nc ? nc : 1) * sizeof(float));
    sp->wdec = malloc(((size_t)nc * D + 1) * sizeof(float));
    sp->sel = calloc(N, 1);
    sp->hx = malloc((size_t)N * D * sizeof(float));
    sp->ha = malloc((size_t)N * D * sizeof(float));
    sp->hf = malloc((size_t)N * (S > s->cfg.k ? S : s->cfg.k) * sizeof(float));
    sp->hi = malloc((size_t)N * (s->cfg.k > 0 ? s->cfg.k : 1) * sizeof(int32_t));
    if (!sp->clamp || !sp->value || !sp->wdec || !sp->sel || !sp->hx || !sp->ha || !sp->hf || !sp->hi)
        LP_FAIL(LP_ERR_OOM, "out of memory for an SAE splice of %d tokens", N);
    for (int i = 0; i < nc; i++) {
        sp->clamp[i] = o->clamp_latents[i], sp->value[i] = o->clamp_values[i];
        LP_CHECK(lp_ctx_to_host(c, sp->wdec + (size_t)i * D, s->W_dec + (size_t)sp->clamp[i] * D, (size_t)D * 4));
    }
    for (int i = 0; i < o->npos; i++)
        if (o->pos[i] >= 0 && o->pos[i] < N) sp->sel[o->pos[i]] = 1;
    return LP_OK;
}

lp_status lp_sae_splice_add(lp_sae_splice **out, lp_model *m, lp_sae *s, const lp_sae_splice_opts *o) {
    *out = NULL;
    lp_sae_splice_opts none = {0};
    if (!o) o = &none;
    LP_CHECK(splice_check(m, s, o));
    lp_ctx *c = lp_model_ctx(m);
    if (s->device != c->device) LP_FAIL(LP_ERR_ARG, "%s: the SAE is not on the model's device", s->cfg.hook_name);
    lp_sae_splice *sp = calloc(1, sizeof *sp);
    if (!sp) LP_FAIL(LP_ERR_OOM, "out of memory");
    sp->m = m, sp->with_error = o->with_error, sp->n_clamp = o->n_clamp, sp->all_pos = !o->pos;
    sp->n_ctx = lp_model_config(m)->n_ctx;
    lp_status st = sae_runner_new(&sp->r, s, c, sp->n_ctx, 0, 0);
    if (st == LP_OK) st = splice_buffers(sp, s, c, o);
    lp_edit_spec e = {.fn = splice_edit, .user = sp};
    if (st == LP_OK) st = lp_hook_edit(m, s->cfg.hook_name, &e);
    if (st != LP_OK) {
        lp_sae_splice_free(sp);
        return st;
    }
    *out = sp;
    return LP_OK;
}
