/* sweep_dist.c: how the results of a batch of `loupe attribute` / `loupe patch` travel from
 * the data-parallel rank that computed them to rank 0, which alone writes the output. A
 * single process packs and unpacks its own batches too, so both take one path.
 *
 * A packed batch (host byte order; every rank runs this same build):
 *   int32 status            0, or the lp_status of the failure, then
 *     failure: uint64 length, the message
 *     success: per pair a result, then (patch.compare_atp) the pair's AtP result and the
 *              correlations double pear[kinds], spear[kinds]; uint64 length, the lines
 *   result: double metric_clean, metric_corrupted; per node kind int32 present, and when
 *           present int32 ndim, int64 shape[3], float values[the shape's count] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/attrib.h"
#include "loupe/dist.h"
#include "cli.h"

static void put(FILE *f, const void *p, size_t n) { fwrite(p, 1, n, f); }

static void put_result(FILE *f, const lp_pair_result *r) {
    put(f, &r->metric_clean, sizeof(double)), put(f, &r->metric_corrupted, sizeof(double));
    for (int k = 0; k < LP_NODE_KINDS; k++) {
        const lp_node_scores *s = &r->s[k];
        int32_t present = s->v != NULL, nd = s->ndim;
        put(f, &present, 4);
        if (!present) continue;
        put(f, &nd, 4), put(f, s->shape, sizeof s->shape);
        put(f, s->v, (size_t)s->shape[0] * s->shape[1] * (nd == 3 ? s->shape[2] : 1) * sizeof(float));
    }
}

lp_status sweep_pack(const sweep_batch_out *b, lp_status st, char **pk, size_t *n) {
    *pk = NULL, *n = 0;
    FILE *f = open_memstream(pk, n);
    if (!f) LP_FAIL(LP_ERR_OOM, "out of memory");
    int32_t code = st;
    put(f, &code, 4);
    if (st != LP_OK) {
        const char *msg = lp_last_error();
        uint64_t len = strlen(msg);
        put(f, &len, 8), put(f, msg, len);
    } else {
        for (int i = 0; i < b->nb; i++) put_result(f, &b->res[i]);
        if (b->atp1) put_result(f, b->atp1), put(f, b->pear, LP_NODE_KINDS * sizeof(double)), put(f, b->spear, LP_NODE_KINDS * sizeof(double));
        uint64_t len = b->n_lines;
        put(f, &len, 8), put(f, b->lines, b->n_lines);
    }
    if (ferror(f) | fclose(f)) {
        free(*pk), *pk = NULL;
        LP_FAIL(LP_ERR_OOM, "out of memory for a batch's results");
    }
    return LP_OK;
}

/* A cursor over packed bytes; every read is checked against the end. */
typedef struct { const char *p, *end; } cursor;

static int get(cursor *c, void *out, size_t n) {
    if ((size_t)(c->end - c->p) < n) return 0;
    if (out) memcpy(out, c->p, n);
    c->p += n;
    return 1;
}

static int get_result(cursor *c, lp_pair_result *r) {
    memset(r, 0, sizeof *r);
    if (!get(c, &r->metric_clean, sizeof(double)) || !get(c, &r->metric_corrupted, sizeof(double))) return 0;
    for (int k = 0; k < LP_NODE_KINDS; k++) {
        lp_node_scores *s = &r->s[k];
        int32_t present, nd;
        if (!get(c, &present, 4)) return 0;
        if (!present) continue;
        if (!get(c, &nd, 4) || !get(c, s->shape, sizeof s->shape) || (nd != 2 && nd != 3)) return 0;
        s->ndim = nd;
        int64_t cnt = s->shape[0] * s->shape[1] * (nd == 3 ? s->shape[2] : 1);
        if (cnt < 0 || (size_t)cnt > (size_t)(c->end - c->p) / sizeof(float)) return 0;
        if (!(s->v = malloc((size_t)(cnt ? cnt : 1) * sizeof(float)))) return 0;
        get(c, s->v, (size_t)cnt * sizeof(float));
    }
    return 1;
}

lp_status sweep_unpack(const char *pk, size_t n, int from, sweep_batch_out *b) {
    cursor c = {pk, pk + n};
    int32_t code;
    uint64_t len;
    if (!get(&c, &code, 4)) LP_FAIL(LP_ERR_INTERNAL, "rank %d sent no results for its batch", from);
    if (code != LP_OK) {
        if (!get(&c, &len, 8) || len > (uint64_t)(c.end - c.p)) LP_FAIL(LP_ERR_INTERNAL, "rank %d failed (its error is printed by that rank)", from);
        if (from == 0) return LP_ERR((lp_status)code, "%.*s", (int)len, c.p);
        return LP_ERR((lp_status)code, "rank %d: %.*s", from, (int)len, c.p);
    }
    int ok = 1, got = 0;
    for (; ok && got < b->nb; got++) ok = get_result(&c, &b->res[got]);
    if (ok && b->atp1) ok = get_result(&c, b->atp1) && get(&c, b->pear, LP_NODE_KINDS * sizeof(double)) && get(&c, b->spear, LP_NODE_KINDS * sizeof(double));
    ok = ok && get(&c, &len, 8) && len == (uint64_t)(c.end - c.p);
    if (!ok) {
        for (int i = 0; i < got; i++) lp_pair_result_free(&b->res[i]);
        if (b->atp1) lp_pair_result_free(b->atp1);
        LP_FAIL(LP_ERR_INTERNAL, "the results rank %d sent for its batch are cut short or malformed", from);
    }
    b->lines = (char *)c.p, b->n_lines = (size_t)len;
    return LP_OK;
}

lp_status sweep_agree(lp_dist *d, lp_status st, const char *what) {
    if (lp_dist_size(d) <= 1) return st;
    int32_t bad = st != LP_OK ? lp_dist_rank(d) + 1 : 0; /* the highest failed rank, + 1 */
    lp_status a = lp_dist_allreduce_max(d, LP_DIST_WORLD, &bad, 1, LP_I32);
    if (st != LP_OK) return st;
    if (a != LP_OK) return a;
    if (bad) LP_FAIL(LP_ERR_INTERNAL, "%s: rank %d failed (its error is printed by that rank)", what, bad - 1);
    return LP_OK;
}
