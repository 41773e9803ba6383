/* common.c: what the command files of host/cli/ share (declared in cli.h): the one-line
 * error report and --json output, progress bars, opening the model, reading and tokenizing
 * the data, and the prompt pairs of attribute and patch. Calls only the library. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "loupe/config.h"
#include "loupe/dist.h"
#include "loupe/model.h"
#include "loupe/pairs.h"
#include "loupe/sae_train.h"
#include "loupe/store.h"
#include "loupe/textfile.h"
#include "loupe/tokenizer.h"
#include "loupe/tokens.h"
#include "cli.h"

/* The processes of this job (dist.h): joined on the first model load, ended by main. */
static lp_dist *g_dist;
static FILE *g_err; /* ranks other than 0: the real standard error, for errors only */
static int g_logged; /* this rank's stdout and stderr go to its dist.log_dir log */
static const char *g_cmd = "";

void cli_set_command(const char *cmd) { g_cmd = cmd; }

/* Every rank reaches the end, or the job ends: a rank that failed alone must not wait in
 * MPI's shutdown for one still working (or gone) longer than dist.timeout_s. */
int cli_dist_finish(int rc) {
    if (lp_dist_size(g_dist) > 1 && !lp_dist_failed(g_dist)) {
        lp_status st = lp_dist_barrier(g_dist, LP_DIST_WORLD);
        if (st != LP_OK) rc = cli_fail(st); /* ends the job: the barrier lost a rank */
    }
    lp_dist_finalize(g_dist), g_dist = NULL;
    return rc;
}

/* This process's rank as the launcher announced it, before the job is joined (-1: not one
 * of several processes). */
static int launcher_rank(void) {
    static const char *const vars[][2] = {{"OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"}, {"PMI_SIZE", "PMI_RANK"},
                                          {"SLURM_STEP_NUM_TASKS", "SLURM_PROCID"}};
    for (size_t i = 0; i < sizeof vars / sizeof *vars; i++) {
        const char *n = getenv(vars[i][0]), *r = getenv(vars[i][1]);
        if (n && atoi(n) > 1 && r && *r) return atoi(r);
    }
    return -1;
}

/* A collective that timed out or lost a peer (dist.h) leaves the ranks out of step: the
 * line says so, and the whole job ends here, every rank with a non-zero status. */
int cli_fail(lp_status st) {
    int lost = lp_dist_failed(g_dist), rc = lp_status_exit_code(st), r = launcher_rank();
    if (lp_dist_size(g_dist) > 1) {
        fprintf(g_err ? g_err : stderr, "loupe: rank %d: %s%s\n", lp_dist_rank(g_dist), lp_last_error(), lost ? "; ending the job" : "");
        if (g_logged) fprintf(stderr, "loupe: rank %d: %s\n", lp_dist_rank(g_dist), lp_last_error()); /* its log too */
    }
    else if (!g_dist && r >= 0) fprintf(stderr, "loupe: rank %d: %s\n", r, lp_last_error()); /* failed before it joined */
    else fprintf(stderr, "loupe: %s\n", lp_last_error());
    if (getenv("LOUPE_DEBUG")) fprintf(stderr, "loupe: (raised at %s)\n", lp_last_error_where());
    if (lost) {
        signal(SIGTERM, SIG_DFL); /* the launcher's SIGTERM that follows is no news */
        fflush(NULL);
        lp_dist_abort(g_dist, rc ? rc : 1);
    }
    return rc;
}

/* SIGTERM in a job of several ranks: the launcher ends the job (another rank crashed, was
 * killed or ended it, or the job was cancelled). One line, then the default action: the
 * outputs stay under their temporary names or marked incomplete, and a rerun resumes. */
static char g_term_line[200];
static size_t g_term_len;
static int g_term_fd = 2;
static void on_sigterm(int sig) {
    ssize_t k = write(g_term_fd, g_term_line, g_term_len);
    (void)k;
    signal(sig, SIG_DFL);
    raise(sig);
}
static void catch_sigterm(int fd) {
    int n = snprintf(g_term_line, sizeof g_term_line, "loupe: rank %d: ended by the launcher (SIGTERM: another rank failed, or the "
                     "job was cancelled); what this run wrote is incomplete, and rerunning it resumes\n", lp_dist_rank(g_dist));
    g_term_len = n > 0 && (size_t)n < sizeof g_term_line ? (size_t)n : 0;
    g_term_fd = fd;
    struct sigaction sa = {0};
    sa.sa_handler = on_sigterm;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
}

/* Every rank must run the same command with the same settings (a rank started with another
 * config file would compute something else, or wait in another collective): a hash of the
 * command and every key's value, all-gathered and compared before any work. */
static lp_status same_settings(const args *a) {
    int n = lp_dist_size(g_dist);
    if (n <= 1) return LP_OK;
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (int i = -1; i < a->cfg.n; i++) {
        const char *parts[3] = {i < 0 ? g_cmd : a->cfg.keys[i].name, "=", i < 0 ? "" : a->cfg.val[i] ? a->cfg.val[i] : "(unset)"};
        for (int k = 0; k < 3; k++)
            for (const char *c = parts[k]; *c; c++) h = (h ^ (unsigned char)*c) * 1099511628211ull;
        h = (h ^ 0xff) * 1099511628211ull; /* a separator no key or value contains */
    }
    uint64_t *all = malloc((size_t)n * sizeof *all);
    if (!all) LP_FAIL(LP_ERR_OOM, "out of memory");
    lp_status st = lp_dist_allgather(g_dist, LP_DIST_WORLD, &h, all, sizeof h);
    for (int r = 1; st == LP_OK && r < n; r++)
        if (all[r] != all[0])
            st = LP_ERR(LP_ERR_ARG, "rank %d was started with other settings than rank 0 (command, config file or flags): every rank "
                                    "must be given the same ones", r);
    free(all);
    return st;
}

lp_dist *cli_dist(void) { return g_dist; }

/* The start of a job of several ranks (MPI_Init, the groups, the settings check) waits for
 * every rank, and MPI_Init cannot be interrupted from inside: a watchdog thread ends this
 * process when the start has not completed within dist.start_timeout_s (a rank that never
 * arrived, or stopped or died while the others were in MPI's start). The launcher then ends
 * the others (mpirun always; srun with --kill-on-bad-exit=1, else each one's own watchdog). */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done, rank;
    double limit;
    pthread_t th;
} g_start = {.mu = PTHREAD_MUTEX_INITIALIZER};

static void *start_watch(void *arg) {
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    double whole = floor(g_start.limit);
    until.tv_sec += (time_t)whole;
    until.tv_nsec += (long)((g_start.limit - whole) * 1e9);
    if (until.tv_nsec >= 1000000000L) until.tv_sec++, until.tv_nsec -= 1000000000L;
    pthread_mutex_lock(&g_start.mu);
    int rc = 0;
    while (!g_start.done && rc != ETIMEDOUT) rc = pthread_cond_timedwait(&g_start.cv, &g_start.mu, &until);
    int late = !g_start.done;
    pthread_mutex_unlock(&g_start.mu);
    if (late) {
        char line[300];
        int n = snprintf(line, sizeof line, "loupe: rank %d: the job did not start within %g s (dist.start_timeout_s): not every rank "
                         "joined it (one never started, or stopped or died in MPI's start); ending the job\n", g_start.rank, g_start.limit);
        ssize_t k = write(2, line, n > 0 && (size_t)n < sizeof line ? (size_t)n : 0);
        (void)k;
        _exit(1); /* MPI_Abort needs the start that did not complete */
    }
    return NULL;
}

/* Arms the watchdog for a process the launcher says is one of several (1: armed). */
static int start_watch_arm(const args *a) {
    g_start.rank = launcher_rank();
    if (g_start.rank < 0) return 0;
    g_start.limit = lp_cfg_float(&a->cfg, "dist.start_timeout_s");
    g_start.done = 0;
    pthread_condattr_t at;
    pthread_condattr_init(&at);
    pthread_condattr_setclock(&at, CLOCK_MONOTONIC);
    pthread_cond_init(&g_start.cv, &at);
    pthread_condattr_destroy(&at);
    return pthread_create(&g_start.th, NULL, start_watch, NULL) == 0;
}

static void start_watch_disarm(void) {
    pthread_mutex_lock(&g_start.mu);
    g_start.done = 1;
    pthread_cond_signal(&g_start.cv);
    pthread_mutex_unlock(&g_start.mu);
    pthread_join(g_start.th, NULL);
    pthread_cond_destroy(&g_start.cv);
}

/* Joins the job under the watchdog: MPI's start, the groups, the timeout and the settings. */
static lp_status start_job(const args *a, int tp, int dp) {
    int armed = start_watch_arm(a);
    lp_status st = lp_dist_init(&g_dist, tp, dp);
    if (st == LP_OK) st = lp_dist_set_timeout(g_dist, lp_cfg_float(&a->cfg, "dist.timeout_s"));
    if (st == LP_OK) st = same_settings(a);
    if (armed) start_watch_disarm();
    return st;
}

/* A rank other than 0 with dist.log_dir: its log, dir/rank-R.log, opened for appending (a
 * rerun that resumes adds to the log of the run it continues) into *fd. */
static lp_status open_log(const char *dir, int *fd) {
    char path[4096];
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) LP_FAIL(LP_ERR_IO, "dist.log_dir: cannot make %s: %s", dir, strerror(errno));
    if (snprintf(path, sizeof path, "%s/rank-%05d.log", dir, lp_dist_rank(g_dist)) >= (int)sizeof path)
        LP_FAIL(LP_ERR_ARG, "dist.log_dir: %s is too long a path", dir);
    *fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (*fd < 0) LP_FAIL(LP_ERR_IO, "dist.log_dir: cannot open %s: %s", path, strerror(errno));
    return LP_OK;
}

/* Every rank's log opened, or every rank refuses (exit 2): a rank that could not would
 * otherwise leave the others working, or waiting for it. */
static lp_status logs_agree(const char *dir, int *fd) {
    *fd = -1;
    if (!dir || !*dir) return LP_OK;
    lp_status st = lp_dist_rank(g_dist) ? open_log(dir, fd) : LP_OK;
    int32_t bad = st != LP_OK ? lp_dist_rank(g_dist) + 1 : 0; /* the highest failed rank, + 1 */
    lp_status a = lp_dist_allreduce_max(g_dist, LP_DIST_WORLD, &bad, 1, LP_I32);
    if (st == LP_OK) st = a;
    if (st == LP_OK && bad)
        st = LP_ERR(LP_ERR_IO, "dist.log_dir: rank %d cannot write its log in %s (its error is printed by that rank)", bad - 1, dir);
    if (st != LP_OK && *fd >= 0) close(*fd), *fd = -1;
    return st;
}

/* A rank other than 0: what it prints goes to its log (fd), or nowhere. Its errors also
 * reach the launcher's standard error (g_err). */
static lp_status rank_output(int fd) {
    int r = lp_dist_rank(g_dist), to = fd >= 0 ? fd : open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (to < 0) LP_FAIL(LP_ERR_IO, "rank %d: cannot open /dev/null: %s", r, strerror(errno));
    fflush(stdout), fflush(stderr);
    int ok = dup2(to, 1) >= 0 && dup2(to, 2) >= 0;
    if (to > 2) close(to);
    if (!ok) LP_FAIL(LP_ERR_WRITE, "rank %d: cannot redirect its output: %s", r, strerror(errno));
    setvbuf(stdout, NULL, _IOLBF, 0); /* whole lines in the log, in order with stderr's */
    g_logged = fd >= 0;
    return LP_OK;
}

/* Joins the job's processes; ranks other than 0 print nothing, neither results nor progress,
 * except their errors (each naming its rank), unless dist.log_dir asks for their logs. */
lp_status cli_join(const args *a) {
    int tp = (int)lp_cfg_int(&a->cfg, "dist.tp");
    if (g_dist) return LP_OK;
    /* attribute and patch over the node grid, and between components (attrib.edges, patch.kind =
     * path) data-parallel only: edge attribution reads whole weight matrices (eap.c), which a
     * tensor-parallel rank holds a slice of */
    int between = (strcmp(g_cmd, "attribute") == 0 && strcmp(lp_cfg_str(&a->cfg, "attrib.edges"), "true") == 0) ||
                  (strcmp(g_cmd, "patch") == 0 && strcmp(lp_cfg_str(&a->cfg, "patch.kind"), "path") == 0);
    int sweep = !between && (strcmp(g_cmd, "attribute") == 0 || strcmp(g_cmd, "patch") == 0);
    if (tp > 1 && between)
        LP_FAIL(LP_ERR_ARG, "dist.tp=%d: `loupe %s %s` does not run tensor-parallel: the sweeps between components read whole weight "
                "matrices, which a tensor-parallel rank holds only a slice of; run them data-parallel (dist.tp=1)", tp, g_cmd,
                between && strcmp(g_cmd, "patch") == 0 ? "--patch.kind=path" : "--attrib.edges=true");
    /* the commands that split the model over ranks (and write from rank 0 alone) */
    static const char *const tp_cmds[] = {"info", "run", "generate", "cache", "train-sae", NULL}; /* train-sae: its latents */
    int ok = sweep;
    for (int i = 0; tp_cmds[i]; i++) ok |= strcmp(g_cmd, tp_cmds[i]) == 0;
    if (tp > 1 && !ok)
        LP_FAIL(LP_ERR_ARG, "dist.tp=%d: `loupe %s` does not run tensor-parallel (info, run, generate, cache, train-sae, and attribute "
                "and patch over the node grid do)", tp, g_cmd);
    /* the commands whose work splits over data-parallel ranks; the others refuse more than one */
    int dp_ok = strcmp(g_cmd, "cache") == 0 || strcmp(g_cmd, "train-sae") == 0 || sweep || between, dp = (int)lp_cfg_int(&a->cfg, "dist.dp");
    if (dp > 1 && !dp_ok)
        LP_FAIL(LP_ERR_ARG, "dist.dp=%d: `loupe %s` does not run data-parallel (cache, train-sae, attribute and patch do)", dp, g_cmd);
    LP_CHECK(start_job(a, tp, dp_ok ? dp : 1));
    int log = -1;
    if (lp_dist_size(g_dist) > 1) LP_CHECK(logs_agree(lp_cfg_str(&a->cfg, "dist.log_dir"), &log));
    if (lp_dist_rank(g_dist) == 0) {
        if (lp_dist_size(g_dist) > 1) catch_sigterm(2);
        return LP_OK;
    }
    int fd = dup(2);
    g_err = fd >= 0 ? fdopen(fd, "w") : NULL;
    if (!g_err) {
        if (log >= 0) close(log);
        LP_FAIL(LP_ERR_WRITE, "rank %d: cannot keep its standard error", lp_dist_rank(g_dist));
    }
    setvbuf(g_err, NULL, _IONBF, 0); /* an error line must be out before the job may end */
    catch_sigterm(fd);
    return rank_output(log);
}

void cli_print_json(cJSON *j) {
    char *txt = cJSON_PrintUnformatted(j);
    if (txt) printf("%s\n", txt);
    free(txt);
    cJSON_Delete(j);
}

void cli_cache_progress(const lp_cache_progress *p, void *user) {
    int tty = isatty(2);
    if (p->final) {
        if (tty) fputc('\n', stderr);
        return;
    }
    if (tty == p->shard_done) return; /* a terminal redraws every batch; a log gets one line per shard */
    double rate = p->seconds > 0 ? p->tokens_done / p->seconds : 0;
    double eta = rate > 0 ? (double)(p->seq_total - p->seq_done) * ((double)p->tokens_done / (p->seq_done ? p->seq_done : 1)) / rate : 0;
    int w = 30, fill = p->seq_total ? (int)(w * p->seq_done / p->seq_total) : w;
    fprintf(stderr, "%scache [%.*s%*s] %lld/%lld seq  %.0f tok/s  ETA %d:%02d%s", tty ? "\r" : "", fill,
            "##############################", w - fill, "", (long long)p->seq_done, (long long)p->seq_total, rate,
            (int)eta / 60, (int)eta % 60, tty ? "" : "\n");
    fflush(stderr);
}

void cli_train_progress(const lp_train_progress *p, void *user) {
    if (p->final) {
        fputc('\n', stderr);
        return;
    }
    int width = 24, done = (int)(width * (double)p->step / (p->total_steps ? p->total_steps : 1));
    fprintf(stderr, "\rtrain-sae [");
    for (int i = 0; i < width; i++) fputc(i < done ? '#' : ' ', stderr);
    fprintf(stderr, "] %lld/%lld tok  %.0f tok/s  loss %.4g  L0 %.1f  dead %d   ", (long long)p->tokens_done,
            (long long)p->tokens_total, p->tokens_per_s, p->loss, p->l0, p->dead);
}

double cli_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

lp_device cli_device(const char *dev) {
    char why[256] = "";
    return strcmp(dev, "cuda") == 0 ? LP_CUDA : strcmp(dev, "cpu") == 0 ? LP_CPU : lp_cuda_available(why, sizeof why) ? LP_CUDA : LP_CPU;
}

lp_status cli_open_model(const args *a, lp_model **m) {
    LP_CHECK(lp_cfg_require(&a->cfg, (const char *[]){"model.path", NULL}));
    const char *dt = lp_cfg_str(&a->cfg, "model.dtype");
    lp_device d = cli_device(lp_cfg_str(&a->cfg, "model.device"));
    lp_dtype t = strcmp(dt, "f32") == 0 ? LP_F32 : strcmp(dt, "bf16") == 0 ? LP_BF16 : d == LP_CUDA ? LP_BF16 : LP_F32;
    LP_CHECK(cli_join(a));
    LP_CHECK(lp_model_load_dist(m, lp_cfg_str(&a->cfg, "model.path"), d, t, g_dist));
    lp_status st = lp_model_set_tp_overlap(*m, (int)lp_cfg_int(&a->cfg, "dist.tp_parts"));
    if (st != LP_OK) lp_model_free(*m), *m = NULL;
    return st;
}

const char *cli_dev_name(lp_model *m) {
    static char buf[32];
    lp_ctx *c = lp_model_ctx(m);
    snprintf(buf, sizeof buf, "%s/%s", c->device == LP_CUDA ? "cuda" : "cpu", c->dtype == LP_BF16 ? "bf16" : "f32");
    return buf;
}

/* The model's tokenizer: the .gguf file itself, or tokenizer.json in the checkpoint. */
static lp_status open_tokenizer(const args *a, lp_tokenizer **tk) {
    LP_CHECK(lp_cfg_require(&a->cfg, (const char *[]){"model.path", NULL}));
    return lp_tokenizer_load(tk, lp_cfg_str(&a->cfg, "model.path"));
}

/* data.prepend_bos: the BOS id each row starts with, or -1 (auto: when the tokenizer adds
 * one, as TransformerLens's prepend_bos defaults). Rows then start with BOS, so the stream
 * drops the one the tokenizer put first. */
static lp_status row_bos(const args *a, const lp_tokenizer *tk, int32_t **ids, size_t *n, int32_t *bos) {
    const char *pb = lp_cfg_str(&a->cfg, "data.prepend_bos");
    int on = strcmp(pb, "true") == 0 || (strcmp(pb, "auto") == 0 && lp_tokenizer_adds_bos(tk));
    *bos = on ? lp_tokenizer_bos(tk) : -1;
    if (on && *bos < 0)
        LP_FAIL(LP_ERR_ARG, "data.prepend_bos = true, but the tokenizer of %s has no BOS token", lp_cfg_str(&a->cfg, "model.path"));
    if (on && lp_tokenizer_adds_bos(tk) && *n > 0 && (*ids)[0] == *bos) memmove(*ids, *ids + 1, --*n * sizeof **ids);
    return LP_OK;
}

lp_status cli_tokenize_file(const args *a, const char *path, int32_t **ids, size_t *n, size_t *n_bytes, int32_t *bos) {
    size_t len;
    char *text;
    LP_CHECK(lp_text_read(path, "text file", &text, &len));
    lp_tokenizer *tk = NULL;
    *ids = NULL;
    lp_status st = lp_utf8_check(text, len, path);
    if (st == LP_OK) st = open_tokenizer(a, &tk);
    if (st == LP_OK) st = lp_tokenize(tk, text, len, ids, n);
    if (st == LP_OK && bos) st = row_bos(a, tk, ids, n, bos);
    if (st == LP_OK && *n == 0) st = LP_ERR(LP_ERR_ARG, "%s: the text gives no tokens", path);
    if (n_bytes) *n_bytes = len;
    if (st != LP_OK) free(*ids), *ids = NULL;
    lp_tokenizer_free(tk);
    free(text);
    return st;
}

/* data.text: the text's tokens as one stream, cut into rows of data.context tokens (or
 * one row when the whole text fits the model's context, else rows of the context), each
 * row [BOS] + context - 1 tokens when data.prepend_bos says so. */
static lp_status load_text(const args *a, const lp_model *m, lp_tokens *t) {
    const char *path = lp_cfg_str(&a->cfg, "data.text");
    int32_t *ids;
    size_t n;
    int32_t bos;
    LP_CHECK(cli_tokenize_file(a, path, &ids, &n, NULL, &bos));
    lp_status st = lp_tokens_from_stream(t, ids, n, (int)lp_cfg_int(&a->cfg, "data.context"), lp_model_config(m)->n_ctx, bos, path);
    free(ids);
    LP_CHECK(st);
    if (t->dropped) fprintf(stderr, "loupe: %s: the last %lld tokens do not fill a row and are left out\n", path, (long long)t->dropped);
    return LP_OK;
}

lp_status cli_load_tokens(const args *a, const lp_model *m, lp_tokens *t) {
    int has_text = lp_cfg_str(&a->cfg, "data.text") != NULL, has_tokens = lp_cfg_str(&a->cfg, "data.tokens") != NULL;
    if (has_text && has_tokens) LP_FAIL(LP_ERR_ARG, "give data.tokens or data.text, not both");
    if (has_text) return load_text(a, m, t);
    if (!has_tokens) LP_FAIL(LP_ERR_ARG, "missing config key 'data.tokens' (or 'data.text'): pass --tokens FILE or --text FILE");
    const char *path = lp_cfg_str(&a->cfg, "data.tokens");
    int ctx = (int)lp_cfg_int(&a->cfg, "data.context");
    int strict = ctx > 0;
    if (ctx == 0) ctx = lp_model_config(m)->n_ctx;
    LP_CHECK(lp_tokens_load(t, path, ctx, strict, lp_cfg_str(&a->cfg, "data.token_dtype")));
    if (t->ctx > lp_model_config(m)->n_ctx)
        LP_FAIL(LP_ERR_ARG, "%s: rows of %d tokens exceed the model's context of %d", path, t->ctx, lp_model_config(m)->n_ctx);
    if (t->ctx < 2) LP_FAIL(LP_ERR_ARG, "%s: rows of %d token(s) leave nothing to predict", path, t->ctx);
    if (t->dropped) fprintf(stderr, "loupe: %s: the last %lld tokens do not fill a row and are left out\n", path, (long long)t->dropped);
    return lp_tokens_check(t, lp_model_config(m)->d_vocab, path);
}

/* ---- the prompt pairs of attribute and patch ---- */

void cli_pairs_free(cli_pairs *s) {
    for (int i = 0; i < s->n; i++) free(s->pairs[i].clean), free(s->pairs[i].corrupted);
    free(s->pairs), free(s->bad);
}

static void add_bad(cli_pairs *s, int line, const char *why) {
    cli_bad_line *b = realloc(s->bad, (s->n_bad + 1) * sizeof *b);
    if (!b) return;
    s->bad = b;
    s->bad[s->n_bad].line = line;
    snprintf(s->bad[s->n_bad].why, sizeof s->bad[s->n_bad].why, "%s", why);
    s->n_bad++;
}

/* Reads every line; a bad one is recorded and skipped, the rest go on. */
lp_status cli_read_pairs(const args *a, lp_model *m, const lp_tokenizer *tk, cli_pairs *s) {
    const char *path = lp_cfg_str(&a->cfg, "attrib.pairs");
    const lp_config *cf = lp_model_config(m);
    lp_pair_opts po = {.file = path, .tk = tk, .d_vocab = cf->d_vocab, .n_ctx = cf->n_ctx,
                       .pad_left = strcmp(lp_cfg_str(&a->cfg, "attrib.align"), "pad_left") == 0};
    size_t len;
    char *txt;
    LP_CHECK(lp_text_read(path, "pairs file", &txt, &len));
    memset(s, 0, sizeof *s);
    int line = 0, cap = 0;
    for (size_t pos = 0; pos < len; line++) {
        const char *ln = txt + pos, *nl = memchr(ln, '\n', len - pos);
        size_t n = nl ? (size_t)(nl - ln) : len - pos;
        pos += n + 1;
        lp_pair q;
        if (lp_pair_parse_line(&po, ln, n, line + 1, &q) != LP_OK) {
            /* the report names the file once and each line: keep what follows "FILE:LINE: " */
            char at[32];
            int k = snprintf(at, sizeof at, ":%d: ", line + 1);
            const char *why = lp_last_error();
            size_t pl = strlen(path);
            add_bad(s, line + 1, strncmp(why, path, pl) == 0 && strncmp(why + pl, at, k) == 0 ? why + pl + k : why);
            continue;
        }
        if (q.T == 0) continue; /* a blank line */
        if (s->n == cap) {
            cap = cap ? 2 * cap : 64;
            cli_pair *np = realloc(s->pairs, cap * sizeof *np);
            if (!np) {
                lp_pair_free(&q), free(txt);
                LP_FAIL(LP_ERR_OOM, "out of memory");
            }
            s->pairs = np;
        }
        int index = s->n + s->n_bad;
        s->pairs[s->n++] = (cli_pair){.index = index, .line = line + 1, .clean = q.clean, .corrupted = q.corrupted, .T = q.T,
                                  .answer = q.answer, .wrong = q.wrong};
    }
    free(txt);
    return LP_OK;
}

int cli_report_bad(const args *a, const cli_pairs *sw, int rc) {
    if (!sw->n_bad) return rc;
    /* the sweep went on; the bad lines are listed, and the exit status says so */
    fprintf(stderr, "loupe: %s: %d bad line%s skipped:", lp_cfg_str(&a->cfg, "attrib.pairs"), sw->n_bad, sw->n_bad > 1 ? "s" : "");
    for (int b = 0; b < sw->n_bad; b++) fprintf(stderr, " line %d (%s)%s", sw->bad[b].line, sw->bad[b].why, b + 1 < sw->n_bad ? ";" : "");
    fputc('\n', stderr);
    return 2;
}
