/* eap.c: edge attribution patching (paths.h): every sender's delta between the corrupted
 * and the clean run, dotted with the gradient at every receiver's own copy of its input.
 * The backward gives the gradients at hook_q/k/v and at the residual stream; a head's
 * receiver gradient is ln1's backward applied to that head's share alone (its slice of the
 * q/k/v gradient through its columns of W_Q/W_K/W_V), the MLP's is the gradient at
 * resid_mid less the part that skips the MLP (resid_post's), the logits' is resid_post's of
 * the last block. */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attrib/paths_internal.h"

/* Layer L's projection weights and ln1 weight on the host. */
typedef struct layer_w {
    float *w[3]; /* W_Q, W_K, W_V */
    float *ln;   /* ln1.w */
    float *wo;   /* W_O */
} layer_w;

static lp_status load_layer(lp_model *m, int L, layer_w *lw) {
    static const char *const nm[5] = {"attn.W_Q", "attn.W_K", "attn.W_V", "ln1.w", "attn.W_O"};
    float **dst[5] = {&lw->w[0], &lw->w[1], &lw->w[2], &lw->ln, &lw->wo};
    char name[96];
    int64_t r, c;
    for (int i = 0; i < 5; i++) {
        snprintf(name, sizeof name, "blocks.%d.%s", L, nm[i]);
        LP_CHECK(paths_param(m, name, dst[i], &r, &c));
    }
    return LP_OK;
}

static void free_layers(layer_w *lw, int n) {
    for (int L = 0; lw && L < n; L++) free(lw[L].w[0]), free(lw[L].w[1]), free(lw[L].w[2]), free(lw[L].ln), free(lw[L].wo);
    free(lw);
}

/* Adds scale * the receivers' input gradients of row b of the last lp_model_grad (B rows)
 * into G [n_receivers, T * d_model]. */
static lp_status recv_grads(lp_model *m, const layer_w *lw, const frozen *fz, int b, int B, int T, float scale, float *G) {
    const lp_config *cf = &m->cfg;
    int nL = cf->n_layers, D = cf->d_model, dh = cf->d_head, H[3] = {cf->n_heads, cf->n_kv_heads, cf->n_kv_heads};
    int rms = cf->norm == LP_NORM_RMS, io = paths_in_out(m), nr = lp_path_n_receivers(m);
    size_t TD = (size_t)T * D;
    char nm[96];
    lp_tensor g, g2;
    double *dn = malloc(D * sizeof(double));
    float *nrm = NULL, *sc = NULL;
    size_t nn;
    lp_status st = dn ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory");
    for (int L = 0; st == LP_OK && L < nL; L++) {
        int j0 = L * (H[0] + H[1] + H[2] + 1); /* layer L's first receiver */
        /* heads: dx = ln1 backward (the scale a constant where it is frozen) of w * (dq_h W_h^T) */
        snprintf(nm, sizeof nm, "blocks.%d.ln1.hook_normalized", L);
        st = paths_grab(m, nm, &nrm, &nn);
        if (st == LP_OK) snprintf(nm, sizeof nm, "blocks.%d.ln1.hook_scale", L), st = paths_grab(m, nm, &sc, &nn);
        int dead = paths_frozen(m, fz, HK_LN1_NORM, L), const_scale = paths_frozen(m, fz, HK_LN1_SCALE, L);
        for (int p = 0, j = j0; st == LP_OK && p < 3; j += H[p], p++) {
            static const char *const hk[3] = {"attn.hook_q", "attn.hook_k", "attn.hook_v"};
            static const int kind[3] = {HK_Q, HK_K, HK_V};
            if (dead || paths_frozen(m, fz, kind[p], L)) continue; /* nothing flows back through a frozen value */
            snprintf(nm, sizeof nm, "blocks.%d.%s", L, hk[p]);
            if ((st = lp_grad_get(m, nm, &g)) != LP_OK) break;
            int cols = H[p] * dh;
            const float *W = lw[L].w[p];
            for (int t = 0; t < T; t++) {
                size_t row = (size_t)b * T + t;
                const float *n = nrm + row * D, *gq = (const float *)g.data + row * cols;
                double s = sc[row];
                for (int h = 0; h < H[p]; h++) {
                    double mdn = 0, mdnn = 0;
                    for (int d = 0; d < D; d++) {
                        double acc = 0;
                        for (int e = 0; e < dh; e++) acc += gq[h * dh + e] * (io ? W[(size_t)d * cols + h * dh + e] : W[(size_t)(h * dh + e) * D + d]);
                        dn[d] = acc * lw[L].ln[d];
                        mdn += dn[d], mdnn += dn[d] * n[d];
                    }
                    mdn = rms ? 0 : mdn / D, mdnn = const_scale ? 0 : mdnn / D;
                    float *out = G + (size_t)(j + h) * TD + (size_t)t * D;
                    for (int d = 0; d < D; d++) out[d] += scale * (float)((dn[d] - mdn - n[d] * mdnn) / s);
                }
            }
        }
        free(nrm), free(sc), nrm = sc = NULL;
        /* the MLP: resid_mid's gradient less what skips it */
        snprintf(nm, sizeof nm, "blocks.%d.hook_resid_mid", L);
        if (st == LP_OK) st = lp_grad_get(m, nm, &g);
        snprintf(nm, sizeof nm, "blocks.%d.hook_resid_post", L);
        if (st == LP_OK) st = lp_grad_get(m, nm, &g2);
        float *out = G + (size_t)(j0 + H[0] + H[1] + H[2]) * TD;
        for (size_t i = 0; st == LP_OK && i < TD; i++)
            out[i] += scale * (((const float *)g.data)[(size_t)b * TD + i] - ((const float *)g2.data)[(size_t)b * TD + i]);
        if (st == LP_OK && L == nL - 1) /* the logits: the last residual */
            for (size_t i = 0; i < TD; i++) G[(size_t)(nr - 1) * TD + i] += scale * ((const float *)g2.data)[(size_t)b * TD + i];
    }
    free(dn);
    return st;
}

static const char *const g_grads = "blocks.*.attn.hook_[qkv],blocks.*.hook_resid_mid,blocks.*.hook_resid_post";

static lp_status capture_for_grads(lp_model *m) {
    LP_CHECK(lp_hook_capture(m, "blocks.*.ln1.hook_normalized", NULL, 0, NULL));
    return lp_hook_capture(m, "blocks.*.ln1.hook_scale", NULL, 0, NULL);
}

/* The senders' hooks: the first residual (the embeddings), every z, every MLP output. */
static lp_status capture_senders(lp_model *m) {
    LP_CHECK(lp_hook_capture(m, "blocks.0.hook_resid_pre", NULL, 0, NULL));
    LP_CHECK(lp_hook_capture(m, "blocks.*.attn.hook_z", NULL, 0, NULL));
    return lp_hook_capture(m, "blocks.*.hook_mlp_out", NULL, 0, NULL);
}

/* Host copies of the senders' hooks: [0] resid_pre 0, [1 + L] z, [1 + nL + L] mlp_out. */
static lp_status grab_senders(lp_model *m, float **v) {
    int nL = m->cfg.n_layers;
    char nm[96];
    size_t n;
    LP_CHECK(paths_grab(m, "blocks.0.hook_resid_pre", &v[0], &n));
    for (int L = 0; L < nL; L++) {
        snprintf(nm, sizeof nm, "blocks.%d.attn.hook_z", L);
        LP_CHECK(paths_grab(m, nm, &v[1 + L], &n));
        snprintf(nm, sizeof nm, "blocks.%d.hook_mlp_out", L);
        LP_CHECK(paths_grab(m, nm, &v[1 + nL + L], &n));
    }
    return LP_OK;
}

static const float *sender_src(const lp_model *m, float *const *v, int s) {
    int L, k, h;
    paths_sender_decode(m, s, &L, &k, &h);
    return k == PS_EMBED ? v[0] : k == PS_HEAD ? v[1 + L] : v[1 + m->cfg.n_layers + L];
}

/* Integrated gradients: the corrupted prompt with its embeddings moved alpha of the way to
 * the clean ones, alpha at the midpoints of `steps` intervals, the receivers' gradients
 * averaged (as lp_attrib_atp does for nodes). */
static lp_status ig_grads(lp_model *m, const int32_t *corrupted, int T, const lp_metric *mt, const lp_path_opts *o, const frozen *fz,
                          const layer_w *lw, const float *emb_c, const float *emb_x, float *G) {
    int steps = o->ig_steps, per = o->ig_batch > 0 && o->ig_batch < steps ? o->ig_batch : steps;
    size_t ne = (size_t)T * m->cfg.d_model;
    int32_t *rows = malloc((size_t)per * T * sizeof(int32_t)), *ans = malloc(per * sizeof(int32_t)), *wr = malloc(per * sizeof(int32_t));
    int32_t *pos = malloc(per * sizeof(int32_t));
    float *emb = malloc((size_t)per * ne * sizeof(float));
    double *met = malloc(per * sizeof(double));
    lp_status st = rows && ans && wr && pos && emb && met ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory");
    for (int s0 = 0; st == LP_OK && s0 < steps; s0 += per) {
        int sc = steps - s0 < per ? steps - s0 : per;
        for (int j = 0; j < sc; j++) {
            double alpha = (s0 + j + 0.5) / steps;
            for (size_t i = 0; i < ne; i++) emb[(size_t)j * ne + i] = (float)(emb_x[i] + alpha * (emb_c[i] - emb_x[i]));
            memcpy(rows + (size_t)j * T, corrupted, T * sizeof(int32_t));
            ans[j] = mt->answer ? mt->answer[0] : 0, wr[j] = mt->wrong ? mt->wrong[0] : 0, pos[j] = mt->pos ? mt->pos[0] : T - 1;
        }
        lp_metric rm = *mt;
        rm.answer = mt->answer ? ans : NULL, rm.wrong = mt->wrong ? wr : NULL, rm.pos = pos;
        lp_hooks_clear(m);
        lp_edit_spec e = {.kind = LP_EDIT_PATCH, .src = emb, .src_len = (size_t)sc * ne};
        st = lp_hook_edit(m, "hook_embed", &e);
        if (st == LP_OK) st = paths_freeze_apply(m, fz, sc);
        if (st == LP_OK) st = capture_for_grads(m);
        if (st == LP_OK) st = lp_model_grad(m, rows, sc, T, &rm, g_grads, met);
        for (int j = 0; st == LP_OK && j < sc; j++) st = recv_grads(m, lw, fz, j, sc, T, 1.0f / steps, G);
    }
    free(rows), free(ans), free(wr), free(pos), free(emb), free(met);
    return st;
}

void lp_eap_result_free(lp_eap_result *r) {
    free(r->scores);
    r->scores = NULL;
}

lp_status lp_eap(lp_model *m, const int32_t *clean, const int32_t *corrupted, int T, const lp_metric *mt, const lp_path_opts *o,
                 lp_eap_result *res) {
    const lp_config *cf = &m->cfg;
    int nL = cf->n_layers, ns = lp_path_n_senders(m), nr = lp_path_n_receivers(m), ig = o && o->ig_steps > 0;
    size_t TD = (size_t)T * cf->d_model;
    memset(res, 0, sizeof *res);
    res->n_senders = ns, res->n_receivers = nr;
    LP_CHECK(paths_no_user_edits(m, "edge attribution"));
    frozen fz;
    LP_CHECK(paths_freeze_record(m, o ? o->freeze : NULL, clean, T, &fz));
    float **vc = calloc(1 + 2 * (size_t)nL, sizeof *vc), **vx = calloc(1 + 2 * (size_t)nL, sizeof *vx);
    float *G = calloc((size_t)nr * TD, sizeof(float)), *Dl = malloc((size_t)ns * TD * sizeof(float)), *emb_c = NULL, *emb_x = NULL;
    layer_w *lw = calloc(nL, sizeof *lw);
    res->scores = calloc((size_t)ns * nr, sizeof(float));
    lp_status st = vc && vx && G && Dl && lw && res->scores ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory");
    size_t n;
    for (int L = 0; st == LP_OK && L < nL; L++) st = load_layer(m, L, &lw[L]);
    /* the corrupted run: the senders' outputs (and, for integrated gradients, the embeddings) */
    lp_hooks_clear(m);
    if (st == LP_OK) st = capture_senders(m);
    if (st == LP_OK && ig) st = lp_hook_capture(m, "hook_embed", NULL, 0, NULL);
    if (st == LP_OK) st = paths_freeze_apply(m, &fz, 1);
    if (st == LP_OK) st = lp_model_metric(m, corrupted, 1, T, mt, &res->metric_corrupted);
    if (st == LP_OK) st = grab_senders(m, vx);
    if (st == LP_OK && ig) st = paths_grab(m, "hook_embed", &emb_x, &n);
    /* the clean run, with the gradients unless integrated gradients take them */
    lp_hooks_clear(m);
    if (st == LP_OK) st = capture_senders(m);
    if (st == LP_OK && ig) st = lp_hook_capture(m, "hook_embed", NULL, 0, NULL);
    if (st == LP_OK && !ig) st = capture_for_grads(m);
    if (st == LP_OK) st = paths_freeze_apply(m, &fz, 1);
    if (st == LP_OK) st = ig ? lp_model_metric(m, clean, 1, T, mt, &res->metric_clean) : lp_model_grad(m, clean, 1, T, mt, g_grads, &res->metric_clean);
    if (st == LP_OK) st = grab_senders(m, vc);
    if (st == LP_OK && ig) st = paths_grab(m, "hook_embed", &emb_c, &n);
    if (st == LP_OK) st = ig ? ig_grads(m, corrupted, T, mt, o, &fz, lw, emb_c, emb_x, G) : recv_grads(m, lw, &fz, 0, 1, T, 1.0f, G);
    lp_hooks_clear(m);
    /* scores: every sender's delta against every receiver's gradient, one product */
    for (int s = 0; st == LP_OK && s < ns; s++) {
        int L, k, h;
        paths_sender_decode(m, s, &L, &k, &h);
        st = paths_delta(m, s, 0, T, sender_src(m, vc, s), sender_src(m, vx, s), k == PS_HEAD ? lw[L].wo : NULL, Dl + (size_t)s * TD);
    }
    if (st == LP_OK)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, ns, nr, (int)TD, 1.0f, Dl, (int)TD, G, (int)TD, 0.0f, res->scores, nr);
    for (int s = 0; st == LP_OK && s < ns; s++)
        for (int r = 0; r < nr; r++)
            if (!lp_path_is_edge(m, s, r)) res->scores[(size_t)s * nr + r] = 0.0f;
    for (int i = 0; vc && vx && i < 1 + 2 * nL; i++) free(vc[i]), free(vx[i]);
    free(vc), free(vx), free(G), free(Dl), free(emb_c), free(emb_x);
    free_layers(lw, nL);
    paths_freeze_free(&fz);
    if (st != LP_OK) lp_eap_result_free(res);
    return st;
}
