/* test_sae_train.c: SAE training on the CPU.
 *   science   synthetic activations in superposition (n sparse features with known unit
 *             directions in d < n dimensions, known firing rates): TopK and ReLU/L1 SAEs
 *             recover the directions (mean over features of the best decoder-row cosine
 *             >= 0.95)
 *   resume    a run killed after a checkpoint and restarted ends bit for bit where an
 *             uninterrupted run ends (weights and metrics lines, also when the checkpoint
 *             falls between two metrics lines)
 *   bad input NaN in the activations stops naming the token and step and keeps the last
 *             checkpoint; impossible settings are refused naming the key
 *   every architecture trains, saves, loads back and evaluates. */
#include <sys/stat.h>
#include <unistd.h>

#include "loupe/safetensors.h"
#include "loupe/sae.h"
#include "loupe/sae_train.h"
#include "loupe/store.h"
#include "testutil.h"

static char dir[64];
static void mk(void) {
    snprintf(dir, sizeof dir, "/tmp/loupe-sae-XXXXXX");
    cr_assert(mkdtemp(dir) != NULL);
}
static void rm(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_expect(system(cmd) == 0);
}
TestSuite(sae_train, .init = mk, .fini = rm, .timeout = 600);

static const char *in_dir(const char *name) {
    static char p[4][256];
    static int i;
    i = (i + 1) % 4;
    snprintf(p[i], sizeof p[i], "%s/%s", dir, name);
    return p[i];
}

#define HOOK "blocks.0.hook_resid_post"

/* A one-shard activation store of x [n_seq * ctx, d] under hook HOOK. */
static void write_store(const char *path, const float *x, int n_seq, int ctx, int d) {
    mkdir(path, 0755);
    int32_t *tok = calloc((size_t)n_seq * ctx, sizeof(int32_t));
    lp_st_spec specs[2] = {{.name = "tokens", .dtype = LP_I32, .ndim = 2, .shape = {n_seq, ctx}},
                           {.name = HOOK, .dtype = LP_F32, .ndim = 3, .shape = {n_seq, ctx, d}}};
    const void *datas[2] = {tok, x};
    char p[512];
    snprintf(p, sizeof p, "%s/shard-00000.safetensors", path);
    cr_assert_eq(lp_st_write(p, specs, datas, 2, NULL), LP_OK, "%s", lp_last_error());
    free(tok);
}

/* n features with random unit directions in d dimensions; each fires with probability p
 * with a magnitude in [0.5, 1.5]. Returns the directions [n, d]. */
static float *superposition(float *x, int64_t tokens, int d, int n, double p, uint64_t seed) {
    uint64_t r = seed;
    float *dirs = malloc((size_t)n * d * sizeof(float));
    for (int i = 0; i < n; i++) {
        double nrm = 0;
        for (int j = 0; j < d; j++) {
            double u1 = lp_test_uniform(&r, 1e-7f, 1.0f), u2 = lp_test_uniform(&r, 0.0f, 1.0f); /* Box-Muller */
            dirs[i * d + j] = (float)(sqrt(-2 * log(u1)) * cos(2 * M_PI * u2));
            nrm += (double)dirs[i * d + j] * dirs[i * d + j];
        }
        for (int j = 0; j < d; j++) dirs[i * d + j] = (float)(dirs[i * d + j] / sqrt(nrm));
    }
    for (int64_t t = 0; t < tokens; t++) {
        float *row = x + t * d;
        memset(row, 0, d * sizeof(float));
        for (int i = 0; i < n; i++) {
            if (lp_test_uniform(&r, 0.0f, 1.0f) >= p) continue;
            float a = lp_test_uniform(&r, 0.5f, 1.5f);
            for (int j = 0; j < d; j++) row[j] += a * dirs[i * d + j];
        }
    }
    return dirs;
}

/* Mean over true directions of the best |cosine| with a decoder row. */
static double recovery(const lp_sae *s, const float *dirs, int n) {
    int S = s->cfg.d_sae, d = s->cfg.d_out;
    double total = 0;
    for (int i = 0; i < n; i++) {
        double best = 0;
        for (int k = 0; k < S; k++) {
            double dot = 0, nk = 0;
            for (int j = 0; j < d; j++) dot += (double)dirs[i * d + j] * s->W_dec[k * d + j], nk += (double)s->W_dec[k * d + j] * s->W_dec[k * d + j];
            if (nk > 0 && dot / sqrt(nk) > best) best = dot / sqrt(nk);
        }
        total += best;
    }
    return total / n;
}

static void base_cfg(lp_sae_train_cfg *t, const char *store, const char *out) {
    lp_sae_train_defaults(t);
    t->store = store, t->out = out;
    snprintf(t->sae.hook_name, sizeof t->sae.hook_name, HOOK);
}

static lp_sae *train_and_load(lp_sae_train_cfg *t, lp_ctx *c, lp_sae_train_report *rep) {
    cr_assert_eq(lp_sae_train(t, c, rep), LP_OK, "%s", lp_last_error());
    lp_sae *s;
    cr_assert_eq(lp_sae_load(&s, c, t->out), LP_OK, "%s", lp_last_error());
    return s;
}

enum { SD = 32, SN = 64, SCTX = 64 };
static const double SP = 0.03;

static void science(lp_sae_arch arch, int k, double l1, const char *what) {
    int n_seq = 1600;
    int64_t tokens = (int64_t)n_seq * SCTX;
    float *x = malloc((size_t)tokens * SD * sizeof(float));
    float *dirs = superposition(x, tokens, SD, SN, SP, 7);
    write_store(in_dir("store"), x, n_seq, SCTX, SD);
    lp_ctx c;
    cr_assert_eq(lp_ctx_init(&c, LP_CPU, LP_F32), LP_OK);
    lp_sae_train_cfg t;
    base_cfg(&t, in_dir("store"), in_dir(what));
    t.sae.arch = arch, t.sae.d_sae = 2 * SN, t.sae.k = k;
    t.l1_coefficient = l1;
    t.lr = 3e-3, t.tokens = 3 * tokens, t.batch_tokens = 512, t.shuffle_tokens = 16384;
    t.dead_feature_window = 20000, t.aux_k = 16;
    lp_sae_train_report rep;
    lp_sae *s = train_and_load(&t, &c, &rep);
    double rec = recovery(s, dirs, SN);
    printf("  %-28s mean max cosine %.4f of >= 0.95 (EV %.3f, L0 %.2f, dead %d)\n", what, rec, rep.explained_variance, rep.l0, rep.dead);
    cr_expect_geq(rec, 0.95, "%s: mean max cosine %.4f", what, rec);
    lp_sae_free(s, &c);
    lp_ctx_free(&c);
    free(x);
    free(dirs);
}

Test(sae_train, science_topk_recovers_superposed_features) { science(LP_SAE_TOPK, 4, 0, "topk k=4"); }
Test(sae_train, science_relu_l1_recovers_superposed_features) { science(LP_SAE_STANDARD, 0, 3, "standard (ReLU, L1)"); }

/* Small random data for the mechanics tests. */
static void small_store(const char *path, int n_seq, int ctx, int d, uint64_t seed) {
    float *x = malloc((size_t)n_seq * ctx * d * sizeof(float));
    float *dirs = superposition(x, (int64_t)n_seq * ctx, d, 2 * d, 0.05, seed);
    write_store(path, x, n_seq, ctx, d);
    free(x);
    free(dirs);
}

static char *slurp(const char *path, size_t *n) { return lp_read_file(path, n); }

/* Removes every ,"details/tokens_per_s":... field; returns the new length. */
static size_t drop_speed(char *s) {
    char *p;
    while ((p = strstr(s, ",\"details/tokens_per_s\""))) {
        char *e = strchr(p, '}');
        memmove(p, e, strlen(e) + 1);
    }
    return strlen(s);
}

Test(sae_train, killed_and_restarted_run_ends_bit_for_bit_identical) {
    small_store(in_dir("store"), 64, 32, 16, 3);
    lp_ctx c;
    cr_assert_eq(lp_ctx_init(&c, LP_CPU, LP_F32), LP_OK);
    lp_sae_arch archs[] = {LP_SAE_TOPK, LP_SAE_STANDARD, LP_SAE_JUMPRELU, LP_SAE_BATCHTOPK};
    for (int a = 0; a < 4; a++) {
        char full[64], killed[64];
        snprintf(full, sizeof full, "full%d", a);
        snprintf(killed, sizeof killed, "killed%d", a);
        lp_sae_train_cfg t;
        base_cfg(&t, in_dir("store"), in_dir(full));
        t.sae.arch = archs[a], t.sae.d_sae = 64, t.sae.k = 4;
        t.tokens = 40 * 128, t.batch_tokens = 128, t.shuffle_tokens = 512, t.checkpoint_every = 10 * 128;
        /* every 3 steps: the checkpoint at step 20 falls inside a log window, whose running sums must resume too */
        t.log_every = a % 2 ? 5 : 3;
        t.dead_feature_window = 1024, t.lr_warm_up_steps = 5, t.lr_decay_steps = 10;
        snprintf(t.lr_scheduler, sizeof t.lr_scheduler, "cosine");
        lp_sae_train_report rep;
        cr_assert_eq(lp_sae_train(&t, &c, &rep), LP_OK, "%s", lp_last_error());
        /* the same run, killed after 25 of 40 steps (checkpoint at 20), then restarted */
        t.out = in_dir(killed);
        t.stop_after = 25 * 128;
        cr_assert_eq(lp_sae_train(&t, &c, &rep), LP_OK, "%s", lp_last_error());
        cr_assert(rep.stopped);
        t.stop_after = 0;
        cr_assert_eq(lp_sae_train(&t, &c, &rep), LP_OK, "%s", lp_last_error());
        cr_expect_eq(rep.resumed_tokens, 20 * 128, "%s: resumed from %lld tokens", lp_sae_arch_name(archs[a]), (long long)rep.resumed_tokens);
        const char *files[] = {"sae_weights.safetensors", "metrics.jsonl"};
        int all_same = 1;
        for (int f = 0; f < 2; f++) {
            char pa[512], pb[512];
            snprintf(pa, sizeof pa, "%s/%s/%s", dir, full, files[f]);
            snprintf(pb, sizeof pb, "%s/%s/%s", dir, killed, files[f]);
            size_t na, nb;
            char *A = slurp(pa, &na), *Bf = slurp(pb, &nb);
            cr_assert(A && Bf, "%s or %s missing", pa, pb);
            if (f == 1) na = drop_speed(A), nb = drop_speed(Bf); /* wall-clock tokens/s differs, of course */
            int same = na == nb && memcmp(A, Bf, na) == 0;
            cr_expect(same, "%s: %s differs after the restart", lp_sae_arch_name(archs[a]), files[f]);
            all_same &= same;
            free(A);
            free(Bf);
        }
        printf("  %-10s resumed at step 20 of 40 after a kill at 25 (metrics every %lld steps): weights and metrics %s\n",
               lp_sae_arch_name(archs[a]), (long long)t.log_every, all_same ? "identical" : "DIFFER");
    }
    lp_ctx_free(&c);
}

Test(sae_train, nan_in_activations_stops_and_keeps_the_checkpoint) {
    int n_seq = 64, ctx = 32, d = 16;
    float *x = malloc((size_t)n_seq * ctx * d * sizeof(float));
    float *dirs = superposition(x, (int64_t)n_seq * ctx, d, 32, 0.05, 5);
    x[(size_t)1500 * d + 3] = NAN; /* token 1500: in the third window of 512 */
    write_store(in_dir("store"), x, n_seq, ctx, d);
    lp_ctx c;
    cr_assert_eq(lp_ctx_init(&c, LP_CPU, LP_F32), LP_OK);
    lp_sae_train_cfg t;
    base_cfg(&t, in_dir("store"), in_dir("out"));
    t.sae.arch = LP_SAE_TOPK, t.sae.d_sae = 32, t.sae.k = 4;
    t.tokens = 2048, t.batch_tokens = 128, t.shuffle_tokens = 512, t.checkpoint_every = 512;
    snprintf(t.b_dec_init, sizeof t.b_dec_init, "zeros");
    lp_sae_train_report rep;
    lp_status st = lp_sae_train(&t, &c, &rep);
    cr_expect_eq(st, LP_ERR_FORMAT);
    cr_expect(strstr(lp_last_error(), "non-finite value at token 1500") != NULL, "%s", lp_last_error());
    cr_expect(strstr(lp_last_error(), "step") != NULL, "%s", lp_last_error());
    /* the checkpoint before the bad window is intact, and nothing final was written */
    struct stat sb;
    char p[512];
    snprintf(p, sizeof p, "%s/out/checkpoints/step-000000008/state.safetensors", dir);
    cr_expect(stat(p, &sb) == 0, "%s missing", p);
    snprintf(p, sizeof p, "%s/out/sae_weights.safetensors", dir);
    cr_expect(stat(p, &sb) != 0, "a final SAE was written despite the NaN");
    lp_ctx_free(&c);
    free(x);
    free(dirs);
}

static void expect_bad(lp_sae_train_cfg *t, const char *phrase) {
    lp_ctx c;
    cr_assert_eq(lp_ctx_init(&c, LP_CPU, LP_F32), LP_OK);
    lp_sae_train_report rep;
    lp_status st = lp_sae_train(t, &c, &rep);
    cr_expect_eq(lp_status_exit_code(st), 2, "status %d: %s", st, lp_last_error());
    cr_expect(strstr(lp_last_error(), phrase) != NULL, "'%s' lacks '%s'", lp_last_error(), phrase);
    lp_ctx_free(&c);
}

Test(sae_train, impossible_settings_are_refused_naming_the_key) {
    small_store(in_dir("store"), 4, 32, 16, 3);
    lp_sae_train_cfg t;
    base_cfg(&t, in_dir("store"), in_dir("out"));
    t.sae.arch = LP_SAE_TOPK, t.sae.d_sae = 32, t.sae.k = 64;
    expect_bad(&t, "sae.k = 64");
    t.sae.k = 4, t.lr = -1e-3;
    expect_bad(&t, "train.lr = -0.001");
    t.lr = 1e-3, t.sae.d_in = 17;
    expect_bad(&t, "sae.d_in = 17");
    t.sae.d_in = 0;
    snprintf(t.sae.hook_name, sizeof t.sae.hook_name, "blocks.9.hook_resid_post");
    expect_bad(&t, "hook 'blocks.9.hook_resid_post' is not in the store");
    struct stat sb;
    cr_expect(stat(in_dir("out"), &sb) != 0, "a refused run created its output directory");
}

Test(sae_train, every_architecture_trains_saves_loads_and_evaluates) {
    small_store(in_dir("store"), 64, 32, 16, 11);
    lp_ctx c;
    cr_assert_eq(lp_ctx_init(&c, LP_CPU, LP_F32), LP_OK);
    lp_sae_arch archs[] = {LP_SAE_STANDARD, LP_SAE_TOPK, LP_SAE_BATCHTOPK, LP_SAE_JUMPRELU};
    for (int a = 0; a < 4; a++) {
        lp_sae_train_cfg t;
        char out[32];
        snprintf(out, sizeof out, "arch%d", a);
        base_cfg(&t, in_dir("store"), in_dir(out));
        t.sae.arch = archs[a], t.sae.d_sae = 48, t.sae.k = 4;
        t.tokens = 60 * 256, t.batch_tokens = 256, t.lr = 3e-3, t.l1_coefficient = 0.1, t.l0_coefficient = 0.01;
        lp_sae_train_report rep;
        lp_sae *s = train_and_load(&t, &c, &rep);
        /* batchtopk is exported as jumprelu with one global threshold */
        cr_expect_eq(s->cfg.arch, archs[a] == LP_SAE_BATCHTOPK ? LP_SAE_JUMPRELU : archs[a]);
        lp_sae_eval ev;
        cr_assert_eq(lp_sae_eval_store(s, &c, in_dir("store"), NULL, NULL, 0, 512, &ev), LP_OK, "%s", lp_last_error());
        printf("  %-10s train EV %.3f L0 %.2f | eval on %lld tokens: EV %.3f, L0 %.2f, cos %.3f, dead %d\n",
               lp_sae_arch_name(archs[a]), rep.explained_variance, rep.l0, (long long)ev.n_tokens, ev.explained_variance, ev.l0, ev.cos_sim,
               ev.dead);
        cr_expect_gt(ev.explained_variance, 0.5, "%s: EV %.3f", lp_sae_arch_name(archs[a]), ev.explained_variance);
        cr_expect_gt(ev.l0, 0);
        if (archs[a] == LP_SAE_TOPK) cr_expect_leq(ev.l0, 4.0 + 1e-9);
        lp_sae_free(s, &c);
    }
    lp_ctx_free(&c);
}

/* A transcoder: reads one hook and reconstructs another, here y = M x (M random 16 -> 24),
 * with a linear skip; saved, loaded back as a transcoder, evaluated against the output hook. */
Test(sae_train, transcoder_learns_a_map_between_hooks) {
    int n_seq = 64, ctx = 32, d = 16, dout = 24;
    size_t n = (size_t)n_seq * ctx;
    float *x = malloc(n * d * sizeof(float)), *y = malloc(n * dout * sizeof(float));
    float *dirs = superposition(x, (int64_t)n, d, 32, 0.05, 21);
    float *M = lp_test_rand((size_t)dout * d, 22, -0.5f, 0.5f);
    for (size_t t = 0; t < n; t++)
        for (int o = 0; o < dout; o++) {
            double acc = 0;
            for (int i = 0; i < d; i++) acc += (double)M[o * d + i] * x[t * d + i];
            y[t * dout + o] = (float)acc;
        }
    mkdir(in_dir("store"), 0755);
    int32_t *tok = calloc(n, sizeof(int32_t));
    lp_st_spec specs[3] = {{.name = "tokens", .dtype = LP_I32, .ndim = 2, .shape = {n_seq, ctx}},
                           {.name = HOOK, .dtype = LP_F32, .ndim = 3, .shape = {n_seq, ctx, d}},
                           {.name = "blocks.0.hook_mlp_out", .dtype = LP_F32, .ndim = 3, .shape = {n_seq, ctx, dout}}};
    const void *datas[3] = {tok, x, y};
    char p[512];
    snprintf(p, sizeof p, "%s/shard-00000.safetensors", in_dir("store"));
    cr_assert_eq(lp_st_write(p, specs, datas, 3, NULL), LP_OK, "%s", lp_last_error());
    lp_ctx c;
    cr_assert_eq(lp_ctx_init(&c, LP_CPU, LP_F32), LP_OK);
    lp_sae_train_cfg t;
    base_cfg(&t, in_dir("store"), in_dir("tc"));
    snprintf(t.sae.hook_name_out, sizeof t.sae.hook_name_out, "blocks.0.hook_mlp_out");
    t.sae.arch = LP_SAE_TOPK, t.sae.d_sae = 64, t.sae.k = 4, t.sae.skip = 1;
    t.tokens = 300 * 256, t.batch_tokens = 256, t.lr = 1e-2;
    lp_sae_train_report rep;
    lp_sae *s = train_and_load(&t, &c, &rep);
    cr_expect_eq(s->cfg.d_in, d);
    cr_expect_eq(s->cfg.d_out, dout);
    cr_expect_str_eq(s->cfg.hook_name_out, "blocks.0.hook_mlp_out");
    cr_expect(s->W_skip != NULL);
    lp_sae_eval ev;
    cr_assert_eq(lp_sae_eval_store(s, &c, in_dir("store"), NULL, NULL, 0, 512, &ev), LP_OK, "%s", lp_last_error());
    printf("  transcoder %d -> %d with skip: train EV %.3f, eval EV %.3f, L0 %.2f\n", d, dout, rep.explained_variance, ev.explained_variance, ev.l0);
    cr_expect_gt(ev.explained_variance, 0.9, "EV %.3f", ev.explained_variance);
    lp_sae_free(s, &c);
    lp_ctx_free(&c);
    free(x), free(y), free(dirs), free(M), free(tok);
}

/* Live: SAEs train from the model's own forward. With the same rows, a live-trained SAE
 * ends bit for bit like one trained from a store of those activations; two SAEs on
 * different hooks, widths and k share one stream. */
#include "loupe/model.h"
#include "loupe/store.h"
#include "loupe/tokens.h"

Test(sae_train, live_stream_equals_the_store_and_feeds_several_saes) {
    lp_model *m;
    cr_assert_eq(lp_model_load(&m, LP_FIXTURES "/gpt2-tiny", LP_CPU, LP_F32), LP_OK, "%s", lp_last_error());
    lp_tokens toks;
    cr_assert_eq(lp_tokens_load(&toks, LP_FIXTURES "/gpt2-tiny/tokens.npy", 0, 0, "int32"), LP_OK, "%s", lp_last_error());
    lp_cache_opts o = {.out = in_dir("store"), .hooks = "blocks.1.hook_resid_post", .dtype = LP_F32, .batch = 2, .shard_sequences = 8};
    lp_cache_report cr;
    cr_assert_eq(lp_cache_run(m, &toks, &o, &cr), LP_OK, "%s", lp_last_error());
    lp_ctx c;
    cr_assert_eq(lp_ctx_init(&c, LP_CPU, LP_F32), LP_OK);
    lp_sae_train_cfg t[2];
    base_cfg(&t[0], in_dir("store"), in_dir("from-store"));
    snprintf(t[0].sae.hook_name, sizeof t[0].sae.hook_name, "blocks.1.hook_resid_post");
    t[0].sae.arch = LP_SAE_TOPK, t[0].sae.d_sae = 128, t[0].sae.k = 8;
    t[0].tokens = 40 * 16, t[0].batch_tokens = 16, t[0].shuffle_tokens = 32, t[0].log_every = 4;
    lp_sae_train_report rep[2];
    cr_assert_eq(lp_sae_train(&t[0], &c, &rep[0]), LP_OK, "%s", lp_last_error());
    /* the same SAE from the live model, plus a second one on another hook */
    t[0].out = in_dir("live0"), t[0].store = NULL;
    t[1] = t[0];
    t[1].out = in_dir("live1");
    snprintf(t[1].sae.hook_name, sizeof t[1].sae.hook_name, "blocks.0.mlp.hook_post");
    t[1].sae.arch = LP_SAE_STANDARD, t[1].sae.d_sae = 512, t[1].sae.k = 0;
    lp_live *live;
    cr_assert_eq(lp_live_open(&live, m, toks.ids, toks.n_seq, toks.ctx, 2), LP_OK);
    cr_assert_eq(lp_sae_train_live(t, 2, live, &c, rep), LP_OK, "%s", lp_last_error());
    lp_live_close(live);
    size_t na, nb;
    char pa[256], pb[256];
    snprintf(pa, sizeof pa, "%s/sae_weights.safetensors", in_dir("from-store"));
    snprintf(pb, sizeof pb, "%s/sae_weights.safetensors", in_dir("live0"));
    char *A = slurp(pa, &na), *Bf = slurp(pb, &nb);
    cr_assert(A && Bf);
    cr_expect(na == nb && memcmp(A, Bf, na) == 0, "the live-trained SAE differs from the store-trained one");
    free(A), free(Bf);
    lp_sae *s1;
    cr_assert_eq(lp_sae_load(&s1, &c, in_dir("live1")), LP_OK, "%s", lp_last_error());
    cr_expect_eq(s1->cfg.d_in, 256);
    cr_expect_str_eq(s1->cfg.hook_name, "blocks.0.mlp.hook_post");
    printf("  live: topk on blocks.1.hook_resid_post identical to the store-trained one; standard on blocks.0.mlp.hook_post "
           "(d_in 256) EV %.3f from the same stream\n", rep[1].explained_variance);
    lp_sae_free(s1, &c);
    lp_ctx_free(&c);
    lp_tokens_free(&toks);
    lp_model_free(m);
}
