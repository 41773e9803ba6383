/* paths.c: the components and receivers of paths.h (names, order, edges), what path
 * patching and edge attribution share (frozen hooks, weights on the host, the senders'
 * deltas), and path patching itself. Built on captures and edits (hooks.h): the receivers'
 * inputs are computed by the model's own blocks in a "probe" run, then patched in. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attrib/paths_internal.h"

/* ---- components, receivers and edges ---- */

static int per_layer_recv(const lp_config *c) { return c->n_heads + 2 * c->n_kv_heads + 1; }

int lp_path_n_senders(const lp_model *m) {
    const lp_config *c = lp_model_config(m);
    return 1 + c->n_layers * (c->n_heads + 1);
}

int lp_path_n_receivers(const lp_model *m) {
    const lp_config *c = lp_model_config(m);
    return c->n_layers * per_layer_recv(c) + 1;
}

void paths_sender_decode(const lp_model *m, int i, int *layer, int *kind, int *head) {
    const lp_config *c = lp_model_config(m);
    *head = -1;
    if (i == 0) {
        *layer = -1, *kind = PS_EMBED;
        return;
    }
    int r = (i - 1) % (c->n_heads + 1);
    *layer = (i - 1) / (c->n_heads + 1);
    if (r < c->n_heads) *kind = PS_HEAD, *head = r;
    else *kind = PS_MLP;
}

void paths_receiver_decode(const lp_model *m, int j, int *layer, int *kind, int *head) {
    const lp_config *c = lp_model_config(m);
    int H = c->n_heads, Hkv = c->n_kv_heads, P = per_layer_recv(c);
    *head = -1;
    if (j >= c->n_layers * P) {
        *layer = c->n_layers, *kind = PR_LOGITS;
        return;
    }
    int r = j % P;
    *layer = j / P;
    if (r < H) *kind = PR_Q, *head = r;
    else if (r < H + Hkv) *kind = PR_K, *head = r - H;
    else if (r < H + 2 * Hkv) *kind = PR_V, *head = r - H - Hkv;
    else *kind = PR_MLP;
}

void lp_path_sender_name(const lp_model *m, int i, char *buf, size_t n) {
    int L, k, h;
    paths_sender_decode(m, i, &L, &k, &h);
    if (k == PS_EMBED) snprintf(buf, n, "embed");
    else if (k == PS_HEAD) snprintf(buf, n, "blocks.%d.attn.head.%d", L, h);
    else snprintf(buf, n, "blocks.%d.mlp", L);
}

void lp_path_receiver_name(const lp_model *m, int j, char *buf, size_t n) {
    const lp_config *c = lp_model_config(m);
    int L, k, h;
    paths_receiver_decode(m, j, &L, &k, &h);
    const char *kv = c->n_kv_heads == c->n_heads ? "head" : "kv_head";
    if (k == PR_Q) snprintf(buf, n, "blocks.%d.attn.head.%d.q", L, h);
    else if (k == PR_K || k == PR_V) snprintf(buf, n, "blocks.%d.attn.%s.%d.%c", L, kv, h, k == PR_K ? 'k' : 'v');
    else if (k == PR_MLP) snprintf(buf, n, "blocks.%d.mlp", L);
    else snprintf(buf, n, "logits");
}

int lp_path_sender_find(const lp_model *m, const char *name) {
    char b[96];
    for (int i = 0; i < lp_path_n_senders(m); i++) {
        lp_path_sender_name(m, i, b, sizeof b);
        if (strcmp(b, name) == 0) return i;
    }
    return -1;
}

int lp_path_receiver_find(const lp_model *m, const char *name) {
    char b[96];
    for (int j = 0; j < lp_path_n_receivers(m); j++) {
        lp_path_receiver_name(m, j, b, sizeof b);
        if (strcmp(b, name) == 0) return j;
    }
    return -1;
}

int lp_path_sender_layer(const lp_model *m, int i) {
    int L, k, h;
    paths_sender_decode(m, i, &L, &k, &h);
    return L;
}

int lp_path_receiver_layer(const lp_model *m, int j) {
    int L, k, h;
    paths_receiver_decode(m, j, &L, &k, &h);
    return L;
}

/* Depth in writing order: the embeddings, then per layer its attention, then its MLP. */
int lp_path_is_edge(const lp_model *m, int i, int j) {
    int Ls, ks, hs, Lr, kr, hr;
    paths_sender_decode(m, i, &Ls, &ks, &hs);
    paths_receiver_decode(m, j, &Lr, &kr, &hr);
    int s = ks == PS_EMBED ? -1 : 2 * Ls + (ks == PS_MLP);
    int r = kr == PR_LOGITS ? 2 * Lr : 2 * Lr + (kr == PR_MLP);
    return s < r;
}

/* ---- frozen hooks ---- */

lp_status paths_freeze_record(lp_model *m, const char *spec, const int32_t *clean, int T, frozen *fz) {
    memset(fz, 0, sizeof *fz);
    if (!spec || !spec[0]) return LP_OK;
    lp_hooks_clear(m);
    char *list = strdup(spec), *save = NULL;
    if (!list) LP_FAIL(LP_ERR_OOM, "out of memory");
    lp_status st = LP_OK;
    for (char *p = strtok_r(list, ",", &save); p && st == LP_OK; p = strtok_r(NULL, ",", &save)) st = lp_hook_capture(m, p, NULL, 0, NULL);
    free(list);
    int n = 0;
    for (int id = 0; id < lp_hook_count(m); id++) n += lp_hook_is_captured(m, id);
    fz->id = calloc(n ? n : 1, sizeof *fz->id), fz->v = calloc(n ? n : 1, sizeof *fz->v), fz->per = calloc(n ? n : 1, sizeof *fz->per);
    if (st == LP_OK && (!fz->id || !fz->v || !fz->per)) st = LP_ERR(LP_ERR_OOM, "out of memory");
    if (st == LP_OK) st = lp_model_forward(m, clean, 1, T, 0);
    for (int id = 0; st == LP_OK && id < lp_hook_count(m); id++) {
        if (!lp_hook_is_captured(m, id)) continue;
        fz->id[fz->n] = id;
        st = paths_grab(m, lp_hook_name(m, id), &fz->v[fz->n], &fz->per[fz->n]);
        fz->n++;
    }
    lp_hooks_clear(m);
    if (st != LP_OK) paths_freeze_free(fz);
    return st;
}

lp_status paths_freeze_apply(lp_model *m, const frozen *fz, int B) {
    for (int i = 0; i < fz->n; i++) {
        size_t per = fz->per[i];
        float *src = malloc((size_t)B * per * sizeof(float));
        if (!src) LP_FAIL(LP_ERR_OOM, "out of memory");
        for (int b = 0; b < B; b++) memcpy(src + (size_t)b * per, fz->v[i], per * sizeof(float));
        lp_edit_spec e = {.kind = LP_EDIT_PATCH, .src = src, .src_len = (size_t)B * per};
        lp_status st = lp_hook_edit(m, lp_hook_name(m, fz->id[i]), &e);
        free(src);
        LP_CHECK(st);
    }
    return LP_OK;
}

void paths_freeze_free(frozen *fz) {
    for (int i = 0; fz->v && i < fz->n; i++) free(fz->v[i]);
    free(fz->id), free(fz->v), free(fz->per);
    memset(fz, 0, sizeof *fz);
}

int paths_frozen(const lp_model *m, const frozen *fz, int kind, int layer) {
    int id = hook_id(m, kind, layer);
    for (int i = 0; id >= 0 && i < fz->n; i++)
        if (fz->id[i] == id) return 1;
    return 0;
}

/* ---- weights, captures, deltas ---- */

lp_status paths_param(lp_model *m, const char *name, float **out, int64_t *rows, int64_t *cols) {
    *out = NULL;
    for (int i = 0; i < m->w.n; i++) {
        if (strcmp(m->w.params[i].name, name) != 0) continue;
        const param *p = &m->w.params[i];
        size_t n = (size_t)p->shape[0] * (p->shape[1] ? p->shape[1] : 1), es = act_elem_bytes(m);
        *rows = p->shape[0], *cols = p->shape[1];
        if (!n) return LP_OK; /* absent (a bias this model has not) */
        void *stage = m->ctx.device == LP_CPU ? NULL : malloc(n * es);
        if (!(*out = malloc(n * sizeof(float))) || (m->ctx.device != LP_CPU && !stage)) {
            free(stage), free(*out), *out = NULL;
            LP_FAIL(LP_ERR_OOM, "out of memory for %s", name);
        }
        lp_status st = stage ? lp_ctx_to_host(&m->ctx, stage, param_ptr(m, i), n * es) : LP_OK;
        if (st == LP_OK) st = lp_convert_host(*out, LP_F32, stage ? stage : param_ptr(m, i), m->ctx.dtype, n);
        free(stage);
        if (st != LP_OK) free(*out), *out = NULL;
        return st;
    }
    LP_FAIL(LP_ERR_NOT_FOUND, "%s: no such weight in this model", name);
}

/* GPT-2 keeps Conv1D's [in, out]; the others Hugging Face's [out, in]. */
int paths_in_out(const lp_model *m) { return !m->w.trans; }

void paths_sender_hook(const lp_model *m, int s, char *buf, size_t n) {
    int L, k, h;
    paths_sender_decode(m, s, &L, &k, &h);
    if (k == PS_EMBED) snprintf(buf, n, "blocks.0.hook_resid_pre");
    else if (k == PS_HEAD) snprintf(buf, n, "blocks.%d.attn.hook_z", L);
    else snprintf(buf, n, "blocks.%d.hook_mlp_out", L);
}

lp_status paths_delta(const lp_model *m, int s, int b, int T, const float *c, const float *x, const float *wo, float *out) {
    const lp_config *cf = &m->cfg;
    int L, k, h, D = cf->d_model, dh = cf->d_head, qD = cf->n_heads * cf->d_head, io = paths_in_out(m);
    paths_sender_decode(m, s, &L, &k, &h);
    if (k != PS_HEAD) {
        size_t o = (size_t)b * T * D;
        for (size_t i = 0; i < (size_t)T * D; i++) out[i] = x[o + i] - c[o + i];
        return LP_OK;
    }
    /* the head's result: its slice of z times its rows of W_O, the bias left out (it cancels) */
    double *acc = malloc(D * sizeof(double));
    if (!acc) LP_FAIL(LP_ERR_OOM, "out of memory");
    for (int t = 0; t < T; t++) {
        const float *zc = c + ((size_t)b * T + t) * qD + h * dh, *zx = x + ((size_t)b * T + t) * qD + h * dh;
        memset(acc, 0, D * sizeof(double));
        for (int j = 0; j < dh; j++) {
            double dz = (double)zx[j] - zc[j];
            for (int d = 0; d < D; d++) acc[d] += dz * (io ? wo[(size_t)(h * dh + j) * D + d] : wo[(size_t)d * qD + h * dh + j]);
        }
        for (int d = 0; d < D; d++) out[(size_t)t * D + d] = (float)acc[d];
    }
    free(acc);
    return LP_OK;
}

lp_status paths_no_user_edits(const lp_model *m, const char *what) {
    /* the senders are heads and MLPs read through W_O / W_out straight into the residual:
     * a post-norm between them (Gemma) makes that decomposition wrong, so it is refused */
    if (m->cfg.post_norms)
        LP_FAIL(LP_ERR_ARG, "%s: %s normalizes each block's output before the residual (post-norms); per-head paths through "
                "W_O are not defined there", what, m->cfg.name);
    for (int id = 0; id < lp_hook_count(m); id++)
        if (lp_hook_is_edited(m, id))
            LP_FAIL(LP_ERR_ARG, "%s: %s has an edit registered; this method runs its own forwards and would discard it "
                    "(lp_hooks_clear first; to hold hooks at their clean values use the freeze option)", what, lp_hook_name(m, id));
    return LP_OK;
}

lp_status paths_grab(lp_model *m, const char *name, float **out, size_t *n) {
    lp_tensor t;
    *out = NULL;
    LP_CHECK(lp_capture_get(m, name, &t));
    *n = (size_t)lp_shape_numel(t.shape, t.ndim);
    if (!(*out = malloc(*n * sizeof(float)))) LP_FAIL(LP_ERR_OOM, "out of memory");
    lp_status st = lp_capture_read_f32(m, name, *out, *n);
    if (st != LP_OK) free(*out), *out = NULL;
    return st;
}

/* ---- path patching ---- */

static lp_status check_path(const lp_model *m, int sender, const int *recv, int n_recv) {
    char a[96], b[96];
    if (sender < 0 || sender >= lp_path_n_senders(m)) LP_FAIL(LP_ERR_ARG, "path patching: sender %d is not in [0, %d)", sender, lp_path_n_senders(m));
    if (n_recv < 1) LP_FAIL(LP_ERR_ARG, "path patching: no receivers");
    for (int i = 0; i < n_recv; i++) {
        if (recv[i] < 0 || recv[i] >= lp_path_n_receivers(m))
            LP_FAIL(LP_ERR_ARG, "path patching: receiver %d is not in [0, %d)", recv[i], lp_path_n_receivers(m));
        for (int j = 0; j < i; j++)
            if (recv[j] == recv[i]) LP_FAIL(LP_ERR_ARG, "path patching: receiver %d is given twice", recv[i]);
        if (!lp_path_is_edge(m, sender, recv[i])) {
            lp_path_sender_name(m, sender, a, sizeof a), lp_path_receiver_name(m, recv[i], b, sizeof b);
            LP_FAIL(LP_ERR_ARG, "path patching: %s does not read what %s writes (it is not downstream)", b, a);
        }
    }
    return LP_OK;
}

/* One run of the prompt under the frozen hooks, capturing hook `cap` into *out. */
static lp_status run_capture(lp_model *m, const frozen *fz, const int32_t *tok, int T, const lp_metric *mt, const char *cap, double *met,
                             float **out) {
    size_t n;
    lp_hooks_clear(m);
    LP_CHECK(lp_hook_capture(m, cap, NULL, 0, NULL));
    LP_CHECK(paths_freeze_apply(m, fz, 1));
    LP_CHECK(lp_model_metric(m, tok, 1, T, mt, met));
    return paths_grab(m, cap, out, &n);
}

/* The probe: the clean prompt with the residual before each receiving block set to its
 * clean value + delta (each patch replaces the stream, so every receiver's inputs are
 * exactly those of clean + delta); its q/k/v and ln2 outputs are then what the final run
 * patches in. */
static lp_status probe(lp_model *m, const frozen *fz, const int32_t *clean, int T, const float *delta, const int *recv, int n_recv,
                       float **cap) {
    const lp_config *cf = &m->cfg;
    int nL = cf->n_layers, D = cf->d_model;
    char nm[96];
    lp_hooks_clear(m);
    /* the clean residuals at the receiving layers */
    unsigned char *attn = calloc(nL + 1, 1), *mlp = calloc(nL + 1, 1);
    if (!attn || !mlp) return free(attn), free(mlp), LP_ERR(LP_ERR_OOM, "out of memory");
    int any = 0;
    for (int i = 0; i < n_recv; i++) {
        int L, k, h;
        paths_receiver_decode(m, recv[i], &L, &k, &h);
        if (k <= PR_V) attn[L] = 1, any = 1;
        if (k == PR_MLP) mlp[L] = 1, any = 1;
    }
    lp_status st = LP_OK;
    float **res = calloc(2 * (size_t)nL, sizeof *res); /* [L]: resid_pre, [nL + L]: resid_mid */
    if (!res) st = LP_ERR(LP_ERR_OOM, "out of memory");
    for (int L = 0; st == LP_OK && any && L < nL; L++) {
        if (attn[L]) snprintf(nm, sizeof nm, "blocks.%d.hook_resid_pre", L), st = lp_hook_capture(m, nm, NULL, 0, NULL);
        if (st == LP_OK && mlp[L]) snprintf(nm, sizeof nm, "blocks.%d.hook_resid_mid", L), st = lp_hook_capture(m, nm, NULL, 0, NULL);
    }
    if (st == LP_OK && any) st = paths_freeze_apply(m, fz, 1);
    if (st == LP_OK && any) st = lp_model_forward(m, clean, 1, T, 0);
    for (int L = 0; st == LP_OK && any && L < nL; L++) {
        size_t n;
        if (attn[L]) snprintf(nm, sizeof nm, "blocks.%d.hook_resid_pre", L), st = paths_grab(m, nm, &res[L], &n);
        if (st == LP_OK && mlp[L]) snprintf(nm, sizeof nm, "blocks.%d.hook_resid_mid", L), st = paths_grab(m, nm, &res[nL + L], &n);
    }
    lp_hooks_clear(m);
    /* the patched probe */
    for (int L = 0; st == LP_OK && any && L < nL; L++) {
        static const char *const site[2] = {"hook_resid_pre", "hook_resid_mid"};
        for (int w = 0; st == LP_OK && w < 2; w++) {
            float *r = res[w * nL + L];
            if (!r) continue;
            for (size_t i = 0; i < (size_t)T * D; i++) r[i] += delta[i];
            lp_edit_spec e = {.kind = LP_EDIT_PATCH, .src = r, .src_len = (size_t)T * D};
            snprintf(nm, sizeof nm, "blocks.%d.%s", L, site[w]);
            st = lp_hook_edit(m, nm, &e);
            if (st == LP_OK && !w) snprintf(nm, sizeof nm, "blocks.%d.attn.hook_[qkv]", L), st = lp_hook_capture(m, nm, NULL, 0, NULL);
            if (st == LP_OK && w) snprintf(nm, sizeof nm, "blocks.%d.ln2.hook_normalized", L), st = lp_hook_capture(m, nm, NULL, 0, NULL);
        }
    }
    if (st == LP_OK && any) st = paths_freeze_apply(m, fz, 1);
    if (st == LP_OK && any) st = lp_model_forward(m, clean, 1, T, 0);
    for (int i = 0; st == LP_OK && i < n_recv; i++) {
        int L, k, h;
        size_t n;
        paths_receiver_decode(m, recv[i], &L, &k, &h);
        if (k == PR_LOGITS) continue;
        static const char *const hk[4] = {"attn.hook_q", "attn.hook_k", "attn.hook_v", "ln2.hook_normalized"};
        snprintf(nm, sizeof nm, "blocks.%d.%s", L, hk[k]);
        st = paths_grab(m, nm, &cap[i], &n);
    }
    lp_hooks_clear(m);
    for (int i = 0; res && i < 2 * nL; i++) free(res[i]);
    free(res), free(attn), free(mlp);
    return st;
}

/* The final run's edits: each receiver's patched input, then the frozen hooks (which win). */
static lp_status final_edits(lp_model *m, const frozen *fz, int T, const float *delta, const int *recv, int n_recv, float **cap) {
    const lp_config *cf = &m->cfg;
    char nm[96];
    lp_hooks_clear(m);
    for (int i = 0; i < n_recv; i++) {
        int L, k, h;
        paths_receiver_decode(m, recv[i], &L, &k, &h);
        if (k == PR_LOGITS) { /* the delta added to the final residual, one position at a time */
            snprintf(nm, sizeof nm, "blocks.%d.hook_resid_post", cf->n_layers - 1);
            for (int t = 0; t < T; t++) {
                lp_edit_spec e = {.kind = LP_EDIT_ADD, .src = delta + (size_t)t * cf->d_model, .src_len = (size_t)cf->d_model, .coef = 1.0f,
                                  .pos = &t, .npos = 1};
                LP_CHECK(lp_hook_edit(m, nm, &e));
            }
            continue;
        }
        static const char *const hk[4] = {"attn.hook_q", "attn.hook_k", "attn.hook_v", "ln2.hook_normalized"};
        int64_t s[LP_MAX_DIMS];
        snprintf(nm, sizeof nm, "blocks.%d.%s", L, hk[k]);
        int id = lp_hook_find(m, nm), nd = lp_hook_shape(m, id, 1, T, s);
        lp_edit_spec e = {.kind = LP_EDIT_PATCH, .src = cap[i], .src_len = (size_t)lp_shape_numel(s, nd), .heads = k <= PR_V ? &h : NULL,
                          .nheads = k <= PR_V};
        LP_CHECK(lp_hook_edit(m, nm, &e));
    }
    return paths_freeze_apply(m, fz, 1);
}

lp_status lp_path_patch(lp_model *m, const int32_t *clean, const int32_t *corrupted, int T, const lp_metric *mt, int sender,
                        const int *recv, int n_recv, const lp_path_opts *o, double *metric_clean, double *metric_corrupted,
                        double *effect) {
    const lp_config *cf = &m->cfg;
    int L, k, h;
    LP_CHECK(paths_no_user_edits(m, "path patching"));
    LP_CHECK(check_path(m, sender, recv, n_recv));
    paths_sender_decode(m, sender, &L, &k, &h);
    frozen fz;
    LP_CHECK(paths_freeze_record(m, o ? o->freeze : NULL, clean, T, &fz));
    char hook[96], nm[96];
    paths_sender_hook(m, sender, hook, sizeof hook);
    float *c = NULL, *x = NULL, *wo = NULL, *delta = malloc((size_t)T * cf->d_model * sizeof(float));
    float **cap = calloc(n_recv, sizeof *cap);
    double mf = 0;
    int64_t r, cl;
    lp_status st = delta && cap ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory");
    if (st == LP_OK) st = run_capture(m, &fz, clean, T, mt, hook, metric_clean, &c);
    if (st == LP_OK) st = run_capture(m, &fz, corrupted, T, mt, hook, metric_corrupted, &x);
    if (st == LP_OK && k == PS_HEAD) snprintf(nm, sizeof nm, "blocks.%d.attn.W_O", L), st = paths_param(m, nm, &wo, &r, &cl);
    if (st == LP_OK) st = paths_delta(m, sender, 0, T, c, x, wo, delta);
    if (st == LP_OK) st = probe(m, &fz, clean, T, delta, recv, n_recv, cap);
    if (st == LP_OK) st = final_edits(m, &fz, T, delta, recv, n_recv, cap);
    if (st == LP_OK) st = lp_model_metric(m, clean, 1, T, mt, &mf);
    if (st == LP_OK) *effect = mf - *metric_clean;
    lp_hooks_clear(m);
    for (int i = 0; cap && i < n_recv; i++) free(cap[i]);
    free(cap), free(c), free(x), free(wo), free(delta);
    paths_freeze_free(&fz);
    return st;
}
