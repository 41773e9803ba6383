/* test_dist_sweep: `loupe attribute` and `loupe patch` under mpirun.
 *
 * Data parallelism: the output directory written by 2 (and 3) data-parallel ranks is the
 * single process's, byte for byte (job.json, results.jsonl, every scores file): attribution
 * patching with integrated gradients and SAE-latent nodes, and exact patching with its
 * AtP comparison; a DP run resumes an output whose last results were lost (a torn line, a
 * scores file whose lines never arrived) and ends identical again, as does a DP=2 run whose
 * rank 0 (the writer) is killed with SIGKILL mid-sweep.
 * Tensor parallelism: at TP=2 and TP=4, on GPT-2 and Llama with GQA, every score tensor of
 * attribute and patch within 1e-5 of its largest value of the single process's, and the
 * metrics too; DP=2 x TP=2 on 4 ranks the same, and byte for byte the TP=2 run's.
 * The sweeps between components (attrib.edges, patch.kind = path) at DP=2 and DP=3: one
 * process's bytes, the circuit files too, and a resume after lost results the same.
 * Refusals end every rank, none hangs: an output rank 0 cannot open, and the sweeps
 * between components at dist.tp=2.
 * Every run uses one BLAS thread (a multi-threaded GEMM sums in another order).
 * Skipped, saying why, without MPI in the build or mpirun on the PATH. */
#include <criterion/criterion.h>
#include <cjson/cJSON.h>
#include <dirent.h>
#include <libgen.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "loupe/dist.h"
#include "loupe/output.h"
#include "loupe/safetensors.h"
#include "mpitest.h"

#define FIX "tests/fixtures/"
#define ENV "OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 "

static char g_bin[PATH_MAX + 16], g_dir[] = "/tmp/loupe-distsweep-XXXXXX", g_pairs[PATH_MAX + 32];

/* Prompts of 6 and 4 tokens mixed, so that with batches of 2 the batches have 1 and 2 pairs
 * and some rounds leave a rank without one. */
static void write_pairs(void) {
    static const char *const lines[] = {
        "{\"clean\": [1, 2, 3, 4, 5, 6], \"corrupted\": [1, 2, 9, 4, 5, 6], \"answer\": 7, \"wrong_answer\": 8}",
        "{\"clean\": [10, 11, 12, 13], \"corrupted\": [10, 14, 12, 13], \"answer\": [15], \"wrong_answer\": [16]}",
        "{\"clean\": [20, 21, 22, 23, 24, 25], \"corrupted\": [20, 21, 30, 23, 24, 25], \"answer\": 7, \"wrong_answer\": 8}",
        "{\"clean\": [30, 31, 32, 33, 34, 35], \"corrupted\": [30, 31, 40, 33, 34, 35], \"answer\": 9, \"wrong_answer\": 4}",
        "{\"clean\": [5, 6, 7, 8, 9, 10], \"corrupted\": [5, 6, 7, 80, 9, 10], \"answer\": 19, \"wrong_answer\": 14}",
        "{\"clean\": [40, 41, 42, 43], \"corrupted\": [40, 44, 42, 43], \"answer\": [15], \"wrong_answer\": [16]}",
        "{\"clean\": [50, 51, 52, 53], \"corrupted\": [50, 54, 52, 53], \"answer\": [25], \"wrong_answer\": [26]}",
        NULL};
    snprintf(g_pairs, sizeof g_pairs, "%s/pairs.jsonl", g_dir);
    FILE *f = fopen(g_pairs, "w");
    cr_assert(f);
    for (int i = 0; lines[i]; i++) fprintf(f, "%s\n", lines[i]);
    fclose(f);
}

/* build/loupe beside this test binary, a scratch directory and the pairs; skips when MPI
 * cannot run. */
static void setup(void) {
    mpitest_need_mpi();
    mpitest_paths(g_bin, sizeof g_bin, g_dir);
    write_pairs();
}

static void teardown(void) {
    mpitest_remove(g_dir);
}

static char *path_in(const char *sub) {
    static char buf[4][PATH_MAX + 64];
    static int i;
    i = (i + 1) % 4;
    snprintf(buf[i], sizeof buf[i], "%s/%s", g_dir, sub);
    return buf[i];
}

/* The files of an output directory (not its lock), sorted; returns how many. */
static int list_dir(const char *dir, char names[][64], int max) {
    DIR *d = opendir(dir);
    cr_assert(d, "cannot list %s", dir);
    struct dirent *e;
    int n = 0;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.' && n < max) snprintf(names[n++], 64, "%.63s", e->d_name);
    closedir(d);
    qsort(names, n, 64, (int (*)(const void *, const void *))strcmp);
    return n;
}

/* Both directories hold the same files; each compared by `same`. */
static int same_files(const char *ref, const char *dir, void (*same)(const char *, const char *)) {
    char a[64][64], b[64][64], pa[PATH_MAX + 80], pb[PATH_MAX + 80];
    int na = list_dir(ref, a, 64), nb = list_dir(dir, b, 64);
    cr_assert_eq(na, nb, "%s has %d files, %s %d", ref, na, dir, nb);
    for (int i = 0; i < na; i++) {
        cr_assert_str_eq(a[i], b[i], "%s and %s hold other files", ref, dir);
        snprintf(pa, sizeof pa, "%s/%s", ref, a[i]);
        snprintf(pb, sizeof pb, "%s/%s", dir, b[i]);
        same(pa, pb);
    }
    return na;
}

static void same_bytes(const char *a, const char *b) {
    size_t na, nb;
    char *x = lp_read_file(a, &na), *y = lp_read_file(b, &nb);
    cr_assert(x && y, "cannot read %s or %s", a, b);
    cr_assert(na == nb && memcmp(x, y, na) == 0, "%s and %s differ", a, b);
    free(x), free(y);
}

/* The metrics of each pair of a reference output (by pair index): an exact-patching score
 * is the difference of two metrics, so its rounding is that of the metrics, not of itself. */
static double g_metric[16];

static void read_metrics(const char *dir) {
    char path[PATH_MAX + 96], *save = NULL;
    snprintf(path, sizeof path, "%s/results.jsonl", dir);
    char *txt = lp_read_file(path, NULL);
    cr_assert(txt, "cannot read %s", path);
    memset(g_metric, 0, sizeof g_metric);
    for (char *l = strtok_r(txt, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
        cJSON *j = cJSON_Parse(l);
        int ix = cJSON_GetObjectItem(j, "index")->valueint;
        cr_assert(ix >= 0 && ix < 16);
        g_metric[ix] = fmax(fabs(cJSON_GetObjectItem(j, "clean_metric")->valuedouble), fabs(cJSON_GetObjectItem(j, "corrupted_metric")->valuedouble));
        cJSON_Delete(j);
    }
    free(txt);
}

/* Scores files: the same tensors, each within 1e-5 of its largest value (exact patching's:
 * of its largest value or its pair's metrics, whichever is larger); results.jsonl: the same
 * pairs with metrics within 1e-5 (the top lists may order near-ties otherwise). */
static void same_scores(const char *a, const char *b) {
    size_t n = strlen(a);
    if (n > 12 && strcmp(a + n - 12, ".safetensors") == 0) {
        lp_st_file fa, fb;
        cr_assert_eq(lp_st_open(&fa, a), LP_OK, "%s", lp_last_error());
        cr_assert_eq(lp_st_open(&fb, b), LP_OK, "%s", lp_last_error());
        cr_assert_eq(fa.n, fb.n, "%s and %s hold other tensors", a, b);
        for (int i = 0; i < fa.n; i++) {
            const lp_st_tensor *x = &fa.tensors[i], *y = lp_st_find(&fb, x->name);
            cr_assert(y && y->nbytes == x->nbytes, "%s: %s missing or of another size", b, x->name);
            const float *u = x->data, *v = y->data;
            double err = 0, big = 0;
            for (size_t j = 0; j < x->nbytes / 4; j++) err = fmax(err, fabs((double)u[j] - v[j])), big = fmax(big, fabs(u[j]));
            int ix;
            if (strstr(x->name, ".exact.") && sscanf(x->name, "pair%d.", &ix) == 1 && ix >= 0 && ix < 16) big = fmax(big, g_metric[ix]);
            cr_assert(err <= 1e-5 * (big > 0 ? big : 1), "%s %s: max difference %.3g against a largest value %.3g", b, x->name, err, big);
        }
        lp_st_close(&fa), lp_st_close(&fb);
    } else if (strstr(a, "results.jsonl")) {
        char *x = lp_read_file(a, NULL), *y = lp_read_file(b, NULL), *sa = NULL, *sb = NULL;
        cr_assert(x && y);
        int lines = 0;
        for (char *la = strtok_r(x, "\n", &sa), *lb = strtok_r(y, "\n", &sb); la || lb; la = strtok_r(NULL, "\n", &sa), lb = strtok_r(NULL, "\n", &sb)) {
            cr_assert(la && lb, "%s and %s have other numbers of lines", a, b);
            cJSON *ja = cJSON_Parse(la), *jb = cJSON_Parse(lb);
            static const char *const keys[] = {"index", "line", "clean_metric", "corrupted_metric", NULL};
            for (int k = 0; keys[k]; k++) {
                double p = cJSON_GetObjectItem(ja, keys[k])->valuedouble, q = cJSON_GetObjectItem(jb, keys[k])->valuedouble;
                cr_assert(fabs(p - q) <= 1e-5 * fmax(1, fabs(p)), "%s line %d: %s %.9g against %.9g", b, lines + 1, keys[k], q, p);
            }
            cJSON_Delete(ja), cJSON_Delete(jb);
            lines++;
        }
        cr_assert_eq(lines, 7, "%s: %d result lines", b, lines);
        free(x), free(y);
    } else {
        same_bytes(a, b); /* job.json: the settings, the same whatever the ranks */
    }
}

TestSuite(dist_sweep, .init = setup, .fini = teardown, .timeout = 240);

/* ---- data parallelism: byte for byte the single process's output ---- */

#define ATTRIB "attribute --model.path=" FIX "gpt2-tiny --model.device=cpu --attrib.batch=2 --attrib.ig_steps=3 --attrib.ig_batch=2 --attrib.top=8"

static void train_sae(void) {
    char out[16384];
    int rc = mpitest_run(out, sizeof out, ENV "%s train-sae --model.path=" FIX "gpt2-tiny --model.device=cpu --tokens " FIX "gpt2-tiny/tokens.npy "
                 "--data.hook=blocks.0.hook_resid_post --train.out=%s --sae.d_sae=96 --sae.k=8 --train.tokens=1024",
                 g_bin, path_in("sae"));
    cr_assert_eq(rc, 0, "train-sae: %s", out);
}

Test(dist_sweep, attribute_dp_is_the_single_process_output) {
    char out[16384];
    train_sae();
    int rc = mpitest_run(out, sizeof out, ENV "%s " ATTRIB " --attrib.sae=%s --attrib.pairs=%s --attrib.out=%s", g_bin, path_in("sae"), g_pairs, path_in("one"));
    cr_assert_eq(rc, 0, "one process: %s", out);
    for (int np = 2; np <= 3; np++) {
        char dir[32];
        snprintf(dir, sizeof dir, "dp%d", np);
        rc = mpitest_run(out, sizeof out, ENV MPIRUN "-np %d %s " ATTRIB " --attrib.sae=%s --attrib.pairs=%s --attrib.out=%s", np, g_bin, path_in("sae"),
                 g_pairs, path_in(dir));
        cr_assert_eq(rc, 0, "mpirun -np %d: %s", np, out);
        cr_assert(strstr(out, "attribute: 7 pairs done (0 already in"), "%s", out);
        int n = same_files(path_in("one"), path_in(dir), same_bytes);
        cr_assert_eq(n, 7, "job.json, results.jsonl and 5 scores files, not %d files", n);
    }
    char *res = lp_read_file(path_in("dp2/results.jsonl"), NULL);
    cr_assert(res && strstr(res, "\"sae_top\":[{"), "no SAE latents in the results: %s", res ? res : "");
    free(res);
}

#define PATCH "patch --model.path=" FIX "llama-tiny --model.device=cpu --attrib.nodes=hook_resid_pre,attn.hook_z,attn.hook_v,attn.hook_pattern"

/* The lines after the first of a summary (the AtP-vs-exact correlations). */
static const char *after_first_line(const char *s) {
    const char *p = strstr(s, "patch: 7 pairs done");
    cr_assert(p, "%s", s);
    return strchr(p, '\n');
}

Test(dist_sweep, patch_dp2_is_the_single_process_output) {
    char out[16384], one[16384];
    int rc = mpitest_run(one, sizeof one, ENV "%s " PATCH " --attrib.pairs=%s --attrib.out=%s", g_bin, g_pairs, path_in("one"));
    cr_assert_eq(rc, 0, "one process: %s", one);
    rc = mpitest_run(out, sizeof out, ENV MPIRUN "-np 2 %s " PATCH " --attrib.pairs=%s --attrib.out=%s", g_bin, g_pairs, path_in("dp2"));
    cr_assert_eq(rc, 0, "mpirun -np 2: %s", out);
    int n = same_files(path_in("one"), path_in("dp2"), same_bytes);
    cr_assert_eq(n, 16, "job.json, results.jsonl and 7 exact and 7 AtP scores files, not %d files", n);
    /* rank 0 sums the correlations in pair order: the same means */
    cr_assert_str_eq(after_first_line(out), after_first_line(one));
    cr_assert(strstr(out, "attn.hook_z          attribution vs exact patching: Pearson"), "%s", out);
}

/* A run killed after a batch's scores file was renamed into place but before all its lines
 * were appended, mid-line: results.jsonl keeps its first `keep` lines and half the next. */
static void lose_results(const char *dir, int keep) {
    char path[PATH_MAX + 96];
    snprintf(path, sizeof path, "%s/results.jsonl", dir);
    size_t n;
    char *res = lp_read_file(path, &n), *p = res;
    cr_assert(res);
    for (int i = 0; i < keep; i++) p = strchr(p, '\n') + 1;
    size_t cut = (size_t)(p - res) + (size_t)(strchr(p, '\n') - p) / 2;
    FILE *f = fopen(path, "w");
    cr_assert(f);
    fwrite(res, 1, cut, f);
    fclose(f);
    free(res);
}

/* The restart under DP=2 cuts the torn line, drops or cuts the scores files of pairs whose
 * lines never arrived, and recomputes them. With whole batches lost (batches [0] [1] [2,3]
 * [4] [5,6]; 4 lines kept) it ends with the uninterrupted run's bytes; with a batch cut in
 * two (3 lines kept: pair 3 is batched anew with pair 4) with the bytes of one process
 * resuming the same loss. */
Test(dist_sweep, dp2_resumes_lost_results_as_one_process_does) {
    char out[16384];
    int rc = mpitest_run(out, sizeof out, ENV "%s " ATTRIB " --attrib.pairs=%s --attrib.out=%s", g_bin, g_pairs, path_in("one"));
    cr_assert_eq(rc, 0, "one process: %s", out);
    rc = mpitest_run(out, sizeof out, ENV MPIRUN "-np 2 %s " ATTRIB " --attrib.pairs=%s --attrib.out=%s", g_bin, g_pairs, path_in("dp2"));
    cr_assert_eq(rc, 0, "mpirun -np 2: %s", out);
    lose_results(path_in("dp2"), 4);
    rc = mpitest_run(out, sizeof out, ENV MPIRUN "-np 2 %s " ATTRIB " --attrib.pairs=%s --attrib.out=%s", g_bin, g_pairs, path_in("dp2"));
    cr_assert_eq(rc, 0, "mpirun -np 2 (resume): %s", out);
    cr_assert(strstr(out, "cut an incomplete last line"), "%s", out);
    cr_assert(strstr(out, "attribute: 3 pairs done (4 already in"), "%s", out);
    same_files(path_in("one"), path_in("dp2"), same_bytes);

    lose_results(path_in("dp2"), 3);
    lose_results(path_in("one"), 3);
    rc = mpitest_run(out, sizeof out, ENV "%s " ATTRIB " --attrib.pairs=%s --attrib.out=%s", g_bin, g_pairs, path_in("one"));
    cr_assert_eq(rc, 0, "one process (resume): %s", out);
    rc = mpitest_run(out, sizeof out, ENV MPIRUN "-np 2 %s " ATTRIB " --attrib.pairs=%s --attrib.out=%s", g_bin, g_pairs, path_in("dp2"));
    cr_assert_eq(rc, 0, "mpirun -np 2 (resume): %s", out);
    cr_assert(strstr(out, "attribute: 4 pairs done (3 already in"), "%s", out);
    int n = same_files(path_in("one"), path_in("dp2"), same_bytes);
    cr_assert_eq(n, 7, "job.json, results.jsonl and scores files of batches [0] [1] [2] [3,4] [5,6]: not %d files", n);
}

/* kill -9 of rank 0 (the writer) mid-sweep: mpirun ends the job; what is in results.jsonl
 * is whole batches (each batch's lines are one write, after its scores file), and a DP=2
 * restart ends with the uninterrupted single process's bytes. */
#define KILLED "attribute --model.path=" FIX "llama-tiny --model.device=cpu --attrib.batch=2 --attrib.ig_steps=16 --attrib.ig_batch=4"

static int count_lines(const char *path) {
    size_t n = 0;
    char *t = lp_read_file(path, &n);
    int k = 0;
    for (size_t i = 0; t && i < n; i++) k += t[i] == '\n';
    free(t);
    return k;
}

static long read_pid(const char *path) {
    char *t = lp_read_file(path, NULL);
    long pid = t ? atol(t) : 0;
    free(t);
    return pid;
}

/* Running (a zombie no reaper collected counts as ended). */
static int alive(long pid) {
    char path[64], st[256];
    if (kill((pid_t)pid, 0) != 0) return 0;
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    size_t n = fread(st, 1, sizeof st - 1, f);
    fclose(f);
    st[n] = 0;
    const char *e = strrchr(st, ')'); /* "pid (name) S ..." */
    return !(e && e[1] == ' ' && e[2] == 'Z');
}

Test(dist_sweep, dp2_killed_mid_sweep_resumes_to_the_same_output) {
    char out[16384], big[PATH_MAX + 64];
    snprintf(big, sizeof big, "%s/big.jsonl", g_dir);
    FILE *f = fopen(big, "w");
    cr_assert(f);
    for (int i = 0; i < 200; i++) { /* 200 pairs of 6 tokens: 100 batches of 2 */
        int c[6];
        for (int t = 0; t < 6; t++) c[t] = 1 + (i * 37 + t * 101) % 900;
        fprintf(f, "{\"clean\": [%d, %d, %d, %d, %d, %d], \"corrupted\": [%d, %d, %d, %d, %d, %d], \"answer\": %d, \"wrong_answer\": %d}\n",
                c[0], c[1], c[2], c[3], c[4], c[5], c[0], c[1], (c[2] + 17) % 900, c[3], c[4], c[5], i % 900, (i * 7 + 3) % 900);
    }
    fclose(f);
    int rc = mpitest_run(out, sizeof out, ENV "%s " KILLED " --attrib.pairs=%s --attrib.out=%s", g_bin, big, path_in("one"));
    cr_assert_eq(rc, 0, "one process: %s", out);
    /* each rank records its pid; mpirun runs in the background */
    f = fopen(path_in("rank.sh"), "w");
    cr_assert(f);
    fprintf(f, "#!/bin/sh\necho $$ > %s/pid.$OMPI_COMM_WORLD_RANK\nexec %s " KILLED " --attrib.pairs=%s --attrib.out=%s\n", g_dir, g_bin, big,
            path_in("dp2"));
    fclose(f);
    cr_assert_eq(chmod(path_in("rank.sh"), 0755), 0);
    char cmd[8192];
    snprintf(cmd, sizeof cmd, ENV MPIRUN "-np 2 %s > %s/mpirun.log 2>&1 & echo $! > %s/mpirun.pid", path_in("rank.sh"), g_dir, g_dir);
    cr_assert_eq(system(cmd), 0);
    long mp = 0;
    for (int i = 0; i < 100 && !mp; i++) mp = read_pid(path_in("mpirun.pid")), usleep(10000);
    cr_assert_gt(mp, 0, "mpirun did not start");
    /* the first results are in: kill the writer */
    int lines = 0;
    for (int i = 0; i < 6000 && lines < 10; i++) lines = count_lines(path_in("dp2/results.jsonl")), usleep(10000);
    long r0 = read_pid(path_in("pid.0"));
    cr_assert(lines >= 10 && r0 > 0, "the run wrote %d lines in 60 s", lines);
    kill((pid_t)r0, SIGKILL);
    for (int i = 0; i < 6000 && alive(mp); i++) usleep(10000);
    cr_assert(!alive(mp), "mpirun still runs 60 s after its rank 0 was killed");
    int left = count_lines(path_in("dp2/results.jsonl"));
    cr_assert(left < 200, "the run ended before the kill (%d lines)", left);
    cr_assert(left % 2 == 0, "%d lines: a batch of 2 half written", left);
    rc = mpitest_run(out, sizeof out, ENV MPIRUN "-np 2 %s " KILLED " --attrib.pairs=%s --attrib.out=%s", g_bin, big, path_in("dp2"));
    cr_assert_eq(rc, 0, "mpirun -np 2 (resume): %s", out);
    char want[96];
    snprintf(want, sizeof want, "attribute: %d pairs done (%d already in", 200 - left, left);
    cr_assert(strstr(out, want), "%s", out);
    same_files(path_in("one"), path_in("dp2"), same_bytes);
    printf("  kill -9 of rank 0 with %d of 200 results written; the DP=2 restart did the other %d, byte for byte one process's output\n", left,
           200 - left);
}

/* ---- tensor parallelism: within 1e-5 of one process ---- */

static void tp_matches(const char *cmd, const char *model, int np, int dp) {
    char out[16384], one[64], split[64];
    const char *m = strrchr(model, '/') + 1;
    snprintf(one, sizeof one, "%s-%s-one", cmd, m);
    snprintf(split, sizeof split, "%s-%s-tp%d-dp%d", cmd, m, np / dp, dp);
    const char *extra = strcmp(cmd, "patch") == 0 ? "--attrib.nodes=hook_resid_mid,attn.hook_z,attn.hook_k,attn.hook_pattern"
                                                  : "--attrib.batch=2 --attrib.ig_steps=2";
    if (access(path_in(one), F_OK) != 0) {
        int rc = mpitest_run(out, sizeof out, ENV "%s %s --model.path=%s --model.device=cpu %s --attrib.pairs=%s --attrib.out=%s", g_bin, cmd, model, extra,
                     g_pairs, path_in(one));
        cr_assert_eq(rc, 0, "one process: %s", out);
    }
    int rc = mpitest_run(out, sizeof out, ENV MPIRUN "-np %d %s %s --model.path=%s --model.device=cpu %s --attrib.pairs=%s --attrib.out=%s --dist.tp=%d",
                 np, g_bin, cmd, model, extra, g_pairs, path_in(split), np / dp);
    cr_assert_eq(rc, 0, "mpirun -np %d, dist.tp=%d: %s", np, np / dp, out);
    cr_assert(strstr(out, "7 pairs done (0 already in"), "%s", out);
    read_metrics(path_in(one));
    same_files(path_in(one), path_in(split), same_scores);
}

Test(dist_sweep, attribute_tp2_tp4_match_one_process) {
    static const char *const models[] = {FIX "gpt2-tiny", FIX "llama-tiny"};
    for (int i = 0; i < 2; i++) tp_matches("attribute", models[i], 2, 1), tp_matches("attribute", models[i], 4, 1);
}

Test(dist_sweep, patch_tp2_tp4_match_one_process) {
    static const char *const models[] = {FIX "gpt2-tiny", FIX "llama-tiny"};
    for (int i = 0; i < 2; i++) tp_matches("patch", models[i], 2, 1), tp_matches("patch", models[i], 4, 1);
}

/* 4 ranks: two TP groups of 2, each its share of the batches. Each group computes exactly as
 * a TP=2 run does, so the output is that run's byte for byte. */
Test(dist_sweep, attribute_dp2_by_tp2_on_4_ranks) {
    tp_matches("attribute", FIX "llama-tiny", 4, 2);
    tp_matches("attribute", FIX "llama-tiny", 2, 1);
    same_files(path_in("attribute-llama-tiny-tp2-dp1"), path_in("attribute-llama-tiny-tp2-dp2"), same_bytes);
}

/* ---- refusals end every rank ---- */

Test(dist_sweep, an_output_rank0_cannot_open_ends_every_rank) {
    char out[16384];
    FILE *f = fopen(path_in("afile"), "w");
    cr_assert(f);
    fclose(f);
    int rc = mpitest_run(out, sizeof out, ENV "timeout 60 " MPIRUN "-np 2 %s " ATTRIB " --attrib.pairs=%s --attrib.out=%s", g_bin, g_pairs, path_in("afile"));
    cr_assert_neq(rc, 0, "%s", out);
    cr_assert_neq(rc, 124, "mpirun hung: %s", out);
    cr_assert(strstr(out, "loupe: rank 1: attribute: rank 0 failed"), "%s", out);
    cr_assert(strstr(out, "loupe: rank 0: "), "%s", out);
}

/* The sweeps between components refuse tensor parallelism (edge attribution reads whole
 * weight matrices, which a TP rank holds a slice of): one line naming the sweep and why,
 * exit 2 on every rank, nothing written, no hang. */
Test(dist_sweep, between_components_sweeps_refuse_tp) {
    static const char *const sweeps[][2] = {{"attribute --attrib.edges=true", "`loupe attribute --attrib.edges=true`"},
                                            {"patch --patch.kind=path --path.sender=embed --path.receivers=logits", "`loupe patch --patch.kind=path`"}};
    for (int i = 0; i < 2; i++) {
        char out[16384], want[256];
        int rc = mpitest_run(out, sizeof out, ENV "timeout 60 " MPIRUN "-np 2 %s %s --model.path=" FIX "gpt2-tiny --model.device=cpu --attrib.pairs=%s "
                     "--attrib.out=%s --dist.tp=2", g_bin, sweeps[i][0], g_pairs, path_in("between-tp"));
        cr_assert_eq(rc, 2, "%s", out);
        for (int r = 0; r < 2; r++) {
            snprintf(want, sizeof want, "loupe: rank %d: dist.tp=2: %s does not run tensor-parallel: the sweeps between components read "
                     "whole weight matrices", r, sweeps[i][1]);
            cr_assert(strstr(out, want), "rank %d: %s", r, out);
        }
        cr_assert_neq(access(path_in("between-tp"), F_OK), 0, "a refused run wrote its output directory");
    }
}

/* ---- between components, data-parallel: one process's bytes ---- */

#define EDGES "attribute --model.path=" FIX "gpt2-tiny --model.device=cpu --attrib.edges=true --attrib.ig_steps=3 --attrib.top=6"
#define PATHS "patch --model.path=" FIX "llama-tiny --model.device=cpu --patch.kind=path --path.sender=embed,blocks.0.attn.head.1,blocks.0.mlp " \
              "--path.receivers=blocks.1.attn.head.0.q,blocks.1.mlp,logits"

/* One process, then DP=2 (and DP=3: a round with a rank left without a pair); each output
 * directory byte for byte the single process's; returns the file count. */
static int between_dp_matches(const char *cmd, const char *name, const char *done_line) {
    char out[16384], one[64], dp[64];
    snprintf(one, sizeof one, "%s-one", name);
    int rc = mpitest_run(out, sizeof out, ENV "%s %s --attrib.pairs=%s --attrib.out=%s", g_bin, cmd, g_pairs, path_in(one));
    cr_assert_eq(rc, 0, "one process: %s", out);
    int n = 0;
    for (int np = 2; np <= 3; np++) {
        snprintf(dp, sizeof dp, "%s-dp%d", name, np);
        rc = mpitest_run(out, sizeof out, ENV MPIRUN "-np %d %s %s --attrib.pairs=%s --attrib.out=%s", np, g_bin, cmd, g_pairs, path_in(dp));
        cr_assert_eq(rc, 0, "mpirun -np %d: %s", np, out);
        cr_assert(strstr(out, done_line), "%s", out);
        n = same_files(path_in(one), path_in(dp), same_bytes);
    }
    return n;
}

/* Edge attribution (integrated gradients): the scores files, results.jsonl, job.json and the
 * circuit made from them; a DP=2 restart after lost results (a torn line, a scores file whose
 * line never arrived) ends with the same bytes. */
Test(dist_sweep, edges_dp2_match_one_process_and_resume) {
    int n = between_dp_matches(EDGES, "edges", "edge attribution: 7 pairs done (0 already in");
    cr_assert_eq(n, 11, "job.json, results.jsonl, circuit.json, circuit.html and 7 scores files: not %d files", n);
    lose_results(path_in("edges-dp2"), 3);
    char out[16384];
    int rc = mpitest_run(out, sizeof out, ENV MPIRUN "-np 2 %s " EDGES " --attrib.pairs=%s --attrib.out=%s", g_bin, g_pairs, path_in("edges-dp2"));
    cr_assert_eq(rc, 0, "mpirun -np 2 (resume): %s", out);
    cr_assert(strstr(out, "edge attribution: 4 pairs done (3 already in"), "%s", out);
    same_files(path_in("edges-one"), path_in("edges-dp2"), same_bytes);
}

/* Path patching (three senders through three receivers), and its resume the same way. */
Test(dist_sweep, path_patching_dp2_matches_one_process_and_resumes) {
    int n = between_dp_matches(PATHS, "paths", "path patching: 7 pairs done (0 already in");
    cr_assert_eq(n, 9, "job.json, results.jsonl and 7 scores files: not %d files", n);
    lose_results(path_in("paths-dp2"), 4);
    char out[16384];
    int rc = mpitest_run(out, sizeof out, ENV MPIRUN "-np 2 %s " PATHS " --attrib.pairs=%s --attrib.out=%s", g_bin, g_pairs, path_in("paths-dp2"));
    cr_assert_eq(rc, 0, "mpirun -np 2 (resume): %s", out);
    cr_assert(strstr(out, "path patching: 3 pairs done (4 already in"), "%s", out);
    same_files(path_in("paths-one"), path_in("paths-dp2"), same_bytes);
}
