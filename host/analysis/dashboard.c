/* dashboard.c: the pass behind `loupe dashboard` (see dashboard.h for what is kept and
 * why each statistic is exact in one pass). The store is read in batches of whole
 * sequences, so every context window of a token lies inside the batch that holds it: an
 * example's activations are copied out the moment it enters a top heap or a band sample,
 * and nothing is encoded twice. Per latent the state is bounded (a heap of `top`, 16 band
 * samples of `samples`, 64 bins), so thousands of latents cost a few tens of MB. */
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/dashboard.h"
#include "loupe/ops.h"
#include "loupe/safetensors.h"
#include "loupe/sae_ops.h"
#include "loupe/store.h"
#include "analysis/dashboard_internal.h"

void lp_dash_defaults(lp_dash_opts *o) {
    memset(o, 0, sizeof *o);
    o->top = 20, o->left = 16, o->right = 4, o->samples = 5, o->n_logits = 10;
    o->batch_tokens = 4096;
}

uint64_t dash_hash(uint64_t x) { /* splitmix64's finalizer: every input bit moves every output bit */
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* ---- the pass ---- */

typedef struct pass {
    const lp_dash_opts *o;
    int L, W, ctx;
    size_t stride;
    lstate *st;
    unsigned char *tmp;          /* LP_DASH_BANDS * samples entries: band merges */
    /* the current batch: dense f [n, L] or sparse idx/val [n, K] (topk) */
    const float *f;
    const int32_t *idx;
    const float *val;
    const int32_t *col;          /* topk: latent -> column, -1 if not chosen */
    int K;
    int64_t t0;                  /* first token of the batch */
} pass;


static float act_at(const pass *p, int row, int j) {
    if (!p->idx) return p->f[(size_t)row * p->L + j];
    for (int k = 0; k < p->K; k++)
        if (p->col[p->idx[(size_t)row * p->K + k]] == j) return p->val[(size_t)row * p->K + k];
    return 0;
}

/* The example's context window, read from the batch (which holds whole sequences). */
static void capture(const pass *p, ent *e, int j) {
    int row = (int)(e->t - p->t0), pos = (int)(e->t % p->ctx);
    int a = pos - p->o->left < 0 ? 0 : pos - p->o->left, b = pos + p->o->right >= p->ctx ? p->ctx - 1 : pos + p->o->right;
    for (int q = 0; q < p->W; q++) e->acts[q] = a + q <= b ? act_at(p, row + a + q - pos, j) : 0;
}

static int worse(const ent *a, const ent *b) { return a->v < b->v || (a->v == b->v && a->t > b->t); }
static int hash_less(const ent *a, const ent *b) { return a->h < b->h || (a->h == b->h && a->t < b->t); }

static void swap_ent(unsigned char *x, unsigned char *y, size_t n, unsigned char *scratch) {
    memcpy(scratch, x, n), memcpy(x, y, n), memcpy(y, scratch, n);
}

/* A min-heap on worse(): the root is the example the next better one replaces. */
static void heap_down(unsigned char *h, int n, int i, size_t s, unsigned char *scratch) {
    for (;;) {
        int m = i, l = 2 * i + 1, r = l + 1;
        if (l < n && worse(ENT(h, l, s), ENT(h, m, s))) m = l;
        if (r < n && worse(ENT(h, r, s), ENT(h, m, s))) m = r;
        if (m == i) return;
        swap_ent(h + (size_t)i * s, h + (size_t)m * s, s, scratch);
        i = m;
    }
}

static void heap_up(unsigned char *h, int i, size_t s, unsigned char *scratch) {
    while (i > 0 && worse(ENT(h, i, s), ENT(h, (i - 1) / 2, s))) {
        swap_ent(h + (size_t)i * s, h + (size_t)((i - 1) / 2) * s, s, scratch);
        i = (i - 1) / 2;
    }
}

static int cmp_hash(const void *a, const void *b) { return hash_less(a, b) ? -1 : hash_less(b, a) ? 1 : 0; }

/* Width 2^e -> 2^(e + shift): bins and bands add up in groups of 2^shift; each new band
 * keeps the `samples` smallest hashes of its sources, which is what it would have kept
 * had it been that wide from the start. */
static int group(int b, int shift) { return shift >= 31 ? 0 : b >> shift; }

static void widen(pass *p, lstate *L, int shift) {
    int64_t h[LP_DASH_BINS] = {0};
    for (int b = 0; b < LP_DASH_BINS; b++) h[group(b, shift)] += L->hist[b];
    memcpy(L->hist, h, sizeof h);
    size_t s = p->stride;
    int K = p->o->samples;
    /* band nb's sources are bands >= nb, and the bands below nb are written already */
    for (int nb = 0; nb < LP_DASH_BANDS; nb++) {
        int n = 0;
        for (int b = nb; b < LP_DASH_BANDS; b++)
            if (group(b, shift) == nb)
                for (int i = 0; i < L->n_band[b]; i++) memcpy(p->tmp + (size_t)n++ * s, L->band + ((size_t)b * K + i) * s, s);
        if (n > K) qsort(p->tmp, n, s, cmp_hash);
        if (n > K) n = K;
        memcpy(L->band + (size_t)nb * K * s, p->tmp, (size_t)n * s);
        L->n_band[nb] = n;
    }
}

static int bin_of(pass *p, lstate *L, float v) {
    int ex;
    frexpf(v, &ex); /* v < 2^ex, so v < LP_DASH_BINS * 2^(ex - 6) and no smaller width holds it */
    int need = ex - 6;
    if (L->e == INT_MIN) L->e = need;
    else if (need > L->e) widen(p, L, need - L->e), L->e = need;
    int b = (int)ldexpf(v, -L->e);
    return b < LP_DASH_BINS ? b : LP_DASH_BINS - 1;
}

static void update(pass *p, int j, float v, int64_t t, uint64_t h, unsigned char *scratch) {
    lstate *L = &p->st[j];
    const lp_dash_opts *o = p->o;
    size_t s = p->stride;
    L->fires++;
    if (v > L->max) L->max = v;
    int b = bin_of(p, L, v);
    L->hist[b]++;
    ent cand = {.t = t, .h = h, .v = v};
    if (o->top > 0 && (L->n_top < o->top || worse(ENT(L->top, 0, s), &cand))) {
        int i = L->n_top < o->top ? L->n_top++ : 0;
        ent *e = ENT(L->top, i, s);
        *e = cand, capture(p, e, j);
        if (i) heap_up(L->top, i, s, scratch);
        else heap_down(L->top, L->n_top, 0, s, scratch);
    }
    int bb = b / LP_DASH_BINS_PER_BAND, n = L->n_band[bb];
    unsigned char *set = L->band + (size_t)bb * o->samples * s;
    if (o->samples <= 0) return;
    int at = -1;
    if (n < o->samples) at = L->n_band[bb]++;
    else { /* replace the largest hash if the new one is smaller */
        int m = 0;
        for (int i = 1; i < n; i++)
            if (hash_less(ENT(set, m, s), ENT(set, i, s))) m = i;
        if (hash_less(&cand, ENT(set, m, s))) at = m;
    }
    if (at >= 0) {
        ent *e = ENT(set, at, s);
        *e = cand, capture(p, e, j);
    }
}

/* Every counted token of the batch (rows [0, n), first token p->t0). */
static void scan_batch(pass *p, int n, unsigned char *scratch) {
    const lp_dash_opts *o = p->o;
    for (int i = 0; i < n; i++) {
        int64_t t = p->t0 + i;
        if (t % p->ctx < o->skip_positions) continue;
        uint64_t h = dash_hash((uint64_t)t ^ o->seed);
        if (p->idx) {
            for (int k = 0; k < p->K; k++) {
                float v = p->val[(size_t)i * p->K + k];
                int j = p->col[p->idx[(size_t)i * p->K + k]];
                if (v > 0 && j >= 0) update(p, j, v, t, h, scratch);
            }
        } else {
            const float *row = p->f + (size_t)i * p->L;
            for (int j = 0; j < p->L; j++)
                if (row[j] > 0) update(p, j, row[j], t, h, scratch);
        }
    }
}

lp_status lp_dash_parse_latents(const char *spec, int d_sae, const char *key, int32_t **out, int *n) {
    *out = NULL, *n = 0;
    if (!spec || !spec[0]) LP_FAIL(LP_ERR_ARG, "%s is empty (latents like 0-99,200 or all)", key);
    if (strcmp(spec, "all") == 0) {
        if (!(*out = malloc((size_t)d_sae * sizeof(int32_t)))) LP_FAIL(LP_ERR_OOM, "out of memory");
        for (int i = 0; i < d_sae; i++) (*out)[i] = i;
        *n = d_sae;
        return LP_OK;
    }
    unsigned char *seen = calloc((size_t)d_sae, 1);
    int32_t *v = malloc((size_t)d_sae * sizeof(int32_t));
    lp_status st = seen && v ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory");
    int cnt = 0;
    for (const char *q = spec; st == LP_OK && *q;) {
        char *end;
        long a = strtol(q, &end, 10), b = a;
        if (end == q || a < 0) { st = LP_ERR(LP_ERR_ARG, "%s = '%s': expected latents like 0-99,200 or all", key, spec); break; }
        q = end;
        if (*q == '-') {
            b = strtol(q + 1, &end, 10);
            if (end == q + 1 || b < a) { st = LP_ERR(LP_ERR_ARG, "%s = '%s': bad range at '%s'", key, spec, q - 0); break; }
            q = end;
        }
        if (b >= d_sae) { st = LP_ERR(LP_ERR_ARG, "%s: latent %ld is out of range (the SAE has d_sae = %d latents)", key, b, d_sae); break; }
        for (long i = a; i <= b; i++) {
            if (seen[i]) { st = LP_ERR(LP_ERR_ARG, "%s: latent %ld is listed twice", key, i); break; }
            seen[i] = 1, v[cnt++] = (int32_t)i;
        }
        if (*q == ',') q++;
        else if (*q) st = LP_ERR(LP_ERR_ARG, "%s = '%s': unexpected '%c'", key, spec, *q);
    }
    free(seen);
    if (st != LP_OK) { free(v); return st; }
    if (!cnt) { free(v); LP_FAIL(LP_ERR_ARG, "%s = '%s' names no latent", key, spec); }
    *out = v, *n = cnt;
    return LP_OK;
}

static lp_status check_opts(const lp_sae *s, const lp_dash_opts *o) {
    if (o->n_latents < 1) LP_FAIL(LP_ERR_ARG, "dash.latents: no latents chosen");
    for (int i = 0; i < o->n_latents; i++)
        if (o->latents[i] < 0 || o->latents[i] >= s->cfg.d_sae)
            LP_FAIL(LP_ERR_ARG, "dash.latents: latent %d is out of range (the SAE has d_sae = %d latents)", o->latents[i], s->cfg.d_sae);
    if (o->top < 0 || o->top > 10000) LP_FAIL(LP_ERR_ARG, "dash.top = %d: must be in [0, 10000]", o->top);
    if (o->samples < 0 || o->samples > 1000) LP_FAIL(LP_ERR_ARG, "dash.samples = %d: must be in [0, 1000]", o->samples);
    if (o->left < 0 || o->right < 0 || o->left + o->right > 4096) LP_FAIL(LP_ERR_ARG, "dash.left/dash.right: must be >= 0 and at most 4096 together");
    if (o->n_logits < 0) LP_FAIL(LP_ERR_ARG, "dash.logits = %d: must be >= 0", o->n_logits);
    if (o->W_U && o->n_logits > o->d_vocab) LP_FAIL(LP_ERR_ARG, "dash.logits = %d exceeds the vocabulary of %d", o->n_logits, o->d_vocab);
    if (s->cfg.d_out != s->cfg.d_in || s->cfg.skip) LP_FAIL(LP_ERR_ARG, "sae.path: a transcoder (d_out %d); dashboards are for SAEs", s->cfg.d_out);
    return LP_OK;
}

void lp_dash_free(lp_dash *d) {
    if (!d) return;
    free(d->lat);
    free(d->mem);
    free(d);
}

/* The whole pass; the finishing steps are in dashboard_fin.c. */
lp_status lp_dash_run(lp_sae *s, lp_ctx *c, const lp_dash_opts *o, lp_dash **out) {
    *out = NULL;
    LP_CHECK(check_opts(s, o));
    const lp_sae_cfg *cf = &s->cfg;
    const char *hook = o->hook && o->hook[0] ? o->hook : cf->hook_name;
    if (!hook[0]) LP_FAIL(LP_ERR_ARG, "data.hook: the SAE's cfg.json names no hook; set data.hook");
    lp_store *in = NULL;
    LP_CHECK(lp_store_open(&in, o->store, hook));
    dash_enc e = {0};
    pass p = {.o = o, .L = o->n_latents, .W = o->left + 1 + o->right};
    lp_dash *d = calloc(1, sizeof *d);
    lp_status st = d ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory");
    int64_t N = lp_store_n_tokens(in);
    p.ctx = lp_store_context(in);
    if (st == LP_OK && lp_store_d(in) != cf->d_in)
        st = LP_ERR(LP_ERR_SHAPE, "%s: '%s' has %d values per token but the SAE's d_in is %d", o->store, hook,
                          lp_store_d(in), cf->d_in);
    if (st == LP_OK && N == 0) st = LP_ERR(LP_ERR_ARG, "%s: the store holds no tokens", o->store);
    if (st == LP_OK && (o->skip_positions < 0 || o->skip_positions >= p.ctx))
        st = LP_ERR(LP_ERR_ARG, "dash.skip_positions = %d: must be in [0, the store's context %d)", o->skip_positions, p.ctx);
    int bseq = o->batch_tokens / (p.ctx > 0 ? p.ctx : 1);
    if (bseq < 1) bseq = 1;
    if (st == LP_OK) st = dash_enc_open(&e, s, c, o->latents, o->n_latents, bseq * p.ctx);
    p.stride = (sizeof(ent) + (size_t)p.W * sizeof(float) + 7) / 8 * 8;
    size_t per = (size_t)o->top + (size_t)LP_DASH_BANDS * o->samples;
    unsigned char *arena = NULL, *scratch = NULL;
    if (st == LP_OK) {
        p.st = calloc((size_t)p.L, sizeof *p.st);
        arena = malloc((size_t)p.L * per * p.stride + 1);
        p.tmp = malloc((size_t)LP_DASH_BANDS * (o->samples + 1) * p.stride);
        scratch = malloc(p.stride);
        if (!p.st || !arena || !p.tmp || !scratch) st = LP_ERR(LP_ERR_OOM, "out of memory for %d latents' state", p.L);
    }
    for (int j = 0; st == LP_OK && j < p.L; j++) {
        p.st[j].e = INT_MIN;
        p.st[j].top = arena + (size_t)j * per * p.stride;
        p.st[j].band = p.st[j].top + (size_t)o->top * p.stride;
    }
    p.col = e.col, p.K = e.K;
    double t_start = dash_now();
    for (int64_t t0 = 0; st == LP_OK && t0 < N; t0 += (int64_t)bseq * p.ctx) {
        int n = (int)(N - t0 < (int64_t)bseq * p.ctx ? N - t0 : (int64_t)bseq * p.ctx);
        st = dash_enc_batch(&e, in, o->store, hook, t0, n);
        if (st != LP_OK) break;
        p.f = e.f, p.idx = e.idx, p.val = e.val, p.t0 = t0;
        scan_batch(&p, n, scratch);
    }
    if (st == LP_OK) {
        d->seconds_pass = dash_now() - t_start;
        snprintf(d->hook, sizeof d->hook, "%s", hook);
        d->ctx = p.ctx, d->n_tokens = N, d->n_seq = N / p.ctx;
        d->n_counted = d->n_seq * (p.ctx - o->skip_positions);
        d->opts = *o;
        st = dash_finish(d, s, c, o, p.st, p.stride, p.W);
    }
    dash_enc_close(&e);
    lp_store_close(in);
    free(p.st), free(arena), free(p.tmp), free(scratch);
    if (st != LP_OK) { lp_dash_free(d); return st; }
    *out = d;
    return LP_OK;
}
