/* test_dist: the distributed module (dist.h) and tensor parallelism.
 *
 * In one process: every collective is a no-op over a world of one, asking for more
 * processes than were launched is refused naming dist.tp / dist.dp, and a model loaded
 * through the module at TP=1 is the model lp_model_load gives, bit for bit (and so is one
 * asked for micro-batches, which one process never interleaves; bad counts are refused).
 * Under mpirun (when the build has MPI and mpirun is on the PATH; skipped, saying so,
 * otherwise): build/dist_tp_check at TP=2 and TP=4 compares a split model with the whole
 * one for GPT-2, Llama with GQA, Qwen2 with one kv head, Mistral, Gemma 2 and Gemma 3:
 * losses, logits, every hook's capture, edits at per-head and per-neuron hooks, the
 * number of collectives and bytes of a forward, and the interleaved schedule (micro-batches
 * whose all-reduces overlap compute) against the plain one, with the cases that must take
 * the plain one (tests/dist/tp_check.c); build/dist_attrib_check
 * at TP=2 and TP=4 compares attribution patching (and integrated gradients), the
 * exact-patching grid and SAE-latent nodes on GPT-2 and Llama with GQA
 * (tests/dist/attrib_check.c); build/dist_async_check at TP=2 and TP=4 the started all-reduce
 * (exact sums, requests in flight, a peer that never joins fails the wait in time). */
#include <criterion/criterion.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loupe/dist.h"
#include "loupe/hooks.h"
#include "loupe/model.h"
#include "mpitest.h"

#define FIX "tests/fixtures/"

Test(dist, one_process_is_a_world_of_one) {
    lp_dist *d;
    cr_assert_eq(lp_dist_init(&d, 1, 1), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_dist_size(d), 1);
    cr_assert_eq(lp_dist_rank(d), 0);
    cr_assert_eq(lp_dist_tp_size(d), 1);
    cr_assert_eq(lp_dist_dp_size(d), 1);
    float x[3] = {1, 2, 3}, g[3];
    cr_assert_eq(lp_dist_allreduce_sum(d, LP_DIST_TP, x, 3, LP_F32), LP_OK);
    cr_assert_eq(lp_dist_allgather(d, LP_DIST_WORLD, x, g, sizeof x), LP_OK);
    cr_assert_eq(lp_dist_broadcast(d, LP_DIST_DP, x, sizeof x, 0), LP_OK);
    cr_assert_eq(lp_dist_barrier(d, LP_DIST_WORLD), LP_OK);
    cr_assert(x[0] == 1 && x[1] == 2 && x[2] == 3 && memcmp(x, g, sizeof x) == 0);
    void *all = NULL;
    size_t counts[1] = {0};
    cr_assert_eq(lp_dist_gather(d, LP_DIST_DP, x, sizeof x, &all, counts, 0), LP_OK);
    cr_assert(all && counts[0] == sizeof x && memcmp(all, x, sizeof x) == 0, "a gather over one rank is not a copy");
    free(all);
    lp_ctx c;
    lp_dist_req *req = (lp_dist_req *)1;
    cr_assert_eq(lp_ctx_init(&c, LP_CPU, LP_F32), LP_OK);
    cr_assert_eq(lp_dist_allreduce_sum_dev_start(d, LP_DIST_TP, &c, x, 3, &req), LP_OK);
    cr_assert_null(req, "a world of one started an all-reduce");
    cr_assert_eq(lp_dist_wait(d, req), LP_OK);
    lp_ctx_free(&c);
    lp_dist_counts k;
    lp_dist_counts_get(d, &k);
    cr_assert(k.allreduce == 0 && k.allgather == 0 && k.broadcast == 0 && k.barrier == 0 && k.gather == 0, "a world of one moved something");
    lp_dist_finalize(d);
    /* NULL is the single process too */
    cr_assert_eq(lp_dist_tp_size(NULL), 1);
    cr_assert_eq(lp_dist_allreduce_sum(NULL, LP_DIST_TP, x, 3, LP_F32), LP_OK);
}

Test(dist, more_processes_than_launched_are_refused) {
    lp_dist *d = (lp_dist *)1;
    cr_assert_neq(lp_dist_init(&d, 2, 1), LP_OK);
    cr_assert_null(d);
    cr_assert(strstr(lp_last_error(), "dist.tp=2"), "message: %s", lp_last_error());
    cr_assert_neq(lp_dist_init(&d, 1, 3), LP_OK);
    cr_assert(strstr(lp_last_error(), "dist.dp=3"), "message: %s", lp_last_error());
}

/* TP=1 through the module: the same losses, logits and captures as lp_model_load, bit for bit. */
Test(dist, tp1_is_bit_identical) {
    const char *models[] = {FIX "gpt2-tiny", FIX "llama-tiny", FIX "gemma2-tiny", FIX "gemma3-tiny"};
    lp_dist *d;
    cr_assert_eq(lp_dist_init(&d, 1, 1), LP_OK, "%s", lp_last_error());
    for (size_t i = 0; i < sizeof models / sizeof *models; i++) {
        lp_model *a, *b;
        cr_assert_eq(lp_model_load(&a, models[i], LP_CPU, LP_F32), LP_OK, "%s", lp_last_error());
        cr_assert_eq(lp_model_load_dist(&b, models[i], LP_CPU, LP_F32, d), LP_OK, "%s", lp_last_error());
        const lp_config *c = lp_model_config(a);
        int B = 2, T = 6;
        int32_t tok[12];
        for (int j = 0; j < B * T; j++) tok[j] = (j * 31 + 5) % c->d_vocab;
        cr_assert_eq(lp_hook_capture(a, "blocks.0.attn.hook_z", NULL, 0, NULL), LP_OK);
        cr_assert_eq(lp_hook_capture(b, "blocks.0.attn.hook_z", NULL, 0, NULL), LP_OK);
        cr_assert_eq(lp_model_forward(a, tok, B, T, LP_WANT_LOSS | LP_WANT_LOGITS), LP_OK, "%s", lp_last_error());
        cr_assert_eq(lp_model_forward(b, tok, B, T, LP_WANT_LOSS | LP_WANT_LOGITS), LP_OK, "%s", lp_last_error());
        cr_assert_eq(memcmp(lp_model_losses(a), lp_model_losses(b), (size_t)B * (T - 1) * sizeof(float)), 0, "%s", models[i]);
        cr_assert_eq(memcmp(lp_model_logits(a), lp_model_logits(b), (size_t)B * T * c->d_vocab * sizeof(float)), 0, "%s", models[i]);
        lp_tensor ta, tb;
        cr_assert_eq(lp_capture_get(a, "blocks.0.attn.hook_z", &ta), LP_OK);
        cr_assert_eq(lp_capture_get(b, "blocks.0.attn.hook_z", &tb), LP_OK);
        cr_assert_eq(memcmp(ta.data, tb.data, (size_t)lp_shape_numel(ta.shape, ta.ndim) * sizeof(float)), 0);
        lp_model_free(a);
        lp_model_free(b);
    }
    lp_dist_finalize(d);
}

/* The micro-batch setting: 1 to LP_DIST_MAX_STARTED, else refused; at TP=1 a forward
 * nobody hooks still runs the plain schedule, bit for bit the one lp_model_load gives. */
Test(dist, tp_overlap_setting) {
    lp_model *a, *b;
    cr_assert_eq(lp_model_load(&a, FIX "gpt2-tiny", LP_CPU, LP_F32), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_model_load(&b, FIX "gpt2-tiny", LP_CPU, LP_F32), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_model_set_tp_overlap(b, -1), LP_ERR_ARG);
    cr_assert_eq(lp_model_set_tp_overlap(b, LP_DIST_MAX_STARTED + 1), LP_ERR_ARG);
    cr_assert(strstr(lp_last_error(), "micro-batches"), "message: %s", lp_last_error());
    cr_assert_eq(lp_model_set_tp_overlap(b, 2), LP_OK);
    int B = 4, T = 6, V = lp_model_config(a)->d_vocab;
    int32_t tok[24];
    for (int j = 0; j < B * T; j++) tok[j] = (j * 17 + 3) % V;
    cr_assert_eq(lp_model_forward(a, tok, B, T, LP_WANT_LOSS | LP_WANT_LOGITS), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_model_forward(b, tok, B, T, LP_WANT_LOSS | LP_WANT_LOGITS), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_model_tp_overlapped(b), 1, "one process interleaved micro-batches");
    cr_assert_eq(memcmp(lp_model_losses(a), lp_model_losses(b), (size_t)B * (T - 1) * sizeof(float)), 0);
    cr_assert_eq(memcmp(lp_model_logits(a), lp_model_logits(b), (size_t)B * T * V * sizeof(float)), 0);
    lp_model_free(a);
    lp_model_free(b);
}

static void run_check(int np, const char *prog, const char *args, const char *ok, int exit0) {
    mpitest_check(np, "", "", prog, args, ok, NULL, exit0);
}

#define TP_MODELS FIX "gpt2-tiny " FIX "llama-tiny " FIX "qwen2-tiny " FIX "mistral-tiny " FIX "gemma2-tiny " FIX "gemma3-tiny"
/* The micro-batches of a forward by setting: the default's B/4, B/2, B/4 sequences when 4
 * divides the batch, else halves, else the plain schedule; K equal parts when K divides. */
static void parts_are(int B, int setting, int n, const int *want) {
    int seqs[LP_DIST_MAX_STARTED] = {0}, k = lp_model_tp_parts(B, setting, seqs);
    cr_expect_eq(k, n, "B=%d, parts=%d: %d parts, not %d", B, setting, k, n);
    for (int j = 0; j < n && j < k; j++) cr_expect_eq(seqs[j], want[j], "B=%d, parts=%d: part %d", B, setting, j);
}
Test(dist, tp_parts_by_setting) {
    parts_are(8, 0, 3, (int[]){2, 4, 2});
    parts_are(4, 0, 3, (int[]){1, 2, 1});
    parts_are(16, 0, 3, (int[]){4, 8, 4});
    parts_are(6, 0, 2, (int[]){3, 3});
    parts_are(2, 0, 2, (int[]){1, 1});
    parts_are(3, 0, 1, (int[]){3});
    parts_are(1, 0, 1, (int[]){1});
    parts_are(8, 4, 4, (int[]){2, 2, 2, 2});
    parts_are(8, 3, 1, (int[]){8});
    parts_are(6, 3, 3, (int[]){2, 2, 2});
    parts_are(8, 1, 1, (int[]){8});
    parts_are(16, LP_DIST_MAX_STARTED, LP_DIST_MAX_STARTED, (int[]){2, 2, 2, 2, 2, 2, 2, 2});
}

Test(dist, tp2_matches_one_process, .timeout = 60) { run_check(2, "tp_check", TP_MODELS, "all agree", 1); }
Test(dist, tp4_matches_one_process, .timeout = 60) { run_check(4, "tp_check", TP_MODELS, "all agree", 1); }

/* Attribution at TP=np against the whole model (tests/dist/attrib_check.c): both fixtures
 * have 4 heads (Llama 2 kv heads, replicated at TP=4) and MLP widths that 4 divides. */
Test(dist, attribution_tp2_matches_one_process, .timeout = 120) { run_check(2, "attrib_check", FIX "gpt2-tiny " FIX "llama-tiny", "all agree", 1); }
Test(dist, attribution_tp4_matches_one_process, .timeout = 120) { run_check(4, "attrib_check", FIX "gpt2-tiny " FIX "llama-tiny", "all agree", 1); }

/* The started all-reduce (tests/dist/async_check.c): exact sums with work in between, the
 * limit of requests in flight; and a peer that never joins fails the wait within the
 * timeout (the job then ends through lp_dist_abort, so its status is not 0). */
Test(dist, started_allreduce_tp2, .timeout = 60) { run_check(2, "async_check", "", "all sums exact", 1); }
Test(dist, started_allreduce_tp4, .timeout = 60) { run_check(4, "async_check", "", "all sums exact", 1); }
Test(dist, started_allreduce_times_out, .timeout = 60) { run_check(2, "async_check", "--timeout", "timeout: ok", 0); }

/* GGUF: each rank reads whole quant blocks of its rows and dequantizes the column-split
 * tensors (W_O, W_out) before cutting them. SmolLM2 has 9 heads and 3 kv heads: TP=3.
 * The forward only (losses, logits, every hook, edits): what the loader's slices decide;
 * the gradients' agreement is checked on the tiny models above. */
Test(dist, gguf_tp3_matches_one_process, .timeout = 120) {
    const char *gguf = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    char bin[PATH_MAX + 32], cmd[8192];
    mpitest_prog_path(bin, sizeof bin, "tp_check");
    if (access(gguf, R_OK) != 0) cr_skip_test("%s is absent (make model fetches it)", gguf);
    snprintf(cmd, sizeof cmd, MPIRUN "-np 3 %s --no-grad %s 2>&1 | tail -n 20", bin, gguf);
    FILE *p = popen(cmd, "r");
    cr_assert(p, "cannot start mpirun");
    char line[512], all[8192] = "";
    while (fgets(line, sizeof line, p))
        if (strlen(all) + strlen(line) < sizeof all) strcat(all, line);
    pclose(p);
    cr_assert(strstr(all, "all agree"), "%s", all);
}
