/* clt_source.c: the data a transcoder set trains on (clt_train.h): every layer's input and
 * output hook per token, from an activation store or from the model itself. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/clt_train.h"
#include "loupe/model.h"
#include "loupe/hooks.h"
#include "loupe/store.h"
#include "core/rng.h"

#define RUN 16 /* tokens read together from a store */

struct lp_clt_source {
    lp_clt_cfg cfg;
    int L, D;
    uint64_t rng;
    /* store */
    lp_store **st;                 /* [2L]: inputs, then outputs */
    int64_t n_tokens;
    /* live */
    lp_model *m;
    const int32_t *tokens;
    int64_t n_seq, next_row;
    int ctx, batch;
    float *buf;                    /* [2L, batch * ctx, D] of the last forward */
    int *perm, used, avail, nbuf;
};

static lp_status hook_names(const lp_clt_cfg *cfg, int l, char in[160], char out[160]) {
    lp_clt tmp = {.cfg = *cfg};
    LP_CHECK(lp_clt_hook_name(&tmp, l, 0, in, 160));
    return lp_clt_hook_name(&tmp, l, 1, out, 160);
}

void lp_clt_source_free(lp_clt_source *s) {
    if (!s) return;
    for (int i = 0; s->st && i < 2 * s->L; i++) lp_store_close(s->st[i]);
    free(s->st), free(s->buf), free(s->perm);
    if (s->m) lp_hooks_clear(s->m);
    free(s);
}

void lp_clt_source_dims(const lp_clt_source *s, int *n_layers, int *d_model) { *n_layers = s->L, *d_model = s->D; }

lp_status lp_clt_source_store(lp_clt_source **out, const char *dir, const lp_clt_cfg *cfg, uint64_t seed) {
    *out = NULL;
    if (cfg->n_layers <= 0 || cfg->n_layers > 4096) LP_FAIL(LP_ERR_ARG, "transcoder source: n_layers = %d", cfg->n_layers);
    lp_clt_source *s = calloc(1, sizeof *s);
    if (s) s->st = calloc(2 * (size_t)cfg->n_layers, sizeof *s->st);
    if (!s || !s->st) {
        free(s);
        LP_FAIL(LP_ERR_OOM, "out of memory");
    }
    s->L = cfg->n_layers, s->rng = seed * 0xD1B54A32D192ED03ull + 7;
    lp_status st = LP_OK;
    for (int l = 0; st == LP_OK && l < s->L; l++) {
        char in[160], o[160];
        st = hook_names(cfg, l, in, o);
        if (st == LP_OK) st = lp_store_open(&s->st[l], dir, in);
        if (st == LP_OK) st = lp_store_open(&s->st[s->L + l], dir, o);
    }
    for (int i = 0; st == LP_OK && i < 2 * s->L; i++) {
        if (i == 0) s->D = lp_store_d(s->st[0]), s->n_tokens = lp_store_n_tokens(s->st[0]);
        if (lp_store_d(s->st[i]) != s->D || lp_store_n_tokens(s->st[i]) != s->n_tokens)
            st = LP_ERR(LP_ERR_SHAPE, "%s: the transcoder hooks differ in width or token count", dir);
    }
    if (st == LP_OK && s->n_tokens < RUN) st = LP_ERR(LP_ERR_FORMAT, "%s: %lld tokens, fewer than %d", dir, (long long)s->n_tokens, RUN);
    if (st != LP_OK) {
        lp_clt_source_free(s);
        return st;
    }
    *out = s;
    return LP_OK;
}

lp_status lp_clt_source_live(lp_clt_source **out, lp_model *m, const lp_clt_cfg *cfg, const int32_t *tokens, int64_t n_seq,
                             int ctx, int batch_seqs, uint64_t seed) {
    *out = NULL;
    if (n_seq <= 0 || ctx <= 0 || batch_seqs <= 0) LP_FAIL(LP_ERR_ARG, "transcoder source: no token rows");
    if (batch_seqs > n_seq) batch_seqs = (int)n_seq;
    lp_clt_source *s = calloc(1, sizeof *s);
    if (!s) LP_FAIL(LP_ERR_OOM, "out of memory");
    const lp_config *mc = lp_model_config(m);
    s->cfg = *cfg, s->L = cfg->n_layers, s->D = mc->d_model, s->m = m, s->tokens = tokens, s->n_seq = n_seq, s->ctx = ctx,
    s->batch = batch_seqs, s->rng = seed * 0xD1B54A32D192ED03ull + 11;
    lp_status st = s->L == mc->n_layers ? LP_OK
                                         : LP_ERR(LP_ERR_SHAPE, "transcoder source: %d layers, the model has %d", s->L, mc->n_layers);
    size_t n = (size_t)batch_seqs * ctx;
    s->buf = malloc(2 * (size_t)s->L * n * s->D * sizeof(float)), s->perm = malloc(n * sizeof(int));
    if (st == LP_OK && (!s->buf || !s->perm)) st = LP_ERR(LP_ERR_OOM, "out of memory for %zu tokens of activations", n);
    lp_hooks_clear(m);
    for (int l = 0; st == LP_OK && l < s->L; l++) {
        char in[160], o[160];
        st = hook_names(cfg, l, in, o);
        if (st == LP_OK && lp_hook_find(m, in) < 0) st = LP_ERR(LP_ERR_NOT_FOUND, "feature_input_hook: the model has no hook '%s'", in);
        if (st == LP_OK && lp_hook_find(m, o) < 0) st = LP_ERR(LP_ERR_NOT_FOUND, "feature_output_hook: the model has no hook '%s'", o);
        if (st == LP_OK) st = lp_hook_capture(m, in, NULL, 0, NULL);
        if (st == LP_OK) st = lp_hook_capture(m, o, NULL, 0, NULL);
    }
    if (st != LP_OK) {
        lp_clt_source_free(s);
        return st;
    }
    *out = s;
    return LP_OK;
}

/* One forward of the next rows; its tokens in a fresh random order. */
static lp_status refill(lp_clt_source *s) {
    int B = s->batch, T = s->ctx;
    int32_t *rows = malloc((size_t)B * T * sizeof *rows);
    if (!rows) LP_FAIL(LP_ERR_OOM, "out of memory");
    for (int b = 0; b < B; b++, s->next_row = (s->next_row + 1) % s->n_seq)
        memcpy(rows + (size_t)b * T, s->tokens + s->next_row * T, (size_t)T * sizeof *rows);
    lp_status st = lp_model_forward(s->m, rows, B, T, 0);
    free(rows);
    size_t n = (size_t)B * T;
    for (int l = 0; st == LP_OK && l < s->L; l++) {
        char in[160], o[160];
        st = hook_names(&s->cfg, l, in, o);
        if (st == LP_OK) st = lp_capture_read_f32(s->m, in, s->buf + (size_t)l * n * s->D, n * s->D);
        if (st == LP_OK) st = lp_capture_read_f32(s->m, o, s->buf + (size_t)(s->L + l) * n * s->D, n * s->D);
    }
    /* position 0 is left out: circuit-tracer zeroes its features (the BOS token's huge
     * activations would dominate the loss) */
    s->nbuf = (int)n, s->avail = 0, s->used = 0;
    for (size_t i = 0; i < n; i++)
        if (T == 1 || i % (size_t)T) s->perm[s->avail++] = (int)i;
    for (size_t i = (size_t)s->avail - 1; s->avail > 1 && i > 0; i--) {
        size_t j = rng_next(&s->rng) % (i + 1);
        int t = s->perm[i];
        s->perm[i] = s->perm[j], s->perm[j] = t;
    }
    return st;
}

lp_status lp_clt_source_next(void *src, int n, float *x, float *y) {
    lp_clt_source *s = src;
    size_t D = s->D, L = s->L;
    if (s->st) {
        for (int i = 0; i < n; i += RUN) {
            int k = n - i < RUN ? n - i : RUN;
            int64_t t0 = (int64_t)(rng_next(&s->rng) % (uint64_t)(s->n_tokens - k + 1));
            for (size_t l = 0; l < L; l++) {
                LP_CHECK(lp_store_read(s->st[l], t0, k, x + (l * n + i) * D));
                LP_CHECK(lp_store_read(s->st[L + l], t0, k, y + (l * n + i) * D));
            }
        }
        return LP_OK;
    }
    for (int i = 0; i < n; i++) {
        if (s->used == s->avail) LP_CHECK(refill(s));
        size_t tok = (size_t)s->perm[s->used++], nt = (size_t)s->nbuf;
        for (size_t l = 0; l < L; l++) {
            memcpy(x + (l * n + i) * D, s->buf + ((l)*nt + tok) * D, D * sizeof(float));
            memcpy(y + (l * n + i) * D, s->buf + ((L + l) * nt + tok) * D, D * sizeof(float));
        }
    }
    return LP_OK;
}
