/* fuzz_sae.h: what the SAE harnesses do with an SAE that loaded: its sizes are sane and
 * one input reconstructs on the CPU with finite results from finite parameters. */
#ifndef LOUPE_FUZZ_SAE_H
#define LOUPE_FUZZ_SAE_H

#include <math.h>
#include <stdlib.h>

#include "loupe/sae.h"
#include "loupe/sae_train.h"

static volatile double fuzz_sae_sink;

static void fuzz_use_sae(lp_sae *s, lp_ctx *c) {
    const lp_sae_cfg *cfg = &s->cfg;
    if (cfg->d_in <= 0 || cfg->d_sae <= 0 || cfg->d_out <= 0 || lp_sae_cfg_check(cfg) != LP_OK) __builtin_trap();
    float *x = calloc((size_t)cfg->d_in, sizeof *x), *y = calloc((size_t)cfg->d_out, sizeof *y);
    if (!x || !y) abort();
    for (int i = 0; i < cfg->d_in; i++) x[i] = (float)(i % 7) - 3.0f;
    if (lp_sae_reconstruct(s, c, x, 1, y) == LP_OK)
        for (int i = 0; i < cfg->d_out; i++) fuzz_sae_sink += y[i];
    free(x), free(y);
}

#endif
