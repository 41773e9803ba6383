/* test_cli.c: the `loupe` command as a user meets it: exit status 0 / 2, one clear
 * line on stderr for bad input, --json as the last stdout line, and `loupe cache`
 * writing, resuming and refusing to leave partial shards. Runs build/loupe (or $LOUPE_CLI). */
#include <cjson/cJSON.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "loupe/hooks.h"
#include "loupe/safetensors.h"
#include "loupe/store.h"
#include "loupe/tokens.h"
#include "testutil.h"

#define MODEL LP_FIXTURES "/gpt2-tiny"
static char dir[64];
#include "clitest.h"

static void mk(void) {
    snprintf(dir, sizeof dir, "/tmp/loupe-cli-XXXXXX");
    cr_assert(mkdtemp(dir) != NULL);
}
static void rm(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_expect(system(cmd) == 0);
}
TestSuite(cli, .init = mk, .fini = rm, .timeout = 60);


/* Bad input: exit 2, exactly one line on stderr, containing the phrase. */
static void expect_bad(const char *phrase, const char *fmt, const char *arg) {
    int rc = loupe(fmt, arg);
    cr_expect_eq(rc, 2, "exit %d for `%s`; stderr: %s", rc, fmt, err_txt);
    cr_expect(strstr(err_txt, phrase) != NULL, "stderr '%s' lacks '%s'", err_txt, phrase);
    char *nl = strchr(err_txt, '\n');
    cr_expect(nl && nl[1] == 0, "stderr is not one line: '%s'", err_txt);
}

static const char *tmp(const char *name) {
    static char p[4][256];
    static int i;
    i = (i + 1) % 4;
    snprintf(p[i], sizeof p[i], "%s/%s", dir, name);
    return p[i];
}

Test(cli, run_json_reports_the_reference_loss) {
    cr_assert_eq(loupe("run %s --tokens %s/tokens.npy --json", MODEL, MODEL), 0, "%s", err_txt);
    char *last = strrchr(out_txt, '{');
    cJSON *j = cJSON_Parse(last);
    cr_assert(j, "last stdout line is not JSON: %s", out_txt);
    double loss = cJSON_GetObjectItem(j, "mean_loss")->valuedouble;
    cr_expect(fabs(loss - 15.728273) < 1e-4, "mean_loss %f", loss);
    cr_expect_eq(cJSON_GetObjectItem(j, "n_tokens")->valueint, 30);
    cr_expect_eq(cJSON_GetArraySize(cJSON_GetObjectItem(j, "per_sequence_loss")), 2);
    cJSON_Delete(j);
    /* a flat file cut into rows of 16 gives the same rows, so the same loss */
    cr_assert_eq(loupe("run %s --tokens %s/tokens_flat.npy --data.context=16 --run.batch=1", MODEL, MODEL), 0, "%s", err_txt);
    cr_expect(strstr(out_txt, "mean loss 15.7282") != NULL, "%s", out_txt);
}

Test(cli, info_lists_hooks) {
    cr_assert_eq(loupe("info %s", MODEL), 0, "%s", err_txt);
    cr_expect(strstr(out_txt, "blocks.1.attn.hook_pattern") && strstr(out_txt, "[batch, 4, pos, pos]"), "%s", out_txt);
    cr_expect(strstr(out_txt, "unembed.hook_out") && strstr(out_txt, "[batch, pos, 997]"), "%s", out_txt);
    cr_assert_eq(loupe("info %s --json", MODEL), 0);
    cJSON *j = cJSON_Parse(strrchr(out_txt, '{') ? out_txt : "");
    cr_assert(j);
    cr_expect_eq(cJSON_GetArraySize(cJSON_GetObjectItem(j, "hooks")), 40); /* 38 + unembed.hook_in/out */
    cJSON_Delete(j);
}

Test(cli, bad_input_is_one_line_and_exit_2) {
    expect_bad("unknown command", "frobnicate %s", MODEL);
    expect_bad("unknown config key 'run.bogus'", "run " MODEL " --tokens " MODEL "/tokens.npy --run.bogus=%s", "1");
    expect_bad("run.batch = 0 is outside", "run " MODEL " --tokens " MODEL "/tokens.npy --run.batch=%s", "0");
    expect_bad("missing config key 'data.tokens'", "run %s", MODEL);
    expect_bad("nope.npy: cannot read", "run " MODEL " --tokens %s", "nope.npy");
    expect_bad("config.json: cannot open", "info %s", "tests");
    /* token id >= vocab */
    int32_t ids[4] = {1, 2, 997, 3};
    cr_assert_eq(lp_npy_write_i32(tmp("big.npy"), ids, 1, 4), LP_OK);
    expect_bad("token id 997 at row 0 position 2", "run " MODEL " --tokens %s", tmp("big.npy"));
    /* empty token file */
    FILE *f = fopen(tmp("empty.npy"), "w");
    fclose(f);
    expect_bad("empty file", "run " MODEL " --tokens %s", tmp("empty.npy"));
    /* rows longer than the model's context */
    int32_t longrow[40] = {0};
    cr_assert_eq(lp_npy_write_i32(tmp("long.npy"), longrow, 1, 40), LP_OK);
    expect_bad("exceed the model's context of 32", "run " MODEL " --tokens %s", tmp("long.npy"));
    /* a truncated checkpoint */
    char cmd[512];
    snprintf(cmd, sizeof cmd, "mkdir -p %s/trunc && cp %s/config.json %s/trunc/ && head -c 100000 %s/model.safetensors > %s/trunc/model.safetensors",
             dir, MODEL, dir, MODEL, dir);
    cr_assert(system(cmd) == 0);
    expect_bad("model.safetensors: tensor", "info %s", tmp("trunc"));
    cr_expect(strstr(err_txt, "truncated") != NULL, "%s", err_txt);
    /* unknown hooks for cache */
    expect_bad("hook pattern 'blocks.7.*' matches no hook point",
               "cache --model.path=" MODEL " --data.tokens=" MODEL "/tokens.npy --cache.out=%s --cache.hooks=blocks.7.*", tmp("s"));
    expect_bad("unknown hook 'hook_resid'",
               "cache --model.path=" MODEL " --data.tokens=" MODEL "/tokens.npy --cache.out=%s --cache.hooks=hook_resid", tmp("s"));
    /* an unknown key in a config file */
    f = fopen(tmp("c.ini"), "w");
    fprintf(f, "[cache]\nhoooks = x\n");
    fclose(f);
    expect_bad("unknown config key 'cache.hoooks'", "cache %s", tmp("c.ini"));
}

static int count_files(const char *d, const char *suffix) {
    char cmd[512], buf[64];
    snprintf(cmd, sizeof cmd, "ls -A %s 2>/dev/null | grep -cE '%s$'", d, suffix);
    FILE *p = popen(cmd, "r");
    int n = fgets(buf, sizeof buf, p) ? atoi(buf) : -1;
    pclose(p);
    return n;
}

/* temporary files, old-style (x.tmp) and unique (x.tmp.<pid>.<random>) */
#define TMP_NAMES "[.]tmp([.].*)?"
#define CACHE_ARGS "cache --model.path=" MODEL " --data.tokens=" MODEL "/tokens_flat.npy --data.context=8 " \
                   "--cache.hooks=blocks.*.hook_resid_post,blocks.0.attn.hook_pattern --cache.shard_sequences=3 --cache.batch=2 --cache.out=%s"

Test(cli, cache_writes_the_store_and_matches_the_forward) {
    char st[256];
    snprintf(st, sizeof st, "%s", tmp("store"));
    cr_assert_eq(loupe(CACHE_ARGS " --json", st), 0, "%s", err_txt);
    cr_expect(strstr(out_txt, "\"n_sequences\":4") != NULL, "%s", out_txt);
    cr_expect_eq(count_files(st, ".safetensors"), 2);
    cr_expect_eq(count_files(st, TMP_NAMES), 0);
    /* shard 1 holds sequence 3: compare with an in-process forward of that row */
    lp_st_file f;
    cr_assert_eq(lp_st_open(&f, tmp("store/shard-00001.safetensors")), LP_OK, "%s", lp_last_error());
    const lp_st_tensor *tok = lp_st_find(&f, "tokens"), *rp = lp_st_find(&f, "blocks.1.hook_resid_post");
    cr_assert(tok && rp && rp->shape[0] == 1 && rp->shape[1] == 8 && rp->shape[2] == 64);
    lp_model *m;
    cr_assert_eq(lp_model_load(&m, MODEL, LP_CPU, LP_F32), LP_OK);
    cr_assert_eq(lp_hook_capture(m, "blocks.1.hook_resid_post", NULL, 0, NULL), LP_OK);
    cr_assert_eq(lp_model_forward(m, tok->data, 1, 8, 0), LP_OK);
    lp_tensor t;
    cr_assert_eq(lp_capture_get(m, "blocks.1.hook_resid_post", &t), LP_OK);
    /* the store ran it in a batch of 2, this in a batch of 1: BLAS blocking may round differently */
    lp_cmp c = lp_compare_f(t.data, rp->data, 8 * 64);
    LP_EXPECT_WITHIN("stored vs forward", 0, c, max_rel, 1e-6);
    lp_st_close(&f);
    /* mean ablation source: per-token mean of a stored hook over all 4 x 8 tokens */
    float *mean;
    size_t n;
    cr_assert_eq(lp_store_hook_mean(st, "blocks.0.hook_resid_post", &mean, &n), LP_OK, "%s", lp_last_error());
    cr_expect_eq(n, 64);
    lp_hooks_clear(m);
    cr_assert_eq(lp_hook_capture(m, "blocks.0.hook_resid_post", NULL, 0, NULL), LP_OK);
    lp_tokens all;
    cr_assert_eq(lp_tokens_load(&all, MODEL "/tokens_flat.npy", 8, 0, NULL), LP_OK);
    cr_assert_eq(lp_model_forward(m, all.ids, 4, 8, 0), LP_OK);
    cr_assert_eq(lp_capture_get(m, "blocks.0.hook_resid_post", &t), LP_OK);
    for (int d = 0; d < 64; d++) {
        double s = 0;
        for (int i = 0; i < 32; i++) s += ((float *)t.data)[i * 64 + d];
        cr_expect(fabs(s / 32 - mean[d]) < 1e-5, "mean[%d] %g vs %g", d, mean[d], s / 32);
    }
    free(mean);
    lp_tokens_free(&all);
    lp_model_free(m);
}

Test(cli, cache_resumes_after_an_interrupted_run) {
    char st[256];
    snprintf(st, sizeof st, "%s", tmp("store"));
    cr_assert_eq(loupe(CACHE_ARGS, st), 0, "%s", err_txt);
    char orig[1 << 14], again[1 << 14];
    slurp(tmp("store/shard-00001.safetensors"), orig, sizeof orig);
    /* an interrupted run: shard 1 never renamed, meta.json lists shard 0 only */
    char meta[1 << 14];
    slurp(tmp("store/meta.json"), meta, sizeof meta);
    cJSON *j = cJSON_Parse(meta);
    cJSON *shards = cJSON_GetObjectItem(j, "shards");
    cJSON_DeleteItemFromArray(shards, 1);
    cJSON_ReplaceItemInObject(j, "complete", cJSON_CreateFalse());
    char *txt = cJSON_Print(j);
    FILE *f = fopen(tmp("store/meta.json"), "w");
    fputs(txt, f);
    fclose(f);
    free(txt);
    cJSON_Delete(j);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "mv %s/store/shard-00001.safetensors %s/store/shard-00001.safetensors.tmp && truncate -s 100 %s/store/shard-00001.safetensors.tmp",
             dir, dir, dir);
    cr_assert(system(cmd) == 0);
    cr_assert_eq(loupe(CACHE_ARGS " --json", st), 0, "%s", err_txt);
    cr_expect(strstr(out_txt, "\"resumed_sequences\":3") != NULL, "%s", out_txt);
    cr_expect_eq(count_files(st, TMP_NAMES), 0);
    slurp(tmp("store/shard-00001.safetensors"), again, sizeof again);
    cr_expect(memcmp(orig, again, sizeof orig) == 0, "resumed shard differs from the uninterrupted one");
    slurp(tmp("store/meta.json"), meta, sizeof meta);
    cr_expect(strstr(meta, "\"complete\":\ttrue") != NULL, "%s", meta);
    /* different settings into the same store are refused */
    cr_expect_eq(loupe(CACHE_ARGS " --cache.dtype=bf16", st), 2);
    cr_expect(strstr(err_txt, "different 'dtype'") != NULL, "%s", err_txt);
}

Test(cli, bad_tokens_leave_no_shard) {
    int32_t ids[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 5000};
    cr_assert_eq(lp_npy_write_i32(tmp("bad.npy"), ids, 2, 8), LP_OK);
    char st[256];
    snprintf(st, sizeof st, "%s", tmp("store"));
    int rc = loupe("cache --model.path=" MODEL " --data.tokens=%s --cache.hooks=hook_embed --cache.out=%s", tmp("bad.npy"), st);
    cr_expect_eq(rc, 2, "%s", err_txt);
    cr_expect(count_files(st, ".safetensors") <= 0 && count_files(st, TMP_NAMES) <= 0);
}

Test(cli, cache_bf16_store) {
    char st[256];
    snprintf(st, sizeof st, "%s", tmp("store"));
    cr_assert_eq(loupe(CACHE_ARGS " --cache.dtype=bf16", st), 0, "%s", err_txt);
    lp_st_file f;
    cr_assert_eq(lp_st_open(&f, tmp("store/shard-00000.safetensors")), LP_OK);
    const lp_st_tensor *t = lp_st_find(&f, "blocks.0.attn.hook_pattern");
    cr_assert(t && t->dtype == LP_BF16 && t->shape[0] == 3 && t->shape[1] == 4 && t->shape[2] == 8 && t->shape[3] == 8);
    /* each pattern row still sums to 1 within bf16 rounding */
    for (int r = 0; r < 3 * 4 * 8; r++) {
        double s = 0;
        for (int k = 0; k < 8; k++) s += lp_bf16_to_f32(((const uint16_t *)t->data)[r * 8 + k]);
        cr_expect(fabs(s - 1) < 2e-2, "row %d sums to %g", r, s);
    }
    lp_st_close(&f);
}

/* ---- the Llama family, GGUF, text and generation ---- */

#define SMOL "models/SmolLM2-135M-Instruct.Q4_1.gguf"

static void need_smol(void) {
    struct stat sb;
    if (stat(SMOL, &sb) != 0) cr_skip_test("%s is absent (make model fetches it)", SMOL);
}

/* A minimal GGUF v3: string and u32 metadata, and tensors given as (name, type, ne0, ne1, bytes). */
typedef struct { const char *name; int type; uint64_t ne0, ne1, bytes; } gg_tensor;
static void gg_str(FILE *f, const char *s) {
    uint64_t n = strlen(s);
    fwrite(&n, 8, 1, f);
    fwrite(s, 1, n, f);
}
static void write_gguf(const char *path, const char *arch, const gg_tensor *t, int nt) {
    static const char *const u32_keys[] = {"block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                                          "context_length"};
    static const uint32_t u32_vals[] = {1, 32, 32, 1, 16};
    FILE *f = fopen(path, "wb");
    cr_assert(f);
    uint32_t v = 3;
    uint64_t n_t = nt, n_kv = 1 + 5;
    fwrite("GGUF", 1, 4, f);
    fwrite(&v, 4, 1, f);
    fwrite(&n_t, 8, 1, f);
    fwrite(&n_kv, 8, 1, f);
    gg_str(f, "general.architecture");
    uint32_t ty = 8; /* string */
    fwrite(&ty, 4, 1, f);
    gg_str(f, arch);
    for (int i = 0; i < 5; i++) {
        char k[96];
        snprintf(k, sizeof k, "%s.%s", arch, u32_keys[i]);
        gg_str(f, k);
        ty = 4; /* u32 */
        fwrite(&ty, 4, 1, f);
        fwrite(&u32_vals[i], 4, 1, f);
    }
    uint64_t off = 0;
    for (int i = 0; i < nt; i++) {
        gg_str(f, t[i].name);
        uint32_t nd = 2;
        fwrite(&nd, 4, 1, f);
        fwrite(&t[i].ne0, 8, 1, f);
        fwrite(&t[i].ne1, 8, 1, f);
        uint32_t type = (uint32_t)t[i].type;
        fwrite(&type, 4, 1, f);
        fwrite(&off, 8, 1, f);
        off += (t[i].bytes + 31) / 32 * 32;
    }
    long pos = ftell(f);
    for (long p = pos; p % 32; p++) fputc(0, f);
    for (uint64_t i = 0; i < off; i++) fputc(0, f);
    fclose(f);
}

Test(cli, tokenize_and_text_runs_agree_with_token_runs) {
    need_smol();
    FILE *f = fopen(tmp("t.txt"), "w");
    fprintf(f, "The quick brown fox jumps over the lazy dog. It was 1,024 degrees.\n\tIndented code: x += 1;\n");
    fclose(f);
    cr_assert_eq(loupe("tokenize " SMOL " --text %s --out %s", tmp("t.txt"), tmp("t.npy")), 0, "%s", err_txt);
    cr_expect(strstr(out_txt, "tokens") != NULL, "%s", out_txt);
    lp_tokens t;
    cr_assert_eq(lp_tokens_load(&t, tmp("t.npy"), 1, 0, "int32"), LP_OK, "%s", lp_last_error()); /* rows of 1: every id */
    cr_expect_gt(t.n_seq, 20);
    /* the fixture prompt "The quick brown fox ..." begins with Hugging Face's ids */
    static const int32_t hf[] = {504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30};
    for (int i = 0; i < 10; i++) cr_expect_eq(t.ids[i], hf[i], "id %d: %d vs Hugging Face %d", i, t.ids[i], hf[i]);
    int n = (int)t.n_seq;
    lp_tokens_free(&t);
    /* run --text gives the same loss as run --tokens on the tokenized file */
    cr_assert_eq(loupe("run " SMOL " --text %s --json", tmp("t.txt")), 0, "%s", err_txt);
    cJSON *a = cJSON_Parse(strrchr(out_txt, '{'));
    cr_assert_eq(loupe("run " SMOL " --tokens %s --json", tmp("t.npy")), 0, "%s", err_txt);
    cJSON *b = cJSON_Parse(strrchr(out_txt, '{'));
    cr_assert(a && b);
    cr_expect_eq(cJSON_GetObjectItem(a, "n_tokens")->valueint, n - 1);
    cr_expect_eq(cJSON_GetObjectItem(a, "mean_loss")->valuedouble, cJSON_GetObjectItem(b, "mean_loss")->valuedouble);
    cJSON_Delete(a);
    cJSON_Delete(b);
}

/* data.prepend_bos: SmolLM2's tokenizer adds no BOS, so auto leaves the rows as they were;
 * true starts the row with its BOS (id 1), the same loss as running [1] + the text's ids. */
Test(cli, text_rows_with_prepend_bos) {
    need_smol();
    FILE *f = fopen(tmp("b.txt"), "w");
    fprintf(f, "Rows of a text may start with the tokenizer's BOS token, as TransformerLens does.\n");
    fclose(f);
    cr_assert_eq(loupe("tokenize " SMOL " --text %s --out %s", tmp("b.txt"), tmp("b.npy")), 0, "%s", err_txt);
    lp_tokens t;
    cr_assert_eq(lp_tokens_load(&t, tmp("b.npy"), 1, 0, "int32"), LP_OK, "%s", lp_last_error());
    int n = (int)t.n_seq;
    int32_t *with_bos = malloc((size_t)(n + 1) * sizeof *with_bos);
    with_bos[0] = 1;
    memcpy(with_bos + 1, t.ids, (size_t)n * sizeof *with_bos);
    lp_tokens_free(&t);
    cr_assert_eq(lp_npy_write_i32(tmp("bos.npy"), with_bos, -1, n + 1), LP_OK);
    free(with_bos);
    double loss[4];
    int count[4];
    const char *runs[4] = {"--text %s --json", "--text %s --data.prepend_bos=false --json", "--text %s --data.prepend_bos=true --json",
                           "--tokens %s --json"};
    for (int i = 0; i < 4; i++) {
        char fmt[128];
        snprintf(fmt, sizeof fmt, "run " SMOL " %s", runs[i]);
        cr_assert_eq(loupe(fmt, tmp(i == 3 ? "bos.npy" : "b.txt")), 0, "%s", err_txt);
        cJSON *j = cJSON_Parse(strrchr(out_txt, '{'));
        cr_assert(j != NULL, "%s", out_txt);
        loss[i] = cJSON_GetObjectItem(j, "mean_loss")->valuedouble, count[i] = cJSON_GetObjectItem(j, "n_tokens")->valueint;
        cJSON_Delete(j);
    }
    cr_expect(count[0] == n - 1 && count[1] == n - 1 && loss[0] == loss[1], "auto and false: %d %d tokens", count[0], count[1]);
    cr_expect(count[2] == n && count[3] == n && loss[2] == loss[3], "true: %d tokens, loss %g vs %g", count[2], loss[2], loss[3]);
    cr_expect(loss[2] != loss[0]);
}

Test(cli, generate_greedy_matches_hugging_face) {
    need_smol();
    /* prompt 1 of tests/fixtures/smollm2: transformers' float64 greedy continuation */
    static const int32_t hf[20] = {21759, 30, 669, 314, 253, 4959, 1909, 281, 6944, 28, 2755, 281, 39361, 30, 198, 198, 504, 1909, 282, 2817};
    cr_assert_eq(loupe("generate " SMOL " --prompt 'Water boils when it is heated, and ice melts when it is' --max-tokens 20 --json"), 0,
                 "%s", err_txt);
    cJSON *j = cJSON_Parse(strrchr(out_txt, '{'));
    cr_assert(j, "%s", out_txt);
    cr_expect_eq(cJSON_GetObjectItem(j, "n_prompt_tokens")->valueint, 13);
    cJSON *ids = cJSON_GetObjectItem(j, "ids");
    cr_assert_eq(cJSON_GetArraySize(ids), 20);
    for (int i = 0; i < 20; i++) cr_expect_eq(cJSON_GetArrayItem(ids, i)->valueint, hf[i], "token %d", i);
    cr_expect(strncmp(cJSON_GetObjectItem(j, "completion")->valuestring, " cooled. This is a fundamental concept", 38) == 0, "%s",
              cJSON_GetObjectItem(j, "completion")->valuestring);
    cJSON_Delete(j);
    /* sampling is reproducible by seed */
    static char first[sizeof out_txt];
    cr_assert_eq(loupe("generate " SMOL " --prompt 'Once upon a time' --max-tokens 12 --temperature 0.8 --top-p 0.9 --seed 7 --json"), 0,
                 "%s", err_txt);
    snprintf(first, sizeof first, "%s", out_txt);
    cr_assert_eq(loupe("generate " SMOL " --prompt 'Once upon a time' --max-tokens 12 --temperature 0.8 --top-p 0.9 --seed 7 --json"), 0,
                 "%s", err_txt);
    cJSON *x = cJSON_Parse(strrchr(first, '{')), *y = cJSON_Parse(strrchr(out_txt, '{'));
    cr_assert(x && y);
    char *xs = cJSON_PrintUnformatted(cJSON_GetObjectItem(x, "ids")), *ys = cJSON_PrintUnformatted(cJSON_GetObjectItem(y, "ids"));
    cr_expect_str_eq(xs, ys);
    free(xs), free(ys);
    cJSON_Delete(x), cJSON_Delete(y);
}

Test(cli, llama_bad_input_is_one_line_and_exit_2) {
    need_smol();
    /* a prompt longer than the context, and one that leaves no room for the new tokens */
    FILE *f = fopen(tmp("long.txt"), "w");
    for (int i = 0; i < 8300; i++) fputs(" the", f);
    fclose(f);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "generate " SMOL " --max-tokens 4 --prompt \"$(cat %s)\"", tmp("long.txt"));
    expect_bad("longer than the model's context of 8192", "%s", cmd);
    expect_bad("exceeds the model's context of 8192", "generate " SMOL " --prompt hello --max-tokens %s", "9000");
    expect_bad("gen.top_p", "generate " SMOL " --prompt hello --top-p %s", "1.5");
    /* an architecture loupe does not run */
    write_gguf(tmp("neox.gguf"), "gptneox", NULL, 0);
    expect_bad("GGUF architecture 'gptneox' is not supported", "info %s", tmp("neox.gguf"));
    /* a tensor type loupe cannot dequantize (Q5_1: 24-byte blocks of 32) */
    gg_tensor q51 = {"token_embd.weight", 7, 32, 8, 8 * 24};
    write_gguf(tmp("q51.gguf"), "llama", &q51, 1);
    expect_bad("tensor 'token_embd.weight' has type Q5_1, which loupe cannot dequantize", "info %s", tmp("q51.gguf"));
    /* corrupt metadata: a string length past the end of the file */
    write_gguf(tmp("bad.gguf"), "llama", NULL, 0);
    f = fopen(tmp("bad.gguf"), "r+b");
    fseek(f, 24, SEEK_SET); /* the length of the first key */
    uint64_t huge = 1ull << 40;
    fwrite(&huge, 8, 1, f);
    fclose(f);
    expect_bad("bad.gguf", "info %s", tmp("bad.gguf"));
    /* a truncated GGUF */
    snprintf(cmd, sizeof cmd, "head -c 1000 " SMOL " > %s", tmp("trunc.gguf"));
    cr_assert(system(cmd) == 0);
    expect_bad("trunc.gguf", "info %s", tmp("trunc.gguf"));
    /* a tokenizer.json the loader cannot honour */
    char sh[512];
    snprintf(sh, sizeof sh, "mkdir -p %s/wp && cp " LP_FIXTURES "/llama-tiny/config.json %s/wp/ && "
             "echo '{\"model\": {\"type\": \"WordPiece\", \"vocab\": {}}}' > %s/wp/tokenizer.json && echo hi > %s/hi.txt", dir, dir, dir, dir);
    cr_assert(system(sh) == 0);
    snprintf(sh, sizeof sh, "%s/wp --text %s/hi.txt --out %s/o.npy", dir, dir, dir);
    expect_bad("WordPiece", "tokenize %s", sh);
}

/* ---- SAEs through the command line ---- */

Test(cli, train_eval_and_encode_an_sae) {
    cr_assert_eq(loupe("cache --model.path=" MODEL " --data.tokens=" MODEL "/tokens.npy --cache.hooks=blocks.1.hook_resid_post,"
                       "blocks.1.mlp.hook_post --cache.out=%s",
                       tmp("store")),
                 0, "%s", err_txt);
    char args[1024];
    snprintf(args, sizeof args, "train-sae %s --data.hook=blocks.1.hook_resid_post --train.out=%s --sae.d_sae=128 --sae.k=8 "
             "--train.tokens=2048 --train.batch_tokens=32 --train.shuffle_tokens=32 --train.lr=3e-3 --train.log_every=8 --json",
             tmp("store"), tmp("sae"));
    cr_assert_eq(loupe("%s", args), 0, "%s", err_txt);
    cJSON *j = cJSON_Parse(strrchr(out_txt, '{'));
    cr_assert(j, "%s", out_txt);
    cr_expect_eq(cJSON_GetObjectItem(j, "tokens")->valueint, 2048);
    cr_expect_gt(cJSON_GetObjectItem(j, "explained_variance")->valuedouble, 0.5, "%s", out_txt);
    cJSON_Delete(j);
    /* SAELens layout */
    size_t n;
    char p[256];
    snprintf(p, sizeof p, "%s/cfg.json", tmp("sae"));
    char *cfg = lp_read_file(p, &n);
    cr_assert(cfg, "no cfg.json");
    cJSON *c = cJSON_Parse(cfg);
    cr_expect_str_eq(cJSON_GetObjectItem(c, "architecture")->valuestring, "topk");
    cr_expect_eq(cJSON_GetObjectItem(c, "d_in")->valueint, 64);
    cr_expect_eq(cJSON_GetObjectItem(c, "d_sae")->valueint, 128);
    cJSON_Delete(c);
    free(cfg);
    /* eval: reconstruction on the store and the spliced model loss */
    cr_assert_eq(loupe("eval-sae %s --data.store=%s --model.path=" MODEL " --tokens " MODEL "/tokens.npy --json", tmp("sae"), tmp("store")),
                 0, "%s", err_txt);
    j = cJSON_Parse(strrchr(out_txt, '{'));
    cr_assert(j, "%s", out_txt);
    double ev = cJSON_GetObjectItem(j, "metrics/explained_variance")->valuedouble, l0 = cJSON_GetObjectItem(j, "metrics/l0")->valuedouble;
    double clean = cJSON_GetObjectItem(j, "model_performance_preservation/ce_loss_without_sae")->valuedouble;
    cr_expect_gt(ev, 0.5, "%s", out_txt);
    cr_expect(l0 > 0 && l0 <= 8.0 + 1e-9, "L0 %f", l0);
    cr_expect(fabs(clean - 15.728273) < 1e-3, "clean loss %f is the fixture's", clean);
    cJSON_Delete(j);
    /* encode: top-k latents of every stored token */
    cr_assert_eq(loupe("encode %s --data.store=%s --encode.out=%s", tmp("sae"), tmp("store"), tmp("lat.safetensors")), 0, "%s", err_txt);
    lp_st_file f;
    cr_assert_eq(lp_st_open(&f, tmp("lat.safetensors")), LP_OK, "%s", lp_last_error());
    const lp_st_tensor *ix = lp_st_find(&f, "indices"), *vl = lp_st_find(&f, "values");
    cr_assert(ix && vl);
    cr_expect(ix->shape[0] == 32 && ix->shape[1] == 8 && ix->dtype == LP_I32, "indices [%lld, %lld]", (long long)ix->shape[0],
              (long long)ix->shape[1]);
    for (int i = 0; i < 32 * 8; i++) cr_expect(((const int32_t *)ix->data)[i] >= 0 && ((const int32_t *)ix->data)[i] < 128);
    /* the same latents from the live model (the store was cached from these rows) */
    cr_assert_eq(loupe("encode %s --model.path=" MODEL " --tokens " MODEL "/tokens.npy --encode.out=%s", tmp("sae"), tmp("lat2.safetensors")),
                 0, "%s", err_txt);
    lp_st_file f2;
    cr_assert_eq(lp_st_open(&f2, tmp("lat2.safetensors")), LP_OK, "%s", lp_last_error());
    const lp_st_tensor *ix2 = lp_st_find(&f2, "indices");
    cr_assert(ix2 && ix2->shape[0] == 32);
    cr_expect(memcmp(ix2->data, ix->data, 32 * 8 * 4) == 0, "live and stored activations give different latents");
    lp_st_close(&f2);
    lp_st_close(&f);

    /* live: two SAEs from one forward stream of the model, into train.out/<hook> */
    cr_assert_eq(loupe("train-sae --model.path=" MODEL " --tokens " MODEL "/tokens.npy --data.hook=blocks.0.hook_resid_post,"
                       "blocks.1.mlp.hook_post --train.out=%s --sae.k=8 --train.tokens=512 --train.batch_tokens=32 "
                       "--train.shuffle_tokens=32 --json",
                       tmp("live")),
                 0, "%s", err_txt);
    for (int h = 0; h < 2; h++) {
        snprintf(p, sizeof p, "%s/%s/cfg.json", tmp("live"), h ? "blocks.1.mlp.hook_post" : "blocks.0.hook_resid_post");
        cfg = lp_read_file(p, &n);
        cr_assert(cfg, "%s missing", p);
        c = cJSON_Parse(cfg);
        cr_expect_eq(cJSON_GetObjectItem(c, "d_in")->valueint, h ? 256 : 64);
        cr_expect_eq(cJSON_GetObjectItem(c, "d_sae")->valueint, h ? 2048 : 512); /* expansion factor 8 */
        cJSON_Delete(c);
        free(cfg);
    }

    /* bad input: named keys, exit 2, one line, before any work */
    expect_bad("unknown config key 'sae.bogus'", "train-sae --sae.bogus=%s", "1");
    snprintf(args, sizeof args, "train-sae %s --data.hook=blocks.1.hook_resid_post --train.out=%s", tmp("store"), tmp("x"));
    char bad[1200];
    snprintf(bad, sizeof bad, "%s --sae.d_sae=16 --sae.k=%%s", args);
    expect_bad("sae.k = 32", bad, "32");
    snprintf(bad, sizeof bad, "%s --train.lr=%%s", args);
    expect_bad("train.lr = -0.1", bad, "-0.1");
    snprintf(bad, sizeof bad, "%s --sae.architecture=%%s", args);
    expect_bad("sae.architecture", bad, "gated");
    struct stat sb;
    cr_expect(stat(tmp("x"), &sb) != 0, "a refused run created its output");
    /* an SAE of the wrong width for the hook */
    snprintf(bad, sizeof bad, "eval-sae %s --data.hook=blocks.1.mlp.hook_post --data.store=%s", tmp("sae"), tmp("store"));
    expect_bad("d_in is 64", "%s", bad);
    cr_expect(strstr(err_txt, "256") != NULL, "%s", err_txt);
}

/* ---- attribution sweeps ---- */

Test(cli, attribute_and_patch_sweeps_resume_and_report_bad_lines) {
    FILE *f = fopen(tmp("pairs.jsonl"), "w");
    fprintf(f, "{\"clean\": [1, 2, 3, 4, 5, 6], \"corrupted\": [1, 2, 9, 4, 5, 6], \"answer\": 7, \"wrong_answer\": 8}\n");
    fprintf(f, "{\"clean\": [10, 11, 12, 13], \"corrupted\": [10, 14, 12, 13], \"answer\": [15], \"wrong_answer\": [16]}\n");
    fprintf(f, "this is not json\n");                                                                            /* line 3 */
    fprintf(f, "{\"clean\": [1, 2, 3], \"corrupted\": [1, 2], \"answer\": 7, \"wrong_answer\": 8}\n");          /* 4: lengths */
    fprintf(f, "{\"clean\": [1, 2, 3], \"corrupted\": [1, 5, 3], \"answer\": [7, 9], \"wrong_answer\": 8}\n");  /* 5: 2 tokens */
    fprintf(f, "{\"clean\": [1, 2, 3], \"corrupted\": [1, 5, 3], \"answer\": 7}\n");                            /* 6: missing */
    fprintf(f, "{\"clean\": [");                                                                                 /* 7: too long */
    for (int i = 0; i < 40; i++) fprintf(f, "%s%d", i ? ", " : "", i + 1);
    fprintf(f, "], \"corrupted\": [");
    for (int i = 0; i < 40; i++) fprintf(f, "%s%d", i ? ", " : "", i + 2);
    fprintf(f, "], \"answer\": 7, \"wrong_answer\": 8}\n");
    fprintf(f, "{\"clean\": [20, 21, 22, 23, 24, 25], \"corrupted\": [20, 21, 30, 23, 24, 25], \"answer\": 7, \"wrong_answer\": 8}\n");
    fclose(f);
    char args[1024];
    snprintf(args, sizeof args, "attribute " MODEL " --attrib.pairs=%s --attrib.out=%s --attrib.top=5", tmp("pairs.jsonl"), tmp("atp"));
    int rc = loupe("%s", args);
    cr_expect_eq(rc, 2, "bad lines give exit 2 after the sweep; stderr: %s", err_txt);
    cr_expect(strstr(out_txt, "3 pairs done") != NULL, "%s", out_txt);
    const char *expect[] = {"line 3 (", "line 4 (clean is 3 tokens and corrupted 2", "line 5 ('answer' is 2 tokens", "line 6 (missing \"wrong_answer\"",
                            "line 7 (the prompts are 40 tokens; the model's context is 32"};
    for (int i = 0; i < 5; i++) cr_expect(strstr(err_txt, expect[i]) != NULL, "stderr lacks '%s': %s", expect[i], err_txt);
    char *nl = strchr(err_txt, '\n');
    cr_expect(nl && nl[1] == 0, "the bad lines are not one line: %s", err_txt);
    /* results: one line per good pair, top nodes named */
    size_t n;
    char p[256];
    snprintf(p, sizeof p, "%s/results.jsonl", tmp("atp"));
    char *res = lp_read_file(p, &n);
    cr_assert(res);
    int lines = 0;
    for (char *q = res; *q; q++) lines += *q == '\n';
    cr_expect_eq(lines, 3, "%s", res);
    cr_expect(strstr(res, "\"node\":\"blocks.") != NULL, "%s", res);
    free(res);
    /* a restart skips what is done */
    loupe("%s", args);
    cr_expect(strstr(out_txt, "0 pairs done (3 already") != NULL, "%s", out_txt);
    /* exact patching of the same pairs, compared with attribution patching */
    snprintf(args, sizeof args, "patch " MODEL " --attrib.pairs=%s --attrib.out=%s --attrib.nodes=hook_resid_pre,attn.hook_z", tmp("pairs.jsonl"),
             tmp("exact"));
    loupe("%s", args);
    cr_expect(strstr(out_txt, "hook_resid_pre       attribution vs exact patching: Pearson") != NULL, "%s", out_txt);
    lp_st_file sf;
    snprintf(p, sizeof p, "%s/scores-exact-000000.safetensors", tmp("exact"));
    cr_assert_eq(lp_st_open(&sf, p), LP_OK, "%s", lp_last_error());
    const lp_st_tensor *z = lp_st_find(&sf, "pair000000.exact.attn.hook_z");
    cr_expect(z && z->ndim == 3 && z->shape[0] == 2 && z->shape[1] == 6 && z->shape[2] == 4);
    lp_st_close(&sf);
    /* unknown node kinds are refused before any work */
    expect_bad("unknown node kind 'hook_resid'", "attribute " MODEL " --attrib.pairs=x --attrib.out=y --attrib.nodes=%s", "hook_resid");
}

/* train-sae starts itself once more with OPENBLAS_THREAD_TIMEOUT=20 when the user has not set
 * the variable (host/cli/main.c, train_blas_env); a value the user set, and every other
 * command, are left alone. Seen through strace's record of the programs each run starts. */
static int execs_of(const char *env, const char *args, char *trace, size_t n) {
    const char *bin = getenv("LOUPE_CLI") ? getenv("LOUPE_CLI") : "build/loupe";
    char cmd[4096], path[128];
    snprintf(path, sizeof path, "%s/strace.txt", dir);
    snprintf(cmd, sizeof cmd, "env %s strace -f -v -s 4096 -e trace=execve -o %s %s %s >/dev/null 2>&1", env, path, bin, args);
    (void)!system(cmd);
    slurp(path, trace, n);
    int k = 0;
    for (const char *p = trace; (p = strstr(p, "execve(\"/proc/self/exe\"")); p++) k++;
    return k;
}

Test(cli, train_sae_sets_how_long_openblas_spins) {
    if (system("command -v strace >/dev/null 2>&1") != 0) cr_skip_test("strace is not installed");
    static char trace[1 << 16];
    cr_expect_eq(execs_of("-u OPENBLAS_THREAD_TIMEOUT", "train-sae /nonexistent", trace, sizeof trace), 1, "%s", trace);
    cr_expect(strstr(trace, "OPENBLAS_THREAD_TIMEOUT=20"), "%s", trace);
    cr_expect_eq(execs_of("OPENBLAS_THREAD_TIMEOUT=26", "train-sae /nonexistent", trace, sizeof trace), 0, "%s", trace);
    cr_expect_eq(execs_of("-u OPENBLAS_THREAD_TIMEOUT", "info " MODEL, trace, sizeof trace), 0, "%s", trace);
    cr_expect(!strstr(trace, "OPENBLAS_THREAD_TIMEOUT="), "%s", trace);
}
