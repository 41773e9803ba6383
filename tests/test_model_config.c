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
