// The element-wise scores of the two Hopper prefill kernels' wgmma accumulator tiles.
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
}  // namespace pa
