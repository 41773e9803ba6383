/* pairs.h: one line of a prompt-pairs JSONL file (`loupe attribute`, `loupe patch`) to
 * token ids, checked against the model before anything is built:
 *
 *   {"clean": "The Eiffel Tower is in", "corrupted": "The Colosseum is in",
 *    "answer": " Paris", "wrong_answer": " Rome"}
 *   {"clean": [1, 2, 3], "corrupted": [1, 5, 3], "answer": 7, "wrong_answer": [8]}
 *
 * clean / corrupted: text (tokenized with the model's tokenizer) or a list of token ids;
 * answer / wrong_answer: exactly one token (a BOS the tokenizer adds to text does not
 * count). Other fields are ignored. Refused, with a message naming file:line and the
 * field (and index): a NUL byte, anything but one JSON object on the line (two objects,
 * trailing text), a field given twice, a token id that is not an integer literal (3.7,
 * 3.0, 1e3) or not in [0, d_vocab), a prompt longer than the context (checked before any
 * list is allocated), invalid UTF-8 or a \u0000 escape in text, wrong types. */
#ifndef LOUPE_PAIRS_H
#define LOUPE_PAIRS_H

#include <stddef.h>
#include <stdint.h>

#include "loupe/status.h"
#include "loupe/tokenizer.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lp_pair {
    int32_t *clean, *corrupted; /* [T] each, malloc'ed */
    int T;                      /* 0: the line was blank (nothing else is set) */
    int32_t answer, wrong;
} lp_pair;

typedef struct lp_pair_opts {
    const char *file;       /* names the file in messages */
    const lp_tokenizer *tk; /* NULL: text fields are refused, id lists still work */
    int d_vocab, n_ctx;
    int pad_left;           /* prompts of different lengths: pad the shorter on the left
                             * with its own first token, instead of refusing the line */
} lp_pair_opts;

/* Parses line[0..len) (no newline; need not be NUL-terminated), line number line_no, into
 * *p. A blank line gives LP_OK with p->T == 0. On failure *p holds nothing to free and
 * the message starts "FILE:LINE: ". Time and memory are linear in len. */
lp_status lp_pair_parse_line(const lp_pair_opts *o, const char *line, size_t len, int line_no, lp_pair *p);
void lp_pair_free(lp_pair *p);

/* One line of a `loupe lens` prompts file, with the same checks (o->pad_left is unused):
 *
 *   {"prompt": "The capital of France is", "answer": " Paris", "wrong_answer": " Rome"}
 *   {"prompt": [1, 2, 3], "answer": 7, "position": -2}
 *
 * prompt: text or token ids (at least one token, at most the context); answer,
 * wrong_answer (only with answer): one token each, optional (-1 when absent); position:
 * an integer in [-T, T), negative from the end, default the last. */
typedef struct lp_prompt {
    int32_t *ids;           /* [T], malloc'ed */
    int T;                  /* 0: the line was blank (nothing else is set) */
    int pos;                /* in [0, T) */
    int32_t answer, wrong;  /* -1: not given */
} lp_prompt;

lp_status lp_prompt_parse_line(const lp_pair_opts *o, const char *line, size_t len, int line_no, lp_prompt *p);
void lp_prompt_free(lp_prompt *p);

#ifdef __cplusplus
}
#endif
#endif
