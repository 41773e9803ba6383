/* graph_dev.c: the graph's backward passes on a CUDA device (graph.device = cuda). The
 * replacement model's backward runs there (model/frozen_dev.c) and so do the contractions
 * of graph_rows.c's sink: each layer's gradient against the active features' decoder rows
 * (gathered from the transcoders' W_dec by feature index, scaled by the activation), the
 * error vectors and the token embeddings, into a device block of dense rows [batch, ncol].
 * One copy per block brings that block into a pinned host buffer, where graph_rows.c cuts
 * each row to its sparse form as on the CPU; host memory still grows with the kept edges.
 * Device memory: fz_dev's allocation and one more carved by layout() (transcoder decoders
 * and skips, the active list by position, the errors, the embeddings, the row block);
 * graph_dev_bytes is their sum, the plan's device_bytes. */
#include <stdlib.h>
#include <string.h>

#include "attrib/graph_internal.h"
#include "model/frozen_dev.h"
#include "ops/graph_ops.h"

struct graph_dev {
    lp_ctx ctx;
    int ready;
    fz_dev *fz;
    void *mem;
    float **dec, **skip;   /* [NL]: W_dec_l [n_out, S, D]; W_skip_l or NULL */
    int *feat;             /* [n_active] feature index */
    float *act;            /* [n_active] activation */
    int *pstart;           /* [NL, T + 1] per source layer, first active (relative) at each position */
    float *err, *embed;    /* [NL, T, D], [T, D] */
    float *rows;           /* [batch, ncol] */
    size_t bytes, measured;
};

static void *carve(char *base, size_t *at, size_t bytes) {
    void *p = base ? base + *at : NULL;
    *at += (bytes + 255) / 256 * 256;
    return p;
}

static size_t layout(const graph_work *w, char *base, graph_dev *d) {
    size_t at = 0, S = w->tc->cfg.d_sae, D = w->D, T = w->T;
    for (int l = 0; l < w->NL; l++) {
        const lp_clt_layer *y = &w->tc->layer[l];
        float *dec = carve(base, &at, (size_t)y->n_out * S * D * 4), *skip = y->W_skip ? carve(base, &at, D * D * 4) : NULL;
        if (d) d->dec[l] = dec, d->skip[l] = skip;
    }
    graph_dev tmp;
    graph_dev *e = d ? d : &tmp;
    e->feat = carve(base, &at, (size_t)w->n_active * 4 + 4);
    e->act = carve(base, &at, (size_t)w->n_active * 4 + 4);
    e->pstart = carve(base, &at, (size_t)w->NL * (T + 1) * 4);
    e->err = carve(base, &at, (size_t)w->NL * T * D * 4);
    e->embed = carve(base, &at, T * D * 4);
    e->rows = carve(base, &at, (size_t)w->o->batch_size * w->ncol * 4);
    return at;
}

size_t graph_dev_bytes(const graph_work *w, const lp_config *c) {
    return fz_dev_bytes(c, w->T, w->o->batch_size) + layout(w, NULL, NULL);
}

static lp_status upload(graph_work *w, graph_dev *d) {
    size_t S = w->tc->cfg.d_sae, D = w->D, T = w->T;
    lp_ctx *c = &d->ctx;
    for (int l = 0; l < w->NL; l++) {
        const lp_clt_layer *y = &w->tc->layer[l];
        LP_CHECK(lp_ctx_to_device(c, d->dec[l], y->W_dec, (size_t)y->n_out * S * D * 4));
        if (y->W_skip) LP_CHECK(lp_ctx_to_device(c, d->skip[l], y->W_skip, D * D * 4));
    }
    int *feat = malloc(((size_t)w->n_active + 1) * sizeof(int)), *ps = malloc((size_t)w->NL * (T + 1) * sizeof(int));
    lp_status st = feat && ps ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory for the device graph's feature list");
    for (int k = 0; st == LP_OK && k < w->n_active; k++) feat[k] = w->active[3 * k + 2];
    for (int l = 0; st == LP_OK && l < w->NL; l++) { /* actives are sorted by (layer, position, feature) */
        int j = w->layer_start[l];
        for (size_t t = 0; t <= T; t++) {
            while (j < w->layer_start[l + 1] && (size_t)w->active[3 * j + 1] < t) j++;
            ps[(size_t)l * (T + 1) + t] = j - w->layer_start[l];
        }
    }
    if (st == LP_OK) st = lp_ctx_to_device(c, d->feat, feat, (size_t)w->n_active * sizeof(int));
    if (st == LP_OK) st = lp_ctx_to_device(c, d->act, w->actv, (size_t)w->n_active * 4);
    if (st == LP_OK) st = lp_ctx_to_device(c, d->pstart, ps, (size_t)w->NL * (T + 1) * sizeof(int));
    if (st == LP_OK) st = lp_ctx_to_device(c, d->err, w->err, (size_t)w->NL * T * D * 4);
    if (st == LP_OK) st = lp_ctx_to_device(c, d->embed, lp_frozen_embed(w->fz), T * D * 4);
    free(feat), free(ps);
    return st;
}

lp_status graph_dev_check(void) {
    char why[256];
    if (!lp_cuda_available(why, sizeof why))
        LP_FAIL(LP_ERR_NO_CUDA, "graph.device = cuda: no usable GPU (%s); graph.device = cpu runs the backward passes on the host", why);
    return LP_OK;
}

lp_status graph_dev_start(graph_work *w, const lp_graph_plan *pl) {
    graph_dev *d = calloc(1, sizeof *d);
    if (!d || !(d->dec = calloc(w->NL, sizeof *d->dec)) || !(d->skip = calloc(w->NL, sizeof *d->skip))) {
        if (d) free(d->dec);
        free(d);
        LP_FAIL(LP_ERR_OOM, "out of memory for the device graph");
    }
    w->dev = d;
    lp_status st = lp_ctx_init(&d->ctx, LP_CUDA, LP_F32);
    if (st != LP_OK) return st;
    d->ready = 1;
    size_t free0 = 0, total = 0, free1 = 0;
    LP_CHECK(cuda_fz_mem_info(&d->ctx, &free0, &total));
    if (pl->device_bytes > free0)
        LP_FAIL(LP_ERR_ARG, "graph: the plan needs %.1f MiB on the device but %.1f MiB of %.1f MiB are free; lower graph.batch",
                pl->device_bytes / 1048576.0, free0 / 1048576.0, total / 1048576.0);
    LP_CHECK(fz_dev_new(&d->fz, w->fz, &d->ctx, w->o->batch_size));
    size_t bytes = layout(w, NULL, NULL);
    LP_CHECK(lp_ctx_alloc(&d->ctx, bytes, &d->mem));
    layout(w, d->mem, d);
    d->bytes = fz_dev_bytes(w->mc, w->T, w->o->batch_size) + bytes;
    LP_CHECK(cuda_fz_mem_info(&d->ctx, &free1, &total));
    d->measured = free0 - free1;
    LP_CHECK(upload(w, d));
    return lp_ctx_alloc_host(&d->ctx, (size_t)w->o->batch_size * w->ncol * 4, (void **)&w->rowbuf);
}

static lp_status sink(int L, const float *G, int R, int Tm, void *user) {
    graph_work *w = user;
    graph_dev *d = w->dev;
    long long nc = w->ncol;
    int D = w->D, T = w->T;
    if (L < 0) return cuda_fz_row_dots(&d->ctx, d->rows + w->n_active + (int64_t)w->NL * T, nc, G, d->embed, R, Tm, D);
    for (int l = 0; l <= L; l++) { /* features writing to layer L: a CLT's from every l <= L */
        int j = w->layer_start[l];
        if (lp_clt_n_out(w->tc, l) <= L - l || w->layer_start[l + 1] == j) continue;
        const float *W = d->dec[l] + (size_t)(L - l) * w->tc->cfg.d_sae * D;
        LP_CHECK(cuda_fz_feature_dots(&d->ctx, d->rows + j, nc, G, R, Tm, D, d->pstart + (size_t)l * (T + 1), d->feat + j,
                                      d->act + j, W));
    }
    return cuda_fz_row_dots(&d->ctx, d->rows + w->n_active + (int64_t)L * T, nc, G, d->err + (size_t)L * T * D, R, Tm, D);
}

lp_status graph_dev_rows(graph_work *w, int R, const int *layer, const int *pos, const float *vec) {
    graph_dev *d = w->dev;
    size_t bytes = (size_t)R * w->ncol * 4;
    LP_CHECK(lp_ctx_memset0(&d->ctx, d->rows, bytes));
    LP_CHECK(fz_dev_backward(d->fz, R, layer, pos, vec, (const float *const *)d->skip, sink, w));
    return lp_ctx_to_host(&d->ctx, w->rowbuf, d->rows, bytes);
}

size_t graph_dev_measured(const graph_work *w) { return w->dev ? w->dev->measured : 0; }

void graph_dev_free(graph_work *w) {
    graph_dev *d = w->dev;
    if (!d) return;
    if (d->ready) {
        lp_ctx_release_host(&d->ctx, w->rowbuf);
        w->rowbuf = NULL;
        fz_dev_free(d->fz);
        lp_ctx_release(&d->ctx, d->mem);
        lp_ctx_free(&d->ctx);
    }
    free(d->dec), free(d->skip), free(d);
    w->dev = NULL;
}
