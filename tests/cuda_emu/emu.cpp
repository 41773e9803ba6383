// emu.cpp: the CUDA emulator's runtime: the block scheduler (threads as fibers), warp
// collectives, shared memory, and the runtime API over checked host memory. See
// cuda_runtime.h for what it checks and what it cannot.
//
// Scheduling: a launch runs its blocks in order. A block's threads are fibers with their
// own stacks (a six-register switch below: ucontext's swapcontext makes a system call per
// switch, and AddressSanitizer's interceptor of it clears the whole stack's shadow, which
// made a test run minutes instead of seconds); the scheduler resumes every ready thread in turn, and a thread
// runs until it finishes or reaches __syncthreads or a warp collective. When no thread is
// ready, complete warp collectives (every lane of the mask arrived) are evaluated and
// their lanes made ready; failing that, a barrier that every live thread reached at the
// same call site is released; anything else is a deadlock on a GPU and is reported.
#include "cuda_runtime.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <map>
#include <mutex>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define LP_EMU_ASAN 1
#else
#define LP_EMU_ASAN 0
#endif

thread_local uint3 threadIdx, blockIdx;
thread_local dim3 blockDim, gridDim;

namespace lp_emu {

// An sm_90 device (H100 SXM): what loupe's launch arithmetic asks for.
static const int kSMs = 132;
static const int kOptinSmem = 227 * 1024;
static const int kDefaultDynSmem = 48 * 1024;
static const size_t kDeviceBytes = 80ull << 30;
static const size_t kStackBytes = 64 * 1024; // per thread fiber (ASan frames are larger)

static thread_local cudaError_t t_last_error = cudaSuccess;
static thread_local int t_device = 0;
static thread_local const char *t_kernel = nullptr; // the kernel being run, for reports

void fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "loupe CUDA emulator: ");
    if (t_kernel)
        fprintf(stderr, "%s, block (%u,%u,%u) thread (%u,%u,%u): ", t_kernel, blockIdx.x, blockIdx.y, blockIdx.z,
                threadIdx.x, threadIdx.y, threadIdx.z);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    abort();
}

void set_error(cudaError_t e) { t_last_error = e; }

// ---- the allocation table: device memory and pinned host memory ------------------------------
struct alloc_info { size_t bytes; int device; bool pinned; };
static std::mutex g_mu;
static std::map<uintptr_t, alloc_info> g_allocs;
static size_t g_used[16];

static int device_count() {
    const char *e = getenv("LOUPE_EMU_DEVICES"); // the tests of multi-device code set it
    int n = e ? atoi(e) : 1;
    return n < 1 ? 1 : (n > 16 ? 16 : n);
}

// The allocation holding [p, p+n) (n == 0: p may be one past the end), or null.
static bool find_alloc(const void *p, size_t n, uintptr_t *base, alloc_info *info) {
    std::lock_guard<std::mutex> lk(g_mu);
    const uintptr_t a = (uintptr_t)p;
    auto it = g_allocs.upper_bound(a);
    if (it == g_allocs.begin()) return false;
    --it;
    if (a > it->first + it->second.bytes || n > it->first + it->second.bytes - a) return false;
    if (base) *base = it->first;
    if (info) *info = it->second;
    return true;
}

// Fails unless [p, p+n) is device memory of the current device (or pinned host memory).
void check_device_range(const void *p, size_t n, const char *what) {
    alloc_info info;
    if (!find_alloc(p, n, nullptr, &info))
        fail("%s: %zu bytes at %p are not inside one device allocation", what, n, p);
    if (!info.pinned && info.device != t_device)
        fail("%s: %p was allocated on device %d but device %d is current (cudaSetDevice missing?)", what, p,
             info.device, t_device);
}

static bool is_device(const void *p) {
    alloc_info info;
    return find_alloc(p, 0, nullptr, &info) && !info.pinned;
}

void check_pointer_arg(const launch_cfg &cfg, int i, const void *p) {
    if (p == nullptr) return;
    alloc_info info;
    if (!find_alloc(p, 0, nullptr, &info))
        fail("launch of %s: argument %d (%p) is not device memory", cfg.name, i + 1, p);
    if (!info.pinned && info.device != t_device)
        fail("launch of %s: argument %d is memory of device %d, launched on device %d", cfg.name, i + 1,
             info.device, t_device);
}

cudaError_t symbol_copy(void *dst, const void *src, size_t n, size_t off, size_t sym_bytes, const char *what) {
    if (off > sym_bytes || n > sym_bytes - off) fail("%s: %zu bytes at offset %zu of a %zu-byte symbol", what, n, off, sym_bytes);
    memcpy(dst, (const char *)src + off, n);
    return cudaSuccess;
}

// ---- launch configuration ---------------------------------------------------------------------
static std::map<const void *, int> g_max_dyn; // cudaFuncSetAttribute(MaxDynamicSharedMemorySize)

void set_max_dynamic_smem(const void *kernel, int bytes) {
    if (bytes < 0 || bytes > kOptinSmem) fail("cudaFuncSetAttribute: %d bytes of dynamic shared memory", bytes);
    std::lock_guard<std::mutex> lk(g_mu);
    g_max_dyn[kernel] = bytes;
}


bool launch_check(const launch_cfg &c, const void *kernel) {
    const dim3 g = c.grid, b = c.block;
    const unsigned long long threads = (unsigned long long)b.x * b.y * b.z;
    const char *why = nullptr;
    if (threads == 0 || threads > 1024 || b.x > 1024 || b.y > 1024 || b.z > 64) why = "block size";
    else if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535) why = "grid size";
    int max_dyn = kDefaultDynSmem;
    {
        std::lock_guard<std::mutex> lk(g_mu);
        auto it = g_max_dyn.find(kernel);
        if (it != g_max_dyn.end()) max_dyn = it->second;
    }
    if (!why && c.smem > (size_t)max_dyn) why = "dynamic shared memory above the kernel's limit";
    if (why) {
        fprintf(stderr, "loupe CUDA emulator: launch of %s rejected: %s (grid %u,%u,%u block %u,%u,%u, %zu bytes shared)\n",
                c.name, why, g.x, g.y, g.z, b.x, b.y, b.z, c.smem);
        set_error(cudaErrorInvalidConfiguration);
        return false;
    }
    check_stream_use(c.stream, c.name);
    return true;
}

// ---- fibers ----------------------------------------------------------------------------------
// lp_emu_switch(save, to): pushes the callee-saved registers (and the SSE / x87 control
// words) of the System V x86-64 ABI, stores the stack pointer in *save and resumes the
// stack `to`, which was saved the same way or laid out by new_stack().
extern "C" void lp_emu_switch(void **save, void *to);
asm(R"(
    .text
    .globl lp_emu_switch
    .type lp_emu_switch, @function
lp_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size lp_emu_switch, .-lp_emu_switch
)");

// A fresh stack whose first lp_emu_switch "returns" into entry, with rsp = 8 mod 16 there
// as after a call.
static void *new_stack(char *base, size_t bytes, void (*entry)()) {
    uintptr_t top = ((uintptr_t)base + bytes) & ~(uintptr_t)15;
    uint64_t *sp = (uint64_t *)top;
    *--sp = 0;                  // the entry function's (never used) return address
    *--sp = (uint64_t)entry;    // ret target
    for (int i = 0; i < 6; i++) *--sp = 0; // rbp rbx r12 r13 r14 r15
    uint32_t csr[2] = {0x1f80, 0x37f};      // default MXCSR; x87 control word
    *--sp = 0;
    memcpy(sp, csr, 8);
    return sp;
}
enum class st { ready, barrier, warp, done };

static const char *op_name(warp_op op) {
    static const char *names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                  "__ballot_sync", "__any_sync", "__all_sync", "__match_any_sync", "__syncwarp"};
    return names[(int)op];
}

struct fiber {
    void *sp;
    char *stack;
    st state;
    uint3 idx;
    unsigned lane, warp;
    warp_op op; // the pending collective
    unsigned mask;
    uint64_t value, result;
    int arg, width;
    const char *site; // the pending barrier's call site
    void *fake_stack;
};

struct block_run {
    const launch_cfg *cfg;
    std::vector<fiber> th;
    unsigned cur;
    void *sched_sp;
    const void *sched_bottom;
    size_t sched_size;
    void *sched_fake;
    std::vector<std::pair<const void *, void *>> shared;
    size_t shared_bytes;
    void *dyn;
    void (*body)(void *);
    void *params;
};
static thread_local block_run *t_blk;

// One stack per thread of a block, mapped once per host thread, a guard page under each.
static char *stack_of(unsigned i) {
    static thread_local char *pool;
    const size_t stride = kStackBytes + 4096;
    if (!pool) {
        void *m = mmap(nullptr, stride * 1024, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) fail("cannot map fiber stacks");
        pool = (char *)m;
        for (unsigned k = 0; k < 1024; k++) mprotect(pool + k * stride, 4096, PROT_NONE);
    }
    return pool + i * stride + 4096;
}

static fiber &current() { return t_blk->th[t_blk->cur]; }

static void to_scheduler(fiber &t, bool dying) {
    block_run *b = t_blk;
#if LP_EMU_ASAN
    __sanitizer_start_switch_fiber(dying ? nullptr : &t.fake_stack, b->sched_bottom, b->sched_size);
#endif
    lp_emu_switch(&t.sp, b->sched_sp);
#if LP_EMU_ASAN
    __sanitizer_finish_switch_fiber(t.fake_stack, &b->sched_bottom, &b->sched_size);
#endif
}

static void fiber_main() {
    block_run *b = t_blk;
#if LP_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &b->sched_bottom, &b->sched_size);
#endif
    b->body(b->params);
    fiber &t = current();
    t.state = st::done;
    to_scheduler(t, true);
}

static void resume(block_run *b, unsigned i) {
    fiber &t = b->th[i];
    b->cur = i;
    threadIdx = t.idx;
#if LP_EMU_ASAN
    __sanitizer_start_switch_fiber(&b->sched_fake, t.stack, kStackBytes);
#endif
    lp_emu_switch(&b->sched_sp, t.sp);
#if LP_EMU_ASAN
    __sanitizer_finish_switch_fiber(b->sched_fake, nullptr, nullptr);
#endif
}

static const char *state_name(st s) {
    switch (s) {
    case st::ready: return "running";
    case st::barrier: return "at __syncthreads";
    case st::warp: return "at a warp collective";
    default: return "exited";
    }
}

// Names the threads and where each waits, then fails.
[[noreturn]] static void deadlock(block_run *b, const char *what) {
    fprintf(stderr, "loupe CUDA emulator: %s, block (%u,%u,%u): %s; thread states:\n", b->cfg->name, blockIdx.x,
            blockIdx.y, blockIdx.z, what);
    int shown = 0;
    for (const fiber &t : b->th) {
        if (shown++ == 64) { fprintf(stderr, "  ...\n"); break; }
        fprintf(stderr, "  thread (%u,%u,%u) %s", t.idx.x, t.idx.y, t.idx.z, state_name(t.state));
        if (t.state == st::barrier) fprintf(stderr, " (%s)", t.site);
        if (t.state == st::warp) fprintf(stderr, " (%s, mask %08x)", op_name(t.op), t.mask);
        fputc('\n', stderr);
    }
    t_kernel = nullptr;
    fail("deadlock in %s", b->cfg->name);
}

// ---- warp collectives ---------------------------------------------------------------------------
uint64_t warp_collective(warp_op op, unsigned mask, uint64_t value, int arg, int width) {
    if (!t_blk) fail("warp collective outside a kernel");
    fiber &t = current();
    if (!(mask >> t.lane & 1)) fail("%s with mask %08x that excludes the calling lane %u", op_name(op), mask, t.lane);
    if (width < 1 || width > 32 || (width & (width - 1))) fail("shuffle width %d is not a power of two up to 32", width);
    t.op = op;
    t.mask = mask;
    t.value = value;
    t.arg = arg;
    t.width = width;
    t.state = st::warp;
    to_scheduler(t, false);
    return t.result;
}

// The lane a shuffle reads for lane l, or l itself when the source is outside l's segment.
static unsigned shfl_source(const fiber &t) {
    const int l = (int)t.lane, w = t.width, seg = l & ~(w - 1);
    int s = l;
    switch (t.op) {
    case warp_op::shfl: s = seg + (t.arg & (w - 1)); break;
    case warp_op::shfl_up: s = (l - seg) >= t.arg ? l - t.arg : l; break;
    case warp_op::shfl_down: s = (l - seg) + t.arg < w ? l + t.arg : l; break;
    case warp_op::shfl_xor: s = l ^ t.arg; if ((s & ~(w - 1)) != seg) s = l; break;
    default: break;
    }
    return (unsigned)s;
}

// Evaluates the collective of the lanes in `mask` of warp w (first lane index f).
static void complete(block_run *b, unsigned f, unsigned n_lanes, unsigned mask) {
    const fiber &lead = b->th[f + __builtin_ctz(mask)];
    unsigned votes = 0;
    for (unsigned l = 0; l < n_lanes; l++) {
        const fiber &t = b->th[f + l];
        if ((mask >> l & 1) && t.value != 0) votes |= 1u << l;
    }
    for (unsigned l = 0; l < n_lanes; l++) {
        if (!(mask >> l & 1)) continue;
        fiber &t = b->th[f + l];
        switch (lead.op) {
        case warp_op::ballot: t.result = votes; break;
        case warp_op::any: t.result = votes != 0; break;
        case warp_op::all: t.result = votes == mask; break;
        case warp_op::match_any: {
            unsigned m = 0;
            for (unsigned k = 0; k < n_lanes; k++)
                if ((mask >> k & 1) && b->th[f + k].value == t.value) m |= 1u << k;
            t.result = m;
            break;
        }
        case warp_op::sync: t.result = 0; break;
        default: {
            const unsigned s = shfl_source(t);
            if (!(mask >> s & 1)) {
                threadIdx = t.idx;
                fail("%s reads lane %u, which is not in mask %08x", op_name(t.op), s, mask);
            }
            t.result = b->th[f + s].value;
        }
        }
    }
    for (unsigned l = 0; l < n_lanes; l++)
        if (mask >> l & 1) b->th[f + l].state = st::ready;
}

// Releases every warp collective whose lanes have all arrived; reports one that cannot
// complete. True if any thread became ready.
static bool resolve_warps(block_run *b) {
    bool any = false;
    const unsigned n = (unsigned)b->th.size();
    for (unsigned f = 0; f < n; f += 32) {
        const unsigned n_lanes = n - f < 32 ? n - f : 32;
        for (unsigned l = 0; l < n_lanes; l++) {
            const fiber &t = b->th[f + l];
            if (t.state != st::warp) continue;
            const unsigned mask = t.mask;
            threadIdx = t.idx;
            if (n_lanes < 32 && (mask >> n_lanes))
                fail("warp collective mask %08x names lanes beyond the %u threads of this warp", mask, n_lanes);
            for (unsigned k = 0; k < n_lanes; k++) {
                if (!(mask >> k & 1)) continue;
                const fiber &o = b->th[f + k];
                if (o.state == st::done)
                    fail("%s with mask %08x waits for lane %u, which has exited", op_name(t.op), mask, k);
                if (o.state == st::barrier) deadlock(b, "a warp collective waits for a lane that waits at __syncthreads");
                if (o.op != t.op || o.mask != mask || o.width != t.width)
                    fail("lanes of one warp collective disagree: lane %u (%s, mask %08x), lane %u (%s, mask %08x)",
                         l, op_name(t.op), mask, k, op_name(o.op), o.mask);
            }
            complete(b, f, n_lanes, mask);
            any = true;
        }
    }
    return any;
}

// ---- barriers ------------------------------------------------------------------------------------
void syncthreads(const char *site) {
    if (!t_blk) fail("__syncthreads outside a kernel");
    fiber &t = current();
    t.state = st::barrier;
    t.site = site;
    to_scheduler(t, false);
}

// All live threads wait at a barrier: release them, unless they wait at different ones.
static bool release_barrier(block_run *b) {
    const char *site = nullptr;
    for (const fiber &t : b->th) {
        if (t.state == st::done) continue;
        if (t.state != st::barrier) return false;
        if (!site) site = t.site;
        else if (strcmp(site, t.site) != 0) deadlock(b, "divergent __syncthreads: threads wait at different barriers");
    }
    if (!site) return false;
    for (fiber &t : b->th)
        if (t.state == st::barrier) t.state = st::ready;
    return true;
}

// ---- shared memory -------------------------------------------------------------------------------
// Aligned as the device aligns shared memory (at least 128 bytes: WMMA tiles need 32, vector
// loads 16), sized exactly, so AddressSanitizer still guards the end.
static void *shared_alloc(size_t bytes) {
    void *p = nullptr;
    return posix_memalign(&p, 128, bytes ? bytes : 1) == 0 ? p : nullptr;
}

void *block_shared(const void *key, size_t bytes) {
    if (!t_blk) fail("__shared__ variable outside a kernel");
    for (auto &s : t_blk->shared)
        if (s.first == key) return s.second;
    void *p = shared_alloc(bytes ? bytes : 1);
    if (!p) fail("out of memory for shared memory");
    memset(p, 0xFF, bytes); // uninitialised shared memory reads as NaN / all ones
    t_blk->shared.push_back({key, p});
    t_blk->shared_bytes += bytes;
    if (t_blk->shared_bytes > 48 * 1024) fail("more than 48 KiB of static shared memory");
    if (t_blk->shared_bytes + t_blk->cfg->smem > (size_t)kOptinSmem) fail("more than %d bytes of shared memory", kOptinSmem);
    return p;
}

void *dynamic_shared(void) {
    if (!t_blk) fail("extern __shared__ outside a kernel");
    return t_blk->dyn;
}

// ---- the grid ------------------------------------------------------------------------------------
static void run_block(block_run *b) {
    const dim3 bd = b->cfg->block;
    const unsigned n = bd.x * bd.y * bd.z;
    b->th.assign(n, fiber{});
    for (unsigned i = 0; i < n; i++) {
        fiber &t = b->th[i];
        t.idx = uint3{i % bd.x, i / bd.x % bd.y, i / (bd.x * bd.y)};
        t.lane = i & 31;
        t.warp = i >> 5;
        t.state = st::ready;
        t.stack = stack_of(i);
#if LP_EMU_ASAN
        // Returned frames are unpoisoned by their epilogues; only the frames of fiber_main
        // and to_scheduler, never returned from, stay behind at the top of the stack.
        __asan_unpoison_memory_region(t.stack + kStackBytes - 4096, 4096);
#endif
        t.sp = new_stack(t.stack, kStackBytes, fiber_main);
    }
    if (b->cfg->smem) memset(b->dyn, 0xFF, b->cfg->smem);
    for (;;) {
        for (unsigned i = 0; i < n; i++)
            if (b->th[i].state == st::ready) resume(b, i);
        if (resolve_warps(b)) continue;
        if (release_barrier(b)) continue;
        bool live = false;
        for (const fiber &t : b->th) live |= t.state != st::done;
        if (!live) break;
        deadlock(b, "__syncthreads reached by only some of the block's live threads");
    }
    for (auto &s : b->shared) free(s.second);
    b->shared.clear();
    b->shared_bytes = 0;
}

void run_grid(const launch_cfg &cfg, void (*body)(void *), void *params) {
    if (t_blk) fail("kernel launch from inside a kernel (%s)", cfg.name);
    block_run b{};
    b.cfg = &cfg;
    b.body = body;
    b.params = params;
    b.dyn = shared_alloc(cfg.smem); // exactly the launch's size: ASan guards the end
    t_blk = &b;
    t_kernel = cfg.name;
    gridDim = cfg.grid;
    blockDim = cfg.block;
    for (unsigned z = 0; z < cfg.grid.z; z++)
        for (unsigned y = 0; y < cfg.grid.y; y++)
            for (unsigned x = 0; x < cfg.grid.x; x++) {
                blockIdx = uint3{x, y, z};
                run_block(&b);
            }
    free(b.dyn);
    t_blk = nullptr;
    t_kernel = nullptr;
}

} // namespace lp_emu

using namespace lp_emu;

// ---- runtime API -------------------------------------------------------------------------------------
cudaError_t cudaGetDeviceCount(int *n) { *n = device_count(); return cudaSuccess; }
cudaError_t cudaSetDevice(int dev) {
    if (dev < 0 || dev >= device_count()) return t_last_error = cudaErrorInvalidDevice;
    t_device = dev;
    return cudaSuccess;
}
cudaError_t cudaGetDevice(int *dev) { *dev = t_device; return cudaSuccess; }
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }

cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr attr, int dev) {
    if (dev < 0 || dev >= device_count()) return t_last_error = cudaErrorInvalidDevice;
    switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = kDefaultDynSmem; break;
    case cudaDevAttrMultiProcessorCount: *v = kSMs; break;
    case cudaDevAttrComputeCapabilityMajor: *v = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = kOptinSmem; break;
    default: return t_last_error = cudaErrorInvalidValue;
    }
    return cudaSuccess;
}

cudaError_t cudaGetLastError(void) { cudaError_t e = t_last_error; t_last_error = cudaSuccess; return e; }
cudaError_t cudaPeekAtLastError(void) { return t_last_error; }

const char *cudaGetErrorName(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    }
    return "cudaErrorUnknown";
}
const char *cudaGetErrorString(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    }
    return "unknown error";
}

static cudaError_t register_alloc(void **p, size_t bytes, bool pinned) {
    if (!p) return t_last_error = cudaErrorInvalidValue;
    *p = nullptr;
    if (bytes == 0) return cudaSuccess;
    {
        std::lock_guard<std::mutex> lk(g_mu);
        if (!pinned && g_used[t_device] + bytes > kDeviceBytes) return t_last_error = cudaErrorMemoryAllocation;
    }
    void *m = nullptr;
    if (posix_memalign(&m, 256, bytes) != 0) return t_last_error = cudaErrorMemoryAllocation; // exact size: ASan guards the end
    std::lock_guard<std::mutex> lk(g_mu);
    g_allocs[(uintptr_t)m] = alloc_info{bytes, t_device, pinned};
    if (!pinned) g_used[t_device] += bytes;
    *p = m;
    return cudaSuccess;
}

static cudaError_t release_alloc(void *p, bool pinned, const char *what) {
    if (!p) return cudaSuccess;
    std::lock_guard<std::mutex> lk(g_mu);
    auto it = g_allocs.find((uintptr_t)p);
    if (it == g_allocs.end() || it->second.pinned != pinned) {
        fprintf(stderr, "loupe CUDA emulator: %s(%p): not an allocation of that kind\n", what, p);
        return t_last_error = cudaErrorInvalidValue;
    }
    if (!pinned) g_used[it->second.device] -= it->second.bytes;
    g_allocs.erase(it);
    free(p);
    return cudaSuccess;
}

cudaError_t cudaMalloc(void **p, size_t bytes) { return register_alloc(p, bytes, false); }
cudaError_t cudaMallocHost(void **p, size_t bytes) { return register_alloc(p, bytes, true); }
cudaError_t cudaFree(void *p) { return release_alloc(p, false, "cudaFree"); }
cudaError_t cudaFreeHost(void *p) { return release_alloc(p, true, "cudaFreeHost"); }

cudaError_t cudaMemGetInfo(size_t *free_b, size_t *total_b) {
    std::lock_guard<std::mutex> lk(g_mu);
    *total_b = kDeviceBytes;
    *free_b = kDeviceBytes - g_used[t_device];
    return cudaSuccess;
}

// A copy's direction must match where its pointers live: host memory named as device
// memory (or the reverse) works by accident here but faults on a GPU.
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind kind, cudaStream_t s) {
    check_stream_use(s, "cudaMemcpyAsync");
    if (n == 0) return cudaSuccess;
    const bool dd = kind == cudaMemcpyDeviceToDevice || kind == cudaMemcpyHostToDevice;
    const bool sd = kind == cudaMemcpyDeviceToDevice || kind == cudaMemcpyDeviceToHost;
    if (kind == cudaMemcpyDefault) {
        if (is_device(dst)) check_device_range(dst, n, "cudaMemcpy destination");
        if (is_device(src)) check_device_range(src, n, "cudaMemcpy source");
    } else {
        if (dd) check_device_range(dst, n, "cudaMemcpy destination");
        else if (is_device(dst)) fail("cudaMemcpy kind %d but the destination %p is device memory", kind, dst);
        if (sd) check_device_range(src, n, "cudaMemcpy source");
        else if (is_device(src)) fail("cudaMemcpy kind %d but the source %p is device memory", kind, src);
    }
    memmove(dst, src, n);
    return cudaSuccess;
}
cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind kind) {
    return cudaMemcpyAsync(dst, src, n, kind, 0);
}
cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s) {
    check_stream_use(s, "cudaMemsetAsync");
    if (n == 0) return cudaSuccess;
    check_device_range(p, n, "cudaMemset");
    memset(p, v, n);
    return cudaSuccess;
}
cudaError_t cudaMemset(void *p, int v, size_t n) { return cudaMemsetAsync(p, v, n, 0); }
