/* status.h: how every loupe library call reports failure.
 *
 * Library code never prints or exits. A failing call records one human-readable
 * line (naming the file, key or tensor and the problem) plus the source location
 * that raised it, and returns a non-zero lp_status up the stack. Only the CLI and
 * bench mains print lp_last_error() and choose an exit code. */
#ifndef LOUPE_STATUS_H
#define LOUPE_STATUS_H

#ifdef __cplusplus
extern "C" {
#endif

typedef enum lp_status {
    LP_OK = 0,
    /* bad input: the user can fix it (CLI exit status 2) */
    LP_ERR_IO,        /* file missing, unreadable, truncated */
    LP_ERR_FORMAT,    /* file readable but malformed */
    LP_ERR_SHAPE,     /* shapes disagree with each other or with the config */
    LP_ERR_ARG,       /* bad argument or config value */
    LP_ERR_NOT_FOUND, /* unknown name: hook, tensor, key */
    LP_ERR_BUSY,      /* the output directory is held by another running job */
    /* failures while working (CLI exit status 1) */
    LP_ERR_OOM,
    LP_ERR_CUDA,      /* a CUDA, cuBLAS or NCCL call failed */
    LP_ERR_NO_CUDA,   /* asked for the GPU in a build or on a machine without one */
    LP_ERR_WRITE,     /* an output could not be written, flushed or renamed (full disk, I/O error) */
    LP_ERR_INTERNAL,
    LP_ERR_PEER,      /* another process of the job died or stopped answering (dist.h) */
} lp_status;

/* Records the message (printf-style) and where it was raised; returns st. */
lp_status lp_set_error(lp_status st, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* The last recorded message (one line, no trailing newline); "" if none. */
const char *lp_last_error(void);
/* "file.c:123" of the last recorded error. */
const char *lp_last_error_where(void);
const char *lp_status_name(lp_status st);
/* 2 for bad input, 1 for failures while working, 0 for LP_OK. */
int lp_status_exit_code(lp_status st);

/* An error status with its message, recording where it was raised. */
#define LP_ERR(st, ...) lp_set_error((st), __FILE__, __LINE__, __VA_ARGS__)
#define LP_FAIL(st, ...) return LP_ERR((st), __VA_ARGS__)
#define LP_CHECK(expr)                                                          \
    do {                                                                        \
        lp_status lp_s_ = (expr);                                               \
        if (lp_s_ != LP_OK) return lp_s_;                                       \
    } while (0)
/* For functions with one cleanup label: sets `st` and jumps to `label`. */
#define LP_TRY(st, label, expr)                                                 \
    do {                                                                        \
        (st) = (expr);                                                          \
        if ((st) != LP_OK) goto label;                                          \
    } while (0)

#ifdef __cplusplus
}
#endif
#endif
