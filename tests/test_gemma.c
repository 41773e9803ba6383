/* test_gemma.c: loupe's Gemma 2 and Gemma 3 on the CPU (F32) against TransformerLens 3.9 and
 * Hugging Face transformers in float64: logits, loss, every hook and the loss's gradient at
 * every hook.
 *
 * Fixtures (tests/gen/gen_gemma_fixture.py, pinned in tests/gen/requirements-gemma.txt):
 *   gemma2-tiny  Gemma2ForCausalLM, 3 layers (sliding, full, sliding), GQA 4/2, head_dim 8
 *                (d_model 36), sliding window 4 < the 9 tokens of a row, attention-logit
 *                soft-cap 2 and final-logit soft-cap 3, query_pre_attn_scalar 12, tied
 *   gemma3-tiny  Gemma3ForCausalLM (gemma3_text), 6 layers in the 5 local : 1 global pattern,
 *                q/k RMSNorm, window 4, rope theta 1e4 local / 1e6 global, no soft-caps,
 *                query_pre_attn_scalar 10, tied
 * Each directory holds the checkpoint (save_pretrained, float32) and reference.safetensors:
 * `tokens` [2, 9], `logits` (HF float64, soft-capped), `loss` (mean next-token loss over the
 * 2 x 8 predictions), every hook TransformerLens's HookedTransformer fires in a default
 * forward (no weight processing), and `grad.<hook>`, the gradient of that mean loss there.
 *
 * The hook set is TransformerLens's exactly, both ways: per block the Llama set plus
 * ln1_post and ln2_post (Gemma's norms after attention and after the MLP, hook_scale and
 * hook_normalized), and for Gemma 3 attn.q_norm and attn.k_norm. TransformerLens soft-caps
 * the final logits AFTER unembed.hook_out: the hook holds them uncapped, `logits` capped.
 * Its attn.hook_attn_scores are after the attention soft-cap, masked with -inf outside the
 * causal sliding window.
 *
 * Where TransformerLens flattens: it applies q_norm and k_norm to q and k reshaped to
 * [B*T*H, d_head], so attn.q_norm.hook_scale / hook_normalized (and k_norm's, with the kv
 * heads) are [B*T*H, 1] / [B*T*H, d_head] there. loupe keeps them [B, T, H, 1] /
 * [B, T, H, d_head], the same elements in the same order (batch, position, head), and the
 * comparison is of the flattened values (shapes: leading dims B, T, H whose product is
 * TransformerLens's first).
 *
 * Budgets (tests/testutil.h metrics), as test_tl.c / test_tf5.c / test_attrib.c:
 *   logits max_rel <= 1e-4, hook values nmse <= 1e-9 (-inf masked scores exactly), loss abs
 *   <= 1e-4, gradients nmse <= 1e-9. TransformerLens's own float32 run of these checkpoints
 *   against the same float64 reference: logits max_rel 9.7e-7 (gemma2) and 1.9e-7 (gemma3),
 *   hooks nmse <= 1.4e-13, loss 5e-7, gradients nmse <= 1.2e-11.
 * Gradients are loupe's of the sum over rows of each row's mean loss (LP_METRIC_MEAN_LOSS,
 * attrib.h), B times the fixture's (all rows have T - 1 predictions); compared divided by B.
 * At attn.hook_pattern the entries outside the window (scores -inf) are left out: the pattern
 * is 0 there whatever its gradient (TransformerLens's is grad_z . v, not zero).
 *
 * ln1's gradients: TransformerLens applies ln1 three times (to the query, key and value
 * inputs), so blocks.L.ln1.hook_normalized and ln1.hook_scale fire three times, and the
 * fixture's grad.blocks.L.ln1.* hold the last backward call's gradient, the query path's
 * alone (ln1_fixture_gradient_is_the_query_path checks it; in Gemma 3, where q_norm makes q
 * blind to ln1's scale, that gradient at hook_scale is ~1e-8). loupe's is the loss's whole
 * gradient there, and it is compared, at the same nmse budget, with the whole gradient formed
 * from the fixture's gradients at attn.hook_q, hook_k and hook_v and the checkpoint's
 * projections (gemma_test.h ln1_grad_reference; it matches torch autograd's sum of the three
 * calls to max_rel 9e-8; TransformerLens float32's sum is within nmse 1.4e-12 of it).
 */
#include "gemma_test.h"

/* ---- configuration and the hook set ---- */

static void config_matches(const tiny *f) {
    lp_model *m = load(f, LP_CPU);
    const lp_config *c = lp_model_config(m);
    cr_expect(c->n_layers == f->n_layers && c->d_model == D_MODEL && c->n_heads == N_HEADS && c->n_kv_heads == N_KV &&
                  c->d_head == D_HEAD && c->d_mlp == D_MLP && c->n_ctx == N_CTX && c->d_vocab == D_VOCAB,
              "%s: layers %d d_model %d heads %d/%d d_head %d d_mlp %d n_ctx %d vocab %d", f->name, c->n_layers, c->d_model,
              c->n_heads, c->n_kv_heads, c->d_head, c->d_mlp, c->n_ctx, c->d_vocab);
    cr_expect(c->tied_unembed, "%s: tied embeddings", f->name);
    cr_expect(fabsf(c->ln_eps - 1e-6f) <= 1e-9f, "%s: ln_eps %g", f->name, c->ln_eps);
    /* hook_embed, per block TransformerLens's Gemma hooks, ln_final scale and normalized, unembed in and out */
    cr_expect_eq(lp_hook_count(m), 1 + f->hooks_per_block * f->n_layers + 4, "%s: %d hooks", f->name, lp_hook_count(m));
    lp_model_free(m);
}

Test(gemma, config_gemma2_tiny) { config_matches(&GEMMA2); }
Test(gemma, config_gemma3_tiny) { config_matches(&GEMMA3); }

/* Every TransformerLens hook is a loupe hook and every loupe hook a TransformerLens one. */
static void same_hooks(const tiny *f) {
    lp_st_file ref;
    open_ref(&ref, f);
    lp_model *m = load(f, LP_CPU);
    int n_tl = 0;
    for (int i = 0; i < ref.n; i++) {
        const char *k = ref.tensors[i].name;
        if (is_meta_key(k)) continue;
        n_tl++;
        cr_expect(lp_hook_find(m, k) >= 0, "%s: TransformerLens fires %s, loupe has no such hook", f->name, k);
        char g[192];
        snprintf(g, sizeof g, "grad.%s", k);
        cr_expect(lp_st_find(&ref, g) != NULL, "%s: the fixture has no %s", f->name, g);
    }
    for (int id = 0; id < lp_hook_count(m); id++)
        cr_expect(lp_st_find(&ref, lp_hook_name(m, id)) != NULL, "%s: loupe has %s, TransformerLens does not fire it", f->name,
                  lp_hook_name(m, id));
    cr_expect_eq(n_tl, lp_hook_count(m), "%s: TransformerLens fired %d hooks, loupe has %d", f->name, n_tl, lp_hook_count(m));
    cr_expect_eq(n_tl, 1 + f->hooks_per_block * f->n_layers + 4, "%s: the fixture has %d hooks", f->name, n_tl);
    lp_model_free(m);
    lp_st_close(&ref);
}

Test(gemma, hooks_are_transformer_lens_gemma2_tiny) { same_hooks(&GEMMA2); }
Test(gemma, hooks_are_transformer_lens_gemma3_tiny) { same_hooks(&GEMMA3); }

Test(gemma, parity_gemma2_tiny) { parity(&GEMMA2, LP_CPU); }
Test(gemma, parity_gemma3_tiny) { parity(&GEMMA3, LP_CPU); }

Test(gemma, gradients_gemma2_tiny) { gradients(&GEMMA2, LP_CPU); }
Test(gemma, gradients_gemma3_tiny) { gradients(&GEMMA3, LP_CPU); }

/* Why ln1's reference gradients are formed rather than read: the fixture's are the query
 * path's alone, (1 + w) W_Q^T g_q, and far from the whole gradient. */
static void ln1_query_path(const tiny *f) {
    lp_st_file ref;
    open_ref(&ref, f);
    const lp_st_tensor *tok = R(&ref, "tokens");
    size_t N = (size_t)tok->shape[0] * tok->shape[1];
    double *dn = malloc(N * D_MODEL * sizeof(double)), *ds = malloc(N * sizeof(double));
    cr_assert(dn && ds);
    for (int L = 0; L < f->n_layers; L++) {
        char k[96], what[128];
        snprintf(k, sizeof k, "grad.blocks.%d.ln1.hook_normalized", L);
        const float *fixture = R(&ref, k)->data;
        ln1_grad_reference(f, &ref, L, 1, dn, ds, N);
        snprintf(what, sizeof what, "%s %s = the query path", f->name, k);
        LP_EXPECT_WITHIN(what, 0, lp_compare(fixture, dn, N * D_MODEL), nmse, 1e-12);
        ln1_grad_reference(f, &ref, L, 0, dn, ds, N);
        lp_cmp c = lp_compare(fixture, dn, N * D_MODEL);
        cr_expect_gt(c.nmse, 1e-2, "%s: %s is the whole gradient (nmse %.3e)", f->name, k, c.nmse);
    }
    free(dn), free(ds);
    lp_st_close(&ref);
}

Test(gemma, ln1_fixture_gradient_is_the_query_path_gemma2) { ln1_query_path(&GEMMA2); }
Test(gemma, ln1_fixture_gradient_is_the_query_path_gemma3) { ln1_query_path(&GEMMA3); }

/* ---- the final soft-cap sits after unembed.hook_out ---- */

/* The fixture tells capped from uncapped logits (cap 3 bends them far beyond the budget). */
Test(gemma, final_softcap_is_discriminated) {
    lp_st_file ref;
    open_ref(&ref, &GEMMA2);
    const lp_st_tensor *out = R(&ref, "unembed.hook_out"), *lg = R(&ref, "logits");
    lp_cmp c = lp_compare_f(out->data, lg->data, lg->nbytes / 4);
    cr_expect_gt(c.max_rel, 100 * LOGITS_MAX_REL, "gemma2-tiny: unembed.hook_out and the capped logits agree (max_rel %.3e)",
                 c.max_rel);
    lp_st_close(&ref);
}

/* Steering gemma2's unembed.hook_out by v (TransformerLens: before the cap) gives logits
 * 3 tanh((uncapped + v) / 3), and the loss of those (computed here in double). */
Test(gemma, steer_before_the_final_softcap) {
    lp_st_file ref;
    open_ref(&ref, &GEMMA2);
    lp_model *m = load(&GEMMA2, LP_CPU);
    const lp_st_tensor *tok = R(&ref, "tokens"), *out = R(&ref, "unembed.hook_out");
    int B = (int)tok->shape[0], T = (int)tok->shape[1], V = D_VOCAB;
    const double cap = 3.0;
    float *v = lp_test_rand(V, 23, -2, 2);
    lp_edit_spec e = {.kind = LP_EDIT_ADD, .src = v, .src_len = V, .coef = 1.0f};
    cr_assert_eq(lp_hook_edit(m, "unembed.hook_out", &e), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_hook_capture(m, "unembed.hook_out", NULL, 0, NULL), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_model_forward(m, tok->data, B, T, LP_WANT_LOSS | LP_WANT_LOGITS), LP_OK, "%s", lp_last_error());
    size_t n = (size_t)B * T * V;
    double *hook = malloc(n * sizeof(double)), *want = malloc(n * sizeof(double)), loss = 0;
    const float *u = out->data;
    const int32_t *ids = tok->data;
    for (size_t i = 0; i < n; i++) hook[i] = (double)u[i] + v[i % V], want[i] = cap * tanh(hook[i] / cap);
    for (int b = 0; b < B; b++)
        for (int t = 0; t + 1 < T; t++) {
            const double *row = want + ((size_t)b * T + t) * V;
            double mx = -INFINITY, z = 0;
            for (int k = 0; k < V; k++) mx = fmax(mx, row[k]);
            for (int k = 0; k < V; k++) z += exp(row[k] - mx);
            loss += mx + log(z) - row[ids[b * T + t + 1]];
        }
    loss /= B * (T - 1);
    lp_tensor t;
    cr_assert_eq(lp_capture_get(m, "unembed.hook_out", &t), LP_OK, "%s", lp_last_error());
    LP_EXPECT_WITHIN("gemma2-tiny steered unembed.hook_out", 23, lp_compare(t.data, hook, n), nmse, HOOK_NMSE);
    LP_EXPECT_WITHIN("gemma2-tiny steered logits (capped)", 23, lp_compare(lp_model_logits(m), want, n), max_rel, LOGITS_MAX_REL);
    double got = mean_loss(m, B, T), plain = *(const float *)R(&ref, "loss")->data;
    fprintf(stderr, "  %-40s loss %.6f, expected %.6f (unsteered %.6f)\n", "gemma2-tiny steered", got, loss, plain);
    cr_expect(fabs(got - loss) <= LOSS_ABS, "gemma2-tiny steered: loss %.6f, expected %.6f", got, loss);
    cr_expect(fabs(plain - loss) > 100 * LOSS_ABS, "the steer does not move the loss (%.6f vs %.6f)", plain, loss);
    free(hook), free(want), free(v);
    lp_model_free(m);
    lp_st_close(&ref);
}

/* ---- generation with the KV cache across the sliding window ---- */

typedef struct step_logits {
    float *rows; /* [n_new, V] */
    int V, n;
} step_logits;

static lp_status keep_logits(int step, const float *logits, int n_vocab, void *user) {
    step_logits *s = user;
    if (n_vocab != s->V) return LP_ERR(LP_ERR_SHAPE, "on_logits: %d logits, the model has %d", n_vocab, s->V);
    memcpy(s->rows + (size_t)step * s->V, logits, (size_t)n_vocab * sizeof(float));
    s->n = step + 1;
    return LP_OK;
}

/* Greedy generation with the cache, 3 window lengths past the prompt, picks what full
 * forwards over the growing sequence pick (those are the forwards checked against HF
 * above), from logits within the logits budget of theirs: the cache must drop keys that
 * leave a local layer's window and keep them on global layers. */
static void generate_matches_forwards(const tiny *f) {
    lp_st_file ref;
    open_ref(&ref, f);
    lp_model *m = load(f, LP_CPU);
    const lp_st_tensor *tok = R(&ref, "tokens");
    enum { N_NEW = 16 };
    int P = (int)tok->shape[1], V = lp_model_config(m)->d_vocab;
    int32_t seq[64], out[N_NEW];
    memcpy(seq, tok->data, P * sizeof(int32_t));
    step_logits s = {.rows = malloc((size_t)N_NEW * V * sizeof(float)), .V = V};
    int n_out = 0;
    lp_gen_opts o = {.max_tokens = N_NEW, .temperature = 0.0f, .top_p = 1.0f, .seed = 1, .stop_token = -1,
                     .on_logits = keep_logits, .user = &s};
    cr_assert_eq(lp_generate(m, seq, P, &o, out, &n_out), LP_OK, "%s: %s", f->name, lp_last_error());
    cr_assert_eq(n_out, N_NEW);
    cr_assert_eq(s.n, N_NEW);
    for (int k = 0; k < N_NEW; k++) {
        int n = P + k;
        cr_assert_eq(lp_model_forward(m, seq, 1, n, LP_WANT_LOGITS), LP_OK, "%s", lp_last_error());
        const float *last = lp_model_logits(m) + (size_t)(n - 1) * V;
        int a = 0, b = -1;
        for (int i = 1; i < V; i++)
            if (last[i] > last[a]) a = i;
        for (int i = 0; i < V; i++)
            if (i != a && (b < 0 || last[i] > last[b])) b = i;
        char what[96];
        snprintf(what, sizeof what, "%s step %d (%d tokens) cached logits", f->name, k, n);
        LP_EXPECT_WITHIN(what, 0, lp_compare_f(s.rows + (size_t)k * V, last, V), max_rel, LOGITS_MAX_REL);
        /* a near-tie could flip on summation order; there is none here (HF float64 on this
         * continuation: smallest top-1 margin 0.014 for gemma2-tiny, whose cap keeps the
         * logits within +-3, and 1.8 for gemma3-tiny) */
        cr_assert_gt(last[a] - last[b], 1e-3f, "%s: step %d is a near-tie (%g)", f->name, k, last[a] - last[b]);
        cr_expect_eq(out[k], a, "%s: step %d: generated %d, full forward's argmax %d", f->name, k, out[k], a);
        seq[n] = a;
    }
    free(s.rows);
    lp_model_free(m);
    lp_st_close(&ref);
}

Test(gemma, generate_matches_forwards_gemma2_tiny) { generate_matches_forwards(&GEMMA2); }
Test(gemma, generate_matches_forwards_gemma3_tiny) { generate_matches_forwards(&GEMMA3); }
