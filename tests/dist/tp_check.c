/* tp_check: run under mpirun -np P. Every rank loads each model given twice, whole (one
 * process's model, no communication) and split over a TP group of P, and checks that the
 * split model gives what the whole one gives: losses (vocabulary-parallel), logits, every
 * hook's capture, the same after edits at per-head and per-neuron hooks (zero one head at
 * some positions, patch, steer, a callback), the collectives a forward makes, and the
 * interleaved schedule of a forward nobody hooks (micro-batches whose all-reduces overlap
 * the others' compute) against the plain one, with the cases that fall back to it. Exit
 * status 0 when everything agrees on every rank; each failure is one line on stderr.
 * With --cuda both models run on the CUDA device, the split one's collectives through NCCL
 * (every rank its own GPU) or staged through the host (ranks sharing one), the
 * interleaved schedule's started all-reduces on the job's own stream.
 * Driven by tests/test_dist.c and tests/test_dist_cuda.c. Usage: tp_check [--no-grad] [--cuda] MODEL... */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/attrib.h"
#include "loupe/dist.h"
#include "loupe/hooks.h"
#include "loupe/model.h"

#define TOL 1e-5 /* relative to the largest value of the compared tensor */
/* The interleaved schedule against the plain one at the same TP: the same sums per row, but
 * OpenBLAS's sgemm rounds a row differently with the number of rows it is called with (its
 * kernels tile the rows; a 32-row product and two 16-row halves differ in a fifth of the
 * elements, by about an ulp), and all-reduces of another size may be summed in another order. Those
 * differences, a few float32 ulps (6e-8) per layer, add like a random walk over the
 * layers: the budget is TOL_SCHEDULE_LAYER sqrt(layers) of the largest value (1e-6 for the
 * two-layer fixtures; observed: up to 6e-7 there, 1.5e-6 for SmolLM2's 30 layers). */
#define TOL_SCHEDULE_LAYER 7e-7

static int g_fail, g_rank, g_no_grad;
static lp_device g_dev = LP_CPU;

static void fail(const char *what, const char *model, const char *detail) {
    fprintf(stderr, "rank %d: %s: %s: %s\n", g_rank, model, what, detail);
    g_fail++;
}

/* max |a - b| / max |b| <= tol */
static void compare_tol(const char *model, const char *what, const float *a, const float *b, size_t n, double tol) {
    double err = 0, big = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= err)) err = d; /* NaN counts */
        if (fabs(b[i]) > big) big = fabs(b[i]);
    }
    if (!(err <= tol * (big > 0 ? big : 1))) {
        char buf[160];
        snprintf(buf, sizeof buf, "max difference %.3g against a largest value %.3g (%zu values)", err, big, n);
        fail(what, model, buf);
    }
}
static void compare(const char *model, const char *what, const float *a, const float *b, size_t n) {
    compare_tol(model, what, a, b, n, TOL);
}

#define TRY(expr, what)                                                     \
    do {                                                                    \
        if ((expr) != LP_OK) {                                              \
            fail(what, path, lp_last_error());                              \
            return;                                                         \
        }                                                                   \
    } while (0)

/* Every captured hook (all but unembed.hook_out, unless `out`) of both models agrees. */
static void compare_hooks(const char *path, lp_model *w, lp_model *s, int B, int T, const char *tag) {
    for (int id = 0; id < lp_hook_count(w); id++) {
        const char *name = lp_hook_name(w, id);
        if (!lp_hook_is_captured(w, id)) continue;
        int64_t sh[LP_MAX_DIMS];
        int nd = lp_hook_shape(w, id, B, T, sh);
        size_t n = (size_t)lp_shape_numel(sh, nd);
        float *a = malloc(n * sizeof(float)), *b = malloc(n * sizeof(float));
        char what[160];
        snprintf(what, sizeof what, "%s %s", tag, name);
        if (lp_capture_read_f32(s, name, a, n) != LP_OK || lp_capture_read_f32(w, name, b, n) != LP_OK)
            fail(what, path, lp_last_error());
        else
            compare(path, what, a, b, n);
        free(a);
        free(b);
    }
}

/* A callback edit: doubles the activation (the split model's sees the whole activation). */
static lp_status twice(const char *hook, lp_tensor *act, void *user) {
    (void)hook, (void)user;
    if (act->device != LP_CPU || act->dtype != LP_F32) return LP_OK;
    float *x = act->data;
    size_t n = (size_t)lp_shape_numel(act->shape, act->ndim);
    for (size_t i = 0; i < n; i++) x[i] *= 2;
    return LP_OK;
}

/* The same edits on both models. */
static lp_status add_edits(lp_model *m, const lp_config *c, int B, int T) {
    int pos[2] = {1, 3}, head[1] = {1}, kvhead[1] = {c->n_kv_heads - 1};
    lp_edit_spec zero = {.kind = LP_EDIT_ZERO, .pos = pos, .npos = 2, .heads = head, .nheads = 1};
    LP_CHECK(lp_hook_edit(m, "blocks.0.attn.hook_z", &zero));
    LP_CHECK(lp_hook_edit(m, "blocks.0.attn.hook_pattern", &zero));
    size_t nv = (size_t)B * T * c->n_kv_heads * c->d_head;
    float *src = malloc(nv * sizeof(float));
    for (size_t i = 0; i < nv; i++) src[i] = (float)((i * 37 % 101) - 50) / 100.0f;
    lp_edit_spec patch = {.kind = LP_EDIT_PATCH, .src = src, .src_len = nv, .heads = kvhead, .nheads = 1};
    lp_status st = lp_hook_edit(m, "blocks.0.attn.hook_v", &patch);
    free(src);
    LP_CHECK(st);
    float *dir = malloc((size_t)c->d_mlp * sizeof(float));
    for (int i = 0; i < c->d_mlp; i++) dir[i] = (float)((i * 13 % 17) - 8) / 8.0f;
    lp_edit_spec steer = {.kind = LP_EDIT_ADD, .src = dir, .src_len = (size_t)c->d_mlp, .coef = 0.5f};
    st = lp_hook_edit(m, "blocks.*.mlp.hook_post", &steer);
    free(dir);
    LP_CHECK(st);
    lp_edit_spec cb = {.fn = twice, .grad = LP_EDIT_GRAD_IDENTITY};
    return lp_hook_edit(m, "blocks.1.attn.hook_q", &cb);
}

/* The scale a norm's hook_scale gradient is a sum over: per row, |gradient at its
 * hook_normalized| sqrt(width) / scale. That gradient nearly cancels where the norm's output
 * barely depends on its input's size, so its own magnitude says nothing of the rounding in
 * it (-1: no such pair of hooks captured). */
static double scale_grad_ref(lp_model *w, const char *name, size_t rows) {
    char nn[160];
    size_t k = strlen(name);
    if (k < 10 || strcmp(name + k - 10, "hook_scale") != 0) return -1;
    snprintf(nn, sizeof nn, "%.*shook_normalized", (int)(k - 10), name);
    lp_tensor gn;
    if (lp_grad_get(w, nn, &gn) != LP_OK) return -1;
    size_t n = (size_t)lp_shape_numel(gn.shape, gn.ndim), width = n / rows;
    float *sc = malloc(rows * sizeof(float));
    double ref = -1;
    if (lp_capture_read_f32(w, name, sc, rows) == LP_OK)
        for (size_t r = 0; r < rows; r++) {
            double s2 = 0;
            for (size_t j = 0; j < width; j++) s2 += (double)((float *)gn.data)[r * width + j] * ((float *)gn.data)[r * width + j];
            double v = sqrt(s2 * width) / sc[r];
            if (v > ref) ref = v;
        }
    free(sc);
    return ref;
}

/* Gradients at every hook (no weights: their gradients are refused when split), for three
 * metrics: the mean loss, a logit difference, and a direction at a per-head hook. */
static void grads_check(const char *path, lp_model *w, lp_model *s, const int32_t *tok, int B, int T, const char *tag) {
    const lp_config *c = lp_model_config(w);
    int32_t ans[2] = {3, 5}, wrong[2] = {7 % c->d_vocab, 11 % c->d_vocab};
    float *dir = malloc((size_t)c->n_heads * c->d_head * sizeof(float));
    for (int i = 0; i < c->n_heads * c->d_head; i++) dir[i] = (float)((i * 7 % 11) - 5) / 5.0f;
    lp_metric mets[3] = {{.kind = LP_METRIC_MEAN_LOSS}, {.kind = LP_METRIC_LOGIT_DIFF, .answer = ans, .wrong = wrong},
                         {.kind = LP_METRIC_DIRECTION, .hook = "blocks.1.attn.hook_z", .direction = dir}};
    const char *mname[3] = {"mean-loss", "logit-diff", "direction"};
    for (int k = 0; k < 3; k++) {
        double mw[2], ms[2];
        char what[200];
        if (lp_model_grad(w, tok, B, T, &mets[k], "*hook_*", mw) != LP_OK ||
            lp_model_grad(s, tok, B, T, &mets[k], "*hook_*", ms) != LP_OK) {
            snprintf(what, sizeof what, "%s gradient (%s)", tag, mname[k]);
            fail(what, path, lp_last_error());
            continue;
        }
        float fw[2] = {(float)mw[0], (float)mw[1]}, fs[2] = {(float)ms[0], (float)ms[1]};
        snprintf(what, sizeof what, "%s metric (%s)", tag, mname[k]);
        compare(path, what, fs, fw, 2);
        for (int id = 0; id < lp_hook_count(w); id++) {
            const char *name = lp_hook_name(w, id);
            lp_tensor gw, gs;
            int hw = lp_grad_get(w, name, &gw) == LP_OK, hs = lp_grad_get(s, name, &gs) == LP_OK;
            snprintf(what, sizeof what, "%s gradient (%s) at %s", tag, mname[k], name);
            if (hw != hs) fail(what, path, hw ? "missing from the split model" : "present only in the split model");
            if (!hw || !hs) continue;
            size_t n = (size_t)lp_shape_numel(gw.shape, gw.ndim);
            double ref = scale_grad_ref(w, name, n);
            if (ref < 0) {
                compare(path, what, gs.data, gw.data, n);
                continue;
            }
            double err = 0;
            for (size_t i = 0; i < n; i++) err = fmax(err, fabs((double)((float *)gs.data)[i] - ((float *)gw.data)[i]));
            if (!(err <= TOL * ref)) {
                char buf[160];
                snprintf(buf, sizeof buf, "max difference %.3g against the scale of its terms %.3g", err, ref);
                fail(what, path, buf);
            }
        }
    }
    free(dir);
}

static void counts_check(const char *path, lp_model *s, lp_dist *d, const int32_t *tok, int B, int T) {
    const lp_config *c = lp_model_config(s);
    char buf[200], last[64];
    lp_hooks_clear(s);
    snprintf(last, sizeof last, "blocks.%d.hook_resid_post", c->n_layers - 1);
    TRY(lp_hook_capture(s, last, NULL, 0, NULL), "capture");
    TRY(lp_model_forward(s, tok, B, T, 0), "forward"); /* sizes everything first */
    lp_dist_counts k;
    lp_dist_counts_reset(d);
    TRY(lp_model_forward(s, tok, B, T, 0), "forward");
    lp_dist_counts_get(d, &k);
    uint64_t want_bytes = 2ull * c->n_layers * B * T * c->d_model * sizeof(float);
    if (k.allreduce != 2ull * c->n_layers || k.allreduce_bytes != want_bytes || k.allgather || k.broadcast) {
        snprintf(buf, sizeof buf, "residual hook only: %llu all-reduces of %llu bytes and %llu all-gathers; expected %d of %llu and none",
                 (unsigned long long)k.allreduce, (unsigned long long)k.allreduce_bytes, (unsigned long long)k.allgather,
                 2 * c->n_layers, (unsigned long long)want_bytes);
        fail("communication count", path, buf);
    }
    TRY(lp_hook_capture(s, "blocks.0.attn.hook_z", NULL, 0, NULL), "capture");
    TRY(lp_model_forward(s, tok, B, T, 0), "forward");
    lp_dist_counts_reset(d);
    TRY(lp_model_forward(s, tok, B, T, 0), "forward");
    lp_dist_counts_get(d, &k);
    uint64_t zb = (uint64_t)B * T * c->n_heads * c->d_head * sizeof(float) / lp_dist_tp_size(d);
    if (k.allreduce != 2ull * c->n_layers || k.allgather != 1 || k.allgather_bytes != zb) {
        snprintf(buf, sizeof buf, "with hook_z: %llu all-reduces, %llu all-gathers of %llu bytes; expected %d, 1 of %llu",
                 (unsigned long long)k.allreduce, (unsigned long long)k.allgather, (unsigned long long)k.allgather_bytes,
                 2 * c->n_layers, (unsigned long long)zb);
        fail("communication count", path, buf);
    }
    lp_hooks_clear(s);
}

/* A forward's all-reduces against what the schedule makes: `parts` micro-batches, each
 * 2 per layer of B T d / parts values (the plain schedule: parts = 1). */
static void reduces_check(const char *path, lp_model *s, lp_dist *d, const int32_t *tok, int B, int T, int parts, const char *tag) {
    const lp_config *c = lp_model_config(s);
    lp_dist_counts k;
    char buf[240];
    lp_dist_counts_reset(d);
    TRY(lp_model_forward(s, tok, B, T, LP_WANT_LOGITS), "forward"); /* logits: gathered, no loss reductions */
    lp_dist_counts_get(d, &k);
    uint64_t want_n = 2ull * parts * c->n_layers, want_bytes = 2ull * c->n_layers * B * T * c->d_model * sizeof(float);
    if (lp_model_tp_overlapped(s) != parts || k.allreduce != want_n || k.allreduce_bytes != want_bytes) {
        snprintf(buf, sizeof buf, "batch %d: %d micro-batch(es) ran, %llu all-reduces of %llu bytes in all; expected %d, %llu of %llu",
                 B, lp_model_tp_overlapped(s), (unsigned long long)k.allreduce, (unsigned long long)k.allreduce_bytes, parts,
                 (unsigned long long)want_n, (unsigned long long)want_bytes);
        fail(tag, path, buf);
    }
}

/* The interleaved schedule (micro-batches whose all-reduces overlap the others' compute):
 * with nothing hooked a split forward runs it and gives the plain schedule's losses and
 * logits (TOL_SCHEDULE_LAYER) and the whole model's (TOL); an odd batch, a hook, or parts = 1
 * takes the plain schedule, which the number and size of the all-reduces show. */
static void overlap_check(const char *path, lp_model *w, lp_model *s, lp_dist *d) {
    const lp_config *c = lp_model_config(w);
    int B = 4, T = c->n_ctx < 8 ? c->n_ctx : 8, want = LP_WANT_LOSS | LP_WANT_LOGITS;
    double tol = TOL_SCHEDULE_LAYER * sqrt(c->n_layers);
    size_t nl = (size_t)B * (T - 1), nv = (size_t)B * T * c->d_vocab;
    int32_t tok[32];
    for (int i = 0; i < B * T; i++) tok[i] = (int32_t)((i * 7907 + 5) % c->d_vocab);
    lp_hooks_clear(w), lp_hooks_clear(s);
    float *loss = malloc(nl * sizeof(float)), *logit = malloc(nv * sizeof(float));
    TRY(lp_model_forward(w, tok, B, T, want), "forward whole");
    TRY(lp_model_set_tp_overlap(s, 1), "plain schedule");
    TRY(lp_model_forward(s, tok, B, T, want), "forward split, plain");
    memcpy(loss, lp_model_losses(s), nl * sizeof(float));
    memcpy(logit, lp_model_logits(s), nv * sizeof(float));
    reduces_check(path, s, d, tok, B, T, 1, "plain schedule when asked");
    static const int settings[] = {2, 4, 0}; /* 0: the default, B/4, B/2, B/4 sequences */
    for (int i = 0; i < 3; i++) {
        char what[96];
        int seqs[LP_DIST_MAX_STARTED], setting = settings[i], parts = lp_model_tp_parts(B, setting, seqs);
        TRY(lp_model_set_tp_overlap(s, setting), "interleaved schedule");
        TRY(lp_model_forward(s, tok, B, T, want), "forward split, interleaved");
        snprintf(what, sizeof what, "%d micro-batches: losses against the plain schedule", parts);
        compare_tol(path, what, lp_model_losses(s), loss, nl, tol);
        snprintf(what, sizeof what, "%d micro-batches: logits against the plain schedule", parts);
        compare_tol(path, what, lp_model_logits(s), logit, nv, tol);
        snprintf(what, sizeof what, "%d micro-batches: losses against one process", parts);
        compare(path, what, lp_model_losses(s), lp_model_losses(w), nl);
        snprintf(what, sizeof what, "%d micro-batches: logits against one process", parts);
        compare(path, what, lp_model_logits(s), lp_model_logits(w), nv);
        snprintf(what, sizeof what, "%d micro-batches: all-reduces", parts);
        reduces_check(path, s, d, tok, B, T, parts, what);
    }
    /* the default (set last in the loop): 4 sequences make parts of 1, 2 and 1; 2 make two */
    reduces_check(path, s, d, tok, 2, T, 2, "default, 2 sequences: 2 micro-batches");
    reduces_check(path, s, d, tok, 3, T, 1, "default, odd batch: plain schedule");
    TRY(lp_model_set_tp_overlap(s, 2), "interleaved schedule");
    reduces_check(path, s, d, tok, 3, T, 1, "odd batch: plain schedule");
    char last[64];
    snprintf(last, sizeof last, "blocks.%d.hook_resid_post", c->n_layers - 1);
    TRY(lp_hook_capture(s, last, NULL, 0, NULL), "capture");
    reduces_check(path, s, d, tok, B, T, 1, "a hook: plain schedule");
    lp_hooks_clear(s);
    free(loss);
    free(logit);
}

static void check_model(const char *path, lp_dist *d) {
    lp_model *w = NULL, *s = NULL;
    TRY(lp_model_load(&w, path, g_dev, LP_F32), "load whole");
    if (lp_model_load_dist(&s, path, g_dev, LP_F32, d) != LP_OK) {
        fail("load split", path, lp_last_error());
        lp_model_free(w);
        return;
    }
    const lp_config *c = lp_model_config(w);
    int B = 2, T = c->n_ctx < 8 ? c->n_ctx : 8;
    int32_t tok[16];
    for (int i = 0; i < B * T; i++) tok[i] = (int32_t)((i * 7919 + 13) % c->d_vocab);
    if (lp_model_n_params(s) != lp_model_n_params(w)) fail("parameter count", path, "differs from the whole model's");
    for (int pass = 0; pass < 3; pass++) {
        /* 0: every hook but the logits', losses from the vocabulary slices; 1: with the
         * logits hooked and wanted; 2: pass 1 with edits */
        lp_hooks_clear(w), lp_hooks_clear(s);
        const char *tag = pass == 0 ? "vocab-parallel" : pass == 1 ? "logits" : "edited";
        for (int i = 0; i < 2; i++) {
            lp_model *m = i ? s : w;
            for (int id = 0; id < lp_hook_count(m); id++)
                if (pass || strcmp(lp_hook_name(m, id), "unembed.hook_out") != 0)
                    TRY(lp_hook_capture(m, lp_hook_name(m, id), NULL, 0, NULL), "capture");
            if (pass == 2) TRY(add_edits(m, c, B, T), "edit");
        }
        int want = LP_WANT_LOSS | (pass ? LP_WANT_LOGITS : 0);
        TRY(lp_model_forward(w, tok, B, T, want), "forward whole");
        TRY(lp_model_forward(s, tok, B, T, want), "forward split");
        char what[64];
        snprintf(what, sizeof what, "%s losses", tag);
        compare(path, what, lp_model_losses(s), lp_model_losses(w), (size_t)B * (T - 1));
        if (pass) {
            snprintf(what, sizeof what, "%s logits", tag);
            compare(path, what, lp_model_logits(s), lp_model_logits(w), (size_t)B * T * c->d_vocab);
        }
        compare_hooks(path, w, s, B, T, tag);
        if (pass && !g_no_grad) grads_check(path, w, s, tok, B, T, tag);
    }
    counts_check(path, s, d, tok, B, T);
    overlap_check(path, w, s, d);
    lp_model_free(s);
    lp_model_free(w);
}

int main(int argc, char **argv) {
    lp_dist *d;
    if (lp_dist_init(&d, 0, 1) != LP_OK) { /* dist.tp = every process */
        fprintf(stderr, "tp_check: %s\n", lp_last_error());
        return 2;
    }
    g_rank = lp_dist_rank(d);
    int first = 1;
    for (; first < argc && strncmp(argv[first], "--", 2) == 0; first++) {
        if (strcmp(argv[first], "--no-grad") == 0) g_no_grad = 1;
        else if (strcmp(argv[first], "--cuda") == 0) g_dev = LP_CUDA;
        else {
            fprintf(stderr, "usage: tp_check [--no-grad] [--cuda] MODEL...\n");
            return 2;
        }
    }
    for (int i = first; i < argc; i++) check_model(argv[i], d);
    /* every rank's verdict, so that rank 0's summary and every exit status agree */
    int64_t bad = g_fail;
    lp_dist_allreduce_sum(d, LP_DIST_WORLD, &bad, 1, LP_I64);
    if (g_rank == 0)
        printf("tp_check: TP=%d, %d model(s)%s: %s (%lld failure(s) over all ranks)\n", lp_dist_tp_size(d), argc - first,
               g_dev == LP_CPU ? "" : lp_dist_uses_nccl(d, LP_DIST_TP) == 1 ? " on CUDA through NCCL" : " on CUDA through the host",
               bad ? "FAILED" : "all agree with one process", (long long)bad);
    lp_dist_finalize(d);
    return bad ? 1 : 0;
}
