/* test_sae_sparse_cuda.c: the SAE ops of sparse training on the GPU against their CPU twins
 * (host/ops/cpu/sae_sparse.c), through the public dispatch, on awkward shapes and the
 * benchmark's (d_in 768, d_sae 24576, k 32):
 *  - lp_sae_topk_among (AuxK over the dead latents): indices and values exact; and against
 *    the former dense path (pre masked to the dead latents, 0 elsewhere, then lp_sae_topk)
 *    on both devices: the same latents with positive values in the same order, and the
 *    AuxK reconstruction and encoder gradient from either selection identical bit for bit
 *    (entries of value 0 add nothing).
 *  - lp_sae_latent_lists: the lists exact; lp_sae_encode_sparse_grad_lists: against the CPU
 *    within nmse 1e-10 (fp32 sums in the same token order, FMA contraction only), and on the
 *    CPU bit for bit equal to lp_sae_encode_sparse_grad (the same sums in the same order).
 *  - lp_sae_decode_sparse_grad_lists: on the CPU bit for bit equal to
 *    lp_sae_decode_sparse_grad; on the GPU the same bits on two runs, rows no token chose
 *    untouched, and against the CPU within nmse 1e-10 (dval: fp32 lane sums against the
 *    CPU's double dot; dW_dec: the same token order, FMA contraction only).
 *  - lp_sae_to_bf16: every bit pattern equal.
 *  - lp_sae_matmul_bf16: against the CPU twin (exact fp32 products of bf16 values, sums in
 *    another order) nmse 1e-12; against the fp32 GEMM of the unrounded operands (what the
 *    bf16 copy costs): nmse 1e-5 relative to the fp32 pre-activations (two bf16 roundings
 *    of relative size <= 2^-9 per product: ~3e-6 expected for sums of random terms).
 * Without a GPU every test skips, saying why (LOUPE_REQUIRE_GPU=1 turns the skip into a
 * failure); `make test` runs it on the CUDA emulator. */
#include "loupe/ops.h"
#include "loupe/sae_ops.h"
#include "gputest.h"

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    cr_assert(p != NULL);
    return p;
}

static size_t n_differ(const void *a, const void *b, size_t n, size_t elem) {
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) bad += memcmp((const char *)a + i * elem, (const char *)b + i * elem, elem) != 0;
    return bad;
}

/* Every `every`-th latent from `first`, at most S: an increasing candidate list. */
static int32_t *cand_list(int S, int first, int every, int *n) {
    int32_t *c = xmalloc((size_t)S * sizeof(int32_t));
    *n = 0;
    for (int s = first; s < S; s += every) c[(*n)++] = s;
    return c;
}

/* The former AuxK selection: pre kept on the candidates, 0 elsewhere (jumprelu with a
 * -inf / +inf threshold), then the top ka of every latent. */
static void dense_aux(lp_ctx *c, int32_t *idx, float *val, const float *pre, float *masked, float *theta,
                      const int32_t *cand_h, int nc, int N, int S, int ka) {
    float *th = xmalloc((size_t)S * 4);
    for (int s = 0; s < S; s++) th[s] = INFINITY;
    for (int i = 0; i < nc; i++) th[cand_h[i]] = -INFINITY;
    OK(lp_ctx_to_device(c, theta, th, (size_t)S * 4));
    OK(lp_sae_jumprelu(c, masked, pre, theta, N, S));
    OK(lp_sae_topk(c, idx, val, masked, N, S, ka));
    free(th);
}

/* Checks the new selection (idx/val) against the dense one (didx/dval) of one device:
 * positive entries equal and in the same place, the rest 0 on both sides. */
static void expect_same_positive(const char *what, const int32_t *idx, const float *val, const int32_t *didx,
                                 const float *dval, size_t n) {
    size_t bad = 0;
    for (size_t e = 0; e < n; e++) {
        if (dval[e] > 0 || val[e] > 0) bad += !(idx[e] == didx[e] && memcmp(&val[e], &dval[e], 4) == 0);
        else bad += val[e] != 0 || dval[e] != 0;
    }
    fprintf(stderr, "  %-58s %zu of %zu positive selections differ from the dense path (must be 0)\n", what, bad, n);
    cr_expect(bad == 0, "%s: %zu of %zu entries differ from the dense masked path", what, bad, n);
}

Test(sae_sparse_cuda, topk_among_matches_the_cpu_and_the_dense_path) {
    LP_TEST_REQUIRE_GPU();
    /* (N, S, every, ka): one candidate, a few, all, half of the benchmark, a sparse tenth */
    static const int shapes[][4] = {{3, 1, 1, 1}, {5, 33, 7, 3}, {4, 50, 1, 50}, {EMU_CAP(64, 3), 24576, 2, 384},
                                    {7, 1000, 10, 64}};
    for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++)
        for (int variant = 0; variant < 2; variant++) { /* continuous; mostly negative (fewer positives than ka) */
            const int N = shapes[si][0], S = shapes[si][1];
            int nc;
            int32_t *cand = cand_list(S, si % 2, shapes[si][2], &nc);
            const int ka = shapes[si][3] < nc ? shapes[si][3] : nc;
            const uint64_t seed = 900 + si * 2 + variant;
            float *pre = lp_test_rand((size_t)N * S, seed, variant ? -3.0f : -1.0f, variant ? 0.2f : 1.0f);
            const size_t nk = (size_t)N * ka;
            int32_t *ri = xmalloc(nk * 4), *di = xmalloc(nk * 4);
            float *rv = xmalloc(nk * 4), *dv = xmalloc(nk * 4), *masked = xmalloc((size_t)N * S * 4), *th = xmalloc((size_t)S * 4);
            OK(lp_sae_topk_among(cpu(), ri, rv, pre, cand, nc, N, S, ka));
            char label[96];
            snprintf(label, sizeof label, "cpu N=%d S=%d candidates=%d ka=%d %s", N, S, nc, ka, variant ? "negative" : "mixed");
            dense_aux(cpu(), di, dv, pre, masked, th, cand, nc, N, S, ka);
            expect_same_positive(label, ri, rv, di, dv, nk);

            gpu g;
            gpu_init(&g, LP_F32);
            float *dpre = gpu_put(&g, pre, (size_t)N * S * 4), *gval = gpu_alloc(&g, nk * 4), *gdval = gpu_alloc(&g, nk * 4);
            int32_t *gcand = gpu_put(&g, cand, (size_t)nc * 4), *gidx = gpu_alloc(&g, nk * 4), *gdidx = gpu_alloc(&g, nk * 4);
            float *gmasked = gpu_alloc(&g, (size_t)N * S * 4), *gth = gpu_alloc(&g, (size_t)S * 4);
            OK(lp_sae_topk_among(&g.c, gidx, gval, dpre, gcand, nc, N, S, ka));
            dense_aux(&g.c, gdidx, gdval, dpre, gmasked, gth, cand, nc, N, S, ka);
            int32_t *hi = gpu_get(&g, gidx, nk * 4), *hdi = gpu_get(&g, gdidx, nk * 4);
            float *hv = gpu_get(&g, gval, nk * 4), *hdv = gpu_get(&g, gdval, nk * 4);
            const size_t bi = n_differ(hi, ri, nk, 4), bv = n_differ(hv, rv, nk, 4);
            fprintf(stderr, "  %-58s gpu against cpu: %zu indices, %zu values differ (must be 0)\n", label, bi, bv);
            cr_expect(bi == 0 && bv == 0, "%s: gpu topk_among differs from the cpu (%zu indices, %zu values)", label, bi, bv);
            label[0] = 'g', label[1] = 'p', label[2] = 'u';
            expect_same_positive(label, hi, hv, hdi, hdv, nk);
            gpu_done(&g, label);
            free(cand), free(pre), free(ri), free(di), free(rv), free(dv), free(masked), free(th);
            free(hi), free(hdi), free(hv), free(hdv);
        }
}

/* The AuxK pieces downstream of the selection, from the new and the dense selection: the
 * reconstruction of the residual and the encoder gradient, bit for bit equal. */
Test(sae_sparse_cuda, auxk_loss_and_gradient_equal_the_dense_path) {
    LP_TEST_REQUIRE_GPU();
    enum { NN = 40, DD = 24, SS = 300, KA = 12 };
    int nc;
    int32_t *cand = cand_list(SS, 1, 3, &nc);
    float *pre = lp_test_rand((size_t)NN * SS, 77, -2.0f, 0.3f); /* many rows with fewer than KA positive */
    float *W = lp_test_rand((size_t)SS * DD, 78, -1, 1), *x = lp_test_rand((size_t)NN * DD, 79, -1, 1);
    float *e = lp_test_rand((size_t)NN * DD, 80, -1, 1);
    lp_ctx *dev[2] = {cpu(), NULL};
    gpu g;
    gpu_init(&g, LP_F32);
    dev[1] = &g.c;
    for (int di = 0; di < 2; di++) {
        lp_ctx *c = dev[di];
        float *ehat[2], *dWe[2], *dbe[2], *val[2], *dvl[2];
        int32_t *idx[2];
        void *(*put)(gpu *, const void *, size_t) = gpu_put;
        int32_t *dcand = di ? put(&g, cand, (size_t)nc * 4) : cand;
        float *dpre = di ? put(&g, pre, (size_t)NN * SS * 4) : pre, *dW = di ? put(&g, W, (size_t)SS * DD * 4) : W;
        float *dx = di ? put(&g, x, (size_t)NN * DD * 4) : x, *de = di ? put(&g, e, (size_t)NN * DD * 4) : e;
        float *masked = di ? gpu_alloc(&g, (size_t)NN * SS * 4) : xmalloc((size_t)NN * SS * 4);
        float *th = di ? gpu_alloc(&g, SS * 4) : xmalloc(SS * 4);
        int32_t *lists = di ? gpu_alloc(&g, lp_sae_latent_lists_len(NN, KA, SS) * 4) : xmalloc(lp_sae_latent_lists_len(NN, KA, SS) * 4);
        for (int w = 0; w < 2; w++) {
#define A(bytes) (di ? gpu_alloc(&g, bytes) : calloc(1, bytes))
            idx[w] = A((size_t)NN * KA * 4), val[w] = A((size_t)NN * KA * 4), dvl[w] = A((size_t)NN * KA * 4);
            ehat[w] = A((size_t)NN * DD * 4), dWe[w] = A((size_t)DD * SS * 4), dbe[w] = A((size_t)SS * 4);
#undef A
            OK(lp_ctx_memset0(c, dWe[w], (size_t)DD * SS * 4));
            OK(lp_ctx_memset0(c, dbe[w], (size_t)SS * 4));
            if (w == 0) OK(lp_sae_topk_among(c, idx[w], val[w], dpre, dcand, nc, NN, SS, KA));
            else dense_aux(c, idx[w], val[w], dpre, masked, th, cand, nc, NN, SS, KA);
            OK(lp_sae_decode_sparse(c, ehat[w], idx[w], val[w], dW, NULL, NN, KA, DD));
            OK(lp_sae_decode_sparse_grad(c, dvl[w], dWe[w] /* scratch: overwritten below */, de, idx[w], val[w], dW, NN, KA, DD));
            OK(lp_ctx_memset0(c, dWe[w], (size_t)DD * SS * 4));
            OK(lp_sae_relu_grad(c, dvl[w], dvl[w], val[w], (size_t)NN * KA));
            OK(lp_sae_latent_lists(c, lists, idx[w], NN, KA, SS));
            OK(lp_sae_encode_sparse_grad_lists(c, dWe[w], dbe[w], dx, lists, dvl[w], NN, KA, DD, SS));
        }
        double s0[4], s1[4];
        OK(lp_sae_recon_sums(c, s0, de, ehat[0], NN, DD));
        OK(lp_sae_recon_sums(c, s1, de, ehat[1], NN, DD));
        float *h[6];
        size_t nb[3] = {(size_t)NN * DD * 4, (size_t)DD * SS * 4, (size_t)SS * 4};
        float **bufs[3] = {ehat, dWe, dbe};
        size_t bad = 0;
        for (int b = 0; b < 3; b++) {
            for (int w = 0; w < 2; w++) h[2 * b + w] = di ? gpu_get(&g, bufs[b][w], nb[b]) : bufs[b][w];
            bad += n_differ(h[2 * b], h[2 * b + 1], nb[b] / 4, 4);
        }
        fprintf(stderr, "  auxk %s: loss %.9g (dense path %.9g); %zu values of e_hat, dW_enc, db_enc differ (must be 0)\n",
                di ? "gpu" : "cpu", s0[0], s1[0], bad);
        cr_expect(s0[0] == s1[0] && bad == 0, "auxk on the %s: the dense path gives another loss or gradient", di ? "gpu" : "cpu");
        if (di)
            for (int i = 0; i < 6; i++) free(h[i]);
        else {
            for (int w = 0; w < 2; w++) free(idx[w]), free(val[w]), free(dvl[w]), free(ehat[w]), free(dWe[w]), free(dbe[w]);
            free(masked), free(th), free(lists);
        }
    }
    gpu_done(&g, "auxk");
    free(cand), free(pre), free(W), free(x), free(e);
}

Test(sae_sparse_cuda, latent_lists_and_the_encoder_gradient) {
    LP_TEST_REQUIRE_GPU();
    static const int shapes[][4] = {{1, 1, 1, 1}, {31, 7, 33, 50}, {33, 300, 130, 400}, {EMU_CAP(256, 24), 32, 768, 24576}};
    for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
        const int N = shapes[si][0], K = shapes[si][1], D = shapes[si][2], S = shapes[si][3];
        const uint64_t seed = 950 + si;
        const size_t nl = lp_sae_latent_lists_len(N, K, S);
        int32_t *idx = lp_test_rand_idx(N, K, S, seed), *rl = xmalloc(nl * 4);
        if (si == 2) /* a hot latent: every token chose latent 5 */
            for (int n = 0; n < N; n++) idx[(size_t)n * K] = 5, idx[(size_t)n * K + 1] = idx[(size_t)n * K + 1] == 5 ? 6 : idx[(size_t)n * K + 1];
        float *x = lp_test_rand((size_t)N * D, seed + 1, -1, 1), *dpre = lp_test_rand((size_t)N * K, seed + 2, -1, 1);
        float *W0 = lp_test_rand((size_t)D * S, seed + 3, -1, 1), *b0 = lp_test_rand(S, seed + 4, -1, 1);
        float *rW = xmalloc((size_t)D * S * 4), *rb = xmalloc((size_t)S * 4), *oW = xmalloc((size_t)D * S * 4), *ob = xmalloc((size_t)S * 4);
        memcpy(rW, W0, (size_t)D * S * 4), memcpy(rb, b0, (size_t)S * 4), memcpy(oW, W0, (size_t)D * S * 4), memcpy(ob, b0, (size_t)S * 4);
        OK(lp_sae_latent_lists(cpu(), rl, idx, N, K, S));
        OK(lp_sae_encode_sparse_grad_lists(cpu(), rW, rb, x, rl, dpre, N, K, D, S));
        OK(lp_sae_encode_sparse_grad(cpu(), oW, ob, x, idx, dpre, N, K, D, S));
        char label[96];
        snprintf(label, sizeof label, "N=%d K=%d D=%d S=%d", N, K, D, S);
        const size_t bo = n_differ(rW, oW, (size_t)D * S, 4) + n_differ(rb, ob, S, 4);
        fprintf(stderr, "  encode grad lists %-30s cpu: %zu values differ from encode_sparse_grad (must be 0)\n", label, bo);
        cr_expect(bo == 0, "%s: the list-based CPU gradient differs from lp_sae_encode_sparse_grad", label);

        gpu g;
        gpu_init(&g, LP_F32);
        int32_t *gidx = gpu_put(&g, idx, (size_t)N * K * 4), *gl = gpu_alloc(&g, nl * 4);
        float *gx = gpu_put(&g, x, (size_t)N * D * 4), *gd = gpu_put(&g, dpre, (size_t)N * K * 4);
        float *gW = gpu_put(&g, W0, (size_t)D * S * 4), *gb = gpu_put(&g, b0, (size_t)S * 4);
        OK(lp_sae_latent_lists(&g.c, gl, gidx, N, K, S));
        OK(lp_sae_encode_sparse_grad_lists(&g.c, gW, gb, gx, gl, gd, N, K, D, S));
        int32_t *hl = gpu_get(&g, gl, nl * 4);
        /* the scratch words between the starts and the entries are not part of the contract */
        const size_t bl = n_differ(hl, rl, (size_t)S + 1, 4) + n_differ(hl + 2 * (size_t)S + 1, rl + 2 * (size_t)S + 1, (size_t)N * K, 4);
        fprintf(stderr, "  latent lists      %-30s gpu: %zu words differ from the cpu (must be 0)\n", label, bl);
        cr_expect(bl == 0, "%s: the GPU's latent lists differ from the CPU's", label);
        float *hW = gpu_get(&g, gW, (size_t)D * S * 4), *hb = gpu_get(&g, gb, (size_t)S * 4);
        const lp_cmp cw = lp_compare_f(hW, rW, (size_t)D * S), cb = lp_compare_f(hb, rb, S);
        char what[160];
        snprintf(what, sizeof what, "encode_sparse_grad_lists dW_enc %s", label);
        LP_EXPECT_WITHIN(what, seed, cw, nmse, 1e-10);
        snprintf(what, sizeof what, "encode_sparse_grad_lists db_enc %s", label);
        LP_EXPECT_WITHIN(what, seed, cb, nmse, 1e-10);
        gpu_done(&g, label);
        free(idx), free(rl), free(x), free(dpre), free(W0), free(b0), free(rW), free(rb), free(oW), free(ob), free(hl), free(hW), free(hb);
    }
}

Test(sae_sparse_cuda, the_decoder_gradient_from_the_lists) {
    LP_TEST_REQUIRE_GPU();
    static const int shapes[][4] = {{1, 1, 1, 1}, {31, 7, 33, 50}, {33, 300, 130, 400}, {EMU_CAP(256, 24), 32, 768, 24576}};
    for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
        const int N = shapes[si][0], K = shapes[si][1], D = shapes[si][2], S = shapes[si][3];
        const uint64_t seed = 1150 + si;
        const size_t nl = lp_sae_latent_lists_len(N, K, S), NK = (size_t)N * K;
        int32_t *idx = lp_test_rand_idx(N, K, S, seed), *rl = xmalloc(nl * 4);
        if (si == 2) /* a hot latent: every token chose latent 5 */
            for (int n = 0; n < N; n++) idx[(size_t)n * K] = 5, idx[(size_t)n * K + 1] = idx[(size_t)n * K + 1] == 5 ? 6 : idx[(size_t)n * K + 1];
        float *dout = lp_test_rand((size_t)N * D, seed + 1, -1, 1), *val = lp_test_rand(NK, seed + 2, 0, 2);
        float *W = lp_test_rand((size_t)S * D, seed + 3, -1, 1), *dW0 = lp_test_rand((size_t)S * D, seed + 4, -1, 1);
        float *rW = xmalloc((size_t)S * D * 4), *oW = xmalloc((size_t)S * D * 4), *rv = xmalloc(NK * 4), *ov = xmalloc(NK * 4);
        memcpy(rW, dW0, (size_t)S * D * 4), memcpy(oW, dW0, (size_t)S * D * 4);
        OK(lp_sae_latent_lists(cpu(), rl, idx, N, K, S));
        OK(lp_sae_decode_sparse_grad_lists(cpu(), rv, rW, dout, idx, rl, val, W, N, K, D, S));
        OK(lp_sae_decode_sparse_grad(cpu(), ov, oW, dout, idx, val, W, N, K, D));
        char label[96];
        snprintf(label, sizeof label, "N=%d K=%d D=%d S=%d", N, K, D, S);
        const size_t bo = n_differ(rW, oW, (size_t)S * D, 4) + n_differ(rv, ov, NK, 4);
        fprintf(stderr, "  decode grad lists %-30s cpu: %zu values differ from decode_sparse_grad (must be 0)\n", label, bo);
        cr_expect(bo == 0, "%s: the list-based CPU decoder gradient differs from lp_sae_decode_sparse_grad", label);

        gpu g;
        gpu_init(&g, LP_F32);
        int32_t *gidx = gpu_put(&g, idx, NK * 4), *gl = gpu_alloc(&g, nl * 4);
        float *gd = gpu_put(&g, dout, (size_t)N * D * 4), *gv = gpu_put(&g, val, NK * 4), *gWt = gpu_put(&g, W, (size_t)S * D * 4);
        float *gdW[2], *gdv[2], *hW[2], *hv[2];
        OK(lp_sae_latent_lists(&g.c, gl, gidx, N, K, S));
        for (int run = 0; run < 2; run++) { /* twice: the same bits on every run */
            gdW[run] = gpu_put(&g, dW0, (size_t)S * D * 4), gdv[run] = gpu_alloc(&g, NK * 4);
            OK(lp_sae_decode_sparse_grad_lists(&g.c, gdv[run], gdW[run], gd, gidx, gl, gv, gWt, N, K, D, S));
            hW[run] = gpu_get(&g, gdW[run], (size_t)S * D * 4), hv[run] = gpu_get(&g, gdv[run], NK * 4);
        }
        const size_t br = n_differ(hW[0], hW[1], (size_t)S * D, 4) + n_differ(hv[0], hv[1], NK, 4);
        fprintf(stderr, "  decode grad lists %-30s gpu: %zu values differ between two runs (must be 0)\n", label, br);
        cr_expect(br == 0, "%s: the GPU decoder gradient differs between runs", label);
        /* rows no token chose keep their values exactly */
        size_t untouched_bad = 0;
        for (int s = 0; s < S; s++)
            if (rl[s] == rl[s + 1]) untouched_bad += n_differ(hW[0] + (size_t)s * D, dW0 + (size_t)s * D, (size_t)D, 4);
        cr_expect(untouched_bad == 0, "%s: %zu values of rows no token chose were written", label, untouched_bad);
        const lp_cmp cw = lp_compare_f(hW[0], rW, (size_t)S * D), cv = lp_compare_f(hv[0], rv, NK);
        char what[160];
        snprintf(what, sizeof what, "decode_sparse_grad_lists dW_dec %s", label);
        LP_EXPECT_WITHIN(what, seed, cw, nmse, 1e-10);
        snprintf(what, sizeof what, "decode_sparse_grad_lists dval %s", label);
        LP_EXPECT_WITHIN(what, seed, cv, nmse, 1e-10);
        gpu_done(&g, label);
        for (int run = 0; run < 2; run++) free(hW[run]), free(hv[run]);
        free(idx), free(rl), free(dout), free(val), free(W), free(dW0), free(rW), free(oW), free(rv), free(ov);
    }
}

Test(sae_sparse_cuda, bf16_copy_and_the_bf16_encoder_gemm) {
    LP_TEST_REQUIRE_GPU();
    /* (N, K = d_in, M = d_sae): odd, the benchmark's width (rows capped on the emulator) */
    static const int shapes[][3] = {{1, 1, 1}, {7, 33, 50}, {EMU_CAP(128, 16), 768, EMU_CAP(24576, 4096)}};
    for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++)
        for (int with_bias = 0; with_bias < 2; with_bias++) {
            const int N = shapes[si][0], K = shapes[si][1], M = shapes[si][2];
            const uint64_t seed = 990 + si * 2 + with_bias;
            float *x = lp_test_rand((size_t)N * K, seed, -2, 2), *w = lp_test_rand((size_t)K * M, seed + 1, -0.1f, 0.1f);
            float *bias = with_bias ? lp_test_rand(M, seed + 2, -1, 1) : NULL;
            uint16_t *xb = xmalloc((size_t)N * K * 2), *wb = xmalloc((size_t)K * M * 2);
            OK(lp_sae_to_bf16(cpu(), xb, x, (size_t)N * K));
            OK(lp_sae_to_bf16(cpu(), wb, w, (size_t)K * M));
            float *ref = xmalloc((size_t)N * M * 4), *f32 = xmalloc((size_t)N * M * 4);
            OK(lp_sae_matmul_bf16(cpu(), ref, xb, wb, bias, N, K, M));
            OK(lp_matmul(cpu(), f32, x, w, bias, N, K, M, 0)); /* the unrounded operands */

            gpu g;
            gpu_init(&g, LP_F32);
            float *gx = gpu_put(&g, x, (size_t)N * K * 4), *gw = gpu_put(&g, w, (size_t)K * M * 4);
            float *gbias = bias ? gpu_put(&g, bias, (size_t)M * 4) : NULL, *gout = gpu_alloc(&g, (size_t)N * M * 4);
            uint16_t *gxb = gpu_alloc(&g, (size_t)N * K * 2), *gwb = gpu_alloc(&g, (size_t)K * M * 2);
            OK(lp_sae_to_bf16(&g.c, gxb, gx, (size_t)N * K));
            OK(lp_sae_to_bf16(&g.c, gwb, gw, (size_t)K * M));
            OK(lp_sae_matmul_bf16(&g.c, gout, gxb, gwb, gbias, N, K, M));
            uint16_t *hxb = gpu_get(&g, gxb, (size_t)N * K * 2), *hwb = gpu_get(&g, gwb, (size_t)K * M * 2);
            float *out = gpu_get(&g, gout, (size_t)N * M * 4);
            char label[96], what[160];
            snprintf(label, sizeof label, "N=%d K=%d M=%d%s", N, K, M, with_bias ? " bias" : "");
            const size_t bb = n_differ(hxb, xb, (size_t)N * K, 2) + n_differ(hwb, wb, (size_t)K * M, 2);
            fprintf(stderr, "  to_bf16 %-40s %zu bit patterns differ from the cpu (must be 0)\n", label, bb);
            cr_expect(bb == 0, "%s: to_bf16 differs from the CPU", label);
            snprintf(what, sizeof what, "matmul_bf16 gpu vs cpu twin %s", label);
            LP_EXPECT_WITHIN(what, seed, lp_compare_f(out, ref, (size_t)N * M), nmse, 1e-12);
            snprintf(what, sizeof what, "matmul_bf16 vs fp32 operands %s", label);
            LP_EXPECT_WITHIN(what, seed, lp_compare_f(out, f32, (size_t)N * M), nmse, 1e-5);
            gpu_done(&g, label);
            free(x), free(w), free(bias), free(xb), free(wb), free(ref), free(f32), free(hxb), free(hwb), free(out);
        }
}
