/* fuzz_model_gguf.c: libFuzzer harness for loading a model from a GGUF file: the GGUF
 * reader (host/io/gguf.c), the model config read from its metadata (host/model/llama.c) and the
 * weights dequantized from its tensors. A model that loads runs one short forward pass;
 * a refusal leaves one line naming the file. Numbers in the metadata must be checked
 * against the file before they size anything (libFuzzer's -rss_limit_mb catches those
 * that are not). */
#include "fuzz_util.h"
#include "loupe/model.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *path = fuzz_file("model.gguf", data, size);
    lp_model *m;
    if (lp_model_load(&m, path, LP_CPU, LP_F32) != LP_OK) {
        fuzz_check_error(path);
        return 0;
    }
    int32_t tok[2] = {0, 1};
    if (lp_model_forward(m, tok, 1, 2, LP_WANT_LOGITS) != LP_OK) fuzz_check_error(NULL);
    lp_model_free(m);
    return 0;
}
