/* sae_train_data.c: the activations a trainer reads: windows of an activation store, or
 * of a live model run over token rows with its hooks captured, shuffled into batches. */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
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

/* ---- a live source: the model run over token rows, its hooks captured ---- */

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
lp_status sae_live_hook(lp_live *l, const char *name, int *idx, int *d) {
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

/* Tokens [t0, t0 + n) of the endless stream (the data read round and round) of the input
 * (out = 0) or the output hook (out = 1). */
lp_status sae_src_read(trainer *tr, int out, int64_t t0, int64_t n, float *dst) {
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

lp_status sae_check_finite(const trainer *tr, const float *x, size_t n, int d, int64_t first_token, const char *hook) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i]))
            LP_FAIL(LP_ERR_FORMAT, "%s: '%s' has a non-finite value at token %lld (stream position; step %lld)", tr->live ? "live model" : tr->t->store, hook,
                    (long long)((first_token + (int64_t)(i / d)) % tr->n_tokens), (long long)tr->step);
    return LP_OK;
}

/* The permutation of window w: seeded by (seed, w). */
static void window_perm(const trainer *tr, int64_t w, int32_t *perm) {
    uint64_t rng = tr->t->seed * 0x100000001B3ull + (uint64_t)w;
    for (int64_t i = 0; i < tr->W; i++) perm[i] = (int32_t)i;
    for (int64_t i = tr->W - 1; i > 0; i--) { /* Fisher-Yates */
        int64_t j = (int64_t)(rng_next(&rng) % (uint64_t)(i + 1));
        int32_t tmp = perm[i];
        perm[i] = perm[j], perm[j] = tmp;
    }
}

static void scale_window(const trainer *tr, float *x) {
    if (tr->scale != 1.0)
        for (size_t i = 0; i < (size_t)tr->W * tr->D; i++) x[i] = (float)(x[i] * tr->scale);
}

/* ---- the next window, prepared on a thread while this one trains ----
 * For a store (a live source runs the model on the trainer's context, so it stays on the
 * caller's thread): the thread reads window w + 1, checks and scales it and draws its
 * permutation into a second set of host buffers. On the GPU those are pinned, and as soon
 * as the thread is done (looked at every step, never waited for) the window is queued for
 * upload on the copy stream into a second set of device buffers, behind the compute
 * stream's work so far; the switch then only orders the compute stream after the copy and
 * swaps the buffers. On the CPU the switch swaps the host buffers and copies. The thread
 * never reports: any failure (an unreadable shard, a non-finite value) makes the switch
 * load that window again on the caller's thread, which fails there with the message and
 * step the synchronous path gives. */
struct sae_prefetch {
    pthread_t th;
    int running;
    int done;      /* set by the thread when it returns (atomic) */
    int64_t w;
    float *x, *y;
    int32_t *perm;
    int ok;
    trainer *tr;
};

static int all_finite(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

static void *prefetch_run(void *arg) {
    struct sae_prefetch *pf = arg;
    const trainer *tr = pf->tr;
    int64_t t0 = pf->w * tr->W;
    pf->ok = sae_src_read((trainer *)tr, 0, t0, tr->W, pf->x) == LP_OK && all_finite(pf->x, (size_t)tr->W * tr->D);
    if (pf->ok && tr->transcoder)
        pf->ok = sae_src_read((trainer *)tr, 1, t0, tr->W, pf->y) == LP_OK && all_finite(pf->y, (size_t)tr->W * tr->Do);
    if (pf->ok) scale_window(tr, pf->x), window_perm(tr, pf->w, pf->perm);
    __atomic_store_n(&pf->done, 1, __ATOMIC_RELEASE);
    return NULL;
}

/* Waits for the thread; 1 when it prepared window w. */
static int prefetch_join(trainer *tr, int64_t w) {
    struct sae_prefetch *pf = tr->prefetch;
    if (!pf || !pf->running) return 0;
    pthread_join(pf->th, NULL);
    pf->running = 0;
    return pf->ok && pf->w == w;
}

static void prefetch_start(trainer *tr, int64_t w) {
    if (tr->live) return;
    struct sae_prefetch *pf = tr->prefetch;
    if (!pf) {
        pf = tr->prefetch = calloc(1, sizeof *pf);
        if (pf) { /* pinned on the GPU: the upload runs asynchronously from them */
            pf->tr = tr;
            if (lp_ctx_alloc_host(tr->c, (size_t)tr->W * tr->D * sizeof(float), (void **)&pf->x) != LP_OK) pf->x = NULL;
            if (tr->transcoder && lp_ctx_alloc_host(tr->c, (size_t)tr->W * tr->Do * sizeof(float), (void **)&pf->y) != LP_OK)
                pf->y = NULL;
            if (lp_ctx_alloc_host(tr->c, (size_t)tr->W * sizeof(int32_t), (void **)&pf->perm) != LP_OK) pf->perm = NULL;
        }
    }
    if (!pf || !pf->x || !pf->perm || (tr->transcoder && !pf->y)) return; /* no memory: windows load in line */
    pf->w = w, pf->ok = 0, pf->done = 0;
    pf->running = pthread_create(&pf->th, NULL, prefetch_run, pf) == 0;
}

void sae_prefetch_free(trainer *tr) {
    struct sae_prefetch *pf = tr->prefetch;
    if (!pf) return;
    prefetch_join(tr, -1);
    (void)lp_ctx_sync(tr->c); /* no upload still reading the buffers */
    lp_ctx_release_host(tr->c, pf->x), lp_ctx_release_host(tr->c, pf->y), lp_ctx_release_host(tr->c, pf->perm);
    free(pf);
    tr->prefetch = NULL;
}

/* With the second device buffers (GPU): once the thread is done (or at once with wait),
 * queues the upload of its window into them (tr->win_next). */
static lp_status prefetch_upload(trainer *tr, int wait) {
    struct sae_prefetch *pf = tr->prefetch;
    if (!tr->win_x2 || !pf || !pf->running || tr->win_next == pf->w) return LP_OK;
    if (!wait && !__atomic_load_n(&pf->done, __ATOMIC_ACQUIRE)) return LP_OK;
    pthread_join(pf->th, NULL);
    pf->running = 0;
    if (!pf->ok) return LP_OK; /* the switch loads it in line and reports why */
    lp_ctx *c = tr->c;
    LP_CHECK(lp_ctx_to_device_async(c, tr->win_x2, pf->x, (size_t)tr->W * tr->D * 4));
    if (tr->transcoder) LP_CHECK(lp_ctx_to_device_async(c, tr->win_y2, pf->y, (size_t)tr->W * tr->Do * 4));
    LP_CHECK(lp_ctx_to_device_async(c, tr->perm2, pf->perm, (size_t)tr->W * 4));
    tr->win_next = pf->w;
    return LP_OK;
}

#define SWAP(T, a, b) do { T t_ = (a); (a) = (b); (b) = t_; } while (0)

/* Window w, uploaded ahead into the second device buffers: the compute stream waits for
 * the copy, the buffers swap (the prefetch thread's host buffers with ours, so it refills
 * the ones of the window before). 0 when w was not uploaded ahead. */
static int take_uploaded(trainer *tr, int64_t w, lp_status *st) {
    *st = prefetch_upload(tr, 1);
    if (*st != LP_OK || tr->win_next != w) return 0;
    struct sae_prefetch *pf = tr->prefetch;
    *st = lp_ctx_wait_copies(tr->c);
    /* the host buffers the thread refills next had their copy queued a window ago */
    if (*st == LP_OK) *st = lp_ctx_sync(tr->c);
    if (*st != LP_OK) return 0;
    SWAP(float *, tr->win_x, tr->win_x2);
    SWAP(float *, tr->win_y, tr->win_y2);
    SWAP(int32_t *, tr->perm, tr->perm2);
    SWAP(float *, tr->host_x, pf->x);
    SWAP(float *, tr->host_y, pf->y);
    SWAP(int32_t *, tr->host_perm, pf->perm);
    tr->win_next = -1;
    return 1;
}

/* Loads window w (shuffled by a permutation seeded by (seed, w)) onto the device, and
 * starts preparing w + 1. */
static lp_status load_window(trainer *tr, int64_t w) {
    if (tr->win == w) return LP_OK;
    lp_ctx *c = tr->c;
    int64_t t0 = w * tr->W;
    lp_status st;
    if (take_uploaded(tr, w, &st)) {
        tr->win = w;
        prefetch_start(tr, w + 1);
        return LP_OK;
    }
    LP_CHECK(st);
    if (prefetch_join(tr, w)) { /* ready: take its buffers, give it ours for the next */
        struct sae_prefetch *pf = tr->prefetch;
        SWAP(float *, tr->host_x, pf->x);
        SWAP(float *, tr->host_y, pf->y);
        SWAP(int32_t *, tr->host_perm, pf->perm);
    } else {
        LP_CHECK(sae_src_read(tr, 0, t0, tr->W, tr->host_x));
        LP_CHECK(sae_check_finite(tr, tr->host_x, (size_t)tr->W * tr->D, tr->D, t0, tr->s->cfg.hook_name));
        scale_window(tr, tr->host_x);
        if (tr->transcoder) {
            LP_CHECK(sae_src_read(tr, 1, t0, tr->W, tr->host_y));
            LP_CHECK(sae_check_finite(tr, tr->host_y, (size_t)tr->W * tr->Do, tr->Do, t0, tr->s->cfg.hook_name_out));
        }
        window_perm(tr, w, tr->host_perm);
    }
    LP_CHECK(lp_ctx_to_device(c, tr->win_x, tr->host_x, (size_t)tr->W * tr->D * 4));
    if (tr->transcoder) LP_CHECK(lp_ctx_to_device(c, tr->win_y, tr->host_y, (size_t)tr->W * tr->Do * 4));
    LP_CHECK(lp_ctx_to_device(c, tr->perm, tr->host_perm, (size_t)tr->W * 4));
    tr->win = w;
    prefetch_start(tr, w + 1);
    return LP_OK;
}

/* The batch of step `step` into r->x (and r->y). */
lp_status sae_load_batch(trainer *tr, int64_t step) {
    int64_t per_win = tr->W / tr->N, w = step / per_win, b = step % per_win;
    LP_CHECK(load_window(tr, w));
    LP_CHECK(prefetch_upload(tr, 0)); /* the next window, if its thread is done */
    const int32_t *p = tr->perm + b * tr->N + (int64_t)tr->dpr * tr->Nl; /* this DP rank's rows of the batch */
    LP_CHECK(lp_embed(tr->c, tr->r->x, p, tr->win_x, tr->Nl, tr->D)); /* a row gather */
    if (tr->transcoder) LP_CHECK(lp_embed(tr->c, tr->r->y, p, tr->win_y, tr->Nl, tr->Do));
    return LP_OK;
}
