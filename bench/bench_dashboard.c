/* bench_dashboard.c: feature-dashboard throughput: every latent of an SAE over an
 * activation store of 1M tokens in one pass (lp_dash_run), as latents per second.
 *
 * The store is synthetic (8192 sequences of 128 tokens, d_in 256, BF16, each token a sum
 * of 8 random superposed directions out of 1024), the SAE a random TopK SAE (d_sae 4096,
 * k 32), the unembedding random [49152, 256] (SmolLM2's vocabulary). Before timing, a
 * slice of 64 sequences is checked against a brute force: every token encoded by the SAE
 * runner (lp_sae_encode_topk_host, in batches of the same shape), every latent's values
 * sorted: firing counts, maxima, histograms and the top 20 must agree exactly.
 *   build/bench_dashboard [--seqs 8192] [--d 256] [--sae 4096] [--keep DIR]
 * --keep leaves the store, the SAE (SAELens layout) and unembed.safetensors in DIR for the
 * peer: bench/peers/numpy_dashboard.py DIR. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "loupe/dashboard.h"
#include "loupe/safetensors.h"
#include "loupe/sae_train.h"
#include "loupe/store.h"

#define CHECK(x)                                                                                    \
    do {                                                                                            \
        lp_status s_ = (x);                                                                         \
        if (s_ != LP_OK) {                                                                          \
            fprintf(stderr, "bench_dashboard: %s (%s)\n", lp_last_error(), lp_last_error_where());  \
            exit(1);                                                                                \
        }                                                                                           \
    } while (0)
#define HOOK "blocks.0.hook_resid_post"
#define CTX 128

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* CPU seconds of this process: on a shared machine the honest figure beside wall time */
static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t g_rng = 1;
static float urand(void) { /* [-0.5, 0.5) */
    g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)(g_rng >> 40) / 16777216.0f - 0.5f;
}

/* n_seq sequences in shards of 512, BF16. */
static void write_store(const char *dir, int n_seq, int d) {
    mkdir(dir, 0755);
    int nf = 1024, per = 512;
    float *dirs = malloc((size_t)nf * d * sizeof(float)), *x = malloc((size_t)per * CTX * d * sizeof(float));
    uint16_t *h = malloc((size_t)per * CTX * d * 2);
    int32_t *tok = malloc((size_t)per * CTX * sizeof(int32_t));
    for (size_t i = 0; i < (size_t)nf * d; i++) dirs[i] = urand();
    for (int s0 = 0, sh = 0; s0 < n_seq; s0 += per, sh++) {
        int ns = n_seq - s0 < per ? n_seq - s0 : per;
        size_t n = (size_t)ns * CTX;
        memset(x, 0, n * d * sizeof(float));
        for (size_t t = 0; t < n; t++) {
            tok[t] = (int32_t)((urand() + 0.5f) * 49152);
            for (int j = 0; j < 8; j++) {
                int f = (int)((urand() + 0.5f) * nf) % nf;
                float a = 1.0f + urand();
                for (int k = 0; k < d; k++) x[t * d + k] += a * dirs[(size_t)f * d + k];
            }
        }
        CHECK(lp_convert_host(h, LP_BF16, x, LP_F32, n * d));
        lp_st_spec specs[2] = {{.name = "tokens", .dtype = LP_I32, .ndim = 2, .shape = {ns, CTX}},
                               {.name = HOOK, .dtype = LP_BF16, .ndim = 3, .shape = {ns, CTX, d}}};
        const void *datas[2] = {tok, h};
        char p[512];
        snprintf(p, sizeof p, "%s/shard-%05d.safetensors", dir, sh);
        CHECK(lp_st_write(p, specs, datas, 2, NULL));
    }
    free(dirs), free(x), free(h), free(tok);
}

static lp_sae *random_sae(lp_ctx *c, int d, int S) {
    lp_sae_cfg cf = {.arch = LP_SAE_TOPK, .d_in = d, .d_sae = S, .d_out = d, .k = 32, .apply_b_dec_to_input = 1};
    strcpy(cf.normalize, "none");
    strcpy(cf.hook_name, HOOK);
    lp_sae *s;
    CHECK(lp_sae_alloc(&s, &cf, c));
    for (size_t i = 0; i < (size_t)d * S; i++) s->W_enc[i] = urand(), s->W_dec[i] = urand();
    return s;
}

/* The brute force over the slice: all values of each latent, sorted. */
typedef struct tv { int64_t t; float v; } tv;
static int by_value(const void *a, const void *b) {
    const tv *x = a, *y = b;
    if (x->v != y->v) return x->v > y->v ? -1 : 1;
    return x->t < y->t ? -1 : x->t > y->t;
}

static void validate(lp_sae *s, lp_ctx *c, const char *dir, int d) {
    int S = s->cfg.d_sae, K = s->cfg.k, B = 4096;
    lp_store *in;
    CHECK(lp_store_open(&in, dir, HOOK));
    int64_t N = lp_store_n_tokens(in);
    float *x = malloc((size_t)B * d * 4), *val = malloc((size_t)N * K * 4);
    int32_t *idx = malloc((size_t)N * K * 4);
    for (int64_t t0 = 0; t0 < N; t0 += B) {
        CHECK(lp_store_read(in, t0, B, x));
        CHECK(lp_sae_encode_topk_host(s, c, x, B, K, idx + t0 * K, val + t0 * K));
    }
    lp_store_close(in);
    int64_t *cnt = calloc(S, sizeof(int64_t)), *start = calloc(S + 1, sizeof(int64_t));
    for (int64_t i = 0; i < N * K; i++) cnt[idx[i]] += val[i] > 0;
    for (int j = 0; j < S; j++) start[j + 1] = start[j] + cnt[j];
    tv *all = malloc((size_t)start[S] * sizeof(tv) + 1);
    memset(cnt, 0, S * sizeof(int64_t));
    for (int64_t i = 0; i < N * K; i++)
        if (val[i] > 0) all[start[idx[i]] + cnt[idx[i]]++] = (tv){i / K, val[i]};
    lp_dash_opts o;
    lp_dash_defaults(&o);
    int32_t *lat = malloc(S * sizeof(int32_t));
    for (int j = 0; j < S; j++) lat[j] = j;
    o.store = dir, o.latents = lat, o.n_latents = S;
    lp_dash *dd;
    CHECK(lp_dash_run(s, c, &o, &dd));
    int bad = 0;
    for (int j = 0; j < S && bad < 5; j++) {
        const lp_dash_latent *l = &dd->lat[j];
        tv *v = all + start[j];
        int64_t n = cnt[j];
        qsort(v, n, sizeof(tv), by_value);
        int64_t hist[LP_DASH_BINS] = {0};
        for (int64_t i = 0; n && i < n; i++) {
            int e;
            frexpf(v[0].v, &e);
            hist[(int)ldexpf(v[i].v, -(e - 6))]++;
        }
        int ok = l->fires == n && (!n || l->max == v[0].v) && memcmp(hist, l->hist, sizeof hist) == 0 &&
                 l->n_top == (n < 20 ? n : 20);
        for (int i = 0; ok && i < l->n_top; i++) ok = l->top[i].token == v[i].t && l->top[i].value == v[i].v;
        if (!ok) fprintf(stderr, "bench_dashboard: validation failed at latent %d (fires %lld, brute force %lld)\n", j,
                         (long long)l->fires, (long long)n), bad++;
    }
    if (bad) exit(1);
    printf("validated against a brute force on %lld tokens: firing counts, maxima, histograms, top 20 of all %d latents\n",
           (long long)N, S);
    lp_dash_free(dd);
    free(x), free(val), free(idx), free(cnt), free(start), free(all), free(lat);
}

int main(int argc, char **argv) {
    int n_seq = 8192, d = 256, S = 4096, V = 49152;
    const char *keep = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--seqs")) n_seq = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--d")) d = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--sae")) S = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--keep")) keep = argv[i + 1];
        else { fprintf(stderr, "usage: bench_dashboard [--seqs N] [--d D] [--sae S] [--keep DIR]\n"); return 2; }
    }
    char dir[256], p[512];
    if (keep) snprintf(dir, sizeof dir, "%s", keep), mkdir(dir, 0755);
    else {
        snprintf(dir, sizeof dir, "/tmp/bench_dashboard_XXXXXX");
        if (!mkdtemp(dir)) { perror("mkdtemp"); return 1; }
    }
    lp_ctx c;
    CHECK(lp_ctx_init(&c, LP_CPU, LP_F32));
    lp_sae *s = random_sae(&c, d, S);
    snprintf(p, sizeof p, "%s/slice", dir);
    write_store(p, 64, d);
    validate(s, &c, p, d);

    snprintf(p, sizeof p, "%s/store", dir);
    double t0 = now();
    write_store(p, n_seq, d);
    printf("store: %d x %d tokens, d_in %d, BF16 (written in %.1f s)\n", n_seq, CTX, d, now() - t0);
    float *W_U = malloc((size_t)V * d * 4), *ln = malloc((size_t)d * 4);
    for (size_t i = 0; i < (size_t)V * d; i++) W_U[i] = urand();
    for (int i = 0; i < d; i++) ln[i] = 1.0f + urand();
    int32_t *lat = malloc(S * sizeof(int32_t));
    for (int j = 0; j < S; j++) lat[j] = j;
    lp_dash_opts o;
    lp_dash_defaults(&o);
    o.store = p, o.latents = lat, o.n_latents = S, o.W_U = W_U, o.ln_final_w = ln, o.d_vocab = V;
    lp_dash *dd;
    t0 = now();
    double c0 = cpu_now();
    CHECK(lp_dash_run(s, &c, &o, &dd));
    double all = now() - t0, cpu = cpu_now() - c0;
    const char *thr = getenv("OPENBLAS_NUM_THREADS");
    int64_t nz = 0;
    int dead = 0;
    for (int j = 0; j < S; j++) nz += dd->lat[j].fires, dead += dd->lat[j].fires == 0;
    printf("dashboard, TopK SAE d_sae %d (k 32), %lld tokens, OpenBLAS threads %s: pass %.2f s, with contexts and logit tables "
           "(vocab %d) %.2f s: %.0f latents/s, %.0f tokens/s; %lld nonzero activations, %d latents never fire\n", S, (long long)dd->n_tokens,
           thr ? thr : "default", dd->seconds_pass, V, all, S / all, dd->n_tokens / all, (long long)nz, dead);
    printf("CPU time of the whole run, all threads: %.2f s (%.0f latents per CPU-second)\n", cpu, S / cpu);
    if (keep) {
        CHECK(lp_sae_save(s, &c, (snprintf(p, sizeof p, "%s/sae", dir), p), 1.0f));
        lp_st_spec specs[2] = {{.name = "W_U", .dtype = LP_F32, .ndim = 2, .shape = {V, d}},
                               {.name = "ln_final_w", .dtype = LP_F32, .ndim = 1, .shape = {d}}};
        const void *datas[2] = {W_U, ln};
        snprintf(p, sizeof p, "%s/unembed.safetensors", dir);
        CHECK(lp_st_write(p, specs, datas, 2, NULL));
        printf("kept in %s for bench/peers/numpy_dashboard.py\n", dir);
    } else {
        snprintf(p, sizeof p, "rm -rf %s", dir);
        if (system(p) != 0) fprintf(stderr, "bench_dashboard: could not remove %s\n", dir);
    }
    lp_dash_free(dd);
    lp_sae_free(s, &c);
    lp_ctx_free(&c);
    free(W_U), free(ln), free(lat);
    return 0;
}
