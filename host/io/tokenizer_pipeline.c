/* tokenizer_pipeline.c: the steps around the BPE model, as read from tokenizer.json
 * (normalizer, pre_tokenizer, post_processor) or named by GGUF tokenizer.ggml.pre, and the
 * text helpers they need: UTF-8 encoding, NFC, and the pre-tokenizer regexes compiled for
 * PCRE2 (see tokenizer_bpe.h). */
#include <stdio.h>
#include <utf8proc.h>

#include "io/tokenizer_bpe.h"

static const char *GPT2_PATTERN =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
static const char *LLAMA3_PATTERN =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char *QWEN2_PATTERN =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/* ---- text ---- */

int tok_utf8_put(char *dst, int32_t cp) {
    if (cp < 0x80) { dst[0] = (char)cp; return 1; }
    if (cp < 0x800) { dst[0] = (char)(0xC0 | (cp >> 6)); dst[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        dst[0] = (char)(0xE0 | (cp >> 12)), dst[1] = (char)(0x80 | ((cp >> 6) & 0x3F)), dst[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    dst[0] = (char)(0xF0 | (cp >> 18)), dst[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    dst[2] = (char)(0x80 | ((cp >> 6) & 0x3F)), dst[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

lp_status tok_nfc(const char *s, size_t n, char **out, size_t *out_len) {
    utf8proc_uint8_t *dst = NULL;
    utf8proc_ssize_t r = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &dst,
                                      UTF8PROC_STABLE | UTF8PROC_COMPOSE);
    if (r < 0) LP_FAIL(LP_ERR_INTERNAL, "NFC normalization failed: %s", utf8proc_errmsg(r));
    *out = (char *)dst, *out_len = (size_t)r;
    return LP_OK;
}

/* ---- regexes ---- */

/* tokenizers runs its patterns with Oniguruma, whose \s is the White_Space property; PCRE2's
 * UCP \s also takes U+180E (MONGOLIAN VOWEL SEPARATOR, a format character since Unicode 6.3).
 * Spelling \s and \S out as White_Space keeps the two engines on the same classes. */
#define WS_CLASS "\\t-\\r\\x{20}\\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}\\x{202f}\\x{205f}\\x{3000}"
static char *fix_pattern(const char *p) {
    size_t n = strlen(p), cap = n * 8 + sizeof WS_CLASS * 4 + 16;
    char *o = malloc(cap), *w = o;
    if (!o) return NULL;
    int in_class = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '\\' && i + 1 < n) {
            char c = p[i + 1];
            size_t left = cap - (size_t)(w - o);
            if (c == 's' || (c == 'S' && !in_class)) {
                if (left < sizeof WS_CLASS + 8) { /* grow: patterns are short, this is rare */
                    size_t off = (size_t)(w - o);
                    cap *= 2;
                    char *bigger = realloc(o, cap);
                    if (!bigger) { free(o); return NULL; }
                    o = bigger, w = o + off;
                }
                if (in_class) w += sprintf(w, "%s", WS_CLASS);
                else w += sprintf(w, c == 's' ? "[%s]" : "[^%s]", WS_CLASS);
            } else {
                *w++ = p[i], *w++ = c; /* \S inside a class is left to PCRE2 */
            }
            i++;
            continue;
        }
        if (p[i] == '[' && !in_class) {
            in_class = 1;
            *w++ = p[i];
            if (i + 1 < n && p[i + 1] == '^') *w++ = p[++i];
            if (i + 1 < n && p[i + 1] == ']') *w++ = p[++i]; /* a leading ] is literal */
            continue;
        }
        if (p[i] == '[' && in_class && i + 1 < n && p[i + 1] == ':') { /* [:alpha:] inside a class */
            const char *end = strstr(p + i + 2, ":]");
            if (end) {
                size_t k = (size_t)(end + 2 - (p + i));
                memcpy(w, p + i, k);
                w += k, i += k - 1;
                continue;
            }
        }
        if (p[i] == ']' && in_class) in_class = 0;
        *w++ = p[i];
    }
    *w = 0;
    return o;
}

static lp_status compile_regex(pcre2_code **re, const char *pattern, int literal, const char *src, const char *key) {
    char *fixed = literal ? strdup(pattern) : fix_pattern(pattern);
    if (!fixed) LP_FAIL(LP_ERR_OOM, "%s: out of memory", src);
    int err;
    PCRE2_SIZE off;
    *re = pcre2_compile((PCRE2_SPTR)fixed, PCRE2_ZERO_TERMINATED,
                        PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0), &err, &off, NULL);
    free(fixed);
    if (!*re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        LP_FAIL(LP_ERR_FORMAT, "%s: %s: cannot compile the pattern '%s': %s", src, key, pattern, (char *)msg);
    }
    pcre2_jit_compile(*re, PCRE2_JIT_COMPLETE); /* the interpreter stays as the fallback */
    return LP_OK;
}

/* ---- tokenizer.json ---- */

int tok_json_bool(const cJSON *o, const char *key, int dflt) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsBool(v) ? cJSON_IsTrue(v) : dflt;
}
const char *tok_json_type(const cJSON *o) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, "type");
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

lp_status tok_load_normalizer(lp_tokenizer *t, const cJSON *n, const char *key) {
    if (!n || cJSON_IsNull(n)) return LP_OK;
    const char *ty = tok_json_type(n);
    if (!ty) LP_FAIL(LP_ERR_FORMAT, "%s: %s has no type", t->source, key);
    if (strcmp(ty, "NFC") == 0) {
        t->nfc = 1;
        return LP_OK;
    }
    if (strcmp(ty, "Sequence") == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(n, "normalizers"), *e;
        if (!cJSON_IsArray(list)) LP_FAIL(LP_ERR_FORMAT, "%s: %s.normalizers is not a list", t->source, key);
        cJSON_ArrayForEach(e, list) LP_CHECK(tok_load_normalizer(t, e, "normalizer.normalizers[]"));
        return LP_OK;
    }
    LP_FAIL(LP_ERR_FORMAT, "%s: %s type '%s' is not supported (only NFC, or a Sequence of NFC)", t->source, key, ty);
}

static lp_status add_pre(lp_tokenizer *t, pre_step s) {
    if (t->n_pre == MAX_PRE_STEPS) {
        pcre2_code_free(s.re);
        LP_FAIL(LP_ERR_FORMAT, "%s: pre_tokenizer has more than %d steps", t->source, MAX_PRE_STEPS);
    }
    t->pre[t->n_pre++] = s;
    return LP_OK;
}

lp_status tok_load_pre(lp_tokenizer *t, const cJSON *p, const char *key) {
    const char *ty = tok_json_type(p);
    if (!ty) LP_FAIL(LP_ERR_FORMAT, "%s: %s has no type", t->source, key);
    if (strcmp(ty, "Sequence") == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(p, "pretokenizers"), *e;
        if (!cJSON_IsArray(list)) LP_FAIL(LP_ERR_FORMAT, "%s: %s.pretokenizers is not a list", t->source, key);
        cJSON_ArrayForEach(e, list) LP_CHECK(tok_load_pre(t, e, "pre_tokenizer.pretokenizers[]"));
        return LP_OK;
    }
    pre_step s = {0};
    if (strcmp(ty, "ByteLevel") == 0) {
        s.kind = PRE_BYTELEVEL;
        s.add_prefix_space = tok_json_bool(p, "add_prefix_space", 1);
        if (tok_json_bool(p, "use_regex", 1)) LP_CHECK(compile_regex(&s.re, GPT2_PATTERN, 0, t->source, key));
        return add_pre(t, s);
    }
    if (strcmp(ty, "Digits") == 0) {
        s.kind = PRE_DIGITS;
        s.individual_digits = tok_json_bool(p, "individual_digits", 0);
        return add_pre(t, s);
    }
    if (strcmp(ty, "Split") == 0) {
        const cJSON *pat = cJSON_GetObjectItemCaseSensitive(p, "pattern");
        const cJSON *re = cJSON_GetObjectItemCaseSensitive(pat, "Regex");
        const cJSON *str = cJSON_GetObjectItemCaseSensitive(pat, "String");
        const cJSON *beh = cJSON_GetObjectItemCaseSensitive(p, "behavior");
        if (!cJSON_IsString(re) && !cJSON_IsString(str))
            LP_FAIL(LP_ERR_FORMAT, "%s: %s Split.pattern needs a Regex or a String", t->source, key);
        if (!cJSON_IsString(beh) || strcmp(beh->valuestring, "Isolated") != 0)
            LP_FAIL(LP_ERR_FORMAT, "%s: %s Split.behavior '%s' is not supported (only Isolated)", t->source, key,
                    cJSON_IsString(beh) ? beh->valuestring : "?");
        if (tok_json_bool(p, "invert", 0))
            LP_FAIL(LP_ERR_FORMAT, "%s: %s Split.invert = true is not supported", t->source, key);
        s.kind = PRE_SPLIT;
        if (cJSON_IsString(re)) LP_CHECK(compile_regex(&s.re, re->valuestring, 0, t->source, "pre_tokenizer Split.pattern.Regex"));
        else {
            if (!str->valuestring[0]) LP_FAIL(LP_ERR_FORMAT, "%s: %s Split.pattern.String is empty", t->source, key);
            LP_CHECK(compile_regex(&s.re, str->valuestring, 1, t->source, "pre_tokenizer Split.pattern.String"));
        }
        return add_pre(t, s);
    }
    LP_FAIL(LP_ERR_FORMAT, "%s: %s type '%s' is not supported (only ByteLevel, Split, Digits and Sequence)",
            t->source, key, ty);
}

/* TemplateProcessing: the "single" template as ids before and after $A. */
static lp_status load_template(lp_tokenizer *t, const cJSON *p) {
    if (t->prefix || t->suffix)
        LP_FAIL(LP_ERR_FORMAT, "%s: post_processor has more than one TemplateProcessing", t->source);
    const cJSON *single = cJSON_GetObjectItemCaseSensitive(p, "single"), *item;
    const cJSON *specials = cJSON_GetObjectItemCaseSensitive(p, "special_tokens");
    if (!cJSON_IsArray(single)) LP_FAIL(LP_ERR_FORMAT, "%s: post_processor TemplateProcessing.single is not a list", t->source);
    int seen_a = 0;
    cJSON_ArrayForEach(item, single) {
        const cJSON *sp = cJSON_GetObjectItemCaseSensitive(item, "SpecialToken");
        const cJSON *seq = cJSON_GetObjectItemCaseSensitive(item, "Sequence");
        if (seq) {
            const cJSON *id = cJSON_GetObjectItemCaseSensitive(seq, "id");
            if (!cJSON_IsString(id) || strcmp(id->valuestring, "A") != 0 || seen_a)
                LP_FAIL(LP_ERR_FORMAT, "%s: post_processor TemplateProcessing.single must hold $A exactly once", t->source);
            seen_a = 1;
            continue;
        }
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(sp, "id");
        if (!cJSON_IsString(name))
            LP_FAIL(LP_ERR_FORMAT, "%s: post_processor TemplateProcessing.single has an item that is neither SpecialToken nor Sequence", t->source);
        const cJSON *entry = cJSON_GetObjectItemCaseSensitive(specials, name->valuestring);
        const cJSON *ids = cJSON_GetObjectItemCaseSensitive(entry, "ids"), *id;
        if (!cJSON_IsArray(ids))
            LP_FAIL(LP_ERR_FORMAT, "%s: post_processor TemplateProcessing.special_tokens has no ids for '%s'", t->source, name->valuestring);
        cJSON_ArrayForEach(id, ids) {
            if (!cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble >= MAX_VOCAB_ID)
                LP_FAIL(LP_ERR_FORMAT, "%s: post_processor TemplateProcessing.special_tokens['%s'].ids holds a bad id", t->source, name->valuestring);
            int32_t **dst = seen_a ? &t->suffix : &t->prefix;
            int *cnt = seen_a ? &t->n_suffix : &t->n_prefix;
            int32_t *grown = realloc(*dst, (size_t)(*cnt + 1) * sizeof **dst);
            if (!grown) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
            *dst = grown;
            (*dst)[(*cnt)++] = (int32_t)id->valuedouble;
        }
    }
    if (!seen_a) LP_FAIL(LP_ERR_FORMAT, "%s: post_processor TemplateProcessing.single has no $A", t->source);
    return LP_OK;
}

lp_status tok_load_post(lp_tokenizer *t, const cJSON *p, const char *key) {
    if (!p || cJSON_IsNull(p)) return LP_OK;
    const char *ty = tok_json_type(p);
    if (!ty) LP_FAIL(LP_ERR_FORMAT, "%s: %s has no type", t->source, key);
    if (strcmp(ty, "ByteLevel") == 0) return LP_OK; /* offsets only */
    if (strcmp(ty, "TemplateProcessing") == 0) return load_template(t, p);
    if (strcmp(ty, "Sequence") == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(p, "processors"), *e;
        if (!cJSON_IsArray(list)) LP_FAIL(LP_ERR_FORMAT, "%s: %s.processors is not a list", t->source, key);
        cJSON_ArrayForEach(e, list) LP_CHECK(tok_load_post(t, e, "post_processor.processors[]"));
        return LP_OK;
    }
    LP_FAIL(LP_ERR_FORMAT, "%s: %s type '%s' is not supported (only ByteLevel, TemplateProcessing and Sequence)",
            t->source, key, ty);
}

/* ---- GGUF ---- */

lp_status tok_gguf_pre(lp_tokenizer *t, const char *pre, size_t n) {
    pre_step s = {0};
#define IS(name) (n == strlen(name) && memcmp(pre, name, n) == 0)
    if (IS("default") || IS("gpt-2") || IS("gpt2")) {
        s.kind = PRE_BYTELEVEL;
        LP_CHECK(compile_regex(&s.re, GPT2_PATTERN, 0, t->source, "tokenizer.ggml.pre"));
        return add_pre(t, s);
    }
    if (IS("smollm")) {
        LP_CHECK(add_pre(t, (pre_step){.kind = PRE_DIGITS, .individual_digits = 1}));
        s.kind = PRE_BYTELEVEL;
        LP_CHECK(compile_regex(&s.re, GPT2_PATTERN, 0, t->source, "tokenizer.ggml.pre"));
        return add_pre(t, s);
    }
    const char *pattern = NULL;
    if (IS("llama-bpe") || IS("llama3") || IS("llama-v3")) pattern = LLAMA3_PATTERN, t->ignore_merges = 1;
    else if (IS("qwen2")) pattern = QWEN2_PATTERN, t->nfc = 1;
#undef IS
    if (!pattern)
        LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.pre '%.*s' is not supported (known: default, gpt-2, llama-bpe, llama3, smollm, qwen2)",
                t->source, (int)n, pre);
    s.kind = PRE_SPLIT;
    LP_CHECK(compile_regex(&s.re, pattern, 0, t->source, "tokenizer.ggml.pre"));
    LP_CHECK(add_pre(t, s));
    return add_pre(t, (pre_step){.kind = PRE_BYTELEVEL});
}
