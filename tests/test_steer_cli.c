/* test_steer_cli.c: `loupe generate` with steering, as a user meets it, on the real
 * SmolLM2 model: the unsteered continuation is plain generation's, the steered one
 * differs where the positions say it may, vectors load from files or from two prompts,
 * and bad vectors are one line on stderr with exit 2. Runs build/loupe (or $LOUPE_CLI). */
#include <cjson/cJSON.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "loupe/safetensors.h"
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
