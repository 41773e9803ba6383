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
#include "loupe/dist.h"
#include "loupe/hooks.h"
#include "loupe/model.h"
#include "loupe/sae_train.h"
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
    {"dist.tp", LP_KEY_INT, "1", 1, 1 << 16, NULL,
     "tensor-parallel ranks the model is split over (launch that many with mpirun -np N or srun -n N)"},
    {"dist.dp", LP_KEY_INT, "0", 0, 1 << 16, NULL,
     "data-parallel ranks (cache, train-sae: each its share of the batches, rank 0 alone writes); 0: world size / dist.tp"},
    {"data.tokens", LP_KEY_STR, NULL, 0, 0, NULL, ".npy or .bin token ids"},
    {"data.text", LP_KEY_STR, NULL, 0, 0, NULL, "UTF-8 text file, tokenized with the model's tokenizer"},
    {"data.context", LP_KEY_INT, "0", 0, 1 << 20, NULL, "row length; 0: as stored (2-D) or the model's context (flat)"},
    {"data.prepend_bos", LP_KEY_CHOICE, "auto", 0, 0, "auto|true|false",
     "data.text rows start with BOS; auto: when the tokenizer adds one"},
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
    {"lens.prompts", LP_KEY_STR, NULL, 0, 0, NULL, "JSONL: prompt (text or ids), optional answer, wrong_answer, position"},
    {"lens.out", LP_KEY_STR, "lens.out", 0, 0, NULL, "directory for lens.jsonl and lens.safetensors"},
    {"lens.top_k", LP_KEY_INT, "10", 0, 1 << 24, NULL, "top tokens per layer of the logit lens"},
    {"lens.top", LP_KEY_INT, "10", 0, 1 << 24, NULL, "largest components and heads in the report and lens.jsonl"},
    {"lens.position", LP_KEY_INT, "-1", -1, 1 << 30, NULL, "with data.store: the position read in every sequence (-1: the last)"},
    {"lens.answer", LP_KEY_INT, "-1", -1, 1 << 30, NULL, "with data.store: the answer token id (-1: the top token of the final residual)"},
    {"lens.wrong_answer", LP_KEY_INT, "-1", -1, 1 << 30, NULL, "with data.store: a wrong answer's token id (metric: the logit difference)"},
    /* linear probes */
    {"probe.labels", LP_KEY_STR, NULL, 0, 0, NULL, ".npy of integer labels: [n_seq] per sequence or [n_seq, ctx] per token; -1: none"},
    {"probe.hooks", LP_KEY_STR, "*", 0, 0, NULL, "store hooks to probe: comma-separated names or globs"},
    {"probe.kind", LP_KEY_CHOICE, "both", 0, 0, "logistic|diffmean|both", "L2 logistic regression, difference of means, or both"},
    {"probe.C", LP_KEY_FLOAT, "1", 0, 1e30, NULL, "inverse L2 strength, as scikit-learn's C"},
    {"probe.tol", LP_KEY_FLOAT, "1e-8", 0, 1, NULL, "L-BFGS stops when the scaled gradient's max is below this"},
    {"probe.max_iter", LP_KEY_INT, "1000", 1, 1 << 24, NULL, "L-BFGS iterations at most"},
    {"probe.folds", LP_KEY_INT, "0", 0, 100, NULL, "0: one held-out split; k >= 2: k-fold by sequence"},
    {"probe.test_frac", LP_KEY_FLOAT, "0.2", 0, 1, NULL, "held-out fraction of the sequences"},
    {"probe.seed", LP_KEY_INT, "0", 0, 1LL << 62, NULL, "the sequences' shuffle for the split"},
    {"probe.pool", LP_KEY_CHOICE, "position", 0, 0, "position|mean", "per-sequence labels: one position, or the mean over positions"},
    {"probe.position", LP_KEY_INT, "-1", -(1 << 24), 1 << 24, NULL, "per-sequence labels: the position read; -1: the last"},
    {"probe.out", LP_KEY_STR, NULL, 0, 0, NULL, "directory for probes.safetensors and report.jsonl"},
    {"attrib.edges", LP_KEY_CHOICE, "false", 0, 0, "true|false", "attribute: edge attribution patching between components, and circuit.json"},
    {"attrib.top_edges", LP_KEY_INT, "50", 1, 1 << 20, NULL, "edges in circuit.json (by |mean score| over the sweep)"},
    {"patch.kind", LP_KEY_CHOICE, "node", 0, 0, "node|path", "patch: exact patching of nodes, or path patching"},
    {"path.sender", LP_KEY_STR, NULL, 0, 0, NULL, "path patching senders, comma-separated: embed, blocks.L.attn.head.H, blocks.L.mlp"},
    {"path.receivers", LP_KEY_STR, NULL, 0, 0, NULL, "blocks.L.attn.head.H.q|k|v, blocks.L.mlp, logits (comma-separated)"},
    {"path.freeze", LP_KEY_STR, NULL, 0, 0, NULL, "hooks held at their clean values in every run (globs), e.g. blocks.*.attn.hook_pattern"},
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
    /* steering while generating (host/cli/generate.c) */
    {"steer.hook", LP_KEY_STR, NULL, 0, 0, NULL, "hook the vector is added to (default: the SAE's, or the tensor's name)"},
    {"steer.vector", LP_KEY_STR, NULL, 0, 0, NULL, "FILE.safetensors[:TENSOR]: a vector of the hook's width"},
    {"steer.probe", LP_KEY_STR, NULL, 0, 0, NULL, "FILE.safetensors:TENSOR: a probe's direction (as steer.vector)"},
    {"steer.sae", LP_KEY_STR, NULL, 0, 0, NULL, "an SAE: steer along W_dec[steer.latent]"},
    {"steer.latent", LP_KEY_INT, "-1", -1, 1 << 30, NULL, "the SAE latent whose decoder row is the vector"},
    {"steer.from_prompts", LP_KEY_STR, NULL, 0, 0, NULL, "\"A|B\": mean of the hook over A's positions minus B's"},
    {"steer.coef", LP_KEY_FLOAT, "4", -1e30, 1e30, NULL, "the vector is multiplied by this"},
    {"steer.positions", LP_KEY_CHOICE, "all", 0, 0, "all|new|prompt", "positions edited: all, new tokens only, prompt only"},
    {"steer.zero", LP_KEY_STR, NULL, 0, 0, NULL, "hook (or glob) to zero-ablate at steer.positions"},
    {"steer.splice", LP_KEY_STR, NULL, 0, 0, NULL, "an SAE: its reconstruction replaces its hook's activation at steer.positions"},
    {"steer.splice_error", LP_KEY_CHOICE, "false", 0, 0, "true|false", "add back the SAE's reconstruction error (splice with error)"},
    {"steer.latent_clamp", LP_KEY_STR, NULL, 0, 0, NULL, "N:VALUE[,N:VALUE...]: clamp SAE latents in the spliced reconstruction"},
};

/* Short flags: --tokens FILE is --data.tokens=FILE, and so on. */
static const char *const g_short[][2] = {
    {"tokens", "data.tokens"},        {"text", "data.text"},         {"out", "tokenize.out"},
    {"prompt", "gen.prompt"},         {"max-tokens", "gen.max_tokens"}, {"temperature", "gen.temperature"},
    {"top-p", "gen.top_p"},           {"seed", "gen.seed"},
};
#define N_KEYS ((int)(sizeof g_keys / sizeof *g_keys))
_Static_assert(sizeof g_keys / sizeof *g_keys <= LP_CFG_MAX_KEYS, "raise LP_CFG_MAX_KEYS: lp_cfg holds that many keys");

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
    "    [--steer.vector=F.safetensors[:T] | --steer.probe=F:T | --steer.sae=DIR --steer.latent=N |\n"
    "     --steer.from_prompts=\"A|B\"] [--steer.hook=HOOK] [--steer.coef=C] [--steer.positions=all|new|prompt]\n"
    "    [--steer.zero=HOOK] [--steer.splice=SAE_DIR [--steer.splice_error=true] [--steer.latent_clamp=N:V,...]]\n"
    "                                      steered and unsteered continuations side by side\n"
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
    "      --patch.kind=path --path.sender=S --path.receivers=R,...   path patching\n"
    "      (attribute --attrib.edges=true: edge attribution patching, circuit.json and circuit.html)\n"
    "  lens [CONFIG.ini] MODEL --lens.prompts=F.jsonl | --data.store=DIR [--lens.out=DIR]\n"
    "                                      logit lens and direct logit attribution per prompt\n"
    "  probe [CONFIG.ini] STORE --probe.labels=F.npy --probe.out=DIR [--probe.hooks=...]\n"
    "                                      linear probes (logistic, difference of means) per hook\n"
    "short flags: --tokens --text --out --prompt --max-tokens --temperature --top-p --seed\n"
    "keys:\n";

static void usage(FILE *f) {
    fputs(g_usage, f);
    for (int i = 0; i < N_KEYS; i++)
        fprintf(f, "  --%-22s %s%s%s\n", g_keys[i].name, g_keys[i].help, g_keys[i].def ? "; default " : "",
                g_keys[i].def ? g_keys[i].def : "");
}

static lp_dist *g_dist;
static FILE *g_err; /* ranks other than 0: the real standard error, for errors only */

int cli_fail(lp_status st) {
    if (lp_dist_size(g_dist) > 1) fprintf(g_err ? g_err : stderr, "loupe: rank %d: %s\n", lp_dist_rank(g_dist), lp_last_error());
    else fprintf(stderr, "loupe: %s\n", lp_last_error());
    if (getenv("LOUPE_DEBUG")) fprintf(stderr, "loupe: (raised at %s)\n", lp_last_error_where());
    return lp_status_exit_code(st);
}

void cli_print_json(cJSON *j) {
    char *txt = cJSON_PrintUnformatted(j);
    if (txt) printf("%s\n", txt);
    free(txt);
    cJSON_Delete(j);
}

void cli_cache_progress(const lp_cache_progress *p, void *user) {
    int tty = isatty(2);
    if (p->final) {
        if (tty) fputc('\n', stderr);
        return;
    }
    if (tty == p->shard_done) return; /* a terminal redraws every batch; a log gets one line per shard */
    double rate = p->seconds > 0 ? p->tokens_done / p->seconds : 0;
    double eta = rate > 0 ? (double)(p->seq_total - p->seq_done) * ((double)p->tokens_done / (p->seq_done ? p->seq_done : 1)) / rate : 0;
    int w = 30, fill = p->seq_total ? (int)(w * p->seq_done / p->seq_total) : w;
    fprintf(stderr, "%scache [%.*s%*s] %lld/%lld seq  %.0f tok/s  ETA %d:%02d%s", tty ? "\r" : "", fill,
            "##############################", w - fill, "", (long long)p->seq_done, (long long)p->seq_total, rate,
            (int)eta / 60, (int)eta % 60, tty ? "" : "\n");
    fflush(stderr);
}

void cli_train_progress(const lp_train_progress *p, void *user) {
    if (p->final) {
        fputc('\n', stderr);
        return;
    }
    int width = 24, done = (int)(width * (double)p->step / (p->total_steps ? p->total_steps : 1));
    fprintf(stderr, "\rtrain-sae [");
    for (int i = 0; i < width; i++) fputc(i < done ? '#' : ' ', stderr);
    fprintf(stderr, "] %lld/%lld tok  %.0f tok/s  loss %.4g  L0 %.1f  dead %d   ", (long long)p->tokens_done,
            (long long)p->tokens_total, p->tokens_per_s, p->loss, p->l0, p->dead);
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
                      strcmp(dot, ".sae") == 0 || strcmp(dot, ".labels") == 0;
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

/* The processes of this job (g_dist, dist.h): joined on the first model load, ended by main. */
static const char *g_cmd;

/* Every rank must run the same command with the same settings (a rank started with another
 * config file would compute something else, or wait in another collective): a hash of the
 * command and every key's value, all-gathered and compared before any work. */
static lp_status same_settings(const args *a) {
    int n = lp_dist_size(g_dist);
    if (n <= 1) return LP_OK;
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (int i = -1; i < a->cfg.n; i++) {
        const char *parts[3] = {i < 0 ? g_cmd : a->cfg.keys[i].name, "=", i < 0 ? "" : a->cfg.val[i] ? a->cfg.val[i] : "(unset)"};
        for (int k = 0; k < 3; k++)
            for (const char *c = parts[k]; *c; c++) h = (h ^ (unsigned char)*c) * 1099511628211ull;
        h = (h ^ 0xff) * 1099511628211ull; /* a separator no key or value contains */
    }
    uint64_t *all = malloc((size_t)n * sizeof *all);
    if (!all) LP_FAIL(LP_ERR_OOM, "out of memory");
    lp_status st = lp_dist_allgather(g_dist, LP_DIST_WORLD, &h, all, sizeof h);
    for (int r = 1; st == LP_OK && r < n; r++)
        if (all[r] != all[0])
            st = LP_ERR(LP_ERR_ARG, "rank %d was started with other settings than rank 0 (command, config file or flags): every rank "
                                    "must be given the same ones", r);
    free(all);
    return st;
}

/* Joins the job's processes; ranks other than 0 print nothing, neither results nor progress,
 * except their errors (each naming its rank). */
lp_status cli_join(const args *a) {
    int tp = (int)lp_cfg_int(&a->cfg, "dist.tp");
    if (g_dist) return LP_OK;
    /* the commands that split the model over ranks and write no files of their own */
    static const char *const tp_cmds[] = {"info", "run", "generate", NULL};
    int ok = 0;
    for (int i = 0; tp_cmds[i]; i++) ok |= strcmp(g_cmd, tp_cmds[i]) == 0;
    if (tp > 1 && !ok) LP_FAIL(LP_ERR_ARG, "dist.tp=%d: `loupe %s` does not run tensor-parallel (info, run and generate do)", tp, g_cmd);
    /* the commands whose work splits over data-parallel ranks; the others refuse more than one */
    int dp_ok = strcmp(g_cmd, "cache") == 0 || strcmp(g_cmd, "train-sae") == 0, dp = (int)lp_cfg_int(&a->cfg, "dist.dp");
    if (dp > 1 && !dp_ok) LP_FAIL(LP_ERR_ARG, "dist.dp=%d: `loupe %s` does not run data-parallel (cache and train-sae do)", dp, g_cmd);
    LP_CHECK(lp_dist_init(&g_dist, tp, dp_ok ? dp : 1));
    LP_CHECK(same_settings(a));
    if (lp_dist_rank(g_dist) == 0) return LP_OK;
    int fd = dup(2);
    g_err = fd >= 0 ? fdopen(fd, "w") : NULL;
    if (!g_err || !freopen("/dev/null", "w", stdout) || !freopen("/dev/null", "w", stderr))
        LP_FAIL(LP_ERR_WRITE, "rank %d: cannot silence its output", lp_dist_rank(g_dist));
    return LP_OK;
}

lp_dist *cli_dist(void) { return g_dist; }

lp_status cli_open_model(const args *a, lp_model **m) {
    LP_CHECK(lp_cfg_require(&a->cfg, (const char *[]){"model.path", NULL}));
    LP_CHECK(cli_join(a));
    const char *dt = lp_cfg_str(&a->cfg, "model.dtype");
    lp_device d = cli_device(lp_cfg_str(&a->cfg, "model.device"));
    lp_dtype t = strcmp(dt, "f32") == 0 ? LP_F32 : strcmp(dt, "bf16") == 0 ? LP_BF16 : d == LP_CUDA ? LP_BF16 : LP_F32;
    return lp_model_load_dist(m, lp_cfg_str(&a->cfg, "model.path"), d, t, g_dist);
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

/* data.prepend_bos: the BOS id each row starts with, or -1 (auto: when the tokenizer adds
 * one, as TransformerLens's prepend_bos defaults). Rows then start with BOS, so the stream
 * drops the one the tokenizer put first. */
static lp_status row_bos(const args *a, const lp_tokenizer *tk, int32_t **ids, size_t *n, int32_t *bos) {
    const char *pb = lp_cfg_str(&a->cfg, "data.prepend_bos");
    int on = strcmp(pb, "true") == 0 || (strcmp(pb, "auto") == 0 && lp_tokenizer_adds_bos(tk));
    *bos = on ? lp_tokenizer_bos(tk) : -1;
    if (on && *bos < 0)
        LP_FAIL(LP_ERR_ARG, "data.prepend_bos = true, but the tokenizer of %s has no BOS token", lp_cfg_str(&a->cfg, "model.path"));
    if (on && lp_tokenizer_adds_bos(tk) && *n > 0 && (*ids)[0] == *bos) memmove(*ids, *ids + 1, --*n * sizeof **ids);
    return LP_OK;
}

/* Reads a UTF-8 text file and tokenizes it; *ids is malloc'ed. The UTF-8 check comes
 * first, so that a wrong file is refused by name before the tokenizer loads. With bos
 * (data.prepend_bos): *bos is the id rows start with (-1: none), and the stream leaves
 * out the tokenizer's own leading BOS then. */
static lp_status tokenize_file(const args *a, const char *path, int32_t **ids, size_t *n, size_t *n_bytes, int32_t *bos) {
    size_t len;
    char *text;
    LP_CHECK(lp_text_read(path, "text file", &text, &len));
    lp_tokenizer *tk = NULL;
    *ids = NULL;
    lp_status st = lp_utf8_check(text, len, path);
    if (st == LP_OK) st = open_tokenizer(a, &tk);
    if (st == LP_OK) st = lp_tokenize(tk, text, len, ids, n);
    if (st == LP_OK && bos) st = row_bos(a, tk, ids, n, bos);
    if (st == LP_OK && *n == 0) st = LP_ERR(LP_ERR_ARG, "%s: the text gives no tokens", path);
    if (n_bytes) *n_bytes = len;
    if (st != LP_OK) free(*ids), *ids = NULL;
    lp_tokenizer_free(tk);
    free(text);
    return st;
}

/* data.text: the text's tokens as one stream, cut into rows of data.context tokens (or
 * one row when the whole text fits the model's context, else rows of the context), each
 * row [BOS] + context - 1 tokens when data.prepend_bos says so. */
static lp_status load_text(const args *a, const lp_model *m, lp_tokens *t) {
    const char *path = lp_cfg_str(&a->cfg, "data.text");
    int32_t *ids;
    size_t n;
    int32_t bos;
    LP_CHECK(tokenize_file(a, path, &ids, &n, NULL, &bos));
    lp_status st = lp_tokens_from_stream(t, ids, n, (int)lp_cfg_int(&a->cfg, "data.context"), lp_model_config(m)->n_ctx, bos, path);
    free(ids);
    LP_CHECK(st);
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
            .on_progress = cli_cache_progress,
            .dist = cli_dist(),
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
    if (st == LP_OK) st = tokenize_file(a, lp_cfg_str(&a->cfg, "data.text"), &ids, &n, &bytes, NULL);
    if (st == LP_OK && n > 0x7fffffff) st = LP_ERR(LP_ERR_ARG, "more than 2^31 tokens in one file");
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
        {"attribute", cmd_attribute, "model.path"}, {"patch", cmd_patch, "model.path"},
        {"lens", cmd_lens, "model.path"}, {"probe", cmd_probe, "data.store"}};
    int (*fn)(args *) = NULL;
    const char *positional = "model.path";
    for (size_t i = 0; i < sizeof cmds / sizeof *cmds; i++)
        if (strcmp(cmd, cmds[i].name) == 0) fn = cmds[i].fn, positional = cmds[i].positional;
    if (!fn) {
        fprintf(stderr, "loupe: unknown command '%s' (commands: info, run, cache, tokenize, generate, train-sae, eval-sae, encode, "
                        "dashboard, attribute, patch, lens, probe; see loupe --help)\n", cmd);
        return 2;
    }
    args a = {0};
    g_cmd = cmd;
    lp_status st = parse_args(&a, argc - 2, argv + 2, positional);
    int rc = st == LP_OK ? fn(&a) : cli_fail(st);
    lp_cfg_free(&a.cfg);
    lp_dist_finalize(g_dist);
    /* a report or --json object that did not reach its file is a failure, not a success */
    if ((fflush(stdout) != 0 || ferror(stdout)) && rc == 0) {
        fprintf(stderr, "loupe: standard output: write failed: %s\n", strerror(errno));
        rc = 1;
    }
    return rc;
}
