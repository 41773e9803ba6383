/* host/core/: the bottom layer, used by all the others and using none of them: the status
 * and error record (status.c), the execution context and host tensors (tensor.c; its CUDA
 * half is kernels/ctx.cu and kernels/capture.cu, declared in device.h), writing outputs
 * safely and the file helpers (output.c), the random numbers (rng.h).
 *
 * status.c: the last-error record behind include/loupe/status.h.
 * Thread-local so that a copy thread's failure cannot overwrite the caller's message. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "loupe/status.h"

static _Thread_local char g_msg[1024];
static _Thread_local char g_where[256];

lp_status lp_set_error(lp_status st, const char *file, int line, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_msg, sizeof g_msg, fmt, ap);
    va_end(ap);
    /* one line, always: a message built from file contents could hold a newline */
    for (char *p = g_msg; *p; p++)
        if (*p == '\n' || *p == '\r') *p = ' ';
    const char *base = strrchr(file, '/');
    snprintf(g_where, sizeof g_where, "%s:%d", base ? base + 1 : file, line);
    return st;
}

const char *lp_last_error(void) { return g_msg; }
const char *lp_last_error_where(void) { return g_where; }

const char *lp_status_name(lp_status st) {
    switch (st) {
    case LP_OK: return "ok";
    case LP_ERR_IO: return "io";
    case LP_ERR_FORMAT: return "format";
    case LP_ERR_SHAPE: return "shape";
    case LP_ERR_ARG: return "argument";
    case LP_ERR_NOT_FOUND: return "not found";
    case LP_ERR_BUSY: return "busy";
    case LP_ERR_OOM: return "out of memory";
    case LP_ERR_CUDA: return "cuda";
    case LP_ERR_NO_CUDA: return "no cuda";
    case LP_ERR_WRITE: return "write";
    case LP_ERR_INTERNAL: return "internal";
    case LP_ERR_PEER: return "peer";
    }
    return "unknown";
}

int lp_status_exit_code(lp_status st) {
    switch (st) {
    case LP_OK: return 0;
    case LP_ERR_IO: case LP_ERR_FORMAT: case LP_ERR_SHAPE: case LP_ERR_ARG: case LP_ERR_NOT_FOUND: case LP_ERR_BUSY:
        return 2;
    default: return 1;
    }
}
