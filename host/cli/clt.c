/* clt.c: `loupe train-sae --sae.kind=per_layer|cross_layer`: a transcoder set for every MLP
 * of a model (clt_train.h), from an activation store or from the model itself, written in
 * circuit-tracer's layout. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/clt_train.h"
#include "loupe/hooks.h"
#include "loupe/store.h"
#include "cli.h"

static lp_status copy_hook(char *dst, size_t n, const args *a, const char *key, const char *dflt) {
    const char *v = lp_cfg_str(&a->cfg, key);
    if (!v) v = dflt;
    if (strlen(v) >= n) LP_FAIL(LP_ERR_ARG, "%s: '%.40s...' is longer than %zu bytes", key, v, n - 1);
    if (!strncmp(v, "blocks.", 7)) LP_FAIL(LP_ERR_ARG, "%s: give the hook without blocks.L. (e.g. mlp.hook_in), as circuit-tracer does", key);
    snprintf(dst, n, "%s", v);
    return LP_OK;
}

static lp_status read_cfg(const args *a, lp_clt_train_cfg *t) {
    lp_clt_train_defaults(t);
    lp_clt_cfg *c = &t->clt;
    c->kind = (lp_clt_kind)lp_clt_kind_parse(lp_cfg_str(&a->cfg, "sae.kind"));
    const char *arch = lp_cfg_str(&a->cfg, "sae.architecture");
    if (!strcmp(arch, "standard")) c->act = LP_CLT_RELU;
    else if (!strcmp(arch, "jumprelu")) c->act = LP_CLT_JUMPRELU;
    else LP_FAIL(LP_ERR_ARG, "sae.architecture = %s: a transcoder set trains standard (ReLU) or jumprelu", arch);
    c->skip = !strcmp(lp_cfg_str(&a->cfg, "sae.skip"), "true");
    c->d_sae = (int)lp_cfg_int(&a->cfg, "sae.d_sae");
    LP_CHECK(copy_hook(c->input_hook, sizeof c->input_hook, a, "data.hook", "mlp.hook_in"));
    LP_CHECK(copy_hook(c->output_hook, sizeof c->output_hook, a, "data.hook_out", "hook_mlp_out"));
    t->out = lp_cfg_str(&a->cfg, "train.out");
    t->lr = lp_cfg_float(&a->cfg, "train.lr");
    t->adam_beta1 = lp_cfg_float(&a->cfg, "train.adam_beta1");
    t->adam_beta2 = lp_cfg_float(&a->cfg, "train.adam_beta2");
    t->sparsity_coefficient = lp_cfg_float(&a->cfg, "train.sparsity_coefficient");
    t->sparsity_c = lp_cfg_float(&a->cfg, "train.sparsity_c");
    t->sparsity_warm_up_steps = lp_cfg_int(&a->cfg, "train.sparsity_warm_up_steps");
    t->jumprelu_init_threshold = lp_cfg_float(&a->cfg, "train.jumprelu_init_threshold");
    t->jumprelu_bandwidth = lp_cfg_float(&a->cfg, "sae.jumprelu_bandwidth");
    t->tokens = lp_cfg_int(&a->cfg, "train.tokens");
    t->batch_tokens = (int)lp_cfg_int(&a->cfg, "train.batch_tokens");
    t->log_every = lp_cfg_int(&a->cfg, "train.log_every");
    t->seed = (uint64_t)lp_cfg_int(&a->cfg, "train.seed");
    t->on_progress = cli_train_progress;
    return lp_cfg_require(&a->cfg, (const char *[]){"train.out", NULL});
}

/* Layers in a store: blocks.L.<input hook> for L = 0, 1, ... */
static int store_layers(const char *dir, const lp_clt_cfg *c) {
    int L = 0;
    for (; L < 4096; L++) {
        char h[160];
        lp_store *s;
        snprintf(h, sizeof h, "blocks.%d.%s", L, c->input_hook);
        if (lp_store_open(&s, dir, h) != LP_OK) break;
        lp_store_close(s);
    }
    return L;
}

int cmd_train_clt(args *a) {
    lp_clt_train_cfg t;
    lp_status st = read_cfg(a, &t);
    int tp = (int)lp_cfg_int(&a->cfg, "dist.tp");
    if (st == LP_OK && tp > 1) /* latent sharding is the SAE trainer's (host/sae/sae_shard.c) */
        st = LP_ERR(LP_ERR_ARG, "dist.tp=%d: the transcoder-set trainer does not shard its latents (sae.kind=%s); train it with dist.tp=1", tp,
                    lp_cfg_str(&a->cfg, "sae.kind"));
    if (st != LP_OK) return cli_fail(st);
    const char *store = lp_cfg_str(&a->cfg, "data.store");
    lp_model *m = NULL;
    lp_tokens toks = {0};
    lp_clt_source *src = NULL;
    if (store) {
        t.clt.n_layers = store_layers(store, &t.clt);
        if (!t.clt.n_layers) st = LP_ERR(LP_ERR_NOT_FOUND, "data.store: %s holds no blocks.0.%s", store, t.clt.input_hook);
        if (st == LP_OK) st = lp_clt_source_store(&src, store, &t.clt, t.seed);
    } else {
        st = cli_open_model(a, &m);
        if (st == LP_OK && !strcmp(t.clt.input_hook, "mlp.hook_in")) st = lp_hooks_add_mlp_in(m);
        if (st == LP_OK) st = cli_load_tokens(a, m, &toks);
        if (st == LP_OK) t.clt.n_layers = lp_model_config(m)->n_layers;
        if (st == LP_OK && !t.clt.model_name[0]) snprintf(t.clt.model_name, sizeof t.clt.model_name, "%.127s", lp_cfg_str(&a->cfg, "model.path"));
        if (st == LP_OK)
            st = lp_clt_source_live(&src, m, &t.clt, toks.ids, toks.n_seq, toks.ctx, (int)lp_cfg_int(&a->cfg, "run.batch"), t.seed);
    }
    int D = 0, L = 0;
    if (st == LP_OK) lp_clt_source_dims(src, &L, &D), t.clt.d_model = D;
    if (st == LP_OK && t.clt.d_sae == 0) t.clt.d_sae = (int)lp_cfg_int(&a->cfg, "sae.expansion_factor") * D;
    if (st == LP_OK) st = lp_clt_train_check(&t);
    lp_ctx c;
    int have_ctx = 0;
    if (st == LP_OK) st = lp_ctx_init(&c, cli_device(lp_cfg_str(&a->cfg, "train.device")), LP_F32), have_ctx = st == LP_OK;
    lp_clt_train_report rep;
    if (st == LP_OK) st = lp_clt_train(&t, &c, lp_clt_source_next, src, &rep, NULL);
    int rc = st == LP_OK ? 0 : cli_fail(st);
    if (st == LP_OK && a->json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "out", t.out);
        cJSON_AddStringToObject(j, "kind", lp_clt_kind_name(t.clt.kind));
        cJSON_AddNumberToObject(j, "n_layers", t.clt.n_layers);
        cJSON_AddNumberToObject(j, "d_sae", t.clt.d_sae);
        cJSON_AddNumberToObject(j, "steps", (double)rep.steps);
        cJSON_AddNumberToObject(j, "tokens", (double)rep.tokens);
        cJSON_AddNumberToObject(j, "first_loss", rep.first_loss);
        cJSON_AddNumberToObject(j, "loss", rep.loss);
        cJSON_AddNumberToObject(j, "mse", rep.mse);
        cJSON_AddNumberToObject(j, "explained_variance", rep.explained_variance);
        cJSON_AddNumberToObject(j, "l0", rep.l0);
        cli_print_json(j);
    } else if (st == LP_OK) {
        printf("trained %s transcoders (%d layers, %s -> %s, d_sae %d, %s%s) on %lld tokens of %s in %lld steps, %.0f tokens/s\n",
               lp_clt_kind_name(t.clt.kind), t.clt.n_layers, t.clt.input_hook, t.clt.output_hook, t.clt.d_sae,
               lp_clt_act_name(t.clt.act), t.clt.skip ? ", skip" : "", (long long)rep.tokens, store ? store : "the live model",
               (long long)rep.steps, rep.tokens_per_s);
        printf("loss %.5g -> %.5g (last window: mse %.5g summed over layers, explained variance %.4f, L0 %.2f per layer); "
               "wrote %s/config.yaml and circuit-tracer's weight files\n",
               rep.first_loss, rep.loss, rep.mse, rep.explained_variance, rep.l0, t.out);
    }
    if (have_ctx) lp_ctx_free(&c);
    lp_clt_source_free(src);
    lp_tokens_free(&toks);
    lp_model_free(m);
    return rc;
}
