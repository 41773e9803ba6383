/* attrib_check: run under mpirun -np P. Every rank loads each model given twice, whole (one
 * process's model, no communication) and split over a TP group of P, and checks that the
 * split model's attribution gives what the whole one's gives, within 1e-5 of each score
 * tensor's largest value: attribution patching over every node kind (gradient at the
 * corrupted run, at the clean run, and integrated gradients with the steps batched), the
 * exact-patching grid of every node kind, and SAE latents as nodes (a small TopK SAE trained
 * on the whole model first, the same on every rank). Exit status 0 when everything agrees on
 * every rank; each failure is one line on stderr. With --cuda the models and the SAE run on
 * the CUDA device. Driven by tests/test_dist.c. Usage: attrib_check [--cuda] MODEL... */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loupe/attrib.h"
#include "loupe/dist.h"
#include "loupe/model.h"
#include "loupe/sae.h"
#include "loupe/sae_train.h"

#define TOL 1e-5 /* relative to the largest value of the compared scores */

static int g_fail, g_rank;
static lp_device g_dev = LP_CPU;
static long long g_values; /* scores compared (so a check that compares nothing shows) */

static void fail(const char *model, const char *what, const char *detail) {
    fprintf(stderr, "rank %d: %s: %s: %s\n", g_rank, model, what, detail);
    g_fail++;
}

/* max |a - b| <= TOL max |b| (NaN fails) */
static void compare(const char *model, const char *what, const float *a, const float *b, size_t n) {
    double err = 0, big = 0;
    g_values += (long long)n;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= err)) err = d;
        if (fabs(b[i]) > big) big = fabs(b[i]);
    }
    if (!(err <= TOL * (big > 0 ? big : 1))) {
        char buf[160];
        snprintf(buf, sizeof buf, "max difference %.3g against a largest value %.3g (%zu values)", err, big, n);
        fail(model, what, buf);
    }
}

static void compare_metric(const char *model, const char *what, double a, double b) {
    float fa = (float)a, fb = (float)b;
    compare(model, what, &fa, &fb, 1);
}

/* Both results hold the same kinds, shapes and (within TOL) scores. */
static void compare_results(const char *model, const char *tag, const lp_pair_result *s, const lp_pair_result *w) {
    char what[160];
    snprintf(what, sizeof what, "%s clean metric", tag);
    compare_metric(model, what, s->metric_clean, w->metric_clean);
    snprintf(what, sizeof what, "%s corrupted metric", tag);
    compare_metric(model, what, s->metric_corrupted, w->metric_corrupted);
    for (int k = 0; k < LP_NODE_KINDS; k++) {
        const lp_node_scores *a = &s->s[k], *b = &w->s[k];
        snprintf(what, sizeof what, "%s %s", tag, lp_node_kind_name(k));
        if (!a->v != !b->v || a->ndim != b->ndim || memcmp(a->shape, b->shape, sizeof a->shape) != 0) {
            fail(model, what, "the split model's scores have another shape, or are missing");
            continue;
        }
        if (a->v) compare(model, what, a->v, b->v, (size_t)a->shape[0] * a->shape[1] * (a->ndim == 3 ? a->shape[2] : 1));
    }
}

/* The pairs: B rows of T tokens, the corrupted ones differing at two positions. */
enum { B = 2, T = 6 };
static void make_pairs(int V, int32_t *clean, int32_t *corr, int32_t *ans, int32_t *wrong) {
    for (int i = 0; i < B * T; i++) clean[i] = corr[i] = (int32_t)((i * 7919 + 13) % V);
    for (int b = 0; b < B; b++) {
        corr[b * T + 2] = (clean[b * T + 2] + 17) % V, corr[b * T + 4] = (clean[b * T + 4] + 5) % V;
        ans[b] = (3 + 11 * b) % V, wrong[b] = (7 + 13 * b) % V;
    }
}

static void atp_check(const char *path, lp_model *w, lp_model *s) {
    int32_t clean[B * T], corr[B * T], ans[B], wrong[B];
    make_pairs(lp_model_config(w)->d_vocab, clean, corr, ans, wrong);
    lp_metric mts[2] = {{.kind = LP_METRIC_LOGIT_DIFF, .answer = ans, .wrong = wrong}, {.kind = LP_METRIC_LOGPROB, .answer = ans}};
    lp_attrib_opts opts[3] = {{0}, {.grad_at_clean = 1}, {.ig_steps = 3, .ig_batch = 2}};
    static const char *const oname[3] = {"AtP", "AtP at clean", "integrated gradients"};
    for (int k = 0; k < 2; k++)
        for (int o = 0; o < 3; o++) {
            lp_pair_result rw[B], rs[B];
            char tag[96];
            snprintf(tag, sizeof tag, "%s (%s)", oname[o], k ? "logprob" : "logit-diff");
            if (lp_attrib_atp(w, clean, corr, B, T, &mts[k], &opts[o], rw) != LP_OK) {
                fail(path, tag, lp_last_error());
                continue;
            }
            if (lp_attrib_atp(s, clean, corr, B, T, &mts[k], &opts[o], rs) != LP_OK) {
                fail(path, tag, lp_last_error());
            } else {
                for (int b = 0; b < B; b++) compare_results(path, tag, &rs[b], &rw[b]);
                for (int b = 0; b < B; b++) lp_pair_result_free(&rs[b]);
            }
            for (int b = 0; b < B; b++) lp_pair_result_free(&rw[b]);
        }
}

static void exact_check(const char *path, lp_model *w, lp_model *s) {
    int32_t clean[B * T], corr[B * T], ans[B], wrong[B];
    make_pairs(lp_model_config(w)->d_vocab, clean, corr, ans, wrong);
    lp_metric mt = {.kind = LP_METRIC_LOGIT_DIFF, .answer = ans, .wrong = wrong};
    lp_attrib_opts o = {.patch_batch = 7}; /* every kind; batches that do not divide the layers' nodes */
    lp_pair_result rw, rs;
    if (lp_attrib_exact(w, clean, corr, T, &mt, &o, &rw) != LP_OK) {
        fail(path, "exact patching", lp_last_error());
        return;
    }
    if (lp_attrib_exact(s, clean, corr, T, &mt, &o, &rs) != LP_OK) fail(path, "exact patching", lp_last_error());
    else compare_results(path, "exact patching", &rs, &rw), lp_pair_result_free(&rs);
    lp_pair_result_free(&rw);
}

/* A TopK SAE at blocks.0.hook_resid_post trained (one process, whole model) on tokens of the
 * model's vocabulary; then the latents' scores of both models. */
static void sae_check(const char *path, lp_model *w, lp_model *s) {
    const lp_config *c = lp_model_config(w);
    enum { NSEQ = 64, CTX = 8 };
    static int32_t toks[NSEQ * CTX];
    for (int i = 0; i < NSEQ * CTX; i++) toks[i] = (int32_t)((i * 2654435761u) % (unsigned)c->d_vocab);
    char out[64];
    snprintf(out, sizeof out, "/tmp/loupe-attrib-check-XXXXXX");
    if (!mkdtemp(out)) {
        fail(path, "SAE", "cannot make a scratch directory");
        return;
    }
    lp_ctx sc;
    lp_sae *sae = NULL;
    lp_live *live = NULL;
    lp_sae_train_cfg t;
    lp_sae_train_defaults(&t);
    t.out = out;
    snprintf(t.sae.hook_name, sizeof t.sae.hook_name, "blocks.0.hook_resid_post");
    t.sae.arch = LP_SAE_TOPK, t.sae.d_sae = 96, t.sae.k = 8, t.tokens = 512, t.batch_tokens = 32, t.shuffle_tokens = 32;
    lp_sae_train_report rep;
    lp_status st = lp_ctx_init(&sc, g_dev, LP_F32);
    if (st == LP_OK) st = lp_live_open(&live, w, toks, NSEQ, CTX, 2);
    if (st == LP_OK) st = lp_sae_train_live(&t, 1, live, &sc, &rep);
    if (live) lp_live_close(live);
    if (st == LP_OK) st = lp_sae_load(&sae, &sc, out);
    char rm[96];
    snprintf(rm, sizeof rm, "rm -rf %s", out);
    (void)!system(rm);
    if (st != LP_OK) {
        fail(path, "SAE training", lp_last_error());
        lp_ctx_free(&sc);
        return;
    }
    int32_t clean[B * T], corr[B * T], ans[B], wrong[B];
    make_pairs(c->d_vocab, clean, corr, ans, wrong);
    lp_metric mt = {.kind = LP_METRIC_LOGIT_DIFF, .answer = ans, .wrong = wrong};
    lp_sae_attrib aw[B], as[B];
    if (lp_attrib_sae(w, sae, &sc, clean, corr, B, T, &mt, 20, aw) != LP_OK) {
        fail(path, "SAE latents", lp_last_error());
    } else if (lp_attrib_sae(s, sae, &sc, clean, corr, B, T, &mt, 20, as) != LP_OK) {
        fail(path, "SAE latents", lp_last_error());
        for (int b = 0; b < B; b++) lp_sae_attrib_free(&aw[b]);
    } else {
        for (int b = 0; b < B; b++) {
            compare_metric(path, "SAE latents: total", as[b].total_atp, aw[b].total_atp);
            compare(path, "SAE latents: error node", as[b].error_atp, aw[b].error_atp, T);
            /* every latent of the whole model's top list, by (pos, latent), in the split model's */
            float *ws = calloc((size_t)aw[b].n_top * 2, sizeof(float)), *ss = calloc((size_t)aw[b].n_top * 2, sizeof(float));
            for (int i = 0; ws && ss && i < aw[b].n_top; i++) {
                ws[2 * i] = aw[b].top[i].atp, ws[2 * i + 1] = aw[b].top[i].grad_act;
                ss[2 * i] = ss[2 * i + 1] = NAN;
                for (int j = 0; j < as[b].n_top; j++)
                    if (as[b].top[j].pos == aw[b].top[i].pos && as[b].top[j].latent == aw[b].top[i].latent)
                        ss[2 * i] = as[b].top[j].atp, ss[2 * i + 1] = as[b].top[j].grad_act;
            }
            if (aw[b].n_top == 0) fail(path, "SAE latents", "no latent scored (the check would test nothing)");
            else compare(path, "SAE latents: top (atp, gradient x activation)", ss, ws, (size_t)aw[b].n_top * 2);
            free(ws), free(ss);
            lp_sae_attrib_free(&aw[b]), lp_sae_attrib_free(&as[b]);
        }
    }
    lp_sae_free(sae, &sc);
    lp_ctx_free(&sc);
}

static void check_model(const char *path, lp_dist *d) {
    lp_model *w = NULL, *s = NULL;
    if (lp_model_load(&w, path, g_dev, LP_F32) != LP_OK) {
        fail(path, "load whole", lp_last_error());
        return;
    }
    if (lp_model_load_dist(&s, path, g_dev, LP_F32, d) != LP_OK) {
        fail(path, "load split", lp_last_error());
        lp_model_free(w);
        return;
    }
    atp_check(path, w, s);
    exact_check(path, w, s);
    sae_check(path, w, s);
    lp_model_free(s);
    lp_model_free(w);
}

int main(int argc, char **argv) {
    lp_dist *d;
    if (lp_dist_init(&d, 0, 1) != LP_OK) { /* dist.tp = every process */
        fprintf(stderr, "attrib_check: %s\n", lp_last_error());
        return 2;
    }
    g_rank = lp_dist_rank(d);
    int first = 1;
    if (argc > 1 && strcmp(argv[1], "--cuda") == 0) g_dev = LP_CUDA, first = 2;
    for (int i = first; i < argc; i++) check_model(argv[i], d);
    int64_t bad = g_fail;
    lp_dist_allreduce_sum(d, LP_DIST_WORLD, &bad, 1, LP_I64);
    if (g_rank == 0)
        printf("attrib_check: TP=%d, %d model(s), %lld scores compared on rank 0: %s (%lld failure(s) over all ranks)\n",
               lp_dist_tp_size(d), argc - first, g_values, bad ? "FAILED" : "all agree with one process", (long long)bad);
    lp_dist_finalize(d);
    return bad ? 1 : 0;
}
