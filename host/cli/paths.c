/* paths.c: the sweeps between components (paths.h) over attrib.pairs, with the output
 * directory of attrib.c (sweep_out.c: resumable, locked, job.json):
 *   loupe patch --patch.kind=path --path.sender=S[,S...] --path.receivers=R[,R...]
 *       per pair the effect of each sender through the receivers (pairNNNNNN.path.effect
 *       [n_senders] in scores-path-*.safetensors)
 *   loupe attribute --attrib.edges=true [--attrib.ig_steps=N]
 *       per pair every edge's score (pairNNNNNN.eap.edges [n_senders, n_receivers] in
 *       scores-eap-*.safetensors, the names in the files' metadata); at the end circuit.json
 *       (the attrib.top_edges edges by |mean score| over every pair in the output) and
 *       circuit.html (the same as a layered graph, self-contained).
 * Under mpirun/srun (dist.dp, dist.tp = 1) pair k goes to data-parallel rank k % dp, which
 * sends its scores and result line to rank 0 (sweep_dist.c); rank 0 alone writes, in the
 * order one process would. */
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loupe/attrib.h"
#include "loupe/dist.h"
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

/* What every pair of a sweep shares. */
typedef struct {
    args *a;
    lp_model *m;
    int exact, *snd, nsnd, *rcv, nrcv;
    lp_path_opts o;
    const char *out;
} paths_run;

/* One pair's scores into r->s[0] (the edges [ns, nr], or each sender's effect as [nsnd, 1]),
 * its metrics, and its result line into f: the top edges (EAP), or the effects. */
static lp_status one_pair(const paths_run *x, const cli_pair *p, lp_pair_result *r, FILE *f) {
    lp_model *m = x->m;
    lp_metric mt = {.kind = strcmp(lp_cfg_str(&x->a->cfg, "attrib.metric"), "logprob") == 0 ? LP_METRIC_LOGPROB : LP_METRIC_LOGIT_DIFF,
                    .answer = &p->answer, .wrong = &p->wrong};
    char b1[96], b2[96];
    lp_node_scores *s = &r->s[0];
    if (!x->exact) {
        lp_eap_result e;
        LP_CHECK(lp_eap(m, p->clean, p->corrupted, p->T, &mt, &x->o, &e));
        *s = (lp_node_scores){.v = e.scores, .ndim = 2, .shape = {e.n_senders, e.n_receivers}};
        e.scores = NULL; /* r owns them now */
        r->metric_clean = e.metric_clean, r->metric_corrupted = e.metric_corrupted;
        lp_eap_result_free(&e);
        int n = 0;
        edge *t = top_edges(m, s->v, (int)s->shape[0], (int)s->shape[1], (int)lp_cfg_int(&x->a->cfg, "attrib.top"), &n);
        if (!t) LP_FAIL(LP_ERR_OOM, "out of memory");
        fprintf(f, "{\"index\":%d,\"line\":%d,\"n_tokens\":%d,\"clean_metric\":%.8g,\"corrupted_metric\":%.8g,\"top_edges\":[", p->index, p->line, p->T,
                r->metric_clean, r->metric_corrupted);
        for (int i = 0; i < n; i++) {
            lp_path_sender_name(m, t[i].i, b1, sizeof b1), lp_path_receiver_name(m, t[i].j, b2, sizeof b2);
            fprintf(f, "%s{\"sender\":\"%s\",\"receiver\":\"%s\",\"score\":%.6g}", i ? "," : "", b1, b2, t[i].s);
        }
        fprintf(f, "]}\n");
        free(t);
        return LP_OK;
    }
    *s = (lp_node_scores){.v = malloc(x->nsnd * sizeof(float)), .ndim = 2, .shape = {x->nsnd, 1}};
    double mc = 0, mx = 0, v;
    if (!s->v) LP_FAIL(LP_ERR_OOM, "out of memory");
    for (int i = 0; i < x->nsnd; i++) {
        LP_CHECK(lp_path_patch(m, p->clean, p->corrupted, p->T, &mt, x->snd[i], x->rcv, x->nrcv, &x->o, &mc, &mx, &v));
        s->v[i] = (float)v;
    }
    r->metric_clean = mc, r->metric_corrupted = mx;
    fprintf(f, "{\"index\":%d,\"line\":%d,\"n_tokens\":%d,\"clean_metric\":%.8g,\"corrupted_metric\":%.8g,\"path\":[", p->index, p->line, p->T, mc, mx);
    for (int i = 0; i < x->nsnd; i++) {
        lp_path_sender_name(m, x->snd[i], b1, sizeof b1);
        fprintf(f, "%s{\"sender\":\"%s\",\"effect\":%.6g}", i ? "," : "", b1, s->v[i]);
    }
    fprintf(f, "]}\n");
    return LP_OK;
}

/* The rank given pair p: its results, packed for rank 0 (sweep_dist.c), or its error. */
static lp_status compute_pair(const paths_run *x, const cli_pair *p, char **pk, size_t *n_pk) {
    lp_pair_result r = {0};
    char *line = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&line, &n);
    lp_status st = f ? one_pair(x, p, &r, f) : LP_ERR(LP_ERR_OOM, "out of memory");
    if (f && fclose(f) != 0 && st == LP_OK) st = LP_ERR(LP_ERR_OOM, "out of memory for the results line");
    sweep_batch_out bo = {.nb = 1, .res = &r, .lines = line, .n_lines = n};
    lp_status pst = sweep_pack(&bo, st, pk, n_pk);
    free(line);
    lp_pair_result_free(&r);
    return st != LP_OK ? st : pst;
}

/* Rank 0: pair p's packed results (from world rank `from`): its scores file, then its line. */
static lp_status write_pair(const paths_run *x, sweep_out *so, const cli_pair *p, const char *pk, size_t n_pk, int from) {
    lp_pair_result r = {0};
    sweep_batch_out bo = {.nb = 1, .res = &r};
    lp_status st = sweep_unpack(pk, n_pk, from, &bo);
    if (st != LP_OK) return st;
    const lp_node_scores *s = &r.s[0];
    if (!s->v) st = LP_ERR(LP_ERR_INTERNAL, "rank %d sent no scores for pair %d", from, p->index);
    else if (x->exact) st = write_scores(x->out, x->m, p->index, "path", s->v, 1, s->shape[0], 0, x->snd);
    else st = write_scores(x->out, x->m, p->index, "eap", s->v, 2, s->shape[0], s->shape[1], NULL);
    if (st == LP_OK) st = sweep_out_append(so, bo.lines, bo.n_lines);
    lp_pair_result_free(&r);
    return st;
}

/* The pairs not yet done, dp at a time: pair k of them by data-parallel rank k % dp, each
 * sent to rank 0, which writes them in order; after each round all ranks agree on going on. */
static lp_status run_pairs(const paths_run *x, sweep_out *so, const cli_pairs *sw, const unsigned char *done, int *ran, int *skipped) {
    lp_dist *d = cli_dist();
    int dp = lp_dist_dp_size(d), dpr = lp_dist_dp_rank(d), me = lp_dist_rank(d), n = 0;
    const char *what = x->exact ? "path patching" : "edge attribution";
    const cli_pair **todo = malloc((size_t)(sw->n ? sw->n : 1) * sizeof *todo);
    size_t *counts = malloc((size_t)dp * sizeof *counts);
    lp_status st = todo && counts ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory");
    for (int i = 0; st == LP_OK && i < sw->n; i++)
        if (done[sw->pairs[i].index]) ++*skipped;
        else todo[n++] = &sw->pairs[i];
    for (int r0 = 0; st == LP_OK && r0 < n; r0 += dp) {
        char *pk = NULL, *all = NULL;
        size_t n_pk = 0;
        if (r0 + dpr < n) st = compute_pair(x, todo[r0 + dpr], &pk, &n_pk);
        lp_status gst = lp_dist_gather(d, LP_DIST_DP, pk, n_pk, (void **)&all, counts, 0); /* every rank, with a pair or not */
        if (st == LP_OK) st = gst;
        size_t off = 0;
        for (int j = 0; st == LP_OK && me == 0 && all && j < dp && r0 + j < n; off += counts[j], j++) {
            st = write_pair(x, so, todo[r0 + j], all + off, counts[j], j);
            ++*ran;
            if (isatty(2)) fprintf(stderr, "\r%s %d/%d pairs   ", what, *ran, n);
        }
        free(pk), free(all);
        st = sweep_agree(d, st, what);
    }
    free(todo), free(counts);
    return st;
}

/* Rank 0 alone holds attrib.out (its lock, job.json, the repair of a killed run's files) and
 * tells every rank which pairs are done; done is so->done there, a copy elsewhere. */
static lp_status paths_begin(const paths_run *x, const cli_pairs *sw, lp_status st, lp_lock *lock, sweep_out *so, unsigned char **done) {
    lp_dist *d = cli_dist();
    int n_max = sw->n + sw->n_bad;
    const char *methods[2] = {x->exact ? "path" : "eap", NULL};
    *done = NULL;
    if (lp_dist_rank(d) == 0) {
        if (st == LP_OK) st = lp_lock_output(lock, x->out, 1);
        if (st == LP_OK) st = sweep_job_check(x->a, x->out, x->exact, x->m);
        if (st == LP_OK) st = sweep_out_open(so, x->out, n_max, methods);
        if (st == LP_OK) *done = so->done;
    } else if (st == LP_OK) {
        *done = calloc((size_t)n_max + 1, 1);
        if (!*done) st = LP_ERR(LP_ERR_OOM, "out of memory");
    }
    st = sweep_agree(d, st, x->exact ? "path patching" : "edge attribution");
    if (st == LP_OK) st = lp_dist_broadcast(d, LP_DIST_WORLD, *done, (size_t)n_max, 0);
    return st;
}

/* Every receiver downstream of every sender, before any work. */
static lp_status check_edges(const paths_run *x) {
    for (int i = 0; i < x->nsnd; i++)
        for (int j = 0; j < x->nrcv; j++)
            if (!lp_path_is_edge(x->m, x->snd[i], x->rcv[j])) {
                char b1[96], b2[96];
                lp_path_sender_name(x->m, x->snd[i], b1, sizeof b1), lp_path_receiver_name(x->m, x->rcv[j], b2, sizeof b2);
                LP_FAIL(LP_ERR_ARG, "path.receivers: %s is not downstream of the sender %s", b2, b1);
            }
    return LP_OK;
}

/* Rank 0: the summary lines, or the error; and the bad lines. */
static int paths_report(const paths_run *x, const cli_pairs *sw, const sweep_out *so, lp_status st, int ran, int skipped, double secs, int n_circuit) {
    if (st != LP_OK) return cli_fail(st);
    printf("%s: %d pairs done (%d already in %s), %.2f pairs/s on %s; results in %s\n", x->exact ? "path patching" : "edge attribution", ran, skipped,
           so->path, secs > 0 ? ran / secs : 0, cli_dev_name(x->m), x->out);
    if (!x->exact)
        printf("  circuit of the top %lld edges (mean over %d pairs): %s/circuit.json, %s/circuit.html\n", (long long)lp_cfg_int(&x->a->cfg, "attrib.top_edges"),
               n_circuit, x->out, x->out);
    return cli_report_bad(x->a, sw, 0);
}

int cli_paths_sweep(args *a, int exact) {
    lp_status st = lp_cfg_require(&a->cfg, (const char *[]){"model.path", "attrib.pairs", "attrib.out", NULL});
    if (st != LP_OK) return cli_fail(st);
    paths_run x = {.a = a, .exact = exact, .out = lp_cfg_str(&a->cfg, "attrib.out"),
                   .o = {.freeze = lp_cfg_str(&a->cfg, "path.freeze"), .ig_steps = (int)lp_cfg_int(&a->cfg, "attrib.ig_steps"),
                         .ig_batch = (int)lp_cfg_int(&a->cfg, "attrib.ig_batch")}};
    lp_tokenizer *tk = NULL;
    cli_pairs sw = {0};
    st = cli_open_model(a, &x.m);
    if (st == LP_OK && exact) st = parse_list(a, x.m, "path.sender", 0, &x.snd, &x.nsnd);
    if (st == LP_OK && exact) st = parse_list(a, x.m, "path.receivers", 1, &x.rcv, &x.nrcv);
    if (st == LP_OK) st = check_edges(&x);
    if (st == LP_OK && lp_tokenizer_load(&tk, lp_cfg_str(&a->cfg, "model.path")) != LP_OK) tk = NULL; /* id lists still work */
    if (st == LP_OK) st = cli_read_pairs(a, x.m, tk, &sw);
    lp_lock lock = {.fd = -1};
    sweep_out so = {.fd = -1};
    unsigned char *done = NULL;
    st = paths_begin(&x, &sw, st, &lock, &so, &done); /* every rank, failed or not: they agree on going on */
    int ran = 0, skipped = 0, n_circuit = 0;
    double t0 = cli_now();
    if (st == LP_OK) st = run_pairs(&x, &so, &sw, done, &ran, &skipped);
    if (isatty(2) && lp_dist_rank(cli_dist()) == 0) fputc('\n', stderr);
    double secs = cli_now() - t0;
    if (done == so.done) done = NULL; /* rank 0's: sweep_out_close frees it */
    st = sweep_out_close(&so, st);
    if (st == LP_OK && !exact && lp_dist_rank(cli_dist()) == 0) st = cli_circuit_write(a, x.m, x.out, &n_circuit);
    int rc = paths_report(&x, &sw, &so, st, ran, skipped, secs, n_circuit);
    free(done);
    lp_lock_release(&lock);
    free(x.snd), free(x.rcv);
    cli_pairs_free(&sw);
    lp_tokenizer_free(tk);
    lp_model_free(x.m);
    return rc;
}
