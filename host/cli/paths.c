/* paths.c: the sweeps between components (paths.h) over attrib.pairs, with the output
 * directory of attrib.c (sweep_out.c: resumable, locked, job.json):
 *   loupe patch --patch.kind=path --path.sender=S[,S...] --path.receivers=R[,R...]
 *       per pair the effect of each sender through the receivers (pairNNNNNN.path.effect
 *       [n_senders] in scores-path-*.safetensors)
 *   loupe attribute --attrib.edges=true [--attrib.ig_steps=N]
 *       per pair every edge's score (pairNNNNNN.eap.edges [n_senders, n_receivers] in
 *       scores-eap-*.safetensors, the names in the files' metadata); at the end circuit.json
 *       (the attrib.top_edges edges by |mean score| over every pair in the output) and
 *       circuit.html (the same as a layered graph, self-contained). */
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loupe/output.h"
#include "loupe/paths.h"
#include "loupe/safetensors.h"
#include "loupe/tokenizer.h"
#include "cli.h"

/* A comma-separated list of sender (or receiver) names to indices. */
static lp_status parse_list(const args *a, lp_model *m, const char *key, int recv, int **out, int *n) {
    const char *v = lp_cfg_str(&a->cfg, key);
    *out = NULL, *n = 0;
    if (!v || !v[0]) LP_FAIL(LP_ERR_ARG, "%s: required for patch.kind = path", key);
    char *list = strdup(v), *save = NULL;
    int *ix = calloc(strlen(v) + 1, sizeof(int));
    if (!list || !ix) return free(list), free(ix), LP_ERR(LP_ERR_OOM, "out of memory");
    lp_status st = LP_OK;
    for (char *p = strtok_r(list, ",", &save); p && st == LP_OK; p = strtok_r(NULL, ",", &save)) {
        int i = recv ? lp_path_receiver_find(m, p) : lp_path_sender_find(m, p);
        if (i < 0)
            st = LP_ERR(LP_ERR_ARG, "%s: unknown %s '%s' (%s)", key, recv ? "receiver" : "sender", p,
                              recv ? "blocks.L.attn.head.H.q|k|v, blocks.L.mlp, logits" : "embed, blocks.L.attn.head.H, blocks.L.mlp");
        for (int j = 0; st == LP_OK && j < *n; j++)
            if (ix[j] == i) st = LP_ERR(LP_ERR_ARG, "%s: '%s' is given twice", key, p);
        ix[(*n)++] = i;
    }
    free(list);
    if (st != LP_OK) free(ix), *n = 0;
    else *out = ix;
    return st;
}

static void json_names(const lp_model *m, int recv, const int *ix, int n, char **out) {
    size_t cap = 64 + (size_t)n * 48, o = 0;
    char *s = malloc(cap), b[96];
    if (!s) return;
    o += snprintf(s + o, cap - o, "[");
    for (int i = 0; i < n; i++) {
        int k = ix ? ix[i] : i;
        recv ? lp_path_receiver_name(m, k, b, sizeof b) : lp_path_sender_name(m, k, b, sizeof b);
        o += snprintf(s + o, cap - o, "%s\"%s\"", i ? "," : "", b);
    }
    snprintf(s + o, cap - o, "]");
    *out = s;
}

/* One scores file for one pair: name [shape], with the component names as metadata. */
static lp_status write_scores(const char *dir, const lp_model *m, int index, const char *method, const float *v, int ndim, int64_t r, int64_t c,
                              const int *senders) {
    char name[64], path[1300];
    snprintf(name, sizeof name, "pair%06d.%s.%s", index, method, ndim == 2 ? "edges" : "effect");
    snprintf(path, sizeof path, "%s/scores-%s-%06d.safetensors", dir, method, index);
    lp_st_spec sp = {.name = name, .dtype = LP_F32, .ndim = ndim, .shape = {r, c}};
    char *sn = NULL, *rn = NULL;
    json_names(m, 0, senders, (int)r, &sn);
    if (ndim == 2) json_names(m, 1, NULL, (int)c, &rn);
    const char *meta[] = {"senders", sn ? sn : "[]", ndim == 2 ? "receivers" : NULL, rn ? rn : "[]", NULL};
    const void *d = v;
    lp_status st = lp_st_write(path, &sp, &d, 1, meta);
    free(sn), free(rn);
    return st;
}

typedef struct edge { float s; int i, j; } edge;
static int by_abs(const void *x, const void *y) {
    float a = fabsf(((const edge *)x)->s), b = fabsf(((const edge *)y)->s);
    return a < b ? 1 : a > b ? -1 : 0;
}

/* The top n edges of scores [ns, nr] by |score| (edges only). */
static edge *top_edges(const lp_model *m, const float *v, int ns, int nr, int n, int *n_out) {
    edge *e = malloc((size_t)ns * nr * sizeof *e);
    int k = 0;
    for (int i = 0; e && i < ns; i++)
        for (int j = 0; j < nr; j++)
            if (lp_path_is_edge(m, i, j)) e[k++] = (edge){v[(size_t)i * nr + j], i, j};
    if (e) qsort(e, k, sizeof *e, by_abs);
    *n_out = k < n ? k : n;
    return e;
}

/* Per pair: the metrics and the top edges (EAP), or each sender's effect (path patching). */
static lp_status one_pair(args *a, lp_model *m, const cli_pair *p, int exact, const int *snd, int nsnd, const int *rcv, int nrcv, const lp_path_opts *o,
                          const char *out, FILE *f) {
    lp_metric mt = {.kind = strcmp(lp_cfg_str(&a->cfg, "attrib.metric"), "logprob") == 0 ? LP_METRIC_LOGPROB : LP_METRIC_LOGIT_DIFF,
                    .answer = &p->answer, .wrong = &p->wrong};
    char b1[96], b2[96];
    if (!exact) {
        lp_eap_result r;
        LP_CHECK(lp_eap(m, p->clean, p->corrupted, p->T, &mt, o, &r));
        lp_status st = write_scores(out, m, p->index, "eap", r.scores, 2, r.n_senders, r.n_receivers, NULL);
        int n = 0;
        edge *e = st == LP_OK ? top_edges(m, r.scores, r.n_senders, r.n_receivers, (int)lp_cfg_int(&a->cfg, "attrib.top"), &n) : NULL;
        if (st == LP_OK && !e) st = LP_ERR(LP_ERR_OOM, "out of memory");
        fprintf(f, "{\"index\":%d,\"line\":%d,\"n_tokens\":%d,\"clean_metric\":%.8g,\"corrupted_metric\":%.8g,\"top_edges\":[", p->index, p->line, p->T,
                r.metric_clean, r.metric_corrupted);
        for (int i = 0; e && i < n; i++) {
            lp_path_sender_name(m, e[i].i, b1, sizeof b1), lp_path_receiver_name(m, e[i].j, b2, sizeof b2);
            fprintf(f, "%s{\"sender\":\"%s\",\"receiver\":\"%s\",\"score\":%.6g}", i ? "," : "", b1, b2, e[i].s);
        }
        fprintf(f, "]}\n");
        free(e);
        lp_eap_result_free(&r);
        return st;
    }
    float *eff = malloc(nsnd * sizeof(float));
    double mc = 0, mx = 0, v;
    if (!eff) LP_FAIL(LP_ERR_OOM, "out of memory");
    lp_status st = LP_OK;
    for (int i = 0; st == LP_OK && i < nsnd; i++) st = lp_path_patch(m, p->clean, p->corrupted, p->T, &mt, snd[i], rcv, nrcv, o, &mc, &mx, &v), eff[i] = (float)v;
    if (st == LP_OK) st = write_scores(out, m, p->index, "path", eff, 1, nsnd, 0, snd);
    if (st == LP_OK) {
        fprintf(f, "{\"index\":%d,\"line\":%d,\"n_tokens\":%d,\"clean_metric\":%.8g,\"corrupted_metric\":%.8g,\"path\":[", p->index, p->line, p->T, mc, mx);
        for (int i = 0; i < nsnd; i++) {
            lp_path_sender_name(m, snd[i], b1, sizeof b1);
            fprintf(f, "%s{\"sender\":\"%s\",\"effect\":%.6g}", i ? "," : "", b1, eff[i]);
        }
        fprintf(f, "]}\n");
    }
    free(eff);
    return st;
}

int cli_paths_sweep(args *a, int exact) {
    lp_status st = lp_cfg_require(&a->cfg, (const char *[]){"model.path", "attrib.pairs", "attrib.out", NULL});
    if (st != LP_OK) return cli_fail(st);
    lp_model *m = NULL;
    lp_tokenizer *tk = NULL;
    cli_pairs sw = {0};
    int *snd = NULL, *rcv = NULL, nsnd = 0, nrcv = 0;
    lp_path_opts o = {.freeze = lp_cfg_str(&a->cfg, "path.freeze"), .ig_steps = (int)lp_cfg_int(&a->cfg, "attrib.ig_steps"),
                      .ig_batch = (int)lp_cfg_int(&a->cfg, "attrib.ig_batch")};
    st = cli_open_model(a, &m);
    if (st == LP_OK && exact) st = parse_list(a, m, "path.sender", 0, &snd, &nsnd);
    if (st == LP_OK && exact) st = parse_list(a, m, "path.receivers", 1, &rcv, &nrcv);
    for (int i = 0; st == LP_OK && i < nsnd; i++) /* every receiver downstream of every sender, before any work */
        for (int j = 0; st == LP_OK && j < nrcv; j++)
            if (!lp_path_is_edge(m, snd[i], rcv[j])) {
                char b1[96], b2[96];
                lp_path_sender_name(m, snd[i], b1, sizeof b1), lp_path_receiver_name(m, rcv[j], b2, sizeof b2);
                st = LP_ERR(LP_ERR_ARG, "path.receivers: %s is not downstream of the sender %s", b2, b1);
            }
    if (st == LP_OK && lp_tokenizer_load(&tk, lp_cfg_str(&a->cfg, "model.path")) != LP_OK) tk = NULL; /* id lists still work */
    if (st == LP_OK) st = cli_read_pairs(a, m, tk, &sw);
    const char *out = lp_cfg_str(&a->cfg, "attrib.out"), *methods[2] = {exact ? "path" : "eap", NULL};
    lp_lock lock = {.fd = -1};
    sweep_out so = {.fd = -1};
    if (st == LP_OK) st = lp_lock_output(&lock, out, 1);
    if (st == LP_OK) st = sweep_job_check(a, out, exact, m);
    if (st == LP_OK) st = sweep_out_open(&so, out, sw.n + sw.n_bad, methods);
    int ran = 0, skipped = 0, n_circuit = 0;
    double t0 = cli_now();
    for (int i = 0; st == LP_OK && i < sw.n; i++) {
        if (so.done[sw.pairs[i].index]) {
            skipped++;
            continue;
        }
        char *line = NULL;
        size_t n = 0;
        FILE *f = open_memstream(&line, &n);
        if (!f) st = LP_ERR(LP_ERR_OOM, "out of memory");
        if (st == LP_OK) st = one_pair(a, m, &sw.pairs[i], exact, snd, nsnd, rcv, nrcv, &o, out, f);
        if (f && fclose(f) != 0 && st == LP_OK) st = LP_ERR(LP_ERR_OOM, "out of memory for the results line");
        if (st == LP_OK) st = sweep_out_append(&so, line, n);
        free(line);
        ran++;
        if (isatty(2)) fprintf(stderr, "\r%s %d/%d pairs   ", exact ? "path patching" : "edge attribution", ran, sw.n - skipped);
    }
    if (isatty(2)) fputc('\n', stderr);
    double secs = cli_now() - t0;
    st = sweep_out_close(&so, st);
    if (st == LP_OK && !exact) st = cli_circuit_write(a, m, out, &n_circuit);
    int rc = 0;
    if (st != LP_OK) {
        rc = cli_fail(st);
    } else {
        printf("%s: %d pairs done (%d already in %s), %.2f pairs/s on %s; results in %s\n", exact ? "path patching" : "edge attribution", ran, skipped,
               so.path, secs > 0 ? ran / secs : 0, cli_dev_name(m), out);
        if (!exact) printf("  circuit of the top %lld edges (mean over %d pairs): %s/circuit.json, %s/circuit.html\n", (long long)lp_cfg_int(&a->cfg, "attrib.top_edges"),
                           n_circuit, out, out);
        rc = cli_report_bad(a, &sw, rc);
    }
    lp_lock_release(&lock);
    free(snd), free(rcv);
    cli_pairs_free(&sw);
    lp_tokenizer_free(tk);
    lp_model_free(m);
    return rc;
}
