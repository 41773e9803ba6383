/* llama_config.c: the Llama family's configuration (Llama 2/3, SmolLM2, Mistral, Qwen2)
 * from a Hugging Face config.json or from GGUF metadata.
 *
 * config.json comes in two layouts. transformers 4 writes the rotary base as a top-level
 * "rope_theta" and the scaling as "rope_scaling"; transformers 5 writes both inside
 * "rope_parameters" ({"rope_type", "rope_theta", "factor", ...}). Both are read as
 * transformers 5 reads them (RotaryEmbeddingConfigMixin): a non-empty "rope_scaling"
 * replaces "rope_parameters"; the base is the dict's "rope_theta", else the top-level one,
 * else 10000; "partial_rotary_factor" may sit at either level; llama3's original context
 * is a top-level "original_max_position_embeddings", else the dict's, else
 * "max_position_embeddings". Every field that changes the computation and that loupe does
 * not implement (other rope types, partial rotary, biases Llama does not have, other
 * activations, quantized checkpoints, experts) is refused naming its key, never ignored. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "model/model_cfg.h"
#include "model/model_internal.h"

#define TRY(expr) LP_TRY(st, done, expr)
#define REFUSE(...)                                                        \
    do {                                                                   \
        st = LP_ERR(LP_ERR_FORMAT, __VA_ARGS__); \
        goto done;                                                         \
    } while (0)

lp_status llama_check_config(const char *what, const lp_config *c) {
    if (c->n_layers < 1 || c->d_model < 1 || c->n_heads < 1 || c->n_kv_heads < 1 || c->d_head < 1 || c->d_mlp < 1 ||
        c->n_ctx < 1 || c->d_vocab < 1)
        LP_FAIL(LP_ERR_FORMAT, "%s: the model's dimensions must all be positive", what);
    if (c->n_layers > LP_MAX_LAYERS || c->d_model > LP_MAX_D_MODEL || c->n_heads > LP_MAX_HEADS || c->d_mlp > LP_MAX_D_MLP ||
        c->n_ctx > LP_MAX_CTX || c->d_vocab > LP_MAX_VOCAB)
        LP_FAIL(LP_ERR_FORMAT, "%s: a dimension exceeds loupe's bounds (layers %d, d_model %d, heads %d, d_mlp %d, "
                "context %d, vocabulary %d)", what, c->n_layers, c->d_model, c->n_heads, c->d_mlp, c->n_ctx, c->d_vocab);
    if (c->n_kv_heads > c->n_heads || c->n_heads % c->n_kv_heads)
        LP_FAIL(LP_ERR_FORMAT, "%s: %d attention heads are not a multiple of %d key/value heads", what, c->n_heads, c->n_kv_heads);
    if (c->d_head % 2 || c->d_head > 256)
        LP_FAIL(LP_ERR_FORMAT, "%s: head dimension %d is not supported (even, at most 256)", what, c->d_head);
    if (!(c->ln_eps > 0 && c->ln_eps < 1)) LP_FAIL(LP_ERR_FORMAT, "%s: RMSNorm epsilon %g is not in (0, 1)", what, c->ln_eps);
    if (!(c->rope_theta > 1) || !isfinite(c->rope_theta)) LP_FAIL(LP_ERR_FORMAT, "%s: rope theta %g must be > 1", what, c->rope_theta);
    return LP_OK;
}

/* ---- config.json ---- */

static const cJSON *jget(const cJSON *o, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNull(v) ? NULL : v;
}

/* The dict the rotary settings come from (NULL: none) and the key it sits under. */
static lp_status rope_dict(const char *path, const cJSON *root, const cJSON **rs, const char **where) {
    *rs = NULL;
    static const char *const keys[] = {"rope_scaling", "rope_parameters"};
    static const char *const prefixes[] = {"rope_scaling.", "rope_parameters."};
    for (int i = 0; i < 2; i++) {
        const cJSON *d = jget(root, keys[i]);
        if (d && !cJSON_IsObject(d)) LP_FAIL(LP_ERR_FORMAT, "%s: \"%s\" is not an object", path, keys[i]);
        if (!d || !d->child) continue; /* transformers 5: `rope_scaling or rope_parameters` */
        /* transformers 5 nests one dict per attention type for models with several */
        for (const cJSON *e = d->child; e; e = e->next)
            if (cJSON_IsObject(e))
                LP_FAIL(LP_ERR_FORMAT, "%s: \"%s.%s\": rotary settings per layer type are not supported", path, keys[i], e->string);
        *rs = d, *where = prefixes[i];
        return LP_OK;
    }
    return LP_OK;
}

static lp_status read_rope(const char *path, const cJSON *root, lp_config *c) {
    const cJSON *rs;
    const char *where = "";
    LP_CHECK(rope_dict(path, root, &rs, &where));
    double top_theta, prf;
    LP_CHECK(jcfg_num(path, root, "", "rope_theta", 1, HUGE_VAL, 10000.0, &top_theta));
    LP_CHECK(jcfg_num(path, root, "", "partial_rotary_factor", 0, HUGE_VAL, 1.0, &prf));
    const char *prf_key = "partial_rotary_factor", *prf_where = "";
    c->rope_theta = top_theta;
    c->rope_kind = LP_ROPE_DEFAULT;
    const char *type = "default", *type_key = "rope_type";
    if (rs) {
        LP_CHECK(jcfg_num(path, rs, where, "rope_theta", 1, HUGE_VAL, top_theta, &c->rope_theta));
        if (jget(rs, "partial_rotary_factor")) prf_where = where;
        LP_CHECK(jcfg_num(path, rs, where, "partial_rotary_factor", 0, HUGE_VAL, prf, &prf));
        if (!jget(rs, "rope_type") && jget(rs, "type")) type_key = "type";
        LP_CHECK(jcfg_str(path, rs, where, type_key, "default", &type));
    }
    if (prf != 1.0)
        LP_FAIL(LP_ERR_FORMAT, "%s: \"%s%s\" = %g: partial rotary embeddings are not supported", path, prf_where, prf_key, prf);
    if (strcmp(type, "default") == 0) return LP_OK;
    if (strcmp(type, "linear") == 0) {
        c->rope_kind = LP_ROPE_LINEAR;
        return jcfg_num(path, rs, where, "factor", 0, HUGE_VAL, NAN, &c->rope_factor);
    }
    if (strcmp(type, "llama3") != 0)
        LP_FAIL(LP_ERR_FORMAT, "%s: \"%s%s\" '%s' is not supported (default, linear, llama3)", path, where, type_key, type);
    c->rope_kind = LP_ROPE_LLAMA3;
    LP_CHECK(jcfg_num(path, rs, where, "factor", 0, HUGE_VAL, NAN, &c->rope_factor));
    LP_CHECK(jcfg_num(path, rs, where, "low_freq_factor", 0, HUGE_VAL, NAN, &c->rope_low_freq_factor));
    LP_CHECK(jcfg_num(path, rs, where, "high_freq_factor", 0, HUGE_VAL, NAN, &c->rope_high_freq_factor));
    if (!(c->rope_high_freq_factor > c->rope_low_freq_factor))
        LP_FAIL(LP_ERR_FORMAT, "%s: \"%shigh_freq_factor\" %g must exceed \"%slow_freq_factor\" %g", path, where,
                c->rope_high_freq_factor, where, c->rope_low_freq_factor);
    const char *oc = "original_max_position_embeddings";
    int from_dict;
    LP_CHECK(jcfg_int(path, rs, oc, 1, LP_MAX_CTX, c->n_ctx, &from_dict));
    return jcfg_int(path, root, oc, 1, LP_MAX_CTX, from_dict, &c->rope_orig_ctx);
}

/* A window shorter than the context changes attention beyond it: rather than attend too
 * far, the usable context ends at the window. Mistral slides on every layer (4096 when the
 * key is absent, none when null); Qwen2 only with use_sliding_window, on the layers that
 * layer_types (or max_window_layers) mark; Llama has no window. */
static lp_status read_window(const char *path, const cJSON *root, int mistral, int qwen2, lp_config *c) {
    int use = mistral, window = 0;
    if (qwen2) LP_CHECK(jcfg_bool(path, root, "use_sliding_window", 0, &use));
    if (!use) return LP_OK;
    const cJSON *sw = cJSON_GetObjectItemCaseSensitive(root, "sliding_window");
    if (cJSON_IsNull(sw)) return LP_OK;
    LP_CHECK(jcfg_int(path, root, "sliding_window", 1, INT32_MAX, 4096, &window));
    if (qwen2) {
        int slides = 0, first;
        const cJSON *lt = jget(root, "layer_types");
        if (lt && !cJSON_IsArray(lt)) LP_FAIL(LP_ERR_FORMAT, "%s: \"layer_types\" is not a list", path);
        for (const cJSON *e = lt ? lt->child : NULL; e; e = e->next) {
            if (!cJSON_IsString(e)) LP_FAIL(LP_ERR_FORMAT, "%s: \"layer_types\" holds a non-string", path);
            slides |= strcmp(e->valuestring, "sliding_attention") == 0;
        }
        if (!lt) {
            LP_CHECK(jcfg_int(path, root, "max_window_layers", 0, INT32_MAX, 28, &first));
            slides = first < c->n_layers;
        }
        if (!slides) return LP_OK;
    }
    if (window < c->n_ctx) c->n_ctx = window;
    return LP_OK;
}

static lp_status read_dims(const char *path, const cJSON *root, int mistral, int qwen2, lp_config *c) {
    LP_CHECK(jcfg_int(path, root, "num_hidden_layers", 1, LP_MAX_LAYERS, -1, &c->n_layers));
    LP_CHECK(jcfg_int(path, root, "hidden_size", 1, LP_MAX_D_MODEL, -1, &c->d_model));
    LP_CHECK(jcfg_int(path, root, "num_attention_heads", 1, LP_MAX_HEADS, -1, &c->n_heads));
    /* transformers' defaults when the key is absent: Mistral 8, Qwen2 32, Llama the heads */
    int kv_default = mistral ? 8 : qwen2 ? 32 : c->n_heads;
    LP_CHECK(jcfg_int(path, root, "num_key_value_heads", 1, LP_MAX_HEADS, kv_default, &c->n_kv_heads));
    /* transformers: `head_dim or hidden_size // num_attention_heads`, so 0 means absent */
    const cJSON *hd = jget(root, "head_dim");
    c->d_head = c->d_model / c->n_heads;
    if (!(cJSON_IsNumber(hd) && hd->valuedouble == 0))
        LP_CHECK(jcfg_int(path, root, "head_dim", 1, LP_MAX_D_HEAD, c->d_head, &c->d_head));
    if (c->d_head < 1) LP_FAIL(LP_ERR_FORMAT, "%s: \"hidden_size\" %d is smaller than \"num_attention_heads\" %d", path, c->d_model, c->n_heads);
    if (c->d_head % 2 || c->d_head > 256)
        LP_FAIL(LP_ERR_FORMAT, "%s: \"head_dim\" %d is not supported (even, at most 256)", path, c->d_head);
    if (c->n_kv_heads > c->n_heads || c->n_heads % c->n_kv_heads)
        LP_FAIL(LP_ERR_FORMAT, "%s: \"num_attention_heads\" %d is not a multiple of \"num_key_value_heads\" %d", path, c->n_heads,
                c->n_kv_heads);
    LP_CHECK(jcfg_int(path, root, "intermediate_size", 1, LP_MAX_D_MLP, -1, &c->d_mlp));
    LP_CHECK(jcfg_int(path, root, "max_position_embeddings", 1, LP_MAX_CTX, -1, &c->n_ctx));
    LP_CHECK(jcfg_int(path, root, "vocab_size", 1, LP_MAX_VOCAB, -1, &c->d_vocab));
    double eps;
    LP_CHECK(jcfg_num(path, root, "", "rms_norm_eps", 0, 1, 1e-6, &eps));
    c->ln_eps = (float)eps;
    if (!(c->ln_eps > 0)) LP_FAIL(LP_ERR_FORMAT, "%s: \"rms_norm_eps\" = %g underflows float32", path, eps);
    return LP_OK;
}

void llama_set_shape(lp_config *c) {
    c->arch = LP_ARCH_LLAMA;
    c->norm = LP_NORM_RMS, c->pos = LP_POS_ROTARY, c->mlp = LP_MLP_SWIGLU;
}

lp_status llama_read_hf_config(lp_model *m, const char *path, const cJSON *root) {
    lp_status st = LP_OK;
    lp_config *c = &m->cfg;
    const char *type, *act;
    TRY(jcfg_str(path, root, "", "model_type", "", &type));
    int qwen2 = strcmp(type, "qwen2") == 0, mistral = strcmp(type, "mistral") == 0, llama = strcmp(type, "llama") == 0;
    if (!qwen2 && !mistral && !llama)
        REFUSE("%s: model_type '%s' is not supported (supported: gpt2, llama, mistral, qwen2)", path, type);
    llama_set_shape(c);
    snprintf(c->name, sizeof c->name, "%s", type);
    if (jget(root, "quantization_config"))
        REFUSE("%s: \"quantization_config\": quantized Hugging Face checkpoints are not supported (GGUF is)", path);
    TRY(read_dims(path, root, mistral, qwen2, c));
    TRY(jcfg_str(path, root, "", "hidden_act", "silu", &act));
    if (strcmp(act, "silu") != 0 && strcmp(act, "swish") != 0) REFUSE("%s: \"hidden_act\" '%s' is not supported (silu only)", path, act);
    int flag;
    /* only Llama's modeling reads these; Mistral's and Qwen2's ignore them, as loupe does */
    if (llama) {
        TRY(jcfg_bool(path, root, "mlp_bias", 0, &flag));
        if (flag) REFUSE("%s: \"mlp_bias\" = true is not supported", path);
        TRY(jcfg_bool(path, root, "attention_bias", 0, &flag));
        if (flag) REFUSE("%s: \"attention_bias\" = true is not supported for llama (q, k, v and o biases)", path);
    }
    c->qkv_bias = qwen2; /* Qwen2 always has q/k/v biases (and no o bias) */
    TRY(jcfg_bool(path, root, "tie_word_embeddings", 0, &c->tied_unembed));
    TRY(read_rope(path, root, c));
    TRY(read_window(path, root, mistral, qwen2, c));
    st = llama_check_config(path, c);
done:
    return st;
}

/* ---- GGUF metadata ---- */

static lp_status gguf_int(const lp_gguf *g, const char *arch, const char *key, int hi, int64_t dflt, int *out) {
    char k[128];
    snprintf(k, sizeof k, "%s.%s", arch, key);
    int64_t v = dflt;
    if (lp_gguf_has(g, k)) LP_CHECK(lp_gguf_get_int(g, k, &v));
    else if (dflt < 0) LP_FAIL(LP_ERR_FORMAT, "%s: metadata key '%s' is missing", lp_gguf_path(g), k);
    if (v < 1 || v > hi) LP_FAIL(LP_ERR_FORMAT, "%s: metadata key '%s' = %lld is outside [1, %d]", lp_gguf_path(g), k, (long long)v, hi);
    *out = (int)v;
    return LP_OK;
}

static lp_status gguf_float(const lp_gguf *g, const char *arch, const char *key, double lo, double hi, double dflt, double *out) {
    char k[128];
    snprintf(k, sizeof k, "%s.%s", arch, key);
    *out = dflt;
    if (lp_gguf_has(g, k)) LP_CHECK(lp_gguf_get_float(g, k, out));
    else if (isnan(dflt)) LP_FAIL(LP_ERR_FORMAT, "%s: metadata key '%s' is missing", lp_gguf_path(g), k);
    if (!isfinite(*out) || !(*out > lo && *out < hi))
        LP_FAIL(LP_ERR_FORMAT, "%s: metadata key '%s' = %g is outside (%g, %g)", lp_gguf_path(g), k, *out, lo, hi);
    return LP_OK;
}

static lp_status gguf_rope_scaling(const lp_gguf *g, const char *arch, lp_config *c) {
    char k[128];
    snprintf(k, sizeof k, "%s.rope.scaling.type", arch);
    if (!lp_gguf_has(g, k)) return LP_OK;
    const char *s;
    size_t len;
    LP_CHECK(lp_gguf_get_str(g, k, &s, &len));
    if (len == 4 && memcmp(s, "none", 4) == 0) return LP_OK;
    if (!(len == 6 && memcmp(s, "linear", 6) == 0))
        LP_FAIL(LP_ERR_FORMAT, "%s: metadata key '%s' = '%.*s' is not supported (none, linear)", lp_gguf_path(g), k, (int)len, s);
    c->rope_kind = LP_ROPE_LINEAR;
    return gguf_float(g, arch, "rope.scaling.factor", 0, HUGE_VAL, NAN, &c->rope_factor);
}

/* Also the dimensions, norm epsilon and rotary base of Gemma's GGUF files (gemma.c), which
 * use the same keys under their own architecture name. */
lp_status llama_read_gguf_config(lp_model *m, const lp_gguf *g) {
    const char *path = lp_gguf_path(g);
    const char *s;
    size_t len;
    if (lp_gguf_get_str(g, "general.architecture", &s, &len) != LP_OK)
        LP_FAIL(LP_ERR_FORMAT, "%s: metadata key 'general.architecture' is missing", path);
    char arch[32];
    snprintf(arch, sizeof arch, "%.*s", (int)(len < 31 ? len : 31), s);
    lp_config *c = &m->cfg;
    llama_set_shape(c);
    snprintf(c->name, sizeof c->name, "%s", arch);
    const lp_gguf_tensor *emb = lp_gguf_find_tensor(g, "token_embd.weight");
    if (!emb || emb->n_dims != 2) LP_FAIL(LP_ERR_FORMAT, "%s: tensor 'token_embd.weight' is missing or not 2-D", path);
    char k[128];
    int64_t experts = 0;
    snprintf(k, sizeof k, "%s.expert_count", arch);
    if (lp_gguf_has(g, k)) LP_CHECK(lp_gguf_get_int(g, k, &experts));
    if (experts > 1) LP_FAIL(LP_ERR_FORMAT, "%s: metadata key '%s' = %lld: mixtures of experts are not supported", path, k, (long long)experts);
    LP_CHECK(gguf_int(g, arch, "block_count", LP_MAX_LAYERS, -1, &c->n_layers));
    LP_CHECK(gguf_int(g, arch, "embedding_length", LP_MAX_D_MODEL, -1, &c->d_model));
    LP_CHECK(gguf_int(g, arch, "feed_forward_length", LP_MAX_D_MLP, -1, &c->d_mlp));
    LP_CHECK(gguf_int(g, arch, "attention.head_count", LP_MAX_HEADS, -1, &c->n_heads));
    LP_CHECK(gguf_int(g, arch, "attention.head_count_kv", LP_MAX_HEADS, c->n_heads, &c->n_kv_heads));
    LP_CHECK(gguf_int(g, arch, "context_length", LP_MAX_CTX, -1, &c->n_ctx));
    LP_CHECK(gguf_int(g, arch, "attention.key_length", LP_MAX_D_HEAD, c->d_model / c->n_heads, &c->d_head));
    LP_CHECK(gguf_int(g, arch, "vocab_size", LP_MAX_VOCAB, emb->ne[1], &c->d_vocab));
    int rot;
    LP_CHECK(gguf_int(g, arch, "rope.dimension_count", LP_MAX_D_HEAD, c->d_head, &rot));
    if (rot != c->d_head)
        LP_FAIL(LP_ERR_FORMAT, "%s: metadata key '%s.rope.dimension_count' = %d is not the head dimension %d (partial rotary is not "
                "supported)", path, arch, rot, c->d_head);
    double eps;
    LP_CHECK(gguf_float(g, arch, "attention.layer_norm_rms_epsilon", 0, 1, 1e-5, &eps));
    LP_CHECK(gguf_float(g, arch, "rope.freq_base", 1, HUGE_VAL, 10000.0, &c->rope_theta));
    c->ln_eps = (float)eps;
    LP_CHECK(gguf_rope_scaling(g, arch, c));
    c->qkv_bias = lp_gguf_find_tensor(g, "blk.0.attn_q.bias") != NULL;
    c->tied_unembed = lp_gguf_find_tensor(g, "output.weight") == NULL;
    return llama_check_config(path, c);
}
