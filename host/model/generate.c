/* generate.c: generation with a KV cache, with the hooks' edits active.
 *
 * The prompt runs as one forward that fills the cache, then each new token runs alone
 * against it. Edits apply at absolute positions (hooks.h): a step's rows are positions
 * gen_pos0 .. gen_pos0 + n - 1 of the whole sequence, so an edit restricted to position p
 * applies once, in the pass that computes position p, and what it changed (a key, a value,
 * a residual that later keys were computed from) stays in the cache exactly as a forward
 * over the whole sequence with the same edit would have computed it. Edits of the
 * attention scores or pattern need every query against every key, which the cached step
 * never forms: then every step recomputes the whole sequence without the cache. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/ops.h"
#include "model/arch.h"
#include "model/blocks.h"
#include "core/rng.h"

typedef struct { float p; int id; } cand;
static int cand_desc(const void *a, const void *b) {
    float x = ((const cand *)a)->p, y = ((const cand *)b)->p;
    return x < y ? 1 : x > y ? -1 : ((const cand *)a)->id - ((const cand *)b)->id;
}

/* Greedy at temperature 0; otherwise softmax(logits / T), cut to the smallest set of
 * most likely tokens whose mass reaches top_p, renormalised, sampled. */
static int32_t pick(const float *logits, int V, const lp_gen_opts *o, uint64_t *rng, cand *scratch) {
    int best = 0;
    for (int i = 1; i < V; i++)
        if (logits[i] > logits[best]) best = i;
    if (o->temperature <= 0) return best;
    double sum = 0, mx = logits[best];
    for (int i = 0; i < V; i++) {
        scratch[i].p = (float)exp((logits[i] - mx) / o->temperature);
        scratch[i].id = i;
        sum += scratch[i].p;
    }
    int n = V;
    double mass = sum;
    if (o->top_p > 0 && o->top_p < 1) {
        qsort(scratch, V, sizeof *scratch, cand_desc);
        double acc = 0;
        for (n = 0; n < V;) {
            acc += scratch[n++].p;
            if (acc >= o->top_p * sum) break;
        }
        mass = acc;
    }
    double u = rng_uniform(rng) * mass, acc = 0;
    for (int i = 0; i < n; i++) {
        acc += scratch[i].p;
        if (u < acc) return scratch[i].id;
    }
    return scratch[n - 1].id;
}

static int edited(const lp_model *m, int id) { return id >= 0 && m->hooks[id].edits != NULL; }

/* Whether an edit needs the scores or pattern, which only a whole-sequence forward forms. */
static int needs_whole_sequence(const lp_model *m) {
    for (int L = 0; L < m->cfg.n_layers; L++)
        if (edited(m, hook_id(m, HK_SCORES, L)) || edited(m, hook_id(m, HK_PATTERN, L))) return 1;
    return 0;
}

/* Refuses, before any work, a patch that generation up to position `to` would outrun. */
static lp_status check_patches(const lp_model *m, int to) {
    for (int id = 0; id < m->n_hooks; id++)
        if (m->hooks[id].edits) LP_CHECK(gen_patch_check(m, id, 0, to));
    return LP_OK;
}

/* One forward of in[0..n) (positions m->kv.pos0.., or 0.. without the cache) through the
 * final norm, then the logits of its last row into m->res.logits. */
static lp_status step(lp_model *m, const int32_t *in, int n) {
    lp_ctx *c = &m->ctx;
    const lp_config *cf = &m->cfg;
    size_t es = act_elem_bytes(m), V = cf->d_vocab;
    m->res.B = 1, m->res.T = n;
    LP_CHECK(lp_ctx_to_device(c, m->a.tok, in, (size_t)n * sizeof(int32_t)));
    LP_CHECK(m->arch->forward(m, 1, n, LP_WANT_FINAL_NORM));
    const char *row;
    if (edited(m, hook_id(m, HK_UNEMBED_OUT, cf->n_layers))) {
        row = (const char *)m->a.logits + (size_t)(n - 1) * V * es; /* the unembed made every row, edited */
    } else {
        const char *x = (const char *)m->a.ln_out + (size_t)(n - 1) * cf->d_model * es;
        LP_CHECK(tp_logits_of(m, m->a.logits, x, 1)); /* every rank the whole row (TP: gathered) */
        if (cf->final_softcap > 0) LP_CHECK(lp_softcap(c, m->a.logits, m->a.logits, cf->final_softcap, V));
        row = m->a.logits;
    }
    if (c->device == LP_CPU) {
        memcpy(m->res.logits, row, V * sizeof(float));
        return LP_OK;
    }
    LP_CHECK(lp_ctx_to_host(c, m->a.logit_stage, row, V * es));
    return lp_convert_host(m->res.logits, LP_F32, m->a.logit_stage, c->dtype, V);
}

static lp_status check_opts(const lp_model *m, const int32_t *prompt, int n_prompt, const lp_gen_opts *o) {
    const lp_config *cf = &m->cfg;
    if (n_prompt < 1) LP_FAIL(LP_ERR_ARG, "generate: the prompt is empty");
    if (o->max_tokens < 0) LP_FAIL(LP_ERR_ARG, "generate: max_tokens %d is negative", o->max_tokens);
    if (!(o->temperature >= 0) || !(o->top_p > 0 && o->top_p <= 1))
        LP_FAIL(LP_ERR_ARG, "generate: temperature must be >= 0 and top_p in (0, 1] (got %g and %g)", o->temperature, o->top_p);
    if ((long long)n_prompt + o->max_tokens > cf->n_ctx) /* in 64 bits: a huge max_tokens must not wrap */
        LP_FAIL(LP_ERR_ARG, "generate: the prompt (%d tokens) plus %d new tokens exceeds the model's context of %d", n_prompt,
                o->max_tokens, cf->n_ctx);
    for (int i = 0; i < n_prompt; i++)
        if (prompt[i] < 0 || prompt[i] >= cf->d_vocab) LP_FAIL(LP_ERR_ARG, "generate: prompt token %d is not in [0, %d)", prompt[i], cf->d_vocab);
    return LP_OK;
}

/* The cache (unless every step reruns the sequence), rotary tables, activations and one
 * row of host logits for a prompt of n_prompt and cap positions in all. */
static lp_status reserve(lp_model *m, int n_prompt, int cap, int whole) {
    lp_ctx *c = &m->ctx;
    const lp_config *cf = &m->cfg;
    size_t kvD = (size_t)cf->n_kv_heads * cf->d_head;
    if (!whole && cap > m->kv.cap) {
        lp_ctx_release(c, m->kv.mem);
        m->kv.mem = NULL, m->kv.cap = 0;
        LP_CHECK(lp_ctx_alloc(c, 2 * (size_t)cf->n_layers * cap * kvD * act_elem_bytes(m), &m->kv.mem));
        m->kv.cap = cap;
    }
    LP_CHECK(rope_tables_grow(m, cap));
    LP_CHECK(lp_model_prepare(m, 1, whole ? cap : n_prompt));
    if (m->res.logits_rows < 1) {
        free(m->res.logits);
        m->res.logits = malloc((size_t)cf->d_vocab * sizeof(float));
        if (!m->res.logits) LP_FAIL(LP_ERR_OOM, "out of host memory for logits");
        m->res.logits_rows = 1;
    }
    return LP_OK;
}

lp_status lp_generate(lp_model *m, const int32_t *prompt, int n_prompt, const lp_gen_opts *o, int32_t *out, int *n_out) {
    *n_out = 0;
    LP_CHECK(check_opts(m, prompt, n_prompt, o));
    int cap = n_prompt + o->max_tokens, whole = needs_whole_sequence(m), V = m->cfg.d_vocab;
    LP_CHECK(check_patches(m, cap));
    LP_CHECK(reserve(m, n_prompt, cap, whole));
    cand *scratch = o->temperature > 0 ? malloc((size_t)V * sizeof *scratch) : NULL;
    int32_t *seq = whole ? malloc((size_t)cap * sizeof *seq) : NULL;
    if ((o->temperature > 0 && !scratch) || (whole && !seq)) {
        free(scratch);
        LP_FAIL(LP_ERR_OOM, "out of memory for generation");
    }
    if (seq) memcpy(seq, prompt, (size_t)n_prompt * sizeof *seq);
    uint64_t rng = o->seed;
    lp_status st = LP_OK;
    while (*n_out < o->max_tokens) {
        int k = *n_out;
        m->kv.generating = 1;
        if (whole) { /* the whole sequence so far, without the cache */
            m->kv.pos0 = -1;
            st = step(m, seq, n_prompt + k);
        } else { /* the prompt fills the cache; then the last new token alone at its position */
            m->kv.pos0 = k ? n_prompt + k - 1 : 0;
            st = step(m, k ? &out[k - 1] : prompt, k ? 1 : n_prompt);
        }
        m->kv.generating = 0, m->kv.pos0 = -1;
        if (st != LP_OK) break;
        if (o->on_logits && (st = o->on_logits(k, m->res.logits, V, o->user)) != LP_OK) break;
        int32_t tok = pick(m->res.logits, V, o, &rng, scratch);
        out[(*n_out)++] = tok;
        if (seq) seq[n_prompt + k] = tok;
        if (o->on_token && (st = o->on_token(tok, o->user)) != LP_OK) break;
        if (tok == o->stop_token) break;
    }
    free(scratch);
    free(seq);
    /* no capture describes these steps: lp_capture_get refuses until the next forward */
    m->res.B = m->res.T = 0;
    m->res.have_logits = 0;
    return st;
}
