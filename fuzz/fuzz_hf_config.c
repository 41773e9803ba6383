/* fuzz_hf_config.c: libFuzzer harness for a Hugging Face model directory's config.json
 * (host/model.c picks the architecture; host/gpt2.c and host/llama.c read the rest) and
 * the sharded-checkpoint index model.safetensors.index.json (host/safetensors.c).
 *
 * The input is split at FUZZ_SEP into config.json and the index (no index file when the
 * input has no second part; then there are no weights at all). lp_model_load on that
 * directory must refuse with one line naming a file in it: the weights are missing or
 * the index names shards that are not there. What matters is that no number in the config
 * sizes an allocation or a loop before it is checked. */
#include "fuzz_util.h"
#include "loupe/model.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *part[2];
    size_t len[2];
    int n = fuzz_split(data, size, part, len, 2);
    char dir[256];
    fuzz_path(dir, sizeof dir, "hf/");
    dir[strlen(dir) - 1] = 0;
    fuzz_file("hf/config.json", part[0], len[0]);
    if (n == 2) fuzz_file("hf/model.safetensors.index.json", part[1], len[1]);
    else fuzz_unlink("hf/model.safetensors.index.json");
    lp_model *m;
    if (lp_model_load(&m, dir, LP_CPU, LP_F32) == LP_OK) __builtin_trap(); /* there are no weights */
    fuzz_check_error(dir);
    return 0;
}
