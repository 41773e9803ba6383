/* test_sae_track_cuda.c: SAE training's bookkeeping kept on the device.
 *   copies     a run of N steps with log_every = N and no checkpoints reads from the device
 *              a fixed number of times whatever N (20 and 40 steps read alike), for the
 *              standard, JumpReLU, TopK (AuxK on) and BatchTopK architectures, on the CPU (the context
 *              counts its reads there too) and on the GPU
 *   NaN        a loss that turns non-finite ends the run with the one-line error naming the
 *              first bad step and its tokens, writes no final SAE and no checkpoint after it
 *   twins      the CUDA kernels of the step's bookkeeping (the dead-latent counters and their
 *              list, the metric sums and the flag, the L1 term, the reconstruction sums into
 *              device memory, AuxK's selection over a counted list) against their CPU
 *              twins: integers and selections exact, sums within 1e-12.
 * Without a GPU the CUDA tests skip; `make test` runs them on the CUDA emulator. */
#include <sys/stat.h>
#include <unistd.h>

#include "loupe/safetensors.h"
#include "loupe/sae.h"
#include "loupe/sae_ops.h"
#include "loupe/sae_track.h"
#include "loupe/sae_train.h"
#include "gputest.h"

static char dir[64];
static void mk(void) {
    snprintf(dir, sizeof dir, "/tmp/loupe-saetrack-XXXXXX");
    cr_assert(mkdtemp(dir) != NULL);
}
static void rm(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_expect(system(cmd) == 0);
}
TestSuite(sae_track, .init = mk, .fini = rm, .timeout = 600);

#define HOOK "blocks.0.hook_resid_post"
enum { NSEQ = 32, CTX = 32, DM = 16 };

static void write_store(const char *path) {
    mkdir(path, 0755);
    size_t n = (size_t)NSEQ * CTX;
    int32_t *tok = calloc(n, sizeof(int32_t));
    float *x = malloc(n * DM * sizeof(float));
    uint64_t r = 11;
    for (size_t i = 0; i < n * DM; i++) x[i] = lp_test_uniform(&r, -1.0f, 1.0f) * (i % 3 == 0 ? 2.0f : 0.5f);
    lp_st_spec specs[2] = {{.name = "tokens", .dtype = LP_I32, .ndim = 2, .shape = {NSEQ, CTX}},
                           {.name = HOOK, .dtype = LP_F32, .ndim = 3, .shape = {NSEQ, CTX, DM}}};
    const void *datas[2] = {tok, x};
    char p[512];
    snprintf(p, sizeof p, "%s/shard-00000.safetensors", path);
    cr_assert_eq(lp_st_write(p, specs, datas, 2, NULL), LP_OK, "%s", lp_last_error());
    free(tok);
    free(x);
}

static void cfg(lp_sae_train_cfg *t, const char *store, const char *out, lp_sae_arch arch, int steps) {
    lp_sae_train_defaults(t);
    t->store = store, t->out = out;
    snprintf(t->sae.hook_name, sizeof t->sae.hook_name, HOOK);
    int sparse = arch == LP_SAE_TOPK || arch == LP_SAE_BATCHTOPK;
    t->sae.arch = arch, t->sae.d_sae = sparse ? 128 : 32, t->sae.k = sparse ? 2 : 0;
    t->batch_tokens = 64, t->tokens = (int64_t)steps * 64, t->shuffle_tokens = 256;
    t->log_every = steps, t->checkpoint_every = 0, t->aux_k = 8;
    t->lr = 1e-3, t->l1_coefficient = 1.0;
    t->dead_feature_window = 128; /* TopK: latents go dead within the run, AuxK works every step */
}

/* The device reads of one run of `steps` steps. */
static unsigned long reads_of(lp_ctx *c, lp_sae_arch arch, int steps, const char *tag) {
    char store[256], out[256];
    snprintf(store, sizeof store, "%s/store", dir);
    snprintf(out, sizeof out, "%s/out-%s-%d-%d", dir, tag, (int)arch, steps);
    struct stat sb;
    if (stat(store, &sb) != 0) write_store(store);
    lp_sae_train_cfg t;
    cfg(&t, store, out, arch, steps);
    lp_sae_train_report rep;
    unsigned long n0 = c->n_d2h;
    cr_assert_eq(lp_sae_train(&t, c, &rep), LP_OK, "%s", lp_last_error());
    cr_assert_eq(rep.steps, steps);
    if (arch == LP_SAE_TOPK) cr_expect_gt(rep.dead, 0, "%s: no dead latent at the end: AuxK may never have run", tag);
    return c->n_d2h - n0;
}

static void copies(lp_ctx *c, const char *tag) {
    const lp_sae_arch archs[4] = {LP_SAE_STANDARD, LP_SAE_JUMPRELU, LP_SAE_TOPK, LP_SAE_BATCHTOPK};
    for (int a = 0; a < 4; a++) {
        unsigned long r20 = reads_of(c, archs[a], 20, tag), r40 = reads_of(c, archs[a], 40, tag);
        printf("  %-4s %-9s device reads: %lu in 20 steps, %lu in 40 (log_every = steps)%s\n", tag, lp_sae_arch_name(archs[a]), r20, r40,
               archs[a] == LP_SAE_TOPK ? ", AuxK over the dead latents on" : "");
        cr_expect_eq(r20, r40, "%s %s: %lu device reads in 20 steps, %lu in 40", tag, lp_sae_arch_name(archs[a]), r20, r40);
    }
}

Test(sae_track, device_reads_do_not_grow_with_steps_cpu) {
    lp_ctx c;
    cr_assert_eq(lp_ctx_init(&c, LP_CPU, LP_F32), LP_OK);
    copies(&c, "cpu");
    lp_ctx_free(&c);
}

Test(sae_track, device_reads_do_not_grow_with_steps_cuda) {
    LP_TEST_REQUIRE_GPU();
    lp_ctx c;
    cr_assert_eq(lp_ctx_init(&c, LP_CUDA, LP_F32), LP_OK, "%s", lp_last_error());
    copies(&c, "cuda");
    lp_ctx_free(&c);
}

/* lr 1e30: the first Adam step throws every weight to ~1e30 and the loss turns non-finite
 * within a few steps. The standard SAE's first such loss is a NaN at step 2 (tokens
 * 128..191), which the former per-step check reported in these very words; every
 * architecture reports the first bad step with its own tokens, writes no metrics line for
 * the window it fell in, no checkpoint after it and no final SAE. */
static void nan_run(lp_ctx *c, const char *tag) {
    /* the last: no checkpoints, so the flag is read at the first log step after it (6) */
    const lp_sae_arch archs[5] = {LP_SAE_STANDARD, LP_SAE_JUMPRELU, LP_SAE_TOPK, LP_SAE_BATCHTOPK, LP_SAE_STANDARD};
    for (int a = 0; a < 5; a++) {
        const int ckpt = a < 4, log_every = a < 4 ? 15 : 6;
        char store[256], out[256], p[512];
        snprintf(store, sizeof store, "%s/store", dir);
        snprintf(out, sizeof out, "%s/nan-%s-%d", dir, tag, a);
        struct stat sb;
        if (stat(store, &sb) != 0) write_store(store);
        lp_sae_train_cfg t;
        cfg(&t, store, out, archs[a], 30);
        t.lr = 1e30, t.log_every = log_every, t.checkpoint_every = ckpt ? 64 : 0; /* a checkpoint after every step */
        lp_sae_train_report rep;
        lp_status st = lp_sae_train(&t, c, &rep);
        const char *e = lp_last_error(), *name = lp_sae_arch_name(archs[a]);
        cr_expect_eq(st, LP_ERR_FORMAT, "%s %s: status %d: %s", tag, name, st, e);
        long long step = -1, t0 = -1, t1 = -1;
        char want[700];
        snprintf(want, sizeof want, "%s: step ", out);
        const char *at = strstr(e, want);
        cr_expect(at && sscanf(at + strlen(want), "%lld (batch of tokens %lld..%lld)", &step, &t0, &t1) == 3, "%s %s: %s", tag, name, e);
        cr_expect(step >= 0 && t0 == step * 64 && t1 == t0 + 63, "%s %s: step %lld, tokens %lld..%lld", tag, name, step, t0, t1);
        cr_expect(strstr(e, "the last good checkpoint is kept in") != NULL, "%s", e);
        if (archs[a] == LP_SAE_STANDARD) {
            snprintf(want, sizeof want, "%s: step 2 (batch of tokens 128..191): the loss is NaN", out);
            cr_expect(strstr(e, want) != NULL, "%s: '%s' lacks '%s'", tag, e, want);
        }
        snprintf(p, sizeof p, "%s/sae_weights.safetensors", out);
        cr_expect(stat(p, &sb) != 0, "%s %s: a final SAE was written despite the non-finite loss", tag, name);
        snprintf(p, sizeof p, "%s/checkpoints/step-%09lld", out, step + 1);
        cr_expect(stat(p, &sb) != 0, "%s %s: %s holds a state after the non-finite loss", tag, name, p);
        if (step > 0 && ckpt) {
            snprintf(p, sizeof p, "%s/checkpoints/step-%09lld", out, step);
            cr_expect(stat(p, &sb) == 0, "%s %s: %s, the last good checkpoint, is missing", tag, name, p);
        }
        snprintf(p, sizeof p, "%s/metrics.jsonl", out);
        size_t n = 0;
        char *m = lp_read_file(p, &n);
        cr_expect(step < log_every ? (m == NULL || n == 0) : m != NULL, "%s %s: metrics lines for a window with a non-finite loss: %s", tag, name, m ? m : "");
        free(m);
        printf("  %-4s %-9s %s%s\n", tag, name, ckpt ? "" : "(no checkpoints, log every 6) ", e + strlen(out) + 2);
    }
}

Test(sae_track, non_finite_loss_ends_the_run_naming_its_first_step_cpu) {
    lp_ctx c;
    cr_assert_eq(lp_ctx_init(&c, LP_CPU, LP_F32), LP_OK);
    nan_run(&c, "cpu");
    lp_ctx_free(&c);
}

Test(sae_track, non_finite_loss_ends_the_run_naming_its_first_step_cuda) {
    LP_TEST_REQUIRE_GPU();
    lp_ctx c;
    cr_assert_eq(lp_ctx_init(&c, LP_CUDA, LP_F32), LP_OK, "%s", lp_last_error());
    nan_run(&c, "cuda");
    lp_ctx_free(&c);
}

/* ---- the kernels against their CPU twins ---- */

static double rel(double a, double b) { return fabs(a - b) / (fabs(b) > 1e-300 ? fabs(b) : 1); }

/* Counters over several updates (some latents fire, some never do, one crosses the window
 * each time): since, the dead list and its count, the largest counter and the firings exact. */
Test(sae_track, dead_update_kernel_equals_the_cpu) {
    LP_TEST_REQUIRE_GPU();
    const int sizes[3] = {1, 700, EMU_CAP(20000, 3000)};
    for (int z = 0; z < 3; z++) {
        int S = sizes[z];
        gpu g;
        gpu_init(&g, LP_F32);
        int64_t *since = calloc(S, 8), *counts = calloc(S, 8), *gs, *gc;
        int32_t *cand = calloc(S, 4);
        double trk[LP_TRK_LEN] = {0};
        uint64_t r = 99 + S;
        for (int s = 0; s < S; s++) since[s] = (int64_t)(lp_test_next(&r) % 5000);
        int64_t *dsince = gpu_put(&g, since, (size_t)S * 8), *dcounts = gpu_alloc(&g, (size_t)S * 8);
        int32_t *dcand = gpu_alloc(&g, (size_t)S * 4);
        double *dtrk = gpu_put(&g, trk, sizeof trk);
        for (int it = 0; it < 4; it++) {
            for (int s = 0; s < S; s++) counts[s] = s % 7 == 3 ? 0 : (int64_t)(lp_test_next(&r) % 3) * (int64_t)(lp_test_next(&r) % 40);
            OK(lp_ctx_to_device(&g.c, dcounts, counts, (size_t)S * 8));
            OK(lp_sae_dead_update(cpu(), since, cand, trk, counts, S, 640, 3000));
            OK(lp_sae_dead_update(&g.c, dsince, dcand, dtrk, dcounts, S, 640, 3000));
            gs = gpu_get(&g, dsince, (size_t)S * 8), gc = gpu_get(&g, dcand, (size_t)S * 4);
            double *gt = gpu_get(&g, dtrk, sizeof trk);
            int nd = (int)trk[LP_TRK_N_DEAD];
            cr_expect(memcmp(gs, since, (size_t)S * 8) == 0, "S=%d update %d: since differs", S, it);
            cr_expect(memcmp(gc, cand, (size_t)nd * 4) == 0, "S=%d update %d: the dead list differs", S, it);
            for (int k = LP_TRK_N_DEAD; k <= LP_TRK_FIRED; k++)
                cr_expect(gt[k] == trk[k], "S=%d update %d: slot %d: %.17g on the GPU, %.17g on the CPU", S, it, k, gt[k], trk[k]);
            if (it == 3) fprintf(stderr, "  dead_update S=%-5d %d dead, max since %.0f, fired %.0f: exact\n", S, nd, trk[LP_TRK_MAX_SINCE], trk[LP_TRK_FIRED]);
            free(gs), free(gc), free(gt);
        }
        OK(lp_sae_dead_update(&g.c, dsince, NULL, dtrk, dcounts, S, 640, 3000)); /* no list wanted */
        gpu_done(&g, "dead_update");
        free(since), free(counts), free(cand);
    }
}

/* The step's sums: the reconstruction sums into device memory, the L1 term and the
 * bookkeeping of one step, with its flag; every slot within 1e-12 of the CPU's. */
Test(sae_track, step_sums_kernels_equal_the_cpu) {
    LP_TEST_REQUIRE_GPU();
    int N = 64, D = 24, S = EMU_CAP(3000, 600);
    gpu g;
    gpu_init(&g, LP_F32);
    float *x = lp_test_rand((size_t)N * D, 5, -1, 1), *xh = lp_test_rand((size_t)N * D, 6, -1, 1);
    float *cs = lp_test_rand(S, 7, 0, 3), *nm = lp_test_rand(S, 8, 0.5f, 1.5f);
    double trk[LP_TRK_LEN] = {0};
    trk[LP_TRK_BAD_STEP] = -1, trk[LP_TRK_N_DEAD] = 5, trk[LP_TRK_FIRED] = 301, trk[LP_TRK_ACC_MSE] = 0.25;
    double *dtrk = gpu_put(&g, trk, sizeof trk);
    float *dx = gpu_put(&g, x, (size_t)N * D * 4), *dxh = gpu_put(&g, xh, (size_t)N * D * 4);
    float *dcs = gpu_put(&g, cs, (size_t)S * 4), *dnm = gpu_put(&g, nm, (size_t)S * 4);
    OK(lp_sae_recon_sums_dev(cpu(), trk + LP_TRK_RECON, x, xh, N, D));
    OK(lp_sae_recon_sums_dev(&g.c, dtrk + LP_TRK_RECON, dx, dxh, N, D));
    OK(lp_sae_recon_sums_dev(cpu(), trk + LP_TRK_AUX, xh, x, N, D));
    OK(lp_sae_recon_sums_dev(&g.c, dtrk + LP_TRK_AUX, dxh, dx, N, D));
    OK(lp_sae_l1_term(cpu(), trk, cs, nm, S));
    OK(lp_sae_l1_term(&g.c, dtrk, dcs, dnm, S));
    double host[4];
    OK(lp_sae_recon_sums(cpu(), host, x, xh, N, D));
    cr_expect(memcmp(host, trk + LP_TRK_RECON, sizeof host) == 0, "the CPU's device sums differ from lp_sae_recon_sums");
    for (int sparse = 0; sparse < 3; sparse++) {
        lp_sae_track_step_args a = {.step = 7 + sparse, .n = N, .n_global = 2 * N, .sparse = sparse, .l1 = 0.3, .l0_coef = 2,
                                    .aux = 1, .aux_k = 3, .aux_coef = 1.0 / 32, .accumulate = 1};
        OK(lp_sae_track_step(cpu(), trk, &a));
        OK(lp_sae_track_step(&g.c, dtrk, &a));
    }
    double *gt = gpu_get(&g, dtrk, sizeof trk), worst = 0;
    for (int k = 0; k < LP_TRK_LEN; k++) worst = fmax(worst, rel(gt[k], trk[k]));
    fprintf(stderr, "  recon_sums_dev, l1_term, track_step x3: every slot within %.1e of the CPU (<= 1e-12)\n", worst);
    cr_expect(worst <= 1e-12, "a slot differs by %.3g", worst);
    cr_expect(gt[LP_TRK_BAD_STEP] == -1 && trk[LP_TRK_BAD_STEP] == -1, "a finite loss set the flag");
    free(gt);
    /* a non-finite loss: the first such step is kept, and whether it was a NaN */
    double inf = INFINITY, nan_ = NAN;
    for (int i = 0; i < 2; i++) {
        OK(lp_ctx_to_device(&g.c, dtrk + LP_TRK_RECON, i ? &nan_ : &inf, 8));
        trk[LP_TRK_RECON] = i ? nan_ : inf;
        lp_sae_track_step_args a = {.step = 20 + i, .n = N, .n_global = N, .accumulate = 1};
        OK(lp_sae_track_step(cpu(), trk, &a));
        OK(lp_sae_track_step(&g.c, dtrk, &a));
    }
    gt = gpu_get(&g, dtrk, sizeof trk);
    cr_expect(trk[LP_TRK_BAD_STEP] == 20 && trk[LP_TRK_BAD_NAN] == 0, "cpu: flag %g %g", trk[LP_TRK_BAD_STEP], trk[LP_TRK_BAD_NAN]);
    cr_expect(gt[LP_TRK_BAD_STEP] == 20 && gt[LP_TRK_BAD_NAN] == 0, "gpu: flag %g %g", gt[LP_TRK_BAD_STEP], gt[LP_TRK_BAD_NAN]);
    free(gt);
    gpu_done(&g, "track");
    free(x), free(xh), free(cs), free(nm);
}

/* AuxK's selection with the dead count on the device: for counts 0, below K, K and above,
 * equal to the CPU twin, and its first min(K, n) entries equal to lp_sae_topk_among's. */
Test(sae_track, topk_among_counted_equals_the_cpu_and_topk_among) {
    LP_TEST_REQUIRE_GPU();
    int N = 24, S = EMU_CAP(2000, 300), K = 16;
    gpu g;
    gpu_init(&g, LP_F32);
    float *pre = lp_test_rand((size_t)N * S, 21, -2, 2);
    int32_t *cand = malloc((size_t)S * 4), *ri = malloc((size_t)N * K * 4), *ti = malloc((size_t)N * K * 4);
    float *rv = malloc((size_t)N * K * 4), *tv = malloc((size_t)N * K * 4);
    for (int s = 0; s < S; s++) cand[s] = 3 * s < S ? 3 * s : S - 1; /* increasing up to the counts used */
    float *dpre = gpu_put(&g, pre, (size_t)N * S * 4);
    int32_t *dcand = gpu_put(&g, cand, (size_t)S * 4), *didx = gpu_alloc(&g, (size_t)N * K * 4);
    float *dval = gpu_alloc(&g, (size_t)N * K * 4);
    double *dn = gpu_alloc(&g, sizeof(double));
    const int counts[5] = {0, 1, K - 3, K, S / 3};
    for (int q = 0; q < 5; q++) {
        double n = counts[q];
        OK(lp_ctx_to_device(&g.c, dn, &n, sizeof n));
        OK(lp_sae_topk_among_counted(cpu(), ri, rv, pre, cand, &n, N, S, K));
        OK(lp_sae_topk_among_counted(&g.c, didx, dval, dpre, dcand, dn, N, S, K));
        int32_t *gi = gpu_get(&g, didx, (size_t)N * K * 4);
        float *gv = gpu_get(&g, dval, (size_t)N * K * 4);
        cr_expect(memcmp(gi, ri, (size_t)N * K * 4) == 0 && memcmp(gv, rv, (size_t)N * K * 4) == 0,
                  "n=%d: the GPU's selection differs from the CPU's", counts[q]);
        int m = counts[q] < K ? counts[q] : K, bad = 0;
        if (m > 0) { /* the real entries: lp_sae_topk_among over the same n */
            OK(lp_sae_topk_among(cpu(), ti, tv, pre, cand, counts[q], N, S, m));
            for (int r = 0; r < N; r++)
                bad += memcmp(ri + (size_t)r * K, ti + (size_t)r * m, (size_t)m * 4) != 0 || memcmp(rv + (size_t)r * K, tv + (size_t)r * m, (size_t)m * 4) != 0;
        }
        for (int r = 0; r < N; r++)
            for (int j = m; j < K; j++) bad += rv[(size_t)r * K + j] != 0.0f || ri[(size_t)r * K + j] != (int32_t)(((size_t)r * K + j) % S);
        cr_expect(bad == 0, "n=%d: %d rows differ from lp_sae_topk_among or pad wrongly", counts[q], bad);
        fprintf(stderr, "  topk_among_counted n=%-4d K=%d: GPU = CPU, first %d = topk_among, rest padding\n", counts[q], K, m);
        free(gi), free(gv);
    }
    gpu_done(&g, "topk_among_counted");
    free(pre), free(cand), free(ri), free(ti), free(rv), free(tv);
}

/* BatchTopK's threshold left on the device: the float lp_sae_kth_largest returns, widened,
 * and the filled vector, exact; with count >= n, 0. */
Test(sae_track, batch_threshold_equals_kth_largest) {
    LP_TEST_REQUIRE_GPU();
    int N = 16, S = EMU_CAP(3000, 500);
    size_t n = (size_t)N * S;
    gpu g;
    gpu_init(&g, LP_F32);
    float *pre = lp_test_rand(n, 31, -1, 1), *thr = malloc((size_t)S * 4);
    float *dpre = gpu_put(&g, pre, n * 4), *dthr = gpu_alloc(&g, (size_t)S * 4);
    double *dt = gpu_alloc(&g, sizeof(double)), t;
    const size_t counts[4] = {0, 37, n / 3, n};
    for (int q = 0; q < 4; q++) {
        float want;
        OK(lp_sae_kth_largest(cpu(), &want, pre, n, counts[q]));
        OK(lp_sae_batch_threshold(cpu(), thr, &t, pre, n, counts[q], S));
        int bad = t != (double)want;
        for (int i = 0; i < S; i++) bad += memcmp(&thr[i], &want, 4) != 0;
        OK(lp_sae_batch_threshold(&g.c, dthr, dt, dpre, n, counts[q], S));
        float *gthr = gpu_get(&g, dthr, (size_t)S * 4);
        double *gt = gpu_get(&g, dt, sizeof(double));
        bad += *gt != (double)want;
        for (int i = 0; i < S; i++) bad += memcmp(&gthr[i], &want, 4) != 0;
        cr_expect(bad == 0, "count %zu: %d values differ from lp_sae_kth_largest's %.9g", counts[q], bad, (double)want);
        fprintf(stderr, "  batch_threshold count=%-6zu %.9g on the CPU and the GPU: exact\n", counts[q], (double)want);
        free(gthr), free(gt);
    }
    gpu_done(&g, "batch_threshold");
    free(pre), free(thr);
}
