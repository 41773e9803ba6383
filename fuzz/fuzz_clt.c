/* fuzz_clt.c: libFuzzer harness for transcoder sets in circuit-tracer's layout
 * (host/sae/clt_files.c, clt_yaml.c): config.yaml and the safetensors files beside it.
 *
 * The first input byte picks the layout (even: per-layer, odd: cross-layer); the rest is
 * split at FUZZ_SEP into config.yaml, then layer 0's file (per-layer: layer_0.safetensors;
 * CLT: W_enc_0.safetensors) and layer 1's (per-layer: layer_1; CLT: W_dec_0.safetensors). A
 * refusal must name the directory or file; what loads must encode and decode every layer. */
#include "fuzz_util.h"
#include "loupe/clt.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static lp_ctx c;
    static int init;
    if (!init) {
        if (lp_ctx_init(&c, LP_CPU, LP_F32) != LP_OK) abort();
        init = 1;
    }
    if (size < 1) return 0;
    const uint8_t *part[3];
    size_t len[3];
    int n = fuzz_split(data + 1, size - 1, part, len, 3);
    int cl = data[0] & 1;
    const char *f0 = cl ? "clt/W_enc_0.safetensors" : "clt/layer_0.safetensors";
    const char *f1 = cl ? "clt/W_dec_0.safetensors" : "clt/layer_1.safetensors";
    fuzz_unlink("clt/W_enc_0.safetensors"), fuzz_unlink("clt/layer_0.safetensors");
    fuzz_unlink("clt/W_dec_0.safetensors"), fuzz_unlink("clt/layer_1.safetensors");
    fuzz_file("clt/config.yaml", part[0], len[0]);
    if (n >= 2) fuzz_file(f0, part[1], len[1]);
    if (n >= 3) fuzz_file(f1, part[2], len[2]);
    char dir[256];
    fuzz_path(dir, sizeof dir, "clt");
    lp_clt *t;
    if (lp_clt_load(&t, &c, dir) != LP_OK) {
        fuzz_check_error(fuzz_dir());
        return 0;
    }
    /* usable: every layer encodes two tokens and decodes them */
    int D = t->cfg.d_model, S = t->cfg.d_sae, L = t->cfg.n_layers;
    float *x = calloc((size_t)2 * D, sizeof *x), *f = calloc((size_t)L * 2 * S, sizeof *f), *y = calloc((size_t)2 * D, sizeof *y);
    const float **fl = calloc((size_t)L, sizeof *fl);
    if (!x || !f || !y || !fl) abort();
    for (int i = 0; i < 2 * D; i++) x[i] = (float)(i % 7) - 3.0f;
    for (int l = 0; l < L; l++) {
        if (lp_clt_encode(t, &c, l, x, 2, f + (size_t)l * 2 * S, 0) != LP_OK) abort();
        fl[l] = f + (size_t)l * 2 * S;
    }
    for (int j = 0; j < L; j++)
        if (lp_clt_decode(t, &c, j, fl, x, 2, y) != LP_OK) abort();
    for (int l = 0; l < L; l++)
        for (int s = 0; s < S; s++)
            if (!lp_clt_enc_vec(t, l, s) || !lp_clt_dec_vec(t, l, s, l)) abort();
    free(x), free(f), free(y), free(fl);
    lp_clt_free(t, &c);
    return 0;
}
