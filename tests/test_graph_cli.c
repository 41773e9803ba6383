/* test_graph_cli.c: `loupe graph` as a resumable sweep on the graph fixture: the plan and one
 * line per graph, the files (JSON, graph-metadata.json, results.jsonl); a rerun skips what is
 * done; other settings on the same output and a plan over the host budget are refused (exit 2)
 * naming the setting. */
#include <string.h>
#include <unistd.h>

#include "testutil.h"

static char dir[64];
#include "clitest.h"

#define G LP_FIXTURES "/graph"

static void setup_dir(void) {
    strcpy(dir, "/tmp/lp_graph_cli_XXXXXX");
    cr_assert(mkdtemp(dir));
    char p[128];
    snprintf(p, sizeof p, "%s/p.jsonl", dir);
    FILE *f = fopen(p, "w");
    fprintf(f, "{\"prompt\": [1, 17, 200, 33, 91, 150, 7, 64, 120, 5], \"slug\": \"tiny\"}\n\n{\"prompt\": [1, 5, 6, 7, 8]}\n");
    fclose(f);
}

static void cleanup(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_assert_eq(system(cmd), 0);
}

Test(graph_cli, sweep_resumes_and_refuses) {
    setup_dir();
    const char *base = G "/model --graph.prompts=%s/p.jsonl --graph.transcoders=" G "/transcoders --graph.out=%s/out --graph.html=false";
    char fmt[512];
    snprintf(fmt, sizeof fmt, "graph %s", base);
    cr_assert_eq(loupe(fmt, dir, dir), 0, "%s", err_txt);
    cr_assert(strstr(err_txt, "plan: 10 tokens, 414 active features"), "%s", err_txt);
    cr_assert(strstr(out_txt, "tiny: 10 tokens, 414 active features, 464 nodes"), "%s", out_txt);
    cr_assert(strstr(out_txt, "replacement 0.3778, completeness 0.7361"), "%s", out_txt);
    cr_assert(strstr(out_txt, "graph-3: 5 tokens"), "the unnamed prompt of line 3: %s", out_txt);
    char p[160], buf[8192];
    const char *files[] = {"tiny.json", "graph-3.json", "graph-metadata.json", "job.json", "results.jsonl"};
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        snprintf(p, sizeof p, "%s/out/%s", dir, files[i]);
        cr_assert_eq(access(p, R_OK), 0, "%s missing", files[i]);
    }
    snprintf(p, sizeof p, "%s/out/results.jsonl", dir);
    slurp(p, buf, sizeof buf);
    cr_assert(strstr(buf, "\"index\":0") && strstr(buf, "\"index\":1") && !strstr(buf, "\"index\":2"), "%s", buf);
    /* resumed: nothing recomputed */
    cr_assert_eq(loupe(fmt, dir, dir), 0, "%s", err_txt);
    cr_assert(strstr(err_txt, "0 graphs written, 2 already done"), "%s", err_txt);
    /* another setting on the same output */
    snprintf(fmt, sizeof fmt, "graph %s --graph.edge_mass=0.9", base);
    cr_assert_eq(loupe(fmt, dir, dir), 2, "%s", err_txt);
    cr_assert(strstr(err_txt, "graph.edge_mass = 1, not 0.9"), "%s", err_txt);
    /* a job written before graph.zero_positions existed ran with its default, 1: the same job */
    snprintf(p, sizeof p, "%s/out/job.json", dir);
    slurp(p, buf, sizeof buf);
    char *zl = strstr(buf, "\"graph.zero_positions\"");
    cr_assert(zl, "job.json records graph.zero_positions: %s", buf);
    while (zl > buf && zl[-1] != '\n') zl--;
    memmove(zl, strchr(zl, '\n') + 1, strlen(strchr(zl, '\n') + 1) + 1);
    FILE *jf = fopen(p, "w");
    cr_assert(jf && fputs(buf, jf) >= 0 && fclose(jf) == 0, "cannot rewrite %s", p);
    snprintf(fmt, sizeof fmt, "graph %s", base);
    cr_assert_eq(loupe(fmt, dir, dir), 0, "%s", err_txt);
    cr_assert(strstr(err_txt, "0 graphs written, 2 already done"), "%s", err_txt);
    snprintf(fmt, sizeof fmt, "graph %s --graph.zero_positions=2", base);
    cr_assert_eq(loupe(fmt, dir, dir), 2, "%s", err_txt);
    cr_assert(strstr(err_txt, "graph.zero_positions = (unset), not 2"), "%s", err_txt);
    /* over the budget: refused before any backward, naming what to change */
    snprintf(fmt, sizeof fmt, "graph %s --graph.host_budget_mb=1 --graph.out=%s/out2", base, "%s");
    cr_assert_eq(loupe(fmt, dir, dir, dir), 2, "%s", err_txt);
    cr_assert(strstr(err_txt, "over the budget of 1.0 MiB") && strstr(err_txt, "max_feature_nodes"), "%s", err_txt);
    cleanup();
}

/* graph.device = cuda: on a machine without a usable GPU (or a build without CUDA) the
 * graph is refused with the reason and the setting that runs it on the host; with one, the
 * same graph comes out (test_graph_cuda.c compares the two in detail). */
Test(graph_cli, device_cuda_runs_or_is_refused) {
    setup_dir();
    char fmt[512], why[256];
    snprintf(fmt, sizeof fmt, "graph %s", G "/model --graph.prompts=%s/p.jsonl --graph.transcoders=" G "/transcoders --graph.out=%s/out "
                                          "--graph.html=false --graph.device=cuda");
    int rc = loupe(fmt, dir, dir);
    if (lp_cuda_available(why, sizeof why)) {
        cr_assert_eq(rc, 0, "%s", err_txt);
        cr_assert(strstr(out_txt, "tiny: 10 tokens, 414 active features, 464 nodes"), "%s", out_txt);
        cr_assert(strstr(err_txt, "plan:") && !strstr(err_txt, "device 0.0 MiB"), "%s", err_txt);
    } else {
        cr_assert_eq(rc, 1, "%s", err_txt);
        cr_assert(strstr(err_txt, "graph.device = cuda: no usable GPU") &&
                      strstr(err_txt, "graph.device = cpu runs the backward passes on the host") && !strstr(err_txt, "plan:"),
                  "refused before the plan: %s", err_txt);
    }
    cleanup();
}
