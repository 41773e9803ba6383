/* fuzz_ini.c: libFuzzer harness for INI job configs (host/io/config.c): lp_cfg_parse_buffer
 * on the input as it is (not NUL-terminated: a read past its end is an ASan finding), and
 * lp_cfg_load_ini on it written to a file, with a key table of every type. A file that
 * loads leaves every value readable and inside its bounds, and the buffer parse of the
 * same text agrees with it value for value; a refusal leaves one line naming the file. */
#include <math.h>

#include "fuzz_util.h"
#include "loupe/config.h"

static const lp_key keys[] = {
    {"model.path", LP_KEY_STR, NULL, 0, 0, NULL, ""},
    {"model.dtype", LP_KEY_CHOICE, "f32", 0, 0, "f32|bf16", ""},
    {"cache.batch", LP_KEY_INT, "8", 1, 1 << 20, NULL, ""},
    {"train.tokens", LP_KEY_INT, "1000", 1, 1LL << 50, NULL, ""},
    {"train.lr", LP_KEY_FLOAT, "1e-3", 0, 1, NULL, ""},
    {"data.path", LP_KEY_STR, "", 0, 0, NULL, ""},
};

static volatile uint64_t sink;

static int same(const char *a, const char *b) { return (!a && !b) || (a && b && strcmp(a, b) == 0); }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    int n = (int)(sizeof keys / sizeof *keys);
    lp_cfg m;
    lp_cfg_init(&m, keys, n);
    lp_status st_mem = lp_cfg_parse_buffer(&m, (const char *)data, size, "mem.ini");
    if (st_mem != LP_OK) fuzz_check_error("mem.ini");
    const char *path = fuzz_file("job.ini", data, size);
    lp_cfg c;
    lp_cfg_init(&c, keys, n);
    if (lp_cfg_load_ini(&c, path) == LP_OK) {
        if (st_mem != LP_OK) __builtin_trap(); /* the file's text loads, the same text in memory does not */
        for (int i = 0; i < n; i++)
            if (!same(lp_cfg_str(&c, keys[i].name), lp_cfg_str(&m, keys[i].name))) __builtin_trap();
        const char *s = lp_cfg_str(&c, "model.path");
        if (s) sink += strlen(s);
        sink += (uint64_t)lp_cfg_int(&c, "cache.batch") + (uint64_t)lp_cfg_int(&c, "train.tokens");
        double lr = lp_cfg_float(&c, "train.lr");
        if (!(lr >= 0 && lr <= 1)) __builtin_trap(); /* a value outside its bounds got in */
        long b = lp_cfg_int(&c, "cache.batch");
        if (b < 1 || b > (1 << 20)) __builtin_trap();
        s = lp_cfg_str(&c, "model.dtype");
        if (!s || (strcmp(s, "f32") && strcmp(s, "bf16"))) __builtin_trap();
    } else {
        fuzz_check_error(path);
    }
    lp_cfg_free(&c);
    lp_cfg_free(&m);
    return 0;
}
