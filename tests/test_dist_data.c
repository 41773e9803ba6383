/* test_dist_data: data parallelism of `loupe cache` under mpirun.
 *
 * The store written by 2 and 3 data-parallel ranks is the single process's, byte for byte
 * (every shard and meta.json); a DP run resumes a store whose last shard is gone and ends
 * identical again; a store rank 0 cannot open ends every rank with an error, none hangs;
 * ranks started with different settings are refused before any work.
 * Every run uses one BLAS thread: the single process's own bytes depend on the BLAS thread
 * count (a multi-threaded GEMM sums in another order), and mpirun gives each rank one core.
 * Skipped, saying why, without MPI in the build or mpirun on the PATH. */
#include <criterion/criterion.h>
#include <cjson/cJSON.h>
#include <math.h>
#include <libgen.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "loupe/dist.h"
#include "loupe/output.h"
#include "loupe/safetensors.h"
#include "loupe/sae.h"
#include "mpitest.h"

#define FIX "tests/fixtures/"
#define ENV "OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 "
/* 8 sequences of 4 tokens in shards of 3 and batches of 2: shards of two batches and of one,
 * so some rounds leave a rank without a batch */
#define ARGS "cache --model.path=" FIX "gpt2-tiny --data.tokens=" FIX "gpt2-tiny/tokens_flat.npy --data.context=4 --model.device=cpu " \
             "--cache.hooks=blocks.*.hook_resid_post,blocks.0.attn.hook_pattern,blocks.1.mlp.hook_post " \
             "--cache.shard_sequences=3 --cache.batch=2"

static char g_bin[PATH_MAX + 16], g_dir[] = "/tmp/loupe-distdp-XXXXXX";

/* build/loupe beside this test binary, a scratch directory; skips when MPI cannot run. */
static void setup(void) {
    mpitest_need_mpi();
    mpitest_paths(g_bin, sizeof g_bin, g_dir);
}

static void teardown(void) {
    mpitest_remove(g_dir);
}

static void same_file(const char *a, const char *b) {
    size_t na, nb;
    char *x = lp_read_file(a, &na), *y = lp_read_file(b, &nb);
    cr_assert(x, "cannot read %s", a);
    cr_assert(y, "cannot read %s", b);
    cr_assert_eq(na, nb, "%s has %zu bytes, %s %zu", a, na, b, nb);
    cr_assert(memcmp(x, y, na) == 0, "%s and %s differ", a, b);
    free(x), free(y);
}

static void same_store(const char *ref, const char *dir) {
    static const char *const files[] = {"meta.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors", NULL};
    char a[PATH_MAX], b[PATH_MAX];
    for (int i = 0; files[i]; i++) {
        snprintf(a, sizeof a, "%s/%s", ref, files[i]);
        snprintf(b, sizeof b, "%s/%s", dir, files[i]);
        same_file(a, b);
    }
    snprintf(b, sizeof b, "%s/shard-00003.safetensors", dir);
    cr_assert_neq(access(b, F_OK), 0, "%s: one shard too many", b);
}

TestSuite(dist_data, .init = setup, .fini = teardown, .timeout = 120);

static void dp_matches(int np) {
    char out[16384], ref[PATH_MAX + 64], dir[PATH_MAX + 64];
    snprintf(ref, sizeof ref, "%s/one", g_dir);
    snprintf(dir, sizeof dir, "%s/dp", g_dir);
    int rc = mpitest_run(out, sizeof out, ENV "%s " ARGS " --cache.out=%s", g_bin, ref);
    cr_assert_eq(rc, 0, "one process: %s", out);
    rc = mpitest_run(out, sizeof out, ENV MPIRUN "-np %d %s " ARGS " --cache.out=%s", np, g_bin, dir);
    cr_assert_eq(rc, 0, "mpirun -np %d: %s", np, out);
    cr_assert(strstr(out, "cached 4 hooks for 8 sequences (32 tokens)"), "%s", out);
    cr_assert(strstr(out, "3 shards"), "%s", out);
    same_store(ref, dir);

    /* the last shard lost (a run killed before it was renamed into place): a DP re-run
     * keeps the first two and writes it again, byte for byte */
    char last[PATH_MAX + 96];
    snprintf(last, sizeof last, "%s/shard-00002.safetensors", dir);
    cr_assert_eq(unlink(last), 0);
    rc = mpitest_run(out, sizeof out, ENV MPIRUN "-np %d %s " ARGS " --cache.out=%s", np, g_bin, dir);
    cr_assert_eq(rc, 0, "mpirun -np %d (resume): %s", np, out);
    cr_assert(strstr(out, "6 sequences were already there"), "%s", out);
    same_store(ref, dir);
}

Test(dist_data, cache_dp2_is_the_single_process_store) { dp_matches(2); }
Test(dist_data, cache_dp3_is_the_single_process_store) { dp_matches(3); }

/* ---- cache with the model split (TP=2, and DP=2 x TP=2 on 4 ranks) ----
 * The split model sums in another order, so its values are one process's within 1e-5 of
 * each tensor's largest; everything else (meta.json, the tensors' names, shapes and dtypes,
 * the tokens) is the same bytes. Llama: GQA, and per-head (z, pattern) and per-neuron
 * (mlp.hook_post) hooks that live split over the ranks and are gathered for the store. */
#define TP_ARGS "cache --model.path=" FIX "llama-tiny --data.tokens=" FIX "gpt2-tiny/tokens_flat.npy --data.context=4 --model.device=cpu " \
                "--cache.hooks=blocks.*.hook_resid_post,blocks.0.attn.hook_pattern,blocks.0.attn.hook_z,blocks.1.mlp.hook_post " \
                "--cache.shard_sequences=3 --cache.batch=2"

static void close_store(const char *ref, const char *dir) {
    char a[PATH_MAX + 96], b[PATH_MAX + 96];
    snprintf(a, sizeof a, "%s/meta.json", ref);
    snprintf(b, sizeof b, "%s/meta.json", dir);
    same_file(a, b);
    for (int k = 0; k < 3; k++) {
        lp_st_file x, y;
        snprintf(a, sizeof a, "%s/shard-%05d.safetensors", ref, k);
        snprintf(b, sizeof b, "%s/shard-%05d.safetensors", dir, k);
        cr_assert_eq(lp_st_open(&x, a), LP_OK, "%s", lp_last_error());
        cr_assert_eq(lp_st_open(&y, b), LP_OK, "%s", lp_last_error());
        cr_assert_eq(x.n, y.n, "%s: %d tensors, %s: %d", a, x.n, b, y.n);
        for (int i = 0; i < x.n; i++) {
            const lp_st_tensor *t = &x.tensors[i], *u = lp_st_find(&y, t->name);
            cr_assert(u, "%s: no %s", b, t->name);
            cr_assert(t->dtype == u->dtype && t->ndim == u->ndim && t->nbytes == u->nbytes, "%s: %s's layout differs", b, t->name);
            cr_assert(memcmp(t->shape, u->shape, t->ndim * sizeof *t->shape) == 0, "%s: %s's shape differs", b, t->name);
            if (t->dtype != LP_F32) { /* the tokens */
                cr_assert(memcmp(t->data, u->data, t->nbytes) == 0, "%s: %s differs", b, t->name);
                continue;
            }
            const float *p = t->data, *q = u->data;
            double big = 0, worst = 0;
            for (size_t j = 0; j < t->nbytes / 4; j++) big = fmax(big, fabs(p[j])), worst = fmax(worst, fabs(p[j] - q[j]));
            cr_assert(worst <= 1e-5 * fmax(big, 1e-30), "%s: %s differs by %.3g (largest %.3g)", b, t->name, worst, big);
        }
        lp_st_close(&x), lp_st_close(&y);
    }
}

Test(dist_data, cache_tp2_and_dp2_by_tp2_are_the_single_process_store) {
    char out[16384], ref[PATH_MAX + 64], tp[PATH_MAX + 64], both[PATH_MAX + 64];
    snprintf(ref, sizeof ref, "%s/one", g_dir);
    snprintf(tp, sizeof tp, "%s/tp2", g_dir);
    snprintf(both, sizeof both, "%s/dp2tp2", g_dir);
    int rc = mpitest_run(out, sizeof out, ENV "%s " TP_ARGS " --cache.out=%s", g_bin, ref);
    cr_assert_eq(rc, 0, "one process: %s", out);
    rc = mpitest_run(out, sizeof out, ENV MPIRUN "-np 2 %s " TP_ARGS " --dist.tp=2 --cache.out=%s", g_bin, tp);
    cr_assert_eq(rc, 0, "TP=2: %s", out);
    cr_assert(strstr(out, "cached 5 hooks for 8 sequences (32 tokens)"), "%s", out);
    close_store(ref, tp);
    rc = mpitest_run(out, sizeof out, ENV MPIRUN "-np 4 %s " TP_ARGS " --dist.tp=2 --cache.out=%s", g_bin, both);
    cr_assert_eq(rc, 0, "DP=2 x TP=2: %s", out);
    close_store(ref, both);
    /* the last shard lost: a TP=2 rerun writes it again, the bytes of the TP=2 run */
    char last[PATH_MAX + 96], keep[PATH_MAX + 96];
    snprintf(last, sizeof last, "%s/shard-00002.safetensors", tp);
    snprintf(keep, sizeof keep, "%s/kept.safetensors", g_dir);
    cr_assert_eq(rename(last, keep), 0);
    rc = mpitest_run(out, sizeof out, ENV MPIRUN "-np 2 %s " TP_ARGS " --dist.tp=2 --cache.out=%s", g_bin, tp);
    cr_assert_eq(rc, 0, "TP=2 (resume): %s", out);
    cr_assert(strstr(out, "6 sequences were already there"), "%s", out);
    same_file(keep, last);
}

/* A launcher wrapper that puts rank 0 alone under a file-size limit of kb KiB (SIGXFSZ
 * ignored, so a write past it fails with EFBIG), into sh. */
static void limit_rank0(char *sh, size_t n, int kb) {
    snprintf(sh, n, "%s/limit.sh", g_dir);
    FILE *f = fopen(sh, "w");
    cr_assert(f);
    fprintf(f, "#!/bin/bash\nif [ \"$OMPI_COMM_WORLD_RANK\" = 0 ]; then trap '' XFSZ; ulimit -f %d; fi\nexec \"$@\"\n", kb);
    fclose(f);
    cr_assert_eq(chmod(sh, 0755), 0);
}

/* Runs the mpirun command, expecting every rank to end within 20 s (dist.timeout_s is 30
 * there), non-zero, rank 0 naming the file-size limit and rank 1 naming rank 0 in `says`. */
static void ends_at_once(char *out, size_t n, const char *says, const char *fmt, ...) {
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int rc = mpitest_run(out, n, "%s", cmd);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
    cr_assert_neq(rc, 0, "%s", out);
    cr_assert_neq(rc, 124, "mpirun hung: %s", out);
    cr_expect(strstr(out, "loupe: rank 0: ") && strstr(out, "File too large"), "%s", out);
    cr_expect(strstr(out, says), "%s", out);
    cr_expect(secs < 20, "the job took %.1f s to end (dist.timeout_s is 30)", secs);
}

/* The writer fails mid-run (a file-size limit on rank 0 alone: its shard cannot be sized)
 * while the model is split: its TP peer, which waits for it in the layers' all-reduces,
 * learns of it in the same round and every rank ends at once, naming rank 0, rather than
 * after dist.timeout_s (30 s here). (The shared-memory transport is left out: the limit
 * would stop MPI's own segment on rank 0.) */
Test(dist_data, cache_tp2_ends_at_once_when_rank0_cannot_write) {
    char out[16384], sh[PATH_MAX + 64];
    limit_rank0(sh, sizeof sh, 8);
    ends_at_once(out, sizeof out, "loupe: rank 1: cache: rank 0 failed", ENV "timeout 60 " MPIRUN "--mca btl self,tcp -np 2 %s %s " TP_ARGS
                 " --dist.tp=2 --dist.timeout_s=30 --cache.out=%s/w", sh, g_bin, g_dir);
}

/* rank 0 cannot open the store (cache.out is a file): every rank ends, non-zero, naming why */
Test(dist_data, cache_store_refused_on_rank0_ends_every_rank) {
    char out[16384], file[PATH_MAX + 64];
    snprintf(file, sizeof file, "%s/afile", g_dir);
    FILE *f = fopen(file, "w");
    cr_assert(f);
    fclose(f);
    int rc = mpitest_run(out, sizeof out, "timeout 60 " MPIRUN "-np 2 %s " ARGS " --cache.out=%s", g_bin, file);
    cr_assert_neq(rc, 0, "%s", out);
    cr_assert_neq(rc, 124, "mpirun hung: %s", out);
    cr_assert(strstr(out, "loupe: rank 1: cache: rank 0 could not open"), "%s", out);
    cr_assert(strstr(out, "loupe: rank 0: "), "%s", out);
}

/* dist.log_dir: rank 1 appends what it prints (and its errors) to rank-00001.log, made with
 * its directory; rank 0 prints as before and writes no log; a log_dir that cannot be made
 * is refused by name with exit 2 */
Test(dist_data, per_rank_logs_on_request) {
    char out[16384], logs[PATH_MAX + 64], log1[PATH_MAX + 96], log0[PATH_MAX + 96];
    snprintf(logs, sizeof logs, "%s/logs", g_dir);
    snprintf(log1, sizeof log1, "%s/rank-00001.log", logs);
    snprintf(log0, sizeof log0, "%s/rank-00000.log", logs);
    int rc = mpitest_run(out, sizeof out, ENV MPIRUN "-np 2 %s " ARGS " --cache.out=%s/s --dist.log_dir=%s", g_bin, g_dir, logs);
    cr_assert_eq(rc, 0, "%s", out);
    cr_assert(strstr(out, "cached 4 hooks for 8 sequences"), "rank 0 prints its summary: %s", out);
    char *a = lp_read_file(log1, NULL);
    cr_assert(a, "no %s", log1);
    cr_expect(strstr(a, "cached 4 hooks for 8 sequences"), "rank 1's log: %s", a);
    free(a);
    cr_expect_neq(access(log0, F_OK), 0, "rank 0 wrote a log");
    /* an error on rank 1 reaches both its log (appended) and the launcher's standard error */
    rc = mpitest_run(out, sizeof out, ENV MPIRUN "-np 2 %s " ARGS " --cache.out=%s/s --dist.log_dir=%s --cache.hooks=blocks.9.nothing",
                     g_bin, g_dir, logs);
    cr_assert_neq(rc, 0, "%s", out);
    cr_expect(strstr(out, "loupe: rank 1: "), "%s", out);
    a = lp_read_file(log1, NULL);
    cr_assert(a);
    cr_expect(strstr(a, "cached 4 hooks for 8 sequences") && strstr(a, "loupe: rank 1: "), "rank 1's log, appended: %s", a);
    free(a);
    char file[PATH_MAX + 64];
    snprintf(file, sizeof file, "%s/afile", g_dir);
    FILE *f = fopen(file, "w");
    cr_assert(f);
    fclose(f);
    rc = mpitest_run(out, sizeof out, ENV "timeout 60 " MPIRUN "-np 2 %s " ARGS " --cache.out=%s/t --dist.log_dir=%s/sub", g_bin,
                     g_dir, file);
    cr_expect_neq(rc, 0, "%s", out);
    cr_expect_neq(rc, 124, "mpirun hung: %s", out);
    cr_expect(strstr(out, "loupe: rank 1: dist.log_dir: cannot make"), "%s", out);
    cr_expect(strstr(out, "loupe: rank 0: dist.log_dir: rank 1 cannot write its log"), "rank 0 refuses too: %s", out);
    cr_expect_eq(rc, 2, "every rank refuses with exit 2: %s", out);
    char *once = strstr(out, "loupe: rank 1: dist.log_dir: cannot make");
    cr_expect(once && !strstr(once + 1, "loupe: rank 1: dist.log_dir: cannot make"), "the line printed twice: %s", out);
}

/* rank 1 started with another cache.batch: refused at the start, on every rank, naming it */
Test(dist_data, ranks_with_other_settings_are_refused) {
    char out[16384], sh[PATH_MAX + 64];
    snprintf(sh, sizeof sh, "%s/launch.sh", g_dir);
    FILE *f = fopen(sh, "w");
    cr_assert(f);
    fprintf(f, "#!/bin/sh\nif [ \"$OMPI_COMM_WORLD_RANK\" = 1 ]; then exec %s " ARGS " --cache.out=%s/s --cache.batch=3; fi\n"
               "exec %s " ARGS " --cache.out=%s/s\n", g_bin, g_dir, g_bin, g_dir);
    fclose(f);
    cr_assert_eq(chmod(sh, 0755), 0);
    int rc = mpitest_run(out, sizeof out, "timeout 60 " MPIRUN "-np 2 %s", sh);
    cr_assert_neq(rc, 0, "%s", out);
    cr_assert_neq(rc, 124, "mpirun hung: %s", out);
    cr_assert(strstr(out, "loupe: rank 0: rank 1 was started with other settings than rank 0"), "%s", out);
    cr_assert(strstr(out, "loupe: rank 1: rank 1 was started with other settings than rank 0"), "%s", out);
    char meta[PATH_MAX + 64];
    snprintf(meta, sizeof meta, "%s/s/meta.json", g_dir);
    cr_assert_neq(access(meta, F_OK), 0, "a store was started: %s", meta);
}

/* ---- train-sae: 2 ranks of batch_tokens / 2 each against one process of batch_tokens, 100 steps ---- */

#define TRAIN "train-sae %s/store --data.hook=blocks.1.hook_resid_post --sae.expansion_factor=2 --train.device=cpu " \
              "--train.tokens=1600 --train.batch_tokens=16 --train.shuffle_tokens=32 --train.log_every=1 " \
              "--train.dead_feature_window=8 --train.aux_k_coefficient=0.03 --train.lr=1e-3 --train.checkpoint_every=128"

static double num(const cJSON *j, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, k);
    cr_assert(cJSON_IsNumber(v), "metrics line without %s", k);
    return v->valuedouble;
}

static void close_to(double a, double b, double tol, const char *what, int line) {
    cr_assert(fabs(a - b) <= tol * fmax(1.0, fmax(fabs(a), fabs(b))), "%s at line %d: %.9g and %.9g", what, line, a, b);
}

/* Every logged step's losses, explained variance, L0 and dead latents agree. */
static void same_curve(const char *one, const char *two) {
    char *a = lp_read_file(one, NULL), *b = lp_read_file(two, NULL);
    cr_assert(a && b, "cannot read %s or %s", one, two);
    static const char *const keys[] = {"losses/overall_loss", "losses/mse_loss", "losses/auxiliary_reconstruction_loss",
                                       "metrics/explained_variance", "metrics/l0", "sparsity/dead_features", NULL};
    char *sa = NULL, *sb = NULL;
    int line = 0;
    for (char *la = strtok_r(a, "\n", &sa), *lb = strtok_r(b, "\n", &sb); la || lb;
         la = strtok_r(NULL, "\n", &sa), lb = strtok_r(NULL, "\n", &sb), line++) {
        cr_assert(la && lb, "%s and %s have different numbers of lines", one, two);
        cJSON *ja = cJSON_Parse(la), *jb = cJSON_Parse(lb);
        for (int k = 0; keys[k]; k++) close_to(num(ja, keys[k]), num(jb, keys[k]), 1e-5, keys[k], line);
        cJSON_Delete(ja), cJSON_Delete(jb);
    }
    cr_assert_eq(line, 100, "100 steps logged, not %d", line);
    free(a), free(b);
}

static void train_matches(const char *arch) {
    char out[16384], one[PATH_MAX + 64], two[PATH_MAX + 64];
    int rc = mpitest_run(out, sizeof out, ENV "%s cache --model.path=" FIX "gpt2-tiny --data.tokens=" FIX "gpt2-tiny/tokens_flat.npy --data.context=4 "
                 "--model.device=cpu --cache.hooks=blocks.1.hook_resid_post --cache.out=%s/store", g_bin, g_dir);
    cr_assert_eq(rc, 0, "cache: %s", out);
    snprintf(one, sizeof one, "%s/one", g_dir);
    snprintf(two, sizeof two, "%s/two", g_dir);
    rc = mpitest_run(out, sizeof out, ENV "%s " TRAIN " --sae.architecture=%s --train.out=%s", g_bin, g_dir, arch, one);
    cr_assert_eq(rc, 0, "one process: %s", out);
    rc = mpitest_run(out, sizeof out, ENV MPIRUN "-np 2 %s " TRAIN " --sae.architecture=%s --train.out=%s", g_bin, g_dir, arch, two);
    cr_assert_eq(rc, 0, "mpirun -np 2: %s", out);
    cr_assert(strstr(out, "in 100 steps"), "%s", out);
    char a[PATH_MAX + 96], b[PATH_MAX + 96];
    snprintf(a, sizeof a, "%s/metrics.jsonl", one);
    snprintf(b, sizeof b, "%s/metrics.jsonl", two);
    same_curve(a, b);
    lp_ctx c;
    cr_assert_eq(lp_ctx_init(&c, LP_CPU, LP_F32), LP_OK);
    lp_sae *sa, *sb;
    cr_assert_eq(lp_sae_load(&sa, &c, one), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_sae_load(&sb, &c, two), LP_OK, "%s", lp_last_error());
    cr_assert_eq(sa->n_floats, sb->n_floats);
    double worst = 0;
    for (size_t i = 0; i < sa->n_floats; i++) worst = fmax(worst, fabs(((float *)sa->mem)[i] - ((float *)sb->mem)[i]));
    cr_assert(worst <= 1e-5, "%s: the weights differ by up to %.3g", arch, worst);
    lp_sae_free(sa, &c), lp_sae_free(sb, &c);
    lp_ctx_free(&c);
    /* rank 0 alone wrote, rank 1 nothing: one checkpoint directory, the one lock */
    snprintf(a, sizeof a, "%s/checkpoints", two);
    cr_assert_eq(access(a, F_OK), 0, "%s missing", a);
}

/* Rank 0 cannot write (a file-size limit on it alone: metrics.jsonl or a checkpoint fails):
 * rank 1 learns of it at that step and every rank ends at once, naming rank 0, instead of
 * waiting for it in the next step's all-reduces until dist.timeout_s (30 s here). */
Test(dist_data, train_sae_dp2_ends_at_once_when_rank0_cannot_write) {
    char out[16384], sh[PATH_MAX + 64];
    int rc = mpitest_run(out, sizeof out, ENV "%s cache --model.path=" FIX "gpt2-tiny --data.tokens=" FIX "gpt2-tiny/tokens_flat.npy "
                         "--data.context=4 --model.device=cpu --cache.hooks=blocks.1.hook_resid_post --cache.out=%s/store", g_bin, g_dir);
    cr_assert_eq(rc, 0, "cache: %s", out);
    limit_rank0(sh, sizeof sh, 2);
    ends_at_once(out, sizeof out, "loupe: rank 1: train-sae: rank 0 failed to write into", ENV "timeout 60 " MPIRUN
                 "--mca btl self,tcp -np 2 %s %s " TRAIN " --sae.architecture=topk --dist.timeout_s=30 --train.out=%s/limited", sh, g_bin,
                 g_dir, g_dir);
}

Test(dist_data, train_sae_dp2_matches_one_process_topk) { train_matches("topk"); }
Test(dist_data, train_sae_dp2_matches_one_process_standard) { train_matches("standard"); }
Test(dist_data, train_sae_dp2_matches_one_process_jumprelu) { train_matches("jumprelu"); }
Test(dist_data, train_sae_dp2_matches_one_process_batchtopk) { train_matches("batchtopk"); }
