/* host/cli/: the top layer, the only code that prints and exits: main.c dispatches, each
 * command is a file of its own, common.c holds what they share.
 *
 * main.c: the `loupe` command line. Parses `loupe COMMAND [CONFIG.ini] [MODEL]
 * [--section.key=value ...]`, validates every key before any work, and dispatches to the
 * command (run.c, generate.c, sae.c, dashboard.c, attrib.c, lens.c, probe.c), whose
 * lp_status becomes one line on stderr and an exit code (0 done, 1 failed while working,
 * 2 bad usage or bad input). With --json the last stdout line is one object. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loupe/config.h"
#include "cli.h"

static const lp_key g_keys[] = {
    {"model.path", LP_KEY_STR, NULL, 0, 0, NULL, "Hugging Face checkpoint directory or .gguf file"},
    {"model.device", LP_KEY_CHOICE, "auto", 0, 0, "auto|cpu|cuda", "auto: cuda when a GPU is present"},
    {"model.dtype", LP_KEY_CHOICE, "auto", 0, 0, "auto|f32|bf16", "auto: bf16 on cuda, f32 on cpu"},
    {"dist.tp", LP_KEY_INT, "1", 1, 1 << 16, NULL,
     "tensor-parallel ranks the model is split over (launch that many with mpirun -np N or srun -n N)"},
    {"dist.dp", LP_KEY_INT, "0", 0, 1 << 16, NULL,
     "data-parallel ranks (cache, train-sae, attribute, patch: each its share of the batches, rank 0 alone writes); 0: world "
     "size / dist.tp"},
    {"dist.timeout_s", LP_KEY_FLOAT, "30", 0, 1e6, NULL,
     "seconds a rank waits for the others in any collective before it ends the whole job (a crashed or stopped rank)"},
    {"dist.tp_parts", LP_KEY_INT, "0", 0, 8, NULL,
     "micro-batches a tensor-parallel forward with no hooks interleaves, each one's all-reduces travelling while the others "
     "compute (0: B/4, B/2 and B/4 sequences when 4 divides the batch, else two halves of an even batch; K: K equal parts; "
     "1: the plain schedule; whole sequences per part, so the batch must divide)"},
    {"dist.log_dir", LP_KEY_STR, NULL, 0, 0, NULL,
     "a directory (made if missing) where every rank but 0 appends what it would print to rank-R.log (progress, "
     "summaries, its errors); unset: those ranks print only their errors. Rank 0 prints as one process does"},
    {"dist.start_timeout_s", LP_KEY_FLOAT, "60", 0, 1e6, NULL,
     "seconds the start of a job of several ranks (MPI's start, the groups, the settings check) may take before a rank ends "
     "the whole job (a rank that never arrived)"},
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
    {"sae.kind", LP_KEY_CHOICE, "sae", 0, 0, "sae|per_layer|cross_layer",
     "sae: one SAE or transcoder (SAELens files); per_layer / cross_layer: transcoders for every MLP (circuit-tracer's files)"},
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
    {"train.sparsity_coefficient", LP_KEY_FLOAT, "0.001", 0, 1e30, NULL,
     "per_layer / cross_layer: lambda of lambda * tanh(c * f * ||W_dec||)"},
    {"train.sparsity_c", LP_KEY_FLOAT, "1", 0, 1e30, NULL, "per_layer / cross_layer: c of the tanh penalty"},
    {"train.sparsity_warm_up_steps", LP_KEY_INT, "0", 0, 1LL << 40, NULL, "steps to ramp the tanh penalty's lambda"},
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
    {"train.encoder_dtype", LP_KEY_CHOICE, "auto", 0, 0, "auto|f32|bf16",
     "the encoder GEMM: on a bf16 copy of W_enc (fp32 master weights and sums); auto: bf16 on cuda"},
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
    {"attrib.prefix_share", LP_KEY_CHOICE, "true", 0, 0, "true|false",
     "attribution patching: the gradient's run covers only the positions from the pairs' first difference on"},
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
    /* attribution graphs (loupe graph) */
    {"graph.prompts", LP_KEY_STR, NULL, 0, 0, NULL, "JSONL: prompt (text or ids), optional slug"},
    {"graph.transcoders", LP_KEY_STR, NULL, 0, 0, NULL, "transcoders in circuit-tracer's layout (config.yaml, layer_{i} or W_enc_{i}/W_dec_{i} files)"},
    {"graph.out", LP_KEY_STR, NULL, 0, 0, NULL, "directory for <slug>.json, graph-metadata.json, results.jsonl"},
    {"graph.scan", LP_KEY_STR, NULL, 0, 0, NULL, "the scan named in the JSON (default: the transcoders' config.yaml scan)"},
    {"graph.max_feature_nodes", LP_KEY_INT, "0", 0, 1 << 30, NULL, "feature nodes kept, chosen by influence; 0: every active feature"},
    {"graph.batch", LP_KEY_INT, "64", 1, 1 << 16, NULL, "rows per backward pass (and circuit-tracer's batch_size for the ranking rounds)"},
    {"graph.update_interval", LP_KEY_INT, "4", 1, 1 << 16, NULL, "batches per influence-ranking round (max_feature_nodes)"},
    {"graph.max_n_logits", LP_KEY_INT, "10", 1, 1 << 16, NULL, "logit nodes at most"},
    {"graph.desired_logit_prob", LP_KEY_FLOAT, "0.95", 0, 1, NULL, "logit nodes until their cumulative probability reaches this"},
    {"graph.node_threshold", LP_KEY_FLOAT, "0.8", 0, 1, NULL, "pruning: nodes kept up to this share of the influence"},
    {"graph.edge_threshold", LP_KEY_FLOAT, "0.98", 0, 1, NULL, "pruning: edges kept up to this share of the influence"},
    {"graph.edge_mass", LP_KEY_FLOAT, "1", 1e-6, 1, NULL, "sparse rows: each keeps its largest edges up to this share of its |mass| (1: all)"},
    {"graph.max_row_edges", LP_KEY_INT, "0", 0, 1 << 30, NULL, "sparse rows: at most this many edges each (0: no cap)"},
    {"graph.device", LP_KEY_CHOICE, "cpu", 0, 0, "cpu|cuda", "where the backward passes run (cuda: on the GPU in fp32; the forward runs where model.device says, f32)"},
    {"graph.zero_positions", LP_KEY_INT, "1", 1, 1 << 20, NULL, "the first positions without features and with a zero error (circuit-tracer: 1; 4 for instruction-tuned Gemma 3)"},
    {"graph.host_budget_mb", LP_KEY_INT, "0", 0, 1L << 40, NULL, "refuse a graph whose plan needs more host memory (0: 80% of RAM)"},
    {"graph.html", LP_KEY_CHOICE, "true", 0, 0, "true|false", "also write <slug>.html, the graph's self-contained page"},
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
    "  graph [CONFIG.ini] MODEL --graph.prompts=F.jsonl --graph.transcoders=DIR --graph.out=DIR\n"
    "                                      attribution graphs (circuit-tracer's), resumable, with their pages\n"
    "  graph-page GRAPH.json OUT.html [--json]\n"
    "                                      a self-contained HTML page for an attribution graph JSON\n"
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
    LP_CHECK(lp_cfg_init(&a->cfg, g_keys, N_KEYS));
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
    /* the key table bounds it to [0, 1e6] (no infinity, no NaN); a wait of 0 s is none */
    static const char *const waits[] = {"dist.timeout_s", "dist.start_timeout_s"};
    for (int i = 0; i < 2; i++)
        if (!(lp_cfg_float(&a->cfg, waits[i]) > 0))
            LP_FAIL(LP_ERR_ARG, "%s = %g: must be more than 0 seconds", waits[i], lp_cfg_float(&a->cfg, waits[i]));
    return check_paths(&a->cfg);
}

/* OpenBLAS's worker threads spin (sched_yield) for 2^OPENBLAS_THREAD_TIMEOUT cycles after each
 * GEMM, 2^28 by default, on the cores that SAE training's own threads need between its GEMMs
 * (the selection, the sparse gradients, Adam): about a quarter of a TopK step on two cores,
 * while a forward, whose GEMMs follow one another closely, gains from the spin (README,
 * bench_sae). OpenBLAS reads the variable once, as it loads, so train-sae sets it to 20,
 * unless the user has set it, by starting itself again. If that fails it goes on as it is. */
static void train_blas_env(char **argv) {
    if (strcmp(argv[1], "train-sae") != 0 || getenv("OPENBLAS_THREAD_TIMEOUT")) return;
    if (setenv("OPENBLAS_THREAD_TIMEOUT", "20", 1) == 0) execv("/proc/self/exe", argv);
}

int main(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "help") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    train_blas_env(argv);
    const char *cmd = argv[1];
    if (strcmp(cmd, "graph-page") == 0) return cmd_graph_page(argc - 2, argv + 2);
    /* the positional argument is the model, or for the SAE commands the SAE */
    static const struct { const char *name; int (*fn)(args *); const char *positional; } cmds[] = {
        {"info", cmd_info, "model.path"},        {"run", cmd_run, "model.path"},
        {"cache", cmd_cache, "model.path"},      {"tokenize", cmd_tokenize, "model.path"},
        {"generate", cmd_generate, "model.path"}, {"train-sae", cmd_train_sae, "data.store"},
        {"eval-sae", cmd_eval_sae, "sae.path"},   {"encode", cmd_encode, "sae.path"},
        {"dashboard", cmd_dashboard, "sae.path"}, {"graph", cmd_graph, "model.path"},
        {"attribute", cmd_attribute, "model.path"}, {"patch", cmd_patch, "model.path"},
        {"lens", cmd_lens, "model.path"}, {"probe", cmd_probe, "data.store"}};
    int (*fn)(args *) = NULL;
    const char *positional = "model.path";
    for (size_t i = 0; i < sizeof cmds / sizeof *cmds; i++)
        if (strcmp(cmd, cmds[i].name) == 0) fn = cmds[i].fn, positional = cmds[i].positional;
    if (!fn) {
        fprintf(stderr, "loupe: unknown command '%s' (commands: info, run, cache, tokenize, generate, train-sae, eval-sae, encode, "
                        "dashboard, graph, graph-page, attribute, patch, lens, probe; see loupe --help)\n", cmd);
        return 2;
    }
    args a = {0};
    cli_set_command(cmd);
    lp_status st = parse_args(&a, argc - 2, argv + 2, positional);
    int rc = st == LP_OK ? fn(&a) : cli_fail(st);
    lp_cfg_free(&a.cfg);
    rc = cli_dist_finish(rc);
    /* a report or --json object that did not reach its file is a failure, not a success */
    if ((fflush(stdout) != 0 || ferror(stdout)) && rc == 0) {
        fprintf(stderr, "loupe: standard output: write failed: %s\n", strerror(errno));
        rc = 1;
    }
    return rc;
}
