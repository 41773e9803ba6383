/* bench_graph.c: attribution graphs (graph.h) on SmolLM2-135M with random per-layer
 * transcoders: nodes, edges, backward passes, seconds per graph and peak host memory at
 * several prompt lengths, on the CPU; then, when a GPU is present (graph.device = cuda), a
 * Gemma-2-2B-shaped model (its d_model, layers, heads and vocabulary in Llama form: the same
 * GEMMs and patterns; Gemma's post-norms and soft-caps add only elementwise work) with random F32 weights
 * on the GPU and random per-layer transcoders, at 32, 2,048 and 8,192 tokens.
 * A case that runs past its time limit (--time-limit for the CPU, --gpu-limit for the GPU,
 * seconds after the plan; 0: none) stops there and reports its rows, backward passes and
 * seconds per backward, and the time all its rows would take at that rate (the influence
 * ranking between rounds is not in that figure).
 *
 * Before timing, a 16-token graph with every active feature is validated by conservation:
 * with no biases in the model or transcoders, the replacement model is linear in its
 * sources, so each row's edges sum to its target's input (a logit row: that token's logit
 * minus the mean logit, from a plain forward; a feature row: its pre-activation minus
 * b_enc) to float rounding. (Position 0 is kept as a position like any other there:
 * circuit-tracer's convention leaves its MLP output out of every node.)
 *   build/bench_graph [--model PATH] [--tokens 64,512,2048] [--d-sae S] [--max-features F]
 *                     [--batch B] [--host-budget-mb MB] [--time-limit S] [--cpu-only | --gpu-only] [--gpu-limit S]
 *                     [--gpu-tokens 32,2048,8192] [--gpu-d-sae S] [--gpu-small]
 *                     [--write-transcoders DIR]   (random transcoders for the demo) */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

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

/* graph.host_budget as `loupe graph` sets it by default (80% of RAM): the plan caches the
 * attention patterns when they fit. --host-budget-mb overrides it (0: no budget, patterns
 * recomputed in every backward). */
static size_t host_budget = (size_t)-1;

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
 * few percent fire (-1: ~16% of unit-normal pre-activations; -3: ~0.1%), no b_dec or skip
 * (so conservation holds exactly). */
static lp_clt *random_tc(lp_ctx *c, const lp_config *mc, int S, float b_enc) {
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
        for (int f = 0; f < S; f++) y->b_enc[f] = b_enc;
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

/* user + system seconds of this process: beside wall time on a shared machine */
static double cpu_secs(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return u.ru_utime.tv_sec + u.ru_stime.tv_sec + (u.ru_utime.tv_usec + u.ru_stime.tv_usec) * 1e-6;
}

/* A case's progress: the plan, the rows and passes so far, its time limit. */
typedef struct prog {
    double t0, t_plan, t_last, limit;
    int64_t rows_total, rows, passes;
    int stopped;
} prog;

static lp_status on_plan(const lp_graph_plan *p, void *user) {
    prog *q = user;
    q->t_plan = q->t_last = now();
    q->rows_total = (int64_t)p->n_features + p->n_logits;
    printf("  plan: %d tokens, %d active features (%d as nodes), %lld nodes, %d rows per backward; host peak %.1f MiB (cached "
           "patterns %.1f), device %.1f MiB (%.1f s to the plan)\n",
           p->T, p->n_active, p->n_features, (long long)p->n_nodes, p->batch, p->host_bytes / 1048576.0, p->pattern_bytes / 1048576.0,
           p->device_bytes / 1048576.0, q->t_plan - q->t0);
    fflush(stdout);
    return LP_OK;
}

static lp_status on_block(int64_t rows, int64_t passes, void *user) {
    prog *q = user;
    double t = now();
    q->rows = rows, q->passes = passes;
    if (t - q->t_last > 30) {
        printf("  ... %lld of %lld rows, %lld backward passes, %.1f s since the plan\n", (long long)rows, (long long)q->rows_total,
               (long long)passes, t - q->t_plan);
        fflush(stdout);
        q->t_last = t;
    }
    if (q->limit > 0 && t - q->t_plan > q->limit) {
        q->stopped = 1;
        return LP_ERR(LP_ERR_INTERNAL, "stopped at the time limit");
    }
    return LP_OK;
}

/* One graph; prints its table line, or where it stopped and what the whole would take. */
static void run_case(lp_model *m, const lp_clt *tc, int T, int batch, int maxf, lp_device dev, double limit) {
    const lp_config *c = lp_model_config(m);
    int32_t *tok = malloc(T * sizeof(int32_t));
    tokens_for(tok, T, c->d_vocab);
    prog q = {.t0 = now(), .limit = limit};
    lp_graph_opts o = lp_graph_defaults();
    o.max_feature_nodes = maxf, o.batch_size = batch, o.device = dev;
    o.on_plan = on_plan, o.on_block = on_block, o.user = &q;
    o.host_budget = host_budget != (size_t)-1 ? host_budget : (size_t)sysconf(_SC_PHYS_PAGES) * (size_t)sysconf(_SC_PAGESIZE) / 10 * 8;
    lp_graph *g = NULL;
    lp_status st = lp_graph_build(&g, m, tc, tok, T, &o);
    double secs = now() - q.t0, bw = now() - q.t_plan;
    if (st == LP_OK) {
        printf("%8d %10d %8d %8lld %10lld %10lld %9.2f %10ld\n", T, g->n_active, g->n_features, (long long)g->n_nodes,
               (long long)lp_graph_nnz(g), (long long)g->n_backward, secs, peak_mib());
        printf("  (%.2f s to the plan: forward, features, setup; %.2f s of backward passes, pruning and scores)\n", q.t_plan - q.t0, bw);
    } else if (q.stopped && q.passes > 0) {
        double per = bw / q.passes, blocks = (double)((q.rows_total + batch - 1) / batch);
        printf("%8d  stopped after %.1f s of backward passes: %lld of %lld rows in %lld passes, %.3f s per backward of %d rows; "
               "all %lld rows: about %.0f s (extrapolated), plus %.1f s to the plan; peak %ld MiB; %.1f s of CPU time so far\n",
               T, bw, (long long)q.rows, (long long)q.rows_total, (long long)q.passes, per, batch, (long long)q.rows_total,
               per * blocks, q.t_plan - q.t0, peak_mib(), cpu_secs());
    } else {
        fprintf(stderr, "bench_graph: %d tokens: %s\n", T, lp_last_error());
        exit(1);
    }
    fflush(stdout);
    lp_graph_free(g);
    free(tok);
}

static const char *TABLE_HEAD = "%8s %10s %8s %8s %10s %10s %9s %10s\n";

/* Gemma-2-2B's shape in Llama form: 26 layers, d_model 2304, 8 query and 4 key/value heads of
 * 256, d_mlp 9216, a 256,000-token vocabulary; F32 on the GPU, so the forward runs there. */
static void gpu_section(const char *tok_list, int S, double limit, int small) {
    char why[256];
    if (!lp_cuda_available(why, sizeof why)) {
        printf("bench_graph: GPU section skipped (no usable GPU: %s)\n", why);
        return;
    }
    lp_config cfg = {.arch = LP_ARCH_LLAMA, .n_layers = 26, .d_model = 2304, .n_heads = 8, .n_kv_heads = 4, .d_head = 256,
                     .d_mlp = 9216, .n_ctx = 8192, .d_vocab = 256000, .rope_theta = 10000};
    if (small) /* the same code paths at a size the CUDA emulator runs (a smoke test of this section) */
        cfg.n_layers = 2, cfg.d_model = 128, cfg.n_heads = 4, cfg.n_kv_heads = 2, cfg.d_head = 32, cfg.d_mlp = 256, cfg.d_vocab = 512;
    lp_model *m;
    double t0 = now();
    CHECK(lp_model_random(&m, &cfg, 7, LP_CUDA, LP_F32));
    lp_ctx hc;
    CHECK(lp_ctx_init(&hc, LP_CPU, LP_F32));
    lp_clt *tc = random_tc(&hc, lp_model_config(m), S, -3.0f);
    printf("bench_graph: GPU: %s (Llama form), random F32 weights (%.2f B parameters), random per-layer transcoders "
           "of %d features (b_enc -3); graph.device = cuda; %.1f s to set up\n",
           small ? "a small Llama shape" : "Gemma-2-2B shape", lp_model_n_params(m) / 1e9, S, now() - t0);
    printf(TABLE_HEAD, "tokens", "active", "features", "nodes", "edges", "backward", "seconds", "peak MiB");
    for (const char *p = tok_list; *p;) {
        int T = atoi(p);
        /* the row block holds batch x T x d_model four times over: fewer rows as T grows */
        int batch = T <= 64 ? 256 : T <= 2048 ? 64 : 16;
        run_case(m, tc, T, batch, T <= 64 ? 0 : 8192, LP_CUDA, T <= 64 ? 0 : limit);
        const char *q = strchr(p, ',');
        p = q ? q + 1 : p + strlen(p);
    }
    printf("  targets: a 32-token graph in under 1 s; an 8,192-token graph within one 80 GB GPU (the plan's device bytes)\n");
    lp_clt_free(tc, &hc);
    lp_ctx_free(&hc);
    lp_model_free(m);
}

int main(int argc, char **argv) {
    const char *model = "models/SmolLM2-135M-Instruct.Q4_1.gguf", *tok_list = "64,512,2048", *write_dir = NULL;
    const char *gpu_toks = "32,2048,8192";
    int S = 1024, maxf = 64, batch = 32, gpu_S = 4096, cpu = 1, gpu = 1, gpu_small = 0;
    double limit = 0, gpu_limit = 20;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--cpu-only")) gpu = 0;
        else if (!strcmp(argv[i], "--gpu-only")) cpu = 0;
        else if (!strcmp(argv[i], "--gpu-small")) gpu_small = 1, cpu = 0;
        else if (i + 1 >= argc) break;
        else if (!strcmp(argv[i], "--model")) model = argv[++i];
        else if (!strcmp(argv[i], "--tokens")) tok_list = argv[++i];
        else if (!strcmp(argv[i], "--d-sae")) S = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--max-features")) maxf = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--batch")) batch = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--host-budget-mb")) host_budget = (size_t)atol(argv[++i]) << 20;
        else if (!strcmp(argv[i], "--time-limit")) limit = atof(argv[++i]);
        else if (!strcmp(argv[i], "--gpu-limit")) gpu_limit = atof(argv[++i]);
        else if (!strcmp(argv[i], "--gpu-tokens")) gpu_toks = argv[++i];
        else if (!strcmp(argv[i], "--gpu-d-sae")) gpu_S = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--write-transcoders")) write_dir = argv[++i];
    }
    lp_model *m = NULL;
    if ((cpu || write_dir) && lp_model_load(&m, model, LP_CPU, LP_F32) != LP_OK) {
        printf("bench_graph: CPU section skipped (%s: %s; `make model` fetches it)\n", model, lp_last_error());
        cpu = 0, write_dir = NULL;
    }
    if (m) {
        const lp_config *c = lp_model_config(m);
        lp_ctx hc;
        CHECK(lp_ctx_init(&hc, LP_CPU, LP_F32));
        lp_clt *tc = random_tc(&hc, c, S, -1.0f);
        if (write_dir) {
            CHECK(lp_clt_save(tc, &hc, write_dir));
            printf("bench_graph: random per-layer transcoders (%d features per layer) written to %s\n", S, write_dir);
            return 0;
        }
        printf("bench_graph: %s (%d layers, d_model %d), random per-layer transcoders of %d features, CPU\n", model, c->n_layers,
               c->d_model, S);
        validate(m, tc);
        printf(TABLE_HEAD, "tokens", "active", "features", "nodes", "edges", "backward", "seconds", "peak MiB");
        for (const char *p = tok_list; *p;) {
            int T = atoi(p);
            run_case(m, tc, T > c->n_ctx ? c->n_ctx : T, batch, maxf, LP_CPU, limit);
            const char *q = strchr(p, ',');
            p = q ? q + 1 : p + strlen(p);
        }
        lp_clt_free(tc, &hc);
        lp_ctx_free(&hc);
        lp_model_free(m);
    }
    if (gpu) gpu_section(gpu_toks, gpu_S, gpu_limit, gpu_small);
    return 0;
}
