/* test_dist_cuda: the device paths of the distributed module (dist.h) under mpirun -np 2,
 * each rank on its own GPU (NCCL) and two ranks sharing one (the tensors staged through the
 * host and MPI):
 *   - tensor parallelism at TP=2 on the device against one process (build/dist_tp_check
 *     --cuda, the tolerances of tests/dist/tp_check.c): losses, logits, every hook, edits,
 *     gradients, the collectives of a forward and the interleaved schedule, whose started
 *     all-reduces run on the job's own stream;
 *   - the started all-reduce, and the blocking all-reduce (F32, BF16), all-gather and
 *     broadcast on device buffers, exact (build/dist_async_check --cuda);
 *   - a rank that stops answering: the other's device all-reduce (blocking, and started)
 *     fails within dist.timeout_s with LP_ERR_PEER naming the rank, through NCCL's wait.
 * On the CUDA emulator (build/emu/, where `make test` runs it) NCCL is tests/cuda_emu/nccl.cpp
 * over MPI, each process its own emulated GPU unless LOUPE_EMU_PCI_BUS puts them on one.
 * On real GPUs the NCCL cases need two (each rank is given its own through
 * CUDA_VISIBLE_DEVICES) and skip otherwise. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>

#include "mpitest.h"
#include "testutil.h"

#define FIX "tests/fixtures/"

/* Each rank its own GPU (NCCL), or both on one (host staging): the mpirun options and the
 * command prefix that do it. */
typedef struct place { const char *opts, *pre; } place;
static place own_gpus(void) {
#ifdef LOUPE_CUDA_EMU
    return (place){"", ""};
#else
    FILE *p = popen("nvidia-smi -L 2>/dev/null | grep -c '^GPU'", "r");
    int n = 0;
    if (!p || fscanf(p, "%d", &n) != 1) n = 0;
    if (p) pclose(p);
    if (n < 2) cr_skip_test("NCCL between two ranks needs two GPUs (%d found)", n);
    return (place){"", "sh -c 'CUDA_VISIBLE_DEVICES=$OMPI_COMM_WORLD_LOCAL_RANK exec \"$0\" \"$@\"'"};
#endif
}
static place shared_gpu(void) {
#ifdef LOUPE_CUDA_EMU
    return (place){"-x LOUPE_EMU_PCI_BUS=1", ""};
#else
    return (place){"-x CUDA_VISIBLE_DEVICES=0", ""};
#endif
}

static void check(place at, const char *prog, const char *args, const char *ok, const char *ok2, int exit0) {
    mpitest_check(2, at.opts, at.pre, prog, args, ok, ok2, exit0);
}

/* One model each (the emulated device is slow): Llama with GQA and gradients through NCCL;
 * GPT-2's forward through the host (the gradients' all-reduces take the same path). */
Test(dist_cuda, tp2_through_nccl, .timeout = 240) {
    LP_TEST_REQUIRE_GPU();
    check(own_gpus(), "tp_check", "--cuda " FIX "llama-tiny", "all agree", "through NCCL", 1);
}
Test(dist_cuda, tp2_through_the_host, .timeout = 240) {
    LP_TEST_REQUIRE_GPU();
    check(shared_gpu(), "tp_check", "--cuda --no-grad " FIX "gpt2-tiny", "all agree", "through the host", 1);
}
Test(dist_cuda, collectives_through_nccl, .timeout = 60) {
    LP_TEST_REQUIRE_GPU();
    check(own_gpus(), "async_check", "--cuda", "all sums exact", "through NCCL", 1);
}
Test(dist_cuda, collectives_through_the_host, .timeout = 60) {
    LP_TEST_REQUIRE_GPU();
    check(shared_gpu(), "async_check", "--cuda", "all sums exact", "through the host", 1);
}
/* Two GPUs on one machine and nothing from the launcher: each rank opens the GPU of its
 * rank on the machine (lp_ctx_set_local_rank), so the two talk through NCCL; before, both
 * opened device 0 and fell back to the host. */
Test(dist_cuda, ranks_of_one_machine_take_a_gpu_each, .timeout = 60) {
    LP_TEST_REQUIRE_GPU();
#ifdef LOUPE_CUDA_EMU
    place two = {"-x LOUPE_EMU_DEVICES=2 -x LOUPE_EMU_PCI_BUS=0", ""};
#else
    place two = own_gpus();
    two.pre = ""; /* no CUDA_VISIBLE_DEVICES per rank */
#endif
    check(two, "async_check", "--cuda", "all sums exact", "through NCCL", 1);
}
/* The job ends through lp_dist_abort, so its status is not 0. */
Test(dist_cuda, nccl_allreduce_times_out, .timeout = 60) {
    LP_TEST_REQUIRE_GPU();
    check(own_gpus(), "async_check", "--cuda --timeout=blocking", "timeout: ok", "in NCCL all-reduce", 0);
}
Test(dist_cuda, nccl_started_allreduce_times_out, .timeout = 60) {
    LP_TEST_REQUIRE_GPU();
    check(own_gpus(), "async_check", "--cuda --timeout", "timeout: ok", "in NCCL all-reduce", 0);
}

/* The emulated NCCL itself (tests/cuda_emu/nccl_check.cpp): exact collectives on blocking
 * and nonblocking communicators, ncclInProgress while a peer is late, a communicator of one
 * rank, and a wait ended by ncclCommAbort from another thread. Nothing to run on real GPUs. */
Test(dist_cuda, emulated_nccl, .timeout = 60) {
#ifdef LOUPE_CUDA_EMU
    mpitest_check(2, "", "", "nccl_emu", "", "all ok", NULL, 0);
#else
    cr_skip_test("checks the CUDA emulator's NCCL (build/emu/test_dist_cuda runs it)");
#endif
}
