// The element-wise scores of the prefill kernels' accumulator tiles: the Hopper kernels' wgmma
// accumulators and the sm80 kernel's mma.sync m16n8 fragments give a thread the same rows (g and
// g + 8 of its 16) and columns (2 t4 and 2 t4 + 1 of every 8).
#pragma once

#include "attention/common.cuh"
#include "attention/fp8_tile.cuh"

namespace pa {
namespace sm90 {

// Exact scores of this thread's share of a 64 x (8 NJ) wgmma accumulator tile, in place: the
// log2-domain score of every element (soft-cap and ALiBi through `score_log2_scaled` with
// `qk_scale`), and -inf where the key is hidden from the row when `need_mask`. `pos0` is the
// sequence position of the thread's first row (its second row is 8 positions on), `t4` its lane's
// column pair, `n0` the tile's first key. Both Hopper kernels score through this, so they make the
// same operations in the same order and agree to the bit on the same products.
template <int NJ>
__device__ __forceinline__ void exact_scores(float (&s)[NJ * 4], int n0, int pos0, int t4, float qk_scale,
                                             const KernelParams& p, float slope, int seq_len, bool need_mask) {
#pragma unroll
  for (int j = 0; j < NJ; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int pos = pos0 + (e >= 2 ? 8 : 0);
      const int key = n0 + j * 8 + 2 * t4 + (e & 1);
      float x = fp8tile::score_log2_scaled(s[j * 4 + e], qk_scale, p, slope, pos, key);
      if (need_mask && !key_visible(pos, key, seq_len, p)) x = -INFINITY;
      s[j * 4 + e] = x;
    }
}

}  // namespace sm90

// The mask alone, in place, for tiles straddling a bound when no element-wise term applies: the
// raw products stay as they are (the softmax scales them with the unmasked tiles' fused
// multiply-add) and each key the row does not see becomes -inf. A row sees exactly the keys of
// key_range(pos, pos), an interval, so each element is two compares against the row's bounds
// relative to the thread's first column, which is what key_visible decides element by element in
// exact_scores (about 60 instructions per element there, three here: the diagonal tile of every
// causal item took more consumer time than several unmasked tiles).
template <int NJ>
__device__ __forceinline__ void mask_scores(float (&s)[NJ * 4], int n0, int pos0, int t4, const KernelParams& p,
                                            int seq_len) {
  const int col0 = n0 + 2 * t4;  // key of this thread's column 0
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    int lo, hi;
    key_range(pos0 + 8 * rr, pos0 + 8 * rr, seq_len, p, lo, hi);
    const int a = lo - col0, b = hi - col0;  // visible columns c: a <= c <= b
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = j * 8 + e;
        if (c < a || c > b) s[j * 4 + 2 * rr + e] = -INFINITY;
      }
  }
}

}  // namespace pa
