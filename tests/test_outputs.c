/* test_outputs.c: results researchers can trust. One writer per output (a second run is
 * refused naming the holder), full disks exit 1 and leave nothing that says complete,
 * resumed sweeps repair a torn last line and never write a pair twice, a resume with
 * other settings or other input content is refused naming the key, and a finished
 * train-sae run reruns as a no-op. Runs build/loupe (or $LOUPE_CLI). */
#include <cjson/cJSON.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "loupe/output.h"
#include "loupe/safetensors.h"
#include "loupe/tokens.h"
#include "testutil.h"

#define MODEL LP_FIXTURES "/gpt2-tiny"
static char dir[64];
static char out_txt[1 << 16], err_txt[1 << 16];

static void mk(void) {
    snprintf(dir, sizeof dir, "/tmp/loupe-out-XXXXXX");
    cr_assert(mkdtemp(dir) != NULL);
}
static void rm(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_expect(system(cmd) == 0);
}
TestSuite(outputs, .init = mk, .fini = rm, .timeout = 120);

static const char *tmp(const char *name) {
    static char p[4][256];
    static int i;
    i = (i + 1) % 4;
    snprintf(p[i], sizeof p[i], "%s/%s", dir, name);
    return p[i];
}

static char *slurp(const char *path) {
    size_t n;
    char *s = lp_read_file(path, &n);
    return s ? s : strdup("");
}

static void slurp_into(const char *path, char *buf, size_t n) {
    FILE *f = fopen(path, "rb");
    size_t k = f ? fread(buf, 1, n - 1, f) : 0;
    buf[k] = 0;
    if (f) fclose(f);
}

/* Runs `loupe ARGS` with files limited to fsize bytes (0: no limit; writes past it fail
 * with EFBIG, as on a full disk); returns the exit status, fills out_txt / err_txt. */
static int loupe_limited(long fsize, const char *fmt, ...) {
    char args[3000], cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    const char *bin = getenv("LOUPE_CLI") ? getenv("LOUPE_CLI") : "build/loupe";
    snprintf(cmd, sizeof cmd, "%s %s >%s/out.txt 2>%s/err.txt", bin, args, dir, dir);
    pid_t pid = fork();
    cr_assert(pid >= 0);
    if (pid == 0) {
        if (fsize > 0) {
            signal(SIGXFSZ, SIG_IGN); /* inherited through exec: write returns EFBIG instead of killing */
            struct rlimit rl = {(rlim_t)fsize, (rlim_t)fsize};
            setrlimit(RLIMIT_FSIZE, &rl);
        }
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    int rc;
    waitpid(pid, &rc, 0);
    char p[128];
    snprintf(p, sizeof p, "%s/out.txt", dir);
    slurp_into(p, out_txt, sizeof out_txt);
    snprintf(p, sizeof p, "%s/err.txt", dir);
    slurp_into(p, err_txt, sizeof err_txt);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}
#define loupe(...) loupe_limited(0, __VA_ARGS__)

static int one_line(const char *s) {
    const char *nl = strchr(s, '\n');
    return nl && nl[1] == 0;
}

/* Holds path's lock as a running job would: flock on the lock file naming this process. */
static int hold_lock(const char *lockfile) {
    int fd = open(lockfile, O_RDWR | O_CREAT, 0644);
    cr_assert(fd >= 0, "%s", lockfile);
    cr_assert(flock(fd, LOCK_EX | LOCK_NB) == 0);
    char line[128];
    int n = snprintf(line, sizeof line, "pid %ld host testhost\n", (long)getpid());
    cr_assert(pwrite(fd, line, n, 0) == n);
    return fd;
}

static void write_pairs(const char *path, int n) {
    FILE *f = fopen(path, "w");
    cr_assert(f);
    for (int i = 0; i < n; i++)
        fprintf(f, "{\"clean\": [%d, 2, 3, 4, 5, 6], \"corrupted\": [%d, 2, 9, 4, 5, 6], \"answer\": 7, \"wrong_answer\": 8}\n", 1 + i, 1 + i);
    cr_assert(fclose(f) == 0);
}

#define SWEEP "attribute " MODEL " --attrib.pairs=%s --attrib.out=%s --attrib.batch=1 --attrib.top=5"

Test(outputs, exit_codes_of_the_new_statuses) {
    cr_expect_eq(lp_status_exit_code(LP_ERR_WRITE), 1, "a full disk is a failure while working");
    cr_expect_eq(lp_status_exit_code(LP_ERR_BUSY), 2, "a busy output is the user's to fix");
    char a[256], b[256];
    lp_tmp_name(a, sizeof a, "x/shard.safetensors");
    lp_tmp_name(b, sizeof b, "x/shard.safetensors");
    cr_expect(strcmp(a, b) != 0, "two temporary names are the same: %s", a);
    cr_expect(lp_is_tmp_name(strrchr(a, '/') + 1) && lp_is_tmp_name("meta.json.tmp") && !lp_is_tmp_name("meta.json"));
    /* a user's own files in an output directory are left alone */
    cr_expect(!lp_is_tmp_name("notes.tmp") && !lp_is_tmp_name("backup.tmp.d") && !lp_is_tmp_name("x.tmp.12.zz"));
}

Test(outputs, a_second_writer_is_refused_naming_the_holder) {
    write_pairs(tmp("pairs.jsonl"), 2);
    char want[64];
    snprintf(want, sizeof want, "is being written by pid %ld (on host testhost)", (long)getpid());
    char pairs[256], atp[256], exact[256], store[256];
    snprintf(pairs, sizeof pairs, "%s", tmp("pairs.jsonl"));
    snprintf(atp, sizeof atp, "%s", tmp("atp"));
    snprintf(exact, sizeof exact, "%s", tmp("exact"));
    snprintf(store, sizeof store, "%s", tmp("store"));
    struct { const char *what, *lockfile, *fmt, *arg1, *arg2; } cases[] = {
        {"attribute", "atp/.lock", SWEEP, pairs, atp},
        {"patch", "exact/.lock", "patch " MODEL " --attrib.pairs=%s --attrib.out=%s", pairs, exact},
        {"cache", "store/.lock", "cache --model.path=" MODEL " --data.tokens=" MODEL "/tokens.npy --cache.hooks=hook_embed --cache.out=%s%s",
         store, ""},
    };
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        char d[256];
        snprintf(d, sizeof d, "%s", tmp(cases[c].lockfile));
        *strrchr(d, '/') = 0;
        mkdir(d, 0755);
        int fd = hold_lock(tmp(cases[c].lockfile));
        int rc = loupe(cases[c].fmt, cases[c].arg1, cases[c].arg2);
        cr_expect_eq(rc, 2, "%s: exit %d; %s", cases[c].what, rc, err_txt);
        cr_expect(strstr(err_txt, want) && strstr(err_txt, "wait for it or choose another output"), "%s: %s", cases[c].what, err_txt);
        cr_expect(one_line(err_txt), "%s: %s", cases[c].what, err_txt);
        close(fd); /* the holder ends: the same command now runs */
        rc = loupe(cases[c].fmt, cases[c].arg1, cases[c].arg2);
        cr_expect_eq(rc, 0, "%s after the holder ended: exit %d; %s", cases[c].what, rc, err_txt);
    }
    /* train-sae on the store just written, and encode into a file (FILE.lock beside it) */
    mkdir(tmp("sae"), 0755);
    int fd = hold_lock(tmp("sae/.lock"));
    int rc = loupe("train-sae %s --data.hook=hook_embed --train.out=%s --sae.d_sae=32 --sae.k=4 --train.tokens=256 --train.batch_tokens=32 "
                   "--train.shuffle_tokens=32 --train.b_dec_init=zeros",
                   tmp("store"), tmp("sae"));
    cr_expect_eq(rc, 2, "train-sae: exit %d; %s", rc, err_txt);
    cr_expect(strstr(err_txt, want), "train-sae: %s", err_txt);
    close(fd);
    rc = loupe("train-sae %s --data.hook=hook_embed --train.out=%s --sae.d_sae=32 --sae.k=4 --train.tokens=256 --train.batch_tokens=32 "
               "--train.shuffle_tokens=32 --train.b_dec_init=zeros",
               tmp("store"), tmp("sae"));
    cr_assert_eq(rc, 0, "%s", err_txt);
    fd = hold_lock(tmp("lat.safetensors.lock"));
    rc = loupe("encode %s --data.store=%s --encode.out=%s", tmp("sae"), tmp("store"), tmp("lat.safetensors"));
    cr_expect_eq(rc, 2, "encode: exit %d; %s", rc, err_txt);
    cr_expect(strstr(err_txt, want), "encode: %s", err_txt);
    close(fd);
    unlink(tmp("lat.safetensors.lock"));
    rc = loupe("encode %s --data.store=%s --encode.out=%s", tmp("sae"), tmp("store"), tmp("lat.safetensors"));
    cr_expect_eq(rc, 0, "encode: %s", err_txt);
    struct stat sb;
    cr_expect(stat(tmp("lat.safetensors.lock"), &sb) != 0, "encode left its lock file behind");
}

Test(outputs, a_full_disk_exits_1_and_nothing_says_complete) {
    write_pairs(tmp("pairs.jsonl"), 3);
    /* results.jsonl on a device that is always full */
    mkdir(tmp("atp"), 0755);
    cr_assert(symlink("/dev/full", tmp("atp/results.jsonl")) == 0);
    int rc = loupe(SWEEP, tmp("pairs.jsonl"), tmp("atp"));
    cr_expect_eq(rc, 1, "exit %d; %s", rc, err_txt);
    cr_expect(strstr(err_txt, "results.jsonl: write failed: No space left on device"), "%s", err_txt);
    cr_expect(one_line(err_txt), "%s", err_txt);
    cr_expect(strstr(out_txt, "pairs done") == NULL, "a failed sweep reported itself done: %s", out_txt);
    /* every file limited to 1 KiB: the first scores file (1.9 KB) cannot be written */
    rc = loupe_limited(1024, SWEEP, tmp("pairs.jsonl"), tmp("atp2"));
    cr_expect_eq(rc, 1, "exit %d; %s", rc, err_txt);
    cr_expect(strstr(err_txt, "scores-atp-000000.safetensors.tmp."), "the message names the file: %s", err_txt);
    cr_expect(strstr(out_txt, "pairs done") == NULL, "%s", out_txt);
    char *res = slurp(tmp("atp2/results.jsonl"));
    cr_expect_str_eq(res, "", "results of pairs whose scores were never written");
    free(res);
    /* the store: its first shard does not fit; meta.json never says complete */
    rc = loupe_limited(4096, "cache --model.path=" MODEL " --data.tokens=" MODEL "/tokens.npy --cache.hooks=blocks.1.hook_resid_post "
                             "--cache.shard_sequences=2 --cache.out=%s", tmp("store"));
    cr_expect_eq(rc, 1, "exit %d; %s", rc, err_txt);
    cr_expect(strstr(err_txt, "shard-00000.safetensors.tmp."), "%s", err_txt);
    char *meta = slurp(tmp("store/meta.json"));
    cr_expect(strstr(meta, "\"complete\":\ttrue") == NULL, "%s", meta);
    free(meta);
}

/* Lines of a results file, and whether any pair index appears twice. */
static int count_lines(const char *txt, int *dup) {
    int n = 0, seen[64] = {0};
    *dup = 0;
    for (const char *p = txt; (p = strstr(p, "{\"index\":")); p++) {
        int ix = atoi(p + 9);
        if (ix >= 0 && ix < 64 && seen[ix]++) *dup = 1;
        n++;
    }
    return n;
}

Test(outputs, a_torn_results_line_is_repaired_and_no_pair_is_written_twice) {
    write_pairs(tmp("pairs.jsonl"), 4);
    cr_assert_eq(loupe(SWEEP, tmp("pairs.jsonl"), tmp("full")), 0, "%s", err_txt);
    char *full = slurp(tmp("full/results.jsonl"));
    /* a kill in the middle of pair 3's line: its scores file is on disk, its line torn */
    cr_assert_eq(loupe(SWEEP, tmp("pairs.jsonl"), tmp("killed")), 0, "%s", err_txt);
    char *lines = slurp(tmp("killed/results.jsonl"));
    char *last = strstr(lines, "{\"index\":3,");
    cr_assert(last);
    FILE *f = fopen(tmp("killed/results.jsonl"), "w");
    fwrite(lines, 1, (size_t)(last - lines) + 25, f);
    fclose(f);
    free(lines);
    /* and a dead run's temporary file */
    f = fopen(tmp("killed/scores-atp-000003.safetensors.tmp.999999.0"), "w");
    fclose(f);
    int rc = loupe(SWEEP, tmp("pairs.jsonl"), tmp("killed"));
    cr_expect_eq(rc, 0, "%s", err_txt);
    cr_expect(strstr(out_txt, "1 pairs done (3 already"), "%s", out_txt);
    cr_expect(strstr(err_txt, "cut an incomplete last line"), "%s", err_txt);
    char *again = slurp(tmp("killed/results.jsonl"));
    int dup;
    cr_expect_eq(count_lines(again, &dup), 4, "%s", again);
    cr_expect(!dup, "a pair written twice: %s", again);
    cr_expect_str_eq(again, full, "the repaired results differ from an uninterrupted run's");
    struct stat sb;
    cr_expect(stat(tmp("killed/scores-atp-000003.safetensors.tmp.999999.0"), &sb) != 0, "a dead run's temporary file stayed");
    /* the scores agree: pair 3 is in exactly one file, the same as the uninterrupted run's */
    char *s1 = slurp(tmp("full/scores-atp-000003.safetensors")), *s2 = slurp(tmp("killed/scores-atp-000003.safetensors"));
    cr_expect(s1[0] && strcmp(s1, s2) == 0);
    free(s1), free(s2);
    /* a kill after the scores rename but before any results line: the orphan is removed and redone */
    cr_assert_eq(loupe(SWEEP, tmp("pairs.jsonl"), tmp("orphan")), 0, "%s", err_txt);
    lines = slurp(tmp("orphan/results.jsonl"));
    *strstr(lines, "{\"index\":2,") = 0;
    f = fopen(tmp("orphan/results.jsonl"), "w");
    fputs(lines, f);
    fclose(f);
    free(lines);
    rc = loupe(SWEEP, tmp("pairs.jsonl"), tmp("orphan"));
    cr_expect_eq(rc, 0, "%s", err_txt);
    cr_expect(strstr(out_txt, "2 pairs done (2 already"), "%s", out_txt);
    again = (free(again), slurp(tmp("orphan/results.jsonl")));
    cr_expect_str_eq(again, full);
    /* results listing a pair whose scores are gone is refused, not silently mixed */
    unlink(tmp("orphan/scores-atp-000001.safetensors"));
    rc = loupe(SWEEP, tmp("pairs.jsonl"), tmp("orphan"));
    cr_expect_eq(rc, 2, "%s", err_txt);
    cr_expect(strstr(err_txt, "lists pair 1 but no scores-atp-*.safetensors holds its scores"), "%s", err_txt);
    free(again), free(full);
}

/* Pairs holding score tensors in the files of DIR matching scores-atp-*: each must be in exactly one. */
static void expect_scores_once(const char *d, int n_pairs) {
    int seen[16] = {0};
    char cmd[300], name[256];
    snprintf(cmd, sizeof cmd, "ls %s | grep '^scores-atp-.*[.]safetensors$'", d);
    FILE *p = popen(cmd, "r");
    while (fgets(name, sizeof name, p)) {
        name[strcspn(name, "\n")] = 0;
        char path[600];
        snprintf(path, sizeof path, "%s/%s", d, name);
        lp_st_file f;
        cr_assert_eq(lp_st_open(&f, path), LP_OK, "%s", lp_last_error());
        int mine[16] = {0};
        for (int i = 0; i < f.n; i++) mine[atoi(f.tensors[i].name + 4) & 15] = 1;
        for (int i = 0; i < 16; i++) seen[i] += mine[i];
        lp_st_close(&f);
    }
    pclose(p);
    for (int i = 0; i < n_pairs; i++) cr_expect_eq(seen[i], 1, "pair %d is in %d scores files", i, seen[i]);
}

Test(outputs, a_batch_cut_inside_is_reconciled_with_its_scores_file) {
    write_pairs(tmp("pairs.jsonl"), 4);
    const char *batch2 = "attribute " MODEL " --attrib.pairs=%s --attrib.out=%s --attrib.batch=2 --attrib.top=5";
    cr_assert_eq(loupe(batch2, tmp("pairs.jsonl"), tmp("atp")), 0, "%s", err_txt);
    /* the second batch (pairs 2 and 3, one scores file) reached results.jsonl only up to pair 2 */
    char *lines = slurp(tmp("atp/results.jsonl"));
    *strstr(lines, "{\"index\":3,") = 0;
    FILE *f = fopen(tmp("atp/results.jsonl"), "w");
    fputs(lines, f);
    fclose(f);
    free(lines);
    int rc = loupe(batch2, tmp("pairs.jsonl"), tmp("atp"));
    cr_expect_eq(rc, 0, "%s", err_txt);
    cr_expect(strstr(out_txt, "1 pairs done (3 already"), "%s", out_txt);
    char *again = slurp(tmp("atp/results.jsonl"));
    int dup;
    cr_expect_eq(count_lines(again, &dup), 4, "%s", again);
    cr_expect(!dup, "%s", again);
    free(again);
    expect_scores_once(tmp("atp"), 4);
}

Test(outputs, a_resume_with_other_settings_is_refused_naming_the_key) {
    write_pairs(tmp("pairs.jsonl"), 2);
    cr_assert_eq(loupe(SWEEP, tmp("pairs.jsonl"), tmp("atp")), 0, "%s", err_txt);
    struct { const char *extra, *key; } cases[] = {
        {"--attrib.metric=logprob", "attrib.metric = \"logit_diff\", not \"logprob\""},
        {"--attrib.ig_steps=4", "attrib.ig_steps = 0, not 4"},
        {"--attrib.nodes=hook_resid_pre", "attrib.nodes"},
        {"--attrib.grad_at=clean", "attrib.grad_at"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        int rc = loupe(SWEEP " %s", tmp("pairs.jsonl"), tmp("atp"), cases[c].extra);
        cr_expect_eq(rc, 2, "%s: exit %d", cases[c].extra, rc);
        cr_expect(strstr(err_txt, cases[c].key) && one_line(err_txt), "%s: %s", cases[c].extra, err_txt);
    }
    /* the same path with other content */
    write_pairs(tmp("pairs.jsonl"), 3);
    int rc = loupe(SWEEP, tmp("pairs.jsonl"), tmp("atp"));
    cr_expect_eq(rc, 2, "exit %d", rc);
    cr_expect(strstr(err_txt, "written with attrib.pairs ="), "%s", err_txt);
    /* patch into attribute's output */
    write_pairs(tmp("pairs.jsonl"), 2);
    rc = loupe("patch " MODEL " --attrib.pairs=%s --attrib.out=%s --attrib.top=5", tmp("pairs.jsonl"), tmp("atp"));
    cr_expect_eq(rc, 2, "exit %d", rc);
    cr_expect(strstr(err_txt, "command = \"attribute\", not \"patch\""), "%s", err_txt);
    /* the pairs restored: the same job resumes */
    rc = loupe(SWEEP, tmp("pairs.jsonl"), tmp("atp"));
    cr_expect_eq(rc, 0, "%s", err_txt);
    cr_expect(strstr(out_txt, "0 pairs done (2 already"), "%s", out_txt);
}

Test(outputs, cache_refuses_a_changed_token_file_and_train_an_incomplete_store) {
    int32_t a[32], b[32];
    for (int i = 0; i < 32; i++) a[i] = i + 1, b[i] = 40 - i;
    cr_assert_eq(lp_npy_write_i32(tmp("t.npy"), a, 4, 8), LP_OK);
    const char *args = "cache --model.path=" MODEL " --data.tokens=%s --cache.hooks=hook_embed --cache.shard_sequences=2 --cache.out=%s";
    cr_assert_eq(loupe(args, tmp("t.npy"), tmp("store")), 0, "%s", err_txt);
    cr_assert_eq(lp_npy_write_i32(tmp("t.npy"), b, 4, 8), LP_OK); /* same path, same size, other tokens */
    int rc = loupe(args, tmp("t.npy"), tmp("store"));
    cr_expect_eq(rc, 2, "exit %d; %s", rc, err_txt);
    cr_expect(strstr(err_txt, "different 'tokens_fingerprint'") && one_line(err_txt), "%s", err_txt);
    /* a store whose run stopped after its first shard: meta.json says complete: false */
    char *meta = slurp(tmp("store/meta.json"));
    cJSON *j = cJSON_Parse(meta);
    cJSON_ReplaceItemInObject(j, "complete", cJSON_CreateFalse());
    char *txt = cJSON_Print(j);
    FILE *f = fopen(tmp("store/meta.json"), "w");
    fputs(txt, f);
    fclose(f);
    free(txt), free(meta);
    cJSON_Delete(j);
    const char *train = "train-sae %s --data.hook=hook_embed --train.out=%s --sae.d_sae=32 --sae.k=4 --train.tokens=64 --train.batch_tokens=16 "
                        "--train.shuffle_tokens=16 --train.b_dec_init=zeros %s";
    rc = loupe(train, tmp("store"), tmp("sae"), "");
    cr_expect_eq(rc, 2, "exit %d; %s", rc, err_txt);
    cr_expect(strstr(err_txt, "meta.json: the store is not complete") && strstr(err_txt, "data.allow_incomplete=true"), "%s", err_txt);
    rc = loupe(train, tmp("store"), tmp("sae"), "--data.allow_incomplete=true");
    cr_expect_eq(rc, 0, "%s", err_txt);
    rc = loupe("eval-sae %s --data.store=%s", tmp("sae"), tmp("store"));
    cr_expect_eq(rc, 2, "eval-sae on an incomplete store: exit %d; %s", rc, err_txt);
    cr_expect(strstr(err_txt, "the store is not complete"), "%s", err_txt);
}

Test(outputs, a_finished_train_sae_reruns_as_a_no_op) {
    cr_assert_eq(loupe("cache --model.path=" MODEL " --data.tokens=" MODEL "/tokens.npy --cache.hooks=hook_embed --cache.out=%s", tmp("store")), 0,
                 "%s", err_txt);
    char args[1024];
    snprintf(args, sizeof args, "train-sae %s --data.hook=hook_embed --train.out=%s --sae.d_sae=32 --sae.k=4 --train.tokens=256 "
             "--train.batch_tokens=32 --train.shuffle_tokens=32 --train.checkpoint_every=64 --train.log_every=3 --train.b_dec_init=zeros",
             tmp("store"), tmp("sae"));
    cr_assert_eq(loupe("%s", args), 0, "%s", err_txt);
    char *w1 = slurp(tmp("sae/sae_weights.safetensors")), *m1 = slurp(tmp("sae/metrics.jsonl"));
    int rc = loupe("%s --json", args);
    cr_expect_eq(rc, 0, "rerunning a finished run: exit %d; %s", rc, err_txt);
    cr_expect(strstr(out_txt, "\"already_complete\":true"), "%s", out_txt);
    rc = loupe("%s", args);
    cr_expect(strstr(out_txt, "already holds this SAE"), "%s", out_txt);
    char *w2 = slurp(tmp("sae/sae_weights.safetensors")), *m2 = slurp(tmp("sae/metrics.jsonl"));
    cr_expect(strcmp(w1, w2) == 0 && strcmp(m1, m2) == 0, "the rerun changed the SAE or its metrics");
    free(w1), free(w2), free(m1), free(m2);
    /* a different store content under the same path is not resumed into */
    cr_assert_eq(loupe("cache --model.path=" MODEL " --data.tokens=" MODEL "/tokens.npy --cache.hooks=hook_embed,hook_pos_embed --cache.out=%s",
                       tmp("store2")), 0, "%s", err_txt);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf %s && mv %s %s", tmp("store"), tmp("store2"), tmp("store"));
    cr_assert(system(cmd) == 0);
    rc = loupe("%s", args);
    cr_expect_eq(rc, 2, "exit %d; %s", rc, err_txt);
    cr_expect(strstr(err_txt, "data.store: ") && strstr(err_txt, "changed since the checkpoint"), "%s", err_txt);
}
