/* fuzz_clt_npz.c: libFuzzer harness for Gemma Scope's transcoders as a transcoder set
 * (host/sae/clt_files.c with sae_npz.c's archive reader): a fixed config.yaml in
 * circuit-tracer's form listing layer_0/params.npz and layer_1/params.npz, whose contents
 * are the input split at FUZZ_SEP (one part: layer 1's file is absent). A refusal must name
 * the directory or a file; what loads must encode and decode both layers. */
#include "fuzz_util.h"
#include "loupe/clt.h"

static const char g_config[] = "model_kind: transcoder_set\nfeature_input_hook: ln2.hook_normalized\n"
                               "feature_output_hook: hook_mlp_out\nscan: fuzz\ntranscoders:\n"
                               "  - layer_0/params.npz\n  - layer_1/params.npz\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static lp_ctx c;
    static int init;
    if (!init) {
        if (lp_ctx_init(&c, LP_CPU, LP_F32) != LP_OK) abort();
        init = 1;
    }
    const uint8_t *part[2];
    size_t len[2];
    int n = fuzz_split(data, size, part, len, 2);
    fuzz_unlink("gs/layer_0/params.npz"), fuzz_unlink("gs/layer_1/params.npz");
    fuzz_file("gs/config.yaml", g_config, sizeof g_config - 1);
    fuzz_file("gs/layer_0/params.npz", part[0], len[0]);
    if (n >= 2) fuzz_file("gs/layer_1/params.npz", part[1], len[1]);
    char dir[256];
    fuzz_path(dir, sizeof dir, "gs");
    lp_clt *t;
    if (lp_clt_load(&t, &c, dir) != LP_OK) {
        fuzz_check_error(fuzz_dir());
        return 0;
    }
    /* usable: JumpReLU from the thresholds, both layers encode two tokens and decode them */
    if (t->cfg.act != LP_CLT_JUMPRELU || t->cfg.n_layers != 2 || t->cfg.skip) abort();
    int D = t->cfg.d_model, S = t->cfg.d_sae;
    float *x = calloc((size_t)2 * D, sizeof *x), *f = calloc((size_t)2 * S, sizeof *f), *y = calloc((size_t)2 * D, sizeof *y);
    if (!x || !f || !y) abort();
    for (int i = 0; i < 2 * D; i++) x[i] = (float)(i % 7) - 3.0f;
    for (int l = 0; l < 2; l++) {
        const float *fl[2] = {NULL, NULL};
        fl[l] = f;
        if (lp_clt_encode(t, &c, l, x, 2, f, 0) != LP_OK) abort();
        if (lp_clt_decode(t, &c, l, fl, x, 2, y) != LP_OK) abort();
    }
    free(x), free(f), free(y);
    lp_clt_free(t, &c);
    return 0;
}
