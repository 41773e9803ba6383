/* fuzz_pairs.c: libFuzzer harness for the attribution sweep's inputs (host/cli/attrib.c):
 * the JSONL prompt pairs (read_pairs) and, on resume, the results.jsonl lines already
 * written (done_set). Both are static in the CLI, so the harness includes its source and
 * stubs the few CLI helpers those two never call.
 *
 * The first input byte picks attrib.align (even: exact, odd: pad_left); the rest is split
 * at FUZZ_SEP into pairs.jsonl and results.jsonl. The model is a random 1-layer GPT-2 with
 * the byte-level vocabulary of fuzz/corpus/tokenizer_json/seed-plain.json (written here), so
 * pairs may give text or id lists. Every pair kept must have ids inside the vocabulary and
 * a length within the context; a bad line is recorded, never fatal. */
#include "../host/cli/attrib.c"
#include "fuzz_util.h"

/* the CLI helpers attrib.c links against; read_pairs and done_set use none of them */
int cli_fail(lp_status st) { (void)st; abort(); }
double cli_now(void) { abort(); }
void cli_print_json(cJSON *j) { (void)j; abort(); }
lp_device cli_device(const char *dev) { (void)dev; abort(); }
lp_status cli_open_model(const args *a, lp_model **m) { (void)a, (void)m; abort(); }
const char *cli_dev_name(lp_model *m) { (void)m; abort(); }
lp_status cli_load_tokens(const args *a, const lp_model *m, lp_tokens *t) { (void)a, (void)m, (void)t; abort(); }

static const char TOKENIZER[] =
    "{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1,\"ab\":2,\"\xc4\xa0\":3,\"c\":4,\"<|endoftext|>\":5},"
    "\"merges\":[\"a b\"]},\"pre_tokenizer\":{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"use_regex\":true},"
    "\"added_tokens\":[{\"content\":\"<|endoftext|>\",\"special\":true}]}";

static const lp_key keys[] = {
    {"attrib.pairs", LP_KEY_STR, NULL, 0, 0, NULL, ""},
    {"attrib.align", LP_KEY_CHOICE, "exact", 0, 0, "exact|pad_left", ""},
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static lp_model *model;
    static lp_tokenizer *tk;
    if (!model) {
        lp_config c = {.arch = LP_ARCH_GPT2, .n_layers = 1, .d_model = 8, .n_heads = 2, .d_mlp = 16, .n_ctx = 16, .d_vocab = 6};
        if (lp_model_random(&model, &c, 1, LP_CPU, LP_F32) != LP_OK) abort();
        if (lp_tokenizer_from_json(&tk, fuzz_file("tok/tokenizer.json", TOKENIZER, sizeof TOKENIZER - 1)) != LP_OK) abort();
    }
    if (size < 1) return 0;
    const uint8_t *part[2];
    size_t len[2];
    fuzz_split(data + 1, size - 1, part, len, 2);
    args a = {0};
    lp_cfg_init(&a.cfg, keys, 2);
    const char *pairs = fuzz_file("pairs.jsonl", part[0], len[0]);
    if (lp_cfg_set(&a.cfg, "attrib.pairs", pairs, "fuzz") != LP_OK ||
        lp_cfg_set(&a.cfg, "attrib.align", data[0] & 1 ? "pad_left" : "exact", "fuzz") != LP_OK)
        abort();
    sweep s;
    if (read_pairs(&a, model, tk, &s) != LP_OK) {
        fuzz_check_error(NULL);
    } else {
        for (int i = 0; i < s.n; i++) {
            const pair *p = &s.pairs[i];
            if (p->T < 1 || p->T > 16 || p->answer < 0 || p->answer >= 6 || p->wrong < 0 || p->wrong >= 6) __builtin_trap();
            for (int t = 0; t < p->T; t++)
                if (p->clean[t] < 0 || p->clean[t] >= 6 || p->corrupted[t] < 0 || p->corrupted[t] >= 6) __builtin_trap();
        }
        for (int i = 0; i < s.n_bad; i++)
            if (!s.bad[i].why[0]) __builtin_trap();
        unsigned char *done = done_set(fuzz_file("results.jsonl", part[1], len[1]), s.n + s.n_bad);
        free(done);
        sweep_free(&s);
    }
    lp_cfg_free(&a.cfg);
    return 0;
}
