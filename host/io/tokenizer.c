/* tokenizer.c: byte-level BPE (GPT-2, Llama 3, SmolLM/SmolLM2, Qwen2) as Hugging Face
 * `tokenizers` 0.20.3 runs it, read from tokenizer.json or from GGUF metadata (see tokenizer.h).
 * SentencePiece-style BPE (Gemma: byte_fallback without a ByteLevel step, or a GGUF whose
 * tokenizer.ggml.model is 'llama') is handed to tokenizer_spm.c, which then does all the work.
 *
 * The pipeline follows tokenizers' encode(text, add_special_tokens=True) step by step:
 *   1. added tokens with normalized=false are cut out of the raw text (leftmost-longest,
 *      then the single_word / lstrip / rstrip rules of AddedVocabulary::find_matches);
 *   2. each remaining piece is normalized (NFC or nothing) and added tokens with
 *      normalized=true are cut out of it the same way;
 *   3. each remaining piece runs through the pre-tokenizer steps in order (Split, Digits,
 *      ByteLevel), depth first: a step's pieces go to the next step one by one, which is
 *      what PreTokenizedString::split does breadth first. ByteLevel maps the bytes of its
 *      pieces to the GPT-2 byte alphabet, so the steps after it see the mapped text;
 *   4. each final piece is one BPE word: whole if ignore_merges and it is in the vocabulary,
 *      else characters merged by rank with the same priority queue as Word::merge_all;
 *   5. the TemplateProcessing template (if any) puts its special tokens around the ids.
 * Regexes are the tokenizer's own patterns (Oniguruma syntax in tokenizers) run by PCRE2
 * with UTF+UCP; one difference of class membership is patched (see fix_pattern).
 *
 * This file holds the vocabulary, merges and added tokens and reads them from either format;
 * tokenizer_pipeline.c the steps around the model, tokenizer_encode.c the encoder, and
 * tokenizer_added.c the added-token search (tokenizer_bpe.h shows how they fit).
 *
 * Choices where tokenizers gives no single answer for us:
 *   - lp_detokenize returns raw bytes (tokenizers' decode replaces invalid UTF-8 by U+FFFD):
 *     a caller decoding token by token can then join the pieces into valid text;
 *   - tokenizer_config.json gives only the bos/eos ids reported by lp_tokenizer_bos/eos;
 *     its add_bos_token changes nothing, as in tokenizers (the post_processor decides);
 *   - "truncation" and "padding" in tokenizer.json are ignored (they limit batches, not text);
 *   - GGUF files carry no unk token for BPE that tokenizers would use: bytes missing from the
 *     vocabulary are dropped, as tokenizers drops them without unk_token. */
#include <errno.h>
#include <stdio.h>
#include <sys/stat.h>

#include "loupe/safetensors.h"
#include "loupe/textfile.h"
#include "io/json.h"
#include "io/tokenizer_bpe.h"

/* ---- building the hash maps (lookups are in tokenizer_bpe.h) ---- */

static size_t pow2_at_least(size_t n) {
    size_t c = 16;
    while (c < n) c <<= 1;
    return c;
}

static int sm_init(strmap *m, size_t expect) {
    m->cap = pow2_at_least(2 * expect + 1);
    m->n = 0;
    m->slot = calloc(m->cap, sizeof *m->slot);
    return m->slot != NULL;
}
/* Inserts or overwrites (a later duplicate wins, as in a Rust HashMap built by collect). */
static int sm_put(strmap *m, const char *s, size_t n, int32_t id) {
    if (2 * (m->n + 1) > m->cap) {
        strmap bigger;
        bigger.cap = m->cap * 2, bigger.n = 0;
        if (!(bigger.slot = calloc(bigger.cap, sizeof *bigger.slot))) return 0;
        for (size_t i = 0; i < m->cap; i++)
            if (m->slot[i].s) *sm_find(&bigger, m->slot[i].s, m->slot[i].len) = m->slot[i], bigger.n++;
        free(m->slot);
        *m = bigger;
    }
    sm_slot *e = sm_find(m, s, n);
    if (!e->s) m->n++;
    *e = (sm_slot){s, (uint32_t)n, id};
    return 1;
}

/* ---- the tokenizer ---- */

static void init_byte_map(lp_tokenizer *t) {
    for (int i = 0; i < 324; i++) t->cp_byte[i] = -1;
    int n = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        t->byte_cp[b] = (uint16_t)(printable ? b : 256 + n++);
        t->cp_byte[t->byte_cp[b]] = (int16_t)b;
    }
}

void lp_tokenizer_free(lp_tokenizer *t) {
    if (!t) return;
    if (t->text) for (int32_t i = 0; i < t->n_ids; i++) free(t->text[i]);
    if (t->dec) for (int32_t i = 0; i < t->n_ids; i++) free(t->dec[i]);
    for (int i = 0; i < t->n_retired; i++) free(t->retired[i]);
    free(t->retired), free(t->text), free(t->dec), free(t->dec_len);
    free(t->vocab.slot), free(t->merges.slot);
    for (int i = 0; i < t->n_added; i++) {
        if (t->added[i].match != t->added[i].content) free(t->added[i].match);
        free(t->added[i].content);
    }
    free(t->added), free(t->added_at.slot);
    free(t->match.order[0]), free(t->match.order[1]); /* match.tok is added */
    for (int i = 0; i < t->n_pre; i++) pcre2_code_free(t->pre[i].re);
    free(t->prefix), free(t->suffix), free(t->source);
    spm_free(t->spm);
    free(t);
}

static lp_status new_tokenizer(lp_tokenizer **out, const char *source) {
    lp_tokenizer *t = calloc(1, sizeof *t);
    if (!t || !(t->source = strdup(source))) {
        free(t);
        LP_FAIL(LP_ERR_OOM, "%s: out of memory", source);
    }
    t->unk = t->bos = t->eos = -1;
    init_byte_map(t);
    *out = t;
    return LP_OK;
}

/* ---- loading helpers shared by both formats ---- */

/* The vocabulary map's keys point at these strings: a replaced one is retired, not freed
 * (an added token may take a model id whose string differs, when the vocabulary has gaps). */
static lp_status set_id_text(lp_tokenizer *t, int32_t id, const char *s, size_t n) {
    char *old = t->text[id];
    if (old && strlen(old) == n && memcmp(old, s, n) == 0) return LP_OK;
    char *c = malloc(n + 1);
    if (!c) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
    memcpy(c, s, n);
    c[n] = 0;
    if (old) {
        char **r = realloc(t->retired, (size_t)(t->n_retired + 1) * sizeof *r);
        if (!r) {
            free(c);
            LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
        }
        t->retired = r;
        t->retired[t->n_retired++] = old;
    }
    t->text[id] = c;
    return LP_OK;
}

/* Room for ids below n_ids. The capacity doubles: added tokens arrive one id at a time. */
static lp_status grow_ids(lp_tokenizer *t, int32_t n_ids) {
    if (n_ids <= t->n_ids) return LP_OK;
    if (n_ids > t->cap_ids) {
        int32_t cap = t->cap_ids && t->cap_ids <= INT32_MAX / 2 ? 2 * t->cap_ids : n_ids;
        if (cap < n_ids) cap = n_ids;
        char **text = realloc(t->text, (size_t)cap * sizeof *text);
        if (!text) LP_FAIL(LP_ERR_OOM, "%s: out of memory for %d tokens", t->source, n_ids);
        memset(text + t->cap_ids, 0, (size_t)(cap - t->cap_ids) * sizeof *text);
        t->text = text, t->cap_ids = cap;
    }
    t->n_ids = n_ids;
    return LP_OK;
}

/* Adds one merge "a" + "b" with the given rank; both parts and their concatenation must be
 * in the vocabulary (tokenizers: MergeTokenOutOfVocabulary). */
static lp_status add_merge(lp_tokenizer *t, const char *a, size_t na, const char *b, size_t nb, int32_t rank,
                           const char *key) {
    int32_t ia = sm_get(&t->vocab, a, na), ib = sm_get(&t->vocab, b, nb);
    if (ia < 0 || ib < 0) {
        const char *bad = ia < 0 ? a : b;
        int nbad = (int)(ia < 0 ? na : nb);
        LP_FAIL(LP_ERR_FORMAT, "%s: %s[%d] names '%.*s', which is not in the vocabulary", t->source, key, rank, nbad, bad);
    }
    char buf[512], *cat = na + nb < sizeof buf ? buf : malloc(na + nb);
    if (!cat) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
    memcpy(cat, a, na), memcpy(cat + na, b, nb);
    int32_t id = sm_get(&t->vocab, cat, na + nb);
    if (id < 0) {
        lp_status st = LP_ERR(LP_ERR_FORMAT, "%s: %s[%d] makes '%.*s', which is not in the vocabulary", t->source, key, rank,
                                    (int)(na + nb), cat);
        if (cat != buf) free(cat);
        return st;
    }
    if (cat != buf) free(cat);
    pm_slot *e = pm_find(&t->merges, ia, ib);
    *e = (pm_slot){ia, ib, rank, id}; /* a repeated pair keeps its last rank, as tokenizers does */
    return LP_OK;
}

static lp_status init_merges(lp_tokenizer *t, size_t n) {
    t->merges.cap = pow2_at_least(2 * n + 1);
    t->merges.slot = malloc(t->merges.cap * sizeof *t->merges.slot);
    if (!t->merges.slot) LP_FAIL(LP_ERR_OOM, "%s: out of memory for %zu merges", t->source, n);
    for (size_t i = 0; i < t->merges.cap; i++) t->merges.slot[i].a = -1;
    return LP_OK;
}

/* Adds an added token the way AddedVocabulary::add_tokens does: an existing entry (added or
 * in the model vocabulary) keeps its id, a new one takes the next id after the vocabulary.
 * want_id >= 0 (GGUF: the token's own row) overrides that, for vocabularies with duplicates.
 * The entry is found through a hash of the contents and the largest id so far is kept, so a
 * file with 100k added tokens loads in linear time. max_added is a running maximum: ids only
 * change with want_id (GGUF), where it is not used. */
static lp_status add_token(lp_tokenizer *t, const char *content, size_t len, int32_t want_id, int special, int lstrip,
                           int rstrip, int single_word, int normalized) {
    if (len == 0) return LP_OK;
    if (t->n_added == 0) t->max_added = -1; /* calloc'ed: 0 would read as an id */
    int32_t id = -1, max_added = t->max_added;
    int at = sm_get(&t->added_at, content, len);
    if (want_id >= 0) id = want_id;
    else if (at >= 0) id = t->added[at].id;
    else id = sm_get(&t->vocab, content, len);
    if (id < 0) {
        int32_t vs = (int32_t)t->model_vocab_n;
        id = max_added < 0 ? vs : (max_added >= vs || vs == 0 ? max_added + 1 : vs);
    }
    if (id >= MAX_VOCAB_ID) LP_FAIL(LP_ERR_FORMAT, "%s: added token '%.*s' would get id %d, too large", t->source, (int)len, content, id);
    if (at < 0) {
        if (t->n_added == t->cap_added) {
            int cap = t->cap_added ? 2 * t->cap_added : 16;
            added_tok *a = realloc(t->added, (size_t)cap * sizeof *a);
            if (!a) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
            t->added = a, t->cap_added = cap;
        }
        if (!t->added_at.slot && !sm_init(&t->added_at, 16)) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
        added_tok *a = &t->added[t->n_added];
        memset(a, 0, sizeof *a);
        if (!(a->content = malloc(len + 1))) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
        memcpy(a->content, content, len);
        a->content[len] = 0;
        a->len = len;
        at = t->n_added++; /* counted once content is set: lp_tokenizer_free frees it */
        if (!sm_put(&t->added_at, a->content, len, at)) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
    }
    added_tok *a = &t->added[at];
    a->id = id;
    if (id > t->max_added) t->max_added = id;
    a->special = a->special || special; /* once special, always special (special_tokens_set) */
    a->lstrip = lstrip, a->rstrip = rstrip, a->single_word = single_word, a->normalized = normalized;
    LP_CHECK(grow_ids(t, id + 1));
    return set_id_text(t, id, content, len);
}

/* After the vocabulary, merges, added tokens and normalizer are known: match strings,
 * match sets, the byte -> id table and the decoded form of every token. */
static lp_status finish(lp_tokenizer *t) {
    for (int i = 0; i < t->n_added; i++) {
        added_tok *a = &t->added[i];
        a->match = a->content, a->match_len = a->len;
        if (a->normalized && t->nfc) {
            LP_CHECK(tok_nfc(a->content, a->len, &a->match, &a->match_len));
            if (a->match_len == 0) { /* cannot happen for NFC, but an empty pattern must not match */
                free(a->match);
                a->match = a->content, a->match_len = a->len;
            }
        }
    }
    t->match.tok = t->added, t->match.n = t->n_added;
    LP_CHECK(added_index(&t->match, t->source));
    for (int b = 0; b < 256; b++) {
        char c[4];
        int n = tok_utf8_put(c, t->byte_cp[b]);
        t->byte_id[b] = sm_get(&t->vocab, c, (size_t)n);
    }
    t->dec = calloc((size_t)t->n_ids, sizeof *t->dec);
    t->dec_len = calloc((size_t)t->n_ids, sizeof *t->dec_len);
    if (!t->dec || !t->dec_len) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
    for (int32_t id = 0; id < t->n_ids; id++) {
        const char *s = t->text[id];
        if (!s) continue;
        size_t n = strlen(s), k = 0;
        if (!(t->dec[id] = malloc(n + 1))) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
        /* ByteLevel decoder: a token whose characters are all in the byte alphabet becomes
         * those bytes; any other token is kept as its UTF-8 text. */
        int all = 1;
        for (size_t i = 0; i < n && all;) {
            int32_t cp;
            i += (size_t)utf8_decode(s + i, &cp);
            if (cp < 324 && t->cp_byte[cp] >= 0) t->dec[id][k++] = (char)t->cp_byte[cp];
            else all = 0;
        }
        if (!all) memcpy(t->dec[id], s, n), k = n;
        t->dec_len[id] = (uint32_t)k;
    }
    return LP_OK;
}

/* ---- tokenizer.json ---- */

/* A string from the JSON as vocabulary text: valid UTF-8 (cJSON passes any bytes through,
 * and the decoder walks tokens character by character), no NUL inside. */
static lp_status check_text(const lp_tokenizer *t, const char *s, const char *what) {
    size_t n = strlen(s), bad = lp_utf8_invalid_at(s, n);
    if (bad != n)
        LP_FAIL(LP_ERR_FORMAT, "%s: %s is not valid UTF-8 (byte 0x%02x at offset %zu)", t->source, what,
                (unsigned char)s[bad], bad);
    return LP_OK;
}

/* json_len: the file's size. A vocabulary is dense, and each entry takes bytes of the
 * file, so an id at or past the size is a sparse one whose id table would be sized by a
 * number, not by the file: refused. */
static lp_status load_model(lp_tokenizer *t, const cJSON *m, size_t json_len) {
    const char *ty = tok_json_type(m);
    if (!cJSON_IsObject(m)) LP_FAIL(LP_ERR_FORMAT, "%s: has no model", t->source);
    if (!ty || strcmp(ty, "BPE") != 0)
        LP_FAIL(LP_ERR_FORMAT, "%s: model.type '%s' is not supported (only byte-level BPE)", t->source, ty ? ty : "(none)");
    const cJSON *v;
    v = cJSON_GetObjectItemCaseSensitive(m, "dropout");
    if (v && !cJSON_IsNull(v) && !(cJSON_IsNumber(v) && v->valuedouble == 0))
        LP_FAIL(LP_ERR_FORMAT, "%s: model.dropout = %g is not supported (BPE dropout is random)", t->source, cJSON_IsNumber(v) ? v->valuedouble : -1.0);
    const char *affix[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int i = 0; i < 2; i++) {
        v = cJSON_GetObjectItemCaseSensitive(m, affix[i]);
        if (v && !cJSON_IsNull(v) && !(cJSON_IsString(v) && !v->valuestring[0]))
            LP_FAIL(LP_ERR_FORMAT, "%s: model.%s is not supported by byte-level BPE", t->source, affix[i]);
    }
    if (tok_json_bool(m, "byte_fallback", 0))
        LP_FAIL(LP_ERR_FORMAT, "%s: model.byte_fallback = true is SentencePiece-style BPE; only byte-level BPE is supported", t->source);
    t->fuse_unk = tok_json_bool(m, "fuse_unk", 0);
    t->ignore_merges = tok_json_bool(m, "ignore_merges", 0);

    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(m, "vocab"), *e;
    if (!cJSON_IsObject(vocab)) LP_FAIL(LP_ERR_FORMAT, "%s: model.vocab is not an object", t->source);
    size_t n = (size_t)cJSON_GetArraySize(vocab);
    int32_t max_id = -1;
    cJSON_ArrayForEach(e, vocab) {
        if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble >= MAX_VOCAB_ID || e->valuedouble != (double)(int32_t)e->valuedouble)
            LP_FAIL(LP_ERR_FORMAT, "%s: model.vocab['%s'] is not a token id", t->source, e->string);
        if ((int32_t)e->valuedouble > max_id) max_id = (int32_t)e->valuedouble;
        if ((size_t)max_id >= json_len)
            LP_FAIL(LP_ERR_FORMAT, "%s: model.vocab['%s'] = %d is beyond any dense vocabulary a %zu-byte file can hold",
                    t->source, e->string, max_id, json_len);
        char what[64];
        snprintf(what, sizeof what, "the model.vocab key of id %d", (int32_t)e->valuedouble);
        LP_CHECK(check_text(t, e->string, what));
    }
    LP_CHECK(grow_ids(t, max_id + 1));
    if (!sm_init(&t->vocab, n)) LP_FAIL(LP_ERR_OOM, "%s: out of memory for %zu tokens", t->source, n);
    cJSON_ArrayForEach(e, vocab) {
        int32_t id = (int32_t)e->valuedouble;
        if (t->text[id]) LP_FAIL(LP_ERR_FORMAT, "%s: model.vocab gives id %d to both '%s' and '%s'", t->source, id, t->text[id], e->string);
        LP_CHECK(set_id_text(t, id, e->string, strlen(e->string)));
        if (!sm_put(&t->vocab, t->text[id], strlen(t->text[id]), id)) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
    }
    t->model_vocab_n = t->vocab.n;

    v = cJSON_GetObjectItemCaseSensitive(m, "unk_token");
    if (cJSON_IsString(v)) {
        t->unk = sm_get(&t->vocab, v->valuestring, strlen(v->valuestring));
        if (t->unk < 0) LP_FAIL(LP_ERR_FORMAT, "%s: model.unk_token '%s' is not in the vocabulary", t->source, v->valuestring);
    }

    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(m, "merges");
    if (!cJSON_IsArray(merges)) LP_FAIL(LP_ERR_FORMAT, "%s: model.merges is not a list", t->source);
    LP_CHECK(init_merges(t, (size_t)cJSON_GetArraySize(merges)));
    int32_t rank = 0;
    cJSON_ArrayForEach(e, merges) {
        if (cJSON_IsString(e)) { /* "a b": exactly one space, as convert_merges_to_hashmap */
            const char *s = e->valuestring, *sp = strchr(s, ' ');
            if (!sp || strchr(sp + 1, ' '))
                LP_FAIL(LP_ERR_FORMAT, "%s: model.merges[%d] '%s' is not two tokens separated by one space", t->source, rank, s);
            LP_CHECK(add_merge(t, s, (size_t)(sp - s), sp + 1, strlen(sp + 1), rank, "model.merges"));
        } else if (cJSON_IsArray(e) && cJSON_GetArraySize(e) == 2 && cJSON_IsString(cJSON_GetArrayItem(e, 0)) &&
                   cJSON_IsString(cJSON_GetArrayItem(e, 1))) {
            const char *a = cJSON_GetArrayItem(e, 0)->valuestring, *b = cJSON_GetArrayItem(e, 1)->valuestring;
            LP_CHECK(add_merge(t, a, strlen(a), b, strlen(b), rank, "model.merges"));
        } else {
            LP_FAIL(LP_ERR_FORMAT, "%s: model.merges[%d] is neither \"a b\" nor [\"a\", \"b\"]", t->source, rank);
        }
        rank++;
    }
    return LP_OK;
}

/* bos_token / eos_token: a string or {"content": ...}; the id through the added tokens, then the vocabulary. */
static int32_t config_token(const lp_tokenizer *t, const cJSON *cfg, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
    if (cJSON_IsObject(v)) v = cJSON_GetObjectItemCaseSensitive(v, "content");
    if (!cJSON_IsString(v)) return -1;
    size_t n = strlen(v->valuestring);
    for (int i = 0; i < t->n_added; i++)
        if (t->added[i].len == n && memcmp(t->added[i].content, v->valuestring, n) == 0) return t->added[i].id;
    return sm_get(&t->vocab, v->valuestring, n);
}

static lp_status load_json(lp_tokenizer *t, const char *path) {
    size_t len;
    char *buf = lp_read_file(path, &len);
    if (!buf) LP_FAIL(LP_ERR_IO, "%s: cannot read: %s", path, strerror(errno));
    cJSON *root = cJSON_ParseWithLength(buf, len);
    lp_status st = LP_OK;
    if (!root || !cJSON_IsObject(root)) {
        const char *at = cJSON_GetErrorPtr();
        long off = root ? 0 : (at && at >= buf && at <= buf + len ? (long)(at - buf) : -1);
        cJSON_Delete(root);
        free(buf);
        LP_FAIL(LP_ERR_FORMAT, "%s: is not a JSON object (parse error near byte %ld)", path, off);
    }
    free(buf);
    if (spm_json_applies(root)) {
        st = spm_from_json(&t->spm, root, path, len);
        goto out;
    }
    const cJSON *e;
    LP_TRY(st, out, load_model(t, cJSON_GetObjectItemCaseSensitive(root, "model"), len));
    LP_TRY(st, out, tok_load_normalizer(t, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), "normalizer"));
    const cJSON *pre = cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer");
    if (pre && !cJSON_IsNull(pre)) LP_TRY(st, out, tok_load_pre(t, pre, "pre_tokenizer"));
    int has_bytelevel = 0;
    for (int i = 0; i < t->n_pre; i++) has_bytelevel |= t->pre[i].kind == PRE_BYTELEVEL;
    if (!has_bytelevel) {
        st = LP_ERR(LP_ERR_FORMAT, "%s: pre_tokenizer has no ByteLevel step; only byte-level BPE is supported", path);
        goto out;
    }
    const cJSON *dec = cJSON_GetObjectItemCaseSensitive(root, "decoder");
    if (dec && !cJSON_IsNull(dec) && (!tok_json_type(dec) || strcmp(tok_json_type(dec), "ByteLevel") != 0)) {
        st = LP_ERR(LP_ERR_FORMAT, "%s: decoder type '%s' is not supported (only ByteLevel)",
                          path, tok_json_type(dec) ? tok_json_type(dec) : "(none)");
        goto out;
    }
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
    if (added && !cJSON_IsArray(added)) {
        st = LP_ERR(LP_ERR_FORMAT, "%s: added_tokens is not a list", path);
        goto out;
    }
    cJSON_ArrayForEach(e, added) {
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(e, "content");
        if (!cJSON_IsString(c)) {
            st = LP_ERR(LP_ERR_FORMAT, "%s: added_tokens has an entry without content", path);
            goto out;
        }
        LP_TRY(st, out, check_text(t, c->valuestring, "an added_tokens content"));
        int special = tok_json_bool(e, "special", 0);
        LP_TRY(st, out, add_token(t, c->valuestring, strlen(c->valuestring), -1, special, tok_json_bool(e, "lstrip", 0),
                                  tok_json_bool(e, "rstrip", 0), tok_json_bool(e, "single_word", 0),
                                  tok_json_bool(e, "normalized", !special)));
    }
    LP_TRY(st, out, tok_load_post(t, cJSON_GetObjectItemCaseSensitive(root, "post_processor"), "post_processor"));
    for (int i = 0; i < t->n_prefix + t->n_suffix; i++) {
        int32_t id = i < t->n_prefix ? t->prefix[i] : t->suffix[i - t->n_prefix];
        if (id >= t->n_ids || !t->text[id]) {
            st = LP_ERR(LP_ERR_FORMAT, "%s: post_processor TemplateProcessing adds id %d, which is not in the vocabulary", path, id);
            goto out;
        }
    }
    LP_TRY(st, out, finish(t));

    /* tokenizer_config.json beside it: which tokens are BOS and EOS */
    t->bos = t->n_prefix ? t->prefix[0] : -1;
    t->eos = t->n_suffix ? t->suffix[t->n_suffix - 1] : -1;
    {
        char cfg_path[4096];
        const char *slash = strrchr(path, '/');
        snprintf(cfg_path, sizeof cfg_path, "%.*stokenizer_config.json", slash ? (int)(slash - path + 1) : 0, path);
        int absent;
        cJSON *cfg = json_load(cfg_path, &absent);
        if (!absent) {
            if (!cJSON_IsObject(cfg)) {
                cJSON_Delete(cfg);
                st = LP_ERR(LP_ERR_FORMAT, "%s: is not a JSON object", cfg_path);
                goto out;
            }
            if (cJSON_GetObjectItemCaseSensitive(cfg, "bos_token")) t->bos = config_token(t, cfg, "bos_token");
            if (cJSON_GetObjectItemCaseSensitive(cfg, "eos_token")) t->eos = config_token(t, cfg, "eos_token");
            cJSON_Delete(cfg);
        }
    }
out:
    cJSON_Delete(root);
    return st;
}

lp_status lp_tokenizer_from_json(lp_tokenizer **out, const char *tokenizer_json) {
    lp_tokenizer *t;
    *out = NULL;
    LP_CHECK(new_tokenizer(&t, tokenizer_json));
    lp_status st = load_json(t, tokenizer_json);
    if (st != LP_OK) {
        lp_tokenizer_free(t);
        return st;
    }
    *out = t;
    return LP_OK;
}

/* ---- GGUF ---- */


static lp_status gguf_opt_int(const lp_gguf *g, const char *key, int64_t *v, int64_t dflt) {
    *v = dflt;
    if (!lp_gguf_has(g, key)) return LP_OK;
    return lp_gguf_get_int(g, key, v);
}

static lp_status load_gguf(lp_tokenizer *t, const lp_gguf *g) {
    const char *s;
    size_t n;
    LP_CHECK(lp_gguf_get_str(g, "tokenizer.ggml.model", &s, &n));
    if (n == 5 && memcmp(s, "llama", 5) == 0) return spm_from_gguf(&t->spm, g);
    if (!(n == 4 && memcmp(s, "gpt2", 4) == 0))
        LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.model '%.*s' is not supported; only byte-level BPE ('gpt2') is", t->source, (int)n, s);

    lp_gguf_vtype et;
    uint64_t n_tok, n_types = 0, n_merges;
    LP_CHECK(lp_gguf_get_arr(g, "tokenizer.ggml.tokens", &et, &n_tok));
    if (et != LP_GGUF_STRING) LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.tokens is not a list of strings", t->source);
    if (n_tok == 0 || n_tok >= MAX_VOCAB_ID) LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.tokens has %llu entries", t->source, (unsigned long long)n_tok);
    int has_types = lp_gguf_has(g, "tokenizer.ggml.token_type");
    if (has_types) {
        LP_CHECK(lp_gguf_get_arr(g, "tokenizer.ggml.token_type", &et, &n_types));
        if (n_types != n_tok)
            LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.token_type has %llu entries but tokenizer.ggml.tokens has %llu",
                    t->source, (unsigned long long)n_types, (unsigned long long)n_tok);
    }
    LP_CHECK(grow_ids(t, (int32_t)n_tok));
    if (!sm_init(&t->vocab, n_tok)) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
    for (uint64_t i = 0; i < n_tok; i++) {
        LP_CHECK(lp_gguf_arr_str(g, "tokenizer.ggml.tokens", i, &s, &n));
        if (lp_utf8_invalid_at(s, n) != n || memchr(s, 0, n))
            LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.tokens[%llu] is not valid UTF-8 text", t->source, (unsigned long long)i);
        LP_CHECK(set_id_text(t, (int32_t)i, s, n));
        if (!sm_put(&t->vocab, t->text[i], n, (int32_t)i)) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
    }
    t->model_vocab_n = t->vocab.n;

    LP_CHECK(lp_gguf_get_arr(g, "tokenizer.ggml.merges", &et, &n_merges));
    if (et != LP_GGUF_STRING) LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.merges is not a list of strings", t->source);
    LP_CHECK(init_merges(t, n_merges));
    for (uint64_t i = 0; i < n_merges; i++) {
        LP_CHECK(lp_gguf_arr_str(g, "tokenizer.ggml.merges", i, &s, &n));
        const char *sp = memchr(s, ' ', n);
        if (!sp || memchr(sp + 1, ' ', n - (size_t)(sp + 1 - s)))
            LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.merges[%llu] '%.*s' is not two tokens separated by one space",
                    t->source, (unsigned long long)i, (int)n, s);
        LP_CHECK(add_merge(t, s, (size_t)(sp - s), sp + 1, n - (size_t)(sp + 1 - s), (int32_t)i, "tokenizer.ggml.merges"));
    }

    const char *pre = "default";
    size_t pre_len = 7;
    if (lp_gguf_has(g, "tokenizer.ggml.pre")) LP_CHECK(lp_gguf_get_str(g, "tokenizer.ggml.pre", &pre, &pre_len));
    LP_CHECK(tok_gguf_pre(t, pre, pre_len));

    /* control (3) tokens are special, user-defined (4) ones are not; both are matched whole */
    for (uint64_t i = 0; i < n_types; i++) {
        int64_t ty;
        LP_CHECK(lp_gguf_arr_int(g, "tokenizer.ggml.token_type", i, &ty));
        if (ty == 3 || ty == 4) LP_CHECK(add_token(t, t->text[i], strlen(t->text[i]), (int32_t)i, ty == 3, 0, 0, 0, 0));
    }

    int64_t bos, eos, add_bos, add_eos;
    LP_CHECK(gguf_opt_int(g, "tokenizer.ggml.bos_token_id", &bos, -1));
    LP_CHECK(gguf_opt_int(g, "tokenizer.ggml.eos_token_id", &eos, -1));
    LP_CHECK(gguf_opt_int(g, "tokenizer.ggml.add_bos_token", &add_bos, 0));
    LP_CHECK(gguf_opt_int(g, "tokenizer.ggml.add_eos_token", &add_eos, 0));
    if (bos >= (int64_t)n_tok || bos < -1) LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.bos_token_id %lld is outside the vocabulary", t->source, (long long)bos);
    if (eos >= (int64_t)n_tok || eos < -1) LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.eos_token_id %lld is outside the vocabulary", t->source, (long long)eos);
    t->bos = (int32_t)bos, t->eos = (int32_t)eos;
    if (add_bos) {
        if (bos < 0) LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.add_bos_token is set but there is no bos_token_id", t->source);
        if (!(t->prefix = malloc(sizeof *t->prefix))) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
        t->prefix[0] = t->bos, t->n_prefix = 1;
    }
    if (add_eos) {
        if (eos < 0) LP_FAIL(LP_ERR_FORMAT, "%s: tokenizer.ggml.add_eos_token is set but there is no eos_token_id", t->source);
        if (!(t->suffix = malloc(sizeof *t->suffix))) LP_FAIL(LP_ERR_OOM, "%s: out of memory", t->source);
        t->suffix[0] = t->eos, t->n_suffix = 1;
    }
    return finish(t);
}

lp_status lp_tokenizer_from_gguf(lp_tokenizer **out, const lp_gguf *g) {
    lp_tokenizer *t;
    *out = NULL;
    LP_CHECK(new_tokenizer(&t, lp_gguf_path(g)));
    lp_status st = load_gguf(t, g);
    if (st != LP_OK) {
        lp_tokenizer_free(t);
        return st;
    }
    *out = t;
    return LP_OK;
}

lp_status lp_tokenizer_load(lp_tokenizer **out, const char *path) {
    struct stat sb;
    *out = NULL;
    if (stat(path, &sb) != 0) LP_FAIL(LP_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    if (S_ISDIR(sb.st_mode)) {
        char p[4096];
        snprintf(p, sizeof p, "%s/tokenizer.json", path);
        if (stat(p, &sb) != 0) LP_FAIL(LP_ERR_IO, "%s: has no tokenizer.json", path);
        return lp_tokenizer_from_json(out, p);
    }
    FILE *f = fopen(path, "rb");
    if (!f) LP_FAIL(LP_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    fclose(f);
    if (lp_gguf_is_file(path)) {
        lp_gguf *g;
        LP_CHECK(lp_gguf_open(path, &g));
        lp_status st = lp_tokenizer_from_gguf(out, g);
        lp_gguf_close(g);
        return st;
    }
    return lp_tokenizer_from_json(out, path);
}

int lp_tokenizer_vocab_size(const lp_tokenizer *t) { return t->spm ? t->spm->n_ids : t->n_ids; }
int lp_tokenizer_bos(const lp_tokenizer *t) { return t->spm ? t->spm->bos : t->bos; }
int lp_tokenizer_eos(const lp_tokenizer *t) { return t->spm ? t->spm->eos : t->eos; }
const char *lp_tokenizer_token(const lp_tokenizer *t, int id) {
    if (t->spm) return id >= 0 && id < t->spm->n_ids ? t->spm->text[id] : NULL;
    return id >= 0 && id < t->n_ids ? t->text[id] : NULL;
}
int lp_tokenizer_adds_bos(const lp_tokenizer *t) {
    int first = t->spm ? (t->spm->n_prefix ? t->spm->prefix[0] : -1) : (t->n_prefix ? t->prefix[0] : -1);
    return first >= 0 && first == lp_tokenizer_bos(t);
}
