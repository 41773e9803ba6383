/* bench_graph.c: attribution graphs (graph.h) on SmolLM2-135M with random per-layer
 * transcoders: nodes, edges, backward passes, seconds per graph and peak host memory at
 * several prompt lengths, on the CPU.
 *
 * Before timing, a 16-token graph with every active feature is validated by conservation:
 * with no biases in the model or transcoders, the replacement model is linear in its
 * sources, so each row's edges sum to its target's input (a logit row: that token's logit
 * minus the mean logit, from a plain forward; a feature row: its pre-activation minus
 * b_enc) to float rounding. (Position 0 is kept as a position like any other there:
 * circuit-tracer's convention leaves its MLP output out of every node.)
 *   build/bench_graph [--model PATH] [--tokens 64,512,2048] [--d-sae S] [--max-features F]
 *                     [--batch B] [--write-transcoders DIR]   (random transcoders for the demo) */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "loupe/clt.h"
#include "loupe/graph.h"
#include "loupe/model.h"

#define CHECK(x)                                                                 \
    do {                                                                         \
        lp_status s_ = (x);                                                      \
        if (s_ != LP_OK) {                                                       \
            fprintf(stderr, "bench_graph: %s\n", lp_last_error());               \
            exit(1);                                                             \
        }                                                                        \
    } while (0)

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t rng = 88172645463325252ull;
static double unif(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (rng >> 11) * (1.0 / 9007199254740992.0);
}
static float gauss(void) { return (float)(sqrt(-2 * log(unif() + 1e-300)) * cos(6.283185307179586 * unif())); }

/* Per-layer ReLU transcoders reading mlp.hook_in: unit-scale encoder rows, b_enc set so a
 * few percent fire, no b_dec or skip (so conservation holds exactly). */
static lp_clt *random_tc(lp_ctx *c, const lp_config *mc, int S) {
    lp_clt_cfg cfg = {.kind = LP_CLT_PER_LAYER, .act = LP_CLT_RELU, .n_layers = mc->n_layers, .d_model = mc->d_model, .d_sae = S};
    strcpy(cfg.input_hook, "mlp.hook_in");
    strcpy(cfg.output_hook, "mlp.hook_out");
    snprintf(cfg.model_name, sizeof cfg.model_name, "%s", mc->name);
    strcpy(cfg.scan, "random-demo-transcoders");
    lp_clt *t;
    CHECK(lp_clt_alloc(&t, &cfg, c));
    int D = mc->d_model;
    for (int l = 0; l < mc->n_layers; l++) {
        lp_clt_layer *y = &t->layer[l];
        for (size_t i = 0; i < (size_t)S * D; i++) y->W_enc[i] = gauss() / sqrtf((float)D), y->W_dec[i] = gauss() * 0.05f;
        for (int f = 0; f < S; f++) y->b_enc[f] = -1.0f;
    }
    return t;
}

static void tokens_for(int32_t *t, int T, int V) {
    t[0] = 1; /* SmolLM2's <|im_start|>: a special first token, as circuit-tracer prepends one */
    for (int i = 1; i < T; i++) t[i] = 100 + (int32_t)(unif() * (V - 200));
}

static void validate(lp_model *m, const lp_clt *tc) {
    const lp_config *c = lp_model_config(m);
    int T = 16;
    int32_t tok[16];
    tokens_for(tok, T, c->d_vocab);
    lp_graph_opts o = lp_graph_defaults();
    o.batch_size = 64;
    o.keep_first_position = 1; /* circuit-tracer leaves position 0's MLP output out of every node */
    lp_graph *g;
    CHECK(lp_graph_build(&g, m, tc, tok, T, &o));
    CHECK(lp_model_forward(m, tok, 1, T, LP_WANT_LOGITS));
    const float *lg = lp_model_logits(m) + (size_t)(T - 1) * c->d_vocab;
    double mean = 0, worst = 0, scale = 0;
    for (int v = 0; v < c->d_vocab; v++) mean += lg[v];
    mean /= c->d_vocab;
    for (int64_t i = 0; i < g->n_nodes; i++) {
        int64_t li = i - (g->n_nodes - g->n_logits);
        if (i >= g->n_features && li < 0) continue;
        double sum = 0, want;
        for (int64_t e = g->row_ptr[i]; e < g->row_ptr[i + 1]; e++) sum += g->val[e];
        if (li >= 0) want = lg[g->logit_ids[li]] - mean;
        else {
            const int32_t *a = g->active + 3 * (size_t)g->selected[i];
            want = g->act_values[g->selected[i]] - tc->layer[a[0]].b_enc[a[2]];
        }
        worst = fmax(worst, fabs(sum - want));
        scale = fmax(scale, fabs(want));
    }
    printf("validation (16 tokens, %d features, %lld edges): rows sum to their targets' inputs within %.2g (largest %.3g)\n",
           g->n_features, (long long)lp_graph_nnz(g), worst, scale);
    if (!(worst <= 2e-3 * (1 + scale))) {
        fprintf(stderr, "bench_graph: validation failed: a row's edges miss its input by %.3g\n", worst);
        exit(1);
    }
    lp_graph_free(g);
}

static long peak_mib(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return u.ru_maxrss / 1024;
}

static lp_status print_plan(const lp_graph_plan *p, void *user) {
    printf("  plan: %d active features, %lld nodes, host peak %.1f MiB\n", p->n_active, (long long)p->n_nodes, p->host_bytes / 1048576.0);
    return LP_OK;
}

int main(int argc, char **argv) {
    const char *model = "models/SmolLM2-135M-Instruct.Q4_1.gguf", *tok_list = "64,512,2048", *write_dir = NULL;
    int S = 1024, maxf = 64, batch = 32;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--model")) model = argv[i + 1];
        else if (!strcmp(argv[i], "--tokens")) tok_list = argv[i + 1];
        else if (!strcmp(argv[i], "--d-sae")) S = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--max-features")) maxf = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--batch")) batch = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--write-transcoders")) write_dir = argv[i + 1];
    }
    lp_model *m;
    if (lp_model_load(&m, model, LP_CPU, LP_F32) != LP_OK) {
        printf("bench_graph: skipped (%s: %s; `make model` fetches it)\n", model, lp_last_error());
        return 0;
    }
    const lp_config *c = lp_model_config(m);
    lp_ctx hc;
    CHECK(lp_ctx_init(&hc, LP_CPU, LP_F32));
    lp_clt *tc = random_tc(&hc, c, S);
    if (write_dir) {
        CHECK(lp_clt_save(tc, &hc, write_dir));
        printf("bench_graph: random per-layer transcoders (%d features per layer) written to %s\n", S, write_dir);
        return 0;
    }
    printf("bench_graph: %s (%d layers, d_model %d), random per-layer transcoders of %d features, CPU\n", model, c->n_layers,
           c->d_model, S);
    validate(m, tc);
    printf("%8s %10s %8s %8s %10s %10s %9s %10s\n", "tokens", "active", "features", "nodes", "edges", "backward", "seconds", "peak MiB");
    for (const char *p = tok_list; *p;) {
        int T = atoi(p);
        if (T > c->n_ctx) T = c->n_ctx;
        int32_t *tok = malloc(T * sizeof(int32_t));
        tokens_for(tok, T, c->d_vocab);
        lp_graph_opts o = lp_graph_defaults();
        o.max_feature_nodes = maxf, o.batch_size = batch, o.on_plan = print_plan;
        double t0 = now();
        lp_graph *g;
        CHECK(lp_graph_build(&g, m, tc, tok, T, &o));
        double secs = now() - t0;
        printf("%8d %10d %8d %8lld %10lld %10lld %9.2f %10ld\n", T, g->n_active, g->n_features, (long long)g->n_nodes,
               (long long)lp_graph_nnz(g), (long long)g->n_backward, secs, peak_mib());
        fflush(stdout);
        lp_graph_free(g);
        free(tok);
        const char *q = strchr(p, ',');
        p = q ? q + 1 : p + strlen(p);
    }
    lp_clt_free(tc, &hc);
    lp_ctx_free(&hc);
    lp_model_free(m);
    return 0;
}
