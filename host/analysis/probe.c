/* probe.c: the arithmetic of linear probes (see probe.h): L2-regularised logistic
 * regression by L-BFGS, difference-of-means probes, accuracy and AUROC.
 *
 * The logistic objective is scikit-learn's lbfgs objective divided by C n (the same
 * minimiser; the gradient tolerance is on this scaled form, as there):
 *     f(W, b) = 1/n sum_i logloss(x_i W^T + b, y_i) + ||W||^2 / (2 C n)
 * Everything is double precision; the two products with X per evaluation go to OpenBLAS. */
#include <cblas.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/probe.h"

/* ---- the objective ---- */

typedef struct lr_prob {
    const double *x;   /* [n, d] */
    const int32_t *y;  /* [n] */
    int64_t n;
    int d, m;          /* m = output rows (1: sigmoid, else softmax over m = k classes) */
    double lam;        /* 1 / (C n) */
    double *r;         /* [n, m] scratch: logits, then d loss / d logits */
} lr_prob;

static double softplus(double z) { return z > 0 ? z + log1p(exp(-z)) : log1p(exp(z)); }
static double sigmoid(double z) {
    if (z >= 0) return 1 / (1 + exp(-z));
    double e = exp(z);
    return e / (1 + e);
}

/* Logits r = x w^T + b for rows [n, m]. */
static void logits(const double *x, int64_t n, int d, int m, const double *w, const double *b, double *r) {
    if (m == 1) cblas_dgemv(CblasRowMajor, CblasNoTrans, (int)n, d, 1.0, x, d, w, 1, 0.0, r, 1);
    else cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, m, d, 1.0, x, d, w, d, 0.0, r, m);
    for (int64_t i = 0; i < n; i++)
        for (int j = 0; j < m; j++) r[i * m + j] += b[j];
}

/* f(theta) and its gradient g; theta = [W (m x d, row-major), b (m)]. */
static double lr_eval(lr_prob *p, const double *th, double *g) {
    int64_t n = p->n;
    int d = p->d, m = p->m;
    const double *w = th, *b = th + (size_t)m * d;
    double *gw = g, *gb = g + (size_t)m * d, f = 0;
    logits(p->x, n, d, m, w, b, p->r);
    memset(gb, 0, m * sizeof *gb);
    for (int64_t i = 0; i < n; i++) {
        double *z = p->r + i * m;
        int yi = p->y[i];
        if (m == 1) {
            f += softplus(z[0]) - (yi == 1 ? z[0] : 0);
            z[0] = sigmoid(z[0]) - (yi == 1);
            gb[0] += z[0];
            continue;
        }
        double mx = z[0], s = 0;
        for (int j = 1; j < m; j++) mx = z[j] > mx ? z[j] : mx;
        for (int j = 0; j < m; j++) s += exp(z[j] - mx);
        double lse = mx + log(s);
        f += lse - z[yi];
        for (int j = 0; j < m; j++) {
            z[j] = exp(z[j] - lse) - (j == yi);
            gb[j] += z[j];
        }
    }
    double inv_n = 1.0 / (double)n, reg = 0;
    f *= inv_n;
    for (int j = 0; j < m; j++) gb[j] *= inv_n;
    /* gW = 1/n r^T x + lam W */
    if (m == 1) cblas_dgemv(CblasRowMajor, CblasTrans, (int)n, d, inv_n, p->x, d, p->r, 1, 0.0, gw, 1);
    else cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, m, d, (int)n, inv_n, p->r, m, p->x, d, 0.0, gw, d);
    for (size_t j = 0; j < (size_t)m * d; j++) {
        reg += w[j] * w[j];
        gw[j] += p->lam * w[j];
    }
    return f + 0.5 * p->lam * reg;
}

/* ---- L-BFGS ---- */

#define LBFGS_M 10   /* correction pairs kept, scipy's default */
#define LS_MAX 60    /* line-search trials */

static double dot(const double *a, const double *b, size_t n) { return cblas_ddot((int)n, a, 1, b, 1); }
static double max_abs(const double *a, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) m = fabs(a[i]) > m ? fabs(a[i]) : m;
    return m;
}

/* Two-loop recursion: p = -H g from the last nk pairs (newest at index (top - 1) mod M). */
static void lbfgs_direction(const double *g, double *p, size_t P, double *const *s, double *const *yv, const double *rho,
                            int nk, int top, double *al) {
    for (size_t i = 0; i < P; i++) p[i] = -g[i];
    for (int j = 0; j < nk; j++) {
        int idx = (top - 1 - j + LBFGS_M) % LBFGS_M;
        al[idx] = rho[idx] * dot(s[idx], p, P);
        cblas_daxpy((int)P, -al[idx], yv[idx], 1, p, 1);
    }
    if (nk > 0) { /* initial Hessian gamma I, gamma = s.y / y.y of the newest pair */
        int idx = (top - 1 + LBFGS_M) % LBFGS_M;
        cblas_dscal((int)P, 1.0 / (rho[idx] * dot(yv[idx], yv[idx], P)), p, 1);
    }
    for (int j = nk - 1; j >= 0; j--) {
        int idx = (top - 1 - j + LBFGS_M) % LBFGS_M;
        double be = rho[idx] * dot(yv[idx], p, P);
        cblas_daxpy((int)P, al[idx] - be, s[idx], 1, p, 1);
    }
}

/* A step along p satisfying the strong Wolfe conditions, found by expansion and then
 * safeguarded secant steps on the slope (the objective is convex, so the slope along p
 * increases). Armijo allows a few ulps of f: near the optimum f stops changing in double
 * precision while the gradient still carries information, and the slope test decides.
 * Badly scaled activations (a residual stream's outlier dimensions) can make the slope
 * jump across a step narrower than double precision resolves; then the lowest point that
 * met Armijo is taken (the objective is strictly convex, so the pair still has s.y > 0).
 * On success th, g, f hold the new point; returns 0 when no step was found. */
static int line_search(lr_prob *pr, double *th, double *g, double *f, const double *p, double a, double *th_new,
                       double *g_new, double *th_best, double *g_best, size_t P) {
    double gp = dot(g, p, P), lo = 0, hi = INFINITY, dlo = gp, dhi = 0, f_best = INFINITY;
    const double c1 = 1e-4, c2 = 0.9, slack = 8 * DBL_EPSILON * fabs(*f);
    for (int t = 0; t < LS_MAX; t++) {
        for (size_t i = 0; i < P; i++) th_new[i] = th[i] + a * p[i];
        double fn = lr_eval(pr, th_new, g_new), dn = dot(g_new, p, P);
        int armijo = isfinite(fn) && fn <= *f + c1 * a * gp + slack;
        if (armijo && fabs(dn) <= c2 * fabs(gp)) {
            memcpy(th, th_new, P * sizeof *th);
            memcpy(g, g_new, P * sizeof *g);
            *f = fn;
            return 1;
        }
        if (armijo && fn < *f && fn < f_best) {
            f_best = fn;
            memcpy(th_best, th_new, P * sizeof *th);
            memcpy(g_best, g_new, P * sizeof *g);
        }
        if (!armijo || dn > 0) hi = a, dhi = dn;
        else lo = a, dlo = dn;
        if (isinf(hi)) a *= 2;
        else if (dlo < 0 && dhi > 0 && isfinite(dhi)) { /* secant on the slope, kept inside the bracket */
            double sec = lo - dlo * (hi - lo) / (dhi - dlo), w = hi - lo;
            a = sec < lo + 0.1 * w ? lo + 0.1 * w : sec > hi - 0.1 * w ? hi - 0.1 * w : sec;
        } else a = 0.5 * (lo + hi);
        if (hi - lo <= 1e-16 * hi) break;
    }
    if (!isfinite(f_best)) return 0;
    memcpy(th, th_best, P * sizeof *th);
    memcpy(g, g_best, P * sizeof *g);
    *f = f_best;
    return 1;
}

static lp_status check_classes(const int32_t *y, int64_t n, int k) {
    if (k < 2) LP_FAIL(LP_ERR_ARG, "probe: %d class(es); a probe needs at least 2", k);
    int64_t *cnt = calloc((size_t)k, sizeof *cnt);
    if (!cnt) LP_FAIL(LP_ERR_OOM, "probe: out of memory");
    lp_status st = LP_OK;
    for (int64_t i = 0; i < n && st == LP_OK; i++)
        if (y[i] < 0 || y[i] >= k) st = LP_ERR(LP_ERR_ARG, "probe: row %lld has class %d, outside [0, %d)", (long long)i, y[i], k);
        else cnt[y[i]]++;
    for (int c = 0; c < k && st == LP_OK; c++)
        if (cnt[c] == 0) st = LP_ERR(LP_ERR_ARG, "probe: class %d has no training rows", c);
    free(cnt);
    return st;
}

lp_status lp_logreg_fit(const double *x, const int32_t *y, int64_t n, int d, int k, const lp_logreg_opts *o, double *w,
                        double *b, lp_logreg_info *info) {
    if (!(o->C > 0) || n <= 0 || d <= 0 || n > INT32_MAX) LP_FAIL(LP_ERR_ARG, "probe: bad fit arguments (C %g, %lld rows, d %d)", o->C, (long long)n, d);
    LP_CHECK(check_classes(y, n, k));
    int m = lp_probe_n_out(k);
    size_t P = (size_t)m * d + m;
    /* one allocation: theta, g, p, theta', g', the line search's best, 2 M correction vectors, the logits */
    size_t nbuf = 7 * P + 2 * (size_t)LBFGS_M * P + (size_t)n * m;
    double *buf = calloc(nbuf, sizeof(double));
    if (!buf) LP_FAIL(LP_ERR_OOM, "probe: out of memory for the L-BFGS state (%zu doubles)", nbuf);
    double *th = buf, *g = th + P, *p = g + P, *thn = p + P, *gn = thn + P, *sv[LBFGS_M], *yv[LBFGS_M];
    double *thb = gn + P, *gb = thb + P;
    for (int j = 0; j < LBFGS_M; j++) sv[j] = gb + P + 2 * j * P, yv[j] = sv[j] + P;
    double rho[LBFGS_M], al[LBFGS_M];
    lr_prob pr = {x, y, n, d, m, 1.0 / (o->C * (double)n), gb + P + 2 * (size_t)LBFGS_M * P};
    double f = lr_eval(&pr, th, g);
    int nk = 0, top = 0, it = 0, conv = 0;
    for (; it < o->max_iter; it++) {
        if (max_abs(g, P) <= o->tol) { conv = 1; break; }
        lbfgs_direction(g, p, P, sv, yv, rho, nk, top, al);
        if (dot(g, p, P) >= 0) { /* not a descent direction: forget the history */
            nk = 0;
            for (size_t i = 0; i < P; i++) p[i] = -g[i];
        }
        /* the first step (no curvature yet) has length 1, as in L-BFGS-B */
        double a0 = nk == 0 ? 1.0 / sqrt(dot(p, p, P)) : 1.0;
        memcpy(sv[top], th, P * sizeof *th); /* old theta and gradient, differenced below */
        memcpy(yv[top], g, P * sizeof *g);
        if (!line_search(&pr, th, g, &f, p, a0, thn, gn, thb, gb, P)) break;
        for (size_t i = 0; i < P; i++) sv[top][i] = th[i] - sv[top][i], yv[top][i] = g[i] - yv[top][i];
        double sy = dot(sv[top], yv[top], P);
        if (sy > DBL_EPSILON * dot(yv[top], yv[top], P)) {
            rho[top] = 1.0 / sy;
            top = (top + 1) % LBFGS_M;
            nk = nk < LBFGS_M ? nk + 1 : LBFGS_M;
        }
    }
    if (!conv && max_abs(g, P) <= o->tol) conv = 1;
    memcpy(w, th, (size_t)m * d * sizeof *w);
    memcpy(b, th + (size_t)m * d, m * sizeof *b);
    if (info) *info = (lp_logreg_info){it, conv, max_abs(g, P), f};
    free(buf);
    return LP_OK;
}

lp_status lp_probe_scores(const double *x, int64_t n, int d, int n_out, const double *w, const double *b, double *scores) {
    if (n > INT32_MAX) LP_FAIL(LP_ERR_ARG, "probe: %lld rows are more than one product takes", (long long)n);
    if (n > 0) logits(x, n, d, n_out, w, b, scores);
    return LP_OK;
}

lp_status lp_logreg_proba(const double *x, int64_t n, int d, int k, const double *w, const double *b, double *proba) {
    int m = lp_probe_n_out(k);
    double *z = malloc(((size_t)n * m + 1) * sizeof *z);
    if (!z) LP_FAIL(LP_ERR_OOM, "probe: out of memory");
    lp_status st = lp_probe_scores(x, n, d, m, w, b, z);
    for (int64_t i = 0; st == LP_OK && i < n; i++) {
        double *pi = proba + i * k, *zi = z + i * m;
        if (m == 1) { /* scikit-learn: [1 - expit(z), expit(z)] */
            pi[1] = sigmoid(zi[0]);
            pi[0] = 1 - pi[1];
            continue;
        }
        double mx = zi[0], s = 0;
        for (int j = 1; j < k; j++) mx = zi[j] > mx ? zi[j] : mx;
        for (int j = 0; j < k; j++) s += (pi[j] = exp(zi[j] - mx));
        for (int j = 0; j < k; j++) pi[j] /= s;
    }
    free(z);
    return st;
}

/* ---- difference of means ---- */

lp_status lp_diffmean_fit(const double *x, const int32_t *y, int64_t n, int d, int k, double *dir, double *bias) {
    LP_CHECK(check_classes(y, n, k));
    double *sum = calloc((size_t)(k + 1) * d, sizeof *sum), *all = NULL; /* per class, then all rows */
    int64_t *cnt = calloc((size_t)k, sizeof *cnt);
    if (!sum || !cnt) {
        free(sum), free(cnt);
        LP_FAIL(LP_ERR_OOM, "probe: out of memory");
    }
    all = sum + (size_t)k * d;
    for (int64_t i = 0; i < n; i++) {
        double *s = sum + (size_t)y[i] * d;
        const double *xi = x + i * d;
        for (int j = 0; j < d; j++) s[j] += xi[j];
        cnt[y[i]]++;
    }
    for (int c = 0; c < k; c++)
        for (int j = 0; j < d; j++) all[j] += sum[(size_t)c * d + j];
    int m = lp_probe_n_out(k);
    for (int r = 0; r < m; r++) {
        int c = m == 1 ? 1 : r; /* binary: class 1 against class 0 (the rest) */
        double *dr = dir + (size_t)r * d, mid = 0;
        for (int j = 0; j < d; j++) {
            double mu = sum[(size_t)c * d + j] / (double)cnt[c];
            double rest = (all[j] - sum[(size_t)c * d + j]) / (double)(n - cnt[c]);
            dr[j] = mu - rest;
            mid += dr[j] * 0.5 * (mu + rest);
        }
        bias[r] = -mid;
    }
    free(sum), free(cnt);
    return LP_OK;
}

/* ---- metrics ---- */

double lp_probe_accuracy(const double *scores, const int32_t *y, int64_t n, int k) {
    int m = lp_probe_n_out(k);
    int64_t right = 0;
    for (int64_t i = 0; i < n; i++) {
        const double *s = scores + i * m;
        int pred = 0;
        if (m == 1) pred = s[0] > 0;
        else
            for (int j = 1; j < m; j++) pred = s[j] > s[pred] ? j : pred;
        right += pred == y[i];
    }
    return n ? (double)right / (double)n : NAN;
}

typedef struct { double s; int pos; } scored;
static int cmp_scored(const void *a, const void *b) {
    double x = ((const scored *)a)->s, y = ((const scored *)b)->s;
    return (x > y) - (x < y);
}

/* Mann-Whitney: (sum of the positives' ranks - n1 (n1 + 1) / 2) / (n1 n0), ties taking
 * their mean rank, which is the area under the ROC curve with ties as diagonal steps. */
static double auroc_binary(scored *v, int64_t n) {
    qsort(v, (size_t)n, sizeof *v, cmp_scored);
    double rank_sum = 0, n1 = 0;
    for (int64_t i = 0; i < n;) {
        int64_t j = i, pos = 0;
        while (j < n && v[j].s == v[i].s) pos += v[j++].pos;
        rank_sum += (double)pos * 0.5 * (double)(i + 1 + j); /* mean of ranks i+1 .. j */
        n1 += (double)pos;
        i = j;
    }
    double n0 = (double)n - n1;
    if (n1 == 0 || n0 == 0) return NAN;
    return (rank_sum - n1 * (n1 + 1) / 2) / (n1 * n0);
}

lp_status lp_probe_auroc(const double *scores, int n_out, const int32_t *y, int64_t n, int k, double *auroc) {
    scored *v = malloc(((size_t)n + 1) * sizeof *v);
    if (!v) LP_FAIL(LP_ERR_OOM, "probe: out of memory");
    if (k == 2) {
        for (int64_t i = 0; i < n; i++) v[i] = (scored){scores[i * n_out + n_out - 1], y[i] == 1};
        *auroc = auroc_binary(v, n);
    } else {
        double s = 0;
        for (int c = 0; c < k; c++) {
            for (int64_t i = 0; i < n; i++) v[i] = (scored){scores[i * n_out + c], y[i] == c};
            s += auroc_binary(v, n); /* NaN (a class without rows) makes the mean NaN */
        }
        *auroc = s / k;
    }
    free(v);
    return LP_OK;
}
