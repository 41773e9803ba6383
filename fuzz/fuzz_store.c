/* fuzz_store.c: libFuzzer harness for reading an activation store (host/store/store.c):
 * meta.json and the shards lp_store_open maps, lp_store_read over every token,
 * lp_store_hook_mean, and the resume check of a cache run against the meta.json already
 * there (check_resume, static: the harness includes the source).
 *
 * The input is split at FUZZ_SEP into meta.json, shard-00000.safetensors and
 * shard-00001.safetensors (no second shard when the input has fewer parts). The hook read
 * is "blocks.0.hook_resid_post". A store that opens is read whole; a refusal leaves one
 * line naming the store or a file in it. */
#include "../host/store/store.c"
#include "fuzz_util.h"

#define HOOK "blocks.0.hook_resid_post"

static volatile double sink;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *part[3];
    size_t len[3];
    int n = fuzz_split(data, size, part, len, 3);
    char dir[256];
    fuzz_path(dir, sizeof dir, "store/");
    dir[strlen(dir) - 1] = 0;
    fuzz_file("store/meta.json", part[0], len[0]);
    fuzz_file("store/shard-00000.safetensors", part[1], len[1]);
    if (n == 3) fuzz_file("store/shard-00001.safetensors", part[2], len[2]);
    else fuzz_unlink("store/shard-00001.safetensors");
    /* the settings of a run resuming into this store, as meta_json writes them */
    static const char fresh[] = "{\"model\":\"gpt2\",\"tokens\":\"t.npy\",\"context\":3,\"dtype\":\"f32\","
                                "\"shard_sequences\":2,\"hooks\":[\"" HOOK "\"],\"n_sequences_planned\":3}";
    int keep = -1;
    if (check_resume(dir, fresh, &keep) != LP_OK) fuzz_check_error(dir);
    else if (keep < 0) __builtin_trap();
    lp_store *s;
    if (lp_store_open(&s, dir, HOOK) != LP_OK) {
        fuzz_check_error(dir);
        return 0;
    }
    int64_t total = lp_store_n_tokens(s);
    int d = lp_store_d(s);
    if (total <= 0 || d <= 0 || lp_store_context(s) <= 0) __builtin_trap();
    sink += strlen(lp_store_model(s));
    float *buf = malloc((size_t)d * sizeof *buf);
    if (!buf) abort();
    for (int64_t t = 0; t < total; t++) { /* token by token: each lies in one shard or spans two */
        if (lp_store_read(s, t, 1, buf) != LP_OK) __builtin_trap();
        sink += buf[0] + buf[d - 1];
    }
    if (lp_store_read(s, total, 1, buf) == LP_OK) __builtin_trap(); /* past the end */
    free(buf);
    lp_store_close(s);
    float *mean;
    size_t nm;
    if (lp_store_hook_mean(dir, HOOK, &mean, &nm) != LP_OK) __builtin_trap();
    if (nm != (size_t)d) __builtin_trap();
    free(mean);
    return 0;
}
