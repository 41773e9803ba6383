/* circuit.c: the circuit of an edge-attribution sweep: every pair's edge scores in
 * attrib.out (scores-eap-*.safetensors) averaged, the attrib.top_edges edges by |mean| kept,
 * and written as circuit.json and as circuit.html, a self-contained page (no network) that
 * draws them as a layered graph in SVG: the embeddings at the bottom, each layer's heads then
 * its MLP above, the logits on top; blue edges raise the metric when corrupted, red ones
 * lower it, and the width is |score|. */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/output.h"
#include "loupe/paths.h"
#include "loupe/safetensors.h"
#include "cli.h"

/* The sum of every pair's edge scores in dir into sum [ns * nr]. */
static lp_status gather(const char *dir, int ns, int nr, double *sum, int *n_pairs) {
    DIR *d = opendir(dir);
    if (!d) LP_FAIL(LP_ERR_IO, "%s: cannot list the scores files", dir);
    struct dirent *e;
    lp_status st = LP_OK;
    while (st == LP_OK && (e = readdir(d))) {
        size_t len = strlen(e->d_name);
        if (strncmp(e->d_name, "scores-eap-", 11) != 0 || len < 12 || strcmp(e->d_name + len - 12, ".safetensors") != 0) continue;
        char path[1400];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        lp_st_file f;
        if ((st = lp_st_open(&f, path)) != LP_OK) break;
        for (int i = 0; i < f.n; i++) {
            const lp_st_tensor *t = &f.tensors[i];
            size_t nl = strlen(t->name);
            if (nl < 10 || strcmp(t->name + nl - 10, ".eap.edges") != 0) continue;
            if (t->dtype != LP_F32 || t->ndim != 2 || t->shape[0] != ns || t->shape[1] != nr) {
                st = LP_ERR(LP_ERR_FORMAT, "%s: %s is not [%d, %d] F32 (another model's?)", path, t->name, ns, nr);
                break;
            }
            const float *v = t->data;
            for (size_t k = 0; k < (size_t)ns * nr; k++) sum[k] += v[k];
            (*n_pairs)++;
        }
        lp_st_close(&f);
    }
    closedir(d);
    return st;
}

/* The graph node a receiver belongs to (a head's q/k/v: the head) and its row in the drawing. */
static void recv_node(const lp_model *m, int j, char *buf, size_t n) {
    lp_path_receiver_name(m, j, buf, n);
    size_t l = strlen(buf);
    if (l > 2 && buf[l - 2] == '.' && strchr("qkv", buf[l - 1])) buf[l - 2] = 0;
}

static int node_row(const char *id, int nL) {
    int L;
    if (strcmp(id, "embed") == 0) return 0;
    if (strcmp(id, "logits") == 0) return 2 * nL + 1;
    if (sscanf(id, "blocks.%d.", &L) != 1) return 0;
    return strstr(id, ".mlp") ? 2 + 2 * L : 1 + 2 * L;
}

typedef struct cedge { double s; int i, j; } cedge;
static int by_abs(const void *x, const void *y) {
    double a = fabs(((const cedge *)x)->s), b = fabs(((const cedge *)y)->s);
    return a < b ? 1 : a > b ? -1 : 0;
}

typedef struct node { char id[96]; int row; double x, y; } node;

static int node_add(node *nd, int *n, const char *id, int nL) {
    for (int i = 0; i < *n; i++)
        if (strcmp(nd[i].id, id) == 0) return i;
    snprintf(nd[*n].id, sizeof nd[*n].id, "%s", id);
    nd[*n].row = node_row(id, nL);
    return (*n)++;
}

static int by_id(const void *x, const void *y) { return strcmp(((const node *)x)->id, ((const node *)y)->id); }

static lp_status write_html(const char *path, const char *title, const node *nd, int nn, const cedge *e, int ne, const int (*ends)[2], int nL) {
    int rows = 2 * nL + 2, W = 1100, RH = 70, Hh = rows * RH + 60;
    double mx = 0;
    for (int k = 0; k < ne; k++) mx = fmax(mx, fabs(e[k].s));
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) LP_FAIL(LP_ERR_OOM, "out of memory");
    fprintf(f, "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>%s</title>\n<style>body{font:13px sans-serif;margin:16px;color:#222}"
               "text{font:11px sans-serif}line:hover{stroke-opacity:1}</style></head><body>\n<h3>%s</h3>\n"
               "<p>%d edges by |mean score|; blue: corrupting the edge raises the metric, red: lowers it; width: |score| (max %.4g). "
               "Hover an edge for its score.</p>\n<svg width=\"%d\" height=\"%d\" xmlns=\"http://www.w3.org/2000/svg\">\n",
            title, title, ne, mx, W, Hh);
    for (int r = 0; r < rows; r++) {
        const char *lab = r == 0 ? "embed" : r == rows - 1 ? "logits" : r % 2 ? "attn" : "mlp";
        fprintf(f, "<text x=\"4\" y=\"%d\" fill=\"#888\">%s%s</text>\n", Hh - 30 - r * RH + 4, lab, "");
        if (r > 0 && r < rows - 1) fprintf(f, "<text x=\"40\" y=\"%d\" fill=\"#888\">L%d</text>\n", Hh - 30 - r * RH + 4, (r - 1) / 2);
    }
    for (int k = 0; k < ne; k++) {
        const node *a = &nd[ends[k][0]], *b = &nd[ends[k][1]];
        double w = mx > 0 ? 0.5 + 7.0 * fabs(e[k].s) / mx : 1;
        fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"%.2f\" stroke-opacity=\"0.6\">"
                   "<title>%s -&gt; %s: %.5g</title></line>\n",
                a->x, a->y, b->x, b->y, e[k].s >= 0 ? "#2563eb" : "#dc2626", w, a->id, b->id, e[k].s);
    }
    for (int i = 0; i < nn; i++) {
        const char *s = strrchr(nd[i].id, '.') ? nd[i].id : nd[i].id;
        int L, h;
        char lab[32];
        if (sscanf(s, "blocks.%d.attn.head.%d", &L, &h) == 2) snprintf(lab, sizeof lab, "a%d.%d", L, h);
        else if (sscanf(s, "blocks.%d.attn.kv_head.%d", &L, &h) == 2) snprintf(lab, sizeof lab, "kv%d.%d", L, h);
        else if (sscanf(s, "blocks.%d.mlp", &L) == 1) snprintf(lab, sizeof lab, "m%d", L);
        else snprintf(lab, sizeof lab, "%s", s);
        fprintf(f, "<g><title>%s</title><rect x=\"%.1f\" y=\"%.1f\" width=\"56\" height=\"20\" rx=\"4\" fill=\"#f3f4f6\" stroke=\"#555\"/>"
                   "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text></g>\n",
                nd[i].id, nd[i].x - 28, nd[i].y - 10, nd[i].x, nd[i].y + 4, lab);
    }
    fprintf(f, "</svg>\n</body></html>\n");
    if (fclose(f) != 0) return free(buf), LP_ERR(LP_ERR_OOM, "out of memory");
    lp_status st = lp_write_file_atomic(path, buf, len);
    free(buf);
    return st;
}

/* Places the nodes: one row per depth, evenly spread, in name order. */
static void layout(node *nd, int nn, int nL) {
    int rows = 2 * nL + 2, W = 1100, RH = 70, Hh = rows * RH + 60;
    for (int r = 0; r < rows; r++) {
        int c = 0, k = 0;
        for (int i = 0; i < nn; i++) c += nd[i].row == r;
        for (int i = 0; i < nn; i++)
            if (nd[i].row == r) nd[i].x = 80 + (W - 120) * (k++ + 0.5) / c, nd[i].y = Hh - 30 - r * RH;
    }
}

lp_status cli_circuit_write(const args *a, lp_model *m, const char *dir, int *n_pairs) {
    int ns = lp_path_n_senders(m), nr = lp_path_n_receivers(m), nL = lp_model_config(m)->n_layers, top = (int)lp_cfg_int(&a->cfg, "attrib.top_edges");
    double *sum = calloc((size_t)ns * nr, sizeof(double));
    cedge *e = malloc((size_t)ns * nr * sizeof *e);
    node *nd = calloc(2 * (size_t)(top + 1), sizeof *nd);
    int (*ends)[2] = calloc(top + 1, sizeof *ends);
    *n_pairs = 0;
    lp_status st = sum && e && nd && ends ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory");
    if (st == LP_OK) st = gather(dir, ns, nr, sum, n_pairs);
    int ne = 0, nn = 0;
    for (int i = 0; st == LP_OK && i < ns; i++)
        for (int j = 0; j < nr; j++)
            if (lp_path_is_edge(m, i, j)) e[ne++] = (cedge){*n_pairs ? sum[(size_t)i * nr + j] / *n_pairs : 0, i, j};
    if (st == LP_OK) qsort(e, ne, sizeof *e, by_abs);
    if (ne > top) ne = top;
    cJSON *j = cJSON_CreateObject(), *jn = cJSON_CreateArray(), *je = cJSON_CreateArray();
    char sn[96], rn[96], rnode[96];
    /* the nodes of the kept edges, then their places */
    for (int k = 0; st == LP_OK && k < ne; k++) {
        lp_path_sender_name(m, e[k].i, sn, sizeof sn), recv_node(m, e[k].j, rnode, sizeof rnode);
        node_add(nd, &nn, sn, nL), node_add(nd, &nn, rnode, nL);
    }
    qsort(nd, nn, sizeof *nd, by_id);
    layout(nd, nn, nL);
    for (int k = 0; st == LP_OK && k < ne; k++) {
        lp_path_sender_name(m, e[k].i, sn, sizeof sn), lp_path_receiver_name(m, e[k].j, rn, sizeof rn), recv_node(m, e[k].j, rnode, sizeof rnode);
        ends[k][0] = node_add(nd, &nn, sn, nL), ends[k][1] = node_add(nd, &nn, rnode, nL);
        cJSON *x = cJSON_CreateObject();
        cJSON_AddStringToObject(x, "source", sn), cJSON_AddStringToObject(x, "target", rnode), cJSON_AddStringToObject(x, "receiver", rn);
        cJSON_AddNumberToObject(x, "score", e[k].s);
        cJSON_AddItemToArray(je, x);
    }
    for (int i = 0; i < nn; i++) {
        cJSON *x = cJSON_CreateObject();
        int r = nd[i].row;
        cJSON_AddStringToObject(x, "id", nd[i].id);
        cJSON_AddNumberToObject(x, "layer", r == 0 ? -1 : r == 2 * nL + 1 ? nL : (r - 1) / 2);
        cJSON_AddStringToObject(x, "kind", r == 0 ? "embed" : r == 2 * nL + 1 ? "logits" : r % 2 ? "head" : "mlp");
        cJSON_AddItemToArray(jn, x);
    }
    cJSON_AddStringToObject(j, "model", lp_cfg_str(&a->cfg, "model.path"));
    cJSON_AddStringToObject(j, "pairs", lp_cfg_str(&a->cfg, "attrib.pairs"));
    cJSON_AddStringToObject(j, "metric", lp_cfg_str(&a->cfg, "attrib.metric"));
    cJSON_AddStringToObject(j, "method", lp_cfg_int(&a->cfg, "attrib.ig_steps") > 0 ? "eap-ig" : "eap");
    cJSON_AddNumberToObject(j, "ig_steps", (double)lp_cfg_int(&a->cfg, "attrib.ig_steps"));
    cJSON_AddNumberToObject(j, "n_pairs", *n_pairs);
    cJSON_AddStringToObject(j, "score", "mean over pairs of sum over positions of (corrupted - clean sender output) . d metric / d receiver input at the clean run");
    cJSON_AddItemToObject(j, "nodes", jn), cJSON_AddItemToObject(j, "edges", je);
    char *txt = cJSON_Print(j), path[1300];
    cJSON_Delete(j);
    snprintf(path, sizeof path, "%s/circuit.json", dir);
    if (st == LP_OK) st = txt ? lp_write_file_atomic(path, txt, strlen(txt)) : LP_ERR(LP_ERR_OOM, "out of memory");
    free(txt);
    snprintf(path, sizeof path, "%s/circuit.html", dir);
    char title[256];
    snprintf(title, sizeof title, "loupe circuit: top %d edges, %d pairs (%s)", ne, *n_pairs, lp_cfg_int(&a->cfg, "attrib.ig_steps") > 0 ? "EAP-IG" : "EAP");
    if (st == LP_OK) st = write_html(path, title, nd, nn, e, ne, (const int(*)[2])ends, nL);
    free(sum), free(e), free(nd), free(ends);
    return st;
}
