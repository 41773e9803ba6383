/* sae.c: the SAE commands: `loupe train-sae`, `loupe eval-sae`, `loupe encode`. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sys/stat.h>

#include "loupe/hooks.h"
#include "loupe/output.h"
#include "loupe/safetensors.h"
#include "loupe/sae_train.h"
#include "loupe/store.h"
#include "loupe/dist.h"
#include "cli.h"

static int is_true(const args *a, const char *key) { return strcmp(lp_cfg_str(&a->cfg, key), "true") == 0; }

/* Values that land in the SAE's fixed-size fields: refused whole rather than cut. */
static lp_status copy_key(char *dst, size_t n, const args *a, const char *key) {
    const char *v = lp_cfg_str(&a->cfg, key);
    if (!v) v = "";
    if (strlen(v) >= n) LP_FAIL(LP_ERR_ARG, "%s: '%.40s...' is %zu bytes; at most %zu are allowed", key, v, strlen(v), n - 1);
    snprintf(dst, n, "%s", v);
    return LP_OK;
}

/* The SAE's device: F32 always (the trainer keeps F32 master weights). */
static lp_status sae_ctx(const args *a, const char *key, lp_ctx *c) { return lp_ctx_init(c, cli_device(lp_cfg_str(&a->cfg, key)), LP_F32); }

static lp_status train_cfg(const args *a, lp_sae_train_cfg *t) {
    lp_sae_train_defaults(t);
    lp_sae_cfg *s = &t->sae;
    s->arch = (lp_sae_arch)lp_sae_arch_parse(lp_cfg_str(&a->cfg, "sae.architecture"));
    s->k = (int)lp_cfg_int(&a->cfg, "sae.k");
    s->apply_b_dec_to_input = is_true(a, "sae.apply_b_dec_to_input");
    s->skip = is_true(a, "sae.skip");
    s->jumprelu_bandwidth = (float)lp_cfg_float(&a->cfg, "sae.jumprelu_bandwidth");
    LP_CHECK(copy_key(s->normalize, sizeof s->normalize, a, "sae.normalize_activations"));
    /* a list of hooks (live training) is split and checked name by name in train_live */
    const char *hooks = lp_cfg_str(&a->cfg, "data.hook");
    if (!(hooks && strchr(hooks, ','))) LP_CHECK(copy_key(s->hook_name, sizeof s->hook_name, a, "data.hook"));
    LP_CHECK(copy_key(s->hook_name_out, sizeof s->hook_name_out, a, "data.hook_out"));
    t->store = lp_cfg_str(&a->cfg, "data.store");
    t->out = lp_cfg_str(&a->cfg, "train.out");
    t->lr = lp_cfg_float(&a->cfg, "train.lr");
    t->adam_beta1 = lp_cfg_float(&a->cfg, "train.adam_beta1");
    t->adam_beta2 = lp_cfg_float(&a->cfg, "train.adam_beta2");
    LP_CHECK(copy_key(t->lr_scheduler, sizeof t->lr_scheduler, a, "train.lr_scheduler"));
    t->lr_warm_up_steps = lp_cfg_int(&a->cfg, "train.lr_warm_up_steps");
    t->lr_decay_steps = lp_cfg_int(&a->cfg, "train.lr_decay_steps");
    t->l1_coefficient = lp_cfg_float(&a->cfg, "train.l1_coefficient");
    t->l1_warm_up_steps = lp_cfg_int(&a->cfg, "train.l1_warm_up_steps");
    t->l0_coefficient = lp_cfg_float(&a->cfg, "train.l0_coefficient");
    t->jumprelu_init_threshold = lp_cfg_float(&a->cfg, "train.jumprelu_init_threshold");
    t->aux_k_coefficient = lp_cfg_float(&a->cfg, "train.aux_k_coefficient");
    t->aux_k = (int)lp_cfg_int(&a->cfg, "train.aux_k");
    t->tokens = lp_cfg_int(&a->cfg, "train.tokens");
    t->batch_tokens = (int)lp_cfg_int(&a->cfg, "train.batch_tokens");
    LP_CHECK(copy_key(t->b_dec_init, sizeof t->b_dec_init, a, "train.b_dec_init"));
    t->dead_feature_window = lp_cfg_int(&a->cfg, "train.dead_feature_window");
    t->shuffle_tokens = lp_cfg_int(&a->cfg, "train.shuffle_tokens");
    t->checkpoint_every = lp_cfg_int(&a->cfg, "train.checkpoint_every");
    t->log_every = lp_cfg_int(&a->cfg, "train.log_every");
    t->seed = (uint64_t)lp_cfg_int(&a->cfg, "train.seed");
    const char *ed = lp_cfg_str(&a->cfg, "train.encoder_dtype");
    t->encoder_bf16 = !ed || !strcmp(ed, "auto") ? -1 : !strcmp(ed, "bf16");
    t->on_progress = cli_train_progress;
    t->allow_incomplete = is_true(a, "data.allow_incomplete");
    LP_CHECK(lp_cfg_require(&a->cfg, (const char *[]){"data.hook", "train.out", NULL}));
    s->d_sae = (int)lp_cfg_int(&a->cfg, "sae.d_sae");
    return LP_OK;
}

/* d_sae: given, or expansion_factor x the hook's width. */
static void size_sae(const args *a, lp_sae_train_cfg *t, int width) {
    if (t->sae.d_sae == 0) t->sae.d_sae = (int)lp_cfg_int(&a->cfg, "sae.expansion_factor") * width;
}

static void print_report(const args *a, const lp_sae_train_cfg *t, const lp_sae_train_report *rep, const char *where, lp_ctx *c) {
    if (a->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "out", t->out);
        cJSON_AddStringToObject(j, "hook", t->sae.hook_name);
        cJSON_AddNumberToObject(j, "steps", (double)rep->steps);
        cJSON_AddNumberToObject(j, "tokens", (double)rep->tokens);
        cJSON_AddNumberToObject(j, "resumed_tokens", (double)rep->resumed_tokens);
        cJSON_AddBoolToObject(j, "already_complete", rep->already_complete);
        cJSON_AddNumberToObject(j, "tokens_per_s", rep->tokens_per_s);
        cJSON_AddNumberToObject(j, "mse", rep->mse);
        cJSON_AddNumberToObject(j, "explained_variance", rep->explained_variance);
        cJSON_AddNumberToObject(j, "l0", rep->l0);
        cJSON_AddNumberToObject(j, "dead", rep->dead);
        cli_print_json(j);
        return;
    }
    if (rep->already_complete) {
        printf("%s already holds this SAE, trained on %lld tokens of %s in %lld steps; nothing to do (last metrics line: mse %.5g, "
               "explained variance %.4f, L0 %.2f, dead latents %d)\n", t->out, (long long)rep->tokens, where, (long long)rep->steps, rep->mse,
               rep->explained_variance, rep->l0, rep->dead);
        return;
    }
    char shard[64] = ""; /* latent sharding (dist.tp): each rank held d_sae / tp latents */
    if (lp_dist_tp_size(t->dist) > 1)
        snprintf(shard, sizeof shard, ", latents sharded over %d ranks", lp_dist_tp_size(t->dist));
    printf("trained %s SAE (%s -> d_sae %d%s%s) on %lld tokens of %s in %lld steps, %.0f tokens/s on %s%s\n", lp_sae_arch_name(t->sae.arch),
           t->sae.hook_name, t->sae.d_sae, t->sae.hook_name_out[0] ? ", transcoder" : "", shard, (long long)rep->tokens, where,
           (long long)rep->steps, rep->tokens_per_s, c->device == LP_CUDA ? "cuda" : "cpu", rep->resumed_tokens ? " (resumed)" : "");
    printf("last %lld steps: mse %.5g, explained variance %.4f, L0 %.2f, dead latents %d; wrote %s/cfg.json, "
           "sae_weights.safetensors, metrics.jsonl\n",
           (long long)t->log_every, rep->mse, rep->explained_variance, rep->l0, rep->dead, t->out);
}

/* From the model itself: data.hook may list several hooks (comma-separated), each trained
 * into train.out/<hook> from one forward stream. */
static int train_live(args *a, lp_sae_train_cfg *t0, lp_ctx *c) {
    lp_model *m = NULL;
    lp_tokens toks = {0};
    lp_live *live = NULL;
    int tp = (int)lp_cfg_int(&a->cfg, "dist.tp");
    lp_status st = tp > 1 ? LP_ERR(LP_ERR_ARG, "dist.tp=%d: sharded SAE training reads an activation store (data.store), not a live model", tp)
                          : cli_open_model(a, &m);
    if (st == LP_OK && lp_dist_dp_size(cli_dist()) > 1)
        st = LP_ERR(LP_ERR_ARG, "dist.dp=%d: train-sae runs data-parallel on an activation store (data.store), not on a live model", lp_dist_dp_size(cli_dist()));
    if (st == LP_OK) st = cli_load_tokens(a, m, &toks);
    char *hooks = strdup(lp_cfg_str(&a->cfg, "data.hook"));
    if (!hooks) return cli_fail(LP_ERR(LP_ERR_OOM, "out of memory"));
    int n = 1;
    for (char *p = hooks; *p; p++) n += *p == ',';
    lp_sae_train_cfg *cfgs = calloc(n, sizeof *cfgs);
    lp_sae_train_report *reps = calloc(n, sizeof *reps);
    char(*outs)[1200] = calloc(n, sizeof *outs);
    if (st == LP_OK && (!cfgs || !reps || !outs)) st = LP_ERR(LP_ERR_OOM, "out of memory");
    int i = 0;
    for (char *h = strtok(hooks, ","); st == LP_OK && h; h = strtok(NULL, ","), i++) {
        cfgs[i] = *t0;
        if (strlen(h) >= sizeof cfgs[i].sae.hook_name || strlen(t0->out) + strlen(h) + 2 > sizeof outs[i]) {
            st = LP_ERR(LP_ERR_ARG, "data.hook: hook name '%.40s...' or train.out is too long", h);
            break;
        }
        snprintf(cfgs[i].sae.hook_name, sizeof cfgs[i].sae.hook_name, "%s", h);
        if (n > 1) snprintf(outs[i], sizeof outs[i], "%s/%s", t0->out, h);
        else snprintf(outs[i], sizeof outs[i], "%s", t0->out);
        cfgs[i].out = outs[i];
        int id = lp_hook_find(m, h);
        if (id < 0) {
            st = LP_ERR(LP_ERR_NOT_FOUND, "data.hook: the model has no hook '%s' (see `loupe info MODEL`)", h);
            break;
        }
        int64_t shape[LP_MAX_DIMS];
        int nd = lp_hook_shape(m, id, 1, 1, shape);
        size_sae(a, &cfgs[i], (int)lp_shape_numel(shape + 2, nd - 2));
        lp_sae_train_cfg chk = cfgs[i];
        chk.store = "(live)";
        if (st == LP_OK) st = lp_sae_train_check(&chk);
        if (n > 1 && st == LP_OK) {
            st = lp_mkdir_p(t0->out);
            if (i > 0) cfgs[i].on_progress = NULL; /* one bar for the stream */
        }
    }
    if (st == LP_OK) st = lp_live_open(&live, m, toks.ids, toks.n_seq, toks.ctx, (int)lp_cfg_int(&a->cfg, "run.batch"));
    if (st == LP_OK) st = lp_sae_train_live(cfgs, n, live, c, reps);
    int rc = 0;
    if (st != LP_OK) rc = cli_fail(st);
    else
        for (i = 0; i < n; i++) print_report(a, &cfgs[i], &reps[i], "the live model", c);
    lp_live_close(live);
    free(cfgs), free(reps), free(outs), free(hooks);
    lp_tokens_free(&toks);
    lp_model_free(m);
    return rc;
}

int cmd_train_sae(args *a) {
    if (strcmp(lp_cfg_str(&a->cfg, "sae.kind"), "sae") != 0) return cmd_train_clt(a);
    lp_sae_train_cfg t;
    lp_status st = train_cfg(a, &t);
    int live = !t.store && lp_cfg_str(&a->cfg, "model.path");
    if (st == LP_OK && !t.store && !live)
        st = LP_ERR(LP_ERR_ARG, "train-sae needs data.store (an activation store) or model.path with tokens or text");
    if (st == LP_OK && !live) { /* d_sae from the store's width, then every value checked before any work */
        lp_store *s;
        st = lp_store_open(&s, t.store, t.sae.hook_name);
        if (st == LP_OK) size_sae(a, &t, lp_store_d(s)), lp_store_close(s);
        if (st == LP_OK) st = lp_sae_train_check(&t);
    }
    if (st == LP_OK && !live) st = cli_join(a); /* a live run joins when it loads the model */
    if (st != LP_OK) return cli_fail(st);
    t.dist = cli_dist();
    lp_ctx c;
    if ((st = sae_ctx(a, "train.device", &c)) != LP_OK) return cli_fail(st);
    int rc = 0;
    if (live) {
        rc = train_live(a, &t, &c);
    } else {
        lp_sae_train_report rep;
        st = lp_sae_train(&t, &c, &rep);
        if (st != LP_OK) rc = cli_fail(st);
        else print_report(a, &t, &rep, t.store, &c);
    }
    lp_ctx_free(&c);
    return rc;
}

/* The hook an SAE reads: data.hook, else the SAE's own. */
static const char *sae_hook(const args *a, const lp_sae *s) {
    const char *h = lp_cfg_str(&a->cfg, "data.hook");
    return h && h[0] ? h : s->cfg.hook_name;
}

int cmd_eval_sae(args *a) {
    lp_status st = lp_cfg_require(&a->cfg, (const char *[]){"sae.path", NULL});
    if (st != LP_OK) return cli_fail(st);
    const char *store = lp_cfg_str(&a->cfg, "data.store"), *model = lp_cfg_str(&a->cfg, "model.path");
    if (!store && !model) return cli_fail(LP_ERR(LP_ERR_ARG, "eval-sae needs data.store (reconstruction) and/or model.path with tokens or text (spliced loss)"));
    lp_ctx c;
    if ((st = sae_ctx(a, model ? "model.device" : "train.device", &c)) != LP_OK) return cli_fail(st);
    lp_sae *s = NULL;
    st = lp_sae_load(&s, &c, lp_cfg_str(&a->cfg, "sae.path"));
    lp_sae_eval ev = {0};
    lp_sae_splice_eval sp = {0};
    if (st == LP_OK && store && !is_true(a, "data.allow_incomplete")) st = lp_store_require_complete(store);
    if (st == LP_OK && store)
        st = lp_sae_eval_store(s, &c, store, sae_hook(a, s), lp_cfg_str(&a->cfg, "data.hook_out"), lp_cfg_int(&a->cfg, "eval.tokens"),
                               (int)lp_cfg_int(&a->cfg, "eval.batch_tokens"), &ev);
    lp_model *m = NULL;
    lp_tokens toks = {0};
    if (st == LP_OK && model) {
        st = cli_open_model(a, &m);
        if (st == LP_OK) st = cli_load_tokens(a, m, &toks);
        int64_t rows = toks.n_seq, limit = lp_cfg_int(&a->cfg, "eval.tokens");
        if (limit > 0 && toks.ctx > 0) rows = limit / toks.ctx < 1 ? 1 : (limit / toks.ctx < rows ? limit / toks.ctx : rows);
        if (st == LP_OK) st = lp_sae_eval_model(m, s, &c, toks.ids, rows, toks.ctx, &sp);
    }
    int rc = 0;
    if (st != LP_OK) {
        rc = cli_fail(st);
    } else if (a->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "sae", lp_cfg_str(&a->cfg, "sae.path"));
        if (store) { /* SAELens's eval names */
            struct { const char *k; double v; } f[] = {
                {"n_tokens", (double)ev.n_tokens},        {"metrics/mse", ev.mse},
                {"metrics/explained_variance", ev.explained_variance}, {"metrics/fvu", ev.fvu},
                {"metrics/l0", ev.l0},                    {"metrics/l1", ev.l1},
                {"metrics/cossim", ev.cos_sim},           {"metrics/norm_ratio", ev.norm_ratio},
                {"sparsity/dead_features", ev.dead},      {"sparsity/dense_features", ev.dense}};
            for (size_t i = 0; i < sizeof f / sizeof *f; i++) cJSON_AddNumberToObject(j, f[i].k, f[i].v);
            cJSON *h = cJSON_AddArrayToObject(j, "sparsity/log10_density_histogram");
            for (int i = 0; i < 12; i++) cJSON_AddItemToArray(h, cJSON_CreateNumber((double)ev.density_hist[i]));
        }
        if (model) {
            struct { const char *k; double v; } f[] = {
                {"model_performance_preservation/ce_loss_without_sae", sp.ce_clean},
                {"model_performance_preservation/ce_loss_with_sae", sp.ce_sae},
                {"model_performance_preservation/ce_loss_with_ablation", sp.ce_zero},
                {"model_performance_preservation/ce_loss_score", sp.ce_recovered},
                {"model_behavior_preservation/kl_div_with_sae", sp.kl_sae},
                {"model_behavior_preservation/kl_div_with_ablation", sp.kl_zero},
                {"n_predicted_tokens", (double)sp.n_tokens}};
            for (size_t i = 0; i < sizeof f / sizeof *f; i++) cJSON_AddNumberToObject(j, f[i].k, f[i].v);
        }
        cli_print_json(j);
    } else {
        printf("SAE %s: %s, d_in %d, d_sae %d%s, hook %s\n", lp_cfg_str(&a->cfg, "sae.path"), lp_sae_arch_name(s->cfg.arch), s->cfg.d_in,
               s->cfg.d_sae, s->cfg.hook_name_out[0] ? " (transcoder)" : "", s->cfg.hook_name);
        if (store) {
            printf("  on %lld tokens of %s: mse %.5g, explained variance %.4f (FVU %.4f), L0 %.2f, L1 %.4g, cos %.4f, norm ratio %.4f\n",
                   (long long)ev.n_tokens, store, ev.mse, ev.explained_variance, ev.fvu, ev.l0, ev.l1, ev.cos_sim, ev.norm_ratio);
            printf("  latents: %d dead, %d dense (> 10%% of tokens); log10 density histogram [<-10 .. >=0]:", ev.dead, ev.dense);
            for (int i = 0; i < 12; i++) printf(" %lld", (long long)ev.density_hist[i]);
            printf("\n");
        }
        if (model)
            printf("  model loss over %lld tokens: clean %.4f, with the SAE %.4f, hook zero-ablated %.4f: CE loss recovered %.1f%%; "
                   "KL with the SAE %.4f, ablated %.4f\n",
                   (long long)sp.n_tokens, sp.ce_clean, sp.ce_sae, sp.ce_zero, 100 * sp.ce_recovered, sp.kl_sae, sp.kl_zero);
    }
    lp_tokens_free(&toks);
    lp_model_free(m);
    lp_sae_free(s, &c);
    lp_ctx_free(&c);
    return rc;
}

/* The SAE's hook, a chunk of tokens at a time: from a store, or from the model over rows. */
typedef struct chunker {
    lp_store *in;
    lp_model *m;
    lp_tokens toks;
    const char *hook;
    int d;
    int64_t n;  /* tokens in all */
    int chunk;  /* tokens per chunk (whole rows for the model) */
} chunker;

static lp_status chunk_read(chunker *ch, int64_t t0, int n, float *dst) {
    if (ch->in) return lp_store_read(ch->in, t0, n, dst);
    LP_CHECK(lp_model_forward(ch->m, ch->toks.ids + t0, n / ch->toks.ctx, ch->toks.ctx, 0));
    return lp_capture_read_f32(ch->m, ch->hook, dst, (size_t)n * ch->d);
}

static lp_status chunker_open(const args *a, chunker *ch, const char *hook) {
    memset(ch, 0, sizeof *ch);
    ch->hook = hook;
    const char *store = lp_cfg_str(&a->cfg, "data.store");
    if (store) {
        if (!is_true(a, "data.allow_incomplete")) LP_CHECK(lp_store_require_complete(store));
        LP_CHECK(lp_store_open(&ch->in, store, hook));
        ch->d = lp_store_d(ch->in), ch->n = lp_store_n_tokens(ch->in);
        ch->chunk = (int)lp_cfg_int(&a->cfg, "eval.batch_tokens");
        return LP_OK;
    }
    if (!lp_cfg_str(&a->cfg, "model.path"))
        LP_FAIL(LP_ERR_ARG, "encode needs data.store (an activation store) or model.path with tokens or text");
    LP_CHECK(cli_open_model(a, &ch->m));
    LP_CHECK(cli_load_tokens(a, ch->m, &ch->toks));
    int id = lp_hook_find(ch->m, hook);
    if (id < 0) LP_FAIL(LP_ERR_NOT_FOUND, "the model has no hook '%s' (the SAE's hook_name)", hook);
    int64_t shape[LP_MAX_DIMS];
    int nd = lp_hook_shape(ch->m, id, 1, 1, shape);
    ch->d = (int)lp_shape_numel(shape + 2, nd - 2);
    ch->n = ch->toks.n_seq * ch->toks.ctx;
    ch->chunk = (int)lp_cfg_int(&a->cfg, "run.batch") * ch->toks.ctx;
    return lp_hook_capture(ch->m, hook, NULL, 0, NULL);
}

static void chunker_close(chunker *ch) {
    lp_store_close(ch->in);
    lp_tokens_free(&ch->toks);
    lp_model_free(ch->m);
}

int cmd_encode(args *a) {
    lp_status st = lp_cfg_require(&a->cfg, (const char *[]){"sae.path", "encode.out", NULL});
    if (st != LP_OK) return cli_fail(st);
    lp_ctx c;
    if ((st = sae_ctx(a, lp_cfg_str(&a->cfg, "data.store") ? "train.device" : "model.device", &c)) != LP_OK) return cli_fail(st);
    lp_sae *s = NULL;
    chunker ch = {0};
    lp_lock lock = {.fd = -1}; /* one writer per encode.out: FILE.lock beside it while this runs */
    st = lp_lock_output(&lock, lp_cfg_str(&a->cfg, "encode.out"), 0);
    if (st == LP_OK) st = lp_sae_load(&s, &c, lp_cfg_str(&a->cfg, "sae.path"));
    if (st == LP_OK) st = chunker_open(a, &ch, sae_hook(a, s));
    const char *src = lp_cfg_str(&a->cfg, "data.store") ? lp_cfg_str(&a->cfg, "data.store") : lp_cfg_str(&a->cfg, "model.path");
    if (st == LP_OK && ch.d != s->cfg.d_in)
        st = LP_ERR(LP_ERR_SHAPE, "%s: '%s' has %d values per token but the SAE's d_in is %d", src, sae_hook(a, s),
                          ch.d, s->cfg.d_in);
    int k = (int)lp_cfg_int(&a->cfg, "encode.k");
    if (k == 0) k = s && s->cfg.k > 0 ? s->cfg.k : 32;
    if (st == LP_OK && k > s->cfg.d_sae) st = LP_ERR(LP_ERR_ARG, "encode.k = %d exceeds the SAE's d_sae %d", k, s->cfg.d_sae);
    int64_t n = st == LP_OK ? ch.n : 0;
    int B = ch.chunk;
    int32_t *idx = st == LP_OK ? malloc((size_t)n * k * sizeof(int32_t)) : NULL;
    float *val = st == LP_OK ? malloc((size_t)n * k * sizeof(float)) : NULL, *hx = st == LP_OK ? malloc((size_t)B * ch.d * 4) : NULL;
    float *dx = NULL;
    if (st == LP_OK && (!idx || !val || !hx)) st = LP_ERR(LP_ERR_OOM, "out of memory for %lld x %d latents", (long long)n, k);
    if (st == LP_OK) st = lp_ctx_alloc(&c, (size_t)B * ch.d * 4, (void **)&dx);
    double t0 = cli_now();
    for (int64_t i = 0; st == LP_OK && i < n; i += B) {
        int nb = (int)(n - i < B ? n - i : B);
        st = chunk_read(&ch, i, nb, hx);
        if (st == LP_OK) st = lp_ctx_to_device(&c, dx, hx, (size_t)nb * ch.d * 4);
        if (st == LP_OK) st = lp_sae_encode_topk_host(s, &c, dx, nb, k, idx + (size_t)i * k, val + (size_t)i * k);
    }
    if (st == LP_OK) { /* written under a temporary name and renamed when complete */
        lp_st_spec specs[2] = {{.name = "indices", .dtype = LP_I32, .ndim = 2, .shape = {n, k}},
                               {.name = "values", .dtype = LP_F32, .ndim = 2, .shape = {n, k}}};
        const void *datas[2] = {idx, val};
        const char *meta[] = {"sae", lp_cfg_str(&a->cfg, "sae.path"), "source", src, "hook", sae_hook(a, s), NULL};
        st = lp_st_write(lp_cfg_str(&a->cfg, "encode.out"), specs, datas, 2, meta);
    }
    int rc = 0;
    if (st != LP_OK) rc = cli_fail(st);
    else if (a->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "out", lp_cfg_str(&a->cfg, "encode.out"));
        cJSON_AddNumberToObject(j, "n_tokens", (double)n);
        cJSON_AddNumberToObject(j, "k", k);
        cli_print_json(j);
    }
    else
        printf("encoded %lld tokens of %s into %s: indices and values [%lld, %d], %.0f tokens/s\n", (long long)n, src,
               lp_cfg_str(&a->cfg, "encode.out"), (long long)n, k, n / (cli_now() - t0 + 1e-9));
    free(idx);
    free(val);
    free(hx);
    lp_ctx_release(&c, dx);
    chunker_close(&ch);
    lp_sae_free(s, &c);
    lp_ctx_free(&c);
    lp_lock_release(&lock);
    return rc;
}
