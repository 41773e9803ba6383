// cuda_runtime.h (emulated): the CUDA runtime as loupe's kernels/*.cu see it, for running
// those same sources on the CPU in CI. It is on the include path only for the emulated
// test build (Makefile: build/emu/); the product binaries never see it.
//
// What it is: a correctness harness. Every block of a launch runs on the calling thread,
// one block after another; the threads of a block are cooperative fibers (emu.cpp) that
// run until they reach __syncthreads or a warp collective, so barriers and shuffles mean
// what they mean on the GPU and their misuse is reported instead of silently working:
//   - a barrier reached by only part of the block's live threads, or at different call
//     sites (divergent __syncthreads), is a deadlock report naming kernel, block and threads;
//   - a warp collective (shuffles, votes, match, __syncwarp) waits for exactly the lanes of
//     its mask; a mask that names an exited or absent lane, lanes that disagree on the mask,
//     a caller outside its own mask, or a shuffle that reads a lane outside the mask is
//     reported;
//   - static __shared__ arrays (LP_SHARED) are separate heap blocks per thread block and
//     dynamic shared memory one heap block of exactly the launch's size, both filled with
//     0xFF at block start: AddressSanitizer catches out-of-bounds shared indexing and
//     uninitialised shared reads show as NaN / -1;
//   - device memory is host heap memory that AddressSanitizer guards; copies, memsets,
//     kernel pointer arguments and cuBLAS operands are checked against the allocation
//     table (bounds, direction, device), and launch configurations against the limits of
//     an sm_90 device (1024 threads, 48 KiB dynamic shared memory unless raised, grid sizes);
//   - cuBLAS calls (cublas_v2.h) check their arguments as cuBLAS does and compute on OpenBLAS.
// What it cannot catch: races between real concurrent threads (fibers run one at a time
// and switch only at barriers and warp collectives, so a missing __syncthreads between a
// shared write and another thread's read can go unnoticed when the writer happens to run
// first), the weak memory model (fences, volatile, visibility across blocks), atomics'
// contention, differences of the device math library (expf, fast intrinsics) beyond
// rounding, anything about performance, occupancy or register pressure, and streams
// running concurrently (every call completes in program order). compute-sanitizer
// (racecheck, synccheck) on a real GPU covers the first two (scripts/gpu-check-offline.sh).
#pragma once
#define LOUPE_CUDA_EMU 1

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

// ---- the runtime API, also for C (host/dist/ includes it in an NCCL build) --------------
#ifdef __cplusplus
#define LP_EMU_DEFAULT(v) = v
extern "C" {
#else
#define LP_EMU_DEFAULT(v)
#endif

typedef enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidDevice = 101,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorNoDevice = 100,
    cudaErrorNotReady = 600,
} cudaError_t;
typedef cudaError_t cudaError;
typedef enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4
} cudaMemcpyKind;
typedef enum cudaDeviceAttr {
    cudaDevAttrMaxThreadsPerBlock = 1,
    cudaDevAttrMaxSharedMemoryPerBlock = 8,
    cudaDevAttrMultiProcessorCount = 16,
    cudaDevAttrComputeCapabilityMajor = 75,
    cudaDevAttrComputeCapabilityMinor = 76,
    cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
} cudaDeviceAttr;
typedef enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 } cudaFuncAttribute;
enum { cudaStreamDefault = 0, cudaStreamNonBlocking = 1 };
enum { cudaEventDefault = 0, cudaEventDisableTiming = 2 };

typedef struct lp_emu_stream *cudaStream_t;
typedef struct lp_emu_event *cudaEvent_t;

// (emu.cpp)
cudaError_t cudaGetDeviceCount(int *n);
cudaError_t cudaSetDevice(int dev);
cudaError_t cudaGetDevice(int *dev);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr attr, int dev);
// "dddd:bb:dd.0" of device dev: each process on its own bus (so that code comparing bus ids
// across processes, host/dist/, sees one GPU per process), numbered from the launcher's
// rank variable (OMPI_COMM_WORLD_RANK, PMI_RANK, SLURM_PROCID), else from the process id;
// LOUPE_EMU_PCI_BUS=N puts the process on bus N, so processes given the same N share "one GPU".
cudaError_t cudaDeviceGetPCIBusId(char *bus, int len, int dev);
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
const char *cudaGetErrorName(cudaError_t e);
const char *cudaGetErrorString(cudaError_t e);
cudaError_t cudaMalloc(void **p, size_t bytes);
cudaError_t cudaFree(void *p);
cudaError_t cudaMallocHost(void **p, size_t bytes);
cudaError_t cudaFreeHost(void *p);
cudaError_t cudaMemGetInfo(size_t *free_b, size_t *total_b);
cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind kind,
                            cudaStream_t s LP_EMU_DEFAULT(0));
cudaError_t cudaMemset(void *p, int v, size_t n);
cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s LP_EMU_DEFAULT(0));
cudaError_t cudaStreamCreate(cudaStream_t *s);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
// Work completes in program order, so a stream or an event is always complete (cudaSuccess).
// Queueing work behind an NCCL call that still reports ncclInProgress is reported instead
// (nccl.h): on a GPU that work could run before the collective was even enqueued.
cudaError_t cudaStreamQuery(cudaStream_t s);
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags LP_EMU_DEFAULT(0));
cudaError_t cudaEventCreate(cudaEvent_t *e);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s LP_EMU_DEFAULT(0));
cudaError_t cudaEventQuery(cudaEvent_t e);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b);

#ifdef __cplusplus
} // extern "C"
#endif

#ifdef __cplusplus // ---- the rest is for the kernels (C++) -------------------------------
#include <tuple>
#include <type_traits>
#include <utility>

// ---- types and qualifiers ---------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)

struct uint3 { unsigned x, y, z; };
struct alignas(16) uint4 { unsigned x, y, z, w; }; // a 16-byte vector load or store
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The indices of the running fiber (set by the scheduler before every switch).
extern thread_local uint3 threadIdx, blockIdx;
extern thread_local dim3 blockDim, gridDim;
static const int warpSize = 32;

// __device__ variables are ordinary globals; the symbol copies are checked memcpys.
template <typename T>
cudaError_t cudaMemcpyFromSymbolAsync(void *dst, const T &sym, size_t n, size_t off,
                                      cudaMemcpyKind kind = cudaMemcpyDeviceToHost, cudaStream_t s = 0);
template <typename T>
cudaError_t cudaMemcpyFromSymbol(void *dst, const T &sym, size_t n, size_t off = 0,
                                 cudaMemcpyKind kind = cudaMemcpyDeviceToHost) {
    return cudaMemcpyFromSymbolAsync(dst, sym, n, off, kind, 0);
}
template <typename T>
cudaError_t cudaMemcpyToSymbolAsync(T &sym, const void *src, size_t n, size_t off = 0,
                                    cudaMemcpyKind kind = cudaMemcpyHostToDevice, cudaStream_t s = 0);

namespace lp_emu {

// ---- the scheduler's interface (emu.cpp) --------------------------------------------------
[[noreturn]] void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void set_error(cudaError_t e);
cudaError_t symbol_copy(void *dst, const void *src, size_t n, size_t off, size_t sym_bytes,
                        const char *what);
void set_max_dynamic_smem(const void *kernel, int bytes);
// Fails unless [p, p+n) lies inside one allocation of the current device (or pinned memory).
void check_device_range(const void *p, size_t n, const char *what);
// Fails unless stream s belongs to the current device and has no NCCL call in progress.
void check_stream_use(cudaStream_t s, const char *what);
// The emulated NCCL (nccl.cpp) marks s busy (+1) while a collective it took returns
// ncclInProgress, and free (-1) when it completed or its communicator was aborted.
void stream_nccl_pending(cudaStream_t s, int delta);

struct launch_cfg {
    const char *name;
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;
};
// Validates the configuration (false: the launch error is set and nothing runs), then runs
// every block: body(params) once per thread as a fiber.
bool launch_check(const launch_cfg &cfg, const void *kernel);
void check_pointer_arg(const launch_cfg &cfg, int i, const void *p);
void run_grid(const launch_cfg &cfg, void (*body)(void *), void *params);

void syncthreads(const char *site);
enum class warp_op { shfl, shfl_up, shfl_down, shfl_xor, ballot, any, all, match_any, sync };
uint64_t warp_collective(warp_op op, unsigned mask, uint64_t value, int arg, int width);
void *block_shared(const void *key, size_t bytes);
void *dynamic_shared(void);

template <typename T> void check_arg(const launch_cfg &cfg, int i, const T &v) {
    if constexpr (std::is_pointer<T>::value) check_pointer_arg(cfg, i, (const void *)v);
}

template <typename... P> struct launcher {
    launch_cfg cfg;
    void (*kernel)(P...);
    template <typename... A> void operator()(A &&...args) {
        static_assert(sizeof...(A) == sizeof...(P), "kernel called with the wrong number of arguments");
        std::tuple<typename std::decay<P>::type...> params(std::forward<A>(args)...);
        if (!launch_check(cfg, (const void *)kernel)) return;
        std::apply([&](const auto &...p) {
            int i = 0;
            (check_arg(cfg, i++, p), ...);
        }, params);
        struct frame { void (*k)(P...); decltype(params) *p; } f{kernel, &params};
        run_grid(cfg, [](void *v) {
            frame *fr = (frame *)v;
            std::apply(fr->k, *fr->p); // by value: each thread gets its own copies
        }, &f);
    }
};
template <typename... P>
launcher<P...> make_launcher(const char *name, dim3 g, dim3 b, size_t smem, cudaStream_t s, void (*k)(P...)) {
    return launcher<P...>{{name, g, b, smem, s}, k};
}

template <typename T> uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp value too large");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof v);
    return u;
}
template <typename T> T from_bits(uint64_t u) {
    T v;
    memcpy(&v, &u, sizeof v);
    return v;
}

} // namespace lp_emu

template <typename T>
cudaError_t cudaMemcpyFromSymbolAsync(void *dst, const T &sym, size_t n, size_t off, cudaMemcpyKind kind,
                                      cudaStream_t s) {
    (void)s;
    if (kind != cudaMemcpyDeviceToHost && kind != cudaMemcpyDefault) lp_emu::fail("cudaMemcpyFromSymbol: kind %d", kind);
    return lp_emu::symbol_copy(dst, &sym, n, off, sizeof(T), "cudaMemcpyFromSymbol");
}
template <typename T>
cudaError_t cudaMemcpyToSymbolAsync(T &sym, const void *src, size_t n, size_t off, cudaMemcpyKind kind,
                                    cudaStream_t s) {
    (void)s;
    (void)kind;
    if (off > sizeof(T) || n > sizeof(T) - off) lp_emu::fail("cudaMemcpyToSymbol: %zu bytes at %zu past a %zu-byte symbol", n, off, sizeof(T));
    memcpy((char *)&sym + off, src, n);
    return cudaSuccess;
}

template <typename K>
cudaError_t cudaFuncSetAttribute(K *kernel, cudaFuncAttribute attr, int value) {
    if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) lp_emu::set_max_dynamic_smem((const void *)kernel, value);
    return cudaSuccess;
}

// ---- the launch, shared memory and barriers (what kernels/common.cuh maps its macros to) ----
#define LP_LAUNCH(grid, block, smem, stream, ...) \
    lp_emu::make_launcher(#__VA_ARGS__, (grid), (block), (smem), (stream), __VA_ARGS__)
#define LP_SHARED(T, name, ...)                                                                 \
    static const char name##_lp_key = 0;                                                        \
    auto &name = *(T(*) __VA_ARGS__)lp_emu::block_shared(&name##_lp_key, sizeof(T __VA_ARGS__))
#define LP_DYNAMIC_SHARED(T, name) T *const name = (T *)lp_emu::dynamic_shared()

#define LP_EMU_STR2(x) #x
#define LP_EMU_STR(x) LP_EMU_STR2(x)
#define __syncthreads() lp_emu::syncthreads(__FILE__ ":" LP_EMU_STR(__LINE__))

// ---- warp collectives ----------------------------------------------------------------------
inline void __syncwarp(unsigned mask = 0xffffffffu) { lp_emu::warp_collective(lp_emu::warp_op::sync, mask, 0, 0, 32); }
template <typename T> T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return lp_emu::from_bits<T>(lp_emu::warp_collective(lp_emu::warp_op::shfl, mask, lp_emu::to_bits(v), src, width));
}
template <typename T> T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
    return lp_emu::from_bits<T>(lp_emu::warp_collective(lp_emu::warp_op::shfl_up, mask, lp_emu::to_bits(v), (int)d, width));
}
template <typename T> T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
    return lp_emu::from_bits<T>(lp_emu::warp_collective(lp_emu::warp_op::shfl_down, mask, lp_emu::to_bits(v), (int)d, width));
}
template <typename T> T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return lp_emu::from_bits<T>(lp_emu::warp_collective(lp_emu::warp_op::shfl_xor, mask, lp_emu::to_bits(v), lane_mask, width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    return (unsigned)lp_emu::warp_collective(lp_emu::warp_op::ballot, mask, pred != 0, 0, 32);
}
inline int __any_sync(unsigned mask, int pred) { return (int)lp_emu::warp_collective(lp_emu::warp_op::any, mask, pred != 0, 0, 32); }
inline int __all_sync(unsigned mask, int pred) { return (int)lp_emu::warp_collective(lp_emu::warp_op::all, mask, pred != 0, 0, 32); }
template <typename T> unsigned __match_any_sync(unsigned mask, T v) {
    return (unsigned)lp_emu::warp_collective(lp_emu::warp_op::match_any, mask, lp_emu::to_bits(v), 0, 32);
}

// ---- atomics: plain read-modify-write (one fiber runs at a time) --------------------------
// Overloads per type, as CUDA declares them, so arguments convert as they do under nvcc.
#define LP_EMU_ATOMICS(T)                                                                        \
    inline T atomicAdd(T *p, T v) { T o = *p; *p = o + v; return o; }                            \
    inline T atomicSub(T *p, T v) { T o = *p; *p = o - v; return o; }                            \
    inline T atomicMax(T *p, T v) { T o = *p; if (v > o) *p = v; return o; }                     \
    inline T atomicMin(T *p, T v) { T o = *p; if (v < o) *p = v; return o; }                     \
    inline T atomicExch(T *p, T v) { T o = *p; *p = v; return o; }                               \
    inline T atomicCAS(T *p, T cmp, T v) { T o = *p; if (o == cmp) *p = v; return o; }
LP_EMU_ATOMICS(int)
LP_EMU_ATOMICS(unsigned)
LP_EMU_ATOMICS(unsigned long long)
#undef LP_EMU_ATOMICS
inline float atomicAdd(float *p, float v) { float o = *p; *p = o + v; return o; }
inline double atomicAdd(double *p, double v) { double o = *p; *p = o + v; return o; }
inline float atomicExch(float *p, float v) { float o = *p; *p = v; return o; }

// ---- device intrinsics ------------------------------------------------------------------
inline float __uint_as_float(unsigned u) { return lp_emu::from_bits<float>(u); }
inline unsigned __float_as_uint(float f) { return (unsigned)lp_emu::to_bits(f); }
inline float __int_as_float(int u) { return lp_emu::from_bits<float>((uint32_t)u); }
inline int __float_as_int(float f) { return (int)(uint32_t)lp_emu::to_bits(f); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz((unsigned)v); }
// nvcc contracts a * b + c into one FMA unless told otherwise, and the emulated kernels are
// compiled with -mfma -ffp-contract=fast to come close to that; the _rn intrinsics exist to
// forbid it, so their results pass through an empty asm the compiler cannot fuse across.
inline float lp_emu_opaque(float v) { asm("" : "+x"(v)); return v; }
inline float __fmul_rn(float a, float b) { return lp_emu_opaque(a * b); }
inline float __fadd_rn(float a, float b) { return lp_emu_opaque(a + b); }
inline float __fsub_rn(float a, float b) { return lp_emu_opaque(a - b); }
inline float __fdiv_rn(float a, float b) { return lp_emu_opaque(a / b); }
inline float __fsqrt_rn(float a) { return lp_emu_opaque(sqrtf(a)); }
inline float __expf(float a) { return expf(a); }
inline float __logf(float a) { return logf(a); }
inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }
// CUDA's overloaded min / max of the device math library.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline size_t min(size_t a, size_t b) { return a < b ? a : b; }
inline size_t max(size_t a, size_t b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

#endif // __cplusplus
