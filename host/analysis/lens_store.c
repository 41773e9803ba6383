/* lens_store.c: the logit lens and DLA from an activation store (lens.h): the hooks the
 * store holds at one position of a sequence stand in for the forward's captures. */
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/safetensors.h"
#include "loupe/store.h"
#include "analysis/lens_internal.h"

enum { K_PRE, K_MID, K_POST, K_ATTN, K_MLP, K_Z, N_KIND };
static const char *const g_kind[N_KIND] = {"hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                                           "attn.hook_z"};

struct lp_lens_store {
    lp_lens_ctx *lx;
    char dir[1024];
    lp_store *embed, *pos_embed, *scale;
    lp_store **layer[N_KIND]; /* [n_layers] each; NULL where not stored */
    uint8_t *stack_have;      /* [2L + 1] */
    int have_comp, have_heads, ctx;
    int64_t n_seq;
    int32_t *tokens;          /* [n_seq, ctx] */
    lens_acts a;
};

/* The hook if the store holds it (NULL otherwise), its width checked. */
static lp_status open_opt(lp_lens_store *ls, const char *hook, int width, lp_store **out) {
    *out = NULL;
    char path[1200];
    snprintf(path, sizeof path, "%s/shard-00000.safetensors", ls->dir);
    lp_st_file f;
    LP_CHECK(lp_st_open(&f, path));
    int held = lp_st_find(&f, hook) != NULL;
    lp_st_close(&f);
    if (!held) return LP_OK;
    LP_CHECK(lp_store_open(out, ls->dir, hook));
    if (lp_store_d(*out) != width)
        LP_FAIL(LP_ERR_SHAPE, "%s: '%s' has %d values per token but the model's has %d", ls->dir, hook, lp_store_d(*out), width);
    return LP_OK;
}

/* Every shard's "tokens", in order. */
static lp_status read_tokens(lp_lens_store *ls) {
    if (ls->n_seq > INT_MAX) LP_FAIL(LP_ERR_ARG, "%s: too many sequences", ls->dir);
    if (!(ls->tokens = malloc((size_t)ls->n_seq * ls->ctx * sizeof(int32_t)))) LP_FAIL(LP_ERR_OOM, "out of memory");
    int64_t have = 0;
    for (int k = 0; have < ls->n_seq; k++) {
        char path[1200];
        snprintf(path, sizeof path, "%s/shard-%05d.safetensors", ls->dir, k);
        lp_st_file f;
        LP_CHECK(lp_st_open(&f, path));
        const lp_st_tensor *t = lp_st_find(&f, "tokens");
        lp_status st = LP_OK;
        if (!t || t->dtype != LP_I32 || t->ndim != 2 || t->shape[1] != ls->ctx || have + t->shape[0] > ls->n_seq)
            st = LP_ERR(LP_ERR_FORMAT, "%s: no I32 tokens [n_seq, %d] that fit the store", path, ls->ctx);
        else memcpy(ls->tokens + have * ls->ctx, t->data, (size_t)t->shape[0] * ls->ctx * sizeof(int32_t));
        if (st == LP_OK) have += t->shape[0];
        lp_st_close(&f);
        LP_CHECK(st);
    }
    return LP_OK;
}

/* The store was cached from this model: meta.json's model path, resolved, is model_path's. */
static lp_status same_model(const lp_lens_store *ls, const lp_store *s, const char *model_path) {
    const char *rec = lp_store_model(s);
    if (!model_path || !rec || !rec[0]) return LP_OK;
    char a[PATH_MAX], b[PATH_MAX];
    if (!realpath(rec, a)) snprintf(a, sizeof a, "%s", rec);
    if (!realpath(model_path, b)) snprintf(b, sizeof b, "%s", model_path);
    if (strcmp(a, b) != 0) LP_FAIL(LP_ERR_ARG, "%s: the store was cached from %s (meta.json), not from %s", ls->dir, rec, model_path);
    return LP_OK;
}

static lp_status open_hooks(lp_lens_store *ls, const char *model_path) {
    const lp_config *c = lp_model_config(ls->lx->m);
    int L = c->n_layers, D = c->d_model, qD = c->n_heads * c->d_head;
    char nm[96];
    for (int k = 0; k < N_KIND; k++)
        if (!(ls->layer[k] = calloc(L, sizeof(lp_store *)))) LP_FAIL(LP_ERR_OOM, "out of memory");
    if (!(ls->stack_have = calloc(2 * L + 1, 1))) LP_FAIL(LP_ERR_OOM, "out of memory");
    snprintf(nm, sizeof nm, "blocks.%d.hook_resid_post", L - 1);
    LP_CHECK(open_opt(ls, nm, D, &ls->layer[K_POST][L - 1]));
    if (!ls->layer[K_POST][L - 1])
        LP_FAIL(LP_ERR_NOT_FOUND, "%s: the store has no %s, which the lens needs (cache it with data.hooks)", ls->dir, nm);
    lp_store *fin = ls->layer[K_POST][L - 1];
    ls->n_seq = lp_store_n_tokens(fin) / lp_store_context(fin), ls->ctx = lp_store_context(fin);
    LP_CHECK(same_model(ls, fin, model_path));
    for (int l = 0; l < L; l++)
        for (int k = 0; k < N_KIND; k++) {
            if (k == K_POST && l == L - 1) continue;
            snprintf(nm, sizeof nm, "blocks.%d.%s", l, g_kind[k]);
            LP_CHECK(open_opt(ls, nm, k == K_Z ? qD : D, &ls->layer[k][l]));
        }
    LP_CHECK(open_opt(ls, "hook_embed", D, &ls->embed));
    if (lp_hook_find(ls->lx->m, "hook_pos_embed") >= 0) LP_CHECK(open_opt(ls, "hook_pos_embed", D, &ls->pos_embed));
    LP_CHECK(open_opt(ls, "ln_final.hook_scale", 1, &ls->scale));
    ls->have_comp = ls->embed && (ls->pos_embed || lp_hook_find(ls->lx->m, "hook_pos_embed") < 0);
    ls->have_heads = 1;
    for (int l = 0; l < L; l++) {
        ls->have_comp &= ls->layer[K_ATTN][l] && ls->layer[K_MLP][l];
        ls->have_heads &= ls->layer[K_Z][l] != NULL;
        ls->stack_have[2 * l] = ls->layer[K_PRE][l] || (l > 0 && ls->layer[K_POST][l - 1]);
        ls->stack_have[2 * l + 1] = ls->layer[K_MID][l] != NULL;
    }
    ls->stack_have[2 * L] = 1;
    return LP_OK;
}

lp_status lp_lens_store_open(lp_lens_store **out, lp_lens_ctx *lx, const char *dir, const char *model_path) {
    *out = NULL;
    LP_CHECK(lp_store_require_complete(dir));
    lp_lens_store *ls = calloc(1, sizeof *ls);
    if (!ls) LP_FAIL(LP_ERR_OOM, "out of memory");
    ls->lx = lx;
    snprintf(ls->dir, sizeof ls->dir, "%s", dir);
    lp_status st = open_hooks(ls, model_path);
    if (st == LP_OK) st = read_tokens(ls);
    if (st == LP_OK) st = lens_acts_alloc(lx, &ls->a);
    if (st != LP_OK) {
        lp_lens_store_close(ls);
        return st;
    }
    ls->a.have_scale = ls->scale != NULL, ls->a.have_comp = ls->have_comp, ls->a.have_heads = ls->have_heads;
    ls->a.stack_have = ls->stack_have;
    *out = ls;
    return LP_OK;
}

void lp_lens_store_close(lp_lens_store *ls) {
    if (!ls) return;
    int L = lp_model_config(ls->lx->m)->n_layers;
    for (int k = 0; k < N_KIND; k++) {
        for (int l = 0; ls->layer[k] && l < L; l++) lp_store_close(ls->layer[k][l]);
        free(ls->layer[k]);
    }
    lp_store_close(ls->embed), lp_store_close(ls->pos_embed), lp_store_close(ls->scale);
    free(ls->stack_have), free(ls->tokens), free(ls->a.embed);
    free(ls);
}

int64_t lp_lens_store_n_seq(const lp_lens_store *ls) { return ls->n_seq; }
int lp_lens_store_context(const lp_lens_store *ls) { return ls->ctx; }
const int32_t *lp_lens_store_tokens(const lp_lens_store *ls, int64_t seq) { return ls->tokens + seq * ls->ctx; }

/* Token t of s into dst, when stored. */
static lp_status rd(const lp_store *s, int64_t t, float *dst) { return s ? lp_store_read(s, t, 1, dst) : LP_OK; }

static lp_status read_at(lp_lens_store *ls, int64_t t) {
    const lp_config *c = lp_model_config(ls->lx->m);
    size_t D = c->d_model, qD = (size_t)c->n_heads * c->d_head;
    lens_acts *a = &ls->a;
    int L = c->n_layers;
    LP_CHECK(rd(ls->layer[K_POST][L - 1], t, a->final));
    LP_CHECK(rd(ls->embed, t, a->embed));
    LP_CHECK(rd(ls->pos_embed, t, a->pos_embed));
    LP_CHECK(rd(ls->scale, t, &a->scale));
    for (int l = 0; l < L; l++) {
        /* resid_pre of layer l is resid_post of layer l - 1 when only that is stored */
        LP_CHECK(rd(ls->layer[K_PRE][l] ? ls->layer[K_PRE][l] : l ? ls->layer[K_POST][l - 1] : NULL, t, a->pre + D * l));
        LP_CHECK(rd(ls->layer[K_MID][l], t, a->mid + D * l));
        LP_CHECK(rd(ls->layer[K_ATTN][l], t, a->attn + D * l));
        LP_CHECK(rd(ls->layer[K_MLP][l], t, a->mlp + D * l));
        LP_CHECK(rd(ls->layer[K_Z][l], t, a->z + qD * l));
    }
    return LP_OK;
}

lp_status lp_lens_store_run(lp_lens_store *ls, int64_t seq, const lp_lens_opts *o, lp_lens *r) {
    memset(r, 0, sizeof *r);
    const lp_config *c = lp_model_config(ls->lx->m);
    if (seq < 0 || seq >= ls->n_seq) LP_FAIL(LP_ERR_ARG, "%s: sequence %lld is not in [0, %lld)", ls->dir, (long long)seq, (long long)ls->n_seq);
    if (o->pos < -1 || o->pos >= ls->ctx) LP_FAIL(LP_ERR_ARG, "lens.position: %d is outside the stored sequences of %d tokens", o->pos, ls->ctx);
    if (o->answer < -1 || o->answer >= c->d_vocab) LP_FAIL(LP_ERR_ARG, "lens: answer %d is not a token id in [0, %d)", o->answer, c->d_vocab);
    if (o->wrong < -1 || o->wrong >= c->d_vocab) LP_FAIL(LP_ERR_ARG, "lens: wrong answer %d is not a token id in [0, %d)", o->wrong, c->d_vocab);
    if (o->top_k < 0 || o->top_k > c->d_vocab) LP_FAIL(LP_ERR_ARG, "lens: top_k %d is not in [0, %d]", o->top_k, c->d_vocab);
    lens_header(ls->lx, ls->ctx, o, r);
    LP_CHECK(read_at(ls, seq * ls->ctx + r->pos));
    float *logits = malloc((size_t)c->d_vocab * sizeof *logits);
    if (!logits) LP_FAIL(LP_ERR_OOM, "out of memory");
    lp_status st = lens_final_logits(ls->lx, &ls->a, logits);
    if (st == LP_OK) lens_pick(r, logits);
    free(logits);
    if (st == LP_OK) st = lens_compute(ls->lx, &ls->a, o->keep_logits, r);
    if (st != LP_OK) lp_lens_free(r);
    return st;
}
