/* test_gemma_gguf.c: the real Gemma 3 270M GGUF (`make model-gemma`) through the GGUF
 * reader and the dequantizers; every test skips, saying why, when the file is absent.
 *
 * - The file's shape: tensor count and types (its "Q4_K_M" also holds Q5_0, Q8_0 and Q6_K
 *   tensors), every type supported, and the metadata a Gemma 3 loader reads.
 * - The first row of one tensor of each type against gguf-py's dequantization
 *   (tests/gen/gen_q5_0_fixture.py --model wrote gemma3_expected.safetensors): bit-exact.
 * - Every Q5_0 tensor dequantizes whole, to finite values of a sane size. */
#include <unistd.h>

#include "loupe/gguf.h"
#include "loupe/safetensors.h"
#include "testutil.h"

#define GEMMA "models/gemma-3-270m-q4_k_m.gguf"

#define OK(expr)                                                                            \
    do {                                                                                    \
        lp_status s_ = (expr);                                                              \
        cr_assert_eq(s_, LP_OK, "%s: %s: %s", #expr, lp_status_name(s_), lp_last_error());  \
    } while (0)

static lp_ctx *cpu(void) {
    static lp_ctx c;
    static int ready;
    if (!ready) {
        OK(lp_ctx_init(&c, LP_CPU, LP_F32));
        ready = 1;
    }
    return &c;
}

static lp_gguf *open_gemma(void) {
    if (access(GEMMA, R_OK) != 0) cr_skip_test("%s is absent (make model-gemma fetches it)", GEMMA);
    lp_gguf *g;
    OK(lp_gguf_open(GEMMA, &g));
    return g;
}

Test(gemma_gguf, shape_and_metadata) {
    lp_gguf *g = open_gemma();
    cr_assert_eq(lp_gguf_n_tensors(g), 236);
    int count[64] = {0};
    for (int i = 0; i < 236; i++) {
        const lp_gguf_tensor *t = lp_gguf_tensor_at(g, i);
        cr_assert(t->type >= 0 && t->type < 64);
        count[t->type]++;
        cr_expect(lp_ggml_supported(t->type), "%s: %s", t->name, lp_ggml_type_name(t->type));
    }
    cr_expect_eq(count[LP_GGML_F32], 109);
    cr_expect_eq(count[LP_GGML_Q5_0], 81);
    cr_expect_eq(count[LP_GGML_Q4_K], 27);
    cr_expect_eq(count[LP_GGML_Q8_0], 10);
    cr_expect_eq(count[LP_GGML_Q6_K], 9);
    const char *s;
    size_t len;
    OK(lp_gguf_get_str(g, "general.architecture", &s, &len));
    cr_expect(len == 6 && memcmp(s, "gemma3", 6) == 0, "'%.*s'", (int)len, s);
    OK(lp_gguf_get_str(g, "tokenizer.ggml.model", &s, &len));
    cr_expect(len == 5 && memcmp(s, "llama", 5) == 0, "'%.*s'", (int)len, s);
    static const struct { const char *key; int64_t v; } ints[] = {
        {"gemma3.block_count", 18}, {"gemma3.embedding_length", 640}, {"gemma3.feed_forward_length", 2048},
        {"gemma3.attention.head_count", 4}, {"gemma3.attention.head_count_kv", 1},
        {"gemma3.attention.key_length", 256}, {"gemma3.attention.sliding_window", 512},
        {"tokenizer.ggml.bos_token_id", 2}, {"tokenizer.ggml.eos_token_id", 1},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        int64_t v;
        OK(lp_gguf_get_int(g, ints[i].key, &v));
        cr_expect_eq(v, ints[i].v, "%s", ints[i].key);
    }
    lp_gguf_vtype et;
    uint64_t n;
    OK(lp_gguf_get_arr(g, "tokenizer.ggml.tokens", &et, &n));
    cr_expect(et == LP_GGUF_STRING && n == 262144);
    OK(lp_gguf_get_arr(g, "tokenizer.ggml.scores", &et, &n));
    cr_expect(et == LP_GGUF_F32 && n == 262144);
    lp_gguf_close(g);
}

Test(gemma_gguf, rows_match_gguf_py) {
    lp_gguf *g = open_gemma();
    lp_st_file ref;
    OK(lp_st_open(&ref, LP_FIXTURES "/gguf/gemma3_expected.safetensors"));
    static const struct { const char *name; int type; } rows[] = {
        {"blk.0.attn_q.weight", LP_GGML_Q5_0}, {"blk.0.attn_v.weight", LP_GGML_Q8_0},
        {"blk.0.attn_output.weight", LP_GGML_Q4_K}, {"blk.0.ffn_down.weight", LP_GGML_Q6_K},
        {"blk.0.attn_q_norm.weight", LP_GGML_F32},
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        const lp_gguf_tensor *t = lp_gguf_find_tensor(g, rows[i].name);
        char key[96];
        snprintf(key, sizeof key, "%s.row0", rows[i].name);
        const lp_st_tensor *e = lp_st_find(&ref, key);
        cr_assert(t && e && t->type == rows[i].type && e->shape[0] == t->ne[0], "%s", rows[i].name);
        float *y = malloc(t->ne[0] * sizeof *y);
        OK(lp_dequant(cpu(), y, LP_F32, t->data, t->type, t->ne[0]));
        size_t bad = 0;
        for (int64_t j = 0; j < t->ne[0]; j++) bad += memcmp(&y[j], (const float *)e->data + j, 4) != 0;
        char what[96];
        snprintf(what, sizeof what, "Gemma %s (%s) row 0 vs gguf-py", rows[i].name, lp_ggml_type_name(t->type));
        LP_EXPECT_WITHIN(what, 0, lp_compare_f(y, e->data, t->ne[0]), max_abs, 0);
        cr_expect_eq(bad, 0, "%s: %zu values differ bitwise", what, bad);
        free(y);
    }
    lp_st_close(&ref);
    lp_gguf_close(g);
}

Test(gemma_gguf, every_q5_0_tensor_whole) {
    lp_gguf *g = open_gemma();
    int seen = 0;
    for (int i = 0; i < lp_gguf_n_tensors(g); i++) {
        const lp_gguf_tensor *t = lp_gguf_tensor_at(g, i);
        if (t->type != LP_GGML_Q5_0) continue;
        float *y = malloc(t->n_elems * sizeof *y);
        cr_assert(y != NULL);
        OK(lp_dequant(cpu(), y, LP_F32, t->data, t->type, t->n_elems));
        double amax = 0, ss = 0;
        for (int64_t j = 0; j < t->n_elems; j++) {
            cr_assert(isfinite(y[j]), "%s[%lld] = %g", t->name, (long long)j, y[j]);
            amax = fmax(amax, fabs(y[j]));
            ss += (double)y[j] * y[j];
        }
        /* projection weights of a trained model: small, not all zero */
        cr_expect(amax > 1e-3 && amax < 10 && ss > 0, "%s: max |w| %g", t->name, amax);
        free(y);
        seen++;
    }
    cr_expect_eq(seen, 81);
    lp_gguf_close(g);
}
