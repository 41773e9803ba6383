/* test_dist_srun: loupe launched by Slurm's srun, as on a cluster: the ranks come from PMIx
 * through OpenMPI, on a throwaway one-node Slurm that scripts/slurm-local.sh starts and stops.
 *
 *  - `srun -n 2 --mpi=pmix loupe cache` (data-parallel) writes the store of one process and of
 *    `mpirun -np 2`, byte for byte, and rank 0 alone prints;
 *  - a rank started with other settings (chosen by SLURM_PROCID) is refused by its rank
 *    number: the ranks are one world of 2, numbered as Slurm numbers its tasks;
 *  - a rank that never starts loupe: the job ends within dist.start_timeout_s.
 * Skipped, saying why, without MPI in the build, without Slurm (slurm-wlm and munge; CI has
 * neither) or when not root (slurmd starts the tasks). A Slurm that is installed but does not
 * start fails the test, with the daemons' logs.
 *
 * Without Slurm: launcher variables that MPI does not see (srun's SLURM_STEP_NUM_TASKS=2 in
 * a process MPI started alone, as `srun --mpi=none` leaves it) are refused, exit 2, instead
 * of every process running the whole job as rank 0. */
#include <criterion/criterion.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loupe/dist.h"
#include "loupe/output.h"
#include "mpitest.h"

#define FIX "tests/fixtures/"
#define ENV "OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 "
/* 8 sequences of 4 tokens in shards of 3 and batches of 2 (as test_dist_data) */
#define ARGS "cache --model.path=" FIX "gpt2-tiny --data.tokens=" FIX "gpt2-tiny/tokens_flat.npy --data.context=4 --model.device=cpu " \
             "--cache.hooks=blocks.*.hook_resid_post,blocks.0.attn.hook_pattern,blocks.1.mlp.hook_post " \
             "--cache.shard_sequences=3 --cache.batch=2"
/* the srun jobs, run by one scripts/slurm-local.sh (a start of Slurm costs seconds): each
 * job's output into NAME.log, its exit status into NAME.rc, its seconds into NAME.s */
#define JOBS                                                                                                         \
    "job() { n=$1; shift; t0=$EPOCHREALTIME; \"$@\" >\"$D/$n.log\" 2>&1; echo $? >\"$D/$n.rc\";\n"                    \
    "  awk \"BEGIN { print $EPOCHREALTIME - $t0 }\" >\"$D/$n.s\"; }\n"                                                           \
    "job cache srun -n 2 --mpi=pmix \"$BIN\" " ARGS " --cache.out=\"$D/srun\"\n"                                      \
    "job other srun -n 2 --mpi=pmix --kill-on-bad-exit=1 \"$D/other.sh\" " ARGS " --cache.out=\"$D/other\"\n"        \
    "job never srun -n 2 --mpi=pmix --kill-on-bad-exit=1 \"$D/never.sh\" info " FIX "gpt2-tiny --dist.tp=2 "        \
    "--dist.start_timeout_s=3\n"

static char g_bin[PATH_MAX + 16], g_dir[] = "/tmp/loupe-distsrun-XXXXXX";

static void setup(void) {
    mpitest_paths(g_bin, sizeof g_bin, g_dir);
}

static void teardown(void) {
    mpitest_remove(g_dir);
}

TestSuite(dist_srun, .init = setup, .fini = teardown, .timeout = 240);

/* Skips, saying why, where no local Slurm can be started. */
static void need_slurm(void) {
    mpitest_need_mpi();
    if (system("for b in srun sinfo scancel slurmctld slurmd munged mungekey; do command -v $b >/dev/null 2>&1 || "
               "test -x /usr/sbin/$b || exit 1; done") != 0)
        cr_skip_test("Slurm is not installed (apt-get install slurm-wlm munge): the srun launch is not tried");
    if (geteuid() != 0) cr_skip_test("not root: a local Slurm's slurmd starts the tasks as root");
}

static void write_script(const char *name, const char *body) {
    char p[PATH_MAX + 64];
    snprintf(p, sizeof p, "%s/%s", g_dir, name);
    FILE *f = fopen(p, "w");
    cr_assert(f, "cannot write %s", p);
    fputs(body, f);
    cr_assert_eq(fclose(f), 0);
    cr_assert_eq(chmod(p, 0755), 0);
}

static char *read_in(const char *name) {
    char p[PATH_MAX + 64];
    snprintf(p, sizeof p, "%s/%s", g_dir, name);
    char *txt = lp_read_file(p, NULL);
    cr_assert(txt, "cannot read %s", p);
    return txt;
}

static int rc_of(const char *job) {
    char n[64];
    snprintf(n, sizeof n, "%s.rc", job);
    char *t = read_in(n);
    int rc = atoi(t);
    free(t);
    return rc;
}

static double secs_of(const char *job) {
    char n[64];
    snprintf(n, sizeof n, "%s.s", job);
    char *t = read_in(n);
    double s = atof(t);
    free(t);
    return s;
}

static void same_store(const char *a, const char *b) {
    static const char *const files[] = {"meta.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors", NULL};
    for (int i = 0; files[i]; i++) {
        char pa[PATH_MAX + 96], pb[PATH_MAX + 96];
        snprintf(pa, sizeof pa, "%s/%s/%s", g_dir, a, files[i]);
        snprintf(pb, sizeof pb, "%s/%s/%s", g_dir, b, files[i]);
        size_t na, nb;
        char *x = lp_read_file(pa, &na), *y = lp_read_file(pb, &nb);
        cr_assert(x && y, "cannot read %s or %s", pa, pb);
        cr_assert(na == nb && memcmp(x, y, na) == 0, "%s and %s differ", pa, pb);
        free(x), free(y);
    }
}

static int count(const char *hay, const char *needle) {
    int n = 0;
    for (const char *p = hay; (p = strstr(p, needle)); p += strlen(needle)) n++;
    return n;
}

Test(dist_srun, srun_launches_the_ranks_as_mpirun_does) {
    need_slurm();
    char out[1 << 16], body[3 * PATH_MAX + 4096];
    /* the references: one process, and mpirun's two ranks */
    int rc = mpitest_run(out, sizeof out, ENV "%s " ARGS " --cache.out=%s/one", g_bin, g_dir);
    cr_assert_eq(rc, 0, "one process: %s", out);
    rc = mpitest_run(out, sizeof out, ENV "timeout 120 " MPIRUN "-np 2 %s " ARGS " --cache.out=%s/mpi", g_bin, g_dir);
    cr_assert_eq(rc, 0, "mpirun: %s", out);
    snprintf(body, sizeof body, "#!/bin/sh\nif [ \"$SLURM_PROCID\" = 1 ]; then exec %s \"$@\" --cache.batch=3; fi\nexec %s \"$@\"\n", g_bin, g_bin);
    write_script("other.sh", body);
    snprintf(body, sizeof body, "#!/bin/sh\nif [ \"$SLURM_PROCID\" = 1 ]; then exec sleep 120; fi\nexec %s \"$@\"\n", g_bin);
    write_script("never.sh", body);
    /* ASAN_OPTIONS: as MPIRUN sets it for mpirun's ranks (mpitest.h) */
    snprintf(body, sizeof body, "#!/bin/bash\nD=%s BIN=%s\nexport ASAN_OPTIONS=detect_leaks=0\n%s", g_dir, g_bin, JOBS);
    write_script("jobs.sh", body);
    rc = mpitest_run(out, sizeof out, ENV "timeout 200 scripts/slurm-local.sh %s/jobs.sh", g_dir);
    cr_assert_eq(rc, 0, "scripts/slurm-local.sh (a local Slurm did not start or run the jobs): %s", out);

    char *log = read_in("cache.log");
    cr_assert_eq(rc_of("cache"), 0, "srun cache: %s", log);
    /* one world of 2: rank 0 alone prints (two worlds of one would each print, and lock) */
    cr_assert_eq(count(log, "cached 4 hooks for 8 sequences (32 tokens)"), 1, "%s", log);
    free(log);
    same_store("one", "srun");
    same_store("mpi", "srun");

    log = read_in("other.log");
    cr_assert_eq(rc_of("other"), 2, "other settings on rank 1: %s", log);
    cr_assert(strstr(log, "loupe: rank 0: rank 1 was started with other settings than rank 0"), "%s", log);
    cr_assert(strstr(log, "loupe: rank 1: rank 1 was started with other settings than rank 0"), "%s", log);
    free(log);

    log = read_in("never.log");
    double s = secs_of("never");
    cr_assert_neq(rc_of("never"), 0, "a rank never started: %s", log);
    cr_assert(s >= 2.9 && s < 3 + 15, "the job took %.1f s (dist.start_timeout_s=3): %s", s, log);
    cr_assert(strstr(log, "loupe: rank 0: the job did not start within 3 s (dist.start_timeout_s)"), "%s", log);
    free(log);
}

Test(dist_srun, launcher_variables_mpi_does_not_see_are_refused) {
    mpitest_need_mpi();
    char out[16384];
    /* srun's variables without srun (nor a Slurm job, whose variables OpenMPI would act on) */
    int rc = mpitest_run(out, sizeof out, "env -u SLURM_JOBID -u SLURM_JOB_ID -u SLURM_STEP_ID -u SLURM_STEPID -u OMPI_COMM_WORLD_SIZE "
                         "-u PMI_SIZE -u PMIX_RANK SLURM_STEP_NUM_TASKS=2 SLURM_PROCID=1 ASAN_OPTIONS=detect_leaks=0 %s info " FIX "gpt2-tiny", g_bin);
    cr_assert_eq(rc, 2, "%s", out);
    cr_assert(strstr(out, "loupe: rank 1: dist: the launcher started 2 processes (SLURM_STEP_NUM_TASKS), but MPI sees a world of 1"),
              "%s", out);
    cr_assert(!strstr(out, "hook points"), "the command ran as a world of one: %s", out);
}
