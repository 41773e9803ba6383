/* test_dist_fault: a rank that dies or stops answering ends the whole job, never hangs it.
 *
 * Through the `loupe` binary under `mpirun -np 2`, data-parallel train-sae on a small store:
 *  - kill -9 of rank 1 after the first checkpoint: every rank ends, non-zero, within the
 *    timeout, saying so; no final SAE or cfg.json is left to look complete; a rerun resumes
 *    from the checkpoint and ends byte-identical (weights, cfg.json, every metrics value but
 *    the tokens/s timing) to an uninterrupted run of the same job;
 *  - SIGSTOP of rank 1 (alive, silent): rank 0 gives up after dist.timeout_s, names the rank
 *    and the collective in one line, and the job ends;
 *  - rank 1 failing alone (its input is bad, rank 0's is not): the job ends within the
 *    timeout instead of rank 0 waiting for it forever;
 *  - rank 1 never arriving (a launch script that sleeps instead of starting loupe): rank 0,
 *    inside MPI's start, ends the job after dist.start_timeout_s; a rank arriving late, but
 *    within it, is waited for;
 *  - dist.timeout_s or dist.start_timeout_s that is not a positive finite number is refused
 *    (exit 2) before any work.
 * The MPI tests skip, saying why, without MPI in the build or mpirun on the PATH. */
#include <criterion/criterion.h>
#include <dirent.h>
#include <libgen.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "loupe/dist.h"
#include "loupe/output.h"
#include "mpitest.h"

#define FIX "tests/fixtures/"
#define ENV "OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 "
/* 16384 steps of 16 tokens (a few seconds), a checkpoint every 1024 steps */
#define TRAIN "train-sae %s/store --data.hook=blocks.1.hook_resid_post --sae.expansion_factor=2 --train.device=cpu " \
              "--train.tokens=262144 --train.batch_tokens=16 --train.shuffle_tokens=32 --train.log_every=64 "           \
              "--train.dead_feature_window=8 --train.aux_k_coefficient=0.03 --train.lr=1e-3 --train.checkpoint_every=16384"

static char g_bin[PATH_MAX + 16], g_dir[] = "/tmp/loupe-distfault-XXXXXX";

static void setup(void) {
    mpitest_paths(g_bin, sizeof g_bin, g_dir);
}

/* The ranks' pids (written by launch.sh): whatever a failed test left is killed. */
static pid_t rank_pid(int r) {
    char p[PATH_MAX + 32];
    snprintf(p, sizeof p, "%s/pid.%d", g_dir, r);
    FILE *f = fopen(p, "r");
    long pid = 0;
    if (f && fscanf(f, "%ld", &pid) != 1) pid = 0;
    if (f) fclose(f);
    return (pid_t)pid;
}

static void teardown(void) {
    for (int r = 0; r < 2; r++) {
        pid_t p = rank_pid(r);
        if (p > 0 && kill(p, 0) == 0) kill(p, SIGKILL);
    }
    mpitest_remove(g_dir);
}

TestSuite(dist_fault, .init = setup, .fini = teardown, .timeout = 180);

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* One process writes the store every run trains on; launch.sh records each rank's pid. */
static void make_store(void) {
    char out[16384], sh[PATH_MAX + 64];
    int rc = mpitest_run(out, sizeof out, ENV "%s cache --model.path=" FIX "gpt2-tiny --data.tokens=" FIX "gpt2-tiny/tokens_flat.npy --data.context=4 "
                 "--model.device=cpu --cache.hooks=blocks.1.hook_resid_post --cache.out=%s/store", g_bin, g_dir);
    cr_assert_eq(rc, 0, "cache: %s", out);
    snprintf(sh, sizeof sh, "%s/launch.sh", g_dir);
    FILE *f = fopen(sh, "w");
    cr_assert(f);
    fprintf(f, "#!/bin/sh\necho $$ > %s/pid.$OMPI_COMM_WORLD_RANK\nexec %s \"$@\"\n", g_dir, g_bin);
    fclose(f);
    cr_assert_eq(chmod(sh, 0755), 0);
}

/* Starts `mpirun -np 2 launch.sh TRAIN --train.out=DIR ...` in the background, its output
 * into DIR.log; returns the shell's pid. */
static pid_t start_job(const char *name, const char *extra) {
    char cmd[8192];
    snprintf(cmd, sizeof cmd, ENV MPIRUN "-np 2 %s/launch.sh " TRAIN " --train.out=%s/%s %s >%s/%s.log 2>&1", g_dir, g_dir, g_dir,
             name, extra, g_dir, name);
    pid_t pid = fork();
    cr_assert(pid >= 0, "fork failed");
    if (pid == 0) {
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    return pid;
}

/* Waits (at most `limit` seconds) until train.out has a complete checkpoint and both ranks
 * have recorded their pids. */
static void await_checkpoint(const char *name, pid_t job, double limit) {
    char ck[PATH_MAX + 64];
    snprintf(ck, sizeof ck, "%s/%s/checkpoints", g_dir, name);
    double t0 = now_s();
    for (;;) {
        int found = 0, st;
        DIR *d = opendir(ck);
        for (struct dirent *e; d && (e = readdir(d));)
            found |= strncmp(e->d_name, "step-", 5) == 0 && !strstr(e->d_name, ".tmp");
        if (d) closedir(d);
        if (found && rank_pid(0) > 0 && rank_pid(1) > 0) return;
        cr_assert_eq(waitpid(job, &st, WNOHANG), 0, "the job ended before its first checkpoint");
        cr_assert(now_s() - t0 < limit, "no checkpoint in %s after %.0f s", ck, limit);
        usleep(20000);
    }
}

/* Waits for the job to end (killing it and failing past `limit` s); returns its exit status
 * and the seconds it took. */
static int await_end(pid_t job, double limit, double *secs) {
    double t0 = now_s();
    int st;
    while (waitpid(job, &st, WNOHANG) == 0) {
        if (now_s() - t0 > limit) {
            for (int r = 0; r < 2; r++) kill(rank_pid(r), SIGKILL);
            waitpid(job, &st, 0);
            cr_assert_fail("the job did not end within %.0f s: it hangs", limit);
        }
        usleep(20000);
    }
    *secs = now_s() - t0;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static char *log_of(const char *name) {
    char p[PATH_MAX + 64];
    snprintf(p, sizeof p, "%s/%s.log", g_dir, name);
    char *txt = lp_read_file(p, NULL);
    cr_assert(txt, "cannot read %s", p);
    return txt;
}

static int exists(const char *name, const char *file) {
    char p[PATH_MAX + 128];
    snprintf(p, sizeof p, "%s/%s/%s", g_dir, name, file);
    return access(p, F_OK) == 0;
}

static void same_file(const char *a, const char *b) {
    char pa[PATH_MAX + 128], pb[PATH_MAX + 128];
    snprintf(pa, sizeof pa, "%s/%s", g_dir, a);
    snprintf(pb, sizeof pb, "%s/%s", g_dir, b);
    size_t na, nb;
    char *x = lp_read_file(pa, &na), *y = lp_read_file(pb, &nb);
    cr_assert(x && y, "cannot read %s or %s", pa, pb);
    cr_assert(na == nb && memcmp(x, y, na) == 0, "%s and %s differ", pa, pb);
    free(x), free(y);
}

/* metrics.jsonl without its one timing field ("details/tokens_per_s", last on each line) */
static char *metrics_values(const char *name) {
    char p[PATH_MAX + 64];
    snprintf(p, sizeof p, "%s/%s/metrics.jsonl", g_dir, name);
    char *txt = lp_read_file(p, NULL);
    cr_assert(txt, "cannot read %s", p);
    char *w = txt;
    for (char *r = txt; *r;) {
        char *cut = strstr(r, ",\"details/tokens_per_s\":");
        char *nl = strchr(r, '\n');
        if (!nl) nl = r + strlen(r);
        char *end = cut && cut < nl ? cut : nl;
        memmove(w, r, (size_t)(end - r)), w += end - r;
        if (*nl) *w++ = '\n', r = nl + 1;
        else r = nl;
    }
    *w = 0;
    return txt;
}

Test(dist_fault, kill9_of_a_rank_ends_the_job_and_a_rerun_resumes_identically) {
    mpitest_need_mpi();
    make_store();
    pid_t job = start_job("killed", "--dist.timeout_s=10");
    await_checkpoint("killed", job, 90);
    cr_assert_eq(kill(rank_pid(1), SIGKILL), 0);
    double secs;
    int rc = await_end(job, 40, &secs);
    char *log = log_of("killed");
    cr_assert_neq(rc, 0, "the job exited 0 after a rank was killed: %s", log);
    cr_assert(secs < 10, "the job took %.1f s to end after the kill (dist.timeout_s=10): %s", secs, log);
    /* the launcher names the dead rank; rank 0, ended by it, says what that means */
    cr_assert(strstr(log, "process rank 1") && strstr(log, "signal 9"), "%s", log);
    cr_assert(strstr(log, "loupe: rank 0: ended by the launcher"), "%s", log);
    cr_assert(!strstr(log, "trained topk SAE"), "a summary was printed: %s", log);
    free(log);
    cr_assert(!exists("killed", "sae_weights.safetensors"), "a final SAE was left after the kill");
    cr_assert(!exists("killed", "cfg.json"), "cfg.json was left after the kill");

    /* the rerun resumes from the last checkpoint; an uninterrupted job is the reference */
    char out[1 << 16];
    rc = mpitest_run(out, sizeof out, ENV MPIRUN "-np 2 %s " TRAIN " --train.out=%s/killed --dist.timeout_s=10", g_bin, g_dir, g_dir);
    cr_assert_eq(rc, 0, "rerun: %s", out);
    cr_assert(strstr(out, "(resumed)"), "the rerun did not resume: %s", out);
    rc = mpitest_run(out, sizeof out, ENV MPIRUN "-np 2 %s " TRAIN " --train.out=%s/whole --dist.timeout_s=10", g_bin, g_dir, g_dir);
    cr_assert_eq(rc, 0, "uninterrupted run: %s", out);
    same_file("killed/sae_weights.safetensors", "whole/sae_weights.safetensors");
    same_file("killed/cfg.json", "whole/cfg.json");
    char *a = metrics_values("killed"), *b = metrics_values("whole");
    cr_assert_str_eq(a, b, "the resumed run's metrics differ from the uninterrupted run's");
    free(a), free(b);
}

Test(dist_fault, a_stopped_rank_ends_the_job_within_the_timeout) {
    mpitest_need_mpi();
    make_store();
    pid_t job = start_job("stopped", "--dist.timeout_s=3");
    await_checkpoint("stopped", job, 90);
    cr_assert_eq(kill(rank_pid(1), SIGSTOP), 0);
    double secs;
    int rc = await_end(job, 40, &secs);
    char *log = log_of("stopped");
    cr_assert_neq(rc, 0, "the job exited 0 with a rank stopped: %s", log);
    cr_assert(secs >= 2.9 && secs < 3 + 15, "the job ended %.1f s after the stop (dist.timeout_s=3): %s", secs, log);
    cr_assert(strstr(log, "loupe: rank 0: no answer from rank 1 within 3 s in all-reduce (dist.timeout_s); ending the job"), "%s", log);
    cr_assert(!strstr(log, "trained topk SAE"), "a summary was printed: %s", log);
    free(log);
    cr_assert(!exists("stopped", "sae_weights.safetensors"), "a final SAE was left");
    pid_t p1 = rank_pid(1);
    for (int i = 0; i < 100 && kill(p1, 0) == 0; i++) usleep(50000); /* the launcher reaps it */
    cr_assert_neq(kill(p1, 0), 0, "the stopped rank %ld is still there", (long)p1);
}

/* Rank 1 alone reads a store whose values are not finite (its own copy, found through a
 * relative path from another directory): it fails while rank 0 goes on into its next
 * collective. Neither waits longer than dist.timeout_s: the job ends, non-zero, with rank
 * 1's error and a timeout line. */
Test(dist_fault, a_rank_failing_alone_ends_the_job_within_the_timeout) {
    mpitest_need_mpi();
    make_store();
    char out[1 << 16], sh[PATH_MAX + 64];
    int rc = mpitest_run(out, sizeof out, "mkdir -p %s/other && cp -r %s/store %s/other/store", g_dir, g_dir, g_dir);
    cr_assert_eq(rc, 0, "%s", out);
    /* every activation of rank 1's copy becomes NaN (the bytes after the safetensors header) */
    char shard[PATH_MAX + 96];
    snprintf(shard, sizeof shard, "%s/other/store/shard-00000.safetensors", g_dir);
    size_t n;
    char *b = lp_read_file(shard, &n);
    cr_assert(b && n > 8, "cannot read %s", shard);
    uint64_t hdr;
    memcpy(&hdr, b, 8);
    for (size_t i = 8 + hdr; i + 4 <= n; i += 4) memcpy(b + i, "\xff\xff\xff\x7f", 4);
    FILE *f = fopen(shard, "wb");
    cr_assert(f && fwrite(b, 1, n, f) == n && fclose(f) == 0);
    free(b);
    snprintf(sh, sizeof sh, "%s/alone.sh", g_dir);
    f = fopen(sh, "w");
    cr_assert(f);
    fprintf(f, "#!/bin/sh\nif [ \"$OMPI_COMM_WORLD_RANK\" = 1 ]; then cd %s/other; else cd %s; fi\nexec %s \"$@\"\n", g_dir, g_dir, g_bin);
    fclose(f);
    cr_assert_eq(chmod(sh, 0755), 0);
    double t0 = now_s();
    rc = mpitest_run(out, sizeof out, ENV "timeout 60 " MPIRUN "-np 2 %s train-sae store --data.hook=blocks.1.hook_resid_post --sae.expansion_factor=2 "
             "--train.device=cpu --train.tokens=256 --train.batch_tokens=16 --train.out=%s/alone --dist.timeout_s=3", sh, g_dir);
    double secs = now_s() - t0;
    cr_assert_neq(rc, 0, "%s", out);
    cr_assert_neq(rc, 124, "the job hung: %s", out);
    cr_assert(secs < 3 + 20, "the job took %.1f s (dist.timeout_s=3): %s", secs, out);
    cr_assert(strstr(out, "loupe: rank 1: store: 'blocks.1.hook_resid_post' has a non-finite value"), "%s", out);
    cr_assert(strstr(out, "within 3 s in ") && strstr(out, "(dist.timeout_s); ending the job"), "%s", out);
    cr_assert(!exists("alone", "sae_weights.safetensors"), "a final SAE was written");
}

/* A launch script: rank 1 runs `rank1` (a shell command) first, every rank then loupe. */
static void late_script(const char *path, const char *rank1) {
    FILE *f = fopen(path, "w");
    cr_assert(f);
    fprintf(f, "#!/bin/sh\nif [ \"$OMPI_COMM_WORLD_RANK\" = 1 ]; then %s; fi\nexec %s \"$@\"\n", rank1, g_bin);
    fclose(f);
    cr_assert_eq(chmod(path, 0755), 0);
}

/* Rank 1 never arrives (it sleeps instead of starting loupe): rank 0, inside MPI's start,
 * gives up after dist.start_timeout_s with one line and the launcher ends the job. Without
 * the watchdog rank 0 waits in MPI_Init_thread for ever (the outer timeout of 60 s says so). */
Test(dist_fault, a_rank_that_never_starts_ends_the_job_within_the_start_timeout) {
    mpitest_need_mpi();
    char out[1 << 16], sh[PATH_MAX + 64];
    snprintf(sh, sizeof sh, "%s/never.sh", g_dir);
    late_script(sh, "exec sleep 120");
    double t0 = now_s();
    int rc = mpitest_run(out, sizeof out, ENV "timeout 60 " MPIRUN "-np 2 %s info " FIX "gpt2-tiny --dist.tp=2 --dist.start_timeout_s=3", sh);
    double secs = now_s() - t0;
    cr_assert_neq(rc, 124, "the job hung in its start: %s", out);
    cr_assert_neq(rc, 0, "%s", out);
    cr_assert(secs >= 2.9 && secs < 3 + 15, "the job took %.1f s (dist.start_timeout_s=3): %s", secs, out);
    cr_assert(strstr(out, "loupe: rank 0: the job did not start within 3 s (dist.start_timeout_s): not every rank joined it"), "%s", out);
    cr_assert(!strstr(out, "hook points"), "the command ran: %s", out);
}

/* A rank that arrives late but within the start timeout: the job runs as usual. */
Test(dist_fault, a_rank_arriving_late_within_the_start_timeout_is_waited_for) {
    mpitest_need_mpi();
    char out[1 << 16], sh[PATH_MAX + 64];
    snprintf(sh, sizeof sh, "%s/late.sh", g_dir);
    late_script(sh, "sleep 2");
    int rc = mpitest_run(out, sizeof out, ENV "timeout 60 " MPIRUN "-np 2 %s info " FIX "gpt2-tiny --dist.tp=2 --dist.timeout_s=1 "
                         "--dist.start_timeout_s=30", sh);
    cr_assert_eq(rc, 0, "%s", out);
    cr_assert(strstr(out, "hook points (40)"), "%s", out);
}

/* dist.tp_parts outside 0..8 (one started all-reduce per part; 0: chosen per forward):
 * refused by name, exit 2 */
Test(dist_fault, a_bad_tp_parts_is_refused) {
    static const char *const bad[] = {"9", "-1", "two", "1.5"};
    char out[16384];
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        int rc = mpitest_run(out, sizeof out, "%s info " FIX "gpt2-tiny --dist.tp_parts=%s", g_bin, bad[i]);
        cr_expect_eq(rc, 2, "dist.tp_parts=%s: exit %d: %s", bad[i], rc, out);
        cr_expect(strstr(out, "dist.tp_parts"), "dist.tp_parts=%s: %s", bad[i], out);
        cr_expect(!strstr(out, "hook points"), "dist.tp_parts=%s: the command ran: %s", bad[i], out);
    }
    int rc = mpitest_run(out, sizeof out, "%s info " FIX "gpt2-tiny --dist.tp_parts=4", g_bin);
    cr_expect_eq(rc, 0, "dist.tp_parts=4: %s", out);
}

/* not a positive finite number of seconds: refused by name, exit 2, before any work */
Test(dist_fault, a_bad_timeout_is_refused) {
    static const char *const bad[][2] = {{"0", "dist.timeout_s = 0: must be more than 0 seconds"},
                                         {"-1", "dist.timeout_s = -1 is outside"},
                                         {"inf", "dist.timeout_s = inf is outside"},
                                         {"nan", "dist.timeout_s = 'nan' is not a number"},
                                         {"soon", "dist.timeout_s = 'soon' is not a number"},
                                         {"0", "dist.start_timeout_s = 0: must be more than 0 seconds"},
                                         {"inf", "dist.start_timeout_s = inf is outside"}};
    char out[16384];
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        const char *key = strncmp(bad[i][1], "dist.start", 10) == 0 ? "start_timeout_s" : "timeout_s";
        int rc = mpitest_run(out, sizeof out, "%s info " FIX "gpt2-tiny --dist.%s=%s", g_bin, key, bad[i][0]);
        cr_expect_eq(rc, 2, "dist.%s=%s: exit %d: %s", key, bad[i][0], rc, out);
        cr_expect(strstr(out, bad[i][1]), "dist.%s=%s: %s", key, bad[i][0], out);
        cr_expect(!strstr(out, "hook points"), "dist.%s=%s: the command ran: %s", key, bad[i][0], out);
    }
    int rc = mpitest_run(out, sizeof out, "%s info " FIX "gpt2-tiny --dist.timeout_s=0.5", g_bin);
    cr_expect_eq(rc, 0, "dist.timeout_s=0.5: %s", out);
}
