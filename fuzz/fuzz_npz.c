/* fuzz_npz.c: libFuzzer harness for Gemma Scope params.npz (host/sae/sae.c: the zip central
 * directory with zip64 records, then each stored .npy entry's header). lp_sae_load on the
 * file; an SAE that loads encodes one input on the CPU. A refusal leaves one line naming
 * the file. */
#include "fuzz_util.h"
#include "loupe/sae.h"
#include "loupe/sae_train.h"
#include "fuzz_sae.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static lp_ctx c;
    static int ready;
    if (!ready && lp_ctx_init(&c, LP_CPU, LP_F32) != LP_OK) abort();
    ready = 1;
    const char *path = fuzz_file("params.npz", data, size);
    lp_sae *s;
    if (lp_sae_load(&s, &c, path) != LP_OK) {
        fuzz_check_error(path);
        return 0;
    }
    fuzz_use_sae(s, &c);
    lp_sae_free(s, &c);
    return 0;
}
