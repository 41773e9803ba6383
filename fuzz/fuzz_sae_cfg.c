/* fuzz_sae_cfg.c: libFuzzer harness for SAE directories' cfg.json (host/sae/sae.c), in the
 * SAELens layout (cfg.json + sae_weights.safetensors) and the sparsify layout (cfg.json +
 * sae.safetensors in a directory named for its hookpoint, the run's config.json above).
 *
 * The first input byte picks the layout (even: SAELens, odd: sparsify); the rest is split
 * at FUZZ_SEP into cfg.json and, for sparsify, the run's config.json. The weights are
 * fixed small tensors under every name either layout reads (d_in 4, d_sae 8), so configs
 * that agree with them load and others are refused; a config whose sizes would need more
 * than the weights file holds must be refused before anything that large is allocated. */
#include "fuzz_util.h"
#include "fuzz_sae.h"
#include "loupe/safetensors.h"

#define D 4
#define S 8

static void write_weights(const char *path) {
    static float zero[S * D];
    for (int i = 0; i < S * D; i++) zero[i] = (float)(i % 5) * 0.25f;
    static const lp_st_spec specs[] = {
        {"W_enc", LP_F32, 2, {D, S}},      {"b_enc", LP_F32, 1, {S}},      {"W_dec", LP_F32, 2, {S, D}},
        {"b_dec", LP_F32, 1, {D}},         {"threshold", LP_F32, 1, {S}},  {"W_skip", LP_F32, 2, {D, D}},
        {"encoder.weight", LP_F32, 2, {S, D}}, {"encoder.bias", LP_F32, 1, {S}}, {"topk_threshold", LP_F32, 0, {0}},
    };
    const void *datas[9];
    for (int i = 0; i < 9; i++) datas[i] = zero;
    if (lp_st_write(path, specs, datas, 9, NULL) != LP_OK) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static lp_ctx c;
    static char saelens[256], sparsify[256];
    if (!saelens[0]) {
        if (lp_ctx_init(&c, LP_CPU, LP_F32) != LP_OK) abort();
        char p[256];
        write_weights(fuzz_path(p, sizeof p, "saelens/sae_weights.safetensors"));
        write_weights(fuzz_path(p, sizeof p, "run/layers.3/sae.safetensors"));
        fuzz_path(saelens, sizeof saelens, "saelens");
        fuzz_path(sparsify, sizeof sparsify, "run/layers.3");
    }
    if (size < 1) return 0;
    const uint8_t *part[2];
    size_t len[2];
    int n = fuzz_split(data + 1, size - 1, part, len, 2);
    int sp = data[0] & 1;
    fuzz_file(sp ? "run/layers.3/cfg.json" : "saelens/cfg.json", part[0], len[0]);
    if (sp && n == 2) fuzz_file("run/config.json", part[1], len[1]);
    else fuzz_unlink("run/config.json");
    lp_sae *s;
    if (lp_sae_load(&s, &c, sp ? sparsify : saelens) != LP_OK) {
        fuzz_check_error(fuzz_dir());
        return 0;
    }
    fuzz_use_sae(s, &c);
    lp_sae_free(s, &c);
    return 0;
}
