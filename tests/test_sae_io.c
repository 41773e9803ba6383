/* test_sae_io.c: SAE files (host/sae/) against the projects that define them.
 *
 * - SAELens 6.5.3 wrote saelens_*: each loads, and a float64 reference encode/decode of
 *   the loaded parameters (sae_ref.h) matches SAELens's own outputs recorded by
 *   tests/gen/gen_sae_fixture.py; so do the Gemma Scope (params.npz, params.safetensors)
 *   and sparsify fixtures (orientation: encoder.weight is transposed on load). Those are
 *   test_sae_io_fixtures.c; the config, the allocation and saving are here.
 * - loupe_written/ is what lp_sae_save writes from fixed weights (regenerate with
 *   LOUPE_WRITE_SAE_FIXTURE=1); a fresh save must reproduce it, and SAELens's outputs on it
 *   (recorded by the generator) must equal loupe's unfolded SAE on scaled inputs.
 * - save -> load is exact; the scale folds as SAELens's fold_activation_norm_scaling_factor
 *   (a transcoder: its input side only);
 *   batchtopk saves as jumprelu with its global threshold. Bad input: test_sae_io_bad.c.
 *
 * Budgets (max |diff| / max |ref|): the reference encode here and SAELens both compute in
 * float64 from the same float32 numbers: 1e-9 (seen: ~1e-16). Where the float32 parameters
 * were rescaled (folding) the rounding of W * s is visible: 1e-6 (seen: ~1e-7). The inputs
 * keep every latent's selection 1e-3 away from a tie or threshold. */
#include "sae_ref.h"

/* ---- the config and the allocation ---- */

Test(sae_io, arch_names) {
    for (int a = 0; a < 4; a++) cr_expect_eq(lp_sae_arch_parse(lp_sae_arch_name((lp_sae_arch)a)), a);
    cr_expect_str_eq(lp_sae_arch_name(LP_SAE_BATCHTOPK), "batchtopk");
    cr_expect_eq(lp_sae_arch_parse("gated"), -1);
    cr_expect_eq(lp_sae_arch_parse(NULL), -1);
    cr_expect_str_eq(lp_sae_arch_name((lp_sae_arch)42), "unknown");
}

static void expect_cfg_error(lp_sae_cfg c, const char *phrase) {
    lp_status st = lp_sae_cfg_check(&c);
    cr_expect_eq(st, LP_ERR_ARG, "expected a rejection mentioning '%s'", phrase);
    cr_expect(strstr(lp_last_error(), phrase) != NULL, "message '%s' lacks '%s'", lp_last_error(), phrase);
    lp_sae *s = (lp_sae *)1;
    cr_expect_eq(lp_sae_alloc(&s, &c, &ctx), LP_ERR_ARG);
    cr_expect(s == NULL);
}

Test(sae_io, cfg_check) {
    lp_sae_cfg ok = mkcfg(LP_SAE_TOPK, 16, 64, 16, 4, 1, 0);
    cr_expect_eq(lp_sae_cfg_check(&ok), LP_OK, "%s", lp_last_error());
    lp_sae_cfg c;
    c = ok, c.d_in = 0; expect_cfg_error(c, "d_in");
    c = ok, c.d_sae = -1; expect_cfg_error(c, "d_sae");
    c = ok, c.d_out = 0; expect_cfg_error(c, "d_out");
    c = ok, c.k = 0; expect_cfg_error(c, "k = 0");
    c = ok, c.k = 65; expect_cfg_error(c, "k = 65");
    c = ok, c.arch = LP_SAE_BATCHTOPK, c.k = 0; expect_cfg_error(c, "batchtopk");
    c = ok, c.arch = (lp_sae_arch)9; expect_cfg_error(c, "architecture");
    c = ok, snprintf(c.normalize, sizeof c.normalize, "layer_norm"); expect_cfg_error(c, "normalize");
    c = ok, c.apply_b_dec_to_input = 2; expect_cfg_error(c, "apply_b_dec_to_input");
    c = ok, c.d_out = 24; expect_cfg_error(c, "apply_b_dec_to_input");
    c = ok, c.skip = 3; expect_cfg_error(c, "skip");
    c = ok, c.jumprelu_bandwidth = NAN; expect_cfg_error(c, "jumprelu_bandwidth");
    c = ok, c.context_size = -1; expect_cfg_error(c, "context_size");
    c = ok, memset(c.hook_name, 'a', sizeof c.hook_name); expect_cfg_error(c, "hook_name");
    c = ok, c.d_in = c.d_out = 1 << 30, c.d_sae = 1 << 30; expect_cfg_error(c, "too large");
    c = ok, c.arch = LP_SAE_STANDARD, c.k = 0; /* k is only read for topk and batchtopk */
    cr_expect_eq(lp_sae_cfg_check(&c), LP_OK, "%s", lp_last_error());
}

Test(sae_io, alloc_layout) {
    lp_sae_cfg c = mkcfg(LP_SAE_JUMPRELU, 16, 64, 24, 0, 0, 1);
    lp_sae *s;
    cr_assert_eq(lp_sae_alloc(&s, &c, &ctx), LP_OK, "%s", lp_last_error());
    float *b = s->mem;
    cr_expect(s->W_enc == b);
    cr_expect(s->b_enc == b + 16 * 64);
    cr_expect(s->W_dec == s->b_enc + 64);
    cr_expect(s->b_dec == s->W_dec + 64 * 24);
    cr_expect(s->threshold == s->b_dec + 24);
    cr_expect(s->W_skip == s->threshold + 64);
    cr_expect_eq(s->n_floats, (size_t)(16 * 64 + 64 + 64 * 24 + 24 + 64 + 16 * 24));
    cr_expect_eq(s->device, LP_CPU);
    for (size_t i = 0; i < s->n_floats; i++) cr_assert(b[i] == 0.0f, "not zeroed at %zu", i);
    lp_sae_free(s, &ctx);
    c = mkcfg(LP_SAE_STANDARD, 16, 64, 16, 0, 1, 0);
    cr_assert_eq(lp_sae_alloc(&s, &c, &ctx), LP_OK);
    cr_expect(s->threshold == NULL && s->W_skip == NULL);
    cr_expect_eq(s->n_floats, (size_t)(16 * 64 * 2 + 64 + 16));
    lp_sae_free(s, &ctx);
    lp_sae_free(NULL, &ctx);
}

/* ---- saving ---- */

static cJSON *read_cfg(const char *dir) {
    char p[512];
    snprintf(p, sizeof p, "%s/cfg.json", dir);
    size_t n;
    char *txt = lp_read_file(p, &n);
    cr_assert(txt != NULL, "cannot read %s", p);
    cJSON *j = cJSON_ParseWithLength(txt, n);
    free(txt);
    cr_assert(cJSON_IsObject(j), "%s: not JSON", p);
    return j;
}

static const char *jstr(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : "";
}

/* No "*.tmp*" entries in dir or in its parent. */
static void expect_no_tmp(const char *dir) {
    char parent[512];
    snprintf(parent, sizeof parent, "%s", dir);
    char *sl = strrchr(parent, '/');
    if (sl) *sl = 0;
    const char *dirs[2] = {dir, parent};
    for (int i = 0; i < 2; i++) {
        DIR *d = opendir(dirs[i]);
        if (!d) continue;
        struct dirent *e;
        while ((e = readdir(d)))
            cr_expect(strstr(e->d_name, ".tmp") == NULL, "%s: temporary %s left behind", dirs[i], e->d_name);
        closedir(d);
    }
}

static void expect_same_cfg(const lp_sae_cfg *a, const lp_sae_cfg *b, const char *what) {
    cr_expect(a->arch == b->arch && a->d_in == b->d_in && a->d_sae == b->d_sae && a->d_out == b->d_out, "%s: arch/dims", what);
    if (a->arch == LP_SAE_TOPK || a->arch == LP_SAE_BATCHTOPK) cr_expect_eq(a->k, b->k, "%s: k", what);
    cr_expect(a->apply_b_dec_to_input == b->apply_b_dec_to_input && a->skip == b->skip, "%s: flags", what);
    cr_expect_str_eq(a->model_name, b->model_name, "%s", what);
    cr_expect_str_eq(a->hook_name, b->hook_name, "%s", what);
    cr_expect_str_eq(a->hook_name_out, b->hook_name_out, "%s", what);
    cr_expect_eq(a->context_size, b->context_size, "%s", what);
    if (a->arch == LP_SAE_JUMPRELU) cr_expect(a->jumprelu_bandwidth == b->jumprelu_bandwidth, "%s: bandwidth", what);
}

Test(sae_io, round_trip_exact) {
    struct { lp_sae_cfg c; const char *arch; } cases[] = {
        {mkcfg(LP_SAE_STANDARD, 16, 64, 16, 0, 1, 0), "standard"},
        {mkcfg(LP_SAE_TOPK, 24, 48, 24, 5, 0, 0), "topk"},
        {mkcfg(LP_SAE_JUMPRELU, 32, 64, 32, 0, 1, 0), "jumprelu"},
        {mkcfg(LP_SAE_STANDARD, 16, 64, 24, 0, 0, 1), "skip_transcoder"},
        {mkcfg(LP_SAE_JUMPRELU, 16, 32, 16, 0, 0, 0), "jumprelu"}, /* hook_name_out empty below */
        {mkcfg(LP_SAE_TOPK, 16, 64, 20, 3, 0, 0), "topk_transcoder"},
        {mkcfg(LP_SAE_JUMPRELU, 16, 64, 12, 0, 0, 1), "jumprelu_skip_transcoder"},
    };
    cases[2].c.jumprelu_bandwidth = 0.001f;
    cases[2].c.context_size = 0;
    cases[2].c.model_name[0] = 0;
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        lp_sae *s = make_sae(cases[i].c, 100 + i);
        char name[32];
        snprintf(name, sizeof name, "nested/rt%zu", i);
        char *dir = in_tmp(name);
        cr_assert_eq(lp_sae_save(s, &ctx, dir, 1.0f), LP_OK, "%s", lp_last_error());
        expect_no_tmp(dir);
        cJSON *j = read_cfg(dir);
        cr_expect_str_eq(jstr(j, "architecture"), cases[i].arch, "case %zu", i);
        cr_expect_str_eq(jstr(j, "normalize_activations"), "none");
        cr_expect_str_eq(jstr(cJSON_GetObjectItemCaseSensitive(j, "metadata"), "sae_lens_version"), "6.5.3");
        cJSON_Delete(j);
        lp_sae *t = load_ok(dir);
        expect_same_cfg(&s->cfg, &t->cfg, dir);
        cr_expect(same_params(s, t), "%s: parameters changed in the round trip", dir);
        lp_sae_free(s, &ctx);
        lp_sae_free(t, &ctx);
    }
}

/* Folding a scale s: the saved SAE takes raw x. encode'(x) = encode(x s) and
 * decode'(f) = decode(f) / s, as SAELens's fold_activation_norm_scaling_factor gives; a
 * transcoder, trained to predict its raw target, keeps decode'(f) = decode(f) and
 * forward'(x) = forward(x s) (W_skip scaled). */
Test(sae_io, scale_folding) {
    lp_sae_cfg cases[] = {
        mkcfg(LP_SAE_STANDARD, 16, 64, 16, 0, 1, 0),
        mkcfg(LP_SAE_TOPK, 16, 64, 16, 4, 1, 0),
        mkcfg(LP_SAE_JUMPRELU, 16, 64, 16, 0, 1, 0),
        mkcfg(LP_SAE_STANDARD, 16, 64, 24, 0, 0, 1),
    };
    const float scales[] = {2.5f, 0.3f};
    const int N = 16;
    float *x = lp_test_rand((size_t)N * 16, 7, -1.5f, 1.5f);
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
        for (int si = 0; si < 2; si++) {
            lp_sae_cfg c = cases[i];
            snprintf(c.normalize, sizeof c.normalize, "expected_average_only_in");
            lp_sae *s = make_sae(c, 200 + i);
            char name[32];
            snprintf(name, sizeof name, "fold%zu_%d", i, si);
            char *dir = in_tmp(name);
            cr_assert_eq(lp_sae_save(s, &ctx, dir, scales[si]), LP_OK, "%s", lp_last_error());
            cJSON *j = read_cfg(dir);
            cr_expect_str_eq(jstr(j, "normalize_activations"), "none", "the folded file takes raw activations");
            cJSON_Delete(j);
            lp_sae *t = load_ok(dir);
            host_sae ho = host_copy(s), hf = host_copy(t);
            /* threshold and b_enc unchanged */
            cr_expect(memcmp(ho.s.b_enc, hf.s.b_enc, c.d_sae * sizeof(float)) == 0, "%s: b_enc changed", dir);
            if (ho.s.threshold) cr_expect(memcmp(ho.s.threshold, hf.s.threshold, c.d_sae * sizeof(float)) == 0);
            if (out_scale(&c, 2.0) == 1.0) /* a transcoder's output side is untouched */
                cr_expect(memcmp(ho.s.W_dec, hf.s.W_dec, ((size_t)c.d_sae * c.d_out + c.d_out) * sizeof(float)) == 0,
                          "%s: W_dec or b_dec changed", dir);
            double *fo = ref_encode(&ho.s, x, N, scales[si]), *ff = ref_encode(&hf.s, x, N, 1.0);
            char what[96];
            snprintf(what, sizeof what, "fold %s s=%g encode", lp_sae_arch_name(c.arch), scales[si]);
            LP_EXPECT_WITHIN(what, 200 + i, compare_d(ff, fo, (size_t)N * c.d_sae), max_rel, FOLD_MAX_REL);
            double *dO = ref_decode(&ho.s, fo, N, out_scale(&c, scales[si])), *dF = ref_decode(&hf.s, fo, N, 1.0);
            snprintf(what, sizeof what, "fold %s s=%g decode", lp_sae_arch_name(c.arch), scales[si]);
            LP_EXPECT_WITHIN(what, 200 + i, compare_d(dF, dO, (size_t)N * c.d_out), max_rel, FOLD_MAX_REL);
            double *yO = ref_forward(&ho.s, x, N, scales[si]), *yF = ref_forward(&hf.s, x, N, 1.0);
            snprintf(what, sizeof what, "fold %s s=%g forward", lp_sae_arch_name(c.arch), scales[si]);
            LP_EXPECT_WITHIN(what, 200 + i, compare_d(yF, yO, (size_t)N * c.d_out), max_rel, FOLD_MAX_REL);
            free(fo), free(ff), free(dO), free(dF), free(yO), free(yF), free(ho.img), free(hf.img);
            lp_sae_free(s, &ctx);
            lp_sae_free(t, &ctx);
        }
    free(x);
}

/* SAELens transcoders never subtract b_dec: a transcoder with apply_b_dec_to_input is
 * written with b_enc - b_dec W_enc instead, which encodes the same. */
Test(sae_io, transcoder_b_dec_folded_into_b_enc) {
    lp_sae_cfg c = mkcfg(LP_SAE_JUMPRELU, 16, 64, 16, 0, 1, 0);
    snprintf(c.hook_name_out, sizeof c.hook_name_out, "blocks.1.hook_mlp_out");
    lp_sae *s = make_sae(c, 300);
    char *dir = in_tmp("tc_apply");
    cr_assert_eq(lp_sae_save(s, &ctx, dir, 1.0f), LP_OK, "%s", lp_last_error());
    cJSON *j = read_cfg(dir);
    cr_expect_str_eq(jstr(j, "architecture"), "jumprelu_transcoder");
    cr_expect(cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(j, "apply_b_dec_to_input")));
    cJSON_Delete(j);
    lp_sae *t = load_ok(dir);
    cr_expect_eq(t->cfg.apply_b_dec_to_input, 0);
    const int N = 16;
    float *x = lp_test_rand((size_t)N * 16, 8, -1.5f, 1.5f);
    host_sae ho = host_copy(s), hf = host_copy(t);
    double *a = ref_forward(&ho.s, x, N, 1.0), *b = ref_forward(&hf.s, x, N, 1.0);
    LP_EXPECT_WITHIN("transcoder b_dec fold forward", 300, compare_d(b, a, (size_t)N * 16), max_rel, FOLD_MAX_REL);
    free(a), free(b), free(x), free(ho.img), free(hf.img);
    lp_sae_free(s, &ctx);
    lp_sae_free(t, &ctx);
}

Test(sae_io, batchtopk_saves_as_jumprelu) {
    lp_sae_cfg c = mkcfg(LP_SAE_BATCHTOPK, 16, 64, 16, 4, 1, 0);
    lp_sae *s = make_sae(c, 400);
    host_sae h = host_copy(s);
    /* the global threshold lives in threshold[0]; the rest is ignored on save */
    h.s.threshold[0] = 0.625f;
    cr_assert_eq(lp_ctx_to_device(&ctx, s->mem, h.img, s->n_floats * sizeof(float)), LP_OK);
    char *dir = in_tmp("btk");
    cr_assert_eq(lp_sae_save(s, &ctx, dir, 1.0f), LP_OK, "%s", lp_last_error());
    cJSON *j = read_cfg(dir);
    cr_expect_str_eq(jstr(j, "architecture"), "jumprelu");
    cr_expect(cJSON_GetObjectItemCaseSensitive(j, "k") == NULL, "SAELens's JumpReLU config has no k");
    cJSON_Delete(j);
    lp_sae *t = load_ok(dir);
    cr_expect_eq(t->cfg.arch, LP_SAE_JUMPRELU);
    host_sae g = host_copy(t);
    for (int i = 0; i < 64; i++) cr_expect(g.s.threshold[i] == 0.625f, "threshold[%d] = %g", i, (double)g.s.threshold[i]);
    cr_expect(memcmp(g.img, h.img, (s->n_floats - 64) * sizeof(float)) == 0, "W_enc, b_enc, W_dec, b_dec changed");
    /* the exported JumpReLU keeps the latents whose pre-activation passes the threshold */
    const int N = 8;
    float *x = lp_test_rand((size_t)N * 16, 9, -1.5f, 1.5f);
    h.s.cfg.arch = LP_SAE_JUMPRELU;
    for (int i = 1; i < 64; i++) h.s.threshold[i] = 0.625f;
    double *a = ref_encode(&h.s, x, N, 1.0), *b = ref_encode(&g.s, x, N, 1.0);
    LP_EXPECT_WITHIN("batchtopk as jumprelu", 400, compare_d(b, a, (size_t)N * 64), max_abs, 0);
    free(a), free(b), free(x), free(h.img), free(g.img);
    lp_sae_free(s, &ctx);
    lp_sae_free(t, &ctx);
}

/* The committed loupe_written/: (a) a fresh save of the same fixed SAEs reproduces it;
 * (b) SAELens, loading it, computed what loupe's unfolded SAE computes on x * scale. */
typedef struct written_case {
    const char *name;
    lp_sae_cfg cfg;
    float scale;
    uint64_t seed;
} written_case;

static lp_sae *written_sae(const written_case *w) {
    lp_sae *s = make_sae(w->cfg, w->seed);
    if (w->cfg.arch == LP_SAE_BATCHTOPK) {
        host_sae h = host_copy(s);
        for (int i = 0; i < w->cfg.d_sae; i++) h.s.threshold[i] = 0.6f;
        cr_assert_eq(lp_ctx_to_device(&ctx, s->mem, h.img, s->n_floats * sizeof(float)), LP_OK);
        free(h.img);
    }
    return s;
}

static int files_equal(const char *a, const char *b) {
    size_t na, nb;
    char *x = lp_read_file(a, &na), *y = lp_read_file(b, &nb);
    int eq = x && y && na == nb && memcmp(x, y, na) == 0;
    free(x), free(y);
    return eq;
}

Test(sae_io, loupe_written) {
    written_case cases[5] = {
        {"standard", mkcfg(LP_SAE_STANDARD, 16, 64, 16, 0, 1, 0), 2.5f, 500},
        {"topk", mkcfg(LP_SAE_TOPK, 16, 64, 16, 4, 1, 0), 0.75f, 510},
        {"batchtopk", mkcfg(LP_SAE_BATCHTOPK, 16, 64, 16, 4, 0, 0), 1.5f, 520},
        {"skip_transcoder", mkcfg(LP_SAE_STANDARD, 16, 64, 24, 0, 0, 1), 4.0f, 530},
        {"jumprelu_transcoder", mkcfg(LP_SAE_JUMPRELU, 16, 64, 16, 0, 1, 0), 1.5f, 540},
    };
    snprintf(cases[0].cfg.normalize, sizeof cases[0].cfg.normalize, "expected_average_only_in");
    snprintf(cases[4].cfg.hook_name, sizeof cases[4].cfg.hook_name, "blocks.0.ln2.hook_normalized");
    snprintf(cases[4].cfg.hook_name_out, sizeof cases[4].cfg.hook_name_out, "blocks.0.hook_mlp_out");
    snprintf(cases[3].cfg.hook_name, sizeof cases[3].cfg.hook_name, "blocks.1.ln2.hook_normalized");
    const char *w = getenv("LOUPE_WRITE_SAE_FIXTURE");
    int write = w && strcmp(w, "1") == 0;
    lp_st_file ref = {0};
    if (!write) {
        lp_status st = lp_st_open(&ref, SAE_FIX "/loupe_written/reference.safetensors");
        cr_assert_eq(st, LP_OK, "%s (regenerate: python3 tests/gen/gen_sae_fixture.py tests/fixtures/sae --loupe-test build/test_sae_io)",
                     lp_last_error());
    }
    for (int i = 0; i < 5; i++) {
        lp_sae *s = written_sae(&cases[i]);
        char committed[256];
        snprintf(committed, sizeof committed, "%s/loupe_written/%s", SAE_FIX, cases[i].name);
        if (write) {
            cr_assert_eq(lp_sae_save(s, &ctx, committed, cases[i].scale), LP_OK, "%s", lp_last_error());
            fprintf(stderr, "  wrote %s\n", committed);
            lp_sae_free(s, &ctx);
            continue;
        }
        /* (a) byte-identical weights, the same cfg.json */
        char *fresh = in_tmp(cases[i].name), a[512], b[512];
        cr_assert_eq(lp_sae_save(s, &ctx, fresh, cases[i].scale), LP_OK, "%s", lp_last_error());
        snprintf(a, sizeof a, "%s/sae_weights.safetensors", fresh);
        snprintf(b, sizeof b, "%s/sae_weights.safetensors", committed);
        cr_expect(files_equal(a, b), "%s differs from %s", a, b);
        cJSON *ja = read_cfg(fresh), *jb = read_cfg(committed);
        cr_expect(cJSON_Compare(ja, jb, 1), "%s/cfg.json differs from %s/cfg.json", fresh, committed);
        cJSON_Delete(ja), cJSON_Delete(jb);
        /* (b) SAELens's outputs on the committed files = the unfolded SAE on x * scale */
        host_sae h = host_copy(s);
        if (h.s.cfg.arch == LP_SAE_BATCHTOPK) h.s.cfg.arch = LP_SAE_JUMPRELU; /* as exported */
        expect_outputs(&ref, cases[i].name, &h.s, cases[i].scale, FOLD_MAX_REL);
        /* and loupe reads its own file back to the same function */
        lp_sae *t = load_ok(committed);
        host_sae g = host_copy(t);
        expect_outputs(&ref, cases[i].name, &g.s, 1.0, REF_MAX_REL);
        free(h.img), free(g.img);
        lp_sae_free(t, &ctx);
        lp_sae_free(s, &ctx);
    }
    if (!write) lp_st_close(&ref);
}

Test(sae_io, save_replaces_atomically) {
    char *dir = in_tmp("replace");
    lp_sae *a = make_sae(mkcfg(LP_SAE_TOPK, 16, 64, 16, 4, 1, 0), 600);
    lp_sae *b = make_sae(mkcfg(LP_SAE_JUMPRELU, 16, 32, 16, 0, 0, 0), 601);
    cr_assert_eq(lp_sae_save(a, &ctx, dir, 1.0f), LP_OK, "%s", lp_last_error());
    char notes[512];
    snprintf(notes, sizeof notes, "%s/notes.txt", dir);
    FILE *fp = fopen(notes, "w");
    cr_assert(fp);
    fputs("kept\n", fp);
    fclose(fp);
    cr_assert_eq(lp_sae_save(b, &ctx, dir, 1.0f), LP_OK, "%s", lp_last_error());
    expect_no_tmp(dir);
    cr_expect(access(notes, F_OK) == 0, "save removed a file it does not own");
    lp_sae *t = load_ok(dir);
    cr_expect_eq(t->cfg.arch, LP_SAE_JUMPRELU);
    cr_expect(same_params(b, t));
    lp_sae_free(t, &ctx);
    /* a failed save leaves nothing under the final name */
    host_sae h = host_copy(b);
    h.s.W_dec[5] = NAN;
    cr_assert_eq(lp_ctx_to_device(&ctx, b->mem, h.img, b->n_floats * sizeof(float)), LP_OK);
    char *bad = in_tmp("never");
    cr_expect_eq(lp_sae_save(b, &ctx, bad, 1.0f), LP_ERR_ARG);
    cr_expect(strstr(lp_last_error(), "W_dec") && strstr(lp_last_error(), "non-finite"), "%s", lp_last_error());
    cr_expect(access(bad, F_OK) != 0, "a failed save created %s", bad);
    cr_expect_eq(lp_sae_save(a, &ctx, in_tmp("x"), 0.0f), LP_ERR_ARG);
    cr_expect(strstr(lp_last_error(), "scale") != NULL, "%s", lp_last_error());
    cr_expect_eq(lp_sae_save(a, &ctx, in_tmp("x"), INFINITY), LP_ERR_ARG);
    /* the parent is a file */
    char *file = in_tmp("afile");
    fp = fopen(file, "w");
    fclose(fp);
    char under[512];
    snprintf(under, sizeof under, "%s/sae", file);
    cr_expect_eq(lp_sae_save(a, &ctx, under, 1.0f), LP_ERR_IO);
    cr_expect(strstr(lp_last_error(), "afile") != NULL, "%s", lp_last_error());
    cr_expect_eq(lp_sae_save(a, &ctx, file, 1.0f), LP_ERR_IO);
    expect_no_tmp(in_tmp("x"));
    free(h.img);
    lp_sae_free(a, &ctx);
    lp_sae_free(b, &ctx);
}
