/* graph.c: `loupe graph CONFIG.ini`: an attribution graph (graph.h) per prompt of a JSONL
 * file, as a resumable sweep into graph.out:
 *   job.json             the settings that shape the graphs; a restart with others is refused
 *   <slug>.json          each graph in the circuit-tracer / Neuronpedia viewer's JSON
 *   <slug>.html          its self-contained page (graph_page.h), with graph.html = true
 *   graph-metadata.json  the list of graphs, as circuit-tracer's add_graph_metadata
 *   results.jsonl        one line per prompt, appended only after its files are in place
 * Before each graph the memory plan is printed, and a graph that would not fit in
 * graph.host_budget_mb is refused naming the settings to change. One writer per graph.out. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loupe/clt.h"
#include "loupe/graph.h"
#include "loupe/graph_page.h"
#include "loupe/output.h"
#include "loupe/pairs.h"
#include "loupe/textfile.h"
#include "loupe/tokenizer.h"
#include "cli.h"

typedef struct gprompt {
    lp_prompt p;
    int line;
    char slug[128];
} gprompt;

static void prompts_free(gprompt *ps, int n) {
    for (int i = 0; i < n; i++) lp_prompt_free(&ps[i].p);
    free(ps);
}

/* The slug of a line: its "slug" field (letters, digits, - and _ only), else graph-<line>. */
static lp_status slug_of(const char *path, const char *ln, size_t n, int line, char *slug, size_t cap) {
    cJSON *j = cJSON_ParseWithLength(ln, n);
    const cJSON *s = cJSON_GetObjectItemCaseSensitive(j, "slug");
    lp_status st = LP_OK;
    if (cJSON_IsString(s)) {
        size_t k = strlen(s->valuestring);
        for (size_t i = 0; i < k && st == LP_OK; i++) {
            char c = s->valuestring[i];
            if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_'))
                st = LP_ERR(LP_ERR_FORMAT, "%s:%d: slug: only letters, digits, - and _ (it names the graph's files)", path, line);
        }
        if (st == LP_OK && (k == 0 || k >= cap)) st = LP_ERR(LP_ERR_FORMAT, "%s:%d: slug: 1 to %zu characters", path, line, cap - 1);
        if (st == LP_OK) snprintf(slug, cap, "%s", s->valuestring);
    } else {
        snprintf(slug, cap, "graph-%d", line);
    }
    cJSON_Delete(j);
    return st;
}

/* Every prompt, BOS first as circuit-tracer prepends it (when the tokenizer has one). */
static lp_status read_prompts(const char *path, const lp_model *m, const lp_tokenizer *tk, gprompt **out, int *n_out) {
    const lp_config *cf = lp_model_config(m);
    lp_pair_opts po = {.file = path, .tk = tk, .d_vocab = cf->d_vocab, .n_ctx = cf->n_ctx - 1};
    size_t len;
    char *txt;
    LP_CHECK(lp_text_read(path, "prompts file", &txt, &len));
    gprompt *ps = NULL;
    int n = 0, cap = 0, bos = tk ? lp_tokenizer_bos(tk) : -1;
    lp_status st = LP_OK;
    for (size_t pos = 0, line = 1; st == LP_OK && pos < len; line++) {
        const char *ln = txt + pos, *nl = memchr(ln, '\n', len - pos);
        size_t k = nl ? (size_t)(nl - ln) : len - pos;
        pos += k + 1;
        lp_prompt q;
        if ((st = lp_prompt_parse_line(&po, ln, k, (int)line, &q)) != LP_OK || q.T == 0) continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 16;
            gprompt *np = realloc(ps, cap * sizeof *np);
            if (!np) {
                lp_prompt_free(&q);
                st = LP_ERR(LP_ERR_OOM, "out of memory");
                continue;
            }
            ps = np;
        }
        if (bos >= 0 && q.ids[0] != bos) {
            int32_t *ids = malloc((q.T + 1) * sizeof(int32_t));
            if (!ids) st = LP_ERR(LP_ERR_OOM, "out of memory");
            else {
                ids[0] = bos;
                memcpy(ids + 1, q.ids, q.T * sizeof(int32_t));
                free(q.ids);
                q.ids = ids, q.T++;
            }
        }
        ps[n].p = q, ps[n].line = (int)line;
        n++;
        if (st == LP_OK) st = slug_of(path, ln, k, (int)line, ps[n - 1].slug, sizeof ps[n - 1].slug);
        for (int i = 0; i < n - 1 && st == LP_OK; i++)
            if (!strcmp(ps[i].slug, ps[n - 1].slug))
                st = LP_ERR(LP_ERR_FORMAT, "%s:%zu: slug %s is also line %d's", path, line, ps[n - 1].slug, ps[i].line);
    }
    free(txt);
    if (st == LP_OK && n == 0) st = LP_ERR(LP_ERR_ARG, "%s: no prompts (the file has no non-blank line)", path);
    if (st != LP_OK) {
        prompts_free(ps, n);
        return st;
    }
    *out = ps, *n_out = n;
    return LP_OK;
}

static lp_graph_opts graph_opts(const args *a) {
    lp_graph_opts o = lp_graph_defaults();
    o.max_feature_nodes = (int)lp_cfg_int(&a->cfg, "graph.max_feature_nodes");
    o.batch_size = (int)lp_cfg_int(&a->cfg, "graph.batch");
    o.update_interval = (int)lp_cfg_int(&a->cfg, "graph.update_interval");
    o.max_n_logits = (int)lp_cfg_int(&a->cfg, "graph.max_n_logits");
    o.desired_logit_prob = (float)lp_cfg_float(&a->cfg, "graph.desired_logit_prob");
    o.node_threshold = (float)lp_cfg_float(&a->cfg, "graph.node_threshold");
    o.edge_threshold = (float)lp_cfg_float(&a->cfg, "graph.edge_threshold");
    o.edge_mass = lp_cfg_float(&a->cfg, "graph.edge_mass");
    o.max_row_edges = (int)lp_cfg_int(&a->cfg, "graph.max_row_edges");
    o.device = strcmp(lp_cfg_str(&a->cfg, "graph.device"), "cuda") ? LP_CPU : LP_CUDA;
    o.zero_positions = (int)lp_cfg_int(&a->cfg, "graph.zero_positions");
    size_t mb = (size_t)lp_cfg_int(&a->cfg, "graph.host_budget_mb");
    o.host_budget = mb ? mb << 20 : (size_t)sysconf(_SC_PHYS_PAGES) * (size_t)sysconf(_SC_PAGESIZE) / 10 * 8;
    return o;
}

/* job.json: every setting that changes a graph; a restart must have the same. */
/* Settings added after older jobs were written, with the value those jobs ran with: a job.json
 * without the key is the same job when the setting still has that value. */
static int as_older_jobs(const char *key, const char *v) {
    static const char *const later[][2] = {{"graph.zero_positions", "1"}};
    for (size_t i = 0; i < sizeof later / sizeof later[0]; i++)
        if (!strcmp(key, later[i][0])) return !strcmp(v, later[i][1]);
    return 0;
}

static lp_status job_check(const args *a, const char *out) {
    static const char *keys[] = {"model.path", "graph.prompts", "graph.transcoders", "graph.max_feature_nodes", "graph.update_interval",
                                 "graph.max_n_logits", "graph.desired_logit_prob", "graph.node_threshold", "graph.edge_threshold",
                                 "graph.edge_mass", "graph.max_row_edges", "graph.scan", "graph.zero_positions", NULL};
    cJSON *now = cJSON_CreateObject();
    cJSON_AddStringToObject(now, "command", "graph");
    for (int i = 0; keys[i]; i++) {
        const char *v = lp_cfg_str(&a->cfg, keys[i]);
        cJSON_AddStringToObject(now, keys[i], v ? v : "");
    }
    int64_t size;
    uint64_t hash;
    char buf[96];
    if (lp_fingerprint(lp_cfg_str(&a->cfg, "graph.prompts"), &size, &hash) == LP_OK)
        snprintf(buf, sizeof buf, "%lld bytes, hash %016llx", (long long)size, (unsigned long long)hash), cJSON_AddStringToObject(now, "graph.prompts (file)", buf);
    char path[1200];
    snprintf(path, sizeof path, "%s/job.json", out);
    size_t n;
    char *old_txt = lp_read_file(path, &n), *txt = cJSON_Print(now);
    lp_status st = LP_OK;
    if (!old_txt) {
        st = txt ? lp_write_file_atomic(path, txt, strlen(txt)) : LP_ERR(LP_ERR_OOM, "out of memory");
    } else {
        cJSON *old = cJSON_ParseWithLength(old_txt, n);
        for (const cJSON *e = now->child; st == LP_OK && e; e = e->next) {
            const cJSON *h = cJSON_GetObjectItemCaseSensitive(old, e->string);
            if (!h && as_older_jobs(e->string, e->valuestring)) continue;
            if (!cJSON_IsString(h) || strcmp(h->valuestring, e->valuestring))
                st = LP_ERR(LP_ERR_ARG, "%s: this output was written with %s = %s, not %s; resume with the same setting, or choose another graph.out",
                            path, e->string, cJSON_IsString(h) ? h->valuestring : "(unset)", e->valuestring);
        }
        cJSON_Delete(old);
    }
    free(old_txt), free(txt);
    cJSON_Delete(now);
    return st;
}

static lp_status print_plan(const lp_graph_plan *p, void *user) {
    const lp_graph_opts *o = user;
    double mib = 1048576.0;
    fprintf(stderr,
            "loupe: plan: %d tokens, %d active features (%d kept as nodes), %d logits, %lld nodes, %d rows per backward\n"
            "loupe: plan: host peak %.1f MiB (replacement model %.1f, backward %.1f, edges %.1f, pruning %.1f, cached patterns "
            "%.1f); device %.1f MiB; budget %.1f MiB\n",
            p->T, p->n_active, p->n_features, p->n_logits, (long long)p->n_nodes, p->batch, p->host_bytes / mib, p->model_bytes / mib,
            p->backward_bytes / mib, p->edge_bytes / mib, p->prune_bytes / mib, p->pattern_bytes / mib, p->device_bytes / mib,
            o->host_budget / mib);
    return LP_OK;
}

/* Token strings for the JSON (the tokenizer's text; <id> where it has none). */
static char **token_strs(const lp_tokenizer *tk, const int32_t *ids, int n) {
    char **s = calloc(n + 1, sizeof *s);
    for (int i = 0; s && i < n; i++) {
        char *t = NULL;
        size_t len = 0;
        if (!tk || lp_detokenize(tk, &ids[i], 1, &t, &len) != LP_OK || lp_utf8_invalid_at(t, len) < len || memchr(t, 0, len)) {
            free(t);
            t = malloc(24);
            if (t) snprintf(t, 24, "<%d>", ids[i]);
        }
        s[i] = t;
    }
    return s;
}

static void strs_free(char **s, int n) {
    for (int i = 0; s && i < n; i++) free(s[i]);
    free(s);
}

/* One prompt: build, write <slug>.json (and .html), update graph-metadata.json, then the
 * result line (so a line in results.jsonl means the files are complete). */
static lp_status one_graph(const args *a, lp_model *m, const lp_clt *tc, const lp_tokenizer *tk, const gprompt *gp, int index,
                           lp_graph_opts *o, sweep_out *so) {
    const char *out = lp_cfg_str(&a->cfg, "graph.out");
    double t0 = cli_now();
    lp_graph *g;
    LP_CHECK(lp_graph_build(&g, m, tc, gp->p.ids, gp->p.T, o));
    double secs = cli_now() - t0;
    char **ts = token_strs(tk, gp->p.ids, gp->p.T), **ls = token_strs(tk, g->logit_ids, g->n_logits);
    char *prompt = NULL;
    size_t plen = 0;
    if (tk) lp_detokenize(tk, gp->p.ids, gp->p.T, &prompt, &plen);
    lp_graph_json_opts jo = {.slug = gp->slug, .scan = lp_cfg_str(&a->cfg, "graph.scan") ? lp_cfg_str(&a->cfg, "graph.scan") : tc->cfg.scan,
                             .prompt = prompt ? prompt : "", .token_str = (const char *const *)ts, .logit_str = (const char *const *)ls};
    char path[1300], html[1300];
    snprintf(path, sizeof path, "%s/%s.json", out, gp->slug);
    snprintf(html, sizeof html, "%s/%s.html", out, gp->slug);
    lp_status st = ts && ls ? lp_graph_write_json(g, &jo, path) : LP_ERR(LP_ERR_OOM, "out of memory");
    int want_html = strcmp(lp_cfg_str(&a->cfg, "graph.html"), "true") == 0;
    /* circuit-tracer's error ids "0_{layer}_{pos}" can equal a layer-0 feature's; the JSON
     * keeps the convention and names each such link's node by index too, so the page draws */
    int have_html = 0;
    if (st == LP_OK && want_html) st = lp_graph_page_write_file(path, html, NULL), have_html = st == LP_OK;
    if (st == LP_OK) st = lp_graph_metadata_add(out, &jo, g);
    int64_t kept_n = 0, kept_e = 0;
    for (int64_t i = 0; i < g->n_nodes; i++) kept_n += g->node_mask[i];
    for (int64_t e = 0; e < lp_graph_nnz(g); e++) kept_e += g->edge_mask[e];
    if (st == LP_OK) {
        cJSON *r = cJSON_CreateObject();
        cJSON_AddNumberToObject(r, "index", index);
        cJSON_AddNumberToObject(r, "line", gp->line);
        cJSON_AddStringToObject(r, "slug", gp->slug);
        cJSON_AddNumberToObject(r, "tokens", gp->p.T);
        cJSON_AddNumberToObject(r, "active_features", g->n_active);
        cJSON_AddNumberToObject(r, "nodes", (double)g->n_nodes);
        cJSON_AddNumberToObject(r, "edges", (double)lp_graph_nnz(g));
        cJSON_AddNumberToObject(r, "kept_nodes", (double)kept_n);
        cJSON_AddNumberToObject(r, "kept_edges", (double)kept_e);
        cJSON_AddNumberToObject(r, "replacement_score", g->replacement_score);
        cJSON_AddNumberToObject(r, "completeness_score", g->completeness_score);
        cJSON_AddNumberToObject(r, "backward_passes", (double)g->n_backward);
        cJSON_AddNumberToObject(r, "seconds", secs);
        cJSON_AddBoolToObject(r, "html", have_html);
        char *line = cJSON_PrintUnformatted(r);
        cJSON_Delete(r);
        size_t n = line ? strlen(line) : 0;
        char *ln = line ? realloc(line, n + 2) : NULL;
        if (ln) ln[n] = '\n', ln[n + 1] = 0;
        st = ln ? sweep_out_append(so, ln, n + 1) : LP_ERR(LP_ERR_OOM, "out of memory");
        free(ln ? ln : line);
    }
    if (st == LP_OK)
        printf("%s: %d tokens, %d active features, %lld nodes, %lld edges (kept %lld nodes, %lld edges), %lld backward passes, "
               "%.2f s; replacement %.4f, completeness %.4f -> %s%s%s\n",
               gp->slug, gp->p.T, g->n_active, (long long)g->n_nodes, (long long)lp_graph_nnz(g), (long long)kept_n, (long long)kept_e,
               (long long)g->n_backward, secs, g->replacement_score, g->completeness_score, path, want_html ? ", " : "", want_html ? html : "");
    strs_free(ts, gp->p.T), strs_free(ls, g->n_logits);
    free(prompt);
    lp_graph_free(g);
    return st;
}

int cmd_graph(args *a) {
    lp_status st = lp_cfg_require(&a->cfg, (const char *[]){"model.path", "graph.prompts", "graph.transcoders", "graph.out", NULL});
    if (st != LP_OK) return cli_fail(st);
    lp_graph_opts o = graph_opts(a);
    o.on_plan = print_plan, o.user = &o;
    lp_model *m = NULL;
    lp_tokenizer *tk = NULL;
    lp_clt *tc = NULL;
    lp_ctx hc = {0};
    gprompt *ps = NULL;
    int n = 0;
    st = cli_open_model(a, &m);
    if (st == LP_OK && lp_tokenizer_load(&tk, lp_cfg_str(&a->cfg, "model.path")) != LP_OK) tk = NULL; /* id lists still work */
    if (st == LP_OK) st = lp_ctx_init(&hc, LP_CPU, LP_F32);
    if (st == LP_OK) st = lp_clt_load(&tc, &hc, lp_cfg_str(&a->cfg, "graph.transcoders"));
    if (st == LP_OK) st = read_prompts(lp_cfg_str(&a->cfg, "graph.prompts"), m, tk, &ps, &n);
    const char *out = lp_cfg_str(&a->cfg, "graph.out");
    lp_lock lock = {.fd = -1};
    sweep_out so = {.fd = -1};
    const char *methods[1] = {NULL};
    if (st == LP_OK) st = lp_lock_output(&lock, out, 1);
    if (st == LP_OK) st = job_check(a, out);
    if (st == LP_OK) st = sweep_out_open(&so, out, n, methods);
    int skipped = 0, ran = 0;
    for (int i = 0; st == LP_OK && i < n; i++) {
        if (so.done[i]) {
            skipped++;
            continue;
        }
        fprintf(stderr, "loupe: graph %d/%d (%s, line %d, %d tokens)\n", i + 1, n, ps[i].slug, ps[i].line, ps[i].p.T);
        st = one_graph(a, m, tc, tk, &ps[i], i, &o, &so);
        ran += st == LP_OK;
    }
    if (so.done) st = sweep_out_close(&so, st);
    if (st == LP_OK) fprintf(stderr, "loupe: %d graphs written, %d already done, in %s\n", ran, skipped, out);
    lp_lock_release(&lock);
    prompts_free(ps, n);
    lp_clt_free(tc, &hc);
    lp_ctx_free(&hc);
    lp_tokenizer_free(tk);
    lp_model_free(m);
    return st == LP_OK ? 0 : cli_fail(st);
}
