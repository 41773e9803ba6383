/* sae_train.c: SAE and transcoder training from an activation store or a live model (Adam, schedules,
 * unit-norm decoder, b_dec initialisation, activation scaling, dead-latent tracking,
 * AuxK, window shuffling, checkpoints that resume identically): the config, the trainer's
 * setup and the run loop. The step math is in sae_train_step.c, the data it reads in
 * sae_train_data.c, checkpoints in sae_checkpoint.c, the batch buffers (shared with
 * evaluation and encoding, host/sae/sae_eval.c) in sae_runner.c. All SAE math is F32 on the
 * context's device through include/loupe/sae_ops.h and the matmuls of ops.h. */
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
    t->encoder_bf16 = -1;
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

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void trainer_free(trainer *tr) {
    lp_ctx *c = tr->c;
    sae_prefetch_free(tr); /* its thread reads the store: first */
    sae_runner_free(tr->r);
    lp_ctx_release(c, tr->grad);
    lp_ctx_release(c, tr->adam_m);
    lp_ctx_release(c, tr->adam_v);
    lp_ctx_release(c, tr->win_x);
    lp_ctx_release(c, tr->win_y);
    lp_ctx_release(c, tr->perm);
    lp_ctx_release(c, tr->win_x2);
    lp_ctx_release(c, tr->win_y2);
    lp_ctx_release(c, tr->perm2);
    lp_ctx_release_host(c, tr->host_x);
    lp_ctx_release_host(c, tr->host_y);
    lp_ctx_release_host(c, tr->host_perm);
    free(tr->since);
    free(tr->counts_host);
    lp_ctx_release(c, tr->since_dev);
    lp_ctx_release(c, tr->trk);
    lp_ctx_release(c, tr->ysum);
    free(tr->ysum_f);
    free(tr->ysum_host);
    shard_free(tr);
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

/* Latent sharding over dist.tp ranks (sae_shard.c): what it needs, and cf cut to one
 * rank's shard of d_sae / tp latents. */
static lp_status shard_check(lp_sae_cfg *cf, int tp, int live) {
    if (live) LP_FAIL(LP_ERR_ARG, "dist.tp=%d: sharded SAE training reads an activation store (data.store), not a live model", tp);
    if (cf->d_sae % tp)
        LP_FAIL(LP_ERR_ARG, "sae.d_sae = %d is not a multiple of dist.tp = %d: the latents are split evenly over the tensor-parallel ranks",
                cf->d_sae, tp);
    int S = cf->d_sae / tp;
    if ((cf->arch == LP_SAE_TOPK || cf->arch == LP_SAE_BATCHTOPK) && cf->k > S)
        LP_FAIL(LP_ERR_ARG, "sae.k = %d exceeds sae.d_sae / dist.tp = %d: each rank's shard must hold a row's k latents", cf->k, S);
    cf->d_sae = S;
    return LP_OK;
}

static lp_status setup(trainer *tr, const lp_sae_train_cfg *t, lp_ctx *c, lp_live *live) {
    tr->t = t, tr->c = c, tr->win = -1, tr->scale = 1.0, tr->live = live, tr->metrics = -1, tr->lock.fd = -1, tr->ckpt_step = -1;
    lp_sae_cfg cf = t->sae;
    if (live) { /* the store key is not needed: check the rest with a stand-in */
        lp_sae_train_cfg tc = *t;
        tc.store = "(live)";
        LP_CHECK(lp_sae_train_check(&tc));
        LP_CHECK(sae_live_hook(live, cf.hook_name, &tr->live_in, &cf.d_in));
        cf.d_out = cf.d_in, tr->live_out = -1;
        if (cf.hook_name_out[0]) LP_CHECK(sae_live_hook(live, cf.hook_name_out, &tr->live_out, &cf.d_out));
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
    tr->full = cf;
    tr->tp = lp_dist_tp_size(t->dist), tr->tpr = lp_dist_tp_rank(t->dist);
    if (tr->tp > 1) LP_CHECK(shard_check(&cf, tr->tp, live != NULL)); /* cf becomes this rank's shard */
    tr->s0 = tr->tpr * cf.d_sae;
    LP_CHECK(lp_sae_alloc(&tr->s, &cf, c));
    tr->N = t->batch_tokens, tr->D = cf.d_in, tr->Do = cf.d_out, tr->S = cf.d_sae;
    tr->dp = lp_dist_dp_size(t->dist), tr->dpr = lp_dist_dp_rank(t->dist), tr->Nl = tr->N / tr->dp;
    tr->writer = tr->dpr == 0 && tr->tpr == 0;
    if (tr->dp > 1 && live)
        LP_FAIL(LP_ERR_ARG, "dist.dp=%d: data-parallel training reads an activation store (data.store), not a live model", tr->dp);
    if (tr->N % tr->dp) LP_FAIL(LP_ERR_ARG, "train.batch_tokens %d: not a multiple of dist.dp=%d", tr->N, tr->dp);
    int64_t per = (t->shuffle_tokens + tr->N - 1) / tr->N;
    if (per < 1) per = 1;
    tr->W = per * tr->N;
    if (tr->W > INT32_MAX) LP_FAIL(LP_ERR_ARG, "train.shuffle_tokens %lld is too large", (long long)t->shuffle_tokens);
    LP_CHECK(sae_runner_new_sel(&tr->r, tr->s, c, tr->Nl, 1, t->aux_k, tr->full.d_sae));
    sae_runner_set_dp(tr->r, t->dist);
    if (t->encoder_bf16 > 0 || (t->encoder_bf16 < 0 && c->device == LP_CUDA)) LP_CHECK(sae_runner_use_bf16(tr->r));
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
    if (c->device == LP_CUDA && !live) { /* the next window's buffers, uploaded while this one trains */
        LP_CHECK(lp_ctx_alloc(c, (size_t)tr->W * tr->D * 4, (void **)&tr->win_x2));
        if (tr->transcoder) LP_CHECK(lp_ctx_alloc(c, (size_t)tr->W * tr->Do * 4, (void **)&tr->win_y2));
        LP_CHECK(lp_ctx_alloc(c, (size_t)tr->W * 4, (void **)&tr->perm2));
    }
    tr->win_next = -1;
    if (lp_ctx_alloc_host(c, (size_t)tr->W * tr->D * sizeof(float), (void **)&tr->host_x) != LP_OK) tr->host_x = NULL;
    if (tr->transcoder && lp_ctx_alloc_host(c, (size_t)tr->W * tr->Do * sizeof(float), (void **)&tr->host_y) != LP_OK)
        tr->host_y = NULL;
    if (lp_ctx_alloc_host(c, (size_t)tr->W * sizeof(int32_t), (void **)&tr->host_perm) != LP_OK) tr->host_perm = NULL;
    if (tr->dp > 1) { /* the explained variance's total sum of squares about the global batch mean */
        LP_CHECK(lp_ctx_alloc(c, (size_t)tr->Do * 4, (void **)&tr->ysum));
        tr->ysum_f = calloc(tr->Do, sizeof(float)), tr->ysum_host = calloc(tr->Do + 1, sizeof(double));
        if (!tr->ysum_f || !tr->ysum_host) LP_FAIL(LP_ERR_OOM, "out of memory");
    }
    tr->since = calloc(tr->S, sizeof(int64_t));
    tr->counts_host = calloc(tr->S, sizeof(int64_t));
    if (!tr->host_x || (tr->transcoder && !tr->host_y) || !tr->host_perm || !tr->since || !tr->counts_host)
        LP_FAIL(LP_ERR_OOM, "out of host memory for the shuffle window (%lld tokens)", (long long)tr->W);
    /* the step's bookkeeping stays on the device (one read per log step); with DP the
     * losses are all-reduced on the host every step, and summed there */
    tr->host_acc = tr->dp > 1;
    LP_CHECK(lp_ctx_alloc(c, (size_t)tr->S * 8, (void **)&tr->since_dev));
    LP_CHECK(lp_ctx_memset0(c, tr->since_dev, (size_t)tr->S * 8));
    LP_CHECK(lp_ctx_alloc(c, LP_TRK_LEN * sizeof(double), (void **)&tr->trk));
    tr->r->batch_t = tr->trk + LP_TRK_BATCH_T;
    memset(tr->trk_host, 0, sizeof tr->trk_host);
    tr->trk_host[LP_TRK_BAD_STEP] = -1;
    return lp_ctx_to_device(c, tr->trk, tr->trk_host, sizeof tr->trk_host);
}

/* A resumed run's counters and log window sums (read from the checkpoint) onto the device. */
static lp_status track_resume(trainer *tr) {
    tr->since_bound = 0;
    for (int i = 0; i < tr->S; i++)
        if (tr->since[i] > tr->since_bound) tr->since_bound = tr->since[i];
    if (tr->tp > 1) LP_CHECK(lp_dist_allreduce_max(tr->t->dist, LP_DIST_TP, &tr->since_bound, 1, LP_I64)); /* every shard's */
    LP_CHECK(lp_ctx_to_device(tr->c, tr->since_dev, tr->since, (size_t)tr->S * 8));
    double *h = tr->trk_host;
    h[LP_TRK_ACC_MSE] = tr->acc_mse, h[LP_TRK_ACC_SSE] = tr->acc_sse, h[LP_TRK_ACC_SST] = tr->acc_sst;
    h[LP_TRK_ACC_L0] = tr->acc_l0, h[LP_TRK_ACC_SPARSE] = tr->acc_sparsity, h[LP_TRK_ACC_AUX] = tr->acc_aux;
    h[LP_TRK_THR_EMA] = tr->thr_ema;
    return lp_ctx_to_device(tr->c, tr->trk, h, sizeof tr->trk_host);
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
    if (tr->writer) { /* the other ranks write nothing */
        LP_CHECK(lp_lock_output(&tr->lock, t->out, 1));
        LP_CHECK(lp_remove_stale_tmp(t->out));
        LP_CHECK(lp_remove_stale_tmp(ck));
    }
    int resumed = 0;
    LP_CHECK(sae_load_checkpoint(tr, &resumed));
    if (!resumed) {
        LP_CHECK(sae_init_params(tr));
        LP_CHECK(sae_init_data_stats(tr));
    } else {
        LP_CHECK(track_resume(tr));
    }
    LP_CHECK(sae_runner_refresh_bf16(tr->r)); /* the bf16 encoder copy of the weights just set */
    char *mpath = tr->metrics_path;
    snprintf(mpath, sizeof tr->metrics_path, "%s/metrics.jsonl", t->out);
    if (resumed && tr->writer) LP_CHECK(sae_trim_metrics(mpath, tr->step)); /* also drops a torn last line */
    tr->metrics = !tr->writer ? -1 : open(mpath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | (resumed ? 0 : O_TRUNC), 0644);
    if (tr->metrics < 0 && tr->writer) LP_FAIL(lp_write_status(errno), "%s: cannot write: %s", mpath, strerror(errno));
    rep->resumed_tokens = tr->tokens_done;
    ru->total_steps = (t->tokens + tr->N - 1) / tr->N;
    if (resumed && tr->step >= ru->total_steps) rep->already_complete = 1, sae_last_metrics(mpath, rep);
    ru->next_ckpt = t->checkpoint_every > 0 ? (tr->tokens_done / t->checkpoint_every + 1) * t->checkpoint_every : INT64_MAX;
    ru->t0 = ru->tlog = now_s();
    ru->tok_log = tr->tokens_done;
    ru->done = tr->step >= ru->total_steps;
    return LP_OK;
}

/* The writer's files of this step (a metrics line, a checkpoint, the final SAE) agreed by
 * every rank: a failed write ends every rank at once, naming the writer, instead of leaving
 * the others to wait for it in the next collective until dist.timeout_s. st: this rank's. */
static lp_status writes_agree(const trainer *tr, lp_status st) {
    lp_dist *d = tr->t->dist;
    if (lp_dist_size(d) <= 1) return st;
    int32_t bad = st != LP_OK ? lp_dist_rank(d) + 1 : 0; /* the highest failed rank, + 1 */
    lp_status a = lp_dist_allreduce_max(d, LP_DIST_WORLD, &bad, 1, LP_I32);
    if (st != LP_OK) return st;
    if (a != LP_OK) return a;
    if (bad) LP_FAIL(LP_ERR_IO, "train-sae: rank %d failed to write into %s (its error is printed by that rank)", bad - 1, tr->t->out);
    return LP_OK;
}

/* One training step with its logging and checkpoint. */
static lp_status run_step(run *ru, lp_sae_train_report *rep) {
    trainer *tr = &ru->tr;
    const lp_sae_train_cfg *t = tr->t;
    double lr = sae_lr_at(t, tr->step, ru->total_steps);
    double l1 = t->l1_coefficient * (t->l1_warm_up_steps > 0 ? fmin(1.0, (double)(tr->step + 1) / t->l1_warm_up_steps) : 1.0);
    LP_CHECK(sae_load_batch(tr, tr->step));
    LP_CHECK(sae_train_step(tr, lr, l1));
    if (tr->host_acc) { /* DP: the step's figures are on the host already */
        const double *v = tr->step_v;
        if (!isfinite(v[0] + v[1] + v[2])) return sae_loss_error(tr, tr->step, isnan(v[0] + v[1] + v[2]));
        tr->acc_mse += v[0], tr->acc_sse += v[3], tr->acc_sst += v[4], tr->acc_l0 += v[5], tr->acc_sparsity += v[1], tr->acc_aux += v[2];
    }
    tr->step++;
    tr->tokens_done += tr->N;
    tr->acc_n++;
    if (tr->step % t->log_every == 0 || tr->step == ru->total_steps) {
        LP_CHECK(sae_read_track(tr)); /* the window's sums; a non-finite loss in it ends the run here */
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
        lp_status w = LP_OK;
        if (tr->writer) w = lp_write_fd(tr->metrics, line, (size_t)len < sizeof line ? (size_t)len : sizeof line - 1, -1, tr->metrics_path);
        LP_CHECK(writes_agree(tr, w));
        rep->mse = tr->acc_mse / n, rep->explained_variance = 1 - tr->acc_sse / tr->acc_sst, rep->l0 = tr->acc_l0 / n;
        rep->dead = tr->r->n_dead;
        progress(tr, ru->total_steps, tps, (tr->acc_mse + tr->acc_sparsity + tr->acc_aux) / n, rep->l0, rep->dead, 0);
        tr->acc_mse = tr->acc_sse = tr->acc_sst = tr->acc_l0 = tr->acc_sparsity = tr->acc_aux = tr->acc_n = 0;
        if (!tr->host_acc) LP_CHECK(lp_ctx_memset0(tr->c, tr->trk, (LP_TRK_ACC_AUX + 1) * sizeof(double)));
        ru->tlog = now, ru->tok_log = tr->tokens_done;
    }
    if (tr->tokens_done >= ru->next_ckpt && tr->step < ru->total_steps) {
        LP_CHECK(sae_read_track(tr)); /* never a checkpoint of a state a non-finite loss reached */
        LP_CHECK(writes_agree(tr, tr->dpr == 0 ? sae_save_checkpoint(tr) : LP_OK)); /* the TP group gathers, its rank 0 writes */
        tr->ckpt_step = tr->step; /* on every rank, so that run_end decides its last checkpoint alike */
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
            st = h ? lp_ctx_to_device(tr->c, tr->s->threshold, h, (size_t)tr->S * 4) : LP_ERR(LP_ERR_OOM, "out of memory");
            free(h);
        }
        if (st == LP_OK && tr->dpr == 0) st = tr->tp > 1 ? shard_save(tr) : lp_sae_save(tr->s, tr->c, t->out, (float)tr->scale);
        st = writes_agree(tr, st);
        /* a rerun of a finished job: its final checkpoint is already there */
        if (st == LP_OK && t->checkpoint_every > 0 && tr->ckpt_step != tr->step)
            st = writes_agree(tr, tr->dpr == 0 ? sae_save_checkpoint(tr) : LP_OK);
    }
    if (tr->metrics >= 0) { /* the lines are written; make them durable and see the errors close reports */
        if (st == LP_OK && fsync(tr->metrics) != 0)
            st = LP_ERR(LP_ERR_WRITE, "%s: cannot flush: %s", tr->metrics_path, strerror(errno));
        if (close(tr->metrics) != 0 && st == LP_OK)
            st = LP_ERR(LP_ERR_WRITE, "%s: cannot close: %s", tr->metrics_path, strerror(errno));
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
