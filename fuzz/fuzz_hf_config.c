/* fuzz_hf_config.c: libFuzzer harness for a Hugging Face model directory's config.json
 * (host/model/model.c picks the architecture; gpt2.c, llama_config.c and gemma.c read the rest) and
 * the sharded-checkpoint index model.safetensors.index.json (host/io/safetensors.c).
 *
 * The input is split at FUZZ_SEP into config.json and the index. Without a second part the
 * directory has a model.safetensors of one small tensor instead, so loading goes past the
 * config to sizing the weights and then refuses a missing tensor. lp_model_load on that
 * directory must refuse with one line naming a file in it. What matters is that no number
 * in the config sizes an allocation or a loop before it is checked against the weights
 * (libFuzzer's -rss_limit_mb / malloc limit reports those that do). */
#include "fuzz_util.h"
#include "loupe/model.h"
#include "loupe/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *part[2];
    size_t len[2];
    int n = fuzz_split(data, size, part, len, 2);
    char dir[256];
    fuzz_path(dir, sizeof dir, "hf/");
    dir[strlen(dir) - 1] = 0;
    fuzz_file("hf/config.json", part[0], len[0]);
    static int weights;
    if (!weights) {
        char p[256];
        static const float one[4] = {1, 1, 1, 1};
        const lp_st_spec spec = {"unused", LP_F32, 1, {4}};
        const void *d = one;
        if (lp_st_write(fuzz_path(p, sizeof p, "hf/model.safetensors"), &spec, &d, 1, NULL) != LP_OK) abort();
        weights = 1;
    }
    if (n == 2) fuzz_file("hf/model.safetensors.index.json", part[1], len[1]);
    else fuzz_unlink("hf/model.safetensors.index.json");
    lp_model *m;
    if (lp_model_load(&m, dir, LP_CPU, LP_F32) == LP_OK) __builtin_trap(); /* its tensors are missing */
    fuzz_check_error(dir);
    return 0;
}
