/* cli.h: the command files of host/cli/. main.c parses the arguments and dispatches to a
 * cmd_*; what the commands share (the one-line error report, model and token loading, the
 * prompt pairs) is in common.c, and calls nothing of theirs. */
#ifndef LOUPE_CLI_H
#define LOUPE_CLI_H

#include <cjson/cJSON.h>

#include "loupe/config.h"
#include "loupe/model.h"
#include "loupe/tokens.h"

typedef struct { lp_cfg cfg; int json; } args;

/* ---- host/cli/common.c ---- */
/* Progress bars on stderr for the library's progress callbacks (redrawn in place on a
 * terminal; one line per shard or metrics step otherwise). */
struct lp_cache_progress;
struct lp_train_progress;
void cli_cache_progress(const struct lp_cache_progress *p, void *user);
void cli_train_progress(const struct lp_train_progress *p, void *user);
/* Prints lp_last_error() as one line and returns the exit status (2 bad input, 1 other). */
int cli_fail(lp_status st);
/* The command being run (for what may run tensor-parallel), and the end of the job's
 * processes (dist.h), which main calls last with the command's exit status: every rank
 * meets the others there within dist.timeout_s, or the job ends; returns the status. */
void cli_set_command(const char *cmd);
int cli_dist_finish(int rc);
double cli_now(void);
/* --json output: j as one line on stdout, then freed. */
void cli_print_json(cJSON *j);
/* "auto" | "cpu" | "cuda" to a device (auto: cuda when a GPU is present). */
lp_device cli_device(const char *dev);
lp_status cli_open_model(const args *a, lp_model **m);
/* The processes of this job (NULL before the first model load, or for one process). */
struct lp_dist *cli_dist(void);
/* Joins the processes mpirun/srun started (dist.tp, dist.dp): done by cli_open_model. */
lp_status cli_join(const args *a);
const char *cli_dev_name(lp_model *m);
/* data.tokens or data.text, cut into rows for the model. */
lp_status cli_load_tokens(const args *a, const lp_model *m, lp_tokens *t);
/* Reads a UTF-8 text file and tokenizes it with model.path's tokenizer; *ids is malloc'ed.
 * The UTF-8 check comes first, so that a wrong file is refused by name before the
 * tokenizer loads. With bos (data.prepend_bos): *bos is the id rows start with (-1: none),
 * and the stream leaves out the tokenizer's own leading BOS then. */
lp_status cli_tokenize_file(const args *a, const char *path, int32_t **ids, size_t *n, size_t *n_bytes, int32_t *bos);

/* The prompt pairs of attrib.pairs (bad lines recorded and skipped). */
typedef struct cli_pair {
    int index, line;
    int32_t *clean, *corrupted;
    int T;
    int32_t answer, wrong;
} cli_pair;
typedef struct cli_bad_line {
    int line;
    char why[200];
} cli_bad_line;
typedef struct cli_pairs {
    cli_pair *pairs;
    int n;
    cli_bad_line *bad;
    int n_bad;
} cli_pairs;
struct lp_tokenizer;
lp_status cli_read_pairs(const args *a, lp_model *m, const struct lp_tokenizer *tk, cli_pairs *s);
void cli_pairs_free(cli_pairs *s);
/* Lists the bad lines of the pairs file on stderr; returns 2 if there were any, else rc. */
int cli_report_bad(const args *a, const cli_pairs *s, int rc);

/* host/cli/run.c */
int cmd_info(args *a);
int cmd_run(args *a);
int cmd_cache(args *a);
int cmd_tokenize(args *a);

/* host/cli/sae.c */
int cmd_train_sae(args *a);
int cmd_eval_sae(args *a);
int cmd_encode(args *a);

/* host/cli/clt.c: train-sae with sae.kind per_layer or cross_layer */
int cmd_train_clt(args *a);

/* host/cli/dashboard.c */
int cmd_dashboard(args *a);

/* host/cli/graph_page.c: reads its own arguments (argv after the command) */
int cmd_graph_page(int argc, char **argv);
/* host/cli/graph.c */
int cmd_graph(args *a);

/* host/cli/sweep_out.c: the output directory of attribute and patch (see there) */
typedef struct sweep_out {
    char dir[1024], path[1100];
    int fd;                /* results.jsonl, appending */
    int n_max;             /* pair indices are < n_max */
    unsigned char *done;   /* [n_max]: the pair's result line is in results.jsonl */
} sweep_out;
/* Records the job's settings in DIR/job.json, or refuses (naming the key) when the ones
 * there differ. */
lp_status sweep_job_check(const args *a, const char *dir, int exact, lp_model *m);
/* Under DIR's lock: repairs results.jsonl and the scores-<method>-*.safetensors files
 * (methods: NULL-terminated) to agree, fills done, opens results.jsonl for appending. */
lp_status sweep_out_open(sweep_out *r, const char *dir, int n_max, const char *const *methods);
/* Appends whole result lines in one write and fsyncs them; a failed write is cut back. */
lp_status sweep_out_append(sweep_out *r, const char *lines, size_t n);
/* Closes results.jsonl; returns st, or the close error when st is LP_OK. */
lp_status sweep_out_close(sweep_out *r, lp_status st);

/* host/cli/sweep_dist.c: a batch's results of attribute and patch, packed by the rank that
 * computed them and unpacked by rank 0, which writes them */
typedef struct sweep_batch_out {
    int nb;                     /* pairs */
    struct lp_pair_result *res; /* [nb] */
    struct lp_pair_result *atp1; /* patch.compare_atp: the pair's AtP scores, else NULL */
    double *pear, *spear;       /* [LP_NODE_KINDS] with atp1 */
    char *lines;                /* the result lines (unpacked: pointing into the packed bytes) */
    size_t n_lines;
} sweep_batch_out;
/* The batch (st LP_OK), or the error st with lp_last_error()'s message, into *pk (malloc'ed). */
lp_status sweep_pack(const sweep_batch_out *b, lp_status st, char **pk, size_t *n);
/* Fills b->res[0 .. b->nb - 1] (and *b->atp1, pear, spear); returns the packed error, named as
 * world rank `from`'s when from > 0. pk must outlive b->lines. */
lp_status sweep_unpack(const char *pk, size_t n, int from, sweep_batch_out *b);
/* All ranks at once: st, or when another rank failed an error naming it (its own line says why). */
struct lp_dist;
lp_status sweep_agree(struct lp_dist *d, lp_status st, const char *what);

/* host/cli/generate.c */
int cmd_generate(args *a);

/* host/cli/attrib.c */
int cmd_attribute(args *a);
int cmd_patch(args *a);
/* host/cli/paths.c: `attribute --attrib.edges=true` and `patch --patch.kind=path` */
int cli_paths_sweep(args *a, int exact);
/* host/cli/circuit.c: circuit.json and circuit.html from the edge scores in dir */
lp_status cli_circuit_write(const args *a, lp_model *m, const char *dir, int *n_pairs);

/* host/cli/lens.c */
int cmd_lens(args *a);
/* host/cli/probe.c */
int cmd_probe(args *a);

#endif
