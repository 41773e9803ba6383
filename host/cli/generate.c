/* generate.c: `loupe generate`, plain or steered.
 *
 * Steering adds coef x a vector to one hook at every position, only the new tokens, or
 * only the prompt (steer.positions), while generating with the KV cache. The vector comes
 * from a safetensors tensor (steer.vector or steer.probe: FILE.safetensors[:TENSOR], e.g.
 * a probe's direction or a saved difference of means), an SAE's decoder row
 * (steer.sae + steer.latent: W_dec[latent]), or two prompts (steer.from_prompts="A|B":
 * the mean over A's positions of the hook's activation minus B's). steer.zero zero-ablates
 * a hook at the same positions. steer.splice splices an SAE in at its hook (its
 * reconstruction replaces the activation; with steer.splice_error the reconstruction
 * error is added back, and steer.latent_clamp sets latents in the reconstruction). At a
 * shared hook the splice runs first, then the vector is added, then steer.zero. A steered
 * run generates twice with the same settings, unsteered and steered, and prints both. */
#include <cjson/cJSON.h>
#include <fnmatch.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "loupe/hooks.h"
#include "loupe/safetensors.h"
#include "loupe/sae.h"
#include "loupe/textfile.h"
#include "loupe/tokenizer.h"
#include "cli.h"

typedef struct { const lp_tokenizer *tk; int stream; } gen_print;

/* Streams each new token's text as it comes (a token may end inside a UTF-8 character;
 * the terminal joins the bytes). */
static lp_status print_token(int32_t id, void *user) {
    gen_print *p = user;
    if (!p->stream) return LP_OK;
    char *txt;
    size_t len;
    LP_CHECK(lp_detokenize(p->tk, &id, 1, &txt, &len));
    fwrite(txt, 1, len, stdout);
    fflush(stdout);
    free(txt);
    return LP_OK;
}

/* ---- the steering vector ---- */

typedef struct steer {
    char hook[128];       /* where the vector is added */
    char source[1200];    /* what it is, for the report */
    float *vec;           /* [width] */
    int width;
    const char *zero;     /* steer.zero, or NULL */
    const char *splice;   /* steer.splice: the SAE's directory, or NULL */
    lp_sae *sae;          /* loaded on the model's context */
    lp_sae_splice *sp;    /* while the steered continuation runs */
    int n_clamp, *clamp_lat;
    float *clamp_val;
    int active;
} steer;

/* Values per position of a hook (the vector's width), or 0 for the scores and pattern. */
static int hook_width(lp_model *m, const char *hook, int *id) {
    *id = lp_hook_find(m, hook);
    if (*id < 0) return -1;
    int64_t s[LP_MAX_DIMS];
    int nd = lp_hook_shape(m, *id, 1, 1, s);
    if (strstr(hook, "hook_attn_scores") || strstr(hook, "hook_pattern")) return 0;
    int64_t w = 1;
    for (int i = 2; i < nd; i++) w *= s[i];
    return (int)w;
}

/* FILE.safetensors[:TENSOR]: the whole string when it is a file, else split at the last ':'. */
static lp_status read_vector(const char *key, const char *spec, steer *sv) {
    char path[1100], name[256] = "";
    struct stat sb;
    snprintf(path, sizeof path, "%s", spec);
    char *colon = strrchr(path, ':');
    if (stat(path, &sb) != 0 && colon) {
        snprintf(name, sizeof name, "%s", colon + 1);
        *colon = 0;
    }
    lp_st_file f;
    LP_CHECK(lp_st_open(&f, path));
    const lp_st_tensor *t = name[0] ? lp_st_find(&f, name) : f.n == 1 ? &f.tensors[0] : NULL;
    lp_status st = LP_OK;
    if (!t) {
        char list[512] = "";
        for (int i = 0; i < f.n && strlen(list) < 400; i++)
            snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", i ? ", " : "", f.tensors[i].name);
        st = name[0] ? LP_ERR(LP_ERR_NOT_FOUND, "%s: %s has no tensor '%s' (it has: %s)", key, path, name, list)
                     : LP_ERR(LP_ERR_ARG, "%s: %s holds %d tensors; name one as %s:TENSOR (it has: %s)", key,
                                    path, f.n, path, list);
    } else {
        int64_t n = 1;
        for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
        sv->width = (int)n;
        sv->vec = malloc((n ? n : 1) * sizeof(float));
        st = sv->vec ? lp_convert_host(sv->vec, LP_F32, t->data, t->dtype, n) : LP_ERR(LP_ERR_OOM, "out of memory");
        snprintf(sv->source, sizeof sv->source, "%s:%s", path, t->name);
        /* a tensor named after a hook ("blocks.3.hook_resid_post.diffmean") names where it goes */
        if (st == LP_OK && !sv->hook[0] && strncmp(t->name, "blocks.", 7) == 0) {
            char *h = strstr(t->name, ".hook_");
            const char *end = h ? strchr(h + 1, '.') : NULL;
            if (h) snprintf(sv->hook, sizeof sv->hook, "%.*s", (int)(end ? end - t->name : (long)strlen(t->name)), t->name);
        }
    }
    lp_st_close(&f);
    return st;
}

/* W_dec[latent] of an SAE, loaded on the CPU; its hook (the one it writes) unless given. */
static lp_status read_sae_row(const char *path, long latent, steer *sv) {
    lp_ctx c;
    LP_CHECK(lp_ctx_init(&c, LP_CPU, LP_F32));
    lp_sae *s = NULL;
    lp_status st = lp_sae_load(&s, &c, path);
    if (st == LP_OK && latent < 0) st = LP_ERR(LP_ERR_ARG, "steer.latent: needed with steer.sae (a latent of %s)", path);
    if (st == LP_OK && latent >= s->cfg.d_sae)
        st = LP_ERR(LP_ERR_ARG, "steer.latent: %ld is out of range for %s, which has latents 0..%d", latent, path,
                          s->cfg.d_sae - 1);
    if (st == LP_OK) {
        int d = s->cfg.d_out;
        sv->width = d;
        if (!(sv->vec = malloc(d * sizeof(float)))) st = LP_ERR(LP_ERR_OOM, "out of memory");
        else memcpy(sv->vec, s->W_dec + (size_t)latent * d, d * sizeof(float));
        if (!sv->hook[0]) snprintf(sv->hook, sizeof sv->hook, "%s", s->cfg.hook_name_out[0] ? s->cfg.hook_name_out : s->cfg.hook_name);
        snprintf(sv->source, sizeof sv->source, "%s W_dec[%ld]", path, latent);
    }
    lp_sae_free(s, &c);
    lp_ctx_free(&c);
    return st;
}

/* The mean over a prompt's positions of the hook's activation, added into acc with sign. */
static lp_status add_mean(lp_model *m, const lp_tokenizer *tk, const char *text, size_t len, const char *hook, int w, float sign,
                          float *acc) {
    int32_t *ids = NULL;
    size_t n = 0;
    LP_CHECK(lp_tokenize(tk, text, len, &ids, &n));
    lp_status st = n == 0 ? LP_ERR(LP_ERR_ARG, "steer.from_prompts: '%.*s' gives no tokens", (int)len, text) : LP_OK;
    if (st == LP_OK && n > (size_t)lp_model_config(m)->n_ctx)
        st = LP_ERR(LP_ERR_ARG, "steer.from_prompts: a prompt of %zu tokens exceeds the context", n);
    float *x = st == LP_OK ? malloc(n * w * sizeof(float)) : NULL;
    if (st == LP_OK && !x) st = LP_ERR(LP_ERR_OOM, "out of memory");
    if (st == LP_OK) st = lp_hook_capture(m, hook, NULL, 0, NULL);
    if (st == LP_OK) st = lp_model_forward(m, ids, 1, (int)n, 0);
    if (st == LP_OK) st = lp_capture_read_f32(m, hook, x, n * w);
    for (size_t i = 0; st == LP_OK && i < n; i++)
        for (int e = 0; e < w; e++) acc[e] += sign * x[i * w + e] / (float)n;
    lp_hooks_clear(m);
    free(x);
    free(ids);
    return st;
}

/* steer.from_prompts = "A|B" (split at the first '|'): mean(hook | A) - mean(hook | B). */
static lp_status diff_of_means(lp_model *m, const lp_tokenizer *tk, const char *spec, steer *sv, int w) {
    const char *bar = strchr(spec, '|');
    if (!bar || bar == spec || !bar[1]) LP_FAIL(LP_ERR_ARG, "steer.from_prompts: give two prompts as \"A|B\"");
    if (!(sv->vec = calloc(w, sizeof(float)))) LP_FAIL(LP_ERR_OOM, "out of memory");
    sv->width = w;
    LP_CHECK(lp_utf8_check(spec, strlen(spec), "steer.from_prompts"));
    LP_CHECK(add_mean(m, tk, spec, bar - spec, sv->hook, w, 1.0f, sv->vec));
    LP_CHECK(add_mean(m, tk, bar + 1, strlen(bar + 1), sv->hook, w, -1.0f, sv->vec));
    snprintf(sv->source, sizeof sv->source, "difference of means: \"%s\"", spec);
    return LP_OK;
}

/* Whether a hook name or glob matches a hook of the model. */
static int hook_matches(lp_model *m, const char *pat) {
    for (int i = 0; i < lp_hook_count(m); i++)
        if (fnmatch(pat, lp_hook_name(m, i), 0) == 0) return 1;
    return 0;
}

/* The failure of a library call, restated under the key that caused it. */
static lp_status keyed(lp_status st, const char *key) {
    if (st == LP_OK) return st;
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", lp_last_error());
    return LP_ERR(st, "%s: %s", key, msg);
}

/* steer.latent_clamp = "N:VALUE[,N:VALUE...]", the latents checked against the SAE. */
static lp_status parse_clamps(const char *spec, int d_sae, steer *sv) {
    int cap = 1;
    for (const char *q = spec; *q; q++) cap += *q == ',';
    sv->clamp_lat = malloc(cap * sizeof(int)), sv->clamp_val = malloc(cap * sizeof(float));
    if (!sv->clamp_lat || !sv->clamp_val) LP_FAIL(LP_ERR_OOM, "out of memory");
    const char *q = spec;
    for (;;) {
        char *end;
        long n = strtol(q, &end, 10);
        if (end == q || *end != ':') LP_FAIL(LP_ERR_ARG, "steer.latent_clamp: '%s' is not N:VALUE[,N:VALUE...]", spec);
        const char *v = end + 1;
        double val = strtod(v, &end);
        if (end == v || (*end && *end != ',') || !isfinite(val)) LP_FAIL(LP_ERR_ARG, "steer.latent_clamp: '%s' is not N:VALUE[,N:VALUE...]", spec);
        if (n < 0 || n >= d_sae)
            LP_FAIL(LP_ERR_ARG, "steer.latent_clamp: latent %ld is out of range for %s, which has latents 0..%d", n, sv->splice, d_sae - 1);
        sv->clamp_lat[sv->n_clamp] = (int)n, sv->clamp_val[sv->n_clamp++] = (float)val;
        if (!*end) return LP_OK;
        q = end + 1;
    }
}

/* steer.splice: loads the SAE on the model's context and checks it fits (a trial edit). */
static lp_status splice_setup(const args *a, lp_model *m, steer *sv) {
    const lp_cfg *c = &a->cfg;
    sv->splice = lp_cfg_str(c, "steer.splice");
    const char *clamps = lp_cfg_str(c, "steer.latent_clamp");
    if (!sv->splice) {
        if (clamps) LP_FAIL(LP_ERR_ARG, "steer.latent_clamp: needs steer.splice (the SAE whose latents are clamped)");
        if (strcmp(lp_cfg_str(c, "steer.splice_error"), "true") == 0) LP_FAIL(LP_ERR_ARG, "steer.splice_error: needs steer.splice");
        return LP_OK;
    }
    LP_CHECK(keyed(lp_sae_load(&sv->sae, lp_model_ctx(m), sv->splice), "steer.splice"));
    if (clamps) LP_CHECK(parse_clamps(clamps, sv->sae->cfg.d_sae, sv));
    lp_sae_splice_opts o = {.clamp_latents = sv->clamp_lat, .clamp_values = sv->clamp_val, .n_clamp = sv->n_clamp};
    lp_status st = keyed(lp_sae_splice_add(&sv->sp, m, sv->sae, &o), "steer.splice");
    lp_hooks_clear(m);
    lp_sae_splice_free(sv->sp);
    sv->sp = NULL;
    return st;
}

/* Reads the steer.* keys: which vector, where, and checks its width against the hook. */
static lp_status steer_setup(const args *a, lp_model *m, const lp_tokenizer *tk, steer *sv) {
    const lp_cfg *c = &a->cfg;
    const char *src[] = {"steer.vector", "steer.probe", "steer.sae", "steer.from_prompts"};
    const char *given = NULL;
    for (int i = 0; i < 4; i++) {
        if (!lp_cfg_str(c, src[i])) continue;
        if (given) LP_FAIL(LP_ERR_ARG, "%s and %s: give one source of the steering vector", given, src[i]);
        given = src[i];
    }
    sv->zero = lp_cfg_str(c, "steer.zero");
    if (lp_cfg_str(c, "steer.hook")) snprintf(sv->hook, sizeof sv->hook, "%s", lp_cfg_str(c, "steer.hook"));
    if (!given && lp_cfg_int(c, "steer.latent") >= 0) LP_FAIL(LP_ERR_ARG, "steer.latent: needs steer.sae");
    if (!given && sv->hook[0]) LP_FAIL(LP_ERR_ARG, "steer.hook: give the vector (steer.vector, steer.probe, steer.sae or steer.from_prompts)");
    if (sv->zero && !hook_matches(m, sv->zero)) LP_FAIL(LP_ERR_NOT_FOUND, "steer.zero: '%s' matches no hook (see `loupe info MODEL`)", sv->zero);
    LP_CHECK(splice_setup(a, m, sv));
    sv->active = given || sv->zero || sv->splice;
    if (!given) return LP_OK;
    if (strcmp(given, "steer.sae") == 0) LP_CHECK(read_sae_row(lp_cfg_str(c, given), lp_cfg_int(c, "steer.latent"), sv));
    else if (strcmp(given, "steer.from_prompts") != 0) LP_CHECK(read_vector(given, lp_cfg_str(c, given), sv));
    if (!sv->hook[0]) LP_FAIL(LP_ERR_ARG, "steer.hook: which hook to steer (e.g. blocks.3.hook_resid_post)");
    int id, w = hook_width(m, sv->hook, &id);
    if (w < 0) LP_FAIL(LP_ERR_NOT_FOUND, "steer.hook: unknown hook '%s' (see `loupe info MODEL`)", sv->hook);
    if (w == 0) LP_FAIL(LP_ERR_ARG, "steer.hook: %s has no fixed width to steer; use steer.zero", sv->hook);
    if (strcmp(given, "steer.from_prompts") == 0) return diff_of_means(m, tk, lp_cfg_str(c, given), sv, w);
    if (sv->width != w)
        LP_FAIL(LP_ERR_SHAPE, "%s: %s has %d values, %s has %d per position", given, sv->source, sv->width, sv->hook, w);
    return LP_OK;
}

/* Installs the steering and zero-ablation edits at steer.positions. */
static lp_status steer_install(const args *a, lp_model *m, steer *sv, int n_prompt) {
    const char *where = lp_cfg_str(&a->cfg, "steer.positions");
    int n_ctx = lp_model_config(m)->n_ctx, *pos = malloc(n_ctx * sizeof(int)), np = 0;
    if (!pos) LP_FAIL(LP_ERR_OOM, "out of memory");
    int from = strcmp(where, "new") == 0 ? n_prompt : 0, to = strcmp(where, "prompt") == 0 ? n_prompt : n_ctx;
    for (int p = from; p < to; p++) pos[np++] = p;
    int all = strcmp(where, "all") == 0;
    lp_edit_spec e = {.kind = LP_EDIT_ADD, .src = sv->vec, .src_len = sv->width, .coef = (float)lp_cfg_float(&a->cfg, "steer.coef"),
                      .pos = all ? NULL : pos, .npos = all ? 0 : np};
    lp_sae_splice_opts so = {.with_error = strcmp(lp_cfg_str(&a->cfg, "steer.splice_error"), "true") == 0, .clamp_latents = sv->clamp_lat,
                             .clamp_values = sv->clamp_val, .n_clamp = sv->n_clamp, .pos = e.pos, .npos = e.npos};
    lp_status st = sv->sae ? keyed(lp_sae_splice_add(&sv->sp, m, sv->sae, &so), "steer.splice") : LP_OK;
    if (st == LP_OK && sv->vec) st = lp_hook_edit(m, sv->hook, &e);
    if (st == LP_OK && sv->zero) {
        e.kind = LP_EDIT_ZERO, e.src = NULL, e.src_len = 0;
        st = lp_hook_edit(m, sv->zero, &e);
    }
    free(pos);
    return st;
}

/* ---- the command ---- */

typedef struct gen_run { int32_t *ids; int n; char *text; double secs; } gen_run;

/* One generation; the new tokens stream to stdout unless --json. */
static lp_status gen_once(lp_model *m, const lp_tokenizer *tk, const int32_t *prompt, int n_prompt, lp_gen_opts o, int stream,
                          gen_run *r) {
    gen_print gp = {tk, stream};
    o.on_token = print_token, o.user = &gp;
    if (!(r->ids = malloc(((size_t)o.max_tokens + 1) * sizeof(int32_t)))) LP_FAIL(LP_ERR_OOM, "out of memory");
    double t0 = cli_now();
    lp_status st = lp_generate(m, prompt, n_prompt, &o, r->ids, &r->n);
    r->secs = cli_now() - t0;
    if (stream) {
        fputc('\n', stdout);
        fflush(stdout);
    }
    size_t len;
    return st == LP_OK ? lp_detokenize(tk, r->ids, r->n, &r->text, &len) : st;
}

static cJSON *run_json(const gen_run *r) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "text", r->text ? r->text : "");
    cJSON *ids = cJSON_AddArrayToObject(o, "ids");
    for (int i = 0; i < r->n; i++) cJSON_AddItemToArray(ids, cJSON_CreateNumber(r->ids[i]));
    return o;
}

static void print_plain_json(lp_model *m, const char *prompt, int n_prompt, const gen_run *r) {
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "prompt", prompt);
    cJSON_AddStringToObject(j, "completion", r->text);
    cJSON_AddNumberToObject(j, "n_prompt_tokens", n_prompt);
    cJSON *ids = cJSON_AddArrayToObject(j, "ids");
    for (int i = 0; i < r->n; i++) cJSON_AddItemToArray(ids, cJSON_CreateNumber(r->ids[i]));
    cJSON_AddNumberToObject(j, "tokens_per_s", r->secs > 0 ? r->n / r->secs : 0);
    cJSON_AddStringToObject(j, "device", cli_dev_name(m));
    cli_print_json(j);
}

static void print_steered_json(const args *a, lp_model *m, const steer *sv, const char *prompt, int n_prompt, const gen_run *r) {
    cJSON *j = cJSON_CreateObject(), *s = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "prompt", prompt);
    cJSON_AddNumberToObject(j, "n_prompt_tokens", n_prompt);
    cJSON_AddItemToObject(j, "unsteered", run_json(&r[0]));
    cJSON_AddItemToObject(j, "steered", run_json(&r[1]));
    if (sv->vec) {
        double nrm = 0;
        for (int i = 0; i < sv->width; i++) nrm += (double)sv->vec[i] * sv->vec[i];
        cJSON_AddStringToObject(s, "hook", sv->hook);
        cJSON_AddStringToObject(s, "source", sv->source);
        cJSON_AddNumberToObject(s, "coef", lp_cfg_float(&a->cfg, "steer.coef"));
        cJSON_AddNumberToObject(s, "vector_norm", sqrt(nrm));
    }
    if (sv->zero) cJSON_AddStringToObject(s, "zero", sv->zero);
    if (sv->splice) {
        cJSON_AddStringToObject(s, "splice", sv->splice);
        cJSON_AddStringToObject(s, "splice_hook", sv->sae->cfg.hook_name);
        cJSON_AddBoolToObject(s, "splice_error", strcmp(lp_cfg_str(&a->cfg, "steer.splice_error"), "true") == 0);
        if (sv->n_clamp) cJSON_AddStringToObject(s, "latent_clamp", lp_cfg_str(&a->cfg, "steer.latent_clamp"));
    }
    cJSON_AddStringToObject(s, "positions", lp_cfg_str(&a->cfg, "steer.positions"));
    cJSON_AddNumberToObject(s, "max_tokens", lp_cfg_int(&a->cfg, "gen.max_tokens"));
    cJSON_AddNumberToObject(s, "temperature", lp_cfg_float(&a->cfg, "gen.temperature"));
    cJSON_AddNumberToObject(s, "seed", lp_cfg_int(&a->cfg, "gen.seed"));
    cJSON_AddItemToObject(j, "settings", s);
    cJSON_AddStringToObject(j, "device", cli_dev_name(m));
    cli_print_json(j);
}

/* The text heading of the steered continuation. */
static void print_steer_heading(const args *a, const steer *sv) {
    printf("== steered (positions: %s):", lp_cfg_str(&a->cfg, "steer.positions"));
    if (sv->vec) printf(" %s += %g x [%s]", sv->hook, lp_cfg_float(&a->cfg, "steer.coef"), sv->source);
    if (sv->zero) printf("%s %s = 0", sv->vec ? ";" : "", sv->zero);
    if (sv->splice)
        printf("%s %s = SAE %s%s%s%s", sv->vec || sv->zero ? ";" : "", sv->sae->cfg.hook_name, sv->splice,
               strcmp(lp_cfg_str(&a->cfg, "steer.splice_error"), "true") == 0 ? " + error" : "", sv->n_clamp ? ", clamped " : "",
               sv->n_clamp ? lp_cfg_str(&a->cfg, "steer.latent_clamp") : "");
    printf(" ==\n");
}

/* Unsteered then steered, with the same sampling settings. */
static lp_status gen_pair(const args *a, lp_model *m, const lp_tokenizer *tk, steer *sv, const char *text, const int32_t *prompt,
                          int n_prompt, lp_gen_opts o, gen_run *r) {
    int stream = !a->json;
    if (stream) printf("== unsteered ==\n%s", text);
    lp_hooks_clear(m);
    LP_CHECK(gen_once(m, tk, prompt, n_prompt, o, stream, &r[0]));
    lp_status st = steer_install(a, m, sv, n_prompt);
    if (st == LP_OK && stream) {
        print_steer_heading(a, sv);
        printf("%s", text);
    }
    if (st == LP_OK) st = gen_once(m, tk, prompt, n_prompt, o, stream, &r[1]);
    lp_hooks_clear(m);
    lp_sae_splice_free(sv->sp); /* after the edit that points to it is gone */
    return st;
}

int cmd_generate(args *a) {
    lp_status st = lp_cfg_require(&a->cfg, (const char *[]){"model.path", "gen.prompt", NULL});
    if (st != LP_OK) return cli_fail(st);
    lp_model *m = NULL;
    lp_tokenizer *tk = NULL;
    int32_t *prompt = NULL;
    size_t n_prompt = 0;
    steer sv = {0};
    gen_run r[2] = {{0}};
    const char *text = lp_cfg_str(&a->cfg, "gen.prompt");
    st = lp_utf8_check(text, strlen(text), "gen.prompt");
    if (st == LP_OK) st = lp_tokenizer_load(&tk, lp_cfg_str(&a->cfg, "model.path"));
    if (st == LP_OK) st = lp_tokenize(tk, text, strlen(text), &prompt, &n_prompt);
    if (st == LP_OK && n_prompt == 0) st = LP_ERR(LP_ERR_ARG, "the prompt gives no tokens");
    if (st == LP_OK) st = cli_open_model(a, &m);
    if (st == LP_OK && n_prompt > (size_t)lp_model_config(m)->n_ctx)
        st = LP_ERR(LP_ERR_ARG, "the prompt is %zu tokens, longer than the model's context of %d", n_prompt,
                          lp_model_config(m)->n_ctx);
    if (st == LP_OK) st = steer_setup(a, m, tk, &sv);
    lp_gen_opts o = {
        .max_tokens = (int)lp_cfg_int(&a->cfg, "gen.max_tokens"),
        .temperature = (float)lp_cfg_float(&a->cfg, "gen.temperature"),
        .top_p = (float)lp_cfg_float(&a->cfg, "gen.top_p"),
        .seed = (uint64_t)lp_cfg_int(&a->cfg, "gen.seed"),
        .stop_token = tk ? lp_tokenizer_eos(tk) : -1,
    };
    if (st == LP_OK && (o.top_p <= 0)) st = LP_ERR(LP_ERR_ARG, "gen.top_p must be in (0, 1]");
    if (st == LP_OK && sv.active) {
        st = gen_pair(a, m, tk, &sv, text, prompt, (int)n_prompt, o, r);
        if (st == LP_OK && a->json) print_steered_json(a, m, &sv, text, (int)n_prompt, r);
    } else if (st == LP_OK) {
        if (!a->json) printf("%s", text);
        st = gen_once(m, tk, prompt, (int)n_prompt, o, !a->json, &r[0]);
        if (st == LP_OK && a->json) print_plain_json(m, text, (int)n_prompt, &r[0]);
        if (st == LP_OK && !a->json)
            fprintf(stderr, "loupe: %d prompt tokens, %d new tokens in %.2f s (%.1f tokens/s) on %s%s\n", (int)n_prompt, r[0].n, r[0].secs,
                    r[0].secs > 0 ? r[0].n / r[0].secs : 0, cli_dev_name(m), o.temperature > 0 ? "" : ", greedy");
    }
    int rc = st == LP_OK ? 0 : cli_fail(st);
    for (int i = 0; i < 2; i++) free(r[i].ids), free(r[i].text);
    free(sv.vec);
    free(sv.clamp_lat);
    free(sv.clamp_val);
    if (sv.sae) lp_sae_free(sv.sae, lp_model_ctx(m));
    free(prompt);
    lp_tokenizer_free(tk);
    lp_model_free(m);
    return rc;
}
