/* rope.c: the rotary tables, built on the host as Hugging Face builds them (inverse
 * frequencies with the rope scaling, angles rounded to float32) and kept on the device: one
 * set for global layers, and for Gemma 3 a second, unscaled, with the local layers' base. */
#include <math.h>
#include <stdlib.h>

#include "model/blocks.h"

/* Inverse frequencies (float32) for base theta; `scaled`: with the config's rope scaling. */
static void inv_freqs(const lp_model *m, double theta, int scaled, float *f) {
    const lp_config *c = &m->cfg;
    int half = c->d_head / 2;
    for (int i = 0; i < half; i++) {
        float e = (float)(2 * i) / (float)c->d_head;
        double inv = 1.0 / pow(theta, (double)e);
        if (scaled && c->rope_kind == LP_ROPE_LINEAR) inv /= c->rope_factor;
        if (scaled && c->rope_kind == LP_ROPE_LLAMA3) { /* transformers' _compute_llama3_parameters */
            double wavelen = 2 * M_PI / inv;
            double low_wl = c->rope_orig_ctx / c->rope_low_freq_factor, high_wl = c->rope_orig_ctx / c->rope_high_freq_factor;
            if (wavelen > low_wl) {
                inv /= c->rope_factor;
            } else if (wavelen >= high_wl) {
                double smooth = (c->rope_orig_ctx / wavelen - c->rope_low_freq_factor) /
                                (c->rope_high_freq_factor - c->rope_low_freq_factor);
                inv = (1 - smooth) * inv / c->rope_factor + smooth * inv;
            }
        }
        if (scaled && m->rope.freq_div) inv /= m->rope.freq_div[i];
        f[i] = (float)inv;
    }
}

/* cos and sin of p * f[i] for positions [0, n_pos), uploaded into fresh device tables. */
static lp_status build(lp_model *m, const float *f, int n_pos, float **cos_d, float **sin_d) {
    lp_ctx *c = &m->ctx;
    int half = m->cfg.d_head / 2;
    size_t n = (size_t)n_pos * half;
    float *cs = malloc(n * sizeof(float)), *sn = malloc(n * sizeof(float));
    lp_status st = cs && sn ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory for rotary tables");
    for (int p = 0; st == LP_OK && p < n_pos; p++)
        for (int i = 0; i < half; i++) {
            float a = (float)p * f[i]; /* the angle rounded as float32, as Hugging Face forms it */
            cs[(size_t)p * half + i] = (float)cos((double)a);
            sn[(size_t)p * half + i] = (float)sin((double)a);
        }
    if (st == LP_OK) st = lp_ctx_alloc(c, n * sizeof(float), (void **)cos_d);
    if (st == LP_OK) st = lp_ctx_alloc(c, n * sizeof(float), (void **)sin_d);
    if (st == LP_OK) st = lp_ctx_to_device(c, *cos_d, cs, n * sizeof(float));
    if (st == LP_OK) st = lp_ctx_to_device(c, *sin_d, sn, n * sizeof(float));
    free(cs);
    free(sn);
    return st;
}

static void release(lp_model *m) {
    mdl_rope *r = &m->rope;
    lp_ctx_release(&m->ctx, r->cos);
    lp_ctx_release(&m->ctx, r->sin);
    lp_ctx_release(&m->ctx, r->cos_local);
    lp_ctx_release(&m->ctx, r->sin_local);
    r->cos = r->sin = r->cos_local = r->sin_local = NULL, r->n = 0;
}

lp_status rope_tables_grow(lp_model *m, int n_pos) {
    if (m->cfg.pos != LP_POS_ROTARY || n_pos <= m->rope.n) return LP_OK;
    release(m);
    float *f = malloc((m->cfg.d_head / 2) * sizeof(float));
    if (!f) LP_FAIL(LP_ERR_OOM, "out of memory for rotary tables");
    inv_freqs(m, m->cfg.rope_theta, 1, f);
    lp_status st = build(m, f, n_pos, &m->rope.cos, &m->rope.sin);
    if (st == LP_OK && m->cfg.rope_theta_local > 0) {
        inv_freqs(m, m->cfg.rope_theta_local, 0, f);
        st = build(m, f, n_pos, &m->rope.cos_local, &m->rope.sin_local);
    }
    free(f);
    if (st != LP_OK) return release(m), st;
    m->rope.n = n_pos;
    return LP_OK;
}

void rope_free(lp_model *m) {
    release(m);
    free(m->rope.freq_div);
    m->rope.freq_div = NULL;
}
