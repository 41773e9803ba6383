/* dashboard_out.c: writing dashboards: Neuronpedia's batch JSON (through cJSON) and one
 * self-contained HTML page (data, script and styles inline; the page in
 * dashboard_page.h). Token strings are decoded id by id and made valid UTF-8. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <utf8proc.h>

#include "loupe/dashboard.h"
#include "loupe/output.h"
#include "analysis/dashboard_page.h"

/* ---- a growable buffer ---- */
typedef struct sbuf {
    char *p;
    size_t n, cap;
    int oom;
} sbuf;

static void sb_add(sbuf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 1 << 16;
        while (cap < b->n + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) { b->oom = 1; return; }
        b->p = p, b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

static void sb_str(sbuf *b, const char *s) { sb_add(b, s, strlen(s)); }

__attribute__((format(printf, 2, 3))) static void sb_printf(sbuf *b, const char *fmt, ...) {
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    sb_add(b, tmp, n < (int)sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

/* A JSON string that is safe inside <script>: '<', '>' and '&' as \u escapes (no "</script>"
 * or "<!--" can form), and U+2028/U+2029 escaped too. s must be valid UTF-8. */
static void sb_json_str(sbuf *b, const char *s) {
    sb_add(b, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char e[8];
        if (*p == '"' || *p == '\\') e[0] = '\\', e[1] = (char)*p, sb_add(b, e, 2);
        else if (*p < 0x20 || *p == '<' || *p == '>' || *p == '&') snprintf(e, sizeof e, "\\u%04x", *p), sb_add(b, e, 6);
        else if (p[0] == 0xE2 && p[1] == 0x80 && (p[2] == 0xA8 || p[2] == 0xA9)) sb_str(b, p[2] == 0xA8 ? "\\u2028" : "\\u2029"), p += 2;
        else sb_add(b, (const char *)p, 1);
    }
    sb_add(b, "\"", 1);
}

/* A float with 4 significant digits (the page shows 3); 0 as "0". */
static void sb_num(sbuf *b, double v) {
    if (v == 0 || !isfinite(v)) sb_add(b, "0", 1);
    else sb_printf(b, "%.4g", v);
}

static lp_status write_atomic(const char *path, const char *buf, size_t n) {
    char tmp[4200];
    lp_tmp_name(tmp, sizeof tmp, path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL, 0644);
    if (fd < 0) LP_FAIL(lp_write_status(errno), "%s: cannot create: %s", tmp, strerror(errno));
    lp_status st = lp_write_fd(fd, buf, n, -1, tmp);
    if (st == LP_OK && fsync(fd) != 0) st = LP_ERR(lp_write_status(errno), "%s: fsync: %s", tmp, strerror(errno));
    if (close(fd) != 0 && st == LP_OK) st = LP_ERR(lp_write_status(errno), "%s: close: %s", tmp, strerror(errno));
    if (st == LP_OK && rename(tmp, path) != 0) st = LP_ERR(lp_write_status(errno), "%s: cannot rename into place: %s", path, strerror(errno));
    if (st != LP_OK) unlink(tmp);
    return st;
}

/* ---- token strings ---- */
typedef struct tokstr {
    const lp_tokenizer *tk;
    int V;
    char **cache;  /* [V] decoded strings, filled on first use */
    char buf[32];
} tokstr;

static void tokstr_free(tokstr *t) {
    for (int i = 0; t->cache && i < t->V; i++) free(t->cache[i]);
    free(t->cache);
}

/* Invalid UTF-8 (a byte-level token holding part of a character) becomes U+FFFD. */
static char *valid_utf8(const char *s, size_t n) {
    char *o = malloc(3 * n + 1);
    if (!o) return NULL;
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t r = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &cp);
        if (r <= 0 || cp == 0) { memcpy(o + k, "\xEF\xBF\xBD", 3), k += 3, i++; continue; }
        memcpy(o + k, s + i, (size_t)r), k += (size_t)r, i += (size_t)r;
    }
    o[k] = 0;
    return o;
}

static const char *tok_str(tokstr *t, int32_t id) {
    if (!t->tk || id < 0 || id >= t->V) {
        snprintf(t->buf, sizeof t->buf, "#%d", (int)id);
        return t->buf;
    }
    if (!t->cache[id]) {
        char *txt = NULL;
        size_t len = 0;
        if (lp_detokenize(t->tk, &id, 1, &txt, &len) == LP_OK) t->cache[id] = valid_utf8(txt, len);
        free(txt);
        if (!t->cache[id]) {
            snprintf(t->buf, sizeof t->buf, "#%d", (int)id);
            return t->buf;
        }
    }
    return t->cache[id];
}

static lp_status tokstr_init(tokstr *t, const lp_tokenizer *tk) {
    memset(t, 0, sizeof *t);
    t->tk = tk;
    t->V = tk ? lp_tokenizer_vocab_size(tk) : 0;
    if (tk && !(t->cache = calloc((size_t)t->V, sizeof(char *)))) LP_FAIL(LP_ERR_OOM, "out of memory");
    return LP_OK;
}

/* ---- the HTML page ---- */

static void ex_json(sbuf *b, const lp_dash_example *x, unsigned char *used) {
    sb_printf(b, "[%lld,", (long long)x->token);
    sb_num(b, x->value);
    sb_printf(b, ",%d,[", x->start);
    for (int q = 0; q < x->len; q++) {
        sb_printf(b, q ? ",%d" : "%d", (int)x->tokens[q]);
        if (x->tokens[q] >= 0) used[x->tokens[q]] = 1;
    }
    sb_str(b, "],[");
    for (int q = 0; q < x->len; q++) {
        if (q) sb_add(b, ",", 1);
        sb_num(b, x->acts[q]);
    }
    sb_str(b, "]]");
}

static void latent_json(sbuf *b, const lp_dash_latent *l, unsigned char *used) {
    sb_printf(b, "{\"i\":%d,\"fires\":%lld,\"density\":", l->latent, (long long)l->fires);
    sb_num(b, l->density);
    sb_str(b, ",\"max\":");
    sb_num(b, l->max);
    sb_str(b, ",\"w\":");
    sb_num(b, l->n_bins ? ldexp(1.0, l->hist_exp) : 0);
    sb_str(b, ",\"hist\":[");
    for (int i = 0; i < l->n_bins; i++) sb_printf(b, i ? ",%lld" : "%lld", (long long)l->hist[i]);
    sb_str(b, "],\"top\":[");
    for (int i = 0; i < l->n_top; i++) {
        if (i) sb_add(b, ",", 1);
        ex_json(b, &l->top[i], used);
    }
    sb_str(b, "],\"bands\":[");
    for (int k = 0; k < l->n_bands; k++) {
        const lp_dash_band *B = &l->bands[k];
        sb_str(b, k ? ",[" : "[");
        sb_num(b, B->lo), sb_add(b, ",", 1), sb_num(b, B->hi);
        sb_printf(b, ",%lld,[", (long long)B->count);
        for (int i = 0; i < B->n; i++) {
            if (i) sb_add(b, ",", 1);
            ex_json(b, &B->ex[i], used);
        }
        sb_str(b, "]]");
    }
    sb_str(b, "],\"pos\":[");
    for (int i = 0; i < l->n_logits; i++) {
        sb_printf(b, i ? ",[%d," : "[%d,", (int)l->pos_ids[i]), sb_num(b, l->pos_vals[i]), sb_add(b, "]", 1);
        used[l->pos_ids[i]] = 1;
    }
    sb_str(b, "],\"neg\":[");
    for (int i = 0; i < l->n_logits; i++) {
        sb_printf(b, i ? ",[%d," : "[%d,", (int)l->neg_ids[i]), sb_num(b, l->neg_vals[i]), sb_add(b, "]", 1);
        used[l->neg_ids[i]] = 1;
    }
    sb_str(b, "],\"lh\":[");
    if (l->n_logits) {
        sb_num(b, l->logit_lo), sb_add(b, ",", 1), sb_num(b, l->logit_hi), sb_str(b, ",[");
        for (int i = 0; i < LP_DASH_LOGIT_BINS; i++) sb_printf(b, i ? ",%lld" : "%lld", (long long)l->logit_hist[i]);
        sb_add(b, "]", 1);
    }
    sb_str(b, "]}");
}

static void html_escape(sbuf *b, const char *s) {
    for (; *s; s++) {
        switch (*s) {
        case '<': sb_str(b, "&lt;"); break;
        case '>': sb_str(b, "&gt;"); break;
        case '&': sb_str(b, "&amp;"); break;
        case '"': sb_str(b, "&quot;"); break;
        default: sb_add(b, s, 1);
        }
    }
}

static int max_token_id(const lp_dash *d) {
    int m = 0;
    for (int j = 0; j < d->n; j++) {
        const lp_dash_latent *l = &d->lat[j];
        for (int i = 0; i < l->n_logits; i++) m = l->pos_ids[i] > m ? l->pos_ids[i] : m, m = l->neg_ids[i] > m ? l->neg_ids[i] : m;
        for (int i = 0; i < l->n_top; i++)
            for (int q = 0; q < l->top[i].len; q++) m = l->top[i].tokens[q] > m ? l->top[i].tokens[q] : m;
        for (int k = 0; k < l->n_bands; k++)
            for (int i = 0; i < l->bands[k].n; i++)
                for (int q = 0; q < l->bands[k].ex[i].len; q++) m = l->bands[k].ex[i].tokens[q] > m ? l->bands[k].ex[i].tokens[q] : m;
    }
    return m;
}

lp_status lp_dash_write_html(const lp_dash *d, const lp_tokenizer *tk, const char *title, const char *path) {
    int V = max_token_id(d) + 1;
    unsigned char *used = calloc((size_t)V, 1);
    tokstr ts;
    lp_status st = used ? tokstr_init(&ts, tk) : LP_ERR(LP_ERR_OOM, "out of memory");
    if (st != LP_OK) { free(used); return st; }
    sbuf b = {0};
    sb_str(&b, g_dash_page_head);
    html_escape(&b, title);
    sb_str(&b, g_dash_page_mid);
    sb_str(&b, "{\"title\":");
    sb_json_str(&b, title);
    sb_str(&b, ",\"hook\":");
    sb_json_str(&b, d->hook);
    sb_printf(&b, ",\"n_tokens\":%lld,\"n_counted\":%lld,\"ctx\":%d,\"latents\":[", (long long)d->n_tokens, (long long)d->n_counted, d->ctx);
    for (int j = 0; j < d->n; j++) {
        if (j) sb_add(&b, ",", 1);
        latent_json(&b, &d->lat[j], used);
    }
    sb_str(&b, "],\"vocab\":{");
    int first = 1;
    for (int id = 0; id < V; id++) {
        if (!used[id]) continue;
        sb_printf(&b, first ? "\"%d\":" : ",\"%d\":", id);
        sb_json_str(&b, tok_str(&ts, id));
        first = 0;
    }
    sb_str(&b, "}}");
    sb_str(&b, g_dash_page_tail);
    if (b.oom) st = LP_ERR(LP_ERR_OOM, "out of memory for %s", path);
    else st = write_atomic(path, b.p, b.n);
    free(b.p);
    free(used);
    tokstr_free(&ts);
    return st;
}

/* ---- Neuronpedia ---- */

static double r3(double v) { return isfinite(v) ? round(v * 1000.0) / 1000.0 : 0; }

static cJSON *np_activation(const lp_dash_example *x, double lo, double hi, double contains, tokstr *ts) {
    cJSON *a = cJSON_CreateObject();
    cJSON_AddNumberToObject(a, "bin_min", lo);
    cJSON_AddNumberToObject(a, "bin_max", hi);
    cJSON_AddNumberToObject(a, "bin_contains", contains);
    cJSON *t = cJSON_AddArrayToObject(a, "tokens"), *v = cJSON_AddArrayToObject(a, "values");
    for (int q = 0; q < x->len; q++) {
        cJSON_AddItemToArray(t, cJSON_CreateString(tok_str(ts, x->tokens[q])));
        cJSON_AddItemToArray(v, cJSON_CreateNumber(r3(x->acts[q])));
    }
    return a;
}

static void add_floats(cJSON *o, const char *key, const float *v, int n) {
    cJSON *a = cJSON_AddArrayToObject(o, key);
    for (int i = 0; i < n; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber(r3(v[i])));
}

static cJSON *np_feature(const lp_dash *d, const lp_dash_latent *l, tokstr *ts) {
    cJSON *f = cJSON_CreateObject();
    cJSON_AddNumberToObject(f, "feature_index", l->latent);
    static const char *const empty[] = {"neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                                        "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
                                        "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson"};
    for (size_t i = 0; i < sizeof empty / sizeof *empty; i++) cJSON_AddArrayToObject(f, empty[i]);
    cJSON *ns = cJSON_AddArrayToObject(f, "neg_str"), *ps = cJSON_AddArrayToObject(f, "pos_str");
    for (int i = 0; i < l->n_logits; i++) {
        cJSON_AddItemToArray(ns, cJSON_CreateString(tok_str(ts, l->neg_ids[i])));
        cJSON_AddItemToArray(ps, cJSON_CreateString(tok_str(ts, l->pos_ids[i])));
    }
    add_floats(f, "neg_values", l->neg_vals, l->n_logits);
    add_floats(f, "pos_values", l->pos_vals, l->n_logits);
    cJSON_AddNumberToObject(f, "frac_nonzero", l->density);
    cJSON *hv = cJSON_AddArrayToObject(f, "freq_hist_data_bar_values"), *hh = cJSON_AddArrayToObject(f, "freq_hist_data_bar_heights");
    double w = l->n_bins ? ldexp(1.0, l->hist_exp) : 0;
    for (int i = 0; i < l->n_bins; i++) {
        cJSON_AddItemToArray(hv, cJSON_CreateNumber(r3((i + 0.5) * w)));
        cJSON_AddItemToArray(hh, cJSON_CreateNumber((double)l->hist[i]));
    }
    cJSON *lh = cJSON_AddArrayToObject(f, "logits_hist_data_bar_heights"), *lv = cJSON_AddArrayToObject(f, "logits_hist_data_bar_values");
    double lw = ((double)l->logit_hi - l->logit_lo) / LP_DASH_LOGIT_BINS;
    for (int i = 0; l->n_logits && i < LP_DASH_LOGIT_BINS; i++) {
        cJSON_AddItemToArray(lh, cJSON_CreateNumber((double)l->logit_hist[i]));
        cJSON_AddItemToArray(lv, cJSON_CreateNumber(r3(l->logit_lo + (i + 0.5) * lw)));
    }
    cJSON_AddNumberToObject(f, "num_tokens_for_dashboard", (double)d->n_tokens);
    cJSON *acts = cJSON_AddArrayToObject(f, "activations");
    /* SAEDashboard's groups: the top activations (bin_min -1, bin_max the maximum,
     * bin_contains -1), then each interval from the highest, with the fraction of the
     * nonzero activations it holds */
    for (int i = 0; i < l->n_top; i++) cJSON_AddItemToArray(acts, np_activation(&l->top[i], -1, r3(l->max), -1, ts));
    for (int k = l->n_bands - 1; k >= 0; k--) {
        const lp_dash_band *B = &l->bands[k];
        double frac = l->fires ? (double)B->count / (double)l->fires : 0;
        for (int i = 0; i < B->n; i++) cJSON_AddItemToArray(acts, np_activation(&B->ex[i], r3(B->lo), r3(B->hi), round(frac * 1e6) / 1e6, ts));
    }
    return f;
}

lp_status lp_dash_write_neuronpedia(const lp_dash *d, const lp_tokenizer *tk, const char *model_id, int layer,
                                    const char *sae_set, int first, int n, const char *path) {
    if (first < 0 || n < 0 || first + n > d->n) LP_FAIL(LP_ERR_INTERNAL, "neuronpedia batch [%d, %d) outside %d latents", first, first + n, d->n);
    tokstr ts;
    LP_CHECK(tokstr_init(&ts, tk));
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "model_id", model_id ? model_id : "");
    cJSON_AddNumberToObject(root, "layer", layer);
    cJSON_AddStringToObject(root, "sae_set", sae_set ? sae_set : "");
    cJSON *fs = cJSON_AddArrayToObject(root, "features");
    for (int j = first; j < first + n; j++) cJSON_AddItemToArray(fs, np_feature(d, &d->lat[j], &ts));
    cJSON *set = cJSON_AddObjectToObject(root, "settings");
    cJSON_AddNumberToObject(set, "n_batches_to_sample_from", 0);
    cJSON_AddNumberToObject(set, "n_prompt_to_select", (double)d->n_seq);
    char *txt = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    tokstr_free(&ts);
    if (!txt) LP_FAIL(LP_ERR_OOM, "out of memory for %s", path);
    lp_status st = write_atomic(path, txt, strlen(txt));
    free(txt);
    return st;
}
