/* run.c: the commands on a model alone: `loupe info` (architecture, parameters, hook
 * shapes), `loupe run` (mean next-token loss), `loupe cache` (an activation store) and
 * `loupe tokenize` (text to token ids). */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loupe/config.h"
#include "loupe/hooks.h"
#include "loupe/model.h"
#include "loupe/safetensors.h"
#include "loupe/store.h"
#include "loupe/tokens.h"
#include "cli.h"

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

int cmd_info(args *a) {
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

int cmd_run(args *a) {
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
    if (!seq_loss) st = LP_ERR(LP_ERR_OOM, "out of memory");
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

int cmd_cache(args *a) {
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
        printf("cached %d hook%s for %lld sequences (%lld tokens) into %s: %d shard%s", rep.n_hooks, rep.n_hooks == 1 ? "" : "s",
               (long long)rep.n_sequences, (long long)rep.n_tokens, lp_cfg_str(&a->cfg, "cache.out"), rep.n_shards,
               rep.n_shards == 1 ? "" : "s");
        if (rep.resumed_sequences) printf(", %lld sequences were already there", (long long)rep.resumed_sequences);
        printf(", %.0f tokens/s on %s\n", rep.tokens_per_s, cli_dev_name(m));
    }
    lp_tokens_free(&t);
    lp_model_free(m);
    return rc;
}

int cmd_tokenize(args *a) {
    lp_status st = lp_cfg_require(&a->cfg, (const char *[]){"model.path", "data.text", "tokenize.out", NULL});
    int32_t *ids = NULL;
    size_t n = 0, bytes = 0;
    double t0 = cli_now();
    if (st == LP_OK) st = cli_tokenize_file(a, lp_cfg_str(&a->cfg, "data.text"), &ids, &n, &bytes, NULL);
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
