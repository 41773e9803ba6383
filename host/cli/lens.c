/* lens.c: `loupe lens`, the logit lens and direct logit attribution of each prompt of a JSONL
 * file, or of each sequence of an activation store at lens.position (lens.h). Every line is checked before the model runs: one bad line refuses the job
 * (exit 2, naming the file, the line and the field). Writes, under lens.out's lock,
 * lens.jsonl (one line per prompt) and lens.safetensors (every array of every prompt), each
 * under a temporary name and renamed when whole; a rerun replaces them. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loupe/lens.h"
#include "loupe/output.h"
#include "loupe/pairs.h"
#include "loupe/safetensors.h"
#include "loupe/textfile.h"
#include "loupe/tokenizer.h"
#include "cli.h"

typedef struct prompts {
    lp_prompt *p;
    int *line;
    int n;
} prompts;

static void prompts_free(prompts *ps) {
    for (int i = 0; i < ps->n; i++) lp_prompt_free(&ps->p[i]);
    free(ps->p), free(ps->line);
    memset(ps, 0, sizeof *ps);
}

/* Every line, or the first bad one's error. */
static lp_status read_prompts(const char *path, const lp_model *m, const lp_tokenizer *tk, prompts *ps) {
    const lp_config *cf = lp_model_config(m);
    lp_pair_opts po = {.file = path, .tk = tk, .d_vocab = cf->d_vocab, .n_ctx = cf->n_ctx};
    size_t len;
    char *txt;
    LP_CHECK(lp_text_read(path, "prompts file", &txt, &len));
    memset(ps, 0, sizeof *ps);
    lp_status st = LP_OK;
    int cap = 0;
    for (size_t pos = 0, line = 1; st == LP_OK && pos < len; line++) {
        const char *ln = txt + pos, *nl = memchr(ln, '\n', len - pos);
        size_t n = nl ? (size_t)(nl - ln) : len - pos;
        pos += n + 1;
        lp_prompt q;
        if ((st = lp_prompt_parse_line(&po, ln, n, (int)line, &q)) != LP_OK || q.T == 0) continue;
        if (ps->n == cap) {
            cap = cap ? 2 * cap : 16;
            lp_prompt *np = realloc(ps->p, cap * sizeof *np);
            int *nl2 = np ? realloc(ps->line, cap * sizeof *nl2) : NULL;
            if (np) ps->p = np;
            if (nl2) ps->line = nl2;
            if (!np || !nl2) {
                lp_prompt_free(&q);
                st = LP_ERR(LP_ERR_OOM, "out of memory");
                continue;
            }
        }
        ps->line[ps->n] = (int)line;
        ps->p[ps->n++] = q;
    }
    free(txt);
    if (st == LP_OK && ps->n == 0) st = LP_ERR(LP_ERR_ARG, "%s: no prompts (the file has no non-blank line)", path);
    if (st != LP_OK) prompts_free(ps);
    return st;
}

/* A token's text as a JSON value: a string, or null when it is not valid UTF-8 alone. */
static cJSON *token_text(const lp_tokenizer *tk, int32_t id) {
    char *t = NULL;
    size_t n = 0;
    if (!tk || lp_detokenize(tk, &id, 1, &t, &n) != LP_OK || lp_utf8_invalid_at(t, n) < n || memchr(t, 0, n)) {
        free(t);
        return cJSON_CreateNull();
    }
    cJSON *s = cJSON_CreateString(t);
    free(t);
    return s;
}

/* The same for the report: JSON-quoted, or <id N>. */
static void print_token(const lp_tokenizer *tk, int32_t id, int width) {
    cJSON *s = token_text(tk, id);
    char *q = cJSON_IsString(s) ? cJSON_PrintUnformatted(s) : NULL;
    char buf[32];
    if (!q) snprintf(buf, sizeof buf, "<id %d>", id);
    printf("%-*s", width, q ? q : buf);
    free(q);
    cJSON_Delete(s);
}

typedef struct ranked { float v; int i; } ranked;
static int by_abs(const void *a, const void *b) {
    float x = fabsf(((const ranked *)a)->v), y = fabsf(((const ranked *)b)->v);
    return x < y ? 1 : x > y ? -1 : ((const ranked *)a)->i - ((const ranked *)b)->i;
}

/* Indices of the n largest |v| of v[0..len) into out (at most len); returns how many. */
static int top_abs(const float *v, int len, int n, int *out) {
    ranked *r = malloc((size_t)(len ? len : 1) * sizeof *r);
    if (!r) return 0;
    for (int i = 0; i < len; i++) r[i] = (ranked){v[i], i};
    qsort(r, len, sizeof *r, by_abs);
    int k = n < len ? n : len;
    for (int i = 0; i < k; i++) out[i] = r[i].i;
    free(r);
    return k;
}

static const char *const g_mode[LP_LENS_MODES] = {"cached", "recomputed"};

static cJSON *lens_json(const lp_lens *r, const lp_tokenizer *tk) {
    cJSON *arr = cJSON_CreateArray();
    char lab[32];
    for (int i = 0; i < r->n_stack; i++) {
        cJSON *e = cJSON_CreateObject();
        cJSON_AddStringToObject(e, "layer", lp_lens_stack_label(r, i, lab, sizeof lab));
        for (int mode = LP_LENS_RECOMPUTED; mode >= LP_LENS_CACHED; mode--) {
            cJSON *o = cJSON_AddObjectToObject(e, g_mode[mode]);
            cJSON_AddNumberToObject(o, "metric", r->lens_metric[mode][i]);
            cJSON_AddNumberToObject(o, "answer_prob", r->lens_prob[mode][i]);
            cJSON_AddNumberToObject(o, "answer_rank", r->lens_rank[mode][i]);
            cJSON *top = cJSON_AddArrayToObject(o, "top");
            for (int k = 0; k < r->top_k; k++) {
                cJSON *t = cJSON_CreateObject();
                int32_t id = r->top_ids[mode][(size_t)i * r->top_k + k];
                cJSON_AddNumberToObject(t, "id", id);
                cJSON_AddItemToObject(t, "text", token_text(tk, id));
                cJSON_AddNumberToObject(t, "prob", r->top_prob[mode][(size_t)i * r->top_k + k]);
                cJSON_AddItemToArray(top, t);
            }
        }
        cJSON_AddItemToArray(arr, e);
    }
    return arr;
}

/* Attributions: every component in order, and the heads with the largest |attribution|. */
static cJSON *dla_json(const lp_lens *r, int top) {
    cJSON *o = cJSON_CreateObject();
    char lab[32];
    cJSON_AddNumberToObject(o, "unembed_bias", r->unembed_bias);
    cJSON_AddNumberToObject(o, "sum_error", r->comp_sum_err > r->head_sum_err ? r->comp_sum_err : r->head_sum_err);
    cJSON *comps = cJSON_AddArrayToObject(o, "components");
    for (int i = 0; i < r->n_comp; i++) {
        cJSON *c = cJSON_CreateObject();
        cJSON_AddStringToObject(c, "name", lp_lens_comp_label(r, i, lab, sizeof lab));
        cJSON_AddNumberToObject(c, "cached", r->comp[LP_LENS_CACHED][i]);
        cJSON_AddNumberToObject(c, "recomputed", r->comp[LP_LENS_RECOMPUTED][i]);
        cJSON_AddItemToArray(comps, c);
    }
    int LH = r->n_layers * r->n_heads, *idx = malloc((size_t)LH * sizeof *idx);
    int k = idx ? top_abs(r->head[LP_LENS_CACHED], LH, top, idx) : 0;
    cJSON *heads = cJSON_AddArrayToObject(o, "top_heads");
    for (int j = 0; j < k; j++) {
        cJSON *h = cJSON_CreateObject();
        cJSON_AddStringToObject(h, "name", lp_lens_head_label(r, idx[j], lab, sizeof lab));
        cJSON_AddNumberToObject(h, "cached", r->head[LP_LENS_CACHED][idx[j]]);
        cJSON_AddNumberToObject(h, "recomputed", r->head[LP_LENS_RECOMPUTED][idx[j]]);
        cJSON_AddItemToArray(heads, h);
    }
    free(idx);
    return o;
}

/* line < 0: a stored sequence, not a line of a prompts file */
static cJSON *result_json(int index, int line, const lp_lens *r, const lp_tokenizer *tk, int top) {
    cJSON *j = cJSON_CreateObject();
    cJSON_AddNumberToObject(j, "index", index);
    cJSON_AddNumberToObject(j, line < 0 ? "sequence" : "line", line < 0 ? index : line);
    cJSON_AddNumberToObject(j, "n_tokens", r->T);
    cJSON_AddNumberToObject(j, "position", r->pos);
    cJSON *a = cJSON_AddObjectToObject(j, "answer");
    cJSON_AddNumberToObject(a, "id", r->answer);
    cJSON_AddItemToObject(a, "text", token_text(tk, r->answer));
    cJSON_AddBoolToObject(a, "given", r->answer_given);
    if (r->wrong >= 0) {
        cJSON *w = cJSON_AddObjectToObject(j, "wrong_answer");
        cJSON_AddNumberToObject(w, "id", r->wrong);
        cJSON_AddItemToObject(w, "text", token_text(tk, r->wrong));
    }
    cJSON_AddStringToObject(j, "metric", r->wrong >= 0 ? "logit_diff" : "logit");
    cJSON_AddNumberToObject(j, "value", r->metric);
    cJSON_AddItemToObject(j, "lens", lens_json(r, tk));
    cJSON_AddItemToObject(j, "dla", dla_json(r, top));
    return j;
}

/* ---- lens.safetensors: promptNNNNNN.<array>[.cached|.recomputed] ---- */

typedef struct st_list {
    lp_st_spec *spec;
    const void **data;
    char (*name)[64];
    int n, cap;
} st_list;

static void st_add(st_list *l, int index, const char *what, int mode, lp_dtype dt, const void *data, int64_t d0, int64_t d1) {
    if (l->n == l->cap) return; /* sized up front */
    char *nm = l->name[l->n];
    if (mode < 0) snprintf(nm, sizeof l->name[0], "prompt%06d.%s", index, what);
    else snprintf(nm, sizeof l->name[0], "prompt%06d.%s.%s", index, what, g_mode[mode]);
    l->spec[l->n] = (lp_st_spec){.name = nm, .dtype = dt, .ndim = d1 ? 2 : 1, .shape = {d0, d1}};
    l->data[l->n++] = data;
}

enum { ST_PER_PROMPT = 6 + 8 * LP_LENS_MODES };

/* Every prompt's arrays; scalars[i] holds prompt i's metric and unembed_bias as F32. */
static void st_prompt(st_list *l, int i, const lp_lens *r, const lp_prompt *p, const float *scalars) {
    int64_t S = r->n_stack, K = r->top_k;
    st_add(l, i, "tokens", -1, LP_I32, p->ids, r->T, 0);
    st_add(l, i, "position", -1, LP_I32, &r->pos, 1, 0);
    st_add(l, i, "answer", -1, LP_I32, &r->answer, 1, 0);
    st_add(l, i, "wrong_answer", -1, LP_I32, &r->wrong, 1, 0);
    st_add(l, i, "metric", -1, LP_F32, &scalars[0], 1, 0);
    st_add(l, i, "unembed_bias", -1, LP_F32, &scalars[1], 1, 0);
    for (int mode = 0; mode < LP_LENS_MODES; mode++) {
        st_add(l, i, "lens_metric", mode, LP_F32, r->lens_metric[mode], S, 0);
        st_add(l, i, "lens_prob", mode, LP_F32, r->lens_prob[mode], S, 0);
        st_add(l, i, "lens_rank", mode, LP_I32, r->lens_rank[mode], S, 0);
        if (K) st_add(l, i, "top_ids", mode, LP_I32, r->top_ids[mode], S, K);
        if (K) st_add(l, i, "top_prob", mode, LP_F32, r->top_prob[mode], S, K);
        st_add(l, i, "attr_comp", mode, LP_F32, r->comp[mode], r->n_comp, 0);
        st_add(l, i, "attr_head", mode, LP_F32, r->head[mode], r->n_layers, r->n_heads);
        st_add(l, i, "attr_bias", mode, LP_F32, r->bias[mode], r->n_layers, 0);
    }
}

/* "a,b,c" of n labels. */
static char *labels(const lp_lens *r, int n, const char *(*label)(const lp_lens *, int, char *, size_t)) {
    char *s = calloc((size_t)n * 16 + 1, 1), lab[16];
    for (int i = 0; s && i < n; i++) strcat(strcat(s, i ? "," : ""), label(r, i, lab, sizeof lab));
    return s;
}

static lp_status write_arrays(const char *path, const lp_lens *rs, const prompts *ps, const float *scalars, const char *model) {
    st_list l = {.cap = ps->n * ST_PER_PROMPT};
    l.spec = calloc(l.cap, sizeof *l.spec), l.data = calloc(l.cap, sizeof *l.data), l.name = calloc(l.cap, sizeof *l.name);
    char *ll = labels(&rs[0], rs[0].n_stack, lp_lens_stack_label), *cl = labels(&rs[0], rs[0].n_comp, lp_lens_comp_label);
    lp_status st = l.spec && l.data && l.name && ll && cl ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory");
    for (int i = 0; st == LP_OK && i < ps->n; i++) st_prompt(&l, i, &rs[i], &ps->p[i], scalars + 2 * i);
    const char *meta[] = {"model", model, "lens_labels", ll, "component_labels", cl, "modes", "cached,recomputed", NULL};
    if (st == LP_OK) st = lp_st_write(path, l.spec, l.data, l.n, meta);
    free(l.spec), free(l.data), free(l.name), free(ll), free(cl);
    return st;
}

/* lens.jsonl: the lines, then renamed into place. */
static lp_status write_lines(const char *path, const lp_lens *rs, const prompts *ps, const lp_tokenizer *tk, int top) {
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    if (!f) LP_FAIL(LP_ERR_OOM, "out of memory");
    for (int i = 0; i < ps->n; i++) {
        cJSON *j = result_json(i, ps->line[i], &rs[i], tk, top);
        char *t = j ? cJSON_PrintUnformatted(j) : NULL;
        if (t) fprintf(f, "%s\n", t);
        free(t);
        cJSON_Delete(j);
    }
    lp_status st = fclose(f) == 0 ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory");
    if (st == LP_OK) st = lp_write_file_atomic(path, buf, n);
    free(buf);
    return st;
}

/* ---- the report ---- */

static void report(int index, int line, const lp_lens *r, const lp_tokenizer *tk, int top) {
    const int R = LP_LENS_RECOMPUTED, C = LP_LENS_CACHED;
    if (line < 0) printf("sequence %d (%d tokens, position %d): answer ", index, r->T, r->pos);
    else printf("prompt %d (line %d, %d tokens, position %d): answer ", index, line, r->T, r->pos);
    print_token(tk, r->answer, 0);
    printf(" (id %d%s)", r->answer, r->answer_given ? "" : line < 0 ? ", the top token of the final residual" : ", the model's top token");
    if (r->wrong >= 0) {
        printf(" vs ");
        print_token(tk, r->wrong, 0);
        printf(" (id %d): logit difference %.4f\n", r->wrong, r->metric);
    } else {
        printf(": logit %.4f\n", r->metric);
    }
    printf("  logit lens        top token (norm recomputed)     p | answer: p      rank | cached scale: p   rank\n");
    char lab[32];
    for (int i = 0; i < r->n_stack; i++) {
        printf("  %-12s ", lp_lens_stack_label(r, i, lab, sizeof lab));
        if (r->top_k) print_token(tk, r->top_ids[R][(size_t)i * r->top_k], 26);
        else printf("%-26s", "-");
        printf(" %7.4f |  %9.3e %6d |  %9.3e %6d\n", r->top_k ? r->top_prob[R][(size_t)i * r->top_k] : NAN, r->lens_prob[R][i],
               r->lens_rank[R][i], r->lens_prob[C][i], r->lens_rank[C][i]);
    }
    double sum = r->unembed_bias;
    for (int i = 0; i < r->n_comp; i++) sum += r->comp[C][i];
    printf("  direct logit attribution (the run's final-norm scale): components + biases = %.4f, the run %.4f\n", sum, r->metric);
    int n = r->n_comp > r->n_layers * r->n_heads ? r->n_comp : r->n_layers * r->n_heads, *idx = malloc((size_t)n * sizeof *idx);
    int k = idx ? top_abs(r->comp[C], r->n_comp, top, idx) : 0;
    printf("    components:");
    for (int j = 0; j < k; j++) printf(" %s %+.3f", lp_lens_comp_label(r, idx[j], lab, sizeof lab), r->comp[C][idx[j]]);
    k = idx ? top_abs(r->head[C], r->n_layers * r->n_heads, top, idx) : 0;
    printf("\n    heads:     ");
    for (int j = 0; j < k; j++) printf(" %s %+.3f", lp_lens_head_label(r, idx[j], lab, sizeof lab), r->head[C][idx[j]]);
    printf("\n    final norm bias and b_U %+.3f; largest miss of the two sums %.2e\n", r->unembed_bias,
           r->comp_sum_err > r->head_sum_err ? r->comp_sum_err : r->head_sum_err);
    free(idx);
}

/* ---- the command ---- */

typedef struct job {
    prompts ps;
    lp_lens_store *store; /* data.store: the sequences instead of prompts */
    lp_lens *rs;
    float *scalars; /* [n, 2]: metric, unembed_bias */
    int n_done;
} job;

/* data.store: every stored sequence as a "prompt" of the store's tokens at lens.position. */
static lp_status store_prompts(const args *a, lp_model *m, lp_lens_ctx *lx, job *j) {
    const char *dir = lp_cfg_str(&a->cfg, "data.store");
    LP_CHECK(lp_lens_store_open(&j->store, lx, dir, lp_cfg_str(&a->cfg, "model.path")));
    int n = (int)lp_lens_store_n_seq(j->store), T = lp_lens_store_context(j->store), pos = (int)lp_cfg_int(&a->cfg, "lens.position");
    if (pos >= T) LP_FAIL(LP_ERR_ARG, "lens.position: %d is outside the stored sequences of %d tokens", pos, T);
    int V = lp_model_config(m)->d_vocab;
    const char *ak[] = {"lens.answer", "lens.wrong_answer"};
    for (int k = 0; k < 2; k++)
        if (lp_cfg_int(&a->cfg, ak[k]) >= V) LP_FAIL(LP_ERR_ARG, "%s: %ld is not a token id in [0, %d)", ak[k], lp_cfg_int(&a->cfg, ak[k]), V);
    j->ps.p = calloc(n, sizeof *j->ps.p), j->ps.line = calloc(n, sizeof *j->ps.line);
    if (!j->ps.p || !j->ps.line) LP_FAIL(LP_ERR_OOM, "out of memory");
    for (int i = 0; i < n; i++, j->ps.n++) {
        lp_prompt *p = &j->ps.p[i];
        if (!(p->ids = malloc((size_t)T * sizeof *p->ids))) LP_FAIL(LP_ERR_OOM, "out of memory");
        memcpy(p->ids, lp_lens_store_tokens(j->store, i), (size_t)T * sizeof *p->ids);
        p->T = T, p->pos = pos, p->answer = (int32_t)lp_cfg_int(&a->cfg, "lens.answer"), p->wrong = (int32_t)lp_cfg_int(&a->cfg, "lens.wrong_answer");
        j->ps.line[i] = -1;
    }
    return LP_OK;
}

static lp_status run_all(const args *a, lp_model *m, lp_lens_ctx *lx, job *j) {
    lp_lens_opts o = {.top_k = (int)lp_cfg_int(&a->cfg, "lens.top_k")};
    lp_status st = LP_OK;
    double t0 = cli_now();
    for (int i = 0; st == LP_OK && i < j->ps.n; i++) {
        const lp_prompt *p = &j->ps.p[i];
        o.pos = p->pos, o.answer = p->answer, o.wrong = p->wrong;
        st = j->store ? lp_lens_store_run(j->store, i, &o, &j->rs[i]) : lp_lens_run(lx, p->ids, p->T, &o, &j->rs[i]);
        if (st != LP_OK) break;
        j->n_done++;
        j->scalars[2 * i] = (float)j->rs[i].metric, j->scalars[2 * i + 1] = (float)j->rs[i].unembed_bias;
        if (isatty(2)) fprintf(stderr, "\rlens %d/%d prompts  %.2f prompts/s   ", i + 1, j->ps.n, (i + 1) / (cli_now() - t0));
    }
    if (isatty(2)) fputc('\n', stderr);
    return st;
}

static lp_status write_out(const args *a, const job *j, const lp_tokenizer *tk, const char *out) {
    char path[1100];
    snprintf(path, sizeof path, "%s/lens.safetensors", out);
    LP_CHECK(write_arrays(path, j->rs, &j->ps, j->scalars, lp_cfg_str(&a->cfg, "model.path")));
    snprintf(path, sizeof path, "%s/lens.jsonl", out);
    return write_lines(path, j->rs, &j->ps, tk, (int)lp_cfg_int(&a->cfg, "lens.top"));
}

int cmd_lens(args *a) {
    lp_status st = lp_cfg_require(&a->cfg, (const char *[]){"model.path", NULL});
    const char *prompts_path = lp_cfg_str(&a->cfg, "lens.prompts"), *store = lp_cfg_str(&a->cfg, "data.store");
    if (st == LP_OK && !prompts_path == !store)
        st = LP_ERR(LP_ERR_ARG, "lens.prompts or data.store: give one (the prompts to run, or a store cached from them)");
    if (st != LP_OK) return cli_fail(st);
    const char *out = lp_cfg_str(&a->cfg, "lens.out");
    lp_model *m = NULL;
    lp_tokenizer *tk = NULL;
    job j = {0};
    lp_lock lock = {.fd = -1};
    lp_lens_ctx *lx = NULL;
    st = cli_open_model(a, &m);
    if (st == LP_OK && lp_tokenizer_load(&tk, lp_cfg_str(&a->cfg, "model.path")) != LP_OK) tk = NULL; /* id lists still work */
    if (st == LP_OK) st = lp_lens_open(&lx, m);
    if (st == LP_OK && store) st = store_prompts(a, m, lx, &j);
    else if (st == LP_OK) st = read_prompts(prompts_path, m, tk, &j.ps);
    if (st == LP_OK && (lp_cfg_int(&a->cfg, "lens.top_k") > lp_model_config(m)->d_vocab))
        st = LP_ERR(LP_ERR_ARG, "lens.top_k: %lld is more than the vocabulary of %d", (long long)lp_cfg_int(&a->cfg, "lens.top_k"),
                          lp_model_config(m)->d_vocab);
    if (st == LP_OK && (!(j.rs = calloc(j.ps.n, sizeof *j.rs)) || !(j.scalars = calloc(2 * (size_t)j.ps.n, sizeof *j.scalars))))
        st = LP_ERR(LP_ERR_OOM, "out of memory");
    if (st == LP_OK) st = lp_lock_output(&lock, out, 1);
    if (st == LP_OK) st = lp_remove_stale_tmp(out);
    double t0 = cli_now();
    if (st == LP_OK) st = run_all(a, m, lx, &j);
    double secs = cli_now() - t0;
    if (st == LP_OK) st = write_out(a, &j, tk, out);
    int rc = 0, top = (int)lp_cfg_int(&a->cfg, "lens.top");
    if (st != LP_OK) {
        rc = cli_fail(st);
    } else if (a->json) {
        cJSON *r = cJSON_CreateObject();
        cJSON_AddStringToObject(r, "out", out);
        cJSON_AddNumberToObject(r, "n_prompts", j.ps.n);
        cJSON_AddNumberToObject(r, "prompts_per_s", secs > 0 ? j.ps.n / secs : 0);
        cJSON_AddStringToObject(r, "device", cli_dev_name(m));
        cli_print_json(r);
    } else {
        for (int i = 0; i < j.ps.n; i++) report(i, j.ps.line[i], &j.rs[i], tk, top);
        printf("lens: %d %s%s in %.2f s on %s; wrote %s/lens.jsonl and %s/lens.safetensors\n", j.ps.n, store ? "sequence" : "prompt", j.ps.n == 1 ? "" : "s", secs, cli_dev_name(m), out,
               out);
    }
    lp_lock_release(&lock);
    for (int i = 0; i < j.n_done; i++) lp_lens_free(&j.rs[i]);
    free(j.rs), free(j.scalars);
    prompts_free(&j.ps);
    lp_lens_store_close(j.store);
    lp_lens_close(lx);
    lp_tokenizer_free(tk);
    lp_model_free(m);
    return rc;
}
