/* output.h: writing results safely. One writer per output (an flock held for the job's
 * life, released by the kernel however the process ends), temporary names no other
 * process can share, write errors that say which file, and content fingerprints so that
 * a resumed job can tell whether its inputs are still the same. */
#ifndef LOUPE_OUTPUT_H
#define LOUPE_OUTPUT_H

#include <stddef.h>
#include <stdint.h>

#include "loupe/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lp_lock {
    int fd;              /* -1: not held */
    int unlink_on_release;
    char path[4096];     /* the lock file */
} lp_lock;

/* Takes the output's lock without waiting. A directory output (is_dir) is created if
 * missing and locked through DIR/.lock; a file output through FILE.lock (removed again on
 * release). The lock file names the holder (pid and host). LP_ERR_BUSY when another
 * process holds it: "OUT is being written by pid N (on host H); wait for it or choose
 * another output". */
lp_status lp_lock_output(lp_lock *l, const char *out, int is_dir);
/* Releases a held lock (a no-op for one never taken). */
void lp_lock_release(lp_lock *l);

/* "<path>.tmp.<pid>.<random>" into buf: a name no other process or call will pick. */
void lp_tmp_name(char *buf, size_t n, const char *path);
/* Whether a directory entry is a temporary file of an earlier run: NAME.tmp.<pid>.<hex>,
 * or NAME.tmp for loupe's own file names (shard-*, meta.json, cfg.json, step-*, ...). */
int lp_is_tmp_name(const char *name);
/* Removes the temporary files of earlier runs in dir. Call it only under dir's lock:
 * otherwise it could delete another running job's file in flight. */
lp_status lp_remove_stale_tmp(const char *dir);

/* The status for a failed write, flush, create or rename: LP_ERR_WRITE (exit 1) for
 * full disks and I/O errors, LP_ERR_IO (exit 2) for paths the user can fix (no such
 * directory, permission denied, read-only file system). */
lp_status lp_write_status(int err);
/* Writes all n bytes at the fd's position (pos < 0) or at offset pos; errors name path. */
lp_status lp_write_fd(int fd, const void *buf, size_t n, long long pos, const char *path);

/* Size and FNV-1a 64 hash of a file's bytes (a directory: of its regular files' names
 * and sizes, which is what changes when a checkpoint is replaced). */
lp_status lp_fingerprint(const char *path, int64_t *size, uint64_t *hash);

/* ---- file helpers ---- */
/* Reads a whole file into a NUL-terminated buffer (free it); NULL with errno set on failure. */
char *lp_read_file(const char *path, size_t *len);
/* Writes a file atomically: a unique temporary name beside it, fsync, rename. */
lp_status lp_write_file_atomic(const char *path, const void *data, size_t n);
/* Creates dir and any missing parents (existing ones are fine). */
lp_status lp_mkdir_p(const char *dir);
/* Removes a file or a directory tree; a path that does not exist is fine. */
lp_status lp_remove_tree(const char *path);

#ifdef __cplusplus
}
#endif
#endif
