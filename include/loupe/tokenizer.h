/* tokenizer.h: byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM/SmolLM2, Qwen2) and
 * SentencePiece-style BPE with byte fallback (Gemma), read from a Hugging Face
 * tokenizer.json or from a GGUF file's tokenizer.ggml.* metadata, giving the same ids as
 * Hugging Face `tokenizers` (for a Gemma GGUF: as the tokenizer transformers converts
 * from it).
 *
 *   lp_tokenizer *tk;
 *   lp_tokenizer_load(&tk, "models/SmolLM2-135M-Instruct.Q4_1.gguf");  // or a checkpoint dir
 *   int32_t *ids; size_t n;
 *   lp_tokenize(tk, text, strlen(text), &ids, &n);   // BOS added when the model's config says so
 *   char *back; size_t len; lp_detokenize(tk, ids, n, &back, &len);
 *
 * Pieces: special (added) tokens are matched in the text first and never split; the
 * rest is normalized (NFC where the tokenizer says so), split by the model's
 * pre-tokenizer rules (PCRE2 with Unicode properties), mapped through the GPT-2
 * byte-to-unicode table and merged by rank. SentencePiece-style: spaces become "\u2581",
 * characters outside the vocabulary become <0xXX> byte tokens, pieces merge by rank. */
#ifndef LOUPE_TOKENIZER_H
#define LOUPE_TOKENIZER_H

#include "loupe/gguf.h"
#include "loupe/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lp_tokenizer lp_tokenizer;

/* tokenizer.json (its post_processor adds BOS/EOS, as in `tokenizers`), plus
 * tokenizer_config.json beside it when present (the bos/eos token names). */
lp_status lp_tokenizer_from_json(lp_tokenizer **out, const char *tokenizer_json);
lp_status lp_tokenizer_from_gguf(lp_tokenizer **out, const lp_gguf *g);
/* path: a .gguf file, a tokenizer.json, or a directory holding tokenizer.json. */
lp_status lp_tokenizer_load(lp_tokenizer **out, const char *path);
void lp_tokenizer_free(lp_tokenizer *t);

/* Text (UTF-8; invalid bytes are an error naming the offset) to ids, with the model's
 * BOS/EOS post-processing as Hugging Face's encode(text) applies it by default.
 * *ids is malloc'ed; the caller frees it. */
lp_status lp_tokenize(const lp_tokenizer *t, const char *text, size_t len, int32_t **ids, size_t *n);
/* Ids back to text; special tokens are written as their text. *text is malloc'ed and
 * NUL-terminated. */
lp_status lp_detokenize(const lp_tokenizer *t, const int32_t *ids, size_t n, char **text, size_t *len);

int lp_tokenizer_vocab_size(const lp_tokenizer *t);
int lp_tokenizer_bos(const lp_tokenizer *t);  /* -1 when none */
int lp_tokenizer_eos(const lp_tokenizer *t);  /* -1 when none */
/* 1 when lp_tokenize puts the BOS first (the post-processor's template, or a GGUF's
 * tokenizer.ggml.add_bos_token): the model expects rows to start with it. */
int lp_tokenizer_adds_bos(const lp_tokenizer *t);
/* The token's string as stored in the vocabulary (byte-level form), or NULL. */
const char *lp_tokenizer_token(const lp_tokenizer *t, int id);

#ifdef __cplusplus
}
#endif
#endif
