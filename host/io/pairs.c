/* pairs.c: one JSONL prompt-pair line to token ids (pairs.h). cJSON parses the line;
 * what cJSON cannot tell us is checked on the line's text: cJSON keeps every number as
 * a double, so 3.0, 1e3 and 3.0000000000000001 would all arrive as the integer 3, and a
 * "\u0000" escape cuts its string short. A scan of the text lists the number literals
 * that are not integer literals, in document order; the n-th number value of the cJSON
 * tree is the n-th literal, so each id can be checked against its own literal. Every
 * step is linear in the line (id arrays are walked through ->next, never by index). */
#include <cjson/cJSON.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/pairs.h"
#include "loupe/textfile.h"

/* A number literal that is not an integer literal: its ordinal among all the number
 * literals of the line, and where its text is. */
typedef struct odd_num { long ordinal; size_t at, len; } odd_num;

typedef struct pctx {
    const lp_pair_opts *o;
    int line;
    const char *text; /* the JSON text (the trimmed line) */
    const cJSON *root;
    odd_num *odd;
    size_t n_odd;
} pctx;

static lp_status perr(const pctx *x, lp_status st, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static lp_status perr(const pctx *x, lp_status st, const char *fmt, ...) {
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return LP_ERR(st, "%s:%d: %s", x->o->file, x->line, msg);
}

/* Scans JSON text that cJSON accepted: records the non-integer number literals in x->odd
 * and finds a \u0000 escape (*nul_at, else n). */
static lp_status scan_literals(pctx *x, const char *s, size_t n, size_t *nul_at) {
    long ordinal = 0;
    size_t cap = 0;
    *nul_at = n;
    for (size_t i = 0; i < n;) {
        char ch = s[i];
        if (ch == '"') { /* a string: skip it, watching escapes */
            for (i++; i < n && s[i] != '"'; i++)
                if (s[i] == '\\') {
                    if (i + 5 < n && memcmp(s + i + 1, "u0000", 5) == 0 && *nul_at == n) *nul_at = i;
                    i++;
                }
            i++;
        } else if (ch == '-' || (ch >= '0' && ch <= '9')) {
            size_t at = i;
            int integral = 1;
            for (; i < n && strchr("0123456789+-.eE", s[i]) && s[i]; i++) integral &= s[i] != '.' && s[i] != 'e' && s[i] != 'E';
            if (!integral) {
                if (x->n_odd == cap) {
                    cap = cap ? 2 * cap : 8;
                    odd_num *b = realloc(x->odd, cap * sizeof *b);
                    if (!b) return perr(x, LP_ERR_OOM, "out of memory");
                    x->odd = b;
                }
                x->odd[x->n_odd++] = (odd_num){ordinal, at, i - at};
            }
            ordinal++;
        } else {
            i++;
        }
    }
    return LP_OK;
}

/* How many number values come before target in document order (*found once reached). */
static long numbers_before(const cJSON *v, const cJSON *target, int *found) {
    long k = 0;
    for (; v && !*found; v = v->next) {
        if (v == target) {
            *found = 1;
            break;
        }
        if (cJSON_IsNumber(v)) k++;
        else if (v->child) k += numbers_before(v->child, target, found);
    }
    return k;
}

/* The non-integer literal with this ordinal, or NULL (x->odd is in ordinal order). */
static const odd_num *odd_at(const pctx *x, long ordinal) {
    size_t lo = 0, hi = x->n_odd;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (x->odd[mid].ordinal < ordinal) lo = mid + 1;
        else hi = mid;
    }
    return lo < x->n_odd && x->odd[lo].ordinal == ordinal ? &x->odd[lo] : NULL;
}

/* One id: a number value whose literal is an integer in [0, d_vocab). ordinal < 0: not known yet. */
static lp_status check_id(const pctx *x, const cJSON *e, long ordinal, const char *field, long index, int32_t *out) {
    char where[64];
    if (index >= 0) snprintf(where, sizeof where, "'%s'[%ld]", field, index);
    else snprintf(where, sizeof where, "'%s'", field);
    if (!cJSON_IsNumber(e)) return perr(x, LP_ERR_FORMAT, "%s: not a token id (a number)", where);
    if (x->n_odd) {
        if (ordinal < 0) {
            int found = 0;
            ordinal = numbers_before(x->root->child, e, &found);
        }
        const odd_num *od = odd_at(x, ordinal);
        if (od) return perr(x, LP_ERR_FORMAT, "%s: %.*s is not an integer token id", where, (int)(od->len < 40 ? od->len : 40), x->text + od->at);
    }
    double d = e->valuedouble;
    if (!(d >= 0 && d < x->o->d_vocab)) return perr(x, LP_ERR_ARG, "%s: token id %.17g is not in [0, %d)", where, d, x->o->d_vocab);
    *out = (int32_t)d;
    return LP_OK;
}

/* The ids of a field: text (tokenized), a list of ids, or one id. Lists are measured
 * against the context before anything is allocated. */
static lp_status ids_of(const pctx *x, const cJSON *v, const char *field, int32_t **ids, size_t *n) {
    *ids = NULL, *n = 0;
    if (cJSON_IsString(v)) {
        if (!x->o->tk) return perr(x, LP_ERR_ARG, "'%s' is text but the model has no tokenizer (give token-id lists)", field);
        size_t len = strlen(v->valuestring), bad = lp_utf8_invalid_at(v->valuestring, len);
        if (bad < len)
            return perr(x, LP_ERR_FORMAT, "'%s': not valid UTF-8: byte 0x%02x at offset %zu of the text", field, (unsigned char)v->valuestring[bad], bad);
        lp_status st = lp_tokenize(x->o->tk, v->valuestring, len, ids, n);
        if (st != LP_OK) {
            char why[512];
            snprintf(why, sizeof why, "%s", lp_last_error());
            return perr(x, st, "'%s': %s", field, why);
        }
        if (*n > (size_t)x->o->n_ctx) {
            free(*ids), *ids = NULL;
            return perr(x, LP_ERR_ARG, "the prompts are %zu tokens; the model's context is %d ('%s')", *n, x->o->n_ctx, field);
        }
        return LP_OK;
    }
    if (cJSON_IsArray(v)) {
        size_t k = 0;
        for (const cJSON *e = v->child; e; e = e->next) k++;
        if (k > (size_t)x->o->n_ctx)
            return perr(x, LP_ERR_ARG, "the prompts are %zu tokens; the model's context is %d ('%s')", k, x->o->n_ctx, field);
        long base = -1; /* the ordinal of the first element, when some literal is odd */
        if (x->n_odd && v->child) {
            int found = 0;
            base = numbers_before(x->root->child, v->child, &found);
        }
        int32_t *out = malloc((k ? k : 1) * sizeof *out);
        if (!out) return perr(x, LP_ERR_OOM, "out of memory");
        size_t i = 0;
        for (const cJSON *e = v->child; e; e = e->next, i++) {
            /* every element before e is a number (checked), so e's ordinal is base + i */
            lp_status st = check_id(x, e, base < 0 ? -1 : base + (long)i, field, (long)i, &out[i]);
            if (st != LP_OK) {
                free(out);
                return st;
            }
        }
        *ids = out, *n = k;
        return LP_OK;
    }
    if (cJSON_IsNumber(v)) {
        int32_t id;
        LP_CHECK(check_id(x, v, -1, field, -1, &id));
        if (!(*ids = malloc(sizeof **ids))) return perr(x, LP_ERR_OOM, "out of memory");
        (*ids)[0] = id, *n = 1;
        return LP_OK;
    }
    return perr(x, LP_ERR_FORMAT, "'%s' must be text or a list of token ids", field);
}

/* An answer: exactly one token (a leading BOS the tokenizer adds does not count). */
static lp_status one_token(const pctx *x, const cJSON *v, const char *field, int32_t *out) {
    int32_t *ids;
    size_t n;
    LP_CHECK(ids_of(x, v, field, &ids, &n));
    const int32_t *p = ids;
    if (cJSON_IsString(v) && n > 1 && ids[0] == lp_tokenizer_bos(x->o->tk)) p++, n--;
    lp_status st = n == 1 ? LP_OK : perr(x, LP_ERR_ARG, "'%s' is %zu tokens, not one", field, n);
    if (st == LP_OK) *out = p[0];
    free(ids);
    return st;
}

/* Pads the shorter of the two prompts on the left with its own first token (BOS when
 * the tokenizer adds one), so both are T long. Both have a first token: parse_pair
 * refuses an empty prompt before this. */
static lp_status pad_left(const pctx *x, lp_pair *p, size_t *nc, size_t *nx) {
    size_t T = *nc > *nx ? *nc : *nx, ns = *nc < *nx ? *nc : *nx;
    int32_t **sh = *nc < *nx ? &p->clean : &p->corrupted;
    int32_t *q = malloc(T * sizeof *q);
    if (!q) return perr(x, LP_ERR_OOM, "out of memory");
    for (size_t i = 0; i < T; i++) q[i] = i < T - ns ? (*sh)[0] : (*sh)[i - (T - ns)];
    free(*sh);
    *sh = q;
    *nc = *nx = T;
    return LP_OK;
}

static const char *const g_fields[4] = {"clean", "corrupted", "answer", "wrong_answer"};

/* The four fields of the object, each exactly once. */
static lp_status fields_of(const pctx *x, const cJSON *f[4]) {
    for (int i = 0; i < 4; i++) f[i] = NULL;
    for (const cJSON *c = x->root->child; c; c = c->next)
        for (int i = 0; i < 4; i++)
            if (c->string && strcmp(c->string, g_fields[i]) == 0) {
                if (f[i]) return perr(x, LP_ERR_FORMAT, "\"%s\" is given twice", g_fields[i]);
                f[i] = c;
            }
    for (int i = 0; i < 4; i++)
        if (!f[i]) return perr(x, LP_ERR_FORMAT, "missing \"%s\"", g_fields[i]);
    return LP_OK;
}

static lp_status parse_pair(pctx *x, lp_pair *p) {
    const cJSON *f[4];
    size_t nc = 0, nx = 0;
    LP_CHECK(fields_of(x, f));
    LP_CHECK(ids_of(x, f[0], "clean", &p->clean, &nc));
    LP_CHECK(ids_of(x, f[1], "corrupted", &p->corrupted, &nx));
    /* an empty prompt ([] or text that tokenizes to nothing) has no last position to
     * score and no first token to pad with: a bad line whatever the alignment */
    if (nc == 0) return perr(x, LP_ERR_ARG, "'clean' gives no tokens");
    if (nx == 0) return perr(x, LP_ERR_ARG, "'corrupted' gives no tokens");
    LP_CHECK(one_token(x, f[2], "answer", &p->answer));
    LP_CHECK(one_token(x, f[3], "wrong_answer", &p->wrong));
    if (nc != nx && !x->o->pad_left)
        return perr(x, LP_ERR_ARG, "clean is %zu tokens and corrupted %zu (set attrib.align=pad_left to pad the shorter)", nc, nx);
    if (nc != nx) LP_CHECK(pad_left(x, p, &nc, &nx));
    if (nc > (size_t)x->o->n_ctx)
        return perr(x, LP_ERR_ARG, "the prompts are %zu tokens; the model's context is %d", nc, x->o->n_ctx);
    p->T = (int)nc;
    return LP_OK;
}

static int is_space(char ch) { return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n'; }

/* The checks every JSONL line gets (a NUL byte, one JSON object and nothing after it, no
 * \u0000 escape, the number literals scanned), then body on its tree. A blank line is LP_OK
 * without calling body. `what` names one line's content in messages ("pair"). */
typedef lp_status (*line_body)(pctx *x, void *out);
static lp_status parse_line(const lp_pair_opts *o, const char *line, size_t len, int line_no, const char *what, line_body body,
                            void *out) {
    pctx x = {.o = o, .line = line_no};
    const char *nul = memchr(line, 0, len);
    if (nul) return perr(&x, LP_ERR_FORMAT, "a NUL byte at column %zu", (size_t)(nul - line) + 1);
    size_t a = 0, b = len;
    while (a < b && is_space(line[a])) a++;
    while (b > a && is_space(line[b - 1])) b--;
    if (a == b) return LP_OK;
    const char *s = line + a, *end = NULL;
    size_t n = b - a;
    cJSON *j = cJSON_ParseWithLengthOpts(s, n, &end, 0);
    if (!j) return perr(&x, LP_ERR_FORMAT, "not valid JSON (at column %zu)", (size_t)(end ? end - line : 0) + 1);
    x.text = s, x.root = j;
    size_t used = (size_t)(end - s), nul_esc;
    while (used < n && is_space(s[used])) used++;
    lp_status st = LP_OK;
    if (used < n) /* cJSON stops after one value; the rest of the line is not blank */
        st = s[used] == '{' || s[used] == '['
                 ? perr(&x, LP_ERR_FORMAT, "a second JSON value at column %zu (one %s per line)", a + used + 1, what)
                 : perr(&x, LP_ERR_FORMAT, "text after the JSON object at column %zu", a + used + 1);
    else if (!cJSON_IsObject(j))
        st = perr(&x, LP_ERR_FORMAT, "not a JSON object");
    else if ((st = scan_literals(&x, s, n, &nul_esc)) == LP_OK && nul_esc < n)
        st = perr(&x, LP_ERR_FORMAT, "a \\u0000 (NUL) escape in a string at column %zu", a + nul_esc + 1);
    if (st == LP_OK) st = body(&x, out);
    cJSON_Delete(j);
    free(x.odd);
    return st;
}

static lp_status pair_body(pctx *x, void *out) { return parse_pair(x, out); }

lp_status lp_pair_parse_line(const lp_pair_opts *o, const char *line, size_t len, int line_no, lp_pair *p) {
    memset(p, 0, sizeof *p);
    lp_status st = parse_line(o, line, len, line_no, "pair", pair_body, p);
    if (st != LP_OK) lp_pair_free(p);
    return st;
}

void lp_pair_free(lp_pair *p) {
    free(p->clean), free(p->corrupted);
    memset(p, 0, sizeof *p);
}

/* ---- one prompt of `loupe lens` ---- */

static const char *const g_pfields[4] = {"prompt", "answer", "wrong_answer", "position"};

/* "position": an integer literal in [-T, T) (negative counts from the end). */
static lp_status position_of(const pctx *x, const cJSON *v, int T, int *pos) {
    if (!cJSON_IsNumber(v)) return perr(x, LP_ERR_FORMAT, "'position' must be an integer");
    if (x->n_odd) {
        int found = 0;
        const odd_num *od = odd_at(x, numbers_before(x->root->child, v, &found));
        if (od) return perr(x, LP_ERR_FORMAT, "'position': %.*s is not an integer", (int)(od->len < 40 ? od->len : 40), x->text + od->at);
    }
    double d = v->valuedouble;
    if (!(d >= -T && d < T))
        return perr(x, LP_ERR_ARG, "'position' %.17g is outside the prompt of %d tokens (0..%d, or -%d..-1 from the end)", d, T, T - 1, T);
    *pos = d < 0 ? T + (int)d : (int)d;
    return LP_OK;
}

static lp_status prompt_body(pctx *x, void *out) {
    lp_prompt *p = out;
    const cJSON *f[4] = {NULL, NULL, NULL, NULL};
    for (const cJSON *c = x->root->child; c; c = c->next)
        for (int i = 0; i < 4; i++)
            if (c->string && strcmp(c->string, g_pfields[i]) == 0) {
                if (f[i]) return perr(x, LP_ERR_FORMAT, "\"%s\" is given twice", g_pfields[i]);
                f[i] = c;
            }
    if (!f[0]) return perr(x, LP_ERR_FORMAT, "missing \"prompt\"");
    if (f[2] && !f[1]) return perr(x, LP_ERR_FORMAT, "\"wrong_answer\" is given without \"answer\"");
    size_t n;
    LP_CHECK(ids_of(x, f[0], "prompt", &p->ids, &n));
    if (n == 0) return perr(x, LP_ERR_ARG, "'prompt' gives no tokens");
    p->answer = p->wrong = -1;
    if (f[1]) LP_CHECK(one_token(x, f[1], "answer", &p->answer));
    if (f[2]) LP_CHECK(one_token(x, f[2], "wrong_answer", &p->wrong));
    p->pos = (int)n - 1;
    if (f[3]) LP_CHECK(position_of(x, f[3], (int)n, &p->pos));
    p->T = (int)n;
    return LP_OK;
}

lp_status lp_prompt_parse_line(const lp_pair_opts *o, const char *line, size_t len, int line_no, lp_prompt *p) {
    memset(p, 0, sizeof *p);
    lp_status st = parse_line(o, line, len, line_no, "prompt", prompt_body, p);
    if (st != LP_OK) lp_prompt_free(p);
    return st;
}

void lp_prompt_free(lp_prompt *p) {
    free(p->ids);
    memset(p, 0, sizeof *p);
}
