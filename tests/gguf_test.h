/* gguf_test.h: what the GGUF reader tests (test_gguf.c, test_gguf_corrupt.c) share. */
#ifndef LOUPE_TEST_GGUF_H
#define LOUPE_TEST_GGUF_H

#include <criterion/criterion.h>
#include <string.h>

#include "loupe/gguf.h"
#include "loupe/status.h"

#define OK(expr)                                                                            \
    do {                                                                                    \
        lp_status s_ = (expr);                                                              \
        cr_assert_eq(s_, LP_OK, "%s: %s: %s", #expr, lp_status_name(s_), lp_last_error());  \
    } while (0)

/* One CPU context for the whole binary. */
static inline lp_ctx *cpu(void) {
    static lp_ctx c;
    static int ready;
    if (!ready) {
        OK(lp_ctx_init(&c, LP_CPU, LP_F32));
        ready = 1;
    }
    return &c;
}

/* got is want, with a one-line message that contains phrase. */
static inline void expect_err(lp_status got, lp_status want, const char *phrase) {
    const char *m = lp_last_error();
    cr_expect_eq(got, want, "status %s, want %s: %s", lp_status_name(got), lp_status_name(want), m);
    cr_expect(strstr(m, phrase) != NULL, "message '%s' lacks '%s'", m, phrase);
    cr_expect(strchr(m, '\n') == NULL, "message is not one line: %s", m);
}

#endif
