/* test_steer_cli.c: `loupe generate` with steering, as a user meets it, on the real
 * SmolLM2 model: the unsteered continuation is plain generation's, the steered one
 * differs where the positions say it may, vectors load from files or from two prompts,
 * and bad vectors are one line on stderr with exit 2; an SAE spliced in (with its error,
 * with clamped latents) gives the library's continuation and the activations computed by
 * hand from the SAE's weights. Runs build/loupe (or $LOUPE_CLI). */
#include <cjson/cJSON.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "loupe/hooks.h"
#include "loupe/safetensors.h"
#include "loupe/sae.h"
#include "loupe/tokenizer.h"
#include "testutil.h"

#define SMOL "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define PROMPT "--prompt 'I think that dogs are' --max-tokens 6"
#define LOVE_HATE "--steer.from_prompts='I love dogs. Dogs are wonderful, loyal and sweet.|I hate dogs. Dogs are terrible, dangerous and dirty.'"
static char dir[64];
static char out_txt[1 << 16], err_txt[1 << 16];

static void mk(void) {
    snprintf(dir, sizeof dir, "/tmp/loupe-steer-XXXXXX");
    cr_assert(mkdtemp(dir) != NULL);
    struct stat sb;
    cr_assert(stat(SMOL, &sb) == 0, SMOL " is missing: run `make model`");
}
static void rm(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_expect(system(cmd) == 0);
}
TestSuite(steer_cli, .init = mk, .fini = rm, .timeout = 120);

static void slurp(const char *path, char *buf, size_t n) {
    FILE *f = fopen(path, "rb");
    size_t k = f ? fread(buf, 1, n - 1, f) : 0;
    buf[k] = 0;
    if (f) fclose(f);
}

static int loupe(const char *args) {
    char cmd[4096], p[128];
    const char *bin = getenv("LOUPE_CLI") ? getenv("LOUPE_CLI") : "build/loupe";
    snprintf(cmd, sizeof cmd, "%s %s >%s/out.txt 2>%s/err.txt", bin, args, dir, dir);
    int rc = system(cmd);
    snprintf(p, sizeof p, "%s/out.txt", dir);
    slurp(p, out_txt, sizeof out_txt);
    snprintf(p, sizeof p, "%s/err.txt", dir);
    slurp(p, err_txt, sizeof err_txt);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

static cJSON *json_run(const char *args) {
    cr_assert_eq(loupe(args), 0, "`%s`: %s", args, err_txt);
    size_t len = strlen(out_txt);
    while (len && out_txt[len - 1] == '\n') out_txt[--len] = 0;
    char *last = strrchr(out_txt, '\n');
    cJSON *j = cJSON_Parse(last ? last + 1 : out_txt);
    cr_assert(j, "last stdout line is not JSON: %s", out_txt);
    return j;
}

static int ids_of(const cJSON *o, const char *key, int *ids) {
    const cJSON *a = cJSON_GetObjectItem(o, key);
    if (key[0] != 'i') a = cJSON_GetObjectItem(a, "ids");
    cr_assert(cJSON_IsArray(a), "%s has no ids", key);
    int n = cJSON_GetArraySize(a);
    for (int i = 0; i < n && i < 64; i++) ids[i] = cJSON_GetArrayItem(a, i)->valueint;
    return n;
}

static void bad(const char *args, const char *p1, const char *p2) {
    int rc = loupe(args);
    cr_expect_eq(rc, 2, "exit %d for `%s`; stderr: %s", rc, args, err_txt);
    cr_expect(strstr(err_txt, p1) && strstr(err_txt, p2), "stderr '%s' lacks '%s' or '%s'", err_txt, p1, p2);
    char *nl = strchr(err_txt, '\n');
    cr_expect(nl && nl[1] == 0, "stderr is not one line: '%s'", err_txt);
}

static void write_vec(const char *path, const char *name, int n, float v) {
    float *x = malloc(n * sizeof(float));
    for (int i = 0; i < n; i++) x[i] = v;
    lp_st_spec s = {name, LP_F32, 1, {n}};
    const void *d = x;
    cr_assert_eq(lp_st_write(path, &s, &d, 1, NULL), LP_OK, "%s", lp_last_error());
    free(x);
}

Test(steer_cli, difference_of_means_side_by_side) {
    int plain[64], un[64], st[64], st_new[64];
    cJSON *j = json_run("generate " SMOL " " PROMPT " --json");
    int n = ids_of(j, "ids", plain);
    cJSON_Delete(j);
    j = json_run("generate " SMOL " " PROMPT " --json --steer.hook=blocks.6.hook_resid_post --steer.coef=8 " LOVE_HATE);
    cr_expect_eq(ids_of(j, "unsteered", un), n);
    int ns = ids_of(j, "steered", st);
    cr_expect(memcmp(un, plain, n * sizeof(int)) == 0, "the unsteered continuation is not plain generation's");
    cr_expect(ns != n || memcmp(un, st, n * sizeof(int)) != 0, "steering changed nothing");
    cr_expect(st[0] != un[0], "steering every position left the first new token alone");
    const cJSON *s = cJSON_GetObjectItem(j, "settings");
    cr_expect_str_eq(cJSON_GetObjectItem(s, "hook")->valuestring, "blocks.6.hook_resid_post");
    cr_expect_str_eq(cJSON_GetObjectItem(s, "positions")->valuestring, "all");
    cr_expect(cJSON_GetObjectItem(s, "vector_norm")->valuedouble > 1, "vector_norm %g", cJSON_GetObjectItem(s, "vector_norm")->valuedouble);
    cr_expect(cJSON_IsString(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "steered"), "text")));
    cJSON_Delete(j);
    /* only new tokens: the prompt pass, hence the first new token, is the unsteered one */
    j = json_run("generate " SMOL " " PROMPT " --json --steer.hook=blocks.6.hook_resid_post --steer.coef=8 --steer.positions=new " LOVE_HATE);
    ns = ids_of(j, "steered", st_new);
    cr_expect_eq(st_new[0], un[0], "steering new tokens only changed the token the prompt pass picks");
    cr_expect(memcmp(st_new, un, (ns < n ? ns : n) * sizeof(int)) != 0, "steering new tokens changed nothing");
    cJSON_Delete(j);
}

Test(steer_cli, vectors_from_files_and_bad_ones) {
    char path[128], args[1024];
    /* a zero vector named after its hook: loads, finds the hook, changes nothing */
    snprintf(path, sizeof path, "%s/v.safetensors", dir);
    write_vec(path, "blocks.6.hook_resid_post.zero", 576, 0);
    snprintf(args, sizeof args, "generate " SMOL " " PROMPT " --json --steer.vector=%s", path);
    int un[64], st[64];
    cJSON *j = json_run(args);
    int n = ids_of(j, "unsteered", un);
    cr_expect_eq(ids_of(j, "steered", st), n);
    cr_expect(memcmp(un, st, n * sizeof(int)) == 0, "a zero vector changed the continuation");
    cr_expect_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "settings"), "hook")->valuestring, "blocks.6.hook_resid_post");
    cJSON_Delete(j);
    /* the wrong width names the file and both widths */
    snprintf(path, sizeof path, "%s/w.safetensors", dir);
    write_vec(path, "dir", 64, 1);
    snprintf(args, sizeof args, "generate " SMOL " " PROMPT " --steer.hook=blocks.3.hook_resid_post --steer.probe=%s:dir", path);
    bad(args, "w.safetensors:dir has 64 values", "576 per position");
    snprintf(args, sizeof args, "generate " SMOL " " PROMPT " --steer.hook=blocks.3.hook_resid_post --steer.vector=%s:nothing", path);
    bad(args, "steer.vector", "no tensor 'nothing'");
    /* an SAE latent out of range, and an SAE whose width is not the hook's */
    bad("generate " SMOL " " PROMPT " --steer.sae=" LP_FIXTURES "/sae/saelens_standard --steer.latent=64", "steer.latent: 64 is out of range",
        "latents 0..63");
    bad("generate " SMOL " " PROMPT " --steer.sae=" LP_FIXTURES "/sae/saelens_standard --steer.latent=3 --steer.hook=blocks.1.hook_resid_post",
        "W_dec[3] has 16 values", "576 per position");
    bad("generate " SMOL " " PROMPT " --steer.hook=blocks.1.hook_resid_post", "steer.hook", "give the vector");
    bad("generate " SMOL " " PROMPT " --steer.zero=blocks.99.hook_z", "steer.zero", "matches no hook");
}

/* ---- SAE splices ---- */

#define SPLICE_HOOK "blocks.3.hook_resid_post"
enum { DM = 576, NS = 32 };

/* A standard SAE of random weights at `hook`, written in the SAELens layout. */
static void write_sae(const char *path, const char *hook, int d_in) {
    lp_ctx c;
    cr_assert_eq(lp_ctx_init(&c, LP_CPU, LP_F32), LP_OK);
    lp_sae_cfg cf = {.arch = LP_SAE_STANDARD, .d_in = d_in, .d_sae = NS, .d_out = d_in, .apply_b_dec_to_input = 1};
    snprintf(cf.normalize, sizeof cf.normalize, "none");
    snprintf(cf.hook_name, sizeof cf.hook_name, "%s", hook);
    lp_sae *s;
    cr_assert_eq(lp_sae_alloc(&s, &cf, &c), LP_OK, "%s", lp_last_error());
    lp_test_fill(s->W_enc, (size_t)d_in * NS, 31, -0.05f, 0.05f);
    lp_test_fill(s->b_enc, NS, 32, -0.1f, 0.3f);
    lp_test_fill(s->W_dec, (size_t)NS * d_in, 33, -0.2f, 0.2f);
    lp_test_fill(s->b_dec, d_in, 34, -0.1f, 0.1f);
    cr_assert_eq(lp_sae_save(s, &c, path, 1.0f), LP_OK, "%s", lp_last_error());
    lp_sae_free(s, &c);
    lp_ctx_free(&c);
}

/* The library's greedy continuation of the test prompt with the splice o installed. */
static int lib_generate(lp_model *m, const lp_tokenizer *tk, lp_sae *s, const lp_sae_splice_opts *o, int *ids) {
    int32_t *prompt, out[64];
    size_t np;
    cr_assert_eq(lp_tokenize(tk, "I think that dogs are", 21, &prompt, &np), LP_OK);
    lp_sae_splice *sp = NULL;
    if (s) cr_assert_eq(lp_sae_splice_add(&sp, m, s, o), LP_OK, "%s", lp_last_error());
    lp_gen_opts g = {.max_tokens = 6, .top_p = 1, .stop_token = lp_tokenizer_eos(tk)};
    int n = 0;
    cr_assert_eq(lp_generate(m, prompt, (int)np, &g, out, &n), LP_OK, "%s", lp_last_error());
    lp_hooks_clear(m);
    lp_sae_splice_free(sp);
    for (int i = 0; i < n; i++) ids[i] = out[i];
    free(prompt);
    return n;
}

Test(steer_cli, sae_splice_is_the_librarys) {
    char sae[128], args[1024];
    snprintf(sae, sizeof sae, "%s/sae", dir);
    write_sae(sae, SPLICE_HOOK, DM);
    lp_model *m;
    lp_tokenizer *tk;
    lp_sae *s;
    cr_assert_eq(lp_model_load(&m, SMOL, LP_CPU, LP_F32), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_tokenizer_load(&tk, SMOL), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_sae_load(&s, lp_model_ctx(m), sae), LP_OK, "%s", lp_last_error());
    int plain[64], lib[64], un[64], st[64];
    int n0 = lib_generate(m, tk, NULL, NULL, plain);
    const char *mode[] = {"", " --steer.splice_error=true --steer.latent_clamp=5:40,17:25", " --steer.latent_clamp=5:40"};
    int clat[] = {5, 17};
    float cval[] = {40, 25};
    lp_sae_splice_opts opts[] = {{0}, {.with_error = 1, .clamp_latents = clat, .clamp_values = cval, .n_clamp = 2},
                                 {.clamp_latents = clat, .clamp_values = cval, .n_clamp = 1}};
    for (int k = 0; k < 3; k++) {
        snprintf(args, sizeof args, "generate " SMOL " " PROMPT " --json --steer.splice=%s%s", sae, mode[k]);
        cJSON *j = json_run(args);
        cr_expect_eq(ids_of(j, "unsteered", un), n0);
        cr_expect(memcmp(un, plain, n0 * sizeof(int)) == 0, "the unsteered continuation is not plain generation's");
        int ns = ids_of(j, "steered", st), nl = lib_generate(m, tk, s, &opts[k], lib);
        cr_expect(ns == nl && memcmp(st, lib, ns * sizeof(int)) == 0, "`%s`: the CLI's splice is not the library's", mode[k]);
        cr_expect(ns != n0 || memcmp(st, plain, ns * sizeof(int)) != 0, "`%s`: the splice changed nothing", mode[k]);
        cr_expect_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "settings"), "splice_hook")->valuestring, SPLICE_HOOK);
        cJSON_Delete(j);
    }
    /* with its error added back and nothing clamped, the splice is the identity */
    snprintf(args, sizeof args, "generate " SMOL " " PROMPT " --json --steer.splice=%s --steer.splice_error=true", sae);
    cJSON *j = json_run(args);
    int ns = ids_of(j, "steered", st);
    cr_expect(ns == n0 && memcmp(st, plain, ns * sizeof(int)) == 0, "a splice with its error changed the continuation");
    cJSON_Delete(j);
    lp_sae_free(s, lp_model_ctx(m));
    lp_tokenizer_free(tk);
    lp_model_free(m);
}

/* The spliced activation against the SAE's formula evaluated here in double:
 * f = relu((x - b_dec) W_enc + b_enc), x_hat = f W_dec + b_dec, clamped latents replaced. */
static void expected_row(const lp_sae *s, const float *x, int with_error, int lat, float val, float *y) {
    double f[NS];
    for (int j = 0; j < NS; j++) {
        double a = s->b_enc[j];
        for (int d = 0; d < DM; d++) a += (double)(x[d] - s->b_dec[d]) * s->W_enc[(size_t)d * NS + j];
        f[j] = a > 0 ? a : 0;
    }
    for (int d = 0; d < DM; d++) {
        double xh = s->b_dec[d], clamp = (val - f[lat]) * s->W_dec[(size_t)lat * DM + d];
        for (int j = 0; j < NS; j++) xh += f[j] * s->W_dec[(size_t)j * DM + d];
        y[d] = (float)((with_error ? x[d] : xh) + clamp);
    }
}

Test(steer_cli, sae_splice_values_by_hand) {
    char sae[128];
    snprintf(sae, sizeof sae, "%s/sae", dir);
    write_sae(sae, SPLICE_HOOK, DM);
    lp_model *m;
    lp_sae *s;
    cr_assert_eq(lp_model_load(&m, SMOL, LP_CPU, LP_F32), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_sae_load(&s, lp_model_ctx(m), sae), LP_OK, "%s", lp_last_error());
    enum { T = 5 };
    int32_t toks[T] = {1, 57, 2000, 345, 12};
    float x[T * DM], y[T * DM], want[DM];
    cr_assert_eq(lp_hook_capture(m, SPLICE_HOOK, NULL, 0, NULL), LP_OK);
    cr_assert_eq(lp_model_forward(m, toks, 1, T, 0), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_capture_read_f32(m, SPLICE_HOOK, x, T * DM), LP_OK);
    int lat = 9, pos[] = {1, 3};
    float val = 12.5f;
    for (int with_error = 0; with_error < 2; with_error++) {
        lp_hooks_clear(m);
        lp_sae_splice *sp;
        lp_sae_splice_opts o = {.with_error = with_error, .clamp_latents = &lat, .clamp_values = &val, .n_clamp = 1, .pos = pos, .npos = 2};
        cr_assert_eq(lp_sae_splice_add(&sp, m, s, &o), LP_OK, "%s", lp_last_error());
        cr_assert_eq(lp_hook_capture(m, SPLICE_HOOK, NULL, 0, NULL), LP_OK); /* records the edited value */
        cr_assert_eq(lp_model_forward(m, toks, 1, T, 0), LP_OK, "%s", lp_last_error());
        cr_assert_eq(lp_capture_read_f32(m, SPLICE_HOOK, y, T * DM), LP_OK);
        for (int t = 0; t < T; t++) {
            int spliced = t == 1 || t == 3;
            if (spliced) expected_row(s, x + t * DM, with_error, lat, val, want);
            else memcpy(want, x + t * DM, sizeof want);
            double worst = 0, scale = 1;
            for (int d = 0; d < DM; d++) worst = fmax(worst, fabs(y[t * DM + d] - want[d])), scale = fmax(scale, fabs(want[d]));
            cr_expect_lt(worst, 1e-4 * scale, "error %d, position %d: off by %g", with_error, t, worst);
        }
        lp_hooks_clear(m);
        lp_sae_splice_free(sp);
    }
    lp_sae_free(s, lp_model_ctx(m));
    lp_model_free(m);
}

Test(steer_cli, bad_splices) {
    char sae[128], args[1024];
    snprintf(sae, sizeof sae, "%s/far", dir);
    write_sae(sae, "blocks.99.hook_resid_post", DM);
    snprintf(args, sizeof args, "generate " SMOL " " PROMPT " --steer.splice=%s", sae);
    bad(args, "steer.splice", "no hook 'blocks.99.hook_resid_post'");
    bad("generate " SMOL " " PROMPT " --steer.splice=" LP_FIXTURES "/sae/saelens_standard", "steer.splice", "d_in is 16 but the model's hook has 576");
    snprintf(sae, sizeof sae, "%s/sae", dir);
    write_sae(sae, SPLICE_HOOK, DM);
    snprintf(args, sizeof args, "generate " SMOL " " PROMPT " --steer.splice=%s --steer.latent_clamp=32:1", sae);
    bad(args, "steer.latent_clamp", "latent 32 is out of range");
    snprintf(args, sizeof args, "generate " SMOL " " PROMPT " --steer.splice=%s --steer.latent_clamp=3", sae);
    bad(args, "steer.latent_clamp", "N:VALUE");
    bad("generate " SMOL " " PROMPT " --steer.latent_clamp=3:1", "steer.latent_clamp", "needs steer.splice");
    bad("generate " SMOL " " PROMPT " --steer.splice=" LP_FIXTURES "/sae/saelens_jumprelu_transcoder", "steer.splice", "transcoder");
}
