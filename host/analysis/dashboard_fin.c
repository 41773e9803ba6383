/* dashboard_fin.c: after the pass: the examples in their display order with their
 * tokens, the bands' ranges and counts, and the logit tables of each latent's decoder
 * direction (see dashboard.h for the conventions). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/ops.h"
#include "analysis/dashboard_internal.h"

static int cmp_value(const void *a, const void *b) { /* value descending, then token ascending */
    const ent *x = a, *y = b;
    if (x->v != y->v) return x->v > y->v ? -1 : 1;
    return x->t < y->t ? -1 : x->t > y->t;
}

typedef struct arena {
    unsigned char *p, *end;
} arena;

static void *take(arena *a, size_t n) {
    n = (n + 7) / 8 * 8;
    void *r = a->p;
    a->p += n;
    return r;
}

static void to_examples(lp_dash_example *out, unsigned char *ents, int n, size_t stride, const lp_dash *d,
                        const dash_tokens *tk, arena *a) {
    qsort(ents, n, stride, cmp_value);
    const lp_dash_opts *o = &d->opts;
    for (int i = 0; i < n; i++) {
        const ent *e = ENT(ents, i, stride);
        lp_dash_example *x = &out[i];
        int pos = (int)(e->t % d->ctx);
        int a0 = pos - o->left < 0 ? 0 : pos - o->left, b0 = pos + o->right >= d->ctx ? d->ctx - 1 : pos + o->right;
        x->token = e->t, x->value = e->v, x->start = a0, x->len = b0 - a0 + 1;
        x->tokens = take(a, (size_t)x->len * sizeof(int32_t));
        x->acts = take(a, (size_t)x->len * sizeof(float));
        for (int q = 0; q < x->len; q++) x->tokens[q] = dash_token(tk, e->t - pos + a0 + q), x->acts[q] = e->acts[q];
    }
}

static void latent_stats(lp_dash_latent *l, const lstate *s, int64_t counted) {
    l->fires = s->fires;
    l->density = counted ? (double)s->fires / (double)counted : 0;
    l->max = s->max;
    memcpy(l->hist, s->hist, sizeof l->hist);
    if (!s->fires) return;
    l->hist_exp = s->e;
    int nb = (int)ldexpf(s->max, -s->e) + 1;
    l->n_bins = nb > LP_DASH_BINS ? LP_DASH_BINS : nb;
    l->n_bands = (l->n_bins + LP_DASH_BINS_PER_BAND - 1) / LP_DASH_BINS_PER_BAND;
    for (int b = 0; b < l->n_bands; b++) {
        lp_dash_band *B = &l->bands[b];
        B->lo = ldexpf((float)(b * LP_DASH_BINS_PER_BAND), s->e);
        B->hi = ldexpf((float)((b + 1) * LP_DASH_BINS_PER_BAND), s->e);
        for (int i = 0; i < LP_DASH_BINS_PER_BAND; i++) B->count += s->hist[b * LP_DASH_BINS_PER_BAND + i];
    }
}

/* ids[n] of the n largest sign * x (ties: lower id first), in that order. */
static void select_n(const float *x, int V, int n, float sign, int32_t *ids) {
    int m = 0;
    for (int v = 0; v < V && n > 0; v++) {
        float a = sign * x[v];
        if (m == n && !(a > sign * x[ids[m - 1]])) continue;
        int i = m < n ? m++ : n - 1;
        while (i > 0 && a > sign * x[ids[i - 1]]) ids[i] = ids[i - 1], i--;
        ids[i] = v;
    }
}

/* One latent's logits row [V] (W_dec row through the folded W_U): tables and histogram.
 * The mean over the vocabulary is removed in double (center_unembed). */
static void logit_tables(lp_dash_latent *l, const float *row, int V, int n) {
    double mean = 0, lo = INFINITY, hi = -INFINITY;
    for (int v = 0; v < V; v++) mean += row[v];
    mean /= V;
    for (int v = 0; v < V; v++) {
        double c = (double)row[v] - mean;
        lo = c < lo ? c : lo, hi = c > hi ? c : hi;
    }
    select_n(row, V, n, 1.0f, l->pos_ids);
    select_n(row, V, n, -1.0f, l->neg_ids);
    for (int i = 0; i < n; i++)
        l->pos_vals[i] = (float)((double)row[l->pos_ids[i]] - mean), l->neg_vals[i] = (float)((double)row[l->neg_ids[i]] - mean);
    l->n_logits = n;
    l->logit_lo = (float)lo, l->logit_hi = (float)hi;
    for (int v = 0; v < V; v++) {
        int b = hi > lo ? (int)(((double)row[v] - mean - lo) / (hi - lo) * LP_DASH_LOGIT_BINS) : 0;
        l->logit_hist[b < LP_DASH_LOGIT_BINS ? b : LP_DASH_LOGIT_BINS - 1]++;
    }
}

static lp_status logits(lp_dash *d, lp_sae *s, lp_ctx *c, const lp_dash_opts *o, arena *a) {
    int D = s->cfg.d_out, V = o->d_vocab, CH = 64, n = o->n_logits;
    lp_ctx cpu;
    LP_CHECK(lp_ctx_init(&cpu, LP_CPU, LP_F32));
    float *dirs = malloc((size_t)CH * D * sizeof(float)), *out = malloc((size_t)CH * V * sizeof(float));
    lp_status st = dirs && out ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory for %d x %d logits", CH, V);
    for (int j0 = 0; st == LP_OK && j0 < d->n; j0 += CH) {
        int m = d->n - j0 < CH ? d->n - j0 : CH;
        for (int j = 0; st == LP_OK && j < m; j++)
            st = lp_ctx_to_host(c, dirs + (size_t)j * D, s->W_dec + (size_t)d->lat[j0 + j].latent * D, (size_t)D * 4);
        if (st == LP_OK && o->ln_final_w)
            for (int j = 0; j < m; j++)
                for (int k = 0; k < D; k++) dirs[(size_t)j * D + k] *= o->ln_final_w[k];
        if (st == LP_OK) st = lp_matmul(&cpu, out, dirs, o->W_U, NULL, m, D, V, 1); /* [m, D] x [V, D]^T */
        for (int j = 0; st == LP_OK && j < m; j++) {
            lp_dash_latent *l = &d->lat[j0 + j];
            l->pos_ids = take(a, (size_t)n * 4), l->neg_ids = take(a, (size_t)n * 4);
            l->pos_vals = take(a, (size_t)n * 4), l->neg_vals = take(a, (size_t)n * 4);
            logit_tables(l, out + (size_t)j * V, V, n);
        }
    }
    free(dirs), free(out);
    lp_ctx_free(&cpu);
    return st;
}

lp_status dash_finish(lp_dash *d, lp_sae *s, lp_ctx *c, const lp_dash_opts *o, lstate *st, size_t stride, int W) {
    int L = o->n_latents, n_log = o->W_U ? o->n_logits : 0;
    size_t bytes = 64;
    for (int j = 0; j < L; j++) {
        int n = st[j].n_top;
        for (int b = 0; b < LP_DASH_BANDS; b++) n += st[j].n_band[b];
        bytes += (size_t)n * ((sizeof(lp_dash_example) + 8) + 2 * ((size_t)W * 4 + 8)) + 4 * ((size_t)n_log * 4 + 8);
    }
    d->n = L;
    d->lat = calloc((size_t)L, sizeof *d->lat);
    d->mem = malloc(bytes);
    if (!d->lat || !d->mem) LP_FAIL(LP_ERR_OOM, "out of memory for the dashboards (%zu bytes)", bytes);
    arena a = {d->mem, (unsigned char *)d->mem + bytes};
    dash_tokens tk;
    LP_CHECK(dash_tokens_open(&tk, o->store, d->ctx));
    if (tk.n == 0 || tk.first[tk.n] != d->n_tokens) {
        dash_tokens_close(&tk);
        LP_FAIL(LP_ERR_FORMAT, "%s: the shards' tokens do not match the activations", o->store);
    }
    for (int j = 0; j < L; j++) {
        lp_dash_latent *l = &d->lat[j];
        l->latent = o->latents[j];
        latent_stats(l, &st[j], d->n_counted);
        l->n_top = st[j].n_top;
        l->top = take(&a, (size_t)l->n_top * sizeof(lp_dash_example));
        to_examples(l->top, st[j].top, l->n_top, stride, d, &tk, &a);
        for (int b = 0; b < l->n_bands; b++) {
            lp_dash_band *B = &l->bands[b];
            B->n = st[j].n_band[b];
            B->ex = take(&a, (size_t)B->n * sizeof(lp_dash_example));
            to_examples(B->ex, st[j].band + (size_t)b * o->samples * stride, B->n, stride, d, &tk, &a);
        }
    }
    dash_tokens_close(&tk);
    return n_log ? logits(d, s, c, o, &a) : LP_OK;
}
