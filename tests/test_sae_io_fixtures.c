/* test_sae_io_fixtures.c: the SAE files other projects wrote (tests/fixtures/sae/, see
 * tests/gen/gen_sae_fixture.py) load with the right config, and a float64 reference
 * encode/decode of the loaded parameters (sae_ref.h) matches the outputs SAELens recorded:
 * SAELens 6.5.3's saelens_* (and older layouts loupe also reads), the Gemma Scope
 * conventions (params.npz, params.safetensors), and sparsify (encoder.weight transposed on
 * load). Budgets as in test_sae_io.c. */
#include "sae_ref.h"

/* ---- fixtures written by SAELens, Gemma Scope conventions and sparsify ---- */

static lp_st_file g_ref;
static void open_ref(const char *path) { cr_assert_eq(lp_st_open(&g_ref, path), LP_OK, "%s", lp_last_error()); }

typedef struct saelens_case {
    const char *name;
    lp_sae_arch arch;
    int d_in, d_sae, d_out, k, apply, skip;
    const char *hook, *hook_out;
} saelens_case;

static const saelens_case g_saelens[] = {
    {"saelens_standard", LP_SAE_STANDARD, 16, 64, 16, 0, 1, 0, "blocks.1.hook_resid_post", ""},
    {"saelens_topk", LP_SAE_TOPK, 24, 64, 24, 4, 1, 0, "blocks.2.hook_resid_post", ""},
    {"saelens_jumprelu", LP_SAE_JUMPRELU, 32, 64, 32, 0, 0, 0, "blocks.0.hook_mlp_out", ""},
    {"saelens_skip_transcoder", LP_SAE_STANDARD, 16, 64, 24, 0, 0, 1, "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"},
    {"saelens_jumprelu_transcoder", LP_SAE_JUMPRELU, 16, 64, 16, 0, 0, 0, "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"},
};

static void expect_cfg(const lp_sae_cfg *c, const saelens_case *w) {
    cr_expect_eq(c->arch, w->arch, "%s: arch %d", w->name, c->arch);
    cr_expect(c->d_in == w->d_in && c->d_sae == w->d_sae && c->d_out == w->d_out, "%s: dims %d %d %d", w->name, c->d_in,
              c->d_sae, c->d_out);
    if (w->arch == LP_SAE_TOPK) cr_expect_eq(c->k, w->k, "%s: k", w->name);
    cr_expect_eq(c->apply_b_dec_to_input, w->apply, "%s: apply_b_dec_to_input", w->name);
    cr_expect_eq(c->skip, w->skip, "%s: skip", w->name);
    cr_expect_str_eq(c->hook_name, w->hook, "%s", w->name);
    cr_expect_str_eq(c->hook_name_out, w->hook_out, "%s", w->name);
    cr_expect_str_eq(c->normalize, "none");
}

Test(sae_io, saelens_fixtures) {
    open_ref(SAE_FIX "/reference.safetensors");
    for (size_t i = 0; i < sizeof g_saelens / sizeof *g_saelens; i++) {
        const saelens_case *w = &g_saelens[i];
        char dir[256];
        snprintf(dir, sizeof dir, "%s/%s", SAE_FIX, w->name);
        lp_sae *s = load_ok(dir);
        expect_cfg(&s->cfg, w);
        cr_expect_str_eq(s->cfg.model_name, "gpt2");
        cr_expect_eq(s->cfg.context_size, 128);
        host_sae h = host_copy(s);
        expect_outputs(&g_ref, w->name, &h.s, 1.0, REF_MAX_REL);
        free(h.img);
        lp_sae_free(s, &ctx);
    }
    lp_st_close(&g_ref);
}

/* SAELens 5.x wrote every field at the top level (no metadata) and k in
 * activation_fn_kwargs; the generator checked that SAELens 6.5.3 reads it as saelens_topk. */
Test(sae_io, saelens_pre6_layout) {
    open_ref(SAE_FIX "/reference.safetensors");
    lp_sae *s = load_ok(SAE_FIX "/saelens_v5_topk");
    expect_cfg(&s->cfg, &g_saelens[1]);
    cr_expect_eq(s->cfg.context_size, 128);
    host_sae h = host_copy(s);
    expect_outputs(&g_ref, "saelens_topk", &h.s, 1.0, REF_MAX_REL);
    free(h.img);
    lp_sae_free(s, &ctx);
    lp_st_close(&g_ref);
}


Test(sae_io, gemmascope) {
    open_ref(SAE_FIX "/reference.safetensors");
    const char *paths[] = {SAE_FIX "/gemmascope_npz", SAE_FIX "/gemmascope_npz/params.npz", SAE_FIX "/gemmascope_st",
                           SAE_FIX "/gemmascope_st/params.safetensors"};
    lp_sae *first = NULL;
    for (int i = 0; i < 4; i++) {
        lp_sae *s = load_ok(paths[i]);
        cr_expect_eq(s->cfg.arch, LP_SAE_JUMPRELU);
        cr_expect(s->cfg.d_in == 16 && s->cfg.d_sae == 64 && s->cfg.d_out == 16, "%s: dims", paths[i]);
        cr_expect_eq(s->cfg.apply_b_dec_to_input, 0);
        host_sae h = host_copy(s);
        expect_outputs(&g_ref, "gemmascope", &h.s, 1.0, REF_MAX_REL);
        free(h.img);
        if (!first) first = s;
        else {
            cr_expect(same_params(first, s), "%s: parameters differ from %s", paths[i], paths[0]);
            lp_sae_free(s, &ctx);
        }
    }
    lp_sae_free(first, &ctx);
    lp_st_close(&g_ref);
}

Test(sae_io, sparsify) {
    open_ref(SAE_FIX "/reference.safetensors");
    lp_sae *s = load_ok(SAE_FIX "/sparsify/layers.3");
    saelens_case w = {"sparsify_sae", LP_SAE_TOPK, 16, 64, 16, 4, 1, 0, "blocks.3.hook_resid_post", ""};
    expect_cfg(&s->cfg, &w);
    cr_expect_str_eq(s->cfg.model_name, "EleutherAI/pythia-70m");
    cr_expect_eq(s->cfg.context_size, 64);
    host_sae h = host_copy(s);
    expect_outputs(&g_ref, "sparsify_sae", &h.s, 1.0, REF_MAX_REL);
    free(h.img);
    lp_sae_free(s, &ctx);
    /* a transcoder with a skip connection: no b_dec subtraction, W_skip transposed */
    s = load_ok(SAE_FIX "/sparsify/layers.3.mlp/");
    cr_expect_eq(s->cfg.arch, LP_SAE_TOPK);
    cr_expect(s->cfg.skip == 1 && s->cfg.apply_b_dec_to_input == 0 && s->cfg.d_out == 16 && s->cfg.k == 4);
    h = host_copy(s);
    expect_outputs(&g_ref, "sparsify_transcoder", &h.s, 1.0, REF_MAX_REL);
    free(h.img);
    lp_sae_free(s, &ctx);
    /* the weights file named directly */
    s = load_ok(SAE_FIX "/sparsify/layers.3/sae.safetensors");
    cr_expect_eq(s->cfg.k, 4);
    lp_sae_free(s, &ctx);
    lp_st_close(&g_ref);
}

/* An older layout loupe also reads: a TopK SAE that calls itself "standard" with
 * activation_fn_str "topk", and the hook under its pre-6.0 name hook_point. */
Test(sae_io, saelens_oldest_layout) {
    char *d = cfg_variant("saelens_v5_topk", "cfg.json", "sae_weights.safetensors", "v3", "architecture", "\"standard\"", 0);
    char p[512];
    snprintf(p, sizeof p, "%s/cfg.json", d);
    size_t n;
    char *txt = lp_read_file(p, &n);
    cJSON *j = cJSON_ParseWithLength(txt, n);
    free(txt);
    cJSON_DeleteItemFromObjectCaseSensitive(j, "hook_name");
    cJSON_AddStringToObject(j, "hook_point", "blocks.2.hook_resid_post");
    char *out = cJSON_Print(j);
    cJSON_Delete(j);
    write_text(p, out);
    free(out);
    lp_sae *s = load_ok(d);
    expect_cfg(&s->cfg, &g_saelens[1]);
    lp_sae_free(s, &ctx);
}

/* A SAELens BatchTopK training checkpoint: architecture batchtopk and a scalar
 * topk_threshold instead of threshold; loupe reads it as batchtopk with the threshold in
 * every latent. */
Test(sae_io, saelens_batchtopk_checkpoint) {
    char *d = cfg_variant("saelens_standard", "cfg.json", "sae_weights.safetensors", "btk_ckpt", "architecture",
                          "\"batchtopk\"", 1);
    char p[512];
    snprintf(p, sizeof p, "%s/cfg.json", d);
    size_t n;
    char *txt = lp_read_file(p, &n);
    cJSON *j = cJSON_ParseWithLength(txt, n);
    free(txt);
    cJSON_AddNumberToObject(j, "k", 4);
    char *out = cJSON_Print(j);
    cJSON_Delete(j);
    write_text(p, out);
    free(out);
    lp_st_file f;
    cr_assert_eq(lp_st_open(&f, SAE_FIX "/saelens_standard/sae_weights.safetensors"), LP_OK);
    lp_st_spec specs[8];
    const void *datas[8];
    int m = 0;
    for (int i = 0; i < f.n; i++) {
        specs[m] = (lp_st_spec){.name = f.tensors[i].name, .dtype = f.tensors[i].dtype, .ndim = f.tensors[i].ndim};
        memcpy(specs[m].shape, f.tensors[i].shape, sizeof f.tensors[i].shape);
        datas[m++] = f.tensors[i].data;
    }
    double thr = 0.375; /* SAELens keeps it in float64 */
    specs[m] = (lp_st_spec){.name = "topk_threshold", .dtype = LP_F64, .ndim = 0};
    datas[m++] = &thr;
    snprintf(p, sizeof p, "%s/sae_weights.safetensors", d);
    cr_assert_eq(lp_st_write(p, specs, datas, m, NULL), LP_OK, "%s", lp_last_error());
    lp_st_close(&f);
    lp_sae *s = load_ok(d);
    cr_expect_eq(s->cfg.arch, LP_SAE_BATCHTOPK);
    cr_expect_eq(s->cfg.k, 4);
    host_sae h = host_copy(s);
    for (int i = 0; i < 64; i++) cr_expect(h.s.threshold[i] == 0.375f, "threshold[%d] = %g", i, (double)h.s.threshold[i]);
    free(h.img);
    lp_sae_free(s, &ctx);
}
