/* clt_internal.h: shared by the transcoder-set files (clt_files.c, clt_yaml.c) and the
 * CLT trainer. */
#ifndef LOUPE_CLT_INTERNAL_H
#define LOUPE_CLT_INTERNAL_H

#include "loupe/clt.h"
#include "loupe/output.h"

/* config.yaml as read: the config fields it sets, the activation if it names one, and
 * the "transcoders" list of local paths (NULL when absent). */
typedef struct clt_yaml {
    lp_clt_cfg cfg;
    int has_kind, has_act, act;
    char **paths;
    int n_paths;
} clt_yaml;

/* Parses n bytes of text; errors name path and key. */
lp_status clt_yaml_parse(const char *text, size_t n, const char *path, clt_yaml *y);
void clt_yaml_free(clt_yaml *y);
/* Writes config.yaml for c (atomically). */
lp_status clt_yaml_write(const lp_clt_cfg *c, const char *path);

#endif
