/* tokenizer_spm_load.c: reading SentencePiece-style BPE (see tokenizer_spm.h) from a
 * tokenizer.json, or from a Gemma GGUF the way transformers converts one (integrations/
 * gguf: gemma_tokenizer, add_gguf_special_tokens, GemmaTokenizer):
 *   - tokens made of spaces only ("  ") are spelled "\u2581\u2581", as in the tokenizer.json;
 *     a token of white space holding a space is respelled likewise, one "\u2581" per character;
 *   - no merge list: pairs merge by the rule in tokenizer_spm.c (listed merges win if present);
 *   - control tokens (type 3) and the bos/eos/unk/padding tokens are special added tokens,
 *     user-defined ones (type 4) plain added tokens, all matched whole in the raw text;
 *   - normalizer Replace " " -> "\u2581" (no dummy prefix), no pre-tokenizer split, decoder
 *     "\u2581" -> " " with byte fallback; BOS first unless tokenizer.ggml.add_bos_token is false.
 * This follows Hugging Face's converted tokenizer, not llama.cpp's score-based merging
 * (SentencePiece itself keeps "\u2581" with the next word: "a  b" is a, \u2581, \u2581b there and
 * a, \u2581\u2581, b here). A layout not listed is refused, naming the file and the field. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/safetensors.h"
#include "loupe/textfile.h"
#include "io/json.h"
#include "io/tokenizer_spm.h"

#define MAX_VOCAB_ID (1 << 26)
#define SPACE_MARK "\xe2\x96\x81" /* U+2581, SentencePiece's space */

static const char *json_type(const cJSON *o) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, "type");
    return cJSON_IsString(v) ? v->valuestring : NULL;
}
static int json_bool(const cJSON *o, const char *key, int dflt) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsBool(v) ? cJSON_IsTrue(v) : dflt;
}
static int is_type(const cJSON *o, const char *ty) { return json_type(o) && strcmp(json_type(o), ty) == 0; }

static int has_bytelevel(const cJSON *p) {
    if (is_type(p, "ByteLevel")) return 1;
    const cJSON *e, *list = cJSON_GetObjectItemCaseSensitive(p, "pretokenizers");
    cJSON_ArrayForEach(e, list) if (has_bytelevel(e)) return 1;
    return 0;
}

int spm_json_applies(const cJSON *root) {
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(root, "model");
    return is_type(m, "BPE") && json_bool(m, "byte_fallback", 0) &&
           !has_bytelevel(cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"));
}

/* A Replace step {"pattern": {"String": from}, "content": to}. */
static lp_status load_replace(lp_spm *s, const cJSON *r, spm_replace *dst, const char *key) {
    const cJSON *pat = cJSON_GetObjectItemCaseSensitive(r, "pattern");
    const cJSON *from = cJSON_GetObjectItemCaseSensitive(pat, "String"), *to = cJSON_GetObjectItemCaseSensitive(r, "content");
    if (!cJSON_IsString(from) || !from->valuestring[0] || !cJSON_IsString(to))
        LP_FAIL(LP_ERR_FORMAT, "%s: %s Replace needs pattern.String (a Regex pattern is not supported) and content", s->source, key);
    dst->from = strdup(from->valuestring), dst->to = strdup(to->valuestring);
    if (!dst->from || !dst->to) LP_FAIL(LP_ERR_OOM, "%s: out of memory", s->source);
    dst->from_len = strlen(dst->from), dst->to_len = strlen(dst->to);
    return LP_OK;
}

static lp_status load_normalizer(lp_spm *s, const cJSON *n, const char *key) {
    if (!n || cJSON_IsNull(n)) return LP_OK;
    if (is_type(n, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(n, "normalizers"), *e;
        if (!cJSON_IsArray(list)) LP_FAIL(LP_ERR_FORMAT, "%s: %s.normalizers is not a list", s->source, key);
        cJSON_ArrayForEach(e, list) LP_CHECK(load_normalizer(s, e, "normalizer.normalizers[]"));
        return LP_OK;
    }
    if (!is_type(n, "Replace"))
        LP_FAIL(LP_ERR_FORMAT, "%s: %s type '%s' is not supported with byte_fallback (only Replace, or a Sequence of Replace)",
                s->source, key, json_type(n) ? json_type(n) : "(none)");
    if (s->n_norm == SPM_MAX_REPLACE) LP_FAIL(LP_ERR_FORMAT, "%s: %s has more than %d steps", s->source, key, SPM_MAX_REPLACE);
    spm_replace *r = &s->norm[s->n_norm++];
    return load_replace(s, n, r, key);
}

static lp_status load_pre(lp_spm *s, const cJSON *p) {
    if (!p || cJSON_IsNull(p)) return LP_OK;
    if (!is_type(p, "Split"))
        LP_FAIL(LP_ERR_FORMAT, "%s: pre_tokenizer type '%s' is not supported with byte_fallback (only Split on a string, or none)",
                s->source, json_type(p) ? json_type(p) : "(none)");
    const cJSON *str = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(p, "pattern"), "String");
    const cJSON *beh = cJSON_GetObjectItemCaseSensitive(p, "behavior");
    if (!cJSON_IsString(str) || !str->valuestring[0])
        LP_FAIL(LP_ERR_FORMAT, "%s: pre_tokenizer Split.pattern must be a non-empty String here (a Regex is not supported)", s->source);
    if (json_bool(p, "invert", 0)) LP_FAIL(LP_ERR_FORMAT, "%s: pre_tokenizer Split.invert = true is not supported", s->source);
    static const char *names[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext"};
    for (int i = 0; i < 4 && cJSON_IsString(beh); i++)
        if (strcmp(beh->valuestring, names[i]) == 0) s->split = (spm_split)(SPM_SPLIT_REMOVED + i);
    if (s->split == SPM_SPLIT_NONE)
        LP_FAIL(LP_ERR_FORMAT, "%s: pre_tokenizer Split.behavior '%s' is not supported (Removed, Isolated, MergedWithPrevious, MergedWithNext)",
                s->source, cJSON_IsString(beh) ? beh->valuestring : "?");
    if (!(s->split_str = strdup(str->valuestring))) LP_FAIL(LP_ERR_OOM, "%s: out of memory", s->source);
    s->split_len = strlen(s->split_str);
    return LP_OK;
}

/* Replace (at most one, before ByteFallback), ByteFallback and Fuse, alone or in a Sequence. */
static lp_status load_decoder(lp_spm *s, const cJSON *d) {
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(d, "decoders"), *e;
    int n = is_type(d, "Sequence") ? cJSON_GetArraySize(list) : 1;
    for (int i = 0; i < n; i++) {
        e = is_type(d, "Sequence") ? cJSON_GetArrayItem(list, i) : d;
        if (is_type(e, "Fuse")) continue;
        if (is_type(e, "ByteFallback")) s->dec_bytes = 1;
        else if (is_type(e, "Replace") && !s->n_dec && !s->dec_bytes) {
            LP_CHECK(load_replace(s, e, &s->dec, "decoder"));
            s->n_dec = 1;
        } else
            LP_FAIL(LP_ERR_FORMAT, "%s: decoder step '%s' is not supported with byte_fallback (only one Replace, then ByteFallback and Fuse)",
                    s->source, json_type(e) ? json_type(e) : "(none)");
    }
    return LP_OK;
}

static lp_status load_model(lp_spm *s, const cJSON *m, size_t json_len) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(m, "dropout"), *e;
    if (v && !cJSON_IsNull(v) && !(cJSON_IsNumber(v) && v->valuedouble == 0))
        LP_FAIL(LP_ERR_FORMAT, "%s: model.dropout is not supported (BPE dropout is random)", s->source);
    const char *affix[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int i = 0; i < 2; i++) {
        v = cJSON_GetObjectItemCaseSensitive(m, affix[i]);
        if (v && !cJSON_IsNull(v) && !(cJSON_IsString(v) && !v->valuestring[0]))
            LP_FAIL(LP_ERR_FORMAT, "%s: model.%s is not supported", s->source, affix[i]);
    }
    if (json_bool(m, "ignore_merges", 0)) LP_FAIL(LP_ERR_FORMAT, "%s: model.ignore_merges = true is not supported with byte_fallback", s->source);
    s->fuse_unk = json_bool(m, "fuse_unk", 0);
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(m, "vocab");
    if (!cJSON_IsObject(vocab)) LP_FAIL(LP_ERR_FORMAT, "%s: model.vocab is not an object", s->source);
    cJSON_ArrayForEach(e, vocab) {
        if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble >= MAX_VOCAB_ID || e->valuedouble != (double)(int32_t)e->valuedouble)
            LP_FAIL(LP_ERR_FORMAT, "%s: model.vocab['%s'] is not a token id", s->source, e->string);
        int32_t id = (int32_t)e->valuedouble;
        if ((size_t)id >= json_len) /* each entry takes bytes of the file: the id table stays sized by the file */
            LP_FAIL(LP_ERR_FORMAT, "%s: model.vocab['%s'] = %d is beyond any dense vocabulary the file can hold", s->source, e->string, id);
        size_t len = strlen(e->string), bad = lp_utf8_invalid_at(e->string, len);
        if (bad != len) LP_FAIL(LP_ERR_FORMAT, "%s: the model.vocab key of id %d is not valid UTF-8 (offset %zu)", s->source, id, bad);
        if (id < s->n_ids && s->text[id]) LP_FAIL(LP_ERR_FORMAT, "%s: model.vocab gives id %d to both '%s' and '%s'", s->source, id, s->text[id], e->string);
        LP_CHECK(spm_set_text(s, id, e->string, len));
        LP_CHECK(spm_vocab_put(s, id));
    }
    v = cJSON_GetObjectItemCaseSensitive(m, "unk_token");
    if (cJSON_IsString(v) && (s->unk = spm_vocab_get(s, v->valuestring, strlen(v->valuestring))) < 0)
        LP_FAIL(LP_ERR_FORMAT, "%s: model.unk_token '%s' is not in the vocabulary", s->source, v->valuestring);
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(m, "merges");
    if (!cJSON_IsArray(merges)) LP_FAIL(LP_ERR_FORMAT, "%s: model.merges is not a list", s->source);
    LP_CHECK(spm_merges_init(s, (size_t)cJSON_GetArraySize(merges)));
    int32_t rank = 0;
    cJSON_ArrayForEach(e, merges) {
        const cJSON *a = cJSON_GetArrayItem(e, 0), *b = cJSON_GetArrayItem(e, 1);
        if (cJSON_IsString(e)) { /* "a b": exactly one space */
            const char *t = e->valuestring, *sp = strchr(t, ' ');
            if (!sp || strchr(sp + 1, ' '))
                LP_FAIL(LP_ERR_FORMAT, "%s: model.merges[%d] '%s' is not two tokens separated by one space", s->source, rank, t);
            LP_CHECK(spm_merge_add(s, t, (size_t)(sp - t), sp + 1, strlen(sp + 1), rank, "model.merges"));
        } else if (cJSON_IsArray(e) && cJSON_GetArraySize(e) == 2 && cJSON_IsString(a) && cJSON_IsString(b)) {
            LP_CHECK(spm_merge_add(s, a->valuestring, strlen(a->valuestring), b->valuestring, strlen(b->valuestring), rank, "model.merges"));
        } else {
            LP_FAIL(LP_ERR_FORMAT, "%s: model.merges[%d] is neither \"a b\" nor [\"a\", \"b\"]", s->source, rank);
        }
        rank++;
    }
    return LP_OK;
}

/* AddedVocabulary::add_tokens: a token in the model's vocabulary keeps its id, a new one
 * takes the next id after the vocabulary and the tokens added so far. */
static lp_status add_token(lp_spm *s, const char *content, size_t len, int32_t model_size, int special, int lstrip,
                           int rstrip, int single_word, int normalized) {
    if (len == 0) return LP_OK;
    const lp_added_tok *old = added_find(&s->added, content, len);
    int32_t id = old ? old->id : spm_vocab_get(s, content, len);
    if (id < 0) {
        id = model_size > s->n_ids ? model_size : s->n_ids;
        if (id >= MAX_VOCAB_ID) LP_FAIL(LP_ERR_FORMAT, "%s: added token '%.*s' would get id %d, too large", s->source, (int)len, content, id);
    }
    LP_CHECK(spm_set_text(s, id, content, len));
    return added_put(&s->added, content, len, id, special, lstrip, rstrip, single_word, normalized, s->source);
}

/* TemplateProcessing: the "single" template as ids before and after $A. */
static lp_status load_post(lp_spm *s, const cJSON *p) {
    if (!p || cJSON_IsNull(p)) return LP_OK;
    if (!is_type(p, "TemplateProcessing"))
        LP_FAIL(LP_ERR_FORMAT, "%s: post_processor type '%s' is not supported with byte_fallback (only TemplateProcessing)",
                s->source, json_type(p) ? json_type(p) : "(none)");
    const cJSON *single = cJSON_GetObjectItemCaseSensitive(p, "single"), *item, *id;
    const cJSON *specials = cJSON_GetObjectItemCaseSensitive(p, "special_tokens");
    int seen_a = 0;
    cJSON_ArrayForEach(item, single) {
        const cJSON *seq = cJSON_GetObjectItemCaseSensitive(item, "Sequence");
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(item, "SpecialToken"), "id");
        if (seq) {
            if (seen_a++) LP_FAIL(LP_ERR_FORMAT, "%s: post_processor TemplateProcessing.single holds $A twice", s->source);
            continue;
        }
        const cJSON *ids = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(specials, cJSON_IsString(name) ? name->valuestring : ""), "ids");
        if (!cJSON_IsArray(ids))
            LP_FAIL(LP_ERR_FORMAT, "%s: post_processor TemplateProcessing.single has an item without special_tokens ids", s->source);
        cJSON_ArrayForEach(id, ids) {
            int32_t *dst = seen_a ? s->suffix : s->prefix;
            int *cnt = seen_a ? &s->n_suffix : &s->n_prefix;
            if (!cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble >= s->n_ids || !s->text[(int32_t)id->valuedouble])
                LP_FAIL(LP_ERR_FORMAT, "%s: post_processor TemplateProcessing adds an id that is not in the vocabulary", s->source);
            if (*cnt == SPM_MAX_AFFIX) LP_FAIL(LP_ERR_FORMAT, "%s: post_processor TemplateProcessing adds too many tokens", s->source);
            dst[(*cnt)++] = (int32_t)id->valuedouble;
        }
    }
    if (!seen_a) LP_FAIL(LP_ERR_FORMAT, "%s: post_processor TemplateProcessing.single has no $A", s->source);
    return LP_OK;
}

/* tokenizer_config.json beside the file: which tokens are BOS and EOS. */
static int32_t config_token(const lp_spm *s, const cJSON *cfg, const char *key, int32_t dflt) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
    if (!v) return dflt;
    if (cJSON_IsObject(v)) v = cJSON_GetObjectItemCaseSensitive(v, "content");
    if (!cJSON_IsString(v)) return -1;
    const lp_added_tok *a = added_find(&s->added, v->valuestring, strlen(v->valuestring));
    return a ? a->id : spm_vocab_get(s, v->valuestring, strlen(v->valuestring));
}
static lp_status load_config(lp_spm *s, const char *path) {
    char cfg_path[4096];
    const char *slash = strrchr(path, '/');
    snprintf(cfg_path, sizeof cfg_path, "%.*stokenizer_config.json", slash ? (int)(slash - path + 1) : 0, path);
    int absent;
    cJSON *cfg = json_load(cfg_path, &absent);
    if (absent) return LP_OK;
    if (!cJSON_IsObject(cfg)) {
        cJSON_Delete(cfg);
        LP_FAIL(LP_ERR_FORMAT, "%s: is not a JSON object", cfg_path);
    }
    s->bos = config_token(s, cfg, "bos_token", s->bos);
    s->eos = config_token(s, cfg, "eos_token", s->eos);
    cJSON_Delete(cfg);
    return LP_OK;
}

static lp_status load_json(lp_spm *s, const cJSON *root, const char *path, size_t json_len) {
    LP_CHECK(load_model(s, cJSON_GetObjectItemCaseSensitive(root, "model"), json_len));
    int32_t model_size = s->n_ids;
    LP_CHECK(load_normalizer(s, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), "normalizer"));
    LP_CHECK(load_pre(s, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer")));
    const cJSON *dec = cJSON_GetObjectItemCaseSensitive(root, "decoder"), *e;
    if (!dec || cJSON_IsNull(dec)) LP_FAIL(LP_ERR_FORMAT, "%s: has no decoder (byte_fallback needs ByteFallback)", path);
    LP_CHECK(load_decoder(s, dec));
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
    if (added && !cJSON_IsArray(added)) LP_FAIL(LP_ERR_FORMAT, "%s: added_tokens is not a list", path);
    cJSON_ArrayForEach(e, added) {
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(e, "content");
        if (!cJSON_IsString(c)) LP_FAIL(LP_ERR_FORMAT, "%s: added_tokens has an entry without content", path);
        size_t len = strlen(c->valuestring);
        if (lp_utf8_invalid_at(c->valuestring, len) != len) LP_FAIL(LP_ERR_FORMAT, "%s: an added_tokens content is not valid UTF-8", path);
        int special = json_bool(e, "special", 0);
        LP_CHECK(add_token(s, c->valuestring, len, model_size, special, json_bool(e, "lstrip", 0), json_bool(e, "rstrip", 0),
                           json_bool(e, "single_word", 0), json_bool(e, "normalized", !special)));
    }
    LP_CHECK(load_post(s, cJSON_GetObjectItemCaseSensitive(root, "post_processor")));
    LP_CHECK(spm_finish(s));
    s->bos = s->n_prefix ? s->prefix[0] : -1;
    s->eos = s->n_suffix ? s->suffix[s->n_suffix - 1] : -1;
    return load_config(s, path);
}

lp_status spm_from_json(lp_spm **out, const cJSON *root, const char *path, size_t json_len) {
    lp_spm *s;
    *out = NULL;
    LP_CHECK(spm_new(&s, path));
    lp_status st = load_json(s, root, path, json_len);
    if (st != LP_OK) spm_free(s);
    else *out = s;
    return st;
}

/* ---- GGUF ---- */

/* Python's str.isspace, which gemma_tokenizer's t.strip() tests. */
static int py_space(int32_t c) {
    return (c >= 9 && c <= 13) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

/* A token of white space holding a space is stored with real spaces; the converted
 * tokenizer spells it with one "\u2581" per character. */
static lp_status set_gguf_token(lp_spm *s, int32_t id, const char *t, size_t n) {
    int has_space = 0, all_space = 1;
    size_t chars = 0;
    for (size_t i = 0; i < n; chars++) {
        int32_t cp;
        i += (size_t)utf8_decode(t + i, &cp);
        has_space |= cp == ' ', all_space &= py_space(cp);
    }
    if (!(has_space && all_space)) return spm_set_text(s, id, t, n);
    char *r = malloc(3 * chars + 1);
    if (!r) LP_FAIL(LP_ERR_OOM, "%s: out of memory", s->source);
    for (size_t i = 0; i < chars; i++) memcpy(r + 3 * i, SPACE_MARK, 3);
    lp_status st = spm_set_text(s, id, r, 3 * chars);
    free(r);
    return st;
}

static lp_status gguf_int(const lp_gguf *g, const char *key, int64_t *v, int64_t dflt) {
    *v = dflt;
    return lp_gguf_has(g, key) ? lp_gguf_get_int(g, key, v) : LP_OK;
}

static lp_status gguf_vocab(lp_spm *s, const lp_gguf *g, uint64_t *n_tok) {
    lp_gguf_vtype et;
    const char *t;
    size_t n;
    LP_CHECK(lp_gguf_get_arr(g, "tokenizer.ggml.tokens", &et, n_tok));
    if (et != LP_GGUF_STRING) LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.tokens is not a list of strings", s->source);
    if (*n_tok == 0 || *n_tok >= MAX_VOCAB_ID)
        LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.tokens has %llu entries", s->source, (unsigned long long)*n_tok);
    for (uint64_t i = 0; i < *n_tok; i++) {
        LP_CHECK(lp_gguf_arr_str(g, "tokenizer.ggml.tokens", i, &t, &n));
        if (lp_utf8_invalid_at(t, n) != n || memchr(t, 0, n))
            LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.tokens[%llu] is not valid UTF-8 text", s->source, (unsigned long long)i);
        LP_CHECK(set_gguf_token(s, (int32_t)i, t, n));
        LP_CHECK(spm_vocab_put(s, (int32_t)i));
    }
    if (!lp_gguf_has(g, "tokenizer.ggml.merges")) {
        s->rank_by_id = 1;
        return LP_OK;
    }
    uint64_t n_merges;
    LP_CHECK(lp_gguf_get_arr(g, "tokenizer.ggml.merges", &et, &n_merges));
    if (et != LP_GGUF_STRING) LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.merges is not a list of strings", s->source);
    LP_CHECK(spm_merges_init(s, n_merges));
    for (uint64_t i = 0; i < n_merges; i++) {
        LP_CHECK(lp_gguf_arr_str(g, "tokenizer.ggml.merges", i, &t, &n));
        const char *sp = memchr(t, ' ', n);
        if (!sp || memchr(sp + 1, ' ', n - (size_t)(sp + 1 - t)))
            LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.merges[%llu] is not two tokens separated by one space", s->source, (unsigned long long)i);
        LP_CHECK(spm_merge_add(s, t, (size_t)(sp - t), sp + 1, n - (size_t)(sp + 1 - t), (int32_t)i, "tokenizer.ggml.merges"));
    }
    return LP_OK;
}

/* Special: control tokens and the named bos/eos/unk/padding/<mask> tokens (GemmaTokenizer's
 * own); plain: user-defined tokens whose spelling is in the (respelled) vocabulary. */
static lp_status gguf_added(lp_spm *s, const lp_gguf *g, uint64_t n_tok, const int64_t *named, int n_named) {
    for (int i = 0; i < n_named; i++)
        if (named[i] >= 0) LP_CHECK(added_put(&s->added, s->text[named[i]], s->text_len[named[i]], (int32_t)named[i], 1, 0, 0, 0, 0, s->source));
    int32_t mask = spm_vocab_get(s, "<mask>", 6);
    if (mask >= 0) LP_CHECK(added_put(&s->added, "<mask>", 6, mask, 1, 0, 0, 0, 0, s->source));
    if (!lp_gguf_has(g, "tokenizer.ggml.token_type")) return LP_OK;
    lp_gguf_vtype et;
    uint64_t n_types;
    LP_CHECK(lp_gguf_get_arr(g, "tokenizer.ggml.token_type", &et, &n_types));
    if (n_types != n_tok)
        LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.token_type has %llu entries but tokenizer.ggml.tokens has %llu",
                s->source, (unsigned long long)n_types, (unsigned long long)n_tok);
    for (uint64_t i = 0; i < n_types; i++) {
        int64_t ty;
        const char *t;
        size_t n;
        LP_CHECK(lp_gguf_arr_int(g, "tokenizer.ggml.token_type", i, &ty));
        LP_CHECK(lp_gguf_arr_str(g, "tokenizer.ggml.tokens", i, &t, &n));
        if (ty == 3) LP_CHECK(added_put(&s->added, s->text[i], s->text_len[i], (int32_t)i, 1, 0, 0, 0, 0, s->source));
        int32_t id = ty == 4 ? spm_vocab_get(s, t, n) : -1; /* the file's spelling, not the respelled one */
        if (id >= 0) LP_CHECK(added_put(&s->added, t, n, id, 0, 0, 0, 0, 0, s->source));
    }
    return LP_OK;
}

static lp_status load_gguf(lp_spm *s, const lp_gguf *g) {
    const char *arch = "(none)";
    size_t arch_len = 6;
    if (lp_gguf_has(g, "general.architecture")) LP_CHECK(lp_gguf_get_str(g, "general.architecture", &arch, &arch_len));
    if (!((arch_len == 5 && memcmp(arch, "gemma", 5) == 0) || (arch_len == 6 && memcmp(arch, "gemma2", 6) == 0) ||
          (arch_len == 6 && memcmp(arch, "gemma3", 6) == 0)))
        LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.model is 'llama' (SentencePiece) for architecture '%.*s': SentencePiece "
                "vocabularies are read for Gemma only, other models only byte-level BPE ('gpt2')", s->source, (int)arch_len, arch);
    uint64_t n_tok;
    LP_CHECK(gguf_vocab(s, g, &n_tok));
    static const char *keys[] = {"tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                 "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id"};
    int64_t named[4], add_bos, add_eos;
    for (int i = 0; i < 4; i++) {
        LP_CHECK(gguf_int(g, keys[i], &named[i], -1));
        if (named[i] < -1 || named[i] >= (int64_t)n_tok)
            LP_FAIL(LP_ERR_FORMAT, "%s: %s %lld is outside the vocabulary", s->source, keys[i], (long long)named[i]);
    }
    LP_CHECK(gguf_added(s, g, n_tok, named, 4));
    s->bos = (int32_t)named[0], s->eos = (int32_t)named[1];
    s->unk = named[2] >= 0 ? (int32_t)named[2] : spm_vocab_get(s, "<unk>", 5);
    s->fuse_unk = 1;
    /* a SentencePiece vocabulary gets BOS unless the file says otherwise (transformers and llama.cpp) */
    LP_CHECK(gguf_int(g, "tokenizer.ggml.add_bos_token", &add_bos, 1));
    LP_CHECK(gguf_int(g, "tokenizer.ggml.add_eos_token", &add_eos, 0));
    if (add_bos && s->bos < 0) LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.add_bos_token is set but there is no bos_token_id", s->source);
    if (add_eos && s->eos < 0) LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.add_eos_token is set but there is no eos_token_id", s->source);
    if (add_bos) s->prefix[s->n_prefix++] = s->bos;
    if (add_eos) s->suffix[s->n_suffix++] = s->eos;
    s->norm[0] = (spm_replace){strdup(" "), strdup(SPACE_MARK), 1, 3};
    s->dec = (spm_replace){strdup(SPACE_MARK), strdup(" "), 3, 1};
    s->n_norm = s->n_dec = 1, s->dec_bytes = 1;
    if (!s->norm[0].from || !s->norm[0].to || !s->dec.from || !s->dec.to) LP_FAIL(LP_ERR_OOM, "%s: out of memory", s->source);
    return spm_finish(s);
}

lp_status spm_from_gguf(lp_spm **out, const lp_gguf *g) {
    lp_spm *s;
    *out = NULL;
    LP_CHECK(spm_new(&s, lp_gguf_path(g)));
    lp_status st = load_gguf(s, g);
    if (st != LP_OK) spm_free(s);
    else *out = s;
    return st;
}
