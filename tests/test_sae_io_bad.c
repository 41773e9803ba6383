/* test_sae_io_bad.c: SAE files (host/sae/) that must not load: missing or misplaced
 * files, bad cfg.json fields, tensors missing, misshapen or non-finite, broken Gemma Scope
 * .npz and sparsify directories. Each gives one line naming the file and the problem. */
#include "sae_io_test.h"

Test(sae_io, bad_paths) {
    expect_load_error(in_tmp("missing"), LP_ERR_IO, "missing", "cannot open");
    char *empty = in_tmp("empty");
    mkdir(empty, 0755);
    expect_load_error(empty, LP_ERR_IO, "empty", "no SAE here");
    char *nw = cfg_variant("saelens_standard", "cfg.json", "sae_weights.safetensors", "noweights", NULL, NULL, 1);
    expect_load_error(nw, LP_ERR_IO, "noweights", "cfg.json without its weights");
    /* weights without cfg.json: what an interrupted save into an existing directory leaves */
    char *nc = in_tmp("nocfg"), p[512];
    mkdir(nc, 0755);
    snprintf(p, sizeof p, "%s/sae_weights.safetensors", nc);
    copy_file(SAE_FIX "/saelens_standard/sae_weights.safetensors", p, 0);
    expect_load_error(nc, LP_ERR_IO, "nocfg", "no cfg.json");
    char *junk = in_tmp("junk.bin");
    write_text(junk, "x");
    expect_load_error(junk, LP_ERR_FORMAT, "junk.bin", "not an SAE");
}

Test(sae_io, bad_saelens_cfg) {
    const char *F = "saelens_topk", *C = "cfg.json", *W = "sae_weights.safetensors";
    char *d = cfg_variant(F, C, W, "arch", "architecture", "\"gated\"", 0);
    expect_load_error(d, LP_ERR_FORMAT, "arch/cfg.json", "architecture 'gated' is not supported");
    d = cfg_variant(F, C, W, "arch2", "architecture", "7", 0);
    expect_load_error(d, LP_ERR_FORMAT, "arch2/cfg.json", "'architecture' is not a string");
    d = cfg_variant(F, C, W, "nodsae", "d_sae", NULL, 0);
    expect_load_error(d, LP_ERR_FORMAT, "nodsae/cfg.json", "'d_sae' is missing");
    d = cfg_variant(F, C, W, "strdin", "d_in", "\"24\"", 0);
    expect_load_error(d, LP_ERR_FORMAT, "strdin/cfg.json", "'d_in' is not an integer");
    d = cfg_variant(F, C, W, "negdin", "d_in", "-24", 0);
    expect_load_error(d, LP_ERR_FORMAT, "negdin/cfg.json", "'d_in' = -24");
    d = cfg_variant(F, C, W, "k0", "k", "0", 0);
    expect_load_error(d, LP_ERR_FORMAT, "k0/cfg.json", "'k' = 0");
    d = cfg_variant(F, C, W, "kbig", "k", "65", 0);
    expect_load_error(d, LP_ERR_FORMAT, "kbig/cfg.json", "'k' = 65");
    d = cfg_variant(F, C, W, "nok", "k", NULL, 0);
    expect_load_error(d, LP_ERR_FORMAT, "nok/cfg.json", "'k' is missing");
    d = cfg_variant(F, C, W, "kfrac", "k", "4.5", 0);
    expect_load_error(d, LP_ERR_FORMAT, "kfrac/cfg.json", "'k' is not an integer");
    d = cfg_variant(F, C, W, "norm", "normalize_activations", "\"layer_norm\"", 0);
    expect_load_error(d, LP_ERR_FORMAT, "norm/cfg.json", "'normalize_activations' = 'layer_norm'");
    d = cfg_variant(F, C, W, "apply", "apply_b_dec_to_input", "\"yes\"", 0);
    expect_load_error(d, LP_ERR_FORMAT, "apply/cfg.json", "'apply_b_dec_to_input' is not true or false");
    d = cfg_variant(F, C, W, "reshape", "reshape_activations", "\"hook_q\"", 0);
    expect_load_error(d, LP_ERR_FORMAT, "reshape/cfg.json", "reshape_activations");
    d = cfg_variant(F, C, W, "hook", "metadata", "{\"hook_name\": 3}", 0);
    expect_load_error(d, LP_ERR_FORMAT, "hook/cfg.json", "'hook_name' is not a string");
    /* cfg.json and the weights disagree: d_in 32 where the tensors have 24 */
    d = cfg_variant(F, C, W, "dinmismatch", "d_in", "32", 0);
    expect_load_error(d, LP_ERR_SHAPE, "dinmismatch/sae_weights.safetensors", "'W_enc' has shape [24, 64], expected [32, 64]");
    char *bad = in_tmp("badjson"), p[512];
    mkdir(bad, 0755);
    snprintf(p, sizeof p, "%s/cfg.json", bad);
    write_text(p, "{\"d_in\": 16,");
    snprintf(p, sizeof p, "%s/sae_weights.safetensors", bad);
    copy_file(SAE_FIX "/saelens_standard/sae_weights.safetensors", p, 0);
    expect_load_error(bad, LP_ERR_FORMAT, "badjson/cfg.json", "JSON");
    /* a jumprelu cfg over weights without a threshold */
    d = cfg_variant("saelens_standard", C, W, "nothreshold", "architecture", "\"jumprelu\"", 0);
    expect_load_error(d, LP_ERR_FORMAT, "nothreshold/sae_weights.safetensors", "'threshold' [64] is missing");
    /* a skip transcoder cfg over weights without W_skip */
    d = saelens_weights_variant("saelens_skip_transcoder", "noskip", "W_skip", NULL, NULL, 0, NULL);
    expect_load_error(d, LP_ERR_FORMAT, "noskip/sae_weights.safetensors", "'W_skip' [24, 16] is missing");
}

Test(sae_io, bad_tensors) {
    char *d = saelens_weights_variant("saelens_standard", "transposed", NULL, "W_enc", NULL, 0, NULL);
    expect_load_error(d, LP_ERR_SHAPE, "transposed/sae_weights.safetensors", "'W_enc' has shape [64, 16], expected [16, 64]");
    d = saelens_weights_variant("saelens_standard", "nobenc", "b_enc", NULL, NULL, 0, NULL);
    expect_load_error(d, LP_ERR_FORMAT, "nobenc/sae_weights.safetensors", "'b_enc' [64] is missing");
    d = saelens_weights_variant("saelens_skip_transcoder", "wdec", NULL, "W_dec", NULL, 0, NULL);
    expect_load_error(d, LP_ERR_SHAPE, "wdec/sae_weights.safetensors", "'W_dec' has shape [24, 64], expected [64, 24]");
    d = saelens_weights_variant("saelens_standard", "nan", NULL, NULL, "W_dec", NAN, NULL);
    expect_load_error(d, LP_ERR_FORMAT, "nan/sae_weights.safetensors", "'W_dec' has a non-finite value (nan) at [0, 3]");
    d = saelens_weights_variant("saelens_jumprelu", "inf", NULL, NULL, "threshold", INFINITY, NULL);
    expect_load_error(d, LP_ERR_FORMAT, "inf/sae_weights.safetensors", "'threshold' has a non-finite value (inf) at [3]");
    d = saelens_weights_variant("saelens_standard", "int", NULL, NULL, NULL, 0, "b_dec");
    expect_load_error(d, LP_ERR_FORMAT, "int/sae_weights.safetensors", "'b_dec' has dtype I32");
}

Test(sae_io, bad_gemmascope) {
    expect_load_error(SAE_FIX "/gemmascope_compressed", LP_ERR_FORMAT, "gemmascope_compressed/params.npz",
                      "is compressed");
    char *d = in_tmp("trunc"), p[512];
    mkdir(d, 0755);
    snprintf(p, sizeof p, "%s/params.npz", d);
    copy_file(SAE_FIX "/gemmascope_npz/params.npz", p, 9000);
    expect_load_error(d, LP_ERR_FORMAT, "trunc/params.npz", "truncated");
    char *junk = in_tmp("junk.npz");
    write_text(junk, "PK this is not a zip archive at all, only text long enough");
    expect_load_error(junk, LP_ERR_FORMAT, "junk.npz", "not a zip archive");
    d = in_tmp("gs_nothr");
    mkdir(d, 0755);
    snprintf(p, sizeof p, "%s/params.safetensors", d);
    weights_variant(SAE_FIX "/gemmascope_st/params.safetensors", p, "threshold", NULL, NULL, 0, NULL);
    expect_load_error(d, LP_ERR_FORMAT, "gs_nothr/params.safetensors", "'threshold' [64] is missing");
    d = in_tmp("gs_badbenc");
    mkdir(d, 0755);
    snprintf(p, sizeof p, "%s/params.safetensors", d);
    weights_variant(SAE_FIX "/gemmascope_st/params.safetensors", p, "b_enc", NULL, NULL, 0, NULL);
    expect_load_error(d, LP_ERR_FORMAT, "gs_badbenc/params.safetensors", "'b_enc' [64] is missing");
    d = in_tmp("gs_nan");
    mkdir(d, 0755);
    snprintf(p, sizeof p, "%s/params.safetensors", d);
    weights_variant(SAE_FIX "/gemmascope_st/params.safetensors", p, NULL, NULL, "w_enc", NAN, NULL);
    expect_load_error(d, LP_ERR_FORMAT, "gs_nan/params.safetensors", "'w_enc' has a non-finite value");
}

Test(sae_io, bad_sparsify) {
    const char *F = "sparsify/layers.3", *C = "cfg.json", *W = "sae.safetensors";
    char *d = cfg_variant(F, C, W, "sp_nodin", "d_in", NULL, 0);
    expect_load_error(d, LP_ERR_FORMAT, "sp_nodin/cfg.json", "'d_in' is missing");
    d = cfg_variant(F, C, W, "sp_groupmax", "activation", "\"groupmax\"", 0);
    expect_load_error(d, LP_ERR_FORMAT, "sp_groupmax/cfg.json", "'activation' = 'groupmax'");
    d = cfg_variant(F, C, W, "sp_k", "k", "100", 0);
    expect_load_error(d, LP_ERR_FORMAT, "sp_k/cfg.json", "'k' = 100");
    d = cfg_variant(F, C, W, "sp_noweights", NULL, NULL, 1);
    expect_load_error(d, LP_ERR_IO, "sp_noweights", "cfg.json without its weights");
    /* the older layout: no num_latents, only expansion_factor (4 * 16 = 64 latents) */
    d = cfg_variant(F, C, W, "sp_expansion", "num_latents", NULL, 0);
    char p[512];
    snprintf(p, sizeof p, "%s/cfg.json", d);
    size_t n;
    char *txt = lp_read_file(p, &n);
    cJSON *j = cJSON_ParseWithLength(txt, n);
    free(txt);
    cJSON_ReplaceItemInObjectCaseSensitive(j, "expansion_factor", cJSON_CreateNumber(4));
    char *out = cJSON_Print(j);
    cJSON_Delete(j);
    write_text(p, out);
    free(out);
    lp_sae *s = load_ok(d);
    cr_expect_eq(s->cfg.d_sae, 64);
    lp_sae_free(s, &ctx);
    d = cfg_variant(F, C, W, "sp_enc", NULL, NULL, 1);
    snprintf(p, sizeof p, "%s/sae.safetensors", d);
    weights_variant(SAE_FIX "/sparsify/layers.3/sae.safetensors", p, NULL, "encoder.weight", NULL, 0, NULL);
    expect_load_error(d, LP_ERR_SHAPE, "sp_enc/sae.safetensors", "'encoder.weight' has shape [16, 64], expected [64, 16]");
}

static void write_bin(const char *path, const void *data, size_t n) {
    FILE *fp = fopen(path, "wb");
    cr_assert(fp);
    cr_assert_eq(fwrite(data, 1, n, fp), n);
    fclose(fp);
}

/* Regressions from fuzzing params.npz: every record offset is checked against the file's
 * size before it is read, in files shorter than the records themselves. */
Test(sae_io, npz_regressions) {
    /* 50 bytes: a zip64 locator and an end record asking for zip64. The 56-byte zip64 record
     * cannot fit in the file, wherever it is said to be: the size check used to wrap around,
     * so the record was read at whatever offset the locator gave (here 2^40: a crash) */
    unsigned char z[50] = "PK\x06\x06";
    memcpy(z + 8, "PK\x06\x07", 4);                   /* locator at 8 */
    z[16 + 5] = 1;                                     /* the zip64 record's offset: 2^40 */
    memcpy(z + 28, "PK\x05\x06\0\0\0\0\xff\xff\xff\xff", 12); /* end record at 28: count 0xffff */
    char *p = in_tmp("z64.npz");
    write_bin(p, z, sizeof z);
    expect_load_error(p, LP_ERR_FORMAT, "z64.npz", "bad zip64 end-of-central-directory record");
    /* a central directory entry whose local header offset points at the directory itself */
    unsigned char c[46 + 5 + 22] = {0};
    memcpy(c, "PK\x01\x02", 4);
    c[28] = 5; /* name length */
    memcpy(c + 46, "a.npy", 5);
    size_t eo = 46 + 5;
    memcpy(c + eo, "PK\x05\x06\0\0\0\0\x01\0\x01\0", 12);
    c[eo + 12] = 51; /* central directory size 51 at offset 0 */
    p = in_tmp("loff.npz");
    write_bin(p, c, eo + 22);
    expect_load_error(p, LP_ERR_FORMAT, "loff.npz", "bad local header");
}

/* A .npy entry whose shape x itemsize wraps, and one cut right after 'descr':, inside a
 * well-formed zip; a cfg.json whose sizes need more than its weights file holds is refused
 * naming the file and keys, before anything that large is allocated. */
Test(sae_io, npz_entry_and_cfg_size_regressions) {
    static const char *const dicts[2] = {
        "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4), }",
        "{'descr':"};
    static const char *const want[2] = {"overflows", "'descr' is not a short quoted string"};
    for (int k = 0; k < 2; k++) {
        /* a stored zip of one entry "W_enc.npy" holding a .npy v1 of this header */
        unsigned char npy[160] = "\x93NUMPY\x01\x00";
        size_t hl = strlen(dicts[k]);
        npy[8] = (unsigned char)hl;
        memcpy(npy + 10, dicts[k], hl);
        size_t nn = 10 + hl;
        unsigned char zip[512] = {0};
        size_t o = 0;
        memcpy(zip, "PK\x03\x04", 4);
        memcpy(zip + 18, &(uint32_t){(uint32_t)nn}, 4);
        memcpy(zip + 22, &(uint32_t){(uint32_t)nn}, 4);
        zip[26] = 9;
        memcpy(zip + 30, "W_enc.npy", 9);
        memcpy(zip + 39, npy, nn);
        o = 39 + nn;
        size_t cd = o;
        memcpy(zip + o, "PK\x01\x02", 4);
        memcpy(zip + o + 20, &(uint32_t){(uint32_t)nn}, 4);
        memcpy(zip + o + 24, &(uint32_t){(uint32_t)nn}, 4);
        zip[o + 28] = 9;
        memcpy(zip + o + 46, "W_enc.npy", 9);
        o += 55;
        memcpy(zip + o, "PK\x05\x06\0\0\0\0\x01\0\x01\0", 12);
        memcpy(zip + o + 12, &(uint32_t){55}, 4);
        memcpy(zip + o + 16, &(uint32_t){(uint32_t)cd}, 4);
        o += 22;
        char *p = in_tmp(k ? "descr.npz" : "wrap.npz");
        write_bin(p, zip, o);
        expect_load_error(p, LP_ERR_FORMAT, k ? "descr.npz: entry 'W_enc'" : "wrap.npz: entry 'W_enc'", want[k]);
    }
    char *d = cfg_variant("saelens_standard", "cfg.json", "sae_weights.safetensors", "huge_d_sae", "d_sae", "2000000000", 0);
    expect_load_error(d, LP_ERR_FORMAT, "huge_d_sae/cfg.json", "d_sae = 2000000000");
    cr_expect(strstr(lp_last_error(), "sae_weights.safetensors has") != NULL, "%s", lp_last_error());
}
