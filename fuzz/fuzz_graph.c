/* fuzz_graph.c: libFuzzer harness for the attribution graph JSON reader of the graph page
 * (host/analysis/graph_json.c, graph_page.c): lp_graph_check on the input as it is (not
 * NUL-terminated: a read past its end is an ASan finding), then lp_graph_page_write_file
 * on it written to a file. The two must agree; a refusal leaves one line naming the input;
 * a graph that is accepted gives a page whose counts match the check's and whose data
 * cannot end its <script> early (exactly two "</script>", no "<!--"). */
#include "fuzz_util.h"
#include "loupe/graph_page.h"
#include "loupe/output.h"

static int count_of(const char *hay, const char *needle) {
    int n = 0;
    for (const char *p = hay; (p = strstr(p, needle)); p++) n++;
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    lp_graph_info a, b;
    lp_status st = lp_graph_check((const char *)data, size, "mem.json", &a);
    if (st != LP_OK) fuzz_check_error("mem.json");
    const char *in = fuzz_file("graph.json", data, size);
    char page[512];
    fuzz_path(page, sizeof page, "graph.html");
    unlink(page);
    lp_status st2 = lp_graph_page_write_file(in, page, &b);
    if ((st == LP_OK) != (st2 == LP_OK)) __builtin_trap(); /* the file and the same text in memory disagree */
    if (st2 != LP_OK) {
        fuzz_check_error(in);
        if (access(page, F_OK) == 0) __builtin_trap(); /* a page for a refused graph */
        return 0;
    }
    if (memcmp(&a, &b, sizeof a) != 0) __builtin_trap();
    if (a.n_features + a.n_errors + a.n_embeddings + a.n_logits != a.n_nodes) __builtin_trap();
    size_t n;
    char *h = lp_read_file(page, &n);
    if (!h) __builtin_trap();
    if (count_of(h, "</script>") != 2 || strstr(h, "<!--") || strlen(h) != n) __builtin_trap();
    free(h);
    return 0;
}
