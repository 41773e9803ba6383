/* sae_shard.c: SAE training with the latents sharded over the ranks of a tensor-parallel
 * group (dist.tp > 1; OpenAI's sharded top-k, Gao et al. 2024).
 *
 * Rank t of a group of tp holds latents [t S, (t+1) S) of the full d_sae = tp S: W_enc's
 * columns, b_enc, W_dec's rows and the threshold of those latents, their Adam moments and
 * their dead-latent counters, as a local SAE of d_sae = S that the single-process step runs
 * on. b_dec and W_skip are replicated: their gradients come from d x_hat, which every rank
 * of the group holds whole, so every rank makes the same update.
 *
 * What crosses the group per step:
 *   - TopK: each row's best K of each shard (value, global latent) gathered, each row's K
 *     best of those chosen exactly as lp_sae_topk chooses over the whole row (larger value
 *     first, ties to the lower latent; the gathered values are relu'd, so entries at 0 may
 *     be other latents than one process picks, but an entry of value 0 adds nothing to
 *     x_hat, to any gradient or to the fire counts). Every latent of the global top K is
 *     among its shard's own top K, so the choice is the one process's. BatchTopK: the
 *     radix selection of lp_sae_kth_largest with each pass's histogram summed over the group
 *     (over the world with DP as well: sae_runner_split_threshold). AuxK: the dead latents'
 *     top k the same way as TopK.
 *   - x_hat (and AuxK's e_hat): each rank decodes its own latents, the parts are summed
 *     (b_dec added by TP rank 0's part alone).
 *   - apply_b_dec_to_input: b_dec's gradient through x - b_dec is W_enc times the b_enc
 *     gradient, a sum over latents: summed over the group.
 *   - the per-latent figures the losses and logs read (dead count, firings, the L1 term)
 *     summed; the largest tokens-since-fired (which decides when AuxK starts) the maximum.
 * The selection's merge runs on the host (N rows of tp K pairs): on the GPU that is one
 * small copy each way per step.
 *
 * Files: the final SAE and every checkpoint are those of one process (rank 0 gathers the
 * shards), so a sharded run's output reads exactly like a one-process run's, and a
 * checkpoint resumes under any dist.tp that divides d_sae (each rank takes its slice). */
#include <stdlib.h>
#include <string.h>

#include "loupe/dist.h"
#include "loupe/ops.h"
#include "loupe/sae_ops.h"
#include "loupe/sae_track.h"
#include "sae/sae_internal.h"
#include "sae/sae_read.h"
#include "sae/sae_trainer.h"

typedef struct shard_bufs {
    void *send, *recv;      /* the gathers' host buffers */
    size_t send_cap, recv_cap;
    void *out;              /* the merged selection before its upload */
    size_t out_cap;
} shard_bufs;

typedef struct cand {
    float v;
    int32_t g;
} cand;

static lp_status grow(void **p, size_t *cap, size_t need) {
    if (*cap >= need) return LP_OK;
    void *q = realloc(*p, need);
    if (!q) LP_FAIL(LP_ERR_OOM, "out of host memory for the sharded selection (%zu bytes)", need);
    *p = q, *cap = need;
    return LP_OK;
}

static lp_status bufs(trainer *tr) {
    if (tr->sh) return LP_OK;
    tr->sh = calloc(1, sizeof *tr->sh);
    return tr->sh ? LP_OK : LP_ERR(LP_ERR_OOM, "out of host memory");
}

void shard_free(trainer *tr) {
    shard_bufs *b = tr->sh;
    if (!b) return;
    free(b->send), free(b->recv), free(b->out);
    free(b);
    tr->sh = NULL;
}

/* larger value first, then the lower latent: lp_sae_topk's order */
static int by_value(const void *a, const void *b) {
    const cand *x = a, *y = b;
    if (x->v != y->v) return x->v > y->v ? -1 : 1;
    return (x->g > y->g) - (x->g < y->g);
}

lp_status shard_select(trainer *tr, int32_t *idx, float *val, int kl, int K) {
    LP_CHECK(bufs(tr));
    shard_bufs *b = tr->sh;
    lp_ctx *c = tr->c;
    int N = tr->Nl, S = tr->S, tp = tr->tp;
    size_t part = (size_t)N * kl, bytes = part * 8;
    LP_CHECK(grow(&b->send, &b->send_cap, bytes));
    LP_CHECK(grow(&b->recv, &b->recv_cap, bytes * tp));
    LP_CHECK(grow(&b->out, &b->out_cap, (size_t)N * K * 8 + (size_t)tp * kl * sizeof(cand)));
    float *sv = b->send;
    int32_t *si = (int32_t *)(sv + part);
    LP_CHECK(lp_ctx_to_host(c, sv, val, part * 4));
    LP_CHECK(lp_ctx_to_host(c, si, idx, part * 4));
    for (size_t i = 0; i < part; i++) si[i] += tr->s0; /* global latents */
    LP_CHECK(lp_dist_allgather(tr->t->dist, LP_DIST_TP, b->send, b->recv, bytes));
    int32_t *oi = b->out;
    float *ov = (float *)(oi + (size_t)N * K);
    cand *row = (cand *)(ov + (size_t)N * K);
    for (int n = 0; n < N; n++) {
        int m = 0;
        for (int r = 0; r < tp; r++) {
            const float *rv = (const float *)((const char *)b->recv + bytes * r);
            const int32_t *ri = (const int32_t *)(rv + part);
            for (int j = 0; j < kl; j++) row[m].v = rv[(size_t)n * kl + j], row[m].g = ri[(size_t)n * kl + j], m++;
        }
        qsort(row, m, sizeof *row, by_value);
        for (int j = 0; j < K; j++) {
            size_t e = (size_t)n * K + j;
            int own = row[j].g >= tr->s0 && row[j].g < tr->s0 + S;
            /* another shard's latent: padding of value 0 spread over this shard's latents */
            oi[e] = own ? row[j].g - tr->s0 : (int32_t)(e % (size_t)S);
            ov[e] = own ? row[j].v : 0.0f;
        }
    }
    LP_CHECK(lp_ctx_to_device(c, idx, oi, (size_t)N * K * 4));
    return lp_ctx_to_device(c, val, ov, (size_t)N * K * 4);
}

lp_status shard_forward(trainer *tr) {
    sae_runner *r = tr->r;
    lp_sae *s = tr->s;
    lp_ctx *c = tr->c;
    const lp_sae_cfg *cf = &s->cfg;
    int n = tr->Nl, D = r->D, Do = r->Do, S = r->S, K = r->K;
    LP_CHECK(sae_runner_pre(r, n));
    switch (cf->arch) {
    case LP_SAE_STANDARD: LP_CHECK(lp_sae_relu(c, r->f, r->pre, (size_t)n * S)); break;
    case LP_SAE_JUMPRELU:
        LP_CHECK(lp_sae_relu(c, r->f, r->pre, (size_t)n * S));
        LP_CHECK(lp_sae_jumprelu(c, r->f, r->f, s->threshold, n, S));
        break;
    case LP_SAE_TOPK: /* setup refused k > d_sae / tp: every shard has its own k best */
        LP_CHECK(lp_sae_topk(c, r->idx, r->val, r->pre, n, S, K));
        LP_CHECK(shard_select(tr, r->idx, r->val, K, K));
        break;
    case LP_SAE_BATCHTOPK: /* the latents over the TP ranks (and the rows over the DP ones) */
        LP_CHECK(sae_runner_split_threshold(r, n, tr->t->dist, tr->dp > 1 ? LP_DIST_WORLD : LP_DIST_TP, (size_t)tr->N,
                                            (size_t)S * tr->tp));
        LP_CHECK(lp_sae_jumprelu(c, r->f, r->pre, r->thr, n, S));
        break;
    }
    const float *bias = tr->tpr == 0 ? s->b_dec : NULL; /* once in the group's sum */
    if (cf->arch == LP_SAE_TOPK) LP_CHECK(lp_sae_decode_sparse(c, r->xhat, r->idx, r->val, s->W_dec, bias, n, K, Do));
    else LP_CHECK(lp_matmul(c, r->xhat, r->f, s->W_dec, bias, n, S, Do, 0));
    LP_CHECK(lp_dist_allreduce_sum_dev(tr->t->dist, LP_DIST_TP, c, r->xhat, (size_t)n * Do));
    if (cf->skip) {
        LP_CHECK(lp_matmul(c, r->skip, r->x, s->W_skip, NULL, n, D, Do, 0));
        LP_CHECK(lp_add(c, r->xhat, r->xhat, r->skip, (size_t)n * Do));
    }
    return LP_OK;
}

lp_status shard_track(trainer *tr) {
    lp_ctx *c = tr->c;
    lp_dist *d = tr->t->dist;
    double h[3], l1;
    LP_CHECK(lp_ctx_to_host(c, h, tr->trk + LP_TRK_N_DEAD, sizeof h)); /* N_DEAD, MAX_SINCE, FIRED */
    double sum[2] = {h[0], h[2]}, mx = h[1];
    LP_CHECK(lp_dist_allreduce_sum(d, LP_DIST_TP, sum, 2, LP_F64));
    LP_CHECK(lp_dist_allreduce_max(d, LP_DIST_TP, &mx, 1, LP_F64));
    h[0] = sum[0], h[1] = mx, h[2] = sum[1];
    LP_CHECK(lp_ctx_to_device(c, tr->trk + LP_TRK_N_DEAD, h, sizeof h));
    if (tr->s->cfg.arch != LP_SAE_STANDARD) return LP_OK; /* the L1 term is standard's alone */
    LP_CHECK(lp_ctx_to_host(c, &l1, tr->trk + LP_TRK_L1DOT, sizeof l1));
    LP_CHECK(lp_dist_allreduce_sum(d, LP_DIST_TP, &l1, 1, LP_F64));
    return lp_ctx_to_device(c, tr->trk + LP_TRK_L1DOT, &l1, sizeof l1);
}

/* ---- the full SAE: gathered for the files, sliced from a checkpoint ---- */

static void part(float *loc, float *full, size_t n, int to_full) {
    if (to_full) memcpy(full, loc, n * 4);
    else memcpy(loc, full, n * 4);
}

void shard_map(const lp_sae_cfg *full, int tp, int t, float *loc, float *full_buf, int to_full) {
    lp_sae_cfg lc = *full;
    lc.d_sae = full->d_sae / tp;
    lp_sae F = {.cfg = *full}, L = {.cfg = lc};
    sae_carve(&F, full_buf), sae_carve(&L, loc);
    size_t S = lc.d_sae, Sf = full->d_sae, D = full->d_in, Do = full->d_out, o = (size_t)t * S;
    for (size_t d = 0; d < D; d++) part(L.W_enc + d * S, F.W_enc + d * Sf + o, S, to_full);
    part(L.b_enc, F.b_enc + o, S, to_full);
    part(L.W_dec, F.W_dec + o * Do, S * Do, to_full);
    part(L.b_dec, F.b_dec, Do, to_full); /* replicated: every rank's is the same */
    if (L.threshold) part(L.threshold, F.threshold + o, S, to_full);
    if (L.W_skip) part(L.W_skip, F.W_skip, D * Do, to_full);
}

lp_status shard_gather(trainer *tr, const float *dev, float *full_host) {
    size_t nf = tr->s->n_floats, *counts = malloc(tr->tp * sizeof *counts);
    float *h = malloc(nf * 4);
    void *all = NULL;
    lp_status st = h && counts ? lp_ctx_to_host(tr->c, h, dev, nf * 4) : LP_ERR(LP_ERR_OOM, "out of host memory gathering the SAE's shards");
    if (st == LP_OK) st = lp_dist_gather(tr->t->dist, LP_DIST_TP, h, nf * 4, &all, counts, 0);
    for (int r = 0; st == LP_OK && all && full_host && r < tr->tp; r++)
        shard_map(&tr->full, tr->tp, r, (float *)all + nf * r, full_host, 1);
    free(all), free(h), free(counts);
    return st;
}

lp_status shard_gather_since(trainer *tr, int64_t *since_all) {
    size_t *counts = malloc(tr->tp * sizeof *counts);
    void *all = NULL;
    lp_status st = counts ? lp_ctx_to_host(tr->c, tr->since, tr->since_dev, (size_t)tr->S * 8) : LP_ERR(LP_ERR_OOM, "out of host memory");
    if (st == LP_OK) st = lp_dist_gather(tr->t->dist, LP_DIST_TP, tr->since, (size_t)tr->S * 8, &all, counts, 0);
    if (st == LP_OK && all && since_all) memcpy(since_all, all, (size_t)tr->full.d_sae * 8); /* the shards in latent order */
    free(all), free(counts);
    return st;
}

lp_status shard_save(trainer *tr) {
    lp_ctx hc;
    LP_CHECK(lp_ctx_init(&hc, LP_CPU, LP_F32));
    lp_sae *f = NULL;
    lp_status st = tr->tpr == 0 ? lp_sae_alloc(&f, &tr->full, &hc) : LP_OK;
    /* every rank takes part in the gather, also after rank 0 failed to allocate */
    lp_status g = shard_gather(tr, tr->s->mem, f ? f->mem : NULL);
    if (st == LP_OK) st = g;
    if (st == LP_OK && f) st = lp_sae_save(f, &hc, tr->t->out, (float)tr->scale);
    lp_sae_free(f, &hc);
    lp_ctx_free(&hc);
    return st;
}
