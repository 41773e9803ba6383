/* registry.c: every architecture loupe has, and how a checkpoint names it. Adding a family
 * is one table (arch.h) and one line here. */
#include <stdio.h>
#include <string.h>

#include "model/arch.h"

static const model_arch *const g_archs[] = {&lp_arch_gpt2, &lp_arch_llama, &lp_arch_gemma};
#define N_ARCHS (int)(sizeof g_archs / sizeof *g_archs)

static int listed(const char *const *names, const char *name) {
    for (int i = 0; names && names[i]; i++)
        if (strcmp(names[i], name) == 0) return 1;
    return 0;
}

const model_arch *arch_for_hf(const char *model_type) {
    for (int i = 0; i < N_ARCHS; i++)
        if (listed(g_archs[i]->hf_types, model_type)) return g_archs[i];
    return NULL;
}

const model_arch *arch_for_gguf(const char *arch) {
    for (int i = 0; i < N_ARCHS; i++)
        if (listed(g_archs[i]->gguf_archs, arch)) return g_archs[i];
    return NULL;
}

const model_arch *arch_for_id(lp_arch id) {
    for (int i = 0; i < N_ARCHS; i++)
        if (g_archs[i]->id == id || (id == LP_ARCH_GEMMA3 && g_archs[i]->id == LP_ARCH_GEMMA2)) return g_archs[i];
    return NULL;
}

static const char *join(char *buf, size_t n, int gguf) {
    size_t k = 0;
    buf[0] = 0;
    for (int i = 0; i < N_ARCHS; i++) {
        const char *const *names = gguf ? g_archs[i]->gguf_archs : g_archs[i]->hf_types;
        for (int j = 0; names && names[j]; j++) k += snprintf(buf + k, k < n ? n - k : 0, "%s%s", k ? ", " : "", names[j]);
    }
    return buf;
}

const char *arch_hf_list(void) {
    static char buf[256];
    return join(buf, sizeof buf, 0);
}

const char *arch_gguf_list(void) {
    static char buf[256];
    return join(buf, sizeof buf, 1);
}
