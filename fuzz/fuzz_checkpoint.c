/* fuzz_checkpoint.c: libFuzzer harness for what SAE training reads when it resumes
 * (host/sae/sae_checkpoint.c): a checkpoint's state.json and state.safetensors (sae_load_checkpoint)
 * and the metrics.jsonl it trims to the checkpoint's step (sae_trim_metrics). The harness
 * includes the source for the static signature().
 *
 * The input is split at FUZZ_SEP into state.json, state.safetensors and metrics.jsonl.
 * "@SIG@" in state.json is replaced by the signature of the run the harness sets up (a
 * 4 -> 8 standard SAE), so the fuzzer can reach what follows the signature check. A state
 * that loads has a sane step; a refusal leaves one line naming the checkpoint. */
#include "../host/sae/sae_checkpoint.c"
#include "fuzz_util.h"

#define D_IN 4
#define D_SAE 8

static lp_ctx g_c;
static lp_sae *g_sae;
static lp_sae_train_cfg g_cfg;
static char g_out[256];

static void setup_once(void) {
    if (g_sae) return;
    if (lp_ctx_init(&g_c, LP_CPU, LP_F32) != LP_OK) abort();
    lp_sae_cfg sc = {.arch = LP_SAE_STANDARD, .d_in = D_IN, .d_sae = D_SAE, .d_out = D_IN, .normalize = "none"};
    if (lp_sae_alloc(&g_sae, &sc, &g_c) != LP_OK) abort();
    fuzz_path(g_out, sizeof g_out, "train/");
    g_out[strlen(g_out) - 1] = 0;
    g_cfg.out = g_out;
    g_cfg.store = "store";
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    setup_once();
    const uint8_t *part[3];
    size_t len[3];
    fuzz_split(data, size, part, len, 3);
    trainer tr = {.t = &g_cfg, .c = &g_c, .s = g_sae, .S = D_SAE};
    int64_t since[D_SAE];
    tr.since = since;
    if (lp_ctx_alloc(&g_c, g_sae->n_floats * 4, (void **)&tr.adam_m) != LP_OK ||
        lp_ctx_alloc(&g_c, g_sae->n_floats * 4, (void **)&tr.adam_v) != LP_OK)
        abort();
    /* state.json with the signature put in */
    char sig[4096];
    signature(&tr, sig, sizeof sig);
    size_t sl = strlen(sig), cap = len[0] * (sl > 5 ? sl : 5) / 5 + 1, o = 0;
    char *js = malloc(cap);
    if (!js) abort();
    for (size_t i = 0; i < len[0];) {
        if (i + 5 <= len[0] && memcmp(part[0] + i, "@SIG@", 5) == 0) memcpy(js + o, sig, sl), o += sl, i += 5;
        else js[o++] = (char)part[0][i++];
    }
    fuzz_file("train/checkpoints/step-000000007/state.json", js, o);
    free(js);
    fuzz_file("train/checkpoints/step-000000007/state.safetensors", part[1], len[1]);
    int found = 0;
    if (sae_load_checkpoint(&tr, &found) == LP_OK) {
        if (found && (tr.step < 0 || tr.tokens_done < 0 || !isfinite(tr.scale))) __builtin_trap();
    } else {
        fuzz_check_error(g_out);
    }
    const char *mpath = fuzz_file("train/metrics.jsonl", part[2], len[2]);
    if (sae_trim_metrics(mpath, found ? tr.step : 3) != LP_OK) fuzz_check_error(mpath);
    lp_ctx_release(&g_c, tr.adam_m);
    lp_ctx_release(&g_c, tr.adam_v);
    return 0;
}
