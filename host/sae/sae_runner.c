/* sae_runner.c: the buffers of one SAE batch and the forward pass over them (see
 * sae_internal.h), shared by training and by evaluation and encoding (host/sae/sae_eval.c). */
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
#include "loupe/sae_track.h"
#include "loupe/sae_train.h"
#include "loupe/store.h"
#include "core/rng.h"
#include "sae/sae_internal.h"

/* ---- the runner: buffers of one batch, shared by training and evaluation ---- */

void sae_runner_free(sae_runner *r) {
    if (!r) return;
    lp_ctx_release(r->c, r->W_enc_b);
    lp_ctx_release(r->c, r->mem);
    lp_ctx_release(r->c, r->hist);
    free(r->thr_host);
    free(r);
}

void sae_runner_set_dp(sae_runner *r, lp_dist *d) { r->dist = d; }

lp_status sae_runner_split_threshold(sae_runner *r, int n, lp_dist *d, lp_dist_group g, size_t rows, size_t latents) {
    lp_ctx *c = r->c;
    size_t count = rows * r->K;
    int64_t hist[256], rank = (int64_t)count + 1;
    uint32_t prefix = 0, mask = 0;
    int found = count < rows * latents; /* else 0, as lp_sae_kth_largest */
    if (!r->hist) LP_CHECK(lp_ctx_alloc(c, 256 * sizeof(int64_t), (void **)&r->hist));
    if (!r->thr_host && !(r->thr_host = malloc((size_t)r->S * sizeof *r->thr_host))) LP_FAIL(LP_ERR_OOM, "out of memory");
    for (int shift = 24; found && shift >= 0; shift -= 8) {
        LP_CHECK(lp_sae_radix_hist(c, r->hist, r->pre, (size_t)n * r->S, prefix, mask, shift));
        LP_CHECK(lp_ctx_to_host(c, hist, r->hist, sizeof hist));
        LP_CHECK(lp_dist_allreduce_sum(d, g, hist, 256, LP_I64));
        found = lp_sae_radix_pick(hist, &rank, &prefix, &mask, shift);
    }
    float t = 0.0f;
    if (found) memcpy(&t, &prefix, sizeof t);
    double td = t;
    for (int i = 0; i < r->S; i++) r->thr_host[i] = t;
    LP_CHECK(lp_ctx_to_device(c, r->batch_t, &td, sizeof td));
    return lp_ctx_to_device(c, r->thr, r->thr_host, (size_t)r->S * sizeof(float));
}

lp_status sae_runner_cached(lp_sae *s, lp_ctx *c, int N, sae_runner **out) {
    sae_runner *r = s->runner_cache;
    if (r && r->N >= N && r->c == c) return *out = r, LP_OK;
    sae_runner_free(r);
    s->runner_cache = NULL, s->runner_cache_n = 0;
    LP_CHECK(sae_runner_new(&r, s, c, N, 0, 0));
    s->runner_cache = r, s->runner_cache_n = N;
    return *out = r, LP_OK;
}

lp_status sae_scratch(lp_sae *s, lp_ctx *c, size_t bytes, void **out) {
    if (s->scratch && s->scratch_bytes >= bytes) return *out = s->scratch, LP_OK;
    lp_ctx_release(c, s->scratch);
    s->scratch = NULL, s->scratch_bytes = 0;
    LP_CHECK(lp_ctx_alloc(c, bytes, &s->scratch));
    s->scratch_bytes = bytes;
    return *out = s->scratch, LP_OK;
}

lp_status sae_runner_new(sae_runner **out, lp_sae *s, lp_ctx *c, int N, int train, int aux_k) {
    return sae_runner_new_sel(out, s, c, N, train, aux_k, s->cfg.d_sae);
}

lp_status sae_runner_new_sel(sae_runner **out, lp_sae *s, lp_ctx *c, int N, int train, int aux_k, int sel_S) {
    *out = NULL;
    /* The runner hands the SAE's F32 buffers to the generic ops (matmul, affine, add), which
     * read them in the context's activation dtype: a BF16 context would misread every one. */
    if (c == NULL || c->dtype != LP_F32 || c->device != s->device)
        LP_FAIL(LP_ERR_ARG, "SAE runner: needs an F32 context on the SAE's device (got %s on %s)",
                c ? lp_dtype_name(c->dtype) : "none", c && c->device == LP_CUDA ? "cuda" : "cpu");
    sae_runner *r = calloc(1, sizeof *r);
    if (!r) LP_FAIL(LP_ERR_OOM, "out of memory");
    const lp_sae_cfg *cf = &s->cfg;
    r->s = s, r->c = c, r->N = N, r->train = train;
    r->D = cf->d_in, r->Do = cf->d_out, r->S = cf->d_sae;
    r->K = cf->k > 0 ? cf->k : 1;
    int sparse = cf->arch == LP_SAE_TOPK;
    int aux = train && (cf->arch == LP_SAE_TOPK || cf->arch == LP_SAE_BATCHTOPK);
    r->Ka = aux ? (aux_k > 0 ? aux_k : (cf->d_in / 2 > 0 ? cf->d_in / 2 : 1)) : 0;
    if (r->Ka > sel_S) r->Ka = sel_S;
    size_t Nn = (size_t)N, D = r->D, Do = r->Do, S = r->S, K = r->K, Ka = r->Ka;
    struct { void **p; size_t bytes; } b[] = {
        {(void **)&r->x, Nn * D * 4}, {(void **)&r->y, cf->hook_name_out[0] ? Nn * Do * 4 : 0},
        {(void **)&r->xin, Nn * D * 4}, {(void **)&r->pre, Nn * S * 4},
        {(void **)&r->f, sparse ? 0 : Nn * S * 4}, {(void **)&r->idx, sparse ? Nn * K * 4 : 0},
        {(void **)&r->val, sparse ? Nn * K * 4 : 0}, {(void **)&r->xhat, Nn * Do * 4}, {(void **)&r->skip, cf->skip ? Nn * Do * 4 : 0},
        {(void **)&r->nbdec, D * 4}, {(void **)&r->ones, (S > D ? S : D) * 4}, {(void **)&r->neg1, (D > Do ? D : Do) * 4},
        {(void **)&r->thr, S * 4}, {(void **)&r->counts, S * 8},
        /* training only */
        {(void **)&r->dxhat, train ? Nn * Do * 4 : 0}, {(void **)&r->df, train && !sparse ? Nn * S * 4 : 0},
        {(void **)&r->dval, train && sparse ? Nn * K * 4 : 0},
        {(void **)&r->norms, train ? S * 4 : 0}, {(void **)&r->colsum, train ? S * 4 : 0},
        {(void **)&r->idx_aux, aux ? Nn * Ka * 4 : 0},
        {(void **)&r->val_aux, aux ? Nn * Ka * 4 : 0}, {(void **)&r->dval_aux, aux ? Nn * Ka * 4 : 0},
        {(void **)&r->e, aux ? Nn * Do * 4 : 0}, {(void **)&r->ehat, aux ? Nn * Do * 4 : 0},
        {(void **)&r->cand, aux ? S * 4 : 0},
        {(void **)&r->lists, train && (sparse || aux) ? lp_sae_latent_lists_len(N, K > Ka ? (int)K : (int)Ka, (int)S) * 4 : 0},
    };
    size_t off = 0;
    for (size_t i = 0; i < sizeof b / sizeof *b; i++) off += (b[i].bytes + 255) / 256 * 256;
    lp_status st = lp_ctx_alloc(c, off, &r->mem);
    if (st == LP_OK) st = lp_ctx_memset0(c, r->mem, off);
    if (st != LP_OK) {
        free(r);
        return st;
    }
    off = 0;
    for (size_t i = 0; i < sizeof b / sizeof *b; i++) {
        *b[i].p = b[i].bytes ? (char *)r->mem + off : NULL;
        off += (b[i].bytes + 255) / 256 * 256;
    }
    /* constant vectors: ones and minus ones */
    size_t nc = S > D ? S : D, nn = D > Do ? D : Do;
    float *h = malloc((nc > nn ? nc : nn) * sizeof(float));
    if (!h) st = LP_ERR(LP_ERR_OOM, "out of memory");
    for (size_t i = 0; st == LP_OK && i < nc; i++) h[i] = 1.0f;
    if (st == LP_OK) st = lp_ctx_to_device(c, r->ones, h, nc * 4);
    for (size_t i = 0; st == LP_OK && i < nn; i++) h[i] = -1.0f;
    if (st == LP_OK) st = lp_ctx_to_device(c, r->neg1, h, nn * 4);
    free(h);
    if (st != LP_OK) {
        sae_runner_free(r);
        return st;
    }
    *out = r;
    return LP_OK;
}

lp_status sae_runner_use_bf16(sae_runner *r) {
    if (r->bf16) return LP_OK;
    size_t nw = ((size_t)r->D * r->S + 127) / 128 * 128, nx = (size_t)r->N * r->D; /* x_in's copy 256-byte aligned */
    LP_CHECK(lp_ctx_alloc(r->c, (nw + nx) * sizeof(uint16_t), (void **)&r->W_enc_b));
    r->xin_b = r->W_enc_b + nw, r->bf16 = 1;
    return sae_runner_refresh_bf16(r);
}

lp_status sae_runner_refresh_bf16(sae_runner *r) {
    return r->bf16 ? lp_sae_to_bf16(r->c, r->W_enc_b, r->s->W_enc, (size_t)r->D * r->S) : LP_OK;
}

/* x_in and the pre-activations of n tokens (a latent shard's forward goes on from here,
 * host/sae/sae_shard.c). */
lp_status sae_runner_pre(sae_runner *r, int n) {
    lp_sae *s = r->s;
    lp_ctx *c = r->c;
    int D = r->D, S = r->S;
    const float *xin = r->x;
    if (s->cfg.apply_b_dec_to_input) { /* xin = x - b_dec */
        LP_CHECK(lp_affine(c, r->nbdec, s->b_dec, r->neg1, NULL, 1, D));
        LP_CHECK(lp_affine(c, r->xin, r->x, r->ones, r->nbdec, n, D));
        xin = r->xin;
    }
    r->xin_used = xin;
    if (r->bf16) {
        LP_CHECK(lp_sae_to_bf16(c, r->xin_b, xin, (size_t)n * D));
        LP_CHECK(lp_sae_matmul_bf16(c, r->pre, r->xin_b, r->W_enc_b, s->b_enc, n, D, S));
    } else {
        LP_CHECK(lp_matmul(c, r->pre, xin, s->W_enc, s->b_enc, n, D, S, 0));
    }
    return LP_OK;
}

/* f (dense) or idx/val (topk) and x_hat for x (and xin) of n tokens. batch_thr: for
 * batchtopk in training, the threshold comes from this batch (written to r->batch_t on the
 * device); otherwise from the SAE's learned threshold. */
lp_status sae_runner_forward(sae_runner *r, int n, int batch_thr) {
    lp_sae *s = r->s;
    lp_ctx *c = r->c;
    const lp_sae_cfg *cf = &s->cfg;
    int D = r->D, Do = r->Do, S = r->S, K = r->K;
    LP_CHECK(sae_runner_pre(r, n));
    switch (cf->arch) {
    case LP_SAE_STANDARD: LP_CHECK(lp_sae_relu(c, r->f, r->pre, (size_t)n * S)); break;
    case LP_SAE_JUMPRELU: /* SAELens: relu(pre) * (pre > threshold), also for negative thresholds */
        LP_CHECK(lp_sae_relu(c, r->f, r->pre, (size_t)n * S));
        LP_CHECK(lp_sae_jumprelu(c, r->f, r->f, s->threshold, n, S));
        break;
    case LP_SAE_TOPK: LP_CHECK(lp_sae_topk(c, r->idx, r->val, r->pre, n, S, K)); break;
    case LP_SAE_BATCHTOPK:
        if (batch_thr) { /* the k * n largest activations of this batch */
            if (!r->batch_t) LP_FAIL(LP_ERR_ARG, "SAE runner: a batch threshold without its device slot");
            if (lp_dist_dp_size(r->dist) > 1) /* the rows over the DP ranks */
                LP_CHECK(sae_runner_split_threshold(r, n, r->dist, LP_DIST_DP, (size_t)n * lp_dist_dp_size(r->dist), S));
            else LP_CHECK(lp_sae_batch_threshold(c, r->thr, r->batch_t, r->pre, (size_t)n * S, (size_t)n * K, S));
            LP_CHECK(lp_sae_jumprelu(c, r->f, r->pre, r->thr, n, S));
        } else {
            LP_CHECK(lp_sae_jumprelu(c, r->f, r->pre, s->threshold, n, S));
        }
        break;
    }
    if (cf->arch == LP_SAE_TOPK) LP_CHECK(lp_sae_decode_sparse(c, r->xhat, r->idx, r->val, s->W_dec, s->b_dec, n, K, Do));
    else LP_CHECK(lp_matmul(c, r->xhat, r->f, s->W_dec, s->b_dec, n, S, Do, 0));
    if (cf->skip) {
        LP_CHECK(lp_matmul(c, r->skip, r->x, s->W_skip, NULL, n, D, Do, 0));
        LP_CHECK(lp_add(c, r->xhat, r->xhat, r->skip, (size_t)n * Do));
    }
    return LP_OK;
}
