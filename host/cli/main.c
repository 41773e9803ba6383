/* main.c: the `loupe` command line. Parses `loupe COMMAND [CONFIG.ini] [MODEL]
 * [--section.key=value ...]`, validates every key before any work, runs the command, and
 * turns an lp_status into one line on stderr and an exit code (0 done, 1 failed while
 * working, 2 bad usage or bad input). With --json the last stdout line is one object. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "loupe/config.h"
#include "loupe/hooks.h"
#include "loupe/model.h"
#include "loupe/safetensors.h"
#include "loupe/store.h"
#include "loupe/textfile.h"
#include "loupe/tokenizer.h"
#include "loupe/tokens.h"
#include "cli.h"

static const lp_key g_keys[] = {
    {"model.path", LP_KEY_STR, NULL, 0, 0, NULL, "Hugging Face checkpoint directory or .gguf file"},
    {"model.device", LP_KEY_CHOICE, "auto", 0, 0, "auto|cpu|cuda", "auto: cuda when a GPU is present"},
    {"model.dtype", LP_KEY_CHOICE, "auto", 0, 0, "auto|f32|bf16", "auto: bf16 on cuda, f32 on cpu"},
    {"data.tokens", LP_KEY_STR, NULL, 0, 0, NULL, ".npy or .bin token ids"},
    {"data.text", LP_KEY_STR, NULL, 0, 0, NULL, "UTF-8 text file, tokenized with the model's tokenizer"},
    {"data.context", LP_KEY_INT, "0", 0, 1 << 20, NULL, "row length; 0: as stored (2-D) or the model's context (flat)"},
    {"data.token_dtype", LP_KEY_CHOICE, "uint16", 0, 0, "uint16|uint32|int32|int64", "element type of .bin files"},
    {"run.batch", LP_KEY_INT, "8", 1, 1 << 16, NULL, "sequences per forward"},
    {"cache.hooks", LP_KEY_STR, NULL, 0, 0, NULL, "comma-separated hook names or globs"},
    {"cache.out", LP_KEY_STR, NULL, 0, 0, NULL, "store directory"},
    {"cache.dtype", LP_KEY_CHOICE, "f32", 0, 0, "f32|bf16", "dtype of stored activations"},
    {"cache.batch", LP_KEY_INT, "8", 1, 1 << 16, NULL, "sequences per forward"},
    {"cache.shard_sequences", LP_KEY_INT, "256", 1, 1 << 24, NULL, "sequences per shard file"},
    {"tokenize.out", LP_KEY_STR, NULL, 0, 0, NULL, ".npy file for the token ids (flat int32)"},
    /* SAEs: names an SAELens user recognises */
    {"data.store", LP_KEY_STR, NULL, 0, 0, NULL, "activation store (loupe cache) to train or evaluate on"},
    {"data.allow_incomplete", LP_KEY_CHOICE, "false", 0, 0, "true|false",
     "train or evaluate on a store whose cache run has not finished (meta.json says complete: false)"},
    {"data.hook", LP_KEY_STR, NULL, 0, 0, NULL, "hook the SAE reads (default: the store's only hook / the SAE's)"},
    {"data.hook_out", LP_KEY_STR, NULL, 0, 0, NULL, "transcoder: hook it reconstructs"},
    {"sae.path", LP_KEY_STR, NULL, 0, 0, NULL, "an SAE: SAELens directory, Gemma Scope params, or sparsify directory"},
    {"sae.architecture", LP_KEY_CHOICE, "topk", 0, 0, "standard|topk|batchtopk|jumprelu", "SAE activation"},
    {"sae.d_sae", LP_KEY_INT, "0", 0, 1 << 26, NULL, "latents; 0: sae.expansion_factor x d_in"},
    {"sae.expansion_factor", LP_KEY_INT, "8", 1, 1 << 16, NULL, "d_sae / d_in when sae.d_sae is 0"},
    {"sae.k", LP_KEY_INT, "32", 1, 1 << 20, NULL, "active latents per token (topk, batchtopk)"},
    {"sae.apply_b_dec_to_input", LP_KEY_CHOICE, "true", 0, 0, "true|false", "subtract b_dec before encoding"},
    {"sae.normalize_activations", LP_KEY_CHOICE, "expected_average_only_in", 0, 0, "none|expected_average_only_in",
     "scale inputs to norm sqrt(d_in) (folded into the saved weights)"},
    {"sae.jumprelu_bandwidth", LP_KEY_FLOAT, "0.001", 0, 1e6, NULL, "straight-through estimator bandwidth"},
    {"sae.skip", LP_KEY_CHOICE, "false", 0, 0, "true|false", "transcoder: linear skip connection"},
    {"train.out", LP_KEY_STR, NULL, 0, 0, NULL, "directory for cfg.json, sae_weights.safetensors, metrics.jsonl, checkpoints/"},
    {"train.device", LP_KEY_CHOICE, "auto", 0, 0, "auto|cpu|cuda", "where the SAE trains"},
    {"train.lr", LP_KEY_FLOAT, "3e-4", -1e30, 1e30, NULL, "Adam learning rate"},
    {"train.adam_beta1", LP_KEY_FLOAT, "0.9", -1e30, 1e30, NULL, "Adam beta1"},
    {"train.adam_beta2", LP_KEY_FLOAT, "0.999", -1e30, 1e30, NULL, "Adam beta2"},
    {"train.lr_scheduler", LP_KEY_CHOICE, "constant", 0, 0, "constant|linear|cosine", "decay over the last lr_decay_steps"},
    {"train.lr_warm_up_steps", LP_KEY_INT, "0", 0, 1LL << 40, NULL, "linear warm-up steps"},
    {"train.lr_decay_steps", LP_KEY_INT, "0", 0, 1LL << 40, NULL, "decay steps at the end"},
    {"train.l1_coefficient", LP_KEY_FLOAT, "5", -1e30, 1e30, NULL, "standard: L1 penalty"},
    {"train.l1_warm_up_steps", LP_KEY_INT, "0", 0, 1LL << 40, NULL, "steps to ramp the L1 coefficient"},
    {"train.l0_coefficient", LP_KEY_FLOAT, "1", -1e30, 1e30, NULL, "jumprelu: L0 penalty"},
    {"train.jumprelu_init_threshold", LP_KEY_FLOAT, "0.001", 0, 1e30, NULL, "jumprelu: initial threshold"},
    {"train.aux_k_coefficient", LP_KEY_FLOAT, "0.03125", -1e30, 1e30, NULL, "topk/batchtopk: AuxK loss weight"},
    {"train.aux_k", LP_KEY_INT, "0", 0, 1 << 20, NULL, "AuxK latents; 0: d_in / 2"},
    {"train.tokens", LP_KEY_INT, "1000000", -(1LL << 50), 1LL << 50, NULL, "training tokens"},
    {"train.batch_tokens", LP_KEY_INT, "4096", -(1 << 30), 1 << 30, NULL, "tokens per step"},
    {"train.b_dec_init", LP_KEY_CHOICE, "geometric_median", 0, 0, "mean|geometric_median|zeros", "b_dec initialisation"},
    {"train.dead_feature_window", LP_KEY_INT, "1000000", 1, 1LL << 50, NULL, "tokens without firing before a latent is dead"},
    {"train.shuffle_tokens", LP_KEY_INT, "65536", 1, 1LL << 40, NULL, "tokens shuffled together"},
    {"train.checkpoint_every", LP_KEY_INT, "0", 0, 1LL << 50, NULL, "tokens between checkpoints; 0: at the end"},
    {"train.log_every", LP_KEY_INT, "50", 1, 1LL << 40, NULL, "steps between metrics.jsonl lines"},
    {"train.seed", LP_KEY_INT, "0", 0, 1LL << 62, NULL, "initialisation and shuffling seed"},
    {"eval.tokens", LP_KEY_INT, "0", 0, 1LL << 50, NULL, "tokens to evaluate on (store, and model rows); 0: all"},
    {"eval.batch_tokens", LP_KEY_INT, "4096", 1, 1 << 30, NULL, "tokens per batch"},
    {"encode.out", LP_KEY_STR, NULL, 0, 0, NULL, ".safetensors for the latents (indices, values)"},
    {"encode.k", LP_KEY_INT, "0", 0, 1 << 20, NULL, "latents kept per token; 0: the SAE's k (or 32)"},
    /* attribution sweeps */
    {"attrib.pairs", LP_KEY_STR, NULL, 0, 0, NULL, "JSONL of prompt pairs: clean, corrupted, answer, wrong_answer (text or ids)"},
    {"attrib.out", LP_KEY_STR, NULL, 0, 0, NULL, "directory for results.jsonl and scores-*.safetensors"},
    {"attrib.metric", LP_KEY_CHOICE, "logit_diff", 0, 0, "logit_diff|logprob", "at the last position"},
    {"attrib.nodes", LP_KEY_STR, "all", 0, 0, NULL, "node kinds, comma-separated (hook_resid_pre, ..., attn.hook_pattern) or all"},
    {"attrib.top", LP_KEY_INT, "20", 0, 1 << 20, NULL, "top nodes per pair in results.jsonl"},
    {"attrib.batch", LP_KEY_INT, "8", 1, 1 << 16, NULL, "pairs per batch (attribute)"},
    {"attrib.grad_at", LP_KEY_CHOICE, "corrupted", 0, 0, "corrupted|clean", "the run the gradient is taken at"},
    {"attrib.ig_steps", LP_KEY_INT, "0", 0, 1 << 12, NULL, "integrated-gradients steps; 0: plain attribution patching"},
    {"attrib.ig_batch", LP_KEY_INT, "0", 0, 1 << 12, NULL, "integrated-gradients steps per forward; 0: all"},
    {"attrib.align", LP_KEY_CHOICE, "none", 0, 0, "none|pad_left", "prompt pairs of different lengths: error, or pad the shorter"},
    {"attrib.sae", LP_KEY_STR, NULL, 0, 0, NULL, "an SAE at one of the model's hooks: its latents become nodes too"},
    {"patch.batch", LP_KEY_INT, "32", 1, 1 << 16, NULL, "patched nodes per forward"},
    {"patch.compare_atp", LP_KEY_CHOICE, "true", 0, 0, "true|false", "also run attribution patching and report the correlations"},
    /* feature dashboards */
    {"dash.out", LP_KEY_STR, NULL, 0, 0, NULL, "directory for dashboard.html and Neuronpedia batch-N.json"},
    {"dash.latents", LP_KEY_STR, "all", 0, 0, NULL, "latents, like 0-99,200, or all"},
    {"dash.top", LP_KEY_INT, "20", 0, 10000, NULL, "top activations per latent"},
    {"dash.left", LP_KEY_INT, "16", 0, 4096, NULL, "context tokens before each example"},
    {"dash.right", LP_KEY_INT, "4", 0, 4096, NULL, "context tokens after each example"},
    {"dash.samples", LP_KEY_INT, "5", 0, 1000, NULL, "samples per activation interval"},
    {"dash.logits", LP_KEY_INT, "10", 0, 1 << 20, NULL, "top and bottom logits of each decoder direction"},
    {"dash.skip_positions", LP_KEY_INT, "0", 0, 1 << 20, NULL, "leading positions of each sequence left out (1: BOS)"},
    {"dash.batch_tokens", LP_KEY_INT, "4096", 1, 1 << 30, NULL, "tokens per encoded batch (whole sequences)"},
    {"dash.seed", LP_KEY_INT, "0", 0, 1LL << 62, NULL, "seed of the interval samples' hash"},
    {"dash.np_batch", LP_KEY_INT, "128", 1, 1 << 20, NULL, "latents per Neuronpedia batch file"},
    {"gen.prompt", LP_KEY_STR, NULL, 0, 0, NULL, "text to continue"},
    {"gen.max_tokens", LP_KEY_INT, "64", 0, 1 << 20, NULL, "new tokens at most"},
    {"gen.temperature", LP_KEY_FLOAT, "0", 0, 100, NULL, "0: greedy"},
    {"gen.top_p", LP_KEY_FLOAT, "1", 0, 1, NULL, "nucleus sampling mass; 1: off"},
    {"gen.seed", LP_KEY_INT, "0", 0, 2147483647, NULL, "sampling seed"},
};

/* Short flags: --tokens FILE is --data.tokens=FILE, and so on. */
static const char *const g_short[][2] = {
    {"tokens", "data.tokens"},        {"text", "data.text"},         {"out", "tokenize.out"},
    {"prompt", "gen.prompt"},         {"max-tokens", "gen.max_tokens"}, {"temperature", "gen.temperature"},
    {"top-p", "gen.top_p"},           {"seed", "gen.seed"},
};
#define N_KEYS ((int)(sizeof g_keys / sizeof *g_keys))

static const char *g_usage =
    "usage: loupe COMMAND [CONFIG.ini] [MODEL] [--section.key=value ...] [--json]\n"
    "commands:\n"
    "  info MODEL [--json]                 architecture, parameters, every hook with its shape\n"
    "  run MODEL --tokens FILE | --text FILE [--json]\n"
    "                                      mean next-token loss (and per-sequence losses)\n"
    "  cache [CONFIG.ini] [--key=value]    write captured hooks to an activation store\n"
    "  tokenize MODEL --text FILE --out FILE.npy\n"
    "                                      text to token ids with the model's tokenizer\n"
    "  generate MODEL --prompt TEXT [--max-tokens N] [--temperature T] [--top-p P] [--seed S]\n"
    "                                      continue a prompt (KV cache; greedy at temperature 0)\n"
    "  train-sae [CONFIG.ini] [STORE] --data.hook=HOOK --train.out=DIR [--sae.architecture=...]\n"
    "                                      train an SAE or transcoder on an activation store\n"
    "  eval-sae SAE --data.store=DIR [--model.path=M --text F]\n"
    "                                      reconstruction and sparsity metrics; spliced model loss\n"
    "  encode SAE --data.store=DIR --encode.out=F.safetensors\n"
    "                                      top-k latents (indices, values) of every token\n"
    "  dashboard SAE --data.store=DIR --dash.out=DIR [--model.path=M] [--dash.latents=0-99]\n"
    "                                      feature dashboards: HTML page and Neuronpedia JSON\n"
    "  attribute [CONFIG.ini] MODEL --attrib.pairs=F.jsonl --attrib.out=DIR\n"
    "                                      attribution patching over prompt pairs (resumable)\n"
    "  patch [CONFIG.ini] MODEL --attrib.pairs=F.jsonl --attrib.out=DIR\n"
    "                                      exact activation patching, compared with attribution\n"
    "short flags: --tokens --text --out --prompt --max-tokens --temperature --top-p --seed\n"
    "keys:\n";

static void usage(FILE *f) {
    fputs(g_usage, f);
    for (int i = 0; i < N_KEYS; i++)
        fprintf(f, "  --%-22s %s%s%s\n", g_keys[i].name, g_keys[i].help, g_keys[i].def ? "; default " : "",
                g_keys[i].def ? g_keys[i].def : "");
}

int cli_fail(lp_status st) {
    fprintf(stderr, "loupe: %s\n", lp_last_error());
    if (getenv("LOUPE_DEBUG")) fprintf(stderr, "loupe: (raised at %s)\n", lp_last_error_where());
    return lp_status_exit_code(st);
}

void cli_print_json(cJSON *j) {
    char *txt = cJSON_PrintUnformatted(j);
    if (txt) printf("%s\n", txt);
    free(txt);
    cJSON_Delete(j);
}

double cli_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}


/* Output and input paths are joined with file names in fixed-size buffers further on:
 * one longer than this is refused here, naming the key, rather than cut there. */
#define CLI_MAX_PATH 1024
static lp_status check_paths(const lp_cfg *c) {
    for (int i = 0; i < c->n; i++) {
        const char *k = c->keys[i].name, *dot = strrchr(k, '.');
        if (!c->val[i] || !dot || c->keys[i].type != LP_KEY_STR) continue;
        int is_path = strcmp(dot, ".out") == 0 || strcmp(dot, ".path") == 0 || strcmp(dot, ".store") == 0 ||
                      strcmp(dot, ".tokens") == 0 || strcmp(dot, ".text") == 0 || strcmp(dot, ".pairs") == 0 ||
                      strcmp(dot, ".sae") == 0;
        if (is_path && strlen(c->val[i]) >= CLI_MAX_PATH)
            LP_FAIL(LP_ERR_ARG, "%s: the path is %zu bytes; at most %d are allowed", k, strlen(c->val[i]), CLI_MAX_PATH - 1);
    }
    return LP_OK;
}

/* Parses everything after the command. Positional: a .ini file, otherwise MODEL. */
static lp_status parse_args(args *a, int argc, char **argv, const char *positional) {
    lp_cfg_init(&a->cfg, g_keys, N_KEYS);
    const char *ini = NULL;
    for (int i = 0; i < argc; i++) { /* the config file first, so that flags override it */
        size_t n = strlen(argv[i]);
        if (argv[i][0] != '-' && n > 4 && strcmp(argv[i] + n - 4, ".ini") == 0) ini = argv[i];
    }
    if (ini) LP_CHECK(lp_cfg_load_ini(&a->cfg, ini));
    for (int i = 0; i < argc; i++) {
        char *arg = argv[i];
        if (arg == ini) continue;
        if (strcmp(arg, "--json") == 0) { a->json = 1; continue; }
        if (strncmp(arg, "--", 2) != 0) {
            LP_CHECK(lp_cfg_set(&a->cfg, positional, arg, "command line"));
            continue;
        }
        char key[256];
        const char *val, *eq = strchr(arg, '=');
        if (eq) {
            snprintf(key, sizeof key, "%.*s", (int)(eq - arg - 2), arg + 2);
            val = eq + 1;
        } else {
            snprintf(key, sizeof key, "%s", arg + 2);
            if (i + 1 >= argc) LP_FAIL(LP_ERR_ARG, "--%s needs a value", key);
            val = argv[++i];
        }
        for (size_t k = 0; k < sizeof g_short / sizeof *g_short; k++)
            if (strcmp(key, g_short[k][0]) == 0) snprintf(key, sizeof key, "%s", g_short[k][1]);
        LP_CHECK(lp_cfg_set(&a->cfg, key, val, "command line"));
    }
    return check_paths(&a->cfg);
}

lp_device cli_device(const char *dev) {
    char why[256] = "";
    return strcmp(dev, "cuda") == 0 ? LP_CUDA : strcmp(dev, "cpu") == 0 ? LP_CPU : lp_cuda_available(why, sizeof why) ? LP_CUDA : LP_CPU;
}

lp_status cli_open_model(const args *a, lp_model **m) {
    LP_CHECK(lp_cfg_require(&a->cfg, (const char *[]){"model.path", NULL}));
    const char *dt = lp_cfg_str(&a->cfg, "model.dtype");
    lp_device d = cli_device(lp_cfg_str(&a->cfg, "model.device"));
    lp_dtype t = strcmp(dt, "f32") == 0 ? LP_F32 : strcmp(dt, "bf16") == 0 ? LP_BF16 : d == LP_CUDA ? LP_BF16 : LP_F32;
    return lp_model_load(m, lp_cfg_str(&a->cfg, "model.path"), d, t);
}

const char *cli_dev_name(lp_model *m) {
    static char buf[32];
    lp_ctx *c = lp_model_ctx(m);
    snprintf(buf, sizeof buf, "%s/%s", c->device == LP_CUDA ? "cuda" : "cpu", c->dtype == LP_BF16 ? "bf16" : "f32");
    return buf;
}

/* The model's tokenizer: the .gguf file itself, or tokenizer.json in the checkpoint. */
static lp_status open_tokenizer(const args *a, lp_tokenizer **tk) {
    LP_CHECK(lp_cfg_require(&a->cfg, (const char *[]){"model.path", NULL}));
    return lp_tokenizer_load(tk, lp_cfg_str(&a->cfg, "model.path"));
}

/* Reads a UTF-8 text file and tokenizes it; *ids is malloc'ed. The UTF-8 check comes
 * first, so that a wrong file is refused by name before the tokenizer loads. */
static lp_status tokenize_file(const args *a, const char *path, int32_t **ids, size_t *n, size_t *n_bytes) {
    size_t len;
    char *text;
    LP_CHECK(lp_text_read(path, "text file", &text, &len));
    lp_tokenizer *tk = NULL;
    lp_status st = lp_utf8_check(text, len, path);
    if (st == LP_OK) st = open_tokenizer(a, &tk);
    if (st == LP_OK) st = lp_tokenize(tk, text, len, ids, n);
    if (st == LP_OK && *n == 0) st = lp_set_error(LP_ERR_ARG, __FILE__, __LINE__, "%s: the text gives no tokens", path);
    if (n_bytes) *n_bytes = len;
    lp_tokenizer_free(tk);
    free(text);
    return st;
}

/* data.text: the text's tokens as one stream, cut into rows of data.context tokens (or
 * one row when the whole text fits the model's context, else rows of the context). */
static lp_status load_text(const args *a, const lp_model *m, lp_tokens *t) {
    const char *path = lp_cfg_str(&a->cfg, "data.text");
    int32_t *ids;
    size_t n;
    LP_CHECK(tokenize_file(a, path, &ids, &n, NULL));
    int ctx = (int)lp_cfg_int(&a->cfg, "data.context"), n_ctx = lp_model_config(m)->n_ctx;
    if (ctx == 0) ctx = n <= (size_t)n_ctx ? (int)n : n_ctx;
    if (ctx > n_ctx) {
        free(ids);
        LP_FAIL(LP_ERR_ARG, "data.context %d exceeds the model's context of %d", ctx, n_ctx);
    }
    memset(t, 0, sizeof *t);
    t->ids = ids, t->ctx = ctx, t->n_seq = (int64_t)(n / ctx), t->dropped = (int64_t)(n % ctx);
    if (t->n_seq == 0) LP_FAIL(LP_ERR_ARG, "%s: %zu tokens do not fill one row of %d", path, n, ctx);
    if (t->ctx < 2) LP_FAIL(LP_ERR_ARG, "%s: rows of %d token(s) leave nothing to predict", path, t->ctx);
    if (t->dropped) fprintf(stderr, "loupe: %s: the last %lld tokens do not fill a row and are left out\n", path, (long long)t->dropped);
    return LP_OK;
}

lp_status cli_load_tokens(const args *a, const lp_model *m, lp_tokens *t) {
    int has_text = lp_cfg_str(&a->cfg, "data.text") != NULL, has_tokens = lp_cfg_str(&a->cfg, "data.tokens") != NULL;
    if (has_text && has_tokens) LP_FAIL(LP_ERR_ARG, "give data.tokens or data.text, not both");
    if (has_text) return load_text(a, m, t);
    if (!has_tokens) LP_FAIL(LP_ERR_ARG, "missing config key 'data.tokens' (or 'data.text'): pass --tokens FILE or --text FILE");
    const char *path = lp_cfg_str(&a->cfg, "data.tokens");
    int ctx = (int)lp_cfg_int(&a->cfg, "data.context");
    int strict = ctx > 0;
    if (ctx == 0) ctx = lp_model_config(m)->n_ctx;
    LP_CHECK(lp_tokens_load(t, path, ctx, strict, lp_cfg_str(&a->cfg, "data.token_dtype")));
    if (t->ctx > lp_model_config(m)->n_ctx)
        LP_FAIL(LP_ERR_ARG, "%s: rows of %d tokens exceed the model's context of %d", path, t->ctx, lp_model_config(m)->n_ctx);
    if (t->ctx < 2) LP_FAIL(LP_ERR_ARG, "%s: rows of %d token(s) leave nothing to predict", path, t->ctx);
    if (t->dropped) fprintf(stderr, "loupe: %s: the last %lld tokens do not fill a row and are left out\n", path, (long long)t->dropped);
    return lp_tokens_check(t, lp_model_config(m)->d_vocab, path);
}

static void shape_text(lp_model *m, int id, char *buf, size_t n, cJSON *arr) {
    int64_t s[LP_MAX_DIMS];
    int nd = lp_hook_shape(m, id, -1, -2, s); /* sentinels name the symbolic axes */
    size_t o = snprintf(buf, n, "[");
    for (int d = 0; d < nd; d++) {
        const char *sym = s[d] == -1 ? "batch" : s[d] == -2 ? "pos" : NULL;
        if (sym) o += snprintf(buf + o, n - o, "%s%s", d ? ", " : "", sym);
        else o += snprintf(buf + o, n - o, "%s%lld", d ? ", " : "", (long long)s[d]);
        if (arr) cJSON_AddItemToArray(arr, sym ? cJSON_CreateString(sym) : cJSON_CreateNumber((double)s[d]));
    }
    snprintf(buf + o, n - o, "]");
}

static int cmd_info(args *a) {
    lp_model *m;
    lp_status st = cli_open_model(a, &m);
    if (st != LP_OK) return cli_fail(st);
    const lp_config *c = lp_model_config(m);
    char buf[128];
    if (a->json) {
        cJSON *r = cJSON_CreateObject();
        cJSON_AddStringToObject(r, "architecture", c->name);
        cJSON_AddNumberToObject(r, "n_layers", c->n_layers);
        cJSON_AddNumberToObject(r, "d_model", c->d_model);
        cJSON_AddNumberToObject(r, "n_heads", c->n_heads);
        cJSON_AddNumberToObject(r, "n_kv_heads", c->n_kv_heads);
        cJSON_AddNumberToObject(r, "d_head", c->d_head);
        cJSON_AddNumberToObject(r, "d_mlp", c->d_mlp);
        cJSON_AddNumberToObject(r, "n_ctx", c->n_ctx);
        cJSON_AddNumberToObject(r, "d_vocab", c->d_vocab);
        cJSON_AddNumberToObject(r, "n_params", (double)lp_model_n_params(m));
        cJSON *hooks = cJSON_AddArrayToObject(r, "hooks");
        for (int id = 0; id < lp_hook_count(m); id++) {
            cJSON *h = cJSON_CreateObject();
            cJSON_AddStringToObject(h, "name", lp_hook_name(m, id));
            shape_text(m, id, buf, sizeof buf, cJSON_AddArrayToObject(h, "shape"));
            cJSON_AddItemToArray(hooks, h);
        }
        char *txt = cJSON_PrintUnformatted(r);
        printf("%s\n", txt);
        free(txt);
        cJSON_Delete(r);
    } else {
        printf("%s: %d layers, d_model %d, %d heads x %d, d_mlp %d, context %d, vocab %d\n", c->name, c->n_layers,
               c->d_model, c->n_heads, c->d_head, c->d_mlp, c->n_ctx, c->d_vocab);
        printf("parameters: %lld (%s)\n", (long long)lp_model_n_params(m), cli_dev_name(m));
        printf("hook points (%d):\n", lp_hook_count(m));
        for (int id = 0; id < lp_hook_count(m); id++) {
            shape_text(m, id, buf, sizeof buf, NULL);
            printf("  %-34s %s\n", lp_hook_name(m, id), buf);
        }
    }
    lp_model_free(m);
    return 0;
}

static int cmd_run(args *a) {
    lp_model *m = NULL;
    lp_tokens t = {0};
    lp_status st = cli_open_model(a, &m);
    if (st == LP_OK) st = cli_load_tokens(a, m, &t);
    if (st != LP_OK) {
        lp_tokens_free(&t);
        lp_model_free(m);
        return cli_fail(st);
    }
    int B = (int)lp_cfg_int(&a->cfg, "run.batch"), T = t.ctx;
    double *seq_loss = calloc(t.n_seq, sizeof(double)), total = 0, t0 = cli_now();
    for (int64_t r = 0; r < t.n_seq && st == LP_OK; r += B) {
        int nb = t.n_seq - r < B ? (int)(t.n_seq - r) : B;
        st = lp_model_forward(m, t.ids + (size_t)r * T, nb, T, LP_WANT_LOSS);
        if (st != LP_OK) break;
        const float *l = lp_model_losses(m);
        for (int b = 0; b < nb; b++) {
            double s = 0;
            for (int i = 0; i < T - 1; i++) s += l[(size_t)b * (T - 1) + i];
            seq_loss[r + b] = s / (T - 1);
            total += s;
        }
        if (isatty(2)) fprintf(stderr, "\rrun %lld/%lld sequences", (long long)(r + nb), (long long)t.n_seq);
    }
    if (isatty(2)) fputc('\n', stderr);
    double secs = cli_now() - t0;
    int rc = 0;
    if (st != LP_OK) {
        rc = cli_fail(st);
    } else {
        int64_t n_pred = t.n_seq * (T - 1);
        double mean = total / n_pred;
        if (a->json) {
            cJSON *r = cJSON_CreateObject();
            cJSON_AddNumberToObject(r, "mean_loss", mean);
            cJSON_AddNumberToObject(r, "n_tokens", (double)n_pred);
            cJSON_AddNumberToObject(r, "n_sequences", (double)t.n_seq);
            cJSON_AddNumberToObject(r, "context", T);
            cJSON_AddStringToObject(r, "device", cli_dev_name(m));
            cJSON_AddNumberToObject(r, "tokens_per_s", secs > 0 ? t.n_seq * T / secs : 0);
            cJSON *per = cJSON_AddArrayToObject(r, "per_sequence_loss");
            for (int64_t i = 0; i < t.n_seq; i++) cJSON_AddItemToArray(per, cJSON_CreateNumber(seq_loss[i]));
            char *txt = cJSON_PrintUnformatted(r);
            printf("%s\n", txt);
            free(txt);
            cJSON_Delete(r);
        } else {
            printf("mean loss %.6f over %lld predicted tokens (%lld sequences of %d) on %s, %.0f tokens/s\n", mean,
                   (long long)n_pred, (long long)t.n_seq, T, cli_dev_name(m), secs > 0 ? t.n_seq * T / secs : 0);
            printf("per-sequence loss:");
            for (int64_t i = 0; i < t.n_seq && i < 16; i++) printf(" %.4f", seq_loss[i]);
            printf("%s\n", t.n_seq > 16 ? " ... (--json for all)" : "");
        }
    }
    free(seq_loss);
    lp_tokens_free(&t);
    lp_model_free(m);
    return rc;
}

static int cmd_cache(args *a) {
    lp_status st = lp_cfg_require(&a->cfg, (const char *[]){"model.path", "cache.hooks", "cache.out", NULL});
    if (st != LP_OK) return cli_fail(st);
    lp_model *m = NULL;
    lp_tokens t = {0};
    st = cli_open_model(a, &m);
    if (st == LP_OK) st = cli_load_tokens(a, m, &t);
    lp_cache_report rep;
    if (st == LP_OK) {
        lp_cache_opts o = {
            .out = lp_cfg_str(&a->cfg, "cache.out"),
            .hooks = lp_cfg_str(&a->cfg, "cache.hooks"),
            .model_path = lp_cfg_str(&a->cfg, "model.path"),
            .tokens_path = lp_cfg_str(&a->cfg, "data.tokens") ? lp_cfg_str(&a->cfg, "data.tokens") : lp_cfg_str(&a->cfg, "data.text"),
            .dtype = strcmp(lp_cfg_str(&a->cfg, "cache.dtype"), "bf16") == 0 ? LP_BF16 : LP_F32,
            .batch = (int)lp_cfg_int(&a->cfg, "cache.batch"),
            .shard_sequences = (int)lp_cfg_int(&a->cfg, "cache.shard_sequences"),
            .progress = 1,
        };
        st = lp_cache_run(m, &t, &o, &rep);
    }
    int rc = 0;
    if (st != LP_OK) {
        rc = cli_fail(st);
    } else if (a->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "out", lp_cfg_str(&a->cfg, "cache.out"));
        cJSON_AddNumberToObject(j, "n_sequences", (double)rep.n_sequences);
        cJSON_AddNumberToObject(j, "n_tokens", (double)rep.n_tokens);
        cJSON_AddNumberToObject(j, "n_hooks", rep.n_hooks);
        cJSON_AddNumberToObject(j, "n_shards", rep.n_shards);
        cJSON_AddNumberToObject(j, "resumed_sequences", (double)rep.resumed_sequences);
        cJSON_AddNumberToObject(j, "tokens_per_s", rep.tokens_per_s);
        cli_print_json(j);
    } else {
        printf("cached %d hooks for %lld sequences (%lld tokens) into %s: %d shards", rep.n_hooks,
               (long long)rep.n_sequences, (long long)rep.n_tokens, lp_cfg_str(&a->cfg, "cache.out"), rep.n_shards);
        if (rep.resumed_sequences) printf(", %lld sequences were already there", (long long)rep.resumed_sequences);
        printf(", %.0f tokens/s on %s\n", rep.tokens_per_s, cli_dev_name(m));
    }
    lp_tokens_free(&t);
    lp_model_free(m);
    return rc;
}

static int cmd_tokenize(args *a) {
    lp_status st = lp_cfg_require(&a->cfg, (const char *[]){"model.path", "data.text", "tokenize.out", NULL});
    int32_t *ids = NULL;
    size_t n = 0, bytes = 0;
    double t0 = cli_now();
    if (st == LP_OK) st = tokenize_file(a, lp_cfg_str(&a->cfg, "data.text"), &ids, &n, &bytes);
    if (st == LP_OK && n > 0x7fffffff) st = lp_set_error(LP_ERR_ARG, __FILE__, __LINE__, "more than 2^31 tokens in one file");
    if (st == LP_OK) st = lp_npy_write_i32(lp_cfg_str(&a->cfg, "tokenize.out"), ids, -1, (int)n);
    double secs = cli_now() - t0;
    if (st != LP_OK) {
        free(ids);
        return cli_fail(st);
    }
    const char *out = lp_cfg_str(&a->cfg, "tokenize.out");
    if (a->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "out", out);
        cJSON_AddNumberToObject(j, "n_bytes", (double)bytes);
        cJSON_AddNumberToObject(j, "n_tokens", (double)n);
        cJSON_AddNumberToObject(j, "seconds", secs);
        cli_print_json(j);
    } else {
        printf("tokenized %s: %zu bytes -> %zu tokens (%.2f bytes/token) into %s, int32 [%zu]\n", lp_cfg_str(&a->cfg, "data.text"),
               bytes, n, (double)bytes / n, out, n);
    }
    free(ids);
    return 0;
}

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

static int cmd_generate(args *a) {
    lp_status st = lp_cfg_require(&a->cfg, (const char *[]){"model.path", "gen.prompt", NULL});
    if (st != LP_OK) return cli_fail(st);
    lp_model *m = NULL;
    lp_tokenizer *tk = NULL;
    int32_t *prompt = NULL, *out = NULL;
    size_t n_prompt = 0;
    int n_out = 0, rc = 0;
    const char *text = lp_cfg_str(&a->cfg, "gen.prompt");
    st = lp_utf8_check(text, strlen(text), "gen.prompt");
    if (st == LP_OK) st = open_tokenizer(a, &tk);
    if (st == LP_OK) st = lp_tokenize(tk, text, strlen(text), &prompt, &n_prompt);
    if (st == LP_OK && n_prompt == 0) st = lp_set_error(LP_ERR_ARG, __FILE__, __LINE__, "the prompt gives no tokens");
    if (st == LP_OK) st = cli_open_model(a, &m);
    if (st == LP_OK && n_prompt > (size_t)lp_model_config(m)->n_ctx)
        st = lp_set_error(LP_ERR_ARG, __FILE__, __LINE__, "the prompt is %zu tokens, longer than the model's context of %d", n_prompt,
                          lp_model_config(m)->n_ctx);
    gen_print gp = {tk, !a->json};
    lp_gen_opts o = {
        .max_tokens = (int)lp_cfg_int(&a->cfg, "gen.max_tokens"),
        .temperature = (float)lp_cfg_float(&a->cfg, "gen.temperature"),
        .top_p = (float)lp_cfg_float(&a->cfg, "gen.top_p"),
        .seed = (uint64_t)lp_cfg_int(&a->cfg, "gen.seed"),
        .stop_token = tk ? lp_tokenizer_eos(tk) : -1,
        .on_token = print_token,
        .user = &gp,
    };
    if (st == LP_OK && (o.top_p <= 0)) st = lp_set_error(LP_ERR_ARG, __FILE__, __LINE__, "gen.top_p must be in (0, 1]");
    if (st == LP_OK && !(out = malloc(((size_t)o.max_tokens + 1) * sizeof(int32_t))))
        st = lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of memory");
    double t0 = cli_now();
    if (st == LP_OK && !a->json) {
        fputs(text, stdout);
        fflush(stdout);
    }
    if (st == LP_OK) st = lp_generate(m, prompt, (int)n_prompt, &o, out, &n_out);
    double secs = cli_now() - t0;
    if (st != LP_OK) {
        if (!a->json && m) fputc('\n', stdout);
        rc = cli_fail(st);
    } else if (a->json) {
        char *txt;
        size_t len;
        st = lp_detokenize(tk, out, n_out, &txt, &len);
        if (st != LP_OK) {
            rc = cli_fail(st);
        } else {
            cJSON *r = cJSON_CreateObject();
            cJSON_AddStringToObject(r, "prompt", text);
            cJSON_AddStringToObject(r, "completion", txt);
            cJSON_AddNumberToObject(r, "n_prompt_tokens", (double)n_prompt);
            cJSON *ids = cJSON_AddArrayToObject(r, "ids");
            for (int i = 0; i < n_out; i++) cJSON_AddItemToArray(ids, cJSON_CreateNumber(out[i]));
            cJSON_AddNumberToObject(r, "tokens_per_s", secs > 0 ? n_out / secs : 0);
            cJSON_AddStringToObject(r, "device", cli_dev_name(m));
            char *j = cJSON_PrintUnformatted(r);
            printf("%s\n", j);
            free(j);
            cJSON_Delete(r);
            free(txt);
        }
    } else {
        printf("\n");
        fflush(stdout);
        fprintf(stderr, "loupe: %d prompt tokens, %d new tokens in %.2f s (%.1f tokens/s) on %s%s\n", (int)n_prompt, n_out, secs,
                secs > 0 ? n_out / secs : 0, cli_dev_name(m), o.temperature > 0 ? "" : ", greedy");
    }
    free(out);
    free(prompt);
    lp_tokenizer_free(tk);
    lp_model_free(m);
    return rc;
}

int main(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "help") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *cmd = argv[1];
    /* the positional argument is the model, or for the SAE commands the SAE */
    static const struct { const char *name; int (*fn)(args *); const char *positional; } cmds[] = {
        {"info", cmd_info, "model.path"},        {"run", cmd_run, "model.path"},
        {"cache", cmd_cache, "model.path"},      {"tokenize", cmd_tokenize, "model.path"},
        {"generate", cmd_generate, "model.path"}, {"train-sae", cmd_train_sae, "data.store"},
        {"eval-sae", cmd_eval_sae, "sae.path"},   {"encode", cmd_encode, "sae.path"},
        {"dashboard", cmd_dashboard, "sae.path"},
        {"attribute", cmd_attribute, "model.path"}, {"patch", cmd_patch, "model.path"}};
    int (*fn)(args *) = NULL;
    const char *positional = "model.path";
    for (size_t i = 0; i < sizeof cmds / sizeof *cmds; i++)
        if (strcmp(cmd, cmds[i].name) == 0) fn = cmds[i].fn, positional = cmds[i].positional;
    if (!fn) {
        fprintf(stderr, "loupe: unknown command '%s' (commands: info, run, cache, tokenize, generate, train-sae, eval-sae, encode, "
                        "dashboard, attribute, patch; see loupe --help)\n", cmd);
        return 2;
    }
    args a = {0};
    lp_status st = parse_args(&a, argc - 2, argv + 2, positional);
    int rc = st == LP_OK ? fn(&a) : cli_fail(st);
    lp_cfg_free(&a.cfg);
    /* a report or --json object that did not reach its file is a failure, not a success */
    if ((fflush(stdout) != 0 || ferror(stdout)) && rc == 0) {
        fprintf(stderr, "loupe: standard output: write failed: %s\n", strerror(errno));
        rc = 1;
    }
    return rc;
}
