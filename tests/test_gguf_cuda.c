/* test_gguf_cuda.c: the CUDA dequantizer (kernels/dequant.cu) against the CPU reference
 * (host/ops/cpu/dequant.c, itself checked against gguf-py by test_gguf.c), through lp_dequant.
 *
 * Both sides do the same fp32 operations (the kernel forbids FMA contraction), so every
 * output dtype (F32, BF16, F16) must match bit for bit: budget 0. Inputs: the gguf-py
 * fixture blocks of every supported type; long runs of fully random blocks (random scales
 * too, so inf and NaN occur: NaN must stay NaN, payloads aside) from a source at an odd
 * address; and, when models/ has them, whole tensors of the SmolLM2 and Gemma 3 GGUFs.
 * Every device output sits between guard bytes, checked after the kernel. Without a GPU
 * every test skips, saying why (LOUPE_REQUIRE_GPU=1 turns the skip into a failure). */
#include <unistd.h>

#include "loupe/gguf.h"
#include "loupe/safetensors.h"
#include "testutil.h"

#define GGUF_DIR LP_FIXTURES "/gguf"
#define MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define GUARD 256
#define GUARD_BYTE 0xA5

#define OK(expr)                                                                            \
    do {                                                                                    \
        lp_status s_ = (expr);                                                              \
        cr_assert_eq(s_, LP_OK, "%s: %s: %s", #expr, lp_status_name(s_), lp_last_error());  \
    } while (0)

/* Q5_0 last, so the other types keep their random-block seeds */
static const char *SUPPORTED[] = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "Q5_0"};
static const int SUPPORTED_ID[] = {LP_GGML_F32, LP_GGML_F16, LP_GGML_BF16, LP_GGML_Q8_0, LP_GGML_Q4_0,
                                   LP_GGML_Q4_1, LP_GGML_Q4_K, LP_GGML_Q5_K, LP_GGML_Q6_K, LP_GGML_Q5_0};
#define N_SUPPORTED 10
static const lp_dtype OUT[3] = {LP_F32, LP_BF16, LP_F16};

static lp_ctx *ctx(lp_device dev) {
    static lp_ctx c[2];
    static int ready[2];
    if (!ready[dev]) {
        OK(lp_ctx_init(&c[dev], dev, dev == LP_CUDA ? LP_BF16 : LP_F32));
        ready[dev] = 1;
    }
    return &c[dev];
}

static int is_nan(const void *p, lp_dtype dt) {
    if (dt == LP_F32) {
        uint32_t u;
        memcpy(&u, p, 4);
        return (u & 0x7fffffffu) > 0x7f800000u;
    }
    uint16_t h;
    memcpy(&h, p, 2);
    return dt == LP_BF16 ? (h & 0x7fff) > 0x7f80 : (h & 0x7fff) > 0x7c00;
}

/* Dequantizes n elements of `type` from host bytes src on both devices into dt and
 * returns the number of elements that differ (bitwise; any NaN matches any NaN). */
static size_t gpu_vs_cpu(const char *what, const uint8_t *src, size_t src_bytes, int type, int64_t n, lp_dtype dt) {
    lp_ctx *g = ctx(LP_CUDA);
    const size_t w = lp_dtype_size(dt), out_bytes = (size_t)n * w;
    uint8_t *want = malloc(out_bytes + 1), *got = malloc(out_bytes + 2 * GUARD);
    cr_assert(want && got);
    OK(lp_dequant(ctx(LP_CPU), want, dt, src, type, n));

    void *dsrc, *dout;
    OK(lp_ctx_alloc(g, src_bytes + 1, &dsrc));
    OK(lp_ctx_alloc(g, out_bytes + 2 * GUARD, &dout));
    uint8_t *odd = (uint8_t *)dsrc + 1; /* the kernel must not need an aligned source */
    OK(lp_ctx_to_device(g, odd, src, src_bytes));
    memset(got, GUARD_BYTE, out_bytes + 2 * GUARD);
    OK(lp_ctx_to_device(g, dout, got, out_bytes + 2 * GUARD));
    OK(lp_dequant(g, (uint8_t *)dout + GUARD, dt, odd, type, n));
    OK(lp_ctx_sync(g));
    OK(lp_ctx_to_host(g, got, dout, out_bytes + 2 * GUARD));
    lp_ctx_release(g, dsrc);
    lp_ctx_release(g, dout);

    size_t guard_bad = 0, bad = 0;
    for (size_t j = 0; j < GUARD; j++)
        guard_bad += (got[j] != GUARD_BYTE) + (got[GUARD + out_bytes + j] != GUARD_BYTE);
    cr_expect_eq(guard_bad, 0, "%s: %zu guard bytes overwritten", what, guard_bad);
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *a = got + GUARD + i * w, *b = want + i * w;
        if (memcmp(a, b, w) == 0 || (is_nan(a, dt) && is_nan(b, dt))) continue;
        if (!bad) {
            uint32_t x = 0, y = 0;
            memcpy(&x, a, w);
            memcpy(&y, b, w);
            fprintf(stderr, "  %s: first difference at %lld: gpu 0x%x, cpu 0x%x\n", what, (long long)i, x, y);
        }
        bad++;
    }
    fprintf(stderr, "  %-44s %10lld elements, %zu differ (must be exact)\n", what, (long long)n, bad);
    free(want);
    free(got);
    return bad;
}

Test(gguf_cuda, fixture_blocks) {
    LP_TEST_REQUIRE_GPU();
    lp_st_file f[2]; /* Q5_0's blocks came later, in a file of their own */
    OK(lp_st_open(&f[0], GGUF_DIR "/quant_blocks.safetensors"));
    OK(lp_st_open(&f[1], GGUF_DIR "/quant_blocks_q5_0.safetensors"));
    for (int i = 0; i < N_SUPPORTED; i++) {
        char name[64];
        snprintf(name, sizeof name, "%s.raw", SUPPORTED[i]);
        const lp_st_tensor *raw = lp_st_find(&f[SUPPORTED_ID[i] == LP_GGML_Q5_0], name);
        cr_assert(raw != NULL, "%s", name);
        const int64_t n = (int64_t)(raw->nbytes / lp_ggml_block_bytes(SUPPORTED_ID[i])) *
                          lp_ggml_block_elems(SUPPORTED_ID[i]);
        for (int d = 0; d < 3; d++) {
            char what[96];
            snprintf(what, sizeof what, "fixture %s -> %s", SUPPORTED[i], lp_dtype_name(OUT[d]));
            cr_expect_eq(gpu_vs_cpu(what, raw->data, raw->nbytes, SUPPORTED_ID[i], n, OUT[d]), 0, "%s", what);
        }
    }
    lp_st_close(&f[0]);
    lp_st_close(&f[1]);
}

/* Fully random bytes, scales included, over awkward block counts. */
Test(gguf_cuda, random_blocks) {
    LP_TEST_REQUIRE_GPU();
    static const int64_t blocks[] = {1, 3, 33, 4099};
    for (int i = 0; i < N_SUPPORTED; i++)
        for (size_t k = 0; k < sizeof blocks / sizeof blocks[0]; k++) {
            const uint64_t seed = 1000 + 10 * i + k;
            const int type = SUPPORTED_ID[i];
            const int64_t n = blocks[k] * lp_ggml_block_elems(type) * (lp_ggml_block_elems(type) == 1 ? 32 : 1);
            const size_t bytes = lp_ggml_bytes(type, n);
            uint8_t *src = malloc(bytes);
            uint64_t s = seed;
            for (size_t j = 0; j < bytes; j++) src[j] = (uint8_t)(lp_test_next(&s) >> 56);
            for (int d = 0; d < 3; d++) {
                char what[96];
                snprintf(what, sizeof what, "random %s x%lld -> %s (seed %llu)", SUPPORTED[i], (long long)blocks[k],
                         lp_dtype_name(OUT[d]), (unsigned long long)seed);
                cr_expect_eq(gpu_vs_cpu(what, src, bytes, type, n, OUT[d]), 0, "%s", what);
            }
            free(src);
        }
}

Test(gguf_cuda, bad_arguments) {
    LP_TEST_REQUIRE_GPU();
    void *d;
    OK(lp_ctx_alloc(ctx(LP_CUDA), 4096, &d));
    cr_expect_eq(lp_dequant(ctx(LP_CUDA), d, LP_F32, d, 16, 256), LP_ERR_ARG);
    cr_expect_eq(lp_dequant(ctx(LP_CUDA), d, LP_F32, d, LP_GGML_Q8_0, 31), LP_ERR_ARG);
    cr_expect_eq(lp_dequant(ctx(LP_CUDA), d, LP_I32, d, LP_GGML_Q8_0, 32), LP_ERR_ARG);
    OK(lp_dequant(ctx(LP_CUDA), d, LP_F32, d, LP_GGML_Q8_0, 0));
    lp_ctx_release(ctx(LP_CUDA), d);
}

Test(gguf_cuda, smollm2_tensors) {
    LP_TEST_REQUIRE_GPU();
    if (access(MODEL, R_OK) != 0) cr_skip_test("%s is absent (make model fetches it)", MODEL);
    lp_gguf *g;
    OK(lp_gguf_open(MODEL, &g));
    static const char *names[] = {"token_embd.weight", "blk.0.ffn_down.weight", "blk.29.attn_q.weight",
                                  "output_norm.weight"};
    for (int i = 0; i < 4; i++) {
        const lp_gguf_tensor *t = lp_gguf_find_tensor(g, names[i]);
        cr_assert(t != NULL, "%s", names[i]);
        for (int d = 0; d < 2; d++) {
            char what[96];
            snprintf(what, sizeof what, "SmolLM2 %s (%s) -> %s", t->name, lp_ggml_type_name(t->type),
                     lp_dtype_name(OUT[d]));
            cr_expect_eq(gpu_vs_cpu(what, t->data, t->n_bytes, t->type, t->n_elems, OUT[d]), 0, "%s", what);
        }
    }
    lp_gguf_close(g);
}

/* The real Gemma 3 270M GGUF (`make model-gemma`): one whole tensor of each quantized type
 * it holds, Q5_0 among them. */
Test(gguf_cuda, gemma_tensors) {
    LP_TEST_REQUIRE_GPU();
    static const char *path = "models/gemma-3-270m-q4_k_m.gguf";
    if (access(path, R_OK) != 0) cr_skip_test("%s is absent (make model-gemma fetches it)", path);
    lp_gguf *g;
    OK(lp_gguf_open(path, &g));
    static const char *names[] = {"blk.0.attn_q.weight", "blk.0.ffn_up.weight", "blk.0.attn_v.weight",
                                  "blk.0.attn_output.weight", "blk.0.ffn_down.weight"};
    for (int i = 0; i < 5; i++) {
        const lp_gguf_tensor *t = lp_gguf_find_tensor(g, names[i]);
        cr_assert(t != NULL, "%s", names[i]);
        for (int d = 0; d < 3; d++) {
            char what[96];
            snprintf(what, sizeof what, "Gemma %s (%s) -> %s", t->name, lp_ggml_type_name(t->type),
                     lp_dtype_name(OUT[d]));
            cr_expect_eq(gpu_vs_cpu(what, t->data, t->n_bytes, t->type, t->n_elems, OUT[d]), 0, "%s", what);
        }
    }
    lp_gguf_close(g);
}
