/* sae_train.c: SAE and transcoder training from an activation store (Adam, schedules,
 * unit-norm decoder, b_dec initialisation, activation scaling, dead-latent tracking,
 * AuxK, window shuffling, checkpoints that resume identically), and the forward used by
 * evaluation and encoding (host/sae_eval.c). All SAE math is F32 on the context's device
 * through include/loupe/sae_ops.h and the matmuls of ops.h. */
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
#include "rng.h"
#include "sae_internal.h"

void lp_sae_train_defaults(lp_sae_train_cfg *t) {
    memset(t, 0, sizeof *t);
    t->sae.arch = LP_SAE_STANDARD;
    t->sae.jumprelu_bandwidth = 0.001f;
    snprintf(t->sae.normalize, sizeof t->sae.normalize, "expected_average_only_in");
    t->lr = 3e-4, t->adam_beta1 = 0.9, t->adam_beta2 = 0.999, t->adam_eps = 1e-8;
    snprintf(t->lr_scheduler, sizeof t->lr_scheduler, "constant");
    t->l1_coefficient = 5.0, t->l0_coefficient = 1.0, t->jumprelu_init_threshold = 0.001;
    t->aux_k_coefficient = 1.0 / 32;
    t->tokens = 1 << 20, t->batch_tokens = 4096;
    snprintf(t->b_dec_init, sizeof t->b_dec_init, "geometric_median");
    t->dead_feature_window = 1000000;
    t->shuffle_tokens = 1 << 16;
    t->log_every = 100;
}

#define BAD(key, ...) LP_FAIL(LP_ERR_ARG, key " = " __VA_ARGS__)

lp_status lp_sae_train_check(const lp_sae_train_cfg *t) {
    if (!t->store || !t->store[0]) LP_FAIL(LP_ERR_ARG, "missing config key 'data.store' (an activation store written by loupe cache)");
    if (!t->out || !t->out[0]) LP_FAIL(LP_ERR_ARG, "missing config key 'train.out'");
    if (!t->sae.hook_name[0]) LP_FAIL(LP_ERR_ARG, "missing config key 'data.hook'");
    if (!(t->lr > 0 && isfinite(t->lr))) BAD("train.lr", "%g: the learning rate must be positive", t->lr);
    if (!(t->adam_beta1 >= 0 && t->adam_beta1 < 1) || !(t->adam_beta2 >= 0 && t->adam_beta2 < 1))
        BAD("train.adam_beta1/adam_beta2", "%g/%g: each must be in [0, 1)", t->adam_beta1, t->adam_beta2);
    if (t->tokens < 1) BAD("train.tokens", "%lld: must be positive", (long long)t->tokens);
    if (t->batch_tokens < 1) BAD("train.batch_tokens", "%d: must be positive", t->batch_tokens);
    if (t->l1_coefficient < 0 || !isfinite(t->l1_coefficient)) BAD("train.l1_coefficient", "%g: must be >= 0", t->l1_coefficient);
    if (t->l0_coefficient < 0 || !isfinite(t->l0_coefficient)) BAD("train.l0_coefficient", "%g: must be >= 0", t->l0_coefficient);
    if (t->aux_k_coefficient < 0) BAD("train.aux_k_coefficient", "%g: must be >= 0", t->aux_k_coefficient);
    if (t->lr_warm_up_steps < 0 || t->lr_decay_steps < 0 || t->l1_warm_up_steps < 0)
        LP_FAIL(LP_ERR_ARG, "train.lr_warm_up_steps, train.lr_decay_steps and train.l1_warm_up_steps must be >= 0");
    if (strcmp(t->lr_scheduler, "constant") && strcmp(t->lr_scheduler, "linear") && strcmp(t->lr_scheduler, "cosine"))
        BAD("train.lr_scheduler", "'%s': one of constant, linear, cosine", t->lr_scheduler);
    if (strcmp(t->b_dec_init, "mean") && strcmp(t->b_dec_init, "geometric_median") && strcmp(t->b_dec_init, "zeros"))
        BAD("train.b_dec_init", "'%s': one of mean, geometric_median, zeros", t->b_dec_init);
    if (t->dead_feature_window < 1) BAD("train.dead_feature_window", "%lld: must be positive", (long long)t->dead_feature_window);
    if (t->shuffle_tokens < 1) BAD("train.shuffle_tokens", "%lld: must be positive", (long long)t->shuffle_tokens);
    if (t->checkpoint_every < 0) BAD("train.checkpoint_every", "%lld: must be >= 0", (long long)t->checkpoint_every);
    if (t->log_every < 1) BAD("train.log_every", "%lld: must be positive", (long long)t->log_every);
    if (t->sae.arch == LP_SAE_JUMPRELU && !(t->sae.jumprelu_bandwidth > 0))
        BAD("sae.jumprelu_bandwidth", "%g: must be positive", t->sae.jumprelu_bandwidth);
    if (t->sae.d_sae < 1) BAD("sae.d_sae", "%d: must be positive", t->sae.d_sae);
    if ((t->sae.arch == LP_SAE_TOPK || t->sae.arch == LP_SAE_BATCHTOPK) && (t->sae.k < 1 || t->sae.k > t->sae.d_sae))
        BAD("sae.k", "%d: must be in [1, sae.d_sae = %d]", t->sae.k, t->sae.d_sae);
    return LP_OK;
}

/* ---- the runner: buffers of one batch, shared by training and evaluation ---- */

void lp_sae_runner_free(sae_runner *r) {
    if (!r) return;
    lp_ctx_release(r->c, r->mem);
    free(r);
}

lp_status lp_sae_runner_new(sae_runner **out, lp_sae *s, lp_ctx *c, int N, int train, int aux_k) {
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
    if (r->Ka > r->S) r->Ka = r->S;
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
        {(void **)&r->dval, train && sparse ? Nn * K * 4 : 0}, {(void **)&r->dxin, train ? Nn * D * 4 : 0},
        {(void **)&r->norms, train ? S * 4 : 0}, {(void **)&r->colsum, train ? S * 4 : 0},
        {(void **)&r->faux, aux ? Nn * S * 4 : 0}, {(void **)&r->idx_aux, aux ? Nn * Ka * 4 : 0},
        {(void **)&r->val_aux, aux ? Nn * Ka * 4 : 0}, {(void **)&r->dval_aux, aux ? Nn * Ka * 4 : 0},
        {(void **)&r->e, aux ? Nn * Do * 4 : 0}, {(void **)&r->ehat, aux ? Nn * Do * 4 : 0},
        {(void **)&r->mask, aux ? S * 4 : 0},
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
    if (!h) st = lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of memory");
    for (size_t i = 0; st == LP_OK && i < nc; i++) h[i] = 1.0f;
    if (st == LP_OK) st = lp_ctx_to_device(c, r->ones, h, nc * 4);
    for (size_t i = 0; st == LP_OK && i < nn; i++) h[i] = -1.0f;
    if (st == LP_OK) st = lp_ctx_to_device(c, r->neg1, h, nn * 4);
    free(h);
    if (st != LP_OK) {
        lp_sae_runner_free(r);
        return st;
    }
    *out = r;
    return LP_OK;
}

/* f (dense) or idx/val (topk) and x_hat for x (and xin) of n tokens. batch_thr: for
 * batchtopk in training, the threshold comes from this batch (written to r->batch_t);
 * otherwise from the SAE's learned threshold. */
lp_status lp_sae_runner_forward(sae_runner *r, int n, int batch_thr) {
    lp_sae *s = r->s;
    lp_ctx *c = r->c;
    const lp_sae_cfg *cf = &s->cfg;
    int D = r->D, Do = r->Do, S = r->S, K = r->K;
    const float *xin = r->x;
    if (cf->apply_b_dec_to_input) { /* xin = x - b_dec */
        LP_CHECK(lp_affine(c, r->nbdec, s->b_dec, r->neg1, NULL, 1, D));
        LP_CHECK(lp_affine(c, r->xin, r->x, r->ones, r->nbdec, n, D));
        xin = r->xin;
    }
    r->xin_used = xin;
    LP_CHECK(lp_matmul(c, r->pre, xin, s->W_enc, s->b_enc, n, D, S, 0));
    switch (cf->arch) {
    case LP_SAE_STANDARD: LP_CHECK(lp_sae_relu(c, r->f, r->pre, (size_t)n * S)); break;
    case LP_SAE_JUMPRELU: /* SAELens: relu(pre) * (pre > threshold), also for negative thresholds */
        LP_CHECK(lp_sae_relu(c, r->f, r->pre, (size_t)n * S));
        LP_CHECK(lp_sae_jumprelu(c, r->f, r->f, s->threshold, n, S));
        break;
    case LP_SAE_TOPK: LP_CHECK(lp_sae_topk(c, r->idx, r->val, r->pre, n, S, K)); break;
    case LP_SAE_BATCHTOPK:
        if (batch_thr) { /* the k * n largest activations of this batch */
            float t;
            LP_CHECK(lp_sae_kth_largest(c, &t, r->pre, (size_t)n * S, (size_t)n * K));
            r->batch_t = t;
            float *h = malloc((size_t)S * sizeof(float));
            if (!h) LP_FAIL(LP_ERR_OOM, "out of memory");
            for (int i = 0; i < S; i++) h[i] = t;
            lp_status st = lp_ctx_to_device(c, r->thr, h, (size_t)S * 4);
            free(h);
            LP_CHECK(st);
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

/* ---- training ---- */

/* ---- a live source: the model run over token rows, its hooks captured ---- */

#define LIVE_MAX_HOOKS 16

struct lp_live {
    lp_model *m;
    const int32_t *tok;
    int64_t n_seq;
    int ctx, bseq;
    int n_hooks;
    char name[LIVE_MAX_HOOKS][128];
    int d[LIVE_MAX_HOOKS];
    int64_t c0, cn;             /* the cached token range, for every hook */
    float *cache[LIVE_MAX_HOOKS];
    size_t cache_cap;           /* tokens each cache holds */
    float *tmp;                 /* one batch of captures */
    size_t tmp_cap;
};

lp_status lp_live_open(lp_live **out, lp_model *m, const int32_t *tokens, int64_t n_seq, int ctx, int batch_seqs) {
    *out = NULL;
    if (n_seq < 1 || ctx < 1 || batch_seqs < 1) LP_FAIL(LP_ERR_ARG, "live source: %lld rows of %d tokens, %d per forward", (long long)n_seq, ctx, batch_seqs);
    lp_live *l = calloc(1, sizeof *l);
    if (!l) LP_FAIL(LP_ERR_OOM, "out of memory");
    *l = (lp_live){.m = m, .tok = tokens, .n_seq = n_seq, .ctx = ctx, .bseq = batch_seqs, .c0 = -1};
    *out = l;
    return LP_OK;
}

void lp_live_close(lp_live *l) {
    if (!l) return;
    for (int i = 0; i < l->n_hooks; i++) free(l->cache[i]);
    free(l->tmp);
    free(l);
}

/* Index of a hook the source captures (added on first use); *d its values per token. */
static lp_status live_hook(lp_live *l, const char *name, int *idx, int *d) {
    for (int i = 0; i < l->n_hooks; i++)
        if (strcmp(l->name[i], name) == 0) return *idx = i, *d = l->d[i], LP_OK;
    int id = lp_hook_find(l->m, name);
    if (id < 0) LP_FAIL(LP_ERR_NOT_FOUND, "the model has no hook '%s' (see `loupe info MODEL`)", name);
    if (l->n_hooks == LIVE_MAX_HOOKS) LP_FAIL(LP_ERR_ARG, "at most %d hooks train from one live stream", LIVE_MAX_HOOKS);
    int64_t shape[LP_MAX_DIMS];
    int nd = lp_hook_shape(l->m, id, 1, 1, shape);
    if (strstr(name, "hook_pattern") || strstr(name, "hook_attn_scores")) LP_FAIL(LP_ERR_ARG, "'%s': SAEs train on per-token hooks", name);
    int i = l->n_hooks++;
    snprintf(l->name[i], sizeof l->name[i], "%s", name);
    l->d[i] = (int)lp_shape_numel(shape + 2, nd - 2);
    l->c0 = -1, l->cache_cap = 0; /* the next read captures the new hook too, into new caches */
    *idx = i, *d = l->d[i];
    return LP_OK;
}

/* Tokens [t0, t0 + n) of the endless stream (the rows read round and round), every hook. */
static lp_status live_fill(lp_live *l, int64_t t0, int64_t n) {
    lp_model *m = l->m;
    if ((size_t)n > l->cache_cap) {
        for (int i = 0; i < l->n_hooks; i++) {
            free(l->cache[i]);
            l->cache[i] = NULL;
            if (!(l->cache[i] = malloc((size_t)n * l->d[i] * sizeof(float)))) LP_FAIL(LP_ERR_OOM, "out of memory for live activations");
        }
        l->cache_cap = (size_t)n;
    }
    size_t per = 0;
    for (int i = 0; i < l->n_hooks; i++) per += (size_t)l->d[i];
    size_t need = (size_t)l->bseq * l->ctx * per;
    if (need > l->tmp_cap) {
        free(l->tmp);
        if (!(l->tmp = malloc(need * sizeof(float)))) LP_FAIL(LP_ERR_OOM, "out of memory for live activations");
        l->tmp_cap = need;
    }
    lp_hooks_clear(m);
    for (int i = 0; i < l->n_hooks; i++) LP_CHECK(lp_hook_capture(m, l->name[i], NULL, 0, NULL));
    int32_t *rows = malloc((size_t)l->bseq * l->ctx * sizeof(int32_t));
    if (!rows) LP_FAIL(LP_ERR_OOM, "out of memory");
    lp_status st = LP_OK;
    int64_t r_first = t0 / l->ctx, r_last = (t0 + n - 1) / l->ctx;
    for (int64_t r = r_first; st == LP_OK && r <= r_last; r += l->bseq) {
        int nb = (int)(r_last + 1 - r < l->bseq ? r_last + 1 - r : l->bseq);
        for (int b = 0; b < nb; b++) memcpy(rows + (size_t)b * l->ctx, l->tok + ((r + b) % l->n_seq) * l->ctx, l->ctx * sizeof(int32_t));
        st = lp_model_forward(m, rows, nb, l->ctx, 0);
        float *o = l->tmp;
        for (int i = 0; st == LP_OK && i < l->n_hooks; i++) {
            size_t cnt = (size_t)nb * l->ctx * l->d[i];
            st = lp_capture_read_f32(m, l->name[i], o, cnt);
            /* the batch covers stream tokens [r*ctx, (r+nb)*ctx); keep those inside [t0, t0+n) */
            int64_t a = r * l->ctx > t0 ? r * l->ctx : t0, z = (r + nb) * l->ctx < t0 + n ? (r + nb) * l->ctx : t0 + n;
            if (st == LP_OK)
                memcpy(l->cache[i] + (size_t)(a - t0) * l->d[i], o + (size_t)(a - r * l->ctx) * l->d[i], (size_t)(z - a) * l->d[i] * 4);
            o += cnt;
        }
    }
    free(rows);
    lp_hooks_clear(m);
    if (st == LP_OK) l->c0 = t0, l->cn = n;
    return st;
}

static lp_status live_read(lp_live *l, int hook, int64_t t0, int64_t n, float *dst) {
    if (!(l->c0 >= 0 && t0 >= l->c0 && t0 + n <= l->c0 + l->cn)) LP_CHECK(live_fill(l, t0, n));
    memcpy(dst, l->cache[hook] + (size_t)(t0 - l->c0) * l->d[hook], (size_t)n * l->d[hook] * 4);
    return LP_OK;
}

typedef struct trainer {
    const lp_sae_train_cfg *t;
    lp_ctx *c;
    lp_sae *s;
    sae_runner *r;
    lp_store *in, *outs;            /* the data: a store, or */
    lp_live *live;                  /* a live model stream */
    int live_in, live_out;          /* its hook indices (live_out < 0: an SAE) */
    int transcoder;
    int N, D, Do, S;
    float *grad, *adam_m, *adam_v; /* device, the layout of s->mem */
    lp_sae gview;                   /* grad pointers carved like the SAE's */
    /* data */
    int64_t W, n_tokens, win;       /* tokens per window, in the store, window loaded (-1 none) */
    float *win_x, *win_y;           /* device [W, D], [W, Do] */
    int32_t *perm;                  /* device [W] */
    float *host_x, *host_y;
    int32_t *host_perm;
    /* state */
    int64_t step, tokens_done;
    double scale, thr_ema;
    int64_t *since;                 /* host [S]: tokens since each latent last fired */
    int64_t *counts_host;
    float *colsum_host, *mask_host;
    /* log window */
    double acc_mse, acc_sse, acc_sst, acc_l0, acc_sparsity, acc_aux, acc_n;
    int metrics;                    /* metrics.jsonl, open for appending (-1: not open) */
    char metrics_path[1200];
    int64_t ckpt_step;              /* step of the newest checkpoint on disk (-1: none) */
    char store_id[64];              /* size and hash of the store's meta.json (shard list) */
    lp_lock lock;                   /* train.out, held for the run */
} trainer;


/* Tokens [t0, t0 + n) of the endless stream (the data read round and round) of the input
 * (out = 0) or the output hook (out = 1). */
static lp_status src_read(trainer *tr, int out, int64_t t0, int64_t n, float *dst) {
    if (tr->live) return live_read(tr->live, out ? tr->live_out : tr->live_in, t0, n, dst);
    const lp_store *st = out ? tr->outs : tr->in;
    int d = lp_store_d(st);
    int64_t total = lp_store_n_tokens(st);
    while (n > 0) {
        int64_t at = t0 % total, take = total - at < n ? total - at : n;
        LP_CHECK(lp_store_read(st, at, take, dst));
        dst += (size_t)take * d, t0 += take, n -= take;
    }
    return LP_OK;
}

static lp_status check_finite(const trainer *tr, const float *x, size_t n, int d, int64_t first_token, const char *hook) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i]))
            LP_FAIL(LP_ERR_FORMAT, "%s: '%s' has a non-finite value at token %lld (stream position; step %lld)", tr->live ? "live model" : tr->t->store, hook,
                    (long long)((first_token + (int64_t)(i / d)) % tr->n_tokens), (long long)tr->step);
    return LP_OK;
}

/* Loads window w (shuffled by a permutation seeded by (seed, w)) onto the device. */
static lp_status load_window(trainer *tr, int64_t w) {
    if (tr->win == w) return LP_OK;
    lp_ctx *c = tr->c;
    int64_t t0 = w * tr->W;
    LP_CHECK(src_read(tr, 0, t0, tr->W, tr->host_x));
    LP_CHECK(check_finite(tr, tr->host_x, (size_t)tr->W * tr->D, tr->D, t0, tr->s->cfg.hook_name));
    if (tr->scale != 1.0)
        for (size_t i = 0; i < (size_t)tr->W * tr->D; i++) tr->host_x[i] = (float)(tr->host_x[i] * tr->scale);
    LP_CHECK(lp_ctx_to_device(c, tr->win_x, tr->host_x, (size_t)tr->W * tr->D * 4));
    if (tr->transcoder) {
        LP_CHECK(src_read(tr, 1, t0, tr->W, tr->host_y));
        LP_CHECK(check_finite(tr, tr->host_y, (size_t)tr->W * tr->Do, tr->Do, t0, tr->s->cfg.hook_name_out));
        LP_CHECK(lp_ctx_to_device(c, tr->win_y, tr->host_y, (size_t)tr->W * tr->Do * 4));
    }
    uint64_t rng = tr->t->seed * 0x100000001B3ull + (uint64_t)w;
    for (int64_t i = 0; i < tr->W; i++) tr->host_perm[i] = (int32_t)i;
    for (int64_t i = tr->W - 1; i > 0; i--) { /* Fisher-Yates */
        int64_t j = (int64_t)(lp_rng_next(&rng) % (uint64_t)(i + 1));
        int32_t tmp = tr->host_perm[i];
        tr->host_perm[i] = tr->host_perm[j], tr->host_perm[j] = tmp;
    }
    LP_CHECK(lp_ctx_to_device(c, tr->perm, tr->host_perm, (size_t)tr->W * 4));
    tr->win = w;
    return LP_OK;
}

/* The batch of step `step` into r->x (and r->y). */
static lp_status load_batch(trainer *tr, int64_t step) {
    int64_t per_win = tr->W / tr->N, w = step / per_win, b = step % per_win;
    LP_CHECK(load_window(tr, w));
    const int32_t *p = tr->perm + b * tr->N;
    LP_CHECK(lp_embed(tr->c, tr->r->x, p, tr->win_x, tr->N, tr->D)); /* a row gather */
    if (tr->transcoder) LP_CHECK(lp_embed(tr->c, tr->r->y, p, tr->win_y, tr->N, tr->Do));
    return LP_OK;
}

static double lr_at(const lp_sae_train_cfg *t, int64_t step, int64_t total) {
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
static lp_status init_params(trainer *tr) {
    lp_sae *s = tr->s;
    const lp_sae_cfg *cf = &s->cfg;
    size_t S = cf->d_sae, D = cf->d_in, Do = cf->d_out;
    float *wd = malloc(S * Do * sizeof(float)), *we = malloc(D * S * sizeof(float));
    lp_status st = wd && we ? LP_OK : lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of memory");
    uint64_t rng = tr->t->seed ^ 0xD1B54A32D192ED03ull;
    double bound = 1.0 / sqrt((double)Do);
    for (size_t i = 0; st == LP_OK && i < S; i++) {
        double nrm = 0;
        for (size_t j = 0; j < Do; j++) {
            double u = lp_rng_uniform(&rng);
            wd[i * Do + j] = (float)((2 * u - 1) * bound);
            nrm += (double)wd[i * Do + j] * wd[i * Do + j];
        }
        nrm = sqrt(nrm);
        for (size_t j = 0; j < Do; j++) wd[i * Do + j] = (float)(wd[i * Do + j] / nrm);
    }
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
static lp_status init_data_stats(trainer *tr) {
    const lp_sae_train_cfg *t = tr->t;
    int64_t n = tr->W < 20000 ? tr->W : 20000;
    int D = tr->D, Do = tr->Do;
    float *x = malloc((size_t)n * D * sizeof(float));
    if (!x) LP_FAIL(LP_ERR_OOM, "out of memory");
    lp_status st = src_read(tr, 0, 0, n, x);
    if (st == LP_OK) st = check_finite(tr, x, (size_t)n * D, D, 0, tr->s->cfg.hook_name);
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
        st = y ? src_read(tr, 1, 0, n, y) : lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of memory");
        src = y, dd = Do;
    }
    double sc = tr->transcoder ? 1.0 : tr->scale;
    double *med = calloc(dd, sizeof(double));
    if (st == LP_OK && !med) st = lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of memory");
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
        st = b ? lp_ctx_to_device(tr->c, tr->s->b_dec, b, (size_t)dd * 4) : lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of memory");
        free(b);
    }
    free(med);
    free(x);
    free(y);
    return st;
}

/* One step: forward, losses, gradients, Adam, decoder renormalisation, dead tracking.
 * Returns the batch's losses in *mse, *sparsity (the L1 or L0 term), *aux. */
static lp_status train_step(trainer *tr, double lr, double l1, double *mse, double *sparse_loss, double *aux_loss,
                            double *sse, double *sst, double *l0) {
    sae_runner *r = tr->r;
    lp_sae *s = tr->s, *g = &tr->gview;
    lp_ctx *c = tr->c;
    const lp_sae_cfg *cf = &s->cfg;
    int N = tr->N, D = tr->D, Do = tr->Do, S = tr->S, K = r->K;
    const float *y = tr->transcoder ? r->y : r->x;
    LP_CHECK(lp_ctx_memset0(c, tr->grad, s->n_floats * 4));
    LP_CHECK(lp_sae_runner_forward(r, N, 1));

    /* reconstruction: mse = sum_d (x_hat - y)^2, mean over tokens; dL/dx_hat = 2 (x_hat - y) / N */
    double sums[4];
    LP_CHECK(lp_sae_recon_sums(c, sums, y, r->xhat, N, Do));
    *mse = sums[0] / N, *sse = sums[0], *sst = sums[1];
    LP_CHECK(lp_affine(c, r->dxhat, y, r->neg1, NULL, N, Do));           /* -y */
    LP_CHECK(lp_add(c, r->dxhat, r->dxhat, r->xhat, (size_t)N * Do));    /* x_hat - y */
    LP_CHECK(lp_sae_scale(c, r->dxhat, (float)(2.0 / N), (size_t)N * Do));
    LP_CHECK(lp_col_sum(c, g->b_dec, r->dxhat, N, Do, 1.0f));
    if (cf->skip) LP_CHECK(lp_matmul_at(c, g->W_skip, r->x, r->dxhat, N, D, Do, 1.0f));

    /* fired latents this batch: L0 and dead tracking */
    LP_CHECK(lp_ctx_memset0(c, r->counts, (size_t)S * 8));
    LP_CHECK(lp_sae_fire_counts(c, r->counts, cf->arch == LP_SAE_TOPK ? r->idx : NULL, r->val, r->f, N, K, S));
    LP_CHECK(lp_ctx_to_host(c, tr->counts_host, r->counts, (size_t)S * 8));
    int64_t fired = 0;
    for (int i = 0; i < S; i++) fired += tr->counts_host[i];
    *l0 = (double)fired / N;
    *sparse_loss = 0, *aux_loss = 0;

    if (cf->arch == LP_SAE_TOPK) {
        LP_CHECK(lp_sae_decode_sparse_grad(c, r->dval, g->W_dec, r->dxhat, r->idx, r->val, s->W_dec, N, K, Do));
        LP_CHECK(lp_sae_relu_grad(c, r->dval, r->dval, r->val, (size_t)N * K)); /* the relu of the top-k values */
        LP_CHECK(lp_sae_encode_sparse_grad(c, g->W_enc, g->b_enc, r->xin_used, r->idx, r->dval, N, K, D, S));
        if (cf->apply_b_dec_to_input) { /* x_in = x - b_dec: d b_dec -= W_enc[:, idx] dpre */
            LP_CHECK(lp_sae_encode_sparse_input_grad(c, r->dxin, r->dval, r->idx, s->W_enc, N, K, D, S));
            LP_CHECK(lp_col_sum(c, r->nbdec, r->dxin, N, D, 0.0f));
            LP_CHECK(lp_affine(c, g->b_dec, r->nbdec, r->neg1, g->b_dec, 1, D));
        }
    } else {
        /* dense: dW_dec = f^T dx_hat, df = dx_hat W_dec^T */
        LP_CHECK(lp_matmul_at(c, g->W_dec, r->f, r->dxhat, N, S, Do, 1.0f));
        LP_CHECK(lp_matmul(c, r->df, r->dxhat, s->W_dec, NULL, N, Do, S, 1));
        if (cf->arch == LP_SAE_STANDARD) {
            /* L1 weighted by decoder norms: l1 * mean_n sum_s f ||W_dec[s]||; its W_dec gradient is
             * parallel to each row and removed below, so only df changes */
            LP_CHECK(lp_rows_norm(c, r->norms, s->W_dec, S, Do));
            LP_CHECK(lp_col_sum(c, r->colsum, r->f, N, S, 0.0f));
            LP_CHECK(lp_ctx_to_host(c, tr->colsum_host, r->colsum, (size_t)S * 4));
            float *nh = tr->mask_host; /* scratch */
            LP_CHECK(lp_ctx_to_host(c, nh, r->norms, (size_t)S * 4));
            double sp = 0;
            for (int i = 0; i < S; i++) sp += (double)tr->colsum_host[i] * nh[i];
            *sparse_loss = l1 * sp / N;
            LP_CHECK(lp_sae_scale(c, r->norms, (float)(l1 / N), (size_t)S));
            LP_CHECK(lp_affine(c, r->df, r->df, r->ones, r->norms, N, S));
            LP_CHECK(lp_sae_relu_grad(c, r->df, r->df, r->pre, (size_t)N * S));
        } else if (cf->arch == LP_SAE_JUMPRELU) {
            *sparse_loss = tr->t->l0_coefficient * *l0;
            LP_CHECK(lp_sae_jumprelu_grad(c, r->df, g->threshold, r->df, r->pre, s->threshold, cf->jumprelu_bandwidth,
                                          (float)(tr->t->l0_coefficient / N), N, S));
            LP_CHECK(lp_sae_relu_grad(c, r->df, r->df, r->pre, (size_t)N * S)); /* the relu in front */
        } else { /* batchtopk: the selection is a mask */
            /* colsum is scratch for the (unused) threshold pseudo-gradient */
            LP_CHECK(lp_sae_jumprelu_grad(c, r->df, r->colsum, r->df, r->pre, r->thr, 1.0f, 0.0f, N, S));
        }
        LP_CHECK(lp_matmul_at(c, g->W_enc, r->xin_used, r->df, N, D, S, 1.0f));
        LP_CHECK(lp_col_sum(c, g->b_enc, r->df, N, S, 1.0f));
        if (cf->apply_b_dec_to_input) {
            LP_CHECK(lp_matmul(c, r->dxin, r->df, s->W_enc, NULL, N, S, D, 1));
            LP_CHECK(lp_col_sum(c, r->nbdec, r->dxin, N, D, 0.0f));
            LP_CHECK(lp_affine(c, g->b_dec, r->nbdec, r->neg1, g->b_dec, 1, D));
        }
    }

    /* dead latents: no firing for dead_feature_window tokens */
    int n_dead = 0;
    for (int i = 0; i < S; i++) {
        tr->since[i] = tr->counts_host[i] ? 0 : tr->since[i] + N;
        n_dead += tr->since[i] >= tr->t->dead_feature_window;
    }
    tr->r->n_dead = n_dead;
    if (r->Ka > 0 && n_dead > 0 && tr->t->aux_k_coefficient > 0) {
        /* AuxK: the dead latents' top activations reconstruct the residual y - x_hat */
        int ka = r->Ka < n_dead ? r->Ka : n_dead;
        for (int i = 0; i < S; i++) tr->mask_host[i] = tr->since[i] >= tr->t->dead_feature_window ? -INFINITY : INFINITY;
        LP_CHECK(lp_ctx_to_device(c, r->mask, tr->mask_host, (size_t)S * 4));
        LP_CHECK(lp_sae_jumprelu(c, r->faux, r->pre, r->mask, N, S)); /* pre on dead latents, 0 elsewhere */
        LP_CHECK(lp_sae_topk(c, r->idx_aux, r->val_aux, r->faux, N, S, ka));
        LP_CHECK(lp_affine(c, r->e, r->xhat, r->neg1, NULL, N, Do));
        LP_CHECK(lp_add(c, r->e, r->e, y, (size_t)N * Do)); /* e = y - x_hat, held fixed */
        LP_CHECK(lp_sae_decode_sparse(c, r->ehat, r->idx_aux, r->val_aux, s->W_dec, NULL, N, ka, Do));
        double as[4];
        LP_CHECK(lp_sae_recon_sums(c, as, r->e, r->ehat, N, Do));
        double w = tr->t->aux_k_coefficient * fmin((double)n_dead / ka, 1.0);
        *aux_loss = w * as[0] / N;
        /* d aux / d e_hat = 2 w (e_hat - e) / N */
        LP_CHECK(lp_affine(c, r->e, r->e, r->neg1, NULL, N, Do));
        LP_CHECK(lp_add(c, r->ehat, r->ehat, r->e, (size_t)N * Do));
        LP_CHECK(lp_sae_scale(c, r->ehat, (float)(2.0 * w / N), (size_t)N * Do));
        LP_CHECK(lp_sae_decode_sparse_grad(c, r->dval_aux, g->W_dec, r->ehat, r->idx_aux, r->val_aux, s->W_dec, N, ka, Do));
        LP_CHECK(lp_sae_relu_grad(c, r->dval_aux, r->dval_aux, r->val_aux, (size_t)N * ka));
        LP_CHECK(lp_sae_encode_sparse_grad(c, g->W_enc, g->b_enc, r->xin_used, r->idx_aux, r->dval_aux, N, ka, D, S));
    }

    /* unit-norm decoder: no gradient along the rows, Adam, renormalise */
    LP_CHECK(lp_rows_remove_parallel(c, g->W_dec, s->W_dec, S, Do));
    LP_CHECK(lp_adam_step(c, (float *)s->mem, tr->grad, tr->adam_m, tr->adam_v, s->n_floats, (float)lr, (float)tr->t->adam_beta1,
                          (float)tr->t->adam_beta2, (float)tr->t->adam_eps, (int)(tr->step + 1)));
    LP_CHECK(lp_rows_unit_norm(c, s->W_dec, S, Do));
    if (cf->arch == LP_SAE_BATCHTOPK) { /* the exported threshold: a running mean of the batch thresholds */
        tr->thr_ema = tr->step == 0 ? r->batch_t : 0.95 * tr->thr_ema + 0.05 * r->batch_t;
    }
    return LP_OK;
}

/* ---- checkpoints ---- */

/* What must match for a checkpoint to be resumed. */
static void signature(const trainer *tr, char *buf, size_t n) {
    const lp_sae_train_cfg *t = tr->t;
    const lp_sae_cfg *s = &tr->s->cfg;
    snprintf(buf, n, "%s|%s|%s|%d|%d|%d|%d|%d|%s|%a|%a|%a|%a|%lld|%lld|%s|%a|%lld|%a|%a|%a|%d|%lld|%d|%s|%lld|%lld|%llu|%s|%s",
             lp_sae_arch_name(s->arch), s->hook_name, s->hook_name_out, s->d_in, s->d_sae, s->d_out, s->k, s->apply_b_dec_to_input,
             s->normalize, t->lr, t->adam_beta1, t->adam_beta2, t->adam_eps, (long long)t->lr_warm_up_steps, (long long)t->lr_decay_steps,
             t->lr_scheduler, t->l1_coefficient, (long long)t->l1_warm_up_steps, t->l0_coefficient, t->jumprelu_init_threshold,
             t->aux_k_coefficient, t->aux_k, (long long)t->tokens, t->batch_tokens, t->b_dec_init, (long long)t->dead_feature_window,
             (long long)tr->W, (unsigned long long)t->seed, t->store ? t->store : "(live)", tr->store_id);
}

static int by_name(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Keeps the `keep` newest complete checkpoints (their names sort by step). */
static lp_status prune_checkpoints(const char *out, int keep) {
    char dir[1200], path[1500];
    snprintf(dir, sizeof dir, "%s/checkpoints", out);
    DIR *d = opendir(dir);
    if (!d) return LP_OK;
    char *names[4096];
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < 4096)
        if (strncmp(e->d_name, "step-", 5) == 0 && strlen(e->d_name) == 14) names[n++] = strdup(e->d_name);
    closedir(d);
    qsort(names, n, sizeof *names, by_name);
    lp_status st = LP_OK;
    for (int i = 0; i < n; i++) {
        if (names[i] && i < n - keep && st == LP_OK) {
            snprintf(path, sizeof path, "%s/%s", dir, names[i]);
            st = lp_remove_tree(path);
        }
        free(names[i]);
    }
    return st;
}

static lp_status save_checkpoint(trainer *tr) {
    lp_ctx *c = tr->c;
    size_t nf = tr->s->n_floats;
    char dir[1200], tmp[1300], path[1400];
    snprintf(dir, sizeof dir, "%s/checkpoints/step-%09lld", tr->t->out, (long long)tr->step);
    lp_tmp_name(tmp, sizeof tmp, dir); /* a killed run's leftovers went at the start, under the lock */
    LP_CHECK(lp_mkdir_p(tmp));
    float *h = malloc(3 * nf * sizeof(float));
    if (!h) LP_FAIL(LP_ERR_OOM, "out of memory for a checkpoint");
    lp_status st = lp_ctx_to_host(c, h, tr->s->mem, nf * 4);
    if (st == LP_OK) st = lp_ctx_to_host(c, h + nf, tr->adam_m, nf * 4);
    if (st == LP_OK) st = lp_ctx_to_host(c, h + 2 * nf, tr->adam_v, nf * 4);
    lp_st_spec specs[4] = {
        {.name = "params", .dtype = LP_F32, .ndim = 1, .shape = {(int64_t)nf}},
        {.name = "adam_m", .dtype = LP_F32, .ndim = 1, .shape = {(int64_t)nf}},
        {.name = "adam_v", .dtype = LP_F32, .ndim = 1, .shape = {(int64_t)nf}},
        {.name = "since_fired", .dtype = LP_I64, .ndim = 1, .shape = {tr->S}},
    };
    const void *datas[4] = {h, h + nf, h + 2 * nf, tr->since};
    snprintf(path, sizeof path, "%s/state.safetensors", tmp);
    if (st == LP_OK) st = lp_st_write(path, specs, datas, 4, NULL);
    free(h);
    char sig[4096];
    signature(tr, sig, sizeof sig);
    cJSON *j = cJSON_CreateObject();
    cJSON_AddNumberToObject(j, "step", (double)tr->step);
    cJSON_AddNumberToObject(j, "tokens", (double)tr->tokens_done);
    char hex[64];
    snprintf(hex, sizeof hex, "%a", tr->scale); /* exact: a resumed run must continue bit for bit */
    cJSON_AddStringToObject(j, "scale", hex);
    snprintf(hex, sizeof hex, "%a", tr->thr_ema);
    cJSON_AddStringToObject(j, "batchtopk_threshold", hex);
    /* the log window's running sums: a checkpoint between two metrics lines resumes them,
     * so the next line equals an uninterrupted run's */
    cJSON *acc = cJSON_AddArrayToObject(j, "log_window");
    const double accs[7] = {tr->acc_mse, tr->acc_sse, tr->acc_sst, tr->acc_l0, tr->acc_sparsity, tr->acc_aux, tr->acc_n};
    for (int i = 0; i < 7; i++) {
        snprintf(hex, sizeof hex, "%a", accs[i]);
        cJSON_AddItemToArray(acc, cJSON_CreateString(hex));
    }
    cJSON_AddStringToObject(j, "store_fingerprint", tr->store_id);
    cJSON_AddStringToObject(j, "signature", sig);
    char *txt = cJSON_Print(j);
    cJSON_Delete(j);
    snprintf(path, sizeof path, "%s/state.json", tmp);
    if (st == LP_OK) st = lp_write_file_atomic(path, txt, strlen(txt));
    free(txt);
    if (st == LP_OK && rename(tmp, dir) != 0)
        st = lp_set_error(lp_write_status(errno), __FILE__, __LINE__, "%s: cannot rename the checkpoint into place: %s", dir, strerror(errno));
    if (st != LP_OK) {
        lp_remove_tree(tmp);
        return st;
    }
    tr->ckpt_step = tr->step;
    return prune_checkpoints(tr->t->out, 2);
}

/* The newest complete checkpoint whose signature matches; *found = 0 when none. */
static lp_status load_checkpoint(trainer *tr, int *found) {
    *found = 0;
    char dir[1200];
    snprintf(dir, sizeof dir, "%s/checkpoints", tr->t->out);
    DIR *d = opendir(dir);
    if (!d) return LP_OK;
    char best[256] = "";
    struct dirent *e;
    while ((e = readdir(d)))
        if (strncmp(e->d_name, "step-", 5) == 0 && strlen(e->d_name) == 14 && strcmp(e->d_name, best) > 0)
            snprintf(best, sizeof best, "%s", e->d_name);
    closedir(d);
    if (!best[0]) return LP_OK;
    char path[1600];
    snprintf(path, sizeof path, "%s/%s/state.json", dir, best);
    size_t n;
    char *txt = lp_read_file(path, &n);
    if (!txt) LP_FAIL(LP_ERR_IO, "%s: cannot read", path);
    cJSON *j = cJSON_ParseWithLength(txt, n);
    free(txt);
    char sig[4096];
    signature(tr, sig, sizeof sig);
    const cJSON *js = cJSON_GetObjectItemCaseSensitive(j, "signature"), *jf = cJSON_GetObjectItemCaseSensitive(j, "store_fingerprint");
    if (cJSON_IsString(jf) && strcmp(jf->valuestring, tr->store_id) != 0) { /* the settings may match, the data does not */
        cJSON_Delete(j);
        LP_FAIL(LP_ERR_ARG, "data.store: %s changed since the checkpoint %s was written (its meta.json: shards or their source differ); "
                            "use another train.out or remove it", tr->t->store, path);
    }
    if (!cJSON_IsString(js) || strcmp(js->valuestring, sig) != 0) {
        cJSON_Delete(j);
        LP_FAIL(LP_ERR_ARG, "%s: a checkpoint of a run with other settings is in %s; use another train.out or remove it", path, tr->t->out);
    }
    const cJSON *js_step = cJSON_GetObjectItemCaseSensitive(j, "step"), *js_tok = cJSON_GetObjectItemCaseSensitive(j, "tokens");
    const cJSON *js_scale = cJSON_GetObjectItemCaseSensitive(j, "scale"), *js_thr = cJSON_GetObjectItemCaseSensitive(j, "batchtopk_threshold");
    if (!cJSON_IsNumber(js_step) || !cJSON_IsNumber(js_tok) || !cJSON_IsString(js_scale) || !cJSON_IsString(js_thr)) {
        cJSON_Delete(j);
        LP_FAIL(LP_ERR_FORMAT, "%s: step, tokens, scale or batchtopk_threshold is missing", path);
    }
    /* counts are whole and in range before the cast (a double outside int64 is undefined
     * behaviour to convert); the two hex floats are finite and nothing else */
    const cJSON *cnt[2] = {js_step, js_tok};
    for (int i = 0; i < 2; i++)
        if (!(cnt[i]->valuedouble >= 0 && cnt[i]->valuedouble <= 0x1p53) || cnt[i]->valuedouble != floor(cnt[i]->valuedouble)) {
            lp_status bad = lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__, "%s: '%s' is not a whole number in [0, 2^53]", path,
                                         cnt[i]->string);
            cJSON_Delete(j);
            return bad;
        }
    const cJSON *hex[2] = {js_scale, js_thr};
    double val[2];
    for (int i = 0; i < 2; i++) {
        char *end;
        val[i] = strtod(hex[i]->valuestring, &end);
        if (end == hex[i]->valuestring || *end || !isfinite(val[i])) {
            lp_status bad = lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__, "%s: '%s' is not a finite number", path, hex[i]->string);
            cJSON_Delete(j);
            return bad;
        }
    }
    tr->step = (int64_t)js_step->valuedouble, tr->tokens_done = (int64_t)js_tok->valuedouble;
    tr->scale = val[0], tr->thr_ema = val[1];
    const cJSON *acc = cJSON_GetObjectItemCaseSensitive(j, "log_window");
    double *accs[7] = {&tr->acc_mse, &tr->acc_sse, &tr->acc_sst, &tr->acc_l0, &tr->acc_sparsity, &tr->acc_aux, &tr->acc_n};
    if (cJSON_GetArraySize(acc) != 7) {
        cJSON_Delete(j);
        LP_FAIL(LP_ERR_FORMAT, "%s: log_window is missing (a checkpoint of an older loupe); use another train.out or remove it", path);
    }
    int i = 0;
    for (const cJSON *e = acc->child; e; e = e->next, i++) {
        char *end = NULL;
        *accs[i] = cJSON_IsString(e) ? strtod(e->valuestring, &end) : NAN;
        if (!end || end == e->valuestring || *end || !isfinite(*accs[i])) {
            cJSON_Delete(j);
            LP_FAIL(LP_ERR_FORMAT, "%s: log_window[%d] is not a finite number", path, i);
        }
    }
    cJSON_Delete(j);
    snprintf(path, sizeof path, "%s/%s/state.safetensors", dir, best);
    lp_st_file f;
    LP_CHECK(lp_st_open(&f, path));
    size_t nf = tr->s->n_floats;
    const lp_st_tensor *p = lp_st_find(&f, "params"), *m = lp_st_find(&f, "adam_m"), *v = lp_st_find(&f, "adam_v"),
                       *sf = lp_st_find(&f, "since_fired");
    lp_status st = LP_OK;
    const lp_st_tensor *fl[3] = {p, m, v};
    for (int i = 0; i < 3 && st == LP_OK; i++) /* every tensor whole and of the right type before any copy */
        if (!fl[i] || fl[i]->dtype != LP_F32 || fl[i]->ndim != 1 || fl[i]->shape[0] != (int64_t)nf)
            st = lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__, "%s: not a checkpoint of this SAE", path);
    if (st == LP_OK && (!sf || sf->dtype != LP_I64 || sf->ndim != 1 || sf->shape[0] != tr->S))
        st = lp_set_error(LP_ERR_FORMAT, __FILE__, __LINE__, "%s: not a checkpoint of this SAE", path);
    if (st == LP_OK) st = lp_ctx_to_device(tr->c, tr->s->mem, p->data, nf * 4);
    if (st == LP_OK) st = lp_ctx_to_device(tr->c, tr->adam_m, m->data, nf * 4);
    if (st == LP_OK) st = lp_ctx_to_device(tr->c, tr->adam_v, v->data, nf * 4);
    if (st == LP_OK) memcpy(tr->since, sf->data, (size_t)tr->S * 8);
    lp_st_close(&f);
    if (st == LP_OK) *found = 1, tr->ckpt_step = tr->step;
    return st;
}

/* Keeps the metrics lines of steps the checkpoint covers (a killed run may have logged more). */
static lp_status trim_metrics(const char *path, int64_t upto_step) {
    size_t n;
    char *txt = lp_read_file(path, &n);
    if (!txt) return LP_OK; /* no metrics yet */
    char *out = malloc(n + 2); /* every line is written back with a newline, the last may not have had one */
    if (!out) {
        free(txt);
        LP_FAIL(LP_ERR_OOM, "out of memory");
    }
    size_t o = 0;
    for (char *line = strtok(txt, "\n"); line; line = strtok(NULL, "\n")) {
        cJSON *j = cJSON_Parse(line);
        const cJSON *s = cJSON_GetObjectItemCaseSensitive(j, "step");
        if (cJSON_IsNumber(s) && s->valuedouble <= upto_step) o += (size_t)sprintf(out + o, "%s\n", line);
        cJSON_Delete(j);
    }
    lp_status st = lp_write_file_atomic(path, out, o); /* never a half-trimmed file */
    free(out), free(txt);
    return st;
}

/* The report of a run that was already finished: the figures of its last metrics line. */
static void last_metrics(const char *path, lp_sae_train_report *rep) {
    size_t n;
    char *txt = lp_read_file(path, &n);
    if (!txt) return;
    char *last = NULL;
    for (char *line = strtok(txt, "\n"); line; line = strtok(NULL, "\n")) last = line;
    cJSON *j = last ? cJSON_Parse(last) : NULL;
    const cJSON *mse = cJSON_GetObjectItemCaseSensitive(j, "losses/mse_loss"), *ev = cJSON_GetObjectItemCaseSensitive(j, "metrics/explained_variance");
    const cJSON *l0 = cJSON_GetObjectItemCaseSensitive(j, "metrics/l0"), *dead = cJSON_GetObjectItemCaseSensitive(j, "sparsity/dead_features");
    if (cJSON_IsNumber(mse)) rep->mse = mse->valuedouble;
    if (cJSON_IsNumber(ev)) rep->explained_variance = ev->valuedouble;
    if (cJSON_IsNumber(l0)) rep->l0 = l0->valuedouble;
    if (cJSON_IsNumber(dead)) rep->dead = dead->valueint;
    cJSON_Delete(j);
    free(txt);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void trainer_free(trainer *tr) {
    lp_ctx *c = tr->c;
    lp_sae_runner_free(tr->r);
    lp_ctx_release(c, tr->grad);
    lp_ctx_release(c, tr->adam_m);
    lp_ctx_release(c, tr->adam_v);
    lp_ctx_release(c, tr->win_x);
    lp_ctx_release(c, tr->win_y);
    lp_ctx_release(c, tr->perm);
    free(tr->host_x);
    free(tr->host_y);
    free(tr->host_perm);
    free(tr->since);
    free(tr->counts_host);
    free(tr->colsum_host);
    free(tr->mask_host);
    lp_sae_free(tr->s, c);
    lp_store_close(tr->in);
    lp_store_close(tr->outs);
    if (tr->metrics >= 0) close(tr->metrics);
    lp_lock_release(&tr->lock);
}

/* The store's identity beyond its path: its meta.json (the shard list and what they were
 * made from), or without one the shard files' names and sizes. */
static lp_status store_fingerprint(const char *store, char *id, size_t n) {
    char meta[1200];
    snprintf(meta, sizeof meta, "%s/meta.json", store);
    int64_t size;
    uint64_t hash;
    LP_CHECK(lp_fingerprint(access(meta, F_OK) == 0 ? meta : store, &size, &hash));
    snprintf(id, n, "%lld:%016llx", (long long)size, (unsigned long long)hash);
    return LP_OK;
}

static lp_status setup(trainer *tr, const lp_sae_train_cfg *t, lp_ctx *c, lp_live *live) {
    tr->t = t, tr->c = c, tr->win = -1, tr->scale = 1.0, tr->live = live, tr->metrics = -1, tr->lock.fd = -1, tr->ckpt_step = -1;
    lp_sae_cfg cf = t->sae;
    if (live) { /* the store key is not needed: check the rest with a stand-in */
        lp_sae_train_cfg tc = *t;
        tc.store = "(live)";
        LP_CHECK(lp_sae_train_check(&tc));
        LP_CHECK(live_hook(live, cf.hook_name, &tr->live_in, &cf.d_in));
        cf.d_out = cf.d_in, tr->live_out = -1;
        if (cf.hook_name_out[0]) LP_CHECK(live_hook(live, cf.hook_name_out, &tr->live_out, &cf.d_out));
        tr->n_tokens = live->n_seq * live->ctx;
        if (!cf.context_size) cf.context_size = live->ctx;
    } else {
        LP_CHECK(lp_sae_train_check(t));
        if (!t->allow_incomplete) LP_CHECK(lp_store_require_complete(t->store));
        LP_CHECK(store_fingerprint(t->store, tr->store_id, sizeof tr->store_id));
        LP_CHECK(lp_store_open(&tr->in, t->store, t->sae.hook_name));
        cf.d_in = lp_store_d(tr->in);
        cf.d_out = cf.d_in;
        if (cf.hook_name_out[0]) {
            LP_CHECK(lp_store_open(&tr->outs, t->store, cf.hook_name_out));
            cf.d_out = lp_store_d(tr->outs);
            if (lp_store_n_tokens(tr->outs) != lp_store_n_tokens(tr->in))
                LP_FAIL(LP_ERR_SHAPE, "%s: '%s' and '%s' hold different numbers of tokens", t->store, cf.hook_name, cf.hook_name_out);
        }
        if (!cf.model_name[0]) snprintf(cf.model_name, sizeof cf.model_name, "%s", lp_store_model(tr->in));
        if (!cf.context_size) cf.context_size = lp_store_context(tr->in);
        tr->n_tokens = lp_store_n_tokens(tr->in);
    }
    /* a transcoder: its own output hook; the input's b_dec makes no sense there */
    tr->transcoder = cf.hook_name_out[0] != 0;
    if (tr->transcoder) cf.apply_b_dec_to_input = 0;
    if (t->sae.d_in && t->sae.d_in != cf.d_in)
        LP_FAIL(LP_ERR_SHAPE, "sae.d_in = %d but '%s' has %d values per token", t->sae.d_in, cf.hook_name, cf.d_in);
    LP_CHECK(lp_sae_cfg_check(&cf));
    LP_CHECK(lp_sae_alloc(&tr->s, &cf, c));
    tr->N = t->batch_tokens, tr->D = cf.d_in, tr->Do = cf.d_out, tr->S = cf.d_sae;
    int64_t per = (t->shuffle_tokens + tr->N - 1) / tr->N;
    if (per < 1) per = 1;
    tr->W = per * tr->N;
    if (tr->W > INT32_MAX) LP_FAIL(LP_ERR_ARG, "train.shuffle_tokens %lld is too large", (long long)t->shuffle_tokens);
    LP_CHECK(lp_sae_runner_new(&tr->r, tr->s, c, tr->N, 1, t->aux_k));
    size_t nf = tr->s->n_floats;
    LP_CHECK(lp_ctx_alloc(c, nf * 4, (void **)&tr->grad));
    LP_CHECK(lp_ctx_alloc(c, nf * 4, (void **)&tr->adam_m));
    LP_CHECK(lp_ctx_alloc(c, nf * 4, (void **)&tr->adam_v));
    LP_CHECK(lp_ctx_memset0(c, tr->adam_m, nf * 4));
    LP_CHECK(lp_ctx_memset0(c, tr->adam_v, nf * 4));
    tr->gview = *tr->s; /* the gradient buffer carved like the parameters */
    ptrdiff_t base = (char *)tr->grad - (char *)tr->s->mem;
#define GV(f) tr->gview.f = tr->s->f ? (float *)((char *)tr->s->f + base) : NULL
    GV(W_enc), GV(b_enc), GV(W_dec), GV(b_dec), GV(threshold), GV(W_skip);
#undef GV
    LP_CHECK(lp_ctx_alloc(c, (size_t)tr->W * tr->D * 4, (void **)&tr->win_x));
    if (tr->transcoder) LP_CHECK(lp_ctx_alloc(c, (size_t)tr->W * tr->Do * 4, (void **)&tr->win_y));
    LP_CHECK(lp_ctx_alloc(c, (size_t)tr->W * 4, (void **)&tr->perm));
    tr->host_x = malloc((size_t)tr->W * tr->D * sizeof(float));
    tr->host_y = tr->transcoder ? malloc((size_t)tr->W * tr->Do * sizeof(float)) : NULL;
    tr->host_perm = malloc((size_t)tr->W * sizeof(int32_t));
    tr->since = calloc(tr->S, sizeof(int64_t));
    tr->counts_host = calloc(tr->S, sizeof(int64_t));
    tr->colsum_host = calloc(tr->S, sizeof(float));
    tr->mask_host = calloc(tr->S, sizeof(float));
    if (!tr->host_x || (tr->transcoder && !tr->host_y) || !tr->host_perm || !tr->since || !tr->counts_host || !tr->colsum_host || !tr->mask_host)
        LP_FAIL(LP_ERR_OOM, "out of host memory for the shuffle window (%lld tokens)", (long long)tr->W);
    return LP_OK;
}

static void progress(const trainer *tr, int64_t total_steps, double tps, double loss, double l0, int dead, int final) {
    if (!tr->t->on_progress) return;
    lp_train_progress p = {tr->tokens_done, tr->t->tokens, tr->step, total_steps, tps, loss, l0, dead, final};
    tr->t->on_progress(&p, tr->t->progress_user);
}

/* ---- the run: begin, steps, end (several trainers may share one live stream) ---- */

typedef struct run {
    trainer tr;
    int64_t total_steps, next_ckpt, tok_log;
    double t0, tlog;
    int done;
} run;

static lp_status run_begin(run *ru, const lp_sae_train_cfg *t, lp_ctx *c, lp_live *live, lp_sae_train_report *rep) {
    memset(rep, 0, sizeof *rep);
    trainer *tr = &ru->tr;
    LP_CHECK(setup(tr, t, c, live));
    /* one writer per train.out, then a dead run's half-written files can go */
    char ck[1300];
    snprintf(ck, sizeof ck, "%s/checkpoints", t->out);
    LP_CHECK(lp_lock_output(&tr->lock, t->out, 1));
    LP_CHECK(lp_remove_stale_tmp(t->out));
    LP_CHECK(lp_remove_stale_tmp(ck));
    int resumed = 0;
    LP_CHECK(load_checkpoint(tr, &resumed));
    if (!resumed) {
        LP_CHECK(init_params(tr));
        LP_CHECK(init_data_stats(tr));
    }
    char *mpath = tr->metrics_path;
    snprintf(mpath, sizeof tr->metrics_path, "%s/metrics.jsonl", t->out);
    if (resumed) LP_CHECK(trim_metrics(mpath, tr->step)); /* also drops a torn last line */
    tr->metrics = open(mpath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | (resumed ? 0 : O_TRUNC), 0644);
    if (tr->metrics < 0) LP_FAIL(lp_write_status(errno), "%s: cannot write: %s", mpath, strerror(errno));
    rep->resumed_tokens = tr->tokens_done;
    ru->total_steps = (t->tokens + tr->N - 1) / tr->N;
    if (resumed && tr->step >= ru->total_steps) rep->already_complete = 1, last_metrics(mpath, rep);
    ru->next_ckpt = t->checkpoint_every > 0 ? (tr->tokens_done / t->checkpoint_every + 1) * t->checkpoint_every : INT64_MAX;
    ru->t0 = ru->tlog = now_s();
    ru->tok_log = tr->tokens_done;
    ru->done = tr->step >= ru->total_steps;
    return LP_OK;
}

/* One training step with its logging and checkpoint. */
static lp_status run_step(run *ru, lp_sae_train_report *rep) {
    trainer *tr = &ru->tr;
    const lp_sae_train_cfg *t = tr->t;
    double lr = lr_at(t, tr->step, ru->total_steps);
    double l1 = t->l1_coefficient * (t->l1_warm_up_steps > 0 ? fmin(1.0, (double)(tr->step + 1) / t->l1_warm_up_steps) : 1.0);
    double mse, sp, aux, sse, sst, l0;
    LP_CHECK(load_batch(tr, tr->step));
    LP_CHECK(train_step(tr, lr, l1, &mse, &sp, &aux, &sse, &sst, &l0));
    double loss = mse + sp + aux;
    if (!isfinite(loss))
        LP_FAIL(LP_ERR_FORMAT, "%s: step %lld (batch of tokens %lld..%lld): the loss is %s; the last good checkpoint is kept in %s/checkpoints",
                t->out, (long long)tr->step, (long long)tr->tokens_done, (long long)(tr->tokens_done + tr->N - 1),
                isnan(loss) ? "NaN" : "infinite", t->out);
    tr->step++;
    tr->tokens_done += tr->N;
    tr->acc_mse += mse, tr->acc_sse += sse, tr->acc_sst += sst, tr->acc_l0 += l0, tr->acc_sparsity += sp, tr->acc_aux += aux, tr->acc_n++;
    if (tr->step % t->log_every == 0 || tr->step == ru->total_steps) {
        double now = now_s(), tps = (tr->tokens_done - ru->tok_log) / (now - ru->tlog > 1e-9 ? now - ru->tlog : 1e-9);
        double n = tr->acc_n;
        char line[1024];
        int len = snprintf(line, sizeof line,
                "{\"step\":%lld,\"details/n_training_tokens\":%lld,\"details/current_learning_rate\":%.6g,"
                "\"details/current_l1_coefficient\":%.6g,\"losses/mse_loss\":%.6g,\"losses/%s\":%.6g,"
                "\"losses/auxiliary_reconstruction_loss\":%.6g,\"losses/overall_loss\":%.6g,"
                "\"metrics/explained_variance\":%.6g,\"metrics/l0\":%.4f,\"sparsity/dead_features\":%d,"
                "\"details/tokens_per_s\":%.1f}\n",
                (long long)tr->step, (long long)tr->tokens_done, lr, l1, tr->acc_mse / n,
                t->sae.arch == LP_SAE_JUMPRELU ? "l0_loss" : "l1_loss", tr->acc_sparsity / n, tr->acc_aux / n,
                (tr->acc_mse + tr->acc_sparsity + tr->acc_aux) / n, 1 - tr->acc_sse / tr->acc_sst, tr->acc_l0 / n, tr->r->n_dead, tps);
        LP_CHECK(lp_write_fd(tr->metrics, line, (size_t)len < sizeof line ? (size_t)len : sizeof line - 1, -1, tr->metrics_path));
        rep->mse = tr->acc_mse / n, rep->explained_variance = 1 - tr->acc_sse / tr->acc_sst, rep->l0 = tr->acc_l0 / n;
        rep->dead = tr->r->n_dead;
        progress(tr, ru->total_steps, tps, (tr->acc_mse + tr->acc_sparsity + tr->acc_aux) / n, rep->l0, rep->dead, 0);
        tr->acc_mse = tr->acc_sse = tr->acc_sst = tr->acc_l0 = tr->acc_sparsity = tr->acc_aux = tr->acc_n = 0;
        ru->tlog = now, ru->tok_log = tr->tokens_done;
    }
    if (tr->tokens_done >= ru->next_ckpt && tr->step < ru->total_steps) {
        LP_CHECK(save_checkpoint(tr));
        ru->next_ckpt += t->checkpoint_every;
    }
    ru->done = tr->step >= ru->total_steps;
    if (t->stop_after > 0 && tr->tokens_done >= t->stop_after && !ru->done) ru->done = 2; /* a simulated kill */
    return LP_OK;
}

/* The final SAE (not after a simulated kill), the report, and the trainer freed. */
static lp_status run_end(run *ru, lp_status st, lp_sae_train_report *rep) {
    trainer *tr = &ru->tr;
    const lp_sae_train_cfg *t = tr->t;
    if (t && tr->s) progress(tr, ru->total_steps, 0, 0, rep->l0, rep->dead, 1);
    double secs = now_s() - ru->t0;
    if (st == LP_OK && ru->done == 2) rep->stopped = 1;
    else if (st == LP_OK && tr->s) {
        /* batchtopk is exported as jumprelu with its learned global threshold */
        if (tr->s->cfg.arch == LP_SAE_BATCHTOPK) {
            float *h = malloc((size_t)tr->S * sizeof(float));
            for (int i = 0; h && i < tr->S; i++) h[i] = (float)tr->thr_ema;
            st = h ? lp_ctx_to_device(tr->c, tr->s->threshold, h, (size_t)tr->S * 4) : lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of memory");
            free(h);
        }
        if (st == LP_OK) st = lp_sae_save(tr->s, tr->c, t->out, (float)tr->scale);
        /* a rerun of a finished job: its final checkpoint is already there */
        if (st == LP_OK && t->checkpoint_every > 0 && tr->ckpt_step != tr->step) st = save_checkpoint(tr);
    }
    if (tr->metrics >= 0) { /* the lines are written; make them durable and see the errors close reports */
        if (st == LP_OK && fsync(tr->metrics) != 0)
            st = lp_set_error(LP_ERR_WRITE, __FILE__, __LINE__, "%s: cannot flush: %s", tr->metrics_path, strerror(errno));
        if (close(tr->metrics) != 0 && st == LP_OK)
            st = lp_set_error(LP_ERR_WRITE, __FILE__, __LINE__, "%s: cannot close: %s", tr->metrics_path, strerror(errno));
        tr->metrics = -1;
    }
    rep->steps = tr->step, rep->tokens = tr->tokens_done;
    rep->tokens_per_s = secs > 0 ? (tr->tokens_done - rep->resumed_tokens) / secs : 0;
    if (tr->c) trainer_free(tr);
    return st;
}

lp_status lp_sae_train(const lp_sae_train_cfg *t, lp_ctx *c, lp_sae_train_report *rep) {
    run ru = {0};
    lp_status st = run_begin(&ru, t, c, NULL, rep);
    while (st == LP_OK && !ru.done) st = run_step(&ru, rep);
    return run_end(&ru, st, rep);
}

lp_status lp_sae_train_live(const lp_sae_train_cfg *cfgs, int n, lp_live *live, lp_ctx *c, lp_sae_train_report *reps) {
    if (n < 1) LP_FAIL(LP_ERR_ARG, "no SAEs to train");
    for (int i = 1; i < n; i++)
        if (cfgs[i].batch_tokens != cfgs[0].batch_tokens || cfgs[i].shuffle_tokens != cfgs[0].shuffle_tokens)
            LP_FAIL(LP_ERR_ARG, "SAEs sharing one live stream need the same train.batch_tokens and train.shuffle_tokens");
    run *ru = calloc(n, sizeof *ru);
    if (!ru) LP_FAIL(LP_ERR_OOM, "out of memory");
    lp_status st = LP_OK;
    int begun = 0;
    for (; begun < n && st == LP_OK; begun++) st = run_begin(&ru[begun], &cfgs[begun], c, live, &reps[begun]);
    /* in lockstep: each window of the stream is computed once for every SAE's hooks */
    for (int any = 1; st == LP_OK && any;) {
        any = 0;
        for (int i = 0; i < n && st == LP_OK; i++)
            if (!ru[i].done) st = run_step(&ru[i], &reps[i]), any = 1;
    }
    for (int i = 0; i < begun; i++) {
        lp_status e = run_end(&ru[i], st, &reps[i]);
        if (st == LP_OK) st = e;
    }
    free(ru);
    return st;
}
