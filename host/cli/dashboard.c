/* dashboard.c: `loupe dashboard SAE --data.store=DIR --dash.out=DIR`: feature dashboards
 * of an SAE's latents over an activation store (host/cli/dashboard.c), written under the
 * output directory's lock as dashboard.html (one self-contained page) and Neuronpedia's
 * batch JSON (batch-0.json, batch-1.json, ... of dash.np_batch latents each). The model
 * (model.path, else the one the store's meta.json names, when it is on disk) gives the
 * token strings and the unembedding for the logit tables; without one tokens show as
 * #id and there are no logit tables. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loupe/dashboard.h"
#include "loupe/output.h"
#include "loupe/store.h"
#include "cli.h"

typedef struct dash_job {
    lp_ctx c;
    lp_sae *s;
    lp_model *m;
    lp_tokenizer *tk;
    float *W_U, *ln_w;
    int32_t *latents;
    lp_dash *d;
    const char *model;
    int d_vocab;
    char note[256];
} dash_job;

/* A direction written into the residual stream can be read through the unembedding. */
static int in_residual(const char *hook) {
    return strstr(hook, "resid") || strstr(hook, "hook_mlp_out") || strstr(hook, "hook_attn_out");
}

static lp_status open_model(const args *a, dash_job *j, const char *hook, const char *store) {
    j->model = lp_cfg_str(&a->cfg, "model.path");
    if (!j->model) { /* the store's own model, when it is still where meta.json says */
        lp_store *in = NULL;
        if (lp_store_open(&in, store, hook) == LP_OK && lp_store_model(in)[0] && access(lp_store_model(in), R_OK) == 0)
            j->model = strdup(lp_store_model(in));
        lp_store_close(in);
        if (!j->model) {
            snprintf(j->note, sizeof j->note, "no model (model.path): tokens as #id, no logit tables");
            return LP_OK;
        }
    }
    LP_CHECK(lp_tokenizer_load(&j->tk, j->model));
    if (!in_residual(hook)) {
        snprintf(j->note, sizeof j->note, "no logit tables: %s is not in the residual stream", hook);
        return LP_OK;
    }
    LP_CHECK(lp_model_load(&j->m, j->model, LP_CPU, LP_F32));
    const lp_config *mc = lp_model_config(j->m);
    if (mc->d_model != j->s->cfg.d_in)
        LP_FAIL(LP_ERR_SHAPE, "model.path: %s has d_model %d but the SAE's d_in is %d", j->model, mc->d_model, j->s->cfg.d_in);
    j->W_U = malloc((size_t)mc->d_vocab * mc->d_model * sizeof(float));
    j->ln_w = malloc((size_t)mc->d_model * sizeof(float));
    if (!j->W_U || !j->ln_w) LP_FAIL(LP_ERR_OOM, "out of memory for the unembedding");
    j->d_vocab = mc->d_vocab;
    lp_status st = lp_model_unembed_weights(j->m, j->W_U, j->ln_w);
    lp_model_free(j->m); /* only the unembedding is needed */
    j->m = NULL;
    return st;
}

/* "blocks.N." gives Neuronpedia's layer; -1 when the hook has none. */
static int hook_layer(const char *hook) {
    int l;
    return sscanf(hook, "blocks.%d.", &l) == 1 ? l : -1;
}

static lp_status write_outputs(const args *a, dash_job *j, const char *out, int *n_files) {
    char path[1200], title[512];
    const char *sae = lp_cfg_str(&a->cfg, "sae.path"), *slash = strrchr(sae, '/');
    const char *base = slash && slash[1] ? slash + 1 : sae;
    snprintf(title, sizeof title, "%s \xc2\xb7 %s \xc2\xb7 %d latents", base, j->d->hook, j->d->n);
    snprintf(path, sizeof path, "%s/dashboard.html", out);
    LP_CHECK(lp_dash_write_html(j->d, j->tk, title, path));
    int per = (int)lp_cfg_int(&a->cfg, "dash.np_batch");
    const char *model_id = j->s->cfg.model_name[0] ? j->s->cfg.model_name : j->model ? j->model : "";
    *n_files = 0;
    for (int first = 0; first < j->d->n; first += per, (*n_files)++) {
        snprintf(path, sizeof path, "%s/batch-%d.json", out, *n_files);
        int n = j->d->n - first < per ? j->d->n - first : per;
        LP_CHECK(lp_dash_write_neuronpedia(j->d, j->tk, model_id, hook_layer(j->d->hook), base, first, n, path));
    }
    return LP_OK;
}

static void report(const args *a, const dash_job *j, const char *out, int n_files) {
    const lp_dash *d = j->d;
    int dead = 0, densest = 0;
    for (int i = 0; i < d->n; i++) {
        dead += d->lat[i].fires == 0;
        if (d->lat[i].density > d->lat[densest].density) densest = i;
    }
    double lps = d->seconds_pass > 0 ? d->n / d->seconds_pass : 0;
    if (a->json) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "out", out);
        cJSON_AddStringToObject(o, "hook", d->hook);
        cJSON_AddNumberToObject(o, "latents", d->n);
        cJSON_AddNumberToObject(o, "tokens", (double)d->n_tokens);
        cJSON_AddNumberToObject(o, "dead", dead);
        cJSON_AddNumberToObject(o, "seconds", d->seconds_pass);
        cJSON_AddNumberToObject(o, "latents_per_s", lps);
        cJSON_AddNumberToObject(o, "neuronpedia_batches", n_files);
        cli_print_json(o);
        return;
    }
    if (j->note[0]) printf("note: %s\n", j->note);
    printf("dashboards of %d latents over %lld tokens of %s (%s): one pass in %.2f s, %.0f latents/s, %.0f tokens/s\n", d->n,
           (long long)d->n_tokens, lp_cfg_str(&a->cfg, "data.store"), d->hook, d->seconds_pass, lps,
           d->seconds_pass > 0 ? d->n_tokens / d->seconds_pass : 0);
    printf("never fired: %d; densest: latent %d (%.3g%% of tokens, max %.3g)\n", dead, d->lat[densest].latent,
           100 * d->lat[densest].density, d->lat[densest].max);
    printf("wrote %s/dashboard.html and %d Neuronpedia batch file%s (%s/batch-0.json ...)\n", out, n_files, n_files == 1 ? "" : "s", out);
}

int cmd_dashboard(args *a) {
    lp_status st = lp_cfg_require(&a->cfg, (const char *[]){"sae.path", "data.store", "dash.out", NULL});
    if (st != LP_OK) return cli_fail(st);
    const char *store = lp_cfg_str(&a->cfg, "data.store"), *out = lp_cfg_str(&a->cfg, "dash.out");
    dash_job j = {0};
    lp_lock lock = {.fd = -1};
    if ((st = lp_ctx_init(&j.c, cli_device(lp_cfg_str(&a->cfg, "train.device")), LP_F32)) != LP_OK) return cli_fail(st);
    if (strcmp(lp_cfg_str(&a->cfg, "data.allow_incomplete"), "true") != 0) st = lp_store_require_complete(store);
    if (st == LP_OK) st = lp_sae_load(&j.s, &j.c, lp_cfg_str(&a->cfg, "sae.path"));
    lp_dash_opts o;
    lp_dash_defaults(&o);
    int n_lat = 0;
    if (st == LP_OK) st = lp_dash_parse_latents(lp_cfg_str(&a->cfg, "dash.latents"), j.s->cfg.d_sae, "dash.latents", &j.latents, &n_lat);
    const char *hook = lp_cfg_str(&a->cfg, "data.hook");
    if (st == LP_OK && !(hook && hook[0])) hook = j.s->cfg.hook_name;
    if (st == LP_OK) st = open_model(a, &j, hook, store);
    if (st == LP_OK) st = lp_lock_output(&lock, out, 1);
    if (st == LP_OK) st = lp_remove_stale_tmp(out);
    o.store = store, o.hook = hook, o.latents = j.latents, o.n_latents = n_lat;
    o.top = (int)lp_cfg_int(&a->cfg, "dash.top"), o.left = (int)lp_cfg_int(&a->cfg, "dash.left");
    o.right = (int)lp_cfg_int(&a->cfg, "dash.right"), o.samples = (int)lp_cfg_int(&a->cfg, "dash.samples");
    o.n_logits = (int)lp_cfg_int(&a->cfg, "dash.logits"), o.skip_positions = (int)lp_cfg_int(&a->cfg, "dash.skip_positions");
    o.batch_tokens = (int)lp_cfg_int(&a->cfg, "dash.batch_tokens"), o.seed = (uint64_t)lp_cfg_int(&a->cfg, "dash.seed");
    if (j.W_U) o.W_U = j.W_U, o.ln_final_w = j.ln_w, o.d_vocab = j.d_vocab;
    int n_files = 0;
    if (st == LP_OK) st = lp_dash_run(j.s, &j.c, &o, &j.d);
    if (st == LP_OK) st = write_outputs(a, &j, out, &n_files);
    int rc = st == LP_OK ? 0 : cli_fail(st);
    if (rc == 0) report(a, &j, out, n_files);
    lp_lock_release(&lock);
    lp_dash_free(j.d);
    if (j.model != lp_cfg_str(&a->cfg, "model.path")) free((void *)j.model);
    free(j.latents), free(j.W_U), free(j.ln_w);
    lp_tokenizer_free(j.tk);
    lp_model_free(j.m);
    lp_sae_free(j.s, &j.c);
    lp_ctx_free(&j.c);
    return rc;
}
