/* dashboard_enc.c: the SAE's encoder over batches of the store for dashboards, and the
 * store's token ids. The encoder is the first half of the SAE runner's forward (the same
 * GEMM and activation ops) without the decoder, which dashboards never need, and, for
 * the per-latent activations (standard, jumprelu), over the chosen latents' columns only:
 * 100 latents of a 16k SAE cost 100 columns. TopK needs every pre-activation to know
 * which k fire, so it runs over all latents. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "loupe/ops.h"
#include "loupe/safetensors.h"
#include "loupe/sae_ops.h"
#include "analysis/dashboard_internal.h"

double dash_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int is_identity(const int32_t *lat, int L, int S) {
    if (L != S) return 0;
    for (int i = 0; i < L; i++)
        if (lat[i] != i) return 0;
    return 1;
}

/* W_enc's columns `lat` (and b_enc, threshold) into e->W, e->b, e->thr on the device. */
static lp_status gather_columns(dash_enc *e, const int32_t *lat) {
    lp_sae *s = e->s;
    int D = e->D, S = s->cfg.d_sae, L = e->L;
    float *hw = malloc((size_t)D * S * sizeof(float)), *hg = malloc((size_t)D * L * sizeof(float));
    float *hb = malloc((size_t)S * sizeof(float)), *hgb = malloc((size_t)L * 2 * sizeof(float));
    lp_status st = hw && hg && hb && hgb ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory for W_enc [%d, %d]", D, S);
    if (st == LP_OK) st = lp_ctx_to_host(e->c, hw, s->W_enc, (size_t)D * S * 4);
    for (int d = 0; st == LP_OK && d < D; d++)
        for (int j = 0; j < L; j++) hg[(size_t)d * L + j] = hw[(size_t)d * S + lat[j]];
    if (st == LP_OK) st = lp_ctx_to_host(e->c, hb, s->b_enc, (size_t)S * 4);
    for (int j = 0; st == LP_OK && j < L; j++) hgb[j] = hb[lat[j]];
    if (st == LP_OK && s->threshold) st = lp_ctx_to_host(e->c, hb, s->threshold, (size_t)S * 4);
    for (int j = 0; st == LP_OK && s->threshold && j < L; j++) hgb[L + j] = hb[lat[j]];
    if (st == LP_OK) st = lp_ctx_alloc(e->c, ((size_t)D * L + 2 * (size_t)L) * 4, (void **)&e->W);
    if (st == LP_OK) {
        e->own_w = 1, e->b = e->W + (size_t)D * L, e->thr = s->threshold ? e->b + L : NULL;
        st = lp_ctx_to_device(e->c, e->W, hg, (size_t)D * L * 4);
    }
    if (st == LP_OK) st = lp_ctx_to_device(e->c, e->b, hgb, (size_t)L * 2 * 4);
    free(hw), free(hg), free(hb), free(hgb);
    return st;
}

lp_status dash_enc_open(dash_enc *e, lp_sae *s, lp_ctx *c, const int32_t *lat, int L, int N) {
    memset(e, 0, sizeof *e);
    e->s = s, e->c = c, e->L = L, e->N = N, e->D = s->cfg.d_in;
    int S = s->cfg.d_sae, topk = s->cfg.arch == LP_SAE_TOPK;
    e->K = topk ? s->cfg.k : 0;
    e->cols = topk ? S : L;
    lp_status st = LP_OK;
    if (topk || is_identity(lat, L, S)) e->W = s->W_enc, e->b = s->b_enc, e->thr = s->threshold;
    else st = gather_columns(e, lat);
    e->hx = malloc((size_t)N * e->D * sizeof(float));
    e->bdec = malloc((size_t)e->D * sizeof(float));
    if (topk) {
        e->idx = malloc((size_t)N * e->K * sizeof(int32_t)), e->val = malloc((size_t)N * e->K * sizeof(float));
        e->col = malloc((size_t)S * sizeof(int32_t));
    } else {
        e->f = malloc((size_t)N * L * sizeof(float));
    }
    if (st == LP_OK && (!e->hx || !e->bdec || (topk ? !e->idx || !e->val || !e->col : !e->f)))
        st = LP_ERR(LP_ERR_OOM, "out of memory for a batch of %d tokens", N);
    if (st == LP_OK && topk) {
        for (int i = 0; i < S; i++) e->col[i] = -1;
        for (int j = 0; j < L; j++) e->col[lat[j]] = j;
    }
    if (st == LP_OK) st = lp_ctx_to_host(c, e->bdec, s->b_dec, (size_t)e->D * 4);
    if (st == LP_OK) st = lp_ctx_alloc(c, (size_t)N * e->D * 4, (void **)&e->x);
    if (st == LP_OK) st = lp_ctx_alloc(c, (size_t)N * e->cols * 4, (void **)&e->pre);
    if (st == LP_OK && topk) st = lp_ctx_alloc(c, (size_t)N * e->K * 4, (void **)&e->didx);
    if (st == LP_OK && topk) st = lp_ctx_alloc(c, (size_t)N * e->K * 4, (void **)&e->dval);
    if (st != LP_OK) dash_enc_close(e);
    return st;
}

void dash_enc_close(dash_enc *e) {
    if (!e->s) return;
    if (e->own_w) lp_ctx_release(e->c, e->W);
    lp_ctx_release(e->c, e->x), lp_ctx_release(e->c, e->pre), lp_ctx_release(e->c, e->didx), lp_ctx_release(e->c, e->dval);
    free(e->hx), free(e->bdec), free(e->f), free(e->idx), free(e->val), free(e->col);
    memset(e, 0, sizeof *e);
}

/* Tokens [t0, t0 + n): f = act((x - b_dec?) W_enc + b_enc), as the SAE runner computes it. */
lp_status dash_enc_batch(dash_enc *e, const lp_store *in, const char *store, const char *hook, int64_t t0, int n) {
    const lp_sae_cfg *cf = &e->s->cfg;
    int D = e->D;
    LP_CHECK(lp_store_read(in, t0, n, e->hx));
    for (size_t i = 0; i < (size_t)n * D; i++)
        if (!isfinite(e->hx[i]))
            LP_FAIL(LP_ERR_FORMAT, "%s: '%s' has a non-finite value at token %lld", store, hook, (long long)(t0 + (int64_t)(i / D)));
    if (cf->apply_b_dec_to_input)
        for (size_t i = 0; i < (size_t)n * D; i++) e->hx[i] -= e->bdec[i % D];
    LP_CHECK(lp_ctx_to_device(e->c, e->x, e->hx, (size_t)n * D * 4));
    LP_CHECK(lp_matmul(e->c, e->pre, e->x, e->W, e->b, n, D, e->cols, 0));
    switch (cf->arch) {
    case LP_SAE_TOPK:
        LP_CHECK(lp_sae_topk(e->c, e->didx, e->dval, e->pre, n, e->cols, e->K));
        LP_CHECK(lp_ctx_to_host(e->c, e->idx, e->didx, (size_t)n * e->K * 4));
        return lp_ctx_to_host(e->c, e->val, e->dval, (size_t)n * e->K * 4);
    case LP_SAE_STANDARD: LP_CHECK(lp_sae_relu(e->c, e->pre, e->pre, (size_t)n * e->cols)); break;
    case LP_SAE_JUMPRELU:
    case LP_SAE_BATCHTOPK: /* SAELens: relu(pre) * (pre > threshold); batchtopk at inference is the same */
        LP_CHECK(lp_sae_relu(e->c, e->pre, e->pre, (size_t)n * e->cols));
        LP_CHECK(lp_sae_jumprelu(e->c, e->pre, e->pre, e->thr, n, e->cols));
        break;
    }
    return lp_ctx_to_host(e->c, e->f, e->pre, (size_t)n * e->cols * 4);
}

/* ---- token ids ---- */

lp_status dash_tokens_open(dash_tokens *t, const char *dir, int ctx) {
    memset(t, 0, sizeof *t);
    char path[1200];
    int cap = 0;
    for (int i = 0;; i++) {
        snprintf(path, sizeof path, "%s/shard-%05d.safetensors", dir, i);
        if (access(path, F_OK) != 0) break;
        if (t->n == cap) {
            cap = cap ? 2 * cap : 16;
            lp_st_file *f = realloc(t->files, cap * sizeof *f);
            if (f) t->files = f;
            const int32_t **k = f ? realloc(t->tok, cap * sizeof *k) : NULL;
            if (k) t->tok = k;
            int64_t *first = k ? realloc(t->first, (cap + 1) * sizeof *first) : NULL;
            if (first) t->first = first;
            if (!first) { dash_tokens_close(t); LP_FAIL(LP_ERR_OOM, "out of memory"); }
        }
        lp_status st = lp_st_open(&t->files[t->n], path);
        if (st != LP_OK) { dash_tokens_close(t); return st; }
        const lp_st_tensor *k = lp_st_find(&t->files[t->n++], "tokens");
        if (!k || k->dtype != LP_I32 || k->ndim != 2 || k->shape[1] != ctx) {
            dash_tokens_close(t);
            LP_FAIL(LP_ERR_FORMAT, "%s: no 'tokens' tensor (I32 [n_seq, %d]) beside the activations", path, ctx);
        }
        if (t->n == 1) t->first[0] = 0;
        t->tok[t->n - 1] = k->data;
        t->first[t->n] = t->first[t->n - 1] + k->shape[0] * ctx;
    }
    return LP_OK;
}

int32_t dash_token(const dash_tokens *t, int64_t i) {
    int lo = 0, hi = t->n - 1;
    while (lo < hi) { /* the last shard whose first token is <= i */
        int mid = (lo + hi + 1) / 2;
        if (t->first[mid] <= i) lo = mid;
        else hi = mid - 1;
    }
    return t->tok[lo][i - t->first[lo]];
}

void dash_tokens_close(dash_tokens *t) {
    for (int i = 0; i < t->n; i++) lp_st_close(&t->files[i]);
    free(t->files), free(t->tok), free(t->first);
    memset(t, 0, sizeof *t);
}
