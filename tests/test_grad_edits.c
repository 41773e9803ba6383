/* test_grad_edits.c: gradients through an edited forward, and gradients that must not be
 * read after a run that did not produce them, on the CPU.
 *   edits        with zero-ablation, mean-ablation, patching and steering registered, the
 *                backward's gradient at hooks at and upstream of the edits matches central
 *                differences of the edited forward's metric; where an edit replaced the
 *                value, what lies only upstream of it gets exactly zero
 *   norm scales  a frozen (patched) or steered hook_scale, and a direction metric entering at
 *                a scale or a normalized value, against central differences (LayerNorm and RMSNorm)
 *   callbacks    a callback's Jacobian is unknown: gradients below it are refused by name
 *                unless the edit declares it (identity or stop), then they match differences
 *   stale        a hook the last backward did not reach, did not ask for, or a failed run,
 *                is an error naming the hook, never an older run's gradient
 *   attribution  refuses edits it would discard; a direction metric's upper layers score 0
 * The same gradients on the GPU against the CPU's: test_grad_edits_cuda.c. */
#include "loupe/attrib.h"
#include "loupe/hooks.h"
#include "testutil.h"

static lp_model *load(const char *dir) {
    lp_model *m;
    cr_assert_eq(lp_model_load(&m, dir, LP_CPU, LP_F32), LP_OK, "%s", lp_last_error());
    return m;
}

static void tokens(int32_t *t, int n, int V, uint64_t seed) {
    for (int i = 0; i < n; i++) t[i] = (int32_t)(lp_test_next(&seed) % (uint64_t)V);
}

enum { B = 2, T = 9 };

/* One registered edit of the scenario under test. */
typedef struct uedit {
    const char *hook;
    lp_edit_spec spec;
} uedit;

static void register_edits(lp_model *m, const uedit *ed, int ne) {
    lp_hooks_clear(m);
    for (int i = 0; i < ne; i++) cr_assert_eq(lp_hook_edit(m, ed[i].hook, &ed[i].spec), LP_OK, "%s", lp_last_error());
}

/* The sum over rows of the metric of the edited forward with `name` (after its edits) set to
 * act + delta at flat index i. */
static double metric_with(lp_model *m, const int32_t *tok, const lp_metric *mt, const uedit *ed, int ne, const char *name, const float *act,
                          size_t n, size_t i, float delta) {
    float *src = malloc(n * sizeof(float));
    memcpy(src, act, n * sizeof(float));
    src[i] += delta;
    register_edits(m, ed, ne);
    lp_edit_spec e = {.kind = LP_EDIT_PATCH, .src = src, .src_len = n};
    cr_assert_eq(lp_hook_edit(m, name, &e), LP_OK, "%s", lp_last_error());
    double met[B], sum = 0;
    cr_assert_eq(lp_model_metric(m, tok, B, T, mt, met), LP_OK, "%s", lp_last_error());
    for (int b = 0; b < B; b++) sum += met[b];
    free(src);
    return sum;
}

/* A hook's activation in a run of tok (no edits), F32 copy of n floats. */
static float *capture_of(lp_model *m, const int32_t *tok, const lp_metric *mt, const char *hook, size_t *n) {
    lp_hooks_clear(m);
    cr_assert_eq(lp_hook_capture(m, hook, NULL, 0, NULL), LP_OK, "%s", lp_last_error());
    double met[B];
    cr_assert_eq(lp_model_metric(m, tok, B, T, mt, met), LP_OK, "%s", lp_last_error());
    lp_tensor a;
    cr_assert_eq(lp_capture_get(m, hook, &a), LP_OK);
    *n = (size_t)lp_shape_numel(a.shape, a.ndim);
    float *v = malloc(*n * sizeof(float));
    memcpy(v, a.data, *n * sizeof(float));
    lp_hooks_clear(m);
    return v;
}

/* The backward's gradient at `hook` under the edits, checked against central differences at
 * its largest entries and at random ones; returned (n floats) for the caller's own checks. */
static float *fd_check(lp_model *m, const char *label, const int32_t *tok, const lp_metric *mt, const uedit *ed, int ne, const char *hook,
                       size_t *n_out) {
    register_edits(m, ed, ne);
    cr_assert_eq(lp_hook_capture(m, hook, NULL, 0, NULL), LP_OK, "%s", lp_last_error());
    double met[B];
    cr_assert_eq(lp_model_grad(m, tok, B, T, mt, hook, met), LP_OK, "%s", lp_last_error());
    lp_tensor a, g;
    cr_assert_eq(lp_capture_get(m, hook, &a), LP_OK);
    cr_assert_eq(lp_grad_get(m, hook, &g), LP_OK, "%s", lp_last_error());
    size_t n = (size_t)lp_shape_numel(a.shape, a.ndim);
    float *act = malloc(n * sizeof(float)), *grad = malloc(n * sizeof(float));
    memcpy(act, a.data, n * sizeof(float));
    memcpy(grad, g.data, n * sizeof(float));
    double gmax = 0, worst = 0, fdmax = 0;
    for (size_t i = 0; i < n; i++) gmax = fmax(gmax, fabs(grad[i]));
    uint64_t s = 1234 + n;
    for (int k = 0; k < 16; k++) {
        size_t i = 0;
        if (k < 4) {
            for (size_t j = 0; j < n; j++)
                if (fabs(grad[j]) > fabs(grad[i]) && (k == 0 || fabs(grad[j]) < gmax * (1 - 0.1 * k))) i = j;
        } else {
            i = (size_t)(lp_test_next(&s) % n);
        }
        if (strstr(hook, "hook_pattern") && act[i] == 0) continue; /* masked entries */
        float d = 1e-2f * fmaxf(1.0f, fabsf(act[i]));
        double fd = (metric_with(m, tok, mt, ed, ne, hook, act, n, i, d) - metric_with(m, tok, mt, ed, ne, hook, act, n, i, -d)) / (2.0 * d);
        fdmax = fmax(fdmax, fabs(fd));
        worst = fmax(worst, fabs(fd - grad[i]) / fmax(gmax, 1e-3));
    }
    printf("  %-26s %-28s max |fd - grad| / max |grad| %.2e of 2e-2 (max |grad| %.2e)\n", label, hook, worst, gmax);
    cr_expect_leq(worst, 2e-2, "%s, %s: finite differences disagree (%.3e)", label, hook, worst);
    lp_hooks_clear(m);
    free(act);
    *n_out = n;
    return grad;
}

/* max |g| over the entries of a [B, T, H, E] (H = 1 for [B, T, E]) gradient whose position is
 * in pos (NULL: all) and head in heads (NULL: all); `inside` 0: over the other entries. */
static double max_where(const float *g, int H, size_t E, const int *pos, int npos, const int *heads, int nheads, int inside) {
    double mx = 0;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < H; h++) {
                int in_p = !pos, in_h = !heads;
                for (int i = 0; pos && i < npos; i++) in_p |= pos[i] == t;
                for (int i = 0; heads && i < nheads; i++) in_h |= heads[i] == h;
                if ((in_p && in_h) != inside) continue;
                for (size_t e = 0; e < E; e++) mx = fmax(mx, fabs(g[(((size_t)b * T + t) * H + h) * E + e]));
            }
    return mx;
}

static lp_metric logit_diff(int32_t *ans, int32_t *wr, int V) {
    tokens(ans, B, V, 12);
    tokens(wr, B, V, 13);
    return (lp_metric){.kind = LP_METRIC_LOGIT_DIFF, .answer = ans, .wrong = wr};
}

/* Zero-ablating head 1 of blocks.0.attn.hook_z at positions 2 and 5: the query of that head
 * at those positions reaches the metric through nothing else. (Layer 0: in the last layer
 * only the position the metric reads matters.) */
Test(grad_edits, zero_ablated_heads_at_positions_gpt2) {
    lp_model *m = load(LP_FIXTURES "/gpt2-tiny");
    const lp_config *c = lp_model_config(m);
    int32_t tok[B * T], ans[B], wr[B];
    tokens(tok, B * T, c->d_vocab, 11);
    lp_metric mt = logit_diff(ans, wr, c->d_vocab);
    int pos[] = {2, 5}, heads[] = {1};
    uedit ed[] = {{"blocks.0.attn.hook_z", {.kind = LP_EDIT_ZERO, .pos = pos, .npos = 2, .heads = heads, .nheads = 1}}};
    const char *hooks[] = {"blocks.0.attn.hook_z", "blocks.0.attn.hook_v", "blocks.0.hook_resid_pre", "hook_embed"};
    for (int h = 0; h < 4; h++) {
        size_t n;
        free(fd_check(m, "zero z[pos 2,5; head 1]", tok, &mt, ed, 1, hooks[h], &n));
    }
    size_t n;
    float *gq = fd_check(m, "zero z[pos 2,5; head 1]", tok, &mt, ed, 1, "blocks.0.attn.hook_q", &n);
    double in = max_where(gq, c->n_heads, c->d_head, pos, 2, heads, 1, 1), out = max_where(gq, c->n_heads, c->d_head, pos, 2, heads, 1, 0);
    printf("  blocks.0.attn.hook_q: max |grad| at the ablated (pos, head) %.2e, elsewhere %.2e\n", in, out);
    cr_expect_eq(in, 0.0, "the gradient passed a zero-ablation");
    cr_expect_gt(out, 0.0);
    free(gq);
    lp_model_free(m);
}

/* Patching blocks.0.hook_resid_post at position 3 with another run's value: resid_mid at
 * position 3 reaches the metric only through it. */
Test(grad_edits, patched_resid_at_one_position_gpt2) {
    lp_model *m = load(LP_FIXTURES "/gpt2-tiny");
    const lp_config *c = lp_model_config(m);
    int32_t tok[B * T], other[B * T], ans[B], wr[B];
    tokens(tok, B * T, c->d_vocab, 11);
    tokens(other, B * T, c->d_vocab, 17);
    lp_metric mt = logit_diff(ans, wr, c->d_vocab);
    size_t ns;
    float *src = capture_of(m, other, &mt, "blocks.0.hook_resid_post", &ns);
    int pos[] = {3};
    uedit ed[] = {{"blocks.0.hook_resid_post", {.kind = LP_EDIT_PATCH, .src = src, .src_len = ns, .pos = pos, .npos = 1}}};
    const char *hooks[] = {"blocks.0.hook_resid_post", "blocks.0.attn.hook_z", "hook_embed"};
    size_t n;
    for (int h = 0; h < 3; h++) free(fd_check(m, "patch resid_post[pos 3]", tok, &mt, ed, 1, hooks[h], &n));
    float *g = fd_check(m, "patch resid_post[pos 3]", tok, &mt, ed, 1, "blocks.0.hook_resid_mid", &n);
    double in = max_where(g, 1, c->d_model, pos, 1, NULL, 0, 1), out = max_where(g, 1, c->d_model, pos, 1, NULL, 0, 0);
    printf("  blocks.0.hook_resid_mid: max |grad| at position 3 %.2e, elsewhere %.2e\n", in, out);
    cr_expect_eq(in, 0.0, "the gradient passed a patch");
    cr_expect_gt(out, 0.0);
    free(g), free(src);
    lp_model_free(m);
}

/* A steer passes the gradient; a mean ablation of a whole MLP's output stops all of it. */
Test(grad_edits, steered_resid_and_mean_ablated_mlp_gpt2) {
    lp_model *m = load(LP_FIXTURES "/gpt2-tiny");
    const lp_config *c = lp_model_config(m);
    int32_t tok[B * T], ans[B], wr[B];
    tokens(tok, B * T, c->d_vocab, 11);
    lp_metric mt = logit_diff(ans, wr, c->d_vocab);
    float *steer = lp_test_rand(c->d_model, 5, -1, 1), *mean = lp_test_rand(c->d_model, 6, -0.5f, 0.5f);
    uedit ed[] = {{"blocks.0.hook_resid_post", {.kind = LP_EDIT_ADD, .src = steer, .src_len = c->d_model, .coef = 2.0f}},
                  {"blocks.1.hook_mlp_out", {.kind = LP_EDIT_SET, .src = mean, .src_len = c->d_model}}};
    const char *hooks[] = {"blocks.0.hook_resid_post", "blocks.1.hook_resid_mid", "blocks.0.mlp.hook_post", "blocks.1.hook_mlp_out"};
    size_t n;
    for (int h = 0; h < 4; h++) free(fd_check(m, "steer resid, mean mlp_out", tok, &mt, ed, 2, hooks[h], &n));
    float *g = fd_check(m, "steer resid, mean mlp_out", tok, &mt, ed, 2, "blocks.1.mlp.hook_pre", &n);
    double mx = 0;
    for (size_t i = 0; i < n; i++) mx = fmax(mx, fabs(g[i]));
    printf("  blocks.1.mlp.hook_pre under the mean-ablated mlp_out: max |grad| %.2e\n", mx);
    cr_expect_eq(mx, 0.0, "the gradient passed a mean ablation");
    free(g), free(steer), free(mean);
    lp_model_free(m);
}

/* Llama (grouped kv heads, rotary): a head's z zeroed everywhere, one head's pattern patched
 * from another run, a steer of resid_mid. */
Test(grad_edits, ablated_head_patched_pattern_llama) {
    lp_model *m = load(LP_FIXTURES "/llama-tiny");
    const lp_config *c = lp_model_config(m);
    int32_t tok[B * T], other[B * T], ans[B], wr[B];
    tokens(tok, B * T, c->d_vocab, 11);
    tokens(other, B * T, c->d_vocab, 17);
    lp_metric mt = logit_diff(ans, wr, c->d_vocab);
    size_t ns;
    float *pat = capture_of(m, other, &mt, "blocks.1.attn.hook_pattern", &ns), *steer = lp_test_rand(c->d_model, 7, -1, 1);
    int h2[] = {2}, h0[] = {0};
    uedit ed[] = {{"blocks.0.attn.hook_z", {.kind = LP_EDIT_ZERO, .heads = h2, .nheads = 1}},
                  {"blocks.1.attn.hook_pattern", {.kind = LP_EDIT_PATCH, .src = pat, .src_len = ns, .heads = h0, .nheads = 1}},
                  {"blocks.0.hook_resid_mid", {.kind = LP_EDIT_ADD, .src = steer, .src_len = c->d_model, .coef = 1.0f}}};
    const char *hooks[] = {"blocks.1.attn.hook_k", "blocks.0.attn.hook_v", "blocks.0.hook_resid_pre", "blocks.1.attn.hook_pattern"};
    size_t n;
    for (int h = 0; h < 4; h++) free(fd_check(m, "llama: z, pattern, steer", tok, &mt, ed, 3, hooks[h], &n));
    float *gq = fd_check(m, "llama: z, pattern, steer", tok, &mt, ed, 3, "blocks.1.attn.hook_rot_q", &n);
    double in = max_where(gq, c->n_heads, c->d_head, NULL, 0, h0, 1, 1), out = max_where(gq, c->n_heads, c->d_head, NULL, 0, h0, 1, 0);
    printf("  blocks.1.attn.hook_rot_q: max |grad| at the head whose pattern is patched %.2e, elsewhere %.2e\n", in, out);
    cr_expect_eq(in, 0.0, "the gradient passed a patched pattern");
    cr_expect_gt(out, 0.0);
    free(gq);
    float *gz = fd_check(m, "llama: z, pattern, steer", tok, &mt, ed, 3, "blocks.0.attn.hook_q", &n);
    in = max_where(gz, c->n_heads, c->d_head, NULL, 0, h2, 1, 1);
    printf("  blocks.0.attn.hook_q: max |grad| at the ablated head %.2e\n", in);
    cr_expect_eq(in, 0.0, "the gradient passed a zero-ablated head");
    free(gz), free(pat), free(steer);
    lp_model_free(m);
}

/* The norms' scales: frozen at two positions to another run's value, steered, and a direction
 * metric entering at a scale and at a normalized value. */
static void norm_scales(const char *dir, const char *label) {
    lp_model *m = load(dir);
    const lp_config *c = lp_model_config(m);
    int32_t tok[B * T], other[B * T], ans[B], wr[B];
    tokens(tok, B * T, c->d_vocab, 11);
    tokens(other, B * T, c->d_vocab, 17);
    lp_metric mt = logit_diff(ans, wr, c->d_vocab);
    size_t ns, n;
    float *frozen = capture_of(m, other, &mt, "blocks.0.ln2.hook_scale", &ns), shift = 0.5f;
    int pos[] = {1, 4};
    uedit ed[] = {{"blocks.0.ln2.hook_scale", {.kind = LP_EDIT_PATCH, .src = frozen, .src_len = ns, .pos = pos, .npos = 2}},
                  {"blocks.1.ln1.hook_scale", {.kind = LP_EDIT_ADD, .src = &shift, .src_len = 1, .coef = 1.0f}}};
    const char *hooks[] = {"blocks.0.ln2.hook_scale", "blocks.0.hook_resid_mid", "blocks.1.ln1.hook_scale", "blocks.1.hook_resid_pre",
                           "blocks.0.hook_resid_pre"};
    char lab[64];
    snprintf(lab, sizeof lab, "%s: frozen, steered scale", label);
    for (int h = 0; h < 5; h++) free(fd_check(m, lab, tok, &mt, ed, 2, hooks[h], &n));
    /* directions entering at a scale and at a normalized value */
    float *dscale = lp_test_rand(1, 8, 0.5f, 1.5f), *dnorm = lp_test_rand(c->d_model, 9, -1, 1);
    lp_metric at_scale = {.kind = LP_METRIC_DIRECTION, .hook = "blocks.1.ln1.hook_scale", .direction = dscale};
    lp_metric at_norm = {.kind = LP_METRIC_DIRECTION, .hook = "blocks.1.ln1.hook_normalized", .direction = dnorm};
    snprintf(lab, sizeof lab, "%s: direction at a scale", label);
    free(fd_check(m, lab, tok, &at_scale, NULL, 0, "blocks.1.hook_resid_pre", &n));
    free(fd_check(m, lab, tok, &at_scale, NULL, 0, "blocks.0.hook_resid_mid", &n));
    snprintf(lab, sizeof lab, "%s: direction at normalized", label);
    free(fd_check(m, lab, tok, &at_norm, NULL, 0, "blocks.1.ln1.hook_scale", &n));
    free(fd_check(m, lab, tok, &at_norm, ed, 2, "blocks.0.hook_resid_pre", &n));
    free(frozen), free(dscale), free(dnorm);
    lp_model_free(m);
}

Test(grad_edits, norm_scales_gpt2) { norm_scales(LP_FIXTURES "/gpt2-tiny", "gpt2"); }
Test(grad_edits, norm_scales_llama) { norm_scales(LP_FIXTURES "/llama-tiny", "llama"); }

/* Edited logits: a steer (a logit bias) and the logits of position 2 zeroed, which under the
 * mean loss leaves unembed.hook_in there without a gradient; the log-prob metric reads the
 * (steered) last position. */
Test(grad_edits, edited_logits) {
    lp_model *m = load(LP_FIXTURES "/llama-tiny");
    const lp_config *c = lp_model_config(m);
    int32_t tok[B * T], ans[B], wr[B];
    tokens(tok, B * T, c->d_vocab, 11);
    lp_metric loss = {.kind = LP_METRIC_MEAN_LOSS}, lp = logit_diff(ans, wr, c->d_vocab);
    lp.kind = LP_METRIC_LOGPROB;
    float *bias = lp_test_rand(c->d_vocab, 10, -2, 2);
    int pos[] = {2};
    uedit ed[] = {{"unembed.hook_out", {.kind = LP_EDIT_ADD, .src = bias, .src_len = c->d_vocab, .coef = 1.0f}},
                  {"unembed.hook_out", {.kind = LP_EDIT_ZERO, .pos = pos, .npos = 1}}};
    size_t n;
    free(fd_check(m, "logits steered: log-prob", tok, &lp, ed, 1, "blocks.1.hook_resid_post", &n));
    free(fd_check(m, "logits steered: log-prob", tok, &lp, ed, 1, "unembed.hook_in", &n));
    free(fd_check(m, "logits steered, zeroed", tok, &loss, ed, 2, "blocks.1.hook_resid_post", &n));
    free(fd_check(m, "logits steered, zeroed", tok, &loss, ed, 2, "unembed.hook_out", &n));
    float *g = fd_check(m, "logits steered, zeroed", tok, &loss, ed, 2, "unembed.hook_in", &n);
    double in = max_where(g, 1, c->d_model, pos, 1, NULL, 0, 1), out = max_where(g, 1, c->d_model, pos, 1, NULL, 0, 0);
    printf("  unembed.hook_in: max |grad| at position 2 %.2e, elsewhere %.2e\n", in, out);
    cr_expect_eq(in, 0.0);
    cr_expect_gt(out, 0.0);
    free(g);
    /* the read position's logits replaced: the log-prob no longer depends on anything */
    int last[] = {T - 1};
    uedit gone[] = {{"unembed.hook_out", {.kind = LP_EDIT_SET, .src = bias, .src_len = c->d_vocab, .pos = last, .npos = 1}}};
    g = fd_check(m, "logits replaced: log-prob", tok, &lp, gone, 1, "unembed.hook_in", &n);
    cr_expect_eq(max_where(g, 1, c->d_model, NULL, 0, NULL, 0, 1), 0.0);
    free(g), free(bias);
    lp_model_free(m);
}

/* A direction entering at hook_embed: hook_pos_embed, added to it, does not move the metric. */
Test(grad_edits, direction_at_the_embeddings_gpt2) {
    lp_model *m = load(LP_FIXTURES "/gpt2-tiny");
    const lp_config *c = lp_model_config(m);
    int32_t tok[B * T];
    tokens(tok, B * T, c->d_vocab, 11);
    float *dir = lp_test_rand(c->d_model, 4, -1, 1);
    lp_metric mt = {.kind = LP_METRIC_DIRECTION, .hook = "hook_embed", .direction = dir};
    double met[B];
    cr_assert_eq(lp_model_grad(m, tok, B, T, &mt, "hook_embed,hook_pos_embed", met), LP_OK, "%s", lp_last_error());
    lp_tensor e, p;
    cr_assert_eq(lp_grad_get(m, "hook_embed", &e), LP_OK);
    cr_assert_eq(lp_grad_get(m, "hook_pos_embed", &p), LP_OK);
    double de = 0, dp = 0;
    for (size_t i = 0; i < (size_t)B * T * c->d_model; i++)
        de = fmax(de, fabs(((const float *)e.data)[i] - dir[i % c->d_model])), dp = fmax(dp, fabs(((const float *)p.data)[i]));
    printf("  direction at hook_embed: max |grad - direction| at hook_embed %.2e, max |grad| at hook_pos_embed %.2e\n", de, dp);
    cr_expect_eq(de, 0.0);
    cr_expect_eq(dp, 0.0);
    free(dir);
    lp_model_free(m);
}

/* ---- callbacks ---- */

static lp_status times_two(const char *hook, lp_tensor *act, void *user) {
    float *a = act->data;
    for (int64_t i = 0; i < lp_shape_numel(act->shape, act->ndim); i++) a[i] *= 2.0f;
    return LP_OK;
}

static lp_status add_one(const char *hook, lp_tensor *act, void *user) {
    float *a = act->data;
    for (int64_t i = 0; i < lp_shape_numel(act->shape, act->ndim); i++) a[i] += 1.0f;
    return LP_OK;
}

/* [B, T, D]: position *user set to 0.5 */
static lp_status set_position(const char *hook, lp_tensor *act, void *user) {
    int p = *(const int *)user;
    float *a = act->data;
    for (int64_t b = 0; b < act->shape[0]; b++)
        for (int64_t d = 0; d < act->shape[2]; d++) a[(b * act->shape[1] + p) * act->shape[2] + d] = 0.5f;
    return LP_OK;
}

Test(grad_edits, callbacks_are_refused_unless_declared) {
    lp_model *m = load(LP_FIXTURES "/gpt2-tiny");
    const lp_config *c = lp_model_config(m);
    int32_t tok[B * T], ans[B], wr[B];
    tokens(tok, B * T, c->d_vocab, 11);
    lp_metric mt = logit_diff(ans, wr, c->d_vocab);
    uedit ed[] = {{"blocks.1.hook_resid_mid", {.fn = times_two}}};
    register_edits(m, ed, 1);
    double met[B];
    cr_assert_eq(lp_model_grad(m, tok, B, T, &mt, "blocks.1.hook_resid_post,blocks.1.hook_resid_mid,blocks.0.hook_resid_post,blocks.0.mlp.W_in", met),
                 LP_OK, "%s", lp_last_error());
    lp_tensor g;
    cr_expect_eq(lp_grad_get(m, "blocks.1.hook_resid_post", &g), LP_OK, "above the callback: %s", lp_last_error());
    cr_expect_eq(lp_grad_get(m, "blocks.1.hook_resid_mid", &g), LP_OK, "at the callback (after it): %s", lp_last_error());
    const char *below[] = {"blocks.0.hook_resid_post", "blocks.0.mlp.W_in"};
    for (int i = 0; i < 2; i++) {
        cr_expect_eq(lp_grad_get(m, below[i], &g), LP_ERR_ARG);
        printf("  undeclared callback, %s: %s\n", below[i], lp_last_error());
        cr_expect(strstr(lp_last_error(), below[i]) && strstr(lp_last_error(), "blocks.1.hook_resid_mid"), "%s", lp_last_error());
    }
    lp_hooks_clear(m);
    /* declared: a constant shift is the identity, a replacement of one position stops it there */
    static int p3 = 3;
    int pos[] = {3};
    uedit id[] = {{"blocks.1.hook_resid_mid", {.fn = add_one, .grad = LP_EDIT_GRAD_IDENTITY}}};
    uedit stop[] = {{"blocks.0.hook_resid_post", {.fn = set_position, .user = &p3, .pos = pos, .npos = 1, .grad = LP_EDIT_GRAD_STOP}}};
    size_t n;
    free(fd_check(m, "callback declared identity", tok, &mt, id, 1, "blocks.0.hook_resid_post", &n));
    float *gs = fd_check(m, "callback declared stop", tok, &mt, stop, 1, "blocks.0.hook_resid_mid", &n);
    cr_expect_eq(max_where(gs, 1, c->d_model, pos, 1, NULL, 0, 1), 0.0);
    cr_expect_gt(max_where(gs, 1, c->d_model, pos, 1, NULL, 0, 0), 0.0);
    free(gs);
    lp_edit_spec bad = {.fn = add_one, .grad = (lp_edit_grad)7};
    cr_expect_eq(lp_hook_edit(m, "blocks.0.hook_resid_post", &bad), LP_ERR_ARG);
    lp_model_free(m);
}

/* ---- stale gradients ---- */

static void expect_absent(lp_model *m, const char *name, const char *why) {
    lp_tensor g;
    lp_status st = lp_grad_get(m, name, &g);
    printf("  %-28s -> %s\n", name, st == LP_OK ? "a gradient" : lp_last_error());
    cr_expect_eq(st, LP_ERR_NOT_FOUND, "%s: expected no gradient", name);
    cr_expect(strstr(lp_last_error(), name) && strstr(lp_last_error(), why), "%s: '%s' lacks '%s'", name, lp_last_error(), why);
}

Test(grad_edits, gradients_the_last_run_did_not_produce_are_errors) {
    lp_model *m = load(LP_FIXTURES "/gpt2-tiny");
    const lp_config *c = lp_model_config(m);
    int32_t tok[B * T], ans[B], wr[B];
    tokens(tok, B * T, c->d_vocab, 11);
    lp_metric mt = logit_diff(ans, wr, c->d_vocab);
    expect_absent(m, "blocks.1.hook_resid_post", "no gradient has been taken");
    const char *list = "blocks.*.hook_resid_post,blocks.*.hook_resid_mid,blocks.1.attn.W_O";
    double met[B];
    lp_tensor g;
    cr_assert_eq(lp_model_grad(m, tok, B, T, &mt, list, met), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_grad_get(m, "blocks.1.hook_resid_post", &g), LP_OK);
    cr_assert_eq(lp_grad_get(m, "blocks.1.attn.W_O", &g), LP_OK);
    /* a direction entering at layer 0: nothing above it is reached */
    float *dir = lp_test_rand(c->d_model, 3, -1, 1);
    lp_metric low = {.kind = LP_METRIC_DIRECTION, .hook = "blocks.0.hook_resid_mid", .direction = dir};
    cr_assert_eq(lp_model_grad(m, tok, B, T, &low, list, met), LP_OK, "%s", lp_last_error());
    expect_absent(m, "blocks.1.hook_resid_post", "did not reach it (the metric enters at blocks.0.hook_resid_mid, layer 0)");
    expect_absent(m, "blocks.1.hook_resid_mid", "did not reach");
    expect_absent(m, "blocks.1.attn.W_O", "did not reach");
    cr_expect_eq(lp_grad_get(m, "blocks.0.hook_resid_mid", &g), LP_OK, "%s", lp_last_error());
    /* a metric-only run in between changes neither the gradients nor their shape */
    int32_t tok2[3 * 4] = {0};
    double met3[3];
    lp_metric loss = {.kind = LP_METRIC_MEAN_LOSS};
    cr_assert_eq(lp_model_metric(m, tok2, 3, 4, &loss, met3), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_grad_get(m, "blocks.0.hook_resid_mid", &g), LP_OK);
    cr_expect(g.shape[0] == B && g.shape[1] == T && g.shape[2] == c->d_model, "shape [%lld, %lld, %lld]", (long long)g.shape[0],
              (long long)g.shape[1], (long long)g.shape[2]);
    /* not asked for this time */
    cr_assert_eq(lp_model_grad(m, tok, B, T, &mt, "blocks.0.hook_resid_post", met), LP_OK);
    expect_absent(m, "blocks.1.hook_resid_post", "not asked for");
    expect_absent(m, "blocks.1.attn.W_O", "not asked for");
    /* a failed run leaves nothing readable */
    cr_assert_neq(lp_model_grad(m, tok, B, T, &mt, "blocks.0.hook_resid_post,no.such.hook", met), LP_OK);
    expect_absent(m, "blocks.0.hook_resid_post", "failed");
    free(dir);
    lp_model_free(m);
}

/* ---- attribution ---- */

Test(grad_edits, attribution_refuses_edits_and_scores_zero_above_a_direction) {
    lp_model *m = load(LP_FIXTURES "/gpt2-tiny");
    const lp_config *c = lp_model_config(m);
    enum { TT = 8 };
    int32_t clean[TT], corr[TT], ans = 5, wr = 7;
    tokens(clean, TT, c->d_vocab, 21);
    tokens(corr, TT, c->d_vocab, 22);
    lp_metric mt = {.kind = LP_METRIC_LOGIT_DIFF, .answer = &ans, .wrong = &wr};
    lp_attrib_opts o = {.kinds = 1u << LP_NODE_RESID_POST, .patch_batch = 4};
    lp_pair_result r;
    lp_edit_spec z = {.kind = LP_EDIT_ZERO};
    cr_assert_eq(lp_hook_edit(m, "blocks.0.hook_mlp_out", &z), LP_OK);
    cr_expect_eq(lp_attrib_atp(m, clean, corr, 1, TT, &mt, &o, &r), LP_ERR_ARG);
    printf("  %s\n", lp_last_error());
    cr_expect_eq(lp_attrib_exact(m, clean, corr, TT, &mt, &o, &r), LP_ERR_ARG);
    cr_expect(lp_hook_is_edited(m, lp_hook_find(m, "blocks.0.hook_mlp_out")), "the refused call dropped the edit");
    lp_hooks_clear(m);
    /* a direction at layer 0: layer 1's nodes do not move the metric */
    float *dir = lp_test_rand(c->d_model, 23, -1, 1);
    lp_metric d0 = {.kind = LP_METRIC_DIRECTION, .hook = "blocks.0.hook_resid_mid", .direction = dir};
    for (int ig = 0; ig <= 4; ig += 4) {
        o.ig_steps = ig;
        cr_assert_eq(lp_attrib_atp(m, clean, corr, 1, TT, &d0, &o, &r), LP_OK, "%s", lp_last_error());
        double up = 0, low = 0;
        for (int t = 0; t < TT; t++) low = fmax(low, fabs(r.s[LP_NODE_RESID_POST].v[t])), up = fmax(up, fabs(r.s[LP_NODE_RESID_POST].v[TT + t]));
        printf("  direction at blocks.0.hook_resid_mid%s: max |score| layer 0 resid_post %.2e, layer 1 %.2e\n", ig ? " (IG)" : "", low, up);
        cr_expect_eq(up, 0.0);
        lp_pair_result_free(&r);
    }
    free(dir);
    lp_model_free(m);
}
