/* textfile.h: reading the text inputs a user hands to loupe (config files, JSONL prompt
 * pairs, text to tokenize) with errors that name the file: the whole file in one buffer
 * (no line-length limit, pipes and FIFOs too), and a UTF-8 check that gives the offset
 * of the first bad byte. */
#ifndef LOUPE_TEXTFILE_H
#define LOUPE_TEXTFILE_H

#include <stddef.h>

#include "loupe/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Reads path whole into *buf (malloc'ed, NUL-terminated after *len bytes; the text may
 * itself hold NUL bytes). `what` names the file in messages ("config file"). A directory,
 * a missing or unreadable path fails with LP_ERR_IO naming the path. */
lp_status lp_text_read(const char *path, const char *what, char **buf, size_t *len);

/* Offset of the first byte of s[0..n) that does not start a valid UTF-8 sequence
 * (overlong forms, surrogates and code points past U+10FFFF are invalid), or n. */
size_t lp_utf8_invalid_at(const char *s, size_t n);

/* Fails with LP_ERR_FORMAT "NAME: not valid UTF-8: byte 0xXX at offset N" at the first
 * bad byte. */
lp_status lp_utf8_check(const char *s, size_t n, const char *name);

#ifdef __cplusplus
}
#endif
#endif
