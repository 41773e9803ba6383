/* attrib.c: `loupe attribute` (attribution patching) and `loupe patch` (exact activation
 * patching) sweeps over a JSONL file of prompt pairs, resumable: pairs already in
 * results.jsonl are skipped on a restart (sweep_out.c keeps the output whole). Under
 * mpirun/srun the batches are shared out over data-parallel ranks (each a TP group) and
 * rank 0 alone writes, in the order one process would (sweep_dist.c carries the results). */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loupe/attrib.h"
#include "loupe/dist.h"
#include "loupe/output.h"
#include "loupe/pairs.h"
#include "loupe/safetensors.h"
#include "loupe/sae.h"
#include "loupe/textfile.h"
#include "loupe/tokenizer.h"
#include "cli.h"

typedef cli_pair pair;
typedef cli_bad_line bad_line;
typedef cli_pairs sweep;

static lp_status parse_nodes(const args *a, unsigned *kinds) {
    *kinds = 0;
    const char *v = lp_cfg_str(&a->cfg, "attrib.nodes");
    if (strcmp(v, "all") == 0) return LP_OK;
    char *list = strdup(v), *save = NULL;
    if (!list) LP_FAIL(LP_ERR_OOM, "out of memory");
    for (char *p = strtok_r(list, ",", &save); p; p = strtok_r(NULL, ",", &save)) {
        int k = lp_node_kind_parse(p);
        if (k < 0) {
            lp_status st = LP_ERR(LP_ERR_NOT_FOUND, "attrib.nodes: unknown node kind '%s' (hook_resid_pre, hook_resid_mid, hook_resid_post, "
                                             "hook_attn_out, hook_mlp_out, attn.hook_z, attn.hook_q, attn.hook_k, attn.hook_v, "
                                             "attn.hook_pattern)", p);
            free(list);
            return st;
        }
        *kinds |= 1u << k;
    }
    free(list);
    return LP_OK;
}

typedef struct top_node { float score; int kind; int64_t i; } top_node;
static int by_abs_desc(const void *x, const void *y) {
    float a = fabsf(((const top_node *)x)->score), b = fabsf(((const top_node *)y)->score);
    return a < b ? 1 : a > b ? -1 : 0;
}

/* One results.jsonl line: the metrics, the top nodes by |score|, correlations if given. */
static lp_status write_result(FILE *f, lp_model *m, const pair *p, const lp_pair_result *r, int top, const double *pear, const double *spear,
                         const lp_sae_attrib *sa) {
    size_t n = 0;
    for (int k = 0; k < LP_NODE_KINDS; k++)
        if (r->s[k].v) n += (size_t)r->s[k].shape[0] * r->s[k].shape[1] * (r->s[k].ndim == 3 ? r->s[k].shape[2] : 1);
    top_node *all = malloc((n ? n : 1) * sizeof *all);
    if (!all) LP_FAIL(LP_ERR_OOM, "out of memory for %zu scores", n);
    size_t o = 0;
    for (int k = 0; k < LP_NODE_KINDS; k++) {
        const lp_node_scores *s = &r->s[k];
        if (!s->v) continue;
        size_t c = (size_t)s->shape[0] * s->shape[1] * (s->ndim == 3 ? s->shape[2] : 1);
        for (size_t i = 0; i < c; i++) all[o++] = (top_node){s->v[i], k, (int64_t)i};
    }
    qsort(all, o, sizeof *all, by_abs_desc);
    fprintf(f, "{\"index\":%d,\"line\":%d,\"n_tokens\":%d,\"clean_metric\":%.8g,\"corrupted_metric\":%.8g,\"top\":[", p->index, p->line, p->T,
            r->metric_clean, r->metric_corrupted);
    for (size_t i = 0; i < o && i < (size_t)top; i++) {
        char name[160];
        lp_node_name(m, all[i].kind, &r->s[all[i].kind], all[i].i, name, sizeof name);
        fprintf(f, "%s{\"node\":\"%s\",\"score\":%.6g}", i ? "," : "", name, all[i].score);
    }
    fprintf(f, "]");
    if (pear) {
        fprintf(f, ",\"atp_vs_exact\":{");
        int first = 1;
        for (int k = 0; k < LP_NODE_KINDS; k++)
            if (r->s[k].v) fprintf(f, "%s\"%s\":{\"pearson\":%.4f,\"spearman\":%.4f}", first ? "" : ",", lp_node_kind_name(k), pear[k], spear[k]), first = 0;
        fprintf(f, "}");
    }
    if (sa) { /* the SAE's latents as nodes, and its error node */
        fprintf(f, ",\"sae_error_atp\":[");
        for (int t = 0; t < p->T; t++) fprintf(f, "%s%.6g", t ? "," : "", sa->error_atp[t]);
        fprintf(f, "],\"sae_top\":[");
        for (int i = 0; i < sa->n_top; i++)
            fprintf(f, "%s{\"pos\":%d,\"latent\":%d,\"atp\":%.6g,\"grad_x_act\":%.6g}", i ? "," : "", sa->top[i].pos, sa->top[i].latent,
                    sa->top[i].atp, sa->top[i].grad_act);
        fprintf(f, "]");
    }
    fprintf(f, "}\n");
    free(all);
    return LP_OK;
}

/* The score tensors of a batch of pairs, under a temporary name then renamed. */
static lp_status write_scores(const char *dir, const pair *ps, const lp_pair_result *rs, int nb, const char *prefix) {
    lp_st_spec *specs = calloc((size_t)nb * LP_NODE_KINDS, sizeof *specs);
    const void **datas = calloc((size_t)nb * LP_NODE_KINDS, sizeof *datas);
    char (*names)[96] = calloc((size_t)nb * LP_NODE_KINDS, sizeof *names);
    if (!specs || !datas || !names) {
        free(specs), free(datas), free(names);
        LP_FAIL(LP_ERR_OOM, "out of memory");
    }
    int n = 0;
    for (int b = 0; b < nb; b++)
        for (int k = 0; k < LP_NODE_KINDS; k++) {
            const lp_node_scores *s = &rs[b].s[k];
            if (!s->v) continue;
            snprintf(names[n], sizeof names[n], "pair%06d.%s%s", ps[b].index, prefix, lp_node_kind_name(k));
            specs[n] = (lp_st_spec){.name = names[n], .dtype = LP_F32, .ndim = s->ndim};
            memcpy(specs[n].shape, s->shape, sizeof s->shape);
            datas[n++] = s->v;
        }
    char path[1300];
    /* scores-atp-000012.safetensors: named by the method and the batch's first pair */
    char method[16];
    snprintf(method, sizeof method, "%.*s", (int)strcspn(prefix, "."), prefix);
    snprintf(path, sizeof path, "%s/scores-%s-%06d.safetensors", dir, method, ps[0].index);
    lp_status st = lp_st_write(path, specs, datas, n, NULL);
    free(specs), free(datas), free(names);
    return st;
}

static lp_status make_metric(const args *a, lp_metric *mt) {
    const char *k = lp_cfg_str(&a->cfg, "attrib.metric");
    memset(mt, 0, sizeof *mt);
    mt->kind = strcmp(k, "logprob") == 0 ? LP_METRIC_LOGPROB : LP_METRIC_LOGIT_DIFF;
    return LP_OK;
}

static void progress(const char *what, int done, int total, double secs) {
    if (!isatty(2)) return;
    fprintf(stderr, "\r%s %d/%d pairs  %.2f pairs/s   ", what, done, total, secs > 0 ? done / secs : 0);
}

/* What a sweep carries from one batch of pairs to the next. */
typedef struct {
    lp_model *m;
    lp_metric mt;
    lp_attrib_opts o;
    int exact, compare, top;
    const char *out;
    lp_sae *sae; /* attrib.sae, or NULL */
    lp_ctx *sc;  /* the SAE's context */
    sweep_out *so;
    lp_pair_result *res; /* [batch size] */
    double corr_p[LP_NODE_KINDS], corr_s[LP_NODE_KINDS]; /* patch.compare_atp: sums over pairs */
    int corr_n;
} sweep_run;

/* Attributes (or patches) nb pairs of T tokens into one packed batch (sweep_dist.c): their
 * scores, their result lines, and the AtP-vs-exact correlations; or the error. Every rank
 * of a TP group runs it (the model's collectives), the batch its DP rank was given. */
static lp_status compute_batch(sweep_run *x, const pair *batch, int nb, int T, char **pk, size_t *n_pk) {
    lp_status st = LP_OK;
    lp_pair_result atp1 = {0};
    lp_sae_attrib *sa = NULL;
    char *lines = NULL;
    size_t n_lines = 0;
    int32_t *cl = malloc((size_t)nb * T * sizeof(int32_t)), *cx = malloc((size_t)nb * T * sizeof(int32_t));
    int32_t *ans = malloc(nb * sizeof(int32_t)), *wr = malloc(nb * sizeof(int32_t));
    double pear[LP_NODE_KINDS] = {0}, spear[LP_NODE_KINDS] = {0};
    if (!cl || !cx || !ans || !wr) {
        st = LP_ERR(LP_ERR_OOM, "out of memory");
        goto done;
    }
    for (int b = 0; b < nb; b++) {
        memcpy(cl + (size_t)b * T, batch[b].clean, T * sizeof(int32_t));
        memcpy(cx + (size_t)b * T, batch[b].corrupted, T * sizeof(int32_t));
        ans[b] = batch[b].answer, wr[b] = batch[b].wrong;
    }
    x->mt.answer = ans, x->mt.wrong = wr;
    if (!x->exact) {
        st = lp_attrib_atp(x->m, cl, cx, nb, T, &x->mt, &x->o, x->res);
    } else {
        st = lp_attrib_exact(x->m, cl, cx, T, &x->mt, &x->o, &x->res[0]);
        if (st == LP_OK && x->compare) {
            st = lp_attrib_atp(x->m, cl, cx, 1, T, &x->mt, &x->o, &atp1);
            const lp_node_scores *e = x->res[0].s;
            for (int k = 0; st == LP_OK && k < LP_NODE_KINDS; k++) {
                if (!e[k].v) continue;
                size_t c = (size_t)e[k].shape[0] * e[k].shape[1] * (e[k].ndim == 3 ? e[k].shape[2] : 1);
                pear[k] = lp_pearson(atp1.s[k].v, e[k].v, c), spear[k] = lp_spearman(atp1.s[k].v, e[k].v, c);
            }
        }
    }
    if (st == LP_OK && x->sae) {
        sa = calloc(nb, sizeof *sa);
        st = sa ? lp_attrib_sae(x->m, x->sae, x->sc, cl, cx, nb, T, &x->mt, x->top, sa) : LP_ERR(LP_ERR_OOM, "out of memory");
    }
    FILE *mf = st == LP_OK ? open_memstream(&lines, &n_lines) : NULL;
    if (st == LP_OK && !mf) st = LP_ERR(LP_ERR_OOM, "out of memory");
    for (int b = 0; st == LP_OK && b < nb; b++)
        st = write_result(mf, x->m, &batch[b], &x->res[b], x->top, x->exact && x->compare ? pear : NULL, spear, sa ? &sa[b] : NULL);
    if (mf && fclose(mf) != 0 && st == LP_OK) st = LP_ERR(LP_ERR_OOM, "out of memory for the results lines");
done:;
    sweep_batch_out bo = {.nb = nb, .res = x->res, .atp1 = x->exact && x->compare ? &atp1 : NULL, .pear = pear, .spear = spear,
                          .lines = lines, .n_lines = n_lines};
    lp_status pst = sweep_pack(&bo, st, pk, n_pk);
    free(lines);
    for (int b = 0; sa && b < nb; b++) lp_sae_attrib_free(&sa[b]);
    free(sa);
    for (int b = 0; b < nb; b++) lp_pair_result_free(&x->res[b]);
    lp_pair_result_free(&atp1);
    free(cl), free(cx), free(ans), free(wr);
    return st != LP_OK ? st : pst;
}

/* Rank 0: one batch's packed results (computed by world rank `from`) into the output: the
 * scores files first, then the result lines in one append. */
static lp_status write_batch(sweep_run *x, const pair *batch, int nb, const char *pk, size_t n_pk, int from) {
    lp_pair_result atp1 = {0};
    double pear[LP_NODE_KINDS], spear[LP_NODE_KINDS];
    sweep_batch_out bo = {.nb = nb, .res = x->res, .atp1 = x->exact && x->compare ? &atp1 : NULL, .pear = pear, .spear = spear};
    lp_status st = sweep_unpack(pk, n_pk, from, &bo);
    if (st == LP_OK) st = write_scores(x->out, batch, x->res, nb, x->exact ? "exact." : "atp.");
    if (st == LP_OK && bo.atp1) st = write_scores(x->out, batch, &atp1, 1, "atp.");
    if (st == LP_OK) st = sweep_out_append(x->so, bo.lines, bo.n_lines);
    if (st == LP_OK && bo.atp1) {
        for (int k = 0; k < LP_NODE_KINDS; k++)
            if (x->res[0].s[k].v) x->corr_p[k] += pear[k], x->corr_s[k] += spear[k];
        x->corr_n++;
    }
    for (int b = 0; b < nb; b++) lp_pair_result_free(&x->res[b]);
    lp_pair_result_free(&atp1);
    return st;
}

/* The summary line (and the AtP-vs-exact correlations), or the error; and the bad lines. */
static int report(const args *a, const sweep_run *x, const cli_pairs *sw, lp_status st, int ran, int skipped, double secs) {
    if (st != LP_OK) return cli_fail(st);
    printf("%s: %d pairs done (%d already in %s), %.2f pairs/s on %s; results in %s\n", x->exact ? "patch" : "attribute", ran, skipped,
           x->so->path, secs > 0 ? ran / secs : 0, cli_dev_name(x->m), x->out);
    if (x->compare && x->corr_n)
        for (int k = 0; k < LP_NODE_KINDS; k++)
            if (!x->o.kinds || (x->o.kinds >> k & 1u))
                printf("  %-20s attribution vs exact patching: Pearson %.3f, Spearman %.3f (mean over %d pairs)\n", lp_node_kind_name(k),
                       x->corr_p[k] / x->corr_n, x->corr_s[k] / x->corr_n, x->corr_n);
    return cli_report_bad(a, sw, 0);
}

/* The batches, as one process makes them: the pairs not yet done in file order, up to B of
 * the same length each. Batch i is plan->pairs[plan->first[i] ..][.. plan->count[i]]. */
typedef struct { pair *pairs; int *first, *count, n; } sweep_plan;

static lp_status plan_batches(const sweep *sw, const unsigned char *done, int B, sweep_plan *pl, int *skipped) {
    memset(pl, 0, sizeof *pl);
    pl->pairs = malloc((size_t)(sw->n ? sw->n : 1) * sizeof *pl->pairs);
    pl->first = malloc((size_t)(sw->n ? sw->n : 1) * sizeof(int)), pl->count = malloc((size_t)(sw->n ? sw->n : 1) * sizeof(int));
    if (!pl->pairs || !pl->first || !pl->count) LP_FAIL(LP_ERR_OOM, "out of memory");
    int np = 0;
    for (int i = 0; i < sw->n; i++) {
        const pair *p = &sw->pairs[i];
        if (done[p->index]) {
            ++*skipped;
            continue;
        }
        int last = pl->n - 1;
        if (pl->n == 0 || pl->count[last] == B || pl->pairs[pl->first[last]].T != p->T) pl->first[pl->n] = np, pl->count[pl->n++] = 0, last++;
        pl->pairs[np++] = *p, pl->count[last]++;
    }
    return LP_OK;
}

static void plan_free(sweep_plan *pl) { free(pl->pairs), free(pl->first), free(pl->count); }

/* Every batch, dp at a time: batch k is computed by the TP group of DP rank k % dp; the
 * first rank of each group sends it to rank 0, which writes them in batch order (so the
 * output is the one a single process writes). After each round every rank learns whether
 * any failed, and all stop together. */
static lp_status run_batches(sweep_run *x, const sweep_plan *pl, int *ran, const char *what, double t0) {
    lp_dist *d = cli_dist();
    int dp = lp_dist_dp_size(d), dpr = lp_dist_dp_rank(d), me = lp_dist_rank(d);
    size_t *counts = malloc((size_t)dp * sizeof *counts);
    if (!counts) LP_FAIL(LP_ERR_OOM, "out of memory");
    lp_status st = LP_OK;
    for (int r0 = 0; st == LP_OK && r0 < pl->n; r0 += dp) {
        int k = r0 + dpr;
        char *pk = NULL, *all = NULL;
        size_t n_pk = 0;
        if (k < pl->n) st = compute_batch(x, pl->pairs + pl->first[k], pl->count[k], pl->pairs[pl->first[k]].T, &pk, &n_pk);
        lp_status gst = LP_OK; /* every group takes part, with or without a batch (rank 0 names one that sent nothing) */
        if (lp_dist_tp_rank(d) == 0) gst = lp_dist_gather(d, LP_DIST_DP, pk, n_pk, (void **)&all, counts, 0);
        if (st == LP_OK) st = gst;
        size_t off = 0;
        for (int j = 0; me == 0 && all && j < dp && r0 + j < pl->n; off += counts[j], j++) {
            int b = r0 + j;
            lp_status w = write_batch(x, pl->pairs + pl->first[b], pl->count[b], all + off, counts[j], j * lp_dist_tp_size(d));
            if (st == LP_OK) st = w;
            if (st != LP_OK) break;
            *ran += pl->count[b];
            progress(what, *ran, pl->first[pl->n - 1] + pl->count[pl->n - 1], cli_now() - t0);
        }
        free(pk), free(all);
        st = sweep_agree(d, st, what);
    }
    free(counts);
    return st;
}

/* Rank 0 alone holds attrib.out (its lock, job.json, the repair of a killed run's files) and
 * tells every rank which pairs are done; done is so->done there, a copy elsewhere. */
static lp_status sweep_begin(const args *a, sweep_run *x, const sweep *sw, lp_status st, lp_lock *lock, unsigned char **done) {
    lp_dist *d = cli_dist();
    int n_max = sw->n + sw->n_bad;
    const char *methods[3] = {x->exact ? "exact" : "atp", x->compare ? "atp" : NULL, NULL};
    *done = NULL;
    if (lp_dist_rank(d) == 0) {
        if (st == LP_OK) st = lp_lock_output(lock, x->out, 1);
        if (st == LP_OK) st = sweep_job_check(a, x->out, x->exact, x->m);
        if (st == LP_OK) st = sweep_out_open(x->so, x->out, n_max, methods);
        if (st == LP_OK) *done = x->so->done;
    } else if (st == LP_OK) {
        *done = calloc((size_t)n_max + 1, 1);
        if (!*done) st = LP_ERR(LP_ERR_OOM, "out of memory");
    }
    st = sweep_agree(d, st, x->exact ? "patch" : "attribute");
    if (st == LP_OK) st = lp_dist_broadcast(d, LP_DIST_WORLD, *done, (size_t)n_max, 0);
    return st;
}

static int run_sweep(args *a, int exact) {
    if (exact ? strcmp(lp_cfg_str(&a->cfg, "patch.kind"), "path") == 0 : strcmp(lp_cfg_str(&a->cfg, "attrib.edges"), "true") == 0)
        return cli_paths_sweep(a, exact); /* between components: host/cli/paths.c */
    lp_status st = lp_cfg_require(&a->cfg, (const char *[]){"model.path", "attrib.pairs", "attrib.out", NULL});
    if (st != LP_OK) return cli_fail(st);
    sweep_out so = {.fd = -1};
    lp_ctx sc = {0};
    sweep_run x = {.exact = exact, .out = lp_cfg_str(&a->cfg, "attrib.out"), .top = (int)lp_cfg_int(&a->cfg, "attrib.top"),
                   .compare = exact && strcmp(lp_cfg_str(&a->cfg, "patch.compare_atp"), "true") == 0, .sc = &sc, .so = &so};
    x.o = (lp_attrib_opts){.grad_at_clean = strcmp(lp_cfg_str(&a->cfg, "attrib.grad_at"), "clean") == 0,
                           .ig_steps = (int)lp_cfg_int(&a->cfg, "attrib.ig_steps"),
                           .ig_batch = (int)lp_cfg_int(&a->cfg, "attrib.ig_batch"), .patch_batch = (int)lp_cfg_int(&a->cfg, "patch.batch"),
                           .prefix_share = strcmp(lp_cfg_str(&a->cfg, "attrib.prefix_share"), "true") == 0};
    if ((st = parse_nodes(a, &x.o.kinds)) != LP_OK) return cli_fail(st);
    make_metric(a, &x.mt);
    lp_tokenizer *tk = NULL;
    sweep sw = {0};
    st = cli_open_model(a, &x.m);
    if (st == LP_OK && lp_tokenizer_load(&tk, lp_cfg_str(&a->cfg, "model.path")) != LP_OK) tk = NULL; /* id lists still work */
    /* SAE latents as nodes: the SAE on the model's device, F32 */
    const char *sae_path = lp_cfg_str(&a->cfg, "attrib.sae");
    if (st == LP_OK && sae_path) {
        st = lp_ctx_init(&sc, lp_model_ctx(x.m)->device, LP_F32);
        if (st == LP_OK) st = lp_sae_load(&x.sae, &sc, sae_path);
    }
    if (st == LP_OK) st = cli_read_pairs(a, x.m, tk, &sw);
    int B = exact ? 1 : (int)lp_cfg_int(&a->cfg, "attrib.batch");
    /* one writer per attrib.out (rank 0); the same job only; results and scores made to agree */
    lp_lock lock = {.fd = -1};
    unsigned char *done = NULL;
    int skipped = 0, ran = 0;
    st = sweep_begin(a, &x, &sw, st, &lock, &done); /* every rank, failed or not: they agree on going on */
    sweep_plan plan = {0};
    double t0 = cli_now();
    x.res = calloc(B > 0 ? B : 1, sizeof *x.res);
    if (st == LP_OK && !x.res) st = LP_ERR(LP_ERR_OOM, "out of memory");
    if (st == LP_OK) st = plan_batches(&sw, done, B > 0 ? B : 1, &plan, &skipped);
    st = sweep_agree(cli_dist(), st, exact ? "patch" : "attribute");
    if (st == LP_OK) st = run_batches(&x, &plan, &ran, exact ? "patch" : "attribute", t0);
    if (isatty(2) && lp_dist_rank(cli_dist()) == 0) fputc('\n', stderr);
    double secs = cli_now() - t0;
    if (done == so.done) done = NULL; /* rank 0's: sweep_out_close frees it */
    int rc = report(a, &x, &sw, sweep_out_close(&so, st), ran, skipped, secs);
    free(done);
    lp_lock_release(&lock);
    plan_free(&plan), free(x.res);
    cli_pairs_free(&sw);
    lp_tokenizer_free(tk);
    if (x.sae) lp_sae_free(x.sae, &sc);
    if (sae_path) lp_ctx_free(&sc);
    lp_model_free(x.m);
    return rc;
}

int cmd_attribute(args *a) { return run_sweep(a, 0); }
int cmd_patch(args *a) { return run_sweep(a, 1); }
