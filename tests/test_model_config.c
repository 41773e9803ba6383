/* test_model_config.c: config.json values that would make loupe compute something else,
 * size something absurd or crash are refused, as bad input (exit status 2), within a
 * second, in one line naming the file and the key. Each case edits one key of a committed
 * fixture (tests/cfgvariant.h); the unedited fixtures load (test_llama.c, test_gpt2.c). */
#include "cfgvariant.h"

/* ---- sizes ---- */

Test(model_config, absurd_layer_counts_are_refused_at_once) {
    /* beyond any model: refused by the bound, before anything is sized */
    CFG_REFUSED("llama-tiny", "{\"num_hidden_layers\": 300000000}", LP_ERR_FORMAT, "config.json", "\"num_hidden_layers\"");
    CFG_REFUSED("gpt2-tiny", "{\"n_layer\": 300000000}", LP_ERR_FORMAT, "config.json", "\"n_layer\"");
    /* inside the bound but not what the checkpoint holds: refused by the tensor check */
    CFG_REFUSED("llama-tiny", "{\"num_hidden_layers\": 10000}", LP_ERR_SHAPE, "config.json", "\"num_hidden_layers\" = 10000",
                "model.layers.9999.input_layernorm.weight");
    CFG_REFUSED("gpt2-tiny", "{\"n_layer\": 10000}", LP_ERR_SHAPE, "config.json", "\"n_layer\" = 10000");
    CFG_REFUSED("qwen2-tiny-tf5", "{\"num_hidden_layers\": 1}", LP_ERR_SHAPE, "\"num_hidden_layers\" = 1", "more layers");
    CFG_REFUSED("gpt2-tiny", "{\"n_layer\": 1}", LP_ERR_SHAPE, "\"n_layer\" = 1", "more layers");
}

Test(model_config, dimensions_out_of_bounds_are_refused) {
    CFG_REFUSED("llama-tiny", "{\"vocab_size\": 1000000000}", LP_ERR_FORMAT, "\"vocab_size\"");
    CFG_REFUSED("llama-tiny", "{\"hidden_size\": 2147483647}", LP_ERR_FORMAT, "\"hidden_size\"");
    CFG_REFUSED("llama-tiny", "{\"intermediate_size\": 0}", LP_ERR_FORMAT, "\"intermediate_size\"");
    CFG_REFUSED("llama-tiny", "{\"num_attention_heads\": -4}", LP_ERR_FORMAT, "\"num_attention_heads\"");
    CFG_REFUSED("llama-tiny", "{\"max_position_embeddings\": 1e300}", LP_ERR_FORMAT, "\"max_position_embeddings\"");
    CFG_REFUSED("llama-tiny", "{\"head_dim\": 15}", LP_ERR_FORMAT, "\"head_dim\"");
    CFG_REFUSED("llama-tiny", "{\"num_key_value_heads\": 3}", LP_ERR_FORMAT, "\"num_key_value_heads\"");
    CFG_REFUSED("llama-tiny", "{\"num_hidden_layers\": 2.5}", LP_ERR_FORMAT, "\"num_hidden_layers\"");
    CFG_REFUSED("gpt2-tiny", "{\"n_embd\": 1000000000}", LP_ERR_FORMAT, "\"n_embd\"");
    CFG_REFUSED("gpt2-tiny", "{\"n_inner\": 100000000}", LP_ERR_FORMAT, "\"n_inner\"");
    CFG_REFUSED("gpt2-tiny", "{\"n_positions\": \"32\"}", LP_ERR_FORMAT, "\"n_positions\"");
}

Test(model_config, dimensions_that_disagree_with_the_tensors_are_refused) {
    CFG_REFUSED("llama-tiny", "{\"intermediate_size\": 100000}", LP_ERR_SHAPE, "mlp.gate_proj.weight", "intermediate_size");
    CFG_REFUSED("llama-tiny", "{\"vocab_size\": 5000000}", LP_ERR_SHAPE, "embed_tokens.weight", "vocab_size");
    CFG_REFUSED("llama-tiny", "{\"hidden_size\": 128}", LP_ERR_SHAPE, "hidden_size");
    CFG_REFUSED("llama-tiny", "{\"num_key_value_heads\": 4}", LP_ERR_SHAPE, "k_proj.weight", "num_key_value_heads");
    CFG_REFUSED("mistral-tiny-tf5", "{\"head_dim\": \"<delete>\"}", LP_ERR_SHAPE, "q_proj.weight", "head_dim");
    CFG_REFUSED("gpt2-tiny", "{\"n_positions\": 4096}", LP_ERR_SHAPE, "wpe.weight", "n_positions");
    CFG_REFUSED("gpt2-tiny", "{\"n_inner\": 1024}", LP_ERR_SHAPE, "mlp.c_fc.weight", "n_inner");
    CFG_REFUSED("gpt2-tiny", "{\"vocab_size\": 100000}", LP_ERR_SHAPE, "wte.weight", "vocab_size");
    /* untied without an lm_head: transformers would start one at random */
    CFG_REFUSED("llama-tiny", "{\"tie_word_embeddings\": false}", LP_ERR_NOT_FOUND, "\"tie_word_embeddings\"", "lm_head.weight");
    CFG_REFUSED("gpt2-tiny", "{\"tie_word_embeddings\": false}", LP_ERR_NOT_FOUND, "\"tie_word_embeddings\"", "lm_head.weight");
}

/* ---- numbers ---- */

Test(model_config, bad_epsilons_are_refused_naming_the_key) {
    CFG_REFUSED("llama-tiny", "{\"rms_norm_eps\": -1e-5}", LP_ERR_FORMAT, "config.json", "\"rms_norm_eps\"");
    CFG_REFUSED("llama-tiny-tf5", "{\"rms_norm_eps\": 0}", LP_ERR_FORMAT, "\"rms_norm_eps\"");
    CFG_REFUSED("llama-tiny", "{\"rms_norm_eps\": 1e30}", LP_ERR_FORMAT, "\"rms_norm_eps\"");
    CFG_REFUSED("llama-tiny", "{\"rms_norm_eps\": \"1e-5\"}", LP_ERR_FORMAT, "\"rms_norm_eps\"");
    CFG_REFUSED("llama-tiny", "{\"rms_norm_eps\": 1e-300}", LP_ERR_FORMAT, "\"rms_norm_eps\"");
    CFG_REFUSED("gpt2-tiny", "{\"layer_norm_epsilon\": -1e-5}", LP_ERR_FORMAT, "config.json", "\"layer_norm_epsilon\"");
    CFG_REFUSED("gpt2-tiny", "{\"layer_norm_epsilon\": 2}", LP_ERR_FORMAT, "\"layer_norm_epsilon\"");
    CFG_REFUSED("llama-tiny", "{\"rope_theta\": -10000}", LP_ERR_FORMAT, "\"rope_theta\"");
    CFG_REFUSED("llama-tiny", "{\"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": -8, \"low_freq_factor\": 1, "
                "\"high_freq_factor\": 4}}", LP_ERR_FORMAT, "\"rope_scaling.factor\"");
    /* once cast to int before its range check (fuzz/corpus/hf_config/regress-llama-rope-orig-ctx-1e300) */
    CFG_REFUSED("llama-tiny", "{\"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8, \"low_freq_factor\": 1, "
                "\"high_freq_factor\": 4, \"original_max_position_embeddings\": 1e300}}", LP_ERR_FORMAT, "original_max_position_embeddings");
}

/* ---- fields loupe does not implement ---- */

Test(model_config, fields_loupe_cannot_honour_are_refused) {
    CFG_REFUSED("llama-tiny", "{\"hidden_act\": \"gelu\"}", LP_ERR_FORMAT, "\"hidden_act\"", "gelu");
    CFG_REFUSED("llama-tiny", "{\"attention_bias\": true}", LP_ERR_FORMAT, "\"attention_bias\"");
    CFG_REFUSED("llama-tiny", "{\"mlp_bias\": true}", LP_ERR_FORMAT, "\"mlp_bias\"");
    CFG_REFUSED("llama-tiny", "{\"mlp_bias\": \"false\"}", LP_ERR_FORMAT, "\"mlp_bias\"");
    CFG_REFUSED("llama-tiny", "{\"tie_word_embeddings\": 1}", LP_ERR_FORMAT, "\"tie_word_embeddings\"");
    CFG_REFUSED("llama-tiny", "{\"quantization_config\": {\"quant_method\": \"gptq\"}}", LP_ERR_FORMAT, "\"quantization_config\"");
    CFG_REFUSED("llama-tiny", "{\"model_type\": \"mixtral\"}", LP_ERR_FORMAT, "model_type", "mixtral");
    CFG_REFUSED("gpt2-tiny", "{\"activation_function\": \"relu\"}", LP_ERR_FORMAT, "\"activation_function\"");
    CFG_REFUSED("gpt2-tiny", "{\"scale_attn_weights\": false}", LP_ERR_FORMAT, "\"scale_attn_weights\"");
    CFG_REFUSED("gpt2-tiny", "{\"scale_attn_by_inverse_layer_idx\": true}", LP_ERR_FORMAT, "\"scale_attn_by_inverse_layer_idx\"");
    CFG_REFUSED("gpt2-tiny", "{\"add_cross_attention\": true}", LP_ERR_FORMAT, "\"add_cross_attention\"");
}

/* A sliding window shorter than the context shortens the usable context to it. */
Test(model_config, sliding_windows_limit_the_context) {
    static const struct { const char *fixture, *patch; int n_ctx; } cases[] = {
        {"mistral-tiny", "{\"sliding_window\": 32}", 32},
        {"mistral-tiny", "{\"sliding_window\": \"<delete>\"}", 128}, /* transformers' 4096 > 128 */
        {"mistral-tiny", "{\"sliding_window\": \"<delete>\", \"max_position_embeddings\": 8192}", 4096},
        {"qwen2-tiny", "{\"sliding_window\": 32}", 128},             /* use_sliding_window false */
        {"qwen2-tiny", "{\"sliding_window\": 32, \"use_sliding_window\": true, \"max_window_layers\": 28}", 128},
        {"qwen2-tiny", "{\"sliding_window\": 32, \"use_sliding_window\": true, \"max_window_layers\": 1}", 32},
        {"qwen2-tiny-tf5", "{\"sliding_window\": 32, \"use_sliding_window\": true}", 128}, /* layer_types: all full */
        {"qwen2-tiny-tf5", "{\"sliding_window\": 32, \"use_sliding_window\": true, "
                           "\"layer_types\": [\"full_attention\", \"sliding_attention\"]}", 32},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        lp_model *m;
        cr_assert_eq(cfg_variant_load(cases[i].fixture, cases[i].patch, &m), LP_OK, "%s: %s", cases[i].patch, lp_last_error());
        cr_expect_eq(lp_model_config(m)->n_ctx, cases[i].n_ctx, "%s %s: context %d, expected %d", cases[i].fixture, cases[i].patch,
                     lp_model_config(m)->n_ctx, cases[i].n_ctx);
        lp_model_free(m);
    }
}

/* ---- GGUF metadata ---- */

/* A GGUF "llama" file with the given u32 (type 4) and f32 (type 6) metadata and one F32
 * tensor, token_embd.weight [8, 32]. */
typedef struct gg_kv { const char *key; int f32; double v; } gg_kv;

static void gg_str(FILE *f, const char *s) {
    uint64_t n = strlen(s);
    fwrite(&n, 8, 1, f);
    fwrite(s, 1, n, f);
}

static void write_gguf(const char *path, const gg_kv *kv, int n) {
    FILE *f = fopen(path, "wb");
    cr_assert(f);
    uint32_t ver = 3, ty = 8;
    uint64_t n_t = 1, n_kv = 1 + n;
    fwrite("GGUF", 1, 4, f);
    fwrite(&ver, 4, 1, f);
    fwrite(&n_t, 8, 1, f);
    fwrite(&n_kv, 8, 1, f);
    gg_str(f, "general.architecture");
    fwrite(&ty, 4, 1, f);
    gg_str(f, "llama");
    for (int i = 0; i < n; i++) {
        gg_str(f, kv[i].key);
        ty = kv[i].f32 ? 6 : 4;
        fwrite(&ty, 4, 1, f);
        if (kv[i].f32) {
            float x = (float)kv[i].v;
            fwrite(&x, 4, 1, f);
        } else {
            uint32_t x = (uint32_t)kv[i].v;
            fwrite(&x, 4, 1, f);
        }
    }
    gg_str(f, "token_embd.weight");
    uint32_t nd = 2, type = 0;
    uint64_t ne[2] = {32, 8}, off = 0;
    fwrite(&nd, 4, 1, f);
    fwrite(ne, 8, 2, f);
    fwrite(&type, 4, 1, f);
    fwrite(&off, 8, 1, f);
    for (long p = ftell(f); p % 32; p++) fputc(0, f);
    for (int i = 0; i < 32 * 8 * 4; i++) fputc(0, f);
    fclose(f);
}

static void expect_gguf_refused(const gg_kv *kv, int n, const char *needle) {
    char path[] = "/tmp/loupe-gguf-XXXXXX";
    int fd = mkstemp(path);
    cr_assert(fd >= 0);
    close(fd);
    write_gguf(path, kv, n);
    double t0 = cfg_now();
    lp_model *m = NULL;
    lp_status st = lp_model_load(&m, path, LP_CPU, LP_F32);
    double dt = cfg_now() - t0;
    const char *msg = lp_last_error();
    cr_expect_eq(lp_status_exit_code(st), 2, "%s: status %s (%s)", needle, lp_status_name(st), msg);
    cr_expect(strstr(msg, needle) && strstr(msg, path), "message '%s' lacks '%s' or the file", msg, needle);
    cr_expect(dt < 1.0, "%s: took %.2f s to refuse", needle, dt);
    fprintf(stderr, "  refused in %.3f s: %s\n", dt, msg);
    lp_model_free(m);
    unlink(path);
}

Test(model_config, gguf_metadata_is_checked_before_anything_is_sized) {
    gg_kv kv[] = {{"llama.block_count", 0, 1},           {"llama.embedding_length", 0, 32},
                  {"llama.feed_forward_length", 0, 64},  {"llama.attention.head_count", 0, 2},
                  {"llama.context_length", 0, 16},       {"llama.attention.layer_norm_rms_epsilon", 1, 1e-5}};
    int n = sizeof kv / sizeof *kv;
    kv[0].v = 300000000;
    expect_gguf_refused(kv, n, "'llama.block_count' = 300000000");
    kv[0].v = 1000; /* inside the bound, but the file has no such layers */
    expect_gguf_refused(kv, n, "metadata key 'llama.block_count' = 1000, but the checkpoint has no tensor 'blk.999.attn_norm.weight'");
    kv[0].v = 1;
    kv[1].v = 64; /* token_embd.weight is [8, 32] */
    expect_gguf_refused(kv, n, "tensor 'token_embd.weight' has shape [8, 32] but the config needs [8, 64]");
    kv[1].v = 32;
    kv[5].v = -1e-5;
    expect_gguf_refused(kv, n, "'llama.attention.layer_norm_rms_epsilon' = -1e-05");
    kv[5].v = 1e-5;
    kv[2].v = 4000000000.0;
    expect_gguf_refused(kv, n, "'llama.feed_forward_length' = 4000000000");
}

/* transformers takes `head_dim or hidden_size // num_attention_heads`: 0 and null mean absent. */
Test(model_config, head_dim_zero_or_null_means_absent) {
    static const char *const patches[] = {"{\"head_dim\": 0}", "{\"head_dim\": null}", "{\"head_dim\": \"<delete>\"}"};
    for (int i = 0; i < 3; i++) {
        lp_model *m;
        cr_assert_eq(cfg_variant_load("llama-tiny", patches[i], &m), LP_OK, "%s: %s", patches[i], lp_last_error());
        cr_expect_eq(lp_model_config(m)->d_head, 16, "%s: d_head %d", patches[i], lp_model_config(m)->d_head);
        lp_model_free(m);
    }
}
