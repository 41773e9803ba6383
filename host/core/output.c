/* output.c: everything of output.h: the one-writer lock, unique temporary names, checked
 * writes and content fingerprints, and the file helpers every reader and writer above
 * shares (whole-file reads, atomic whole-file writes, directory trees). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "loupe/output.h"

lp_status lp_write_status(int err) {
    switch (err) {
    case ENOENT: case ENOTDIR: case EACCES: case EPERM: case EROFS: case EISDIR: case ENAMETOOLONG: case ELOOP:
        return LP_ERR_IO;
    default: return LP_ERR_WRITE;
    }
}

lp_status lp_write_fd(int fd, const void *buf, size_t n, long long pos, const char *path) {
    const char *p = buf;
    while (n) {
        ssize_t w = pos < 0 ? write(fd, p, n) : pwrite(fd, p, n, (off_t)pos);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            int e = w < 0 ? errno : ENOSPC;
            LP_FAIL(LP_ERR_WRITE, "%s: write failed: %s", path, strerror(e));
        }
        p += w, n -= (size_t)w;
        if (pos >= 0) pos += w;
    }
    return LP_OK;
}

/* The holder line of a lock file, "pid N (on host H)", or "" when unreadable. */
static void read_holder(int fd, char *who, size_t n) {
    char buf[320] = "";
    ssize_t r = pread(fd, buf, sizeof buf - 1, 0);
    buf[r > 0 ? r : 0] = 0;
    long pid = 0;
    char host[256] = "";
    if (sscanf(buf, "pid %ld host %255s", &pid, host) >= 1 && pid > 0)
        snprintf(who, n, "pid %ld (on host %s)", pid, host[0] ? host : "?");
    else
        snprintf(who, n, "another process");
}

lp_status lp_lock_output(lp_lock *l, const char *out, int is_dir) {
    memset(l, 0, sizeof *l);
    l->fd = -1;
    if (is_dir) {
        LP_CHECK(lp_mkdir_p(out));
        snprintf(l->path, sizeof l->path, "%s/.lock", out);
    } else {
        snprintf(l->path, sizeof l->path, "%s.lock", out);
        l->unlink_on_release = 1;
    }
    for (int tries = 0; tries < 100; tries++) {
        int fd = open(l->path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (fd < 0) LP_FAIL(lp_write_status(errno), "%s: cannot create the lock file: %s", l->path, strerror(errno));
        if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
            int e = errno;
            char who[320];
            read_holder(fd, who, sizeof who);
            close(fd);
            if (e == EWOULDBLOCK)
                LP_FAIL(LP_ERR_BUSY, "%s is being written by %s; wait for it or choose another output", out, who);
            LP_FAIL(LP_ERR_IO, "%s: cannot lock: %s", l->path, strerror(e));
        }
        /* a file lock removed by its releasing holder after we opened it: ours is stale */
        struct stat a, b;
        if (l->unlink_on_release && (fstat(fd, &a) != 0 || stat(l->path, &b) != 0 || a.st_ino != b.st_ino || a.st_dev != b.st_dev)) {
            close(fd);
            continue;
        }
        char host[256] = "", line[320];
        gethostname(host, sizeof host - 1);
        int len = snprintf(line, sizeof line, "pid %ld host %s\n", (long)getpid(), host[0] ? host : "?");
        lp_status st = ftruncate(fd, 0) == 0 ? lp_write_fd(fd, line, (size_t)len, 0, l->path)
                                             : LP_ERR(LP_ERR_WRITE, "%s: cannot write: %s", l->path, strerror(errno));
        if (st != LP_OK) {
            close(fd);
            return st;
        }
        l->fd = fd;
        return LP_OK;
    }
    LP_FAIL(LP_ERR_BUSY, "%s: the lock file keeps being replaced; is another job starting and stopping there?", out);
}

void lp_lock_release(lp_lock *l) {
    if (!l || l->fd < 0) return;
    if (l->unlink_on_release) unlink(l->path); /* while still held, so no one locks the old file */
    close(l->fd);
    l->fd = -1;
}

void lp_tmp_name(char *buf, size_t n, const char *path) {
    static atomic_uint counter;
    uint32_t r = 0;
    if (getrandom(&r, sizeof r, GRND_NONBLOCK) != (ssize_t)sizeof r) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        r = (uint32_t)ts.tv_nsec ^ (uint32_t)ts.tv_sec * 2654435761u;
    }
    unsigned c = atomic_fetch_add(&counter, 1);
    snprintf(buf, n, "%s.tmp.%ld.%08x%x", path, (long)getpid(), r, c);
}

/* Only names loupe makes: an output directory may be one the user also keeps other files in. */
int lp_is_tmp_name(const char *name) {
    const char *t = strstr(name, ".tmp.");
    if (t) { /* NAME.tmp.<pid>.<hex>, as lp_tmp_name makes them */
        const char *p = t + 5, *q = p;
        while (*q >= '0' && *q <= '9') q++;
        if (q == p || *q != '.') return 0;
        p = ++q;
        while ((*q >= '0' && *q <= '9') || (*q >= 'a' && *q <= 'f')) q++;
        return q > p && *q == 0;
    }
    /* the fixed NAME.tmp of earlier versions, for loupe's own file names */
    static const char *const ours[] = {"shard-", "meta.json", "cfg.json", "sae_weights", "step-", "scores-", "results.jsonl", "job.json",
                                       "metrics.jsonl", NULL};
    size_t n = strlen(name);
    if (n <= 4 || strcmp(name + n - 4, ".tmp") != 0) return 0;
    for (int i = 0; ours[i]; i++)
        if (strncmp(name, ours[i], strlen(ours[i])) == 0) return 1;
    return 0;
}

lp_status lp_remove_stale_tmp(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return LP_OK;
    struct dirent *e;
    char path[4400];
    lp_status st = LP_OK;
    while ((e = readdir(d)) && st == LP_OK) {
        if (!lp_is_tmp_name(e->d_name)) continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        st = lp_remove_tree(path);
    }
    closedir(d);
    return st;
}

/* A 64-bit FNV-1a over 8-byte words (bytes at the tail): fast enough for token files of
 * gigabytes, and any changed byte changes it. */
static uint64_t hash_bytes(uint64_t h, const unsigned char *p, size_t n) {
    const uint64_t prime = 0x100000001b3ull;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        h = (h ^ w) * prime;
    }
    for (; i < n; i++) h = (h ^ p[i]) * prime;
    return h;
}

static int by_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static lp_status fingerprint_dir(const char *path, int64_t *size, uint64_t *hash) {
    DIR *d = opendir(path);
    if (!d) LP_FAIL(LP_ERR_IO, "%s: cannot read: %s", path, strerror(errno));
    char *names[1024];
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < 1024)
        if (e->d_name[0] != '.' && !(names[n++] = strdup(e->d_name))) break;
    closedir(d);
    if (n && !names[n - 1]) {
        while (n--) free(names[n]);
        LP_FAIL(LP_ERR_OOM, "%s: out of memory", path);
    }
    qsort(names, n, sizeof *names, by_str);
    char p[4400], rec[4400];
    for (int i = 0; i < n; i++) {
        struct stat sb;
        snprintf(p, sizeof p, "%s/%s", path, names[i]);
        if (stat(p, &sb) == 0 && S_ISREG(sb.st_mode)) {
            int len = snprintf(rec, sizeof rec, "%s %lld\n", names[i], (long long)sb.st_size);
            *hash = hash_bytes(*hash, (const unsigned char *)rec, (size_t)len);
            *size += sb.st_size;
        }
        free(names[i]);
    }
    return LP_OK;
}

lp_status lp_fingerprint(const char *path, int64_t *size, uint64_t *hash) {
    *size = 0, *hash = 0xcbf29ce484222325ull;
    struct stat sb;
    if (stat(path, &sb) != 0) LP_FAIL(LP_ERR_IO, "%s: %s", path, strerror(errno));
    if (S_ISDIR(sb.st_mode)) return fingerprint_dir(path, size, hash);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) LP_FAIL(LP_ERR_IO, "%s: cannot read: %s", path, strerror(errno));
    size_t cap = 1 << 20;
    unsigned char *buf = malloc(cap);
    if (!buf) {
        close(fd);
        LP_FAIL(LP_ERR_OOM, "out of memory");
    }
    lp_status st = LP_OK;
    for (;;) { /* whole reads of 8-byte multiples keep the word hash independent of chunking */
        size_t got = 0;
        ssize_t r = 1;
        while (got < cap) {
            r = read(fd, buf + got, cap - got);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break;
            got += (size_t)r;
        }
        if (r < 0) {
            st = LP_ERR(LP_ERR_IO, "%s: read failed: %s", path, strerror(errno));
            break;
        }
        *hash = hash_bytes(*hash, buf, got);
        *size += (int64_t)got;
        if (got < cap) break;
    }
    free(buf);
    close(fd);
    return st;
}

/* ---- file helpers ---- */

char *lp_read_file(const char *path, size_t *len) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return NULL;
    char *buf = NULL;
    long n = fseek(fp, 0, SEEK_END) == 0 ? ftell(fp) : -1;
    if (n >= 0 && fseek(fp, 0, SEEK_SET) == 0 && (buf = malloc((size_t)n + 1)) && fread(buf, 1, (size_t)n, fp) != (size_t)n) {
        free(buf);
        buf = NULL;
        errno = EIO;
    }
    fclose(fp);
    if (buf) {
        buf[n] = 0;
        if (len) *len = (size_t)n;
    }
    return buf;
}

lp_status lp_write_file_atomic(const char *path, const void *data, size_t n) {
    char tmp[4200];
    lp_tmp_name(tmp, sizeof tmp, path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) LP_FAIL(lp_write_status(errno), "%s: cannot create: %s", tmp, strerror(errno));
    lp_status st = lp_write_fd(fd, data, n, 0, tmp);
    if (st == LP_OK && fsync(fd) != 0) st = LP_ERR(LP_ERR_WRITE, "%s: cannot flush: %s", tmp, strerror(errno));
    if (close(fd) != 0 && st == LP_OK) st = LP_ERR(LP_ERR_WRITE, "%s: cannot close: %s", tmp, strerror(errno));
    if (st == LP_OK && rename(tmp, path) != 0)
        st = LP_ERR(lp_write_status(errno), "%s: cannot rename to %s: %s", tmp, path, strerror(errno));
    if (st != LP_OK) unlink(tmp);
    return st;
}

lp_status lp_mkdir_p(const char *dir) {
    char p[4096];
    if (snprintf(p, sizeof p, "%s", dir) >= (int)sizeof p) LP_FAIL(LP_ERR_ARG, "%s: path too long", dir);
    for (char *q = p + 1; *q; q++) {
        if (*q != '/') continue;
        *q = 0;
        if (mkdir(p, 0755) != 0 && errno != EEXIST) LP_FAIL(lp_write_status(errno), "%s: cannot create directory: %s", p, strerror(errno));
        *q = '/';
    }
    if (mkdir(p, 0755) != 0 && errno != EEXIST) LP_FAIL(lp_write_status(errno), "%s: cannot create directory: %s", p, strerror(errno));
    return LP_OK;
}

static int remove_one(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

lp_status lp_remove_tree(const char *path) {
    struct stat sb;
    if (lstat(path, &sb) != 0) return LP_OK;
    if (nftw(path, remove_one, 16, FTW_DEPTH | FTW_PHYS) != 0) LP_FAIL(lp_write_status(errno), "%s: cannot remove: %s", path, strerror(errno));
    return LP_OK;
}
