/* vocab.c: the GPU's loss-only unembedding. When no full logits are wanted (no unembed.hook_out,
 * no logits requested: the loss and the mean-loss gradient), the unembedding runs on a device
 * copy of W_U whose rows are padded with zeros to Vp = roundup(d_vocab, 64), so that the GEMM's
 * output width is a multiple of the tensor-core tiles, and over row chunks whose [rows, Vp]
 * logits fit in L2 (VOCAB_L2_BYTES), so that the cross-entropy (or its gradient) reads them
 * back from L2 rather than from memory. The padded columns are exact zeros (zero rows, no
 * bias); the cross-entropy and its gradient read only the first d_vocab columns of each row
 * and the gradient's padded columns are written as zero, so no result ever sees them. */
#include "loupe/ops.h"
#include "model/model_internal.h"

/* A chunk's logits in the context dtype: below the 50 MiB L2 of an H100 / H200 with room
 * for the weight tiles streaming through beside them. */
#define VOCAB_L2_BYTES ((size_t)24 << 20)

int vocab_padded(const lp_model *m) { return (m->cfg.d_vocab + 63) / 64 * 64; }

int vocab_pad_rows(const lp_model *m, size_t cap) {
    if (m->ctx.device == LP_CPU || m->par.tp > 1 || m->cfg.d_vocab < 1 || m->vocab_chunk_rows < 0) return 0;
    size_t Vp = (size_t)vocab_padded(m), rows = VOCAB_L2_BYTES / (Vp * act_elem_bytes(m));
    if (m->vocab_chunk_rows > 0) rows = (size_t)m->vocab_chunk_rows;
    if (rows > cap / Vp) rows = cap / Vp; /* the chunk buffer holds cap elements */
    return rows > (size_t)1 << 30 ? 1 << 30 : (int)rows;
}

/* The padded copy, made on first use (the weights do not change after loading); a vocabulary
 * already a multiple of 64 (SmolLM2's, Gemma's) uses W_U itself, with no copy. */
static lp_status pad_weight(lp_model *m, const void **w) {
    size_t D = m->cfg.d_model, es = act_elem_bytes(m), Vp = (size_t)vocab_padded(m);
    if (Vp == (size_t)m->cfg.d_vocab) return *w = param_ptr(m, m->w.unembed), LP_OK;
    if (!m->unembed_pad) {
        void *p = NULL;
        LP_CHECK(lp_ctx_alloc(&m->ctx, Vp * D * es, &p));
        lp_status st = lp_ctx_memset0(&m->ctx, p, Vp * D * es);
        if (st == LP_OK) st = lp_ctx_copy(&m->ctx, p, param_ptr(m, m->w.unembed), (size_t)m->cfg.d_vocab * D * es);
        if (st != LP_OK) {
            lp_ctx_release(&m->ctx, p);
            return st;
        }
        m->unembed_pad = p;
    }
    *w = m->unembed_pad;
    return LP_OK;
}

lp_status vocab_pad_logits(lp_model *m, void *out, const void *x, int rows) {
    const void *w;
    LP_CHECK(pad_weight(m, &w));
    int Vp = vocab_padded(m);
    LP_CHECK(lp_matmul(&m->ctx, out, x, w, NULL, rows, m->cfg.d_model, Vp, 1));
    /* Gemma 2's cap maps the padding's zeros to zeros */
    if (m->cfg.final_softcap > 0) LP_CHECK(lp_softcap(&m->ctx, out, out, m->cfg.final_softcap, (size_t)rows * Vp));
    return LP_OK;
}

lp_status vocab_pad_dx(lp_model *m, void *dx, const void *dlogits, int rows) {
    const void *w;
    LP_CHECK(pad_weight(m, &w));
    return lp_matmul(&m->ctx, dx, dlogits, w, NULL, rows, vocab_padded(m), m->cfg.d_model, 0);
}

lp_status vocab_pad_loss(lp_model *m, int N, int chunk) {
    const lp_config *cf = &m->cfg;
    size_t es = act_elem_bytes(m);
    for (int r0 = 0; r0 < N; r0 += chunk) {
        int rows = N - r0 < chunk ? N - r0 : chunk;
        LP_CHECK(vocab_pad_logits(m, m->a.logits, (const char *)m->a.ln_out + (size_t)r0 * cf->d_model * es, rows));
        LP_CHECK(lp_cross_entropy_ld(&m->ctx, m->a.loss + r0, m->a.logits, m->a.tgt + r0, rows, cf->d_vocab, vocab_padded(m)));
    }
    return LP_OK;
}

void vocab_pad_free(lp_model *m) {
    lp_ctx_release(&m->ctx, m->unembed_pad);
    m->unembed_pad = NULL;
}
