/* test_dist_shard: `loupe train-sae --dist.tp=N`, the latents sharded over the ranks, under
 * mpirun.
 *
 * Against one process with the same global batch (100 steps of a 64 -> 128 SAE on a store of
 * the tiny GPT-2): every logged figure within 1e-5 relative and the written weights within
 * 1e-5, for topk (AuxK active: a dead window of 8 tokens), batchtopk, standard, jumprelu, a
 * skip transcoder, and topk on 4 ranks of dist.dp=2 x dist.tp=2. A sharded run cut back to
 * its middle checkpoint (the state a run killed after it leaves: that checkpoint, the metrics
 * past it, no final files) resumes and ends byte-identical to the uninterrupted sharded run;
 * the same checkpoint resumes under one process (the checkpoint is the whole SAE's). Refused
 * with exit 2 and the line naming the key: d_sae not a multiple of dist.tp, k above
 * d_sae / dist.tp, a live model, the CLT trainer.
 * One BLAS thread per run. Skipped, saying why, without MPI in the build or mpirun on the PATH. */
#include <criterion/criterion.h>
#include <cjson/cJSON.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loupe/dist.h"
#include "loupe/output.h"
#include "loupe/sae.h"
#include "mpitest.h"

#define FIX "tests/fixtures/"
#define ENV "OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 "
#define STEPS 100
#define TRAIN "train-sae %s/store --data.hook=blocks.1.hook_resid_mid --sae.expansion_factor=2 --train.device=cpu " \
              "--train.tokens=1600 --train.batch_tokens=16 --train.shuffle_tokens=32 --train.log_every=1 " \
              "--train.dead_feature_window=8 --train.aux_k_coefficient=0.03 --train.lr=1e-3 --train.checkpoint_every=800"

static char g_bin[PATH_MAX + 16], g_dir[] = "/tmp/loupe-shard-XXXXXX";

static void setup(void) {
    mpitest_need_mpi();
    mpitest_paths(g_bin, sizeof g_bin, g_dir);
    char out[8192];
    int rc = mpitest_run(out, sizeof out, ENV "%s cache --model.path=" FIX "gpt2-tiny --data.tokens=" FIX "gpt2-tiny/tokens_flat.npy "
                         "--data.context=4 --model.device=cpu --cache.hooks=blocks.1.hook_resid_mid,blocks.1.hook_mlp_out "
                         "--cache.out=%s/store", g_bin, g_dir);
    cr_assert_eq(rc, 0, "cache: %s", out);
}

static void teardown(void) {
    mpitest_remove(g_dir);
}

TestSuite(dist_shard, .init = setup, .fini = teardown, .timeout = 120);

static void close_to(double a, double b, const char *what, int line) {
    cr_assert(fabs(a - b) <= 1e-5 * fmax(1.0, fmax(fabs(a), fabs(b))), "%s at line %d: %.9g and %.9g", what, line, a, b);
}

/* Every figure of every metrics line (the throughput aside) within 1e-5; exact: equal. */
static void same_curve(const char *one, const char *two, int exact) {
    char pa[PATH_MAX + 64], pb[PATH_MAX + 64];
    snprintf(pa, sizeof pa, "%s/metrics.jsonl", one);
    snprintf(pb, sizeof pb, "%s/metrics.jsonl", two);
    char *a = lp_read_file(pa, NULL), *b = lp_read_file(pb, NULL);
    cr_assert(a && b, "cannot read %s or %s", pa, pb);
    char *sa = NULL, *sb = NULL;
    int line = 0, figures = 0;
    for (char *la = strtok_r(a, "\n", &sa), *lb = strtok_r(b, "\n", &sb); la || lb;
         la = strtok_r(NULL, "\n", &sa), lb = strtok_r(NULL, "\n", &sb), line++) {
        cr_assert(la && lb, "%s and %s have different numbers of lines", pa, pb);
        cJSON *ja = cJSON_Parse(la), *jb = cJSON_Parse(lb);
        cr_assert(ja && jb, "line %d does not parse", line);
        for (const cJSON *x = ja->child; x; x = x->next) {
            if (strcmp(x->string, "details/tokens_per_s") == 0) continue;
            const cJSON *y = cJSON_GetObjectItemCaseSensitive(jb, x->string);
            cr_assert(cJSON_IsNumber(x) && cJSON_IsNumber(y), "%s at line %d: missing in %s", x->string, line, pb);
            if (exact) cr_assert_eq(x->valuedouble, y->valuedouble, "%s at line %d: %.9g and %.9g", x->string, line, x->valuedouble, y->valuedouble);
            else close_to(x->valuedouble, y->valuedouble, x->string, line);
            figures++;
        }
        cJSON_Delete(ja), cJSON_Delete(jb);
    }
    cr_assert_eq(line, STEPS, "%d steps logged, not %d", line, STEPS);
    cr_assert(figures >= STEPS * 10, "only %d figures compared", figures);
    free(a), free(b);
}

/* The two SAEs' files load to the same shapes and weights within 1e-5; returns the largest
 * difference. */
static double same_weights(const char *one, const char *two) {
    lp_ctx c;
    cr_assert_eq(lp_ctx_init(&c, LP_CPU, LP_F32), LP_OK);
    lp_sae *sa, *sb;
    cr_assert_eq(lp_sae_load(&sa, &c, one), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_sae_load(&sb, &c, two), LP_OK, "%s", lp_last_error());
    cr_assert_eq(sa->cfg.d_sae, sb->cfg.d_sae);
    cr_assert_eq(sa->n_floats, sb->n_floats);
    double worst = 0;
    for (size_t i = 0; i < sa->n_floats; i++) worst = fmax(worst, fabs(((float *)sa->mem)[i] - ((float *)sb->mem)[i]));
    cr_assert(worst <= 1e-5, "%s and %s: the weights differ by up to %.3g", one, two, worst);
    lp_sae_free(sa, &c), lp_sae_free(sb, &c);
    lp_ctx_free(&c);
    return worst;
}

static int count_of(const char *hay, const char *needle) {
    int n = 0;
    for (const char *p = strstr(hay, needle); p; p = strstr(p + 1, needle)) n++;
    return n;
}

/* One process against np ranks of dist.tp = tp (dist.dp = np / tp), same settings. */
static void shard_matches(const char *extra, int np, int tp) {
    char out[16384], one[PATH_MAX + 64], two[PATH_MAX + 64];
    snprintf(one, sizeof one, "%s/one", g_dir);
    snprintf(two, sizeof two, "%s/two", g_dir);
    int rc = mpitest_run(out, sizeof out, ENV "%s " TRAIN " %s --train.out=%s", g_bin, g_dir, extra, one);
    cr_assert_eq(rc, 0, "one process: %s", out);
    rc = mpitest_run(out, sizeof out, ENV MPIRUN "-np %d %s " TRAIN " %s --dist.tp=%d --dist.dp=%d --train.out=%s", np, g_bin, g_dir, extra,
                     tp, np / tp, two);
    cr_assert_eq(rc, 0, "mpirun -np %d: %s", np, out);
    char says[64];
    snprintf(says, sizeof says, "latents sharded over %d ranks) on 1600 tokens", tp);
    cr_assert_eq(count_of(out, says), 1, "rank 0 alone reports, once: %s", out);
    same_curve(one, two, 0);
    same_weights(one, two);
}

Test(dist_shard, tp2_topk_matches_one_process) { shard_matches("--sae.architecture=topk", 2, 2); }
Test(dist_shard, tp2_batchtopk_matches_one_process) { shard_matches("--sae.architecture=batchtopk", 2, 2); }
Test(dist_shard, tp2_standard_matches_one_process) { shard_matches("--sae.architecture=standard", 2, 2); }
Test(dist_shard, tp2_jumprelu_matches_one_process) { shard_matches("--sae.architecture=jumprelu", 2, 2); }
Test(dist_shard, tp2_skip_transcoder_matches_one_process) {
    shard_matches("--sae.architecture=topk --data.hook_out=blocks.1.hook_mlp_out --sae.skip=true", 2, 2);
}
Test(dist_shard, dp2_tp2_topk_matches_one_process) { shard_matches("--sae.architecture=topk", 4, 2); }
/* BatchTopK's threshold over rows split over DP and latents over TP: histograms over the world */
Test(dist_shard, dp2_tp2_batchtopk_matches_one_process) { shard_matches("--sae.architecture=batchtopk", 4, 2); }

/* A copy of a finished run as a run killed after its middle checkpoint leaves it. */
static void cut_back(const char *whole, const char *cut) {
    char cmd[3 * PATH_MAX];
    snprintf(cmd, sizeof cmd, "cp -r %s %s && rm -r %s/checkpoints/step-%09d %s/sae_weights.safetensors %s/cfg.json", whole, cut, cut, STEPS,
             cut, cut);
    cr_assert_eq(system(cmd), 0, "%s", cmd);
}

Test(dist_shard, an_interrupted_sharded_run_resumes_identically) {
    char out[16384], whole[PATH_MAX + 64], cut[PATH_MAX + 64], one[PATH_MAX + 64];
    snprintf(whole, sizeof whole, "%s/whole", g_dir);
    snprintf(cut, sizeof cut, "%s/cut", g_dir);
    snprintf(one, sizeof one, "%s/cut1", g_dir);
    int rc = mpitest_run(out, sizeof out, ENV MPIRUN "-np 2 %s " TRAIN " --sae.architecture=topk --dist.tp=2 --train.out=%s", g_bin, g_dir, whole);
    cr_assert_eq(rc, 0, "%s", out);
    char ck[PATH_MAX + 160];
    snprintf(ck, sizeof ck, "%s/checkpoints/step-%09d/state.safetensors", whole, STEPS / 2);
    cr_assert_eq(access(ck, F_OK), 0, "no checkpoint at the middle: %s", ck);
    cut_back(whole, cut);
    cut_back(whole, one);
    rc = mpitest_run(out, sizeof out, ENV MPIRUN "-np 2 %s " TRAIN " --sae.architecture=topk --dist.tp=2 --train.out=%s", g_bin, g_dir, cut);
    cr_assert_eq(rc, 0, "%s", out);
    cr_assert(strstr(out, "(resumed)"), "the rerun did not resume: %s", out);
    char a[PATH_MAX + 96], b[PATH_MAX + 96];
    snprintf(a, sizeof a, "%s/sae_weights.safetensors", whole);
    snprintf(b, sizeof b, "%s/sae_weights.safetensors", cut);
    size_t na, nb;
    char *x = lp_read_file(a, &na), *y = lp_read_file(b, &nb);
    cr_assert(x && y && na == nb && memcmp(x, y, na) == 0, "%s and %s differ", a, b);
    free(x), free(y);
    same_curve(whole, cut, 1);
    /* the checkpoint is the whole SAE's: one process takes it up too */
    rc = mpitest_run(out, sizeof out, ENV "%s " TRAIN " --sae.architecture=topk --train.out=%s", g_bin, g_dir, one);
    cr_assert_eq(rc, 0, "%s", out);
    cr_assert(strstr(out, "(resumed)"), "one process did not resume the sharded checkpoint: %s", out);
    same_curve(whole, one, 0);
    same_weights(whole, one);
}

/* Every rank refuses with exit 2 and the line naming the key. */
static void refused(const char *args, const char *line) {
    char out[16384];
    int rc = mpitest_run(out, sizeof out, ENV MPIRUN "-np 2 %s %s --train.out=%s/refused", g_bin, args, g_dir);
    cr_assert_eq(rc, 2, "exit %d, not 2: %s", rc, out);
    cr_assert(strstr(out, line), "no '%s' in: %s", line, out);
    char p[PATH_MAX + 64];
    snprintf(p, sizeof p, "%s/refused/metrics.jsonl", g_dir);
    cr_assert_neq(access(p, F_OK), 0, "a refused run started training");
}

Test(dist_shard, refusals_name_the_key) {
    char args[PATH_MAX + 1024];
    snprintf(args, sizeof args, TRAIN " --sae.architecture=topk --sae.d_sae=129 --dist.tp=2", g_dir);
    refused(args, "loupe: rank 0: sae.d_sae = 129 is not a multiple of dist.tp = 2");
    snprintf(args, sizeof args, TRAIN " --sae.architecture=topk --sae.d_sae=32 --sae.k=20 --dist.tp=2", g_dir);
    refused(args, "loupe: rank 0: sae.k = 20 exceeds sae.d_sae / dist.tp = 16");
    refused("train-sae --model.path=" FIX "gpt2-tiny --data.tokens=" FIX "gpt2-tiny/tokens_flat.npy --data.hook=blocks.1.hook_resid_mid "
            "--train.device=cpu --dist.tp=2",
            "loupe: rank 0: dist.tp=2: sharded SAE training reads an activation store (data.store), not a live model");
    snprintf(args, sizeof args, "train-sae %s/store --sae.kind=cross_layer --sae.architecture=jumprelu --dist.tp=2", g_dir);
    refused(args, "loupe: rank 0: dist.tp=2: the transcoder-set trainer does not shard its latents (sae.kind=cross_layer)");
}
