/* sae_train_ref.h: a dense float64 SAE training loop written from the definitions (every
 * latent's pre-activation, the top-k mask or ReLU with the norm-weighted L1, full [N, d_sae]
 * gradients, Adam, unit decoder rows) and check_curve, which trains the engine on a store
 * of one batch and compares it step by step (tests/test_sae_train_ref.c on the CPU,
 * tests/test_sae_train_bf16_cuda.c on the GPU with the bf16 encoder). */
#ifndef LOUPE_TEST_SAE_TRAIN_REF_H
#define LOUPE_TEST_SAE_TRAIN_REF_H
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loupe/safetensors.h"
#include "loupe/sae.h"
#include "loupe/sae_train.h"
#include "core/rng.h"
#include "testutil.h"

enum { N = 32, D = 16, S = 64, K = 4, STEPS = 25 };
#define HOOK "blocks.0.hook_resid_post"

/* The reference's parameters, float64, the layout of lp_sae's. */
typedef struct {
    double we[D * S], be[S], wd[S * D], bd[D];
} params;

/* sae_init_params and sae_init_data_stats ("mean") as the trainer computes them, in f32. */
static void init_ref(params *p, const float *x, lp_sae_arch arch, uint64_t seed) {
    static float wd[S * D];
    uint64_t rng = seed ^ 0xD1B54A32D192ED03ull;
    double bound = 1.0 / sqrt((double)D);
    for (int i = 0; i < S; i++) {
        double nrm = 0;
        for (int j = 0; j < D; j++) {
            wd[i * D + j] = (float)((2 * rng_uniform(&rng) - 1) * bound);
            nrm += (double)wd[i * D + j] * wd[i * D + j];
        }
        nrm = sqrt(nrm);
        for (int j = 0; j < D; j++) wd[i * D + j] = (float)(wd[i * D + j] / nrm);
    }
    float g = arch == LP_SAE_TOPK ? 1.0f : 0.1f;
    for (int d = 0; d < D; d++)
        for (int i = 0; i < S; i++) p->we[d * S + i] = g * wd[i * D + d];
    for (int i = 0; i < S * D; i++) p->wd[i] = wd[i];
    for (int i = 0; i < S; i++) p->be[i] = 0;
    for (int d = 0; d < D; d++) {
        double m = 0;
        for (int n = 0; n < N; n++) m += x[n * D + d] * 1.0 / N;
        p->bd[d] = (float)m;
    }
}

/* v rounded to f32, then to bf16 (round to nearest even), back in double. */
static double bf16_of(double v) { return lp_bf16_to_f32(lp_f32_to_bf16((float)v)); }

/* One dense float64 step; returns the batch MSE. bf16_pre: the pre-activations from bf16
 * roundings of x_in and W_enc (what the bf16 encoder copy computes), the rest unrounded. */
static double step_ref(params *p, params *m, params *v, const float *x, lp_sae_arch arch, double lr, double l1, int t,
                       int bf16_pre) {
    static double xin[N * D], pre[N * S], f[N * S], dxh[N * D], dpre[N * S];
    params g = {0};
    for (int n = 0; n < N; n++)
        for (int d = 0; d < D; d++) xin[n * D + d] = x[n * D + d] - p->bd[d];
    for (int n = 0; n < N; n++)
        for (int s = 0; s < S; s++) {
            double a = p->be[s];
            for (int d = 0; d < D; d++)
                a += bf16_pre ? bf16_of(xin[n * D + d]) * bf16_of(p->we[d * S + s]) : xin[n * D + d] * p->we[d * S + s];
            pre[n * S + s] = a;
        }
    for (int n = 0; n < N; n++)
        for (int s = 0; s < S; s++) {
            double a = pre[n * S + s];
            int above = 0; /* topk: kept when fewer than K latents rank before it */
            for (int q = 0; arch == LP_SAE_TOPK && q < S; q++)
                above += pre[n * S + q] > a || (pre[n * S + q] == a && q < s);
            f[n * S + s] = a > 0 && above < K ? a : 0;
        }
    double mse = 0;
    for (int n = 0; n < N; n++)
        for (int d = 0; d < D; d++) {
            double a = p->bd[d];
            for (int s = 0; s < S; s++) a += f[n * S + s] * p->wd[s * D + d];
            mse += (a - x[n * D + d]) * (a - x[n * D + d]) / N;
            dxh[n * D + d] = 2 * (a - x[n * D + d]) / N;
            g.bd[d] += dxh[n * D + d];
        }
    for (int n = 0; n < N; n++)
        for (int s = 0; s < S; s++) {
            double df = 0;
            for (int d = 0; d < D; d++) {
                df += dxh[n * D + d] * p->wd[s * D + d];
                g.wd[s * D + d] += f[n * S + s] * dxh[n * D + d];
            }
            if (arch == LP_SAE_STANDARD) { /* d/d f of l1 * sum f ||W_dec[s]|| / N */
                double nrm = 0;
                for (int d = 0; d < D; d++) nrm += p->wd[s * D + d] * p->wd[s * D + d];
                df += l1 * sqrt(nrm) / N;
            }
            dpre[n * S + s] = pre[n * S + s] > 0 && (arch != LP_SAE_TOPK || f[n * S + s] > 0) ? df : 0;
            g.be[s] += dpre[n * S + s];
            for (int d = 0; d < D; d++) {
                g.we[d * S + s] += xin[n * D + d] * dpre[n * S + s];
                g.bd[d] -= p->we[d * S + s] * dpre[n * S + s]; /* x_in = x - b_dec */
            }
        }
    for (int s = 0; s < S; s++) { /* no gradient along the unit decoder rows */
        double par = 0;
        for (int d = 0; d < D; d++) par += g.wd[s * D + d] * p->wd[s * D + d];
        for (int d = 0; d < D; d++) g.wd[s * D + d] -= par * p->wd[s * D + d];
    }
    double *P = (double *)p, *G = (double *)&g, *M = (double *)m, *V = (double *)v;
    double bc1 = 1 - pow(0.9, t), bc2 = 1 - pow(0.999, t);
    for (size_t i = 0; i < sizeof(params) / sizeof(double); i++) {
        M[i] = 0.9 * M[i] + 0.1 * G[i];
        V[i] = 0.999 * V[i] + 0.001 * G[i] * G[i];
        P[i] -= lr * (M[i] / bc1) / (sqrt(V[i] / bc2) + 1e-8);
    }
    for (int s = 0; s < S; s++) {
        double nrm = 0;
        for (int d = 0; d < D; d++) nrm += p->wd[s * D + d] * p->wd[s * D + d];
        for (int d = 0; d < D; d++) p->wd[s * D + d] /= sqrt(nrm);
    }
    return mse;
}

static double nmse(const float *a, const double *ref, size_t n) {
    double e = 0, r = 0;
    for (size_t i = 0; i < n; i++) e += (a[i] - ref[i]) * (a[i] - ref[i]), r += ref[i] * ref[i];
    return e / (r > 0 ? r : 1);
}

/* Trains arch on c (encoder_bf16 as lp_sae_train_cfg's) for STEPS steps and compares each
 * step's MSE (relative, mse_budget) and the final parameters (nmse, param_budget) with the
 * float64 loop; dir holds the store and the output. */
static void check_curve_tight(const char *dir, lp_sae_arch arch, lp_ctx *c, int encoder_bf16, int bf16_ref, double mse_budget,
                              double param_budget, int tight_steps, double tight_budget) {
    const char *name = lp_sae_arch_name(arch);
    float *x = lp_test_rand((size_t)N * D, 11, -1.0f, 1.0f);
    for (int n = 0; n < N; n++) x[n * D + n % D] += 3.0f; /* some structure to find */
    char store[128], out[128], p[256];
    snprintf(store, sizeof store, "%s/store-%s", dir, name);
    snprintf(out, sizeof out, "%s/out-%s-%d%d", dir, name, encoder_bf16 + 1, bf16_ref);
    mkdir(store, 0755);
    int32_t tok[N] = {0};
    lp_st_spec specs[2] = {{.name = "tokens", .dtype = LP_I32, .ndim = 2, .shape = {1, N}},
                           {.name = HOOK, .dtype = LP_F32, .ndim = 3, .shape = {1, N, D}}};
    const void *datas[2] = {tok, x};
    snprintf(p, sizeof p, "%s/shard-00000.safetensors", store);
    cr_assert_eq(lp_st_write(p, specs, datas, 2, NULL), LP_OK, "%s", lp_last_error());

    lp_sae_train_cfg t;
    lp_sae_train_defaults(&t);
    t.store = store, t.out = out, t.seed = 7;
    snprintf(t.sae.hook_name, sizeof t.sae.hook_name, HOOK);
    snprintf(t.sae.normalize, sizeof t.sae.normalize, "none");
    snprintf(t.b_dec_init, sizeof t.b_dec_init, "mean");
    t.sae.arch = arch, t.sae.d_sae = S, t.sae.k = K, t.sae.apply_b_dec_to_input = 1;
    t.batch_tokens = N, t.shuffle_tokens = N, t.tokens = (int64_t)STEPS * N, t.log_every = 1;
    t.lr = 1e-2, t.l1_coefficient = 0.3, t.encoder_bf16 = encoder_bf16;
    lp_ctx cpu;
    cr_assert_eq(lp_ctx_init(&cpu, LP_CPU, LP_F32), LP_OK);
    lp_sae_train_report rep;
    cr_assert_eq(lp_sae_train(&t, c, &rep), LP_OK, "%s: %s", name, lp_last_error());

    static params pr, m, v;
    memset(&m, 0, sizeof m), memset(&v, 0, sizeof v);
    init_ref(&pr, x, arch, t.seed);
    snprintf(p, sizeof p, "%s/metrics.jsonl", out);
    FILE *fm = fopen(p, "r");
    cr_assert_not_null(fm);
    char line[2048];
    double worst = 0, worst_tight = 0;
    for (int st = 0; st < STEPS; st++) {
        double ref = step_ref(&pr, &m, &v, x, arch, t.lr, t.l1_coefficient, st + 1, bf16_ref);
        cr_assert_not_null(fgets(line, sizeof line, fm), "%s: metrics.jsonl ends before step %d", name, st + 1);
        const char *k = strstr(line, "\"losses/mse_loss\":");
        cr_assert_not_null(k);
        double got = atof(k + strlen("\"losses/mse_loss\":"));
        worst = fmax(worst, fabs(got - ref) / ref);
        if (st < tight_steps) worst_tight = fmax(worst_tight, fabs(got - ref) / ref);
    }
    fclose(fm);
    lp_sae *s;
    cr_assert_eq(lp_sae_load(&s, &cpu, out), LP_OK, "%s", lp_last_error()); /* compared on the host */
    double e[4] = {nmse(s->W_enc, pr.we, D * S), nmse(s->b_enc, pr.be, S), nmse(s->W_dec, pr.wd, S * D), nmse(s->b_dec, pr.bd, D)};
    fprintf(stderr, "  %-9s %s%s against float64%s: MSE curve: worst relative difference %.2e of %.2g; nmse W_enc %.2e b_enc %.2e W_dec %.2e b_dec %.2e of %.2g\n",
            name, c->device == LP_CUDA ? "cuda" : "cpu", encoder_bf16 > 0 || (encoder_bf16 < 0 && c->device == LP_CUDA) ? " bf16 encoder" : "",
            bf16_ref ? " with bf16 pre-activations" : "", worst, mse_budget, e[0], e[1],
            e[2], e[3], param_budget);
    cr_expect(worst <= mse_budget, "%s: the MSE curve leaves the float64 one by %.3e", name, worst);
    if (tight_steps > 0) {
        fprintf(stderr, "  %-9s   over the first %d steps: worst relative difference %.2e of %.0e\n", name, tight_steps, worst_tight,
                tight_budget);
        cr_expect(worst_tight <= tight_budget, "%s: the first %d steps leave the float64 curve by %.3e", name, tight_steps, worst_tight);
    }
    for (int i = 0; i < 4; i++) cr_expect(e[i] <= param_budget, "%s: parameter %d: nmse %.3e against float64", name, i, e[i]);
    lp_sae_free(s, &cpu);
    lp_ctx_free(&cpu);
    free(x);
}

static void check_curve(const char *dir, lp_sae_arch arch, lp_ctx *c, int encoder_bf16, int bf16_ref, double mse_budget,
                        double param_budget) {
    check_curve_tight(dir, arch, c, encoder_bf16, bf16_ref, mse_budget, param_budget, 0, 0);
}
#endif
