// mma.h (emulated): the WMMA API of nvcuda::wmma for the shapes loupe's kernels use: 16x16x16
// with __nv_bfloat16 operands (matrix_a, matrix_b; row_major or col_major) and a float
// accumulator, as the CUDA Programming Guide documents them ("Warp Matrix Functions"):
//   - load_matrix_sync, store_matrix_sync and mma_sync are warp-wide: every lane of the
//     warp must reach the same call with the same arguments; here each is a full-warp
//     collective (an exited or divergent lane is the emulator's warp-mask report), and
//     lanes that pass different pointers or leading dimensions are reported;
//   - mptr must be 256-bit (32-byte) aligned and ldm a multiple of 8 elements for 16-bit
//     types, of 4 for float; both are checked;
//   - the mapping of matrix elements to a lane's fragment is unspecified, so a kernel may only
//     apply the same element-wise operation to every x[i] of every lane (fill, scale,
//     convert). Here every lane holds the whole tile (num_elements = 256, x in row-major
//     order of the tile), and mma_sync and store_matrix_sync report a warp whose lanes hold
//     different fragments: a kernel that edits x[i] per lane (relying on one device's
//     mapping) fails instead of silently working;
//   - mma_sync computes d = a b + c with fp32 accumulation: bf16 products are exact in
//     fp32, and each element's 16 products are summed in k order onto c.
// Memory is read through the pointer as the device would (global or shared). A lane reads
// the tile when it reaches the load, and the lanes must then agree on what they read; a
// store writes before any lane goes on. So a missing __syncthreads shows as for plain
// accesses (shared memory 0xFF-filled: NaN), and a missing __syncwarp between lanes' writes
// and the warp's load is reported whenever a lane read the tile before another lane's write.
#pragma once
#include "cuda_bf16.h"
#include "cuda_runtime.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "the emulated WMMA has the 16x16x16 shape only");
    static_assert((std::is_same<Use, accumulator>::value && std::is_same<T, float>::value) ||
                      (!std::is_same<Use, accumulator>::value && std::is_same<T, __nv_bfloat16>::value),
                  "the emulated WMMA has bf16 operands and a float accumulator only");
    typedef T element_type;
    enum { num_elements = 256 };
    T x[num_elements]; // the tile, row-major: (row, col) of A (m x k), B (k x n) or C (m x n)
};

namespace detail {
inline uint64_t mix(uint64_t h, uint64_t v) { return (h ^ v) * 0x100000001b3ull; }
template <typename F> uint64_t hash(const F &f) {
    uint64_t h = 0xcbf29ce484222325ull;
    const unsigned char *p = (const unsigned char *)f.x;
    for (size_t i = 0; i < sizeof f.x; i++) h = mix(h, p[i]);
    return h;
}
// Every lane of the warp here, with the same value (a pointer and ldm, or a fragment's hash).
inline void uniform(const char *what, uint64_t v) {
    const unsigned lanes = (unsigned)lp_emu::warp_collective(lp_emu::warp_op::match_any, 0xffffffffu, v, 0, 32);
    if (lanes != 0xffffffffu)
        lp_emu::fail("wmma::%s: the lanes of the warp disagree (lanes 0x%08x agree with this one)", what, lanes);
}
inline void check_ptr(const char *what, const void *p, unsigned ldm, unsigned multiple) {
    if ((uintptr_t)p % 32) lp_emu::fail("wmma::%s: pointer %p is not 256-bit aligned", what, p);
    if (ldm % multiple) lp_emu::fail("wmma::%s: ldm %u is not a multiple of %u", what, ldm, multiple);
}
// After a lane's read: every lane named the same tile and read the same values (a write by
// one lane that another lane read before it, or not at all, is a missing __syncwarp or
// __syncthreads: on the device the warp reads the tile at once, after its own writes).
template <typename F> void loaded(const F &f, const void *p, unsigned ldm) {
    uniform("load_matrix_sync (pointer, ldm)", mix((uint64_t)(uintptr_t)p, ldm));
    uniform("load_matrix_sync: lanes read different values (a write not yet visible to the whole warp)", hash(f));
}
inline void done(void) { lp_emu::warp_collective(lp_emu::warp_op::sync, 0xffffffffu, 0, 0, 32); }
// The (row, col) element of a tile at p with leading dimension ldm.
template <typename T> T at(const T *p, unsigned ldm, bool col_major, int r, int c) {
    return col_major ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c];
}
} // namespace detail

template <typename Use, typename T, typename L>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L> &f, const T *p, unsigned ldm) {
    static_assert(!std::is_same<Use, accumulator>::value, "an accumulator load takes a layout_t");
    detail::check_ptr("load_matrix_sync", p, ldm, 8);
    const bool cm = std::is_same<L, col_major>::value;
    for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++) f.x[r * 16 + c] = detail::at(p, ldm, cm, r, c);
    detail::loaded(f, p, ldm);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float> &f, const float *p, unsigned ldm,
                             layout_t layout) {
    detail::check_ptr("load_matrix_sync", p, ldm, 4);
    for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++) f.x[r * 16 + c] = detail::at(p, ldm, layout == mem_col_major, r, c);
    detail::loaded(f, p, ldm);
}

// Each lane writes its share (the whole tile is written once every lane has stored).
inline void store_matrix_sync(float *p, const fragment<accumulator, 16, 16, 16, float> &f, unsigned ldm,
                              layout_t layout) {
    detail::check_ptr("store_matrix_sync", p, ldm, 4);
    detail::uniform("store_matrix_sync (pointer, ldm)", detail::mix((uint64_t)(uintptr_t)p, ldm));
    detail::uniform("store_matrix_sync (fragment)", detail::hash(f));
    for (int e = (int)(threadIdx.x & 31); e < 256; e += 32) {
        const int r = e / 16, c = e % 16;
        if (layout == mem_col_major) p[(size_t)c * ldm + r] = f.x[e];
        else p[(size_t)r * ldm + c] = f.x[e];
    }
    detail::done();
}

template <typename Use, typename T, typename L> void fill_fragment(fragment<Use, 16, 16, 16, T, L> &f, T v) {
    for (int i = 0; i < 256; i++) f.x[i] = v;
}

template <typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float> &d, const fragment<matrix_a, 16, 16, 16, __nv_bfloat16, LA> &a,
              const fragment<matrix_b, 16, 16, 16, __nv_bfloat16, LB> &b,
              const fragment<accumulator, 16, 16, 16, float> &c) {
    detail::uniform("mma_sync (a)", detail::hash(a));
    detail::uniform("mma_sync (b)", detail::hash(b));
    detail::uniform("mma_sync (c)", detail::hash(c));
    float out[256];
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) {
            float s = c.x[i * 16 + j];
            for (int k = 0; k < 16; k++)
                s = fmaf(__bfloat162float(a.x[i * 16 + k]), __bfloat162float(b.x[k * 16 + j]), s);
            out[i * 16 + j] = s;
        }
    memcpy(d.x, out, sizeof out); // d may be c
    detail::done();
}

} // namespace wmma
} // namespace nvcuda
