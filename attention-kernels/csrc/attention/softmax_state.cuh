// The online-softmax state shared by the attention kernels: its update by a tile, the weights of
// a merge of several states, and the finalisation.
//
// Everything is in the log2 domain (scores multiplied by log2(e), see common.cuh). A state is the
// running maximum m2 of the scores a thread (or warp, or split) has seen and the sum l of
// exp2(s - m2) over them; the output accumulator that goes with it lives with the kernel, in
// whatever fragment layout its matrix products use, and is rescaled by the factor update() returns.
//
// These helpers exist so that each expression is written once; they are the exact expressions the
// kernels used before, in the same order (nvcc contracts `a * b + c` into one FMA by default, so
// the shape of each expression is part of the results: batch invariance and the fold / no-fold
// equality compare bit patterns). Change one only together with every kernel that calls it, and
// keep the fast (ex2.approx) and exact (exp2f) exponentials where they are: the split-KV merge uses
// exp2f with explicit FMAs so the combine kernel and the folded combine give the same bits.
#pragma once

#include "attention/common.cuh"

namespace pa {

// The base the exponentials of a row subtract: its maximum, or 0 while that is -inf (the row has
// seen nothing yet, or every score was masked), so that exp2(-inf - base) is 0 and never
// exp2(-inf + inf) = NaN.
__device__ __forceinline__ float exp_base(float m2) { return m2 == -INFINITY ? 0.f : m2; }

// Weight of a partial state whose maximum is m2 in a merge whose base is mu (from exp_base of the
// merged maximum): 0 for a partial that saw nothing. fast: ex2.approx, for merges inside one
// kernel's blocks; exact: exp2f, for the split-KV merge.
__device__ __forceinline__ float merge_weight_fast(float m2, float mu) { return fast_exp2(m2 - mu); }
__device__ __forceinline__ float merge_weight_exact(float m2, float mu) { return exp2f(m2 - mu); }

// One row's (or one thread's share of one row's) running state.
struct SoftmaxState {
  float m2;  // running maximum, log2 domain; -inf until a visible key is seen
  float l;   // sum of exp2(s - m2) over the keys seen (this thread's share until reduced)

  // The state of a row that has seen nothing. (Member assignments rather than a returned
  // aggregate: nvcc places an aggregate holding -inf in global memory and loads it.)
  __device__ __forceinline__ void reset() {
    m2 = -INFINITY;
    l = 0.f;
  }

  // First half of a tile's update: takes the tile's row maximum (log2 domain, -inf for a fully
  // masked row), moves m2 to the new maximum, returns the base the tile's scores subtract
  // (exp2(s - base)) and sets `alpha`, the factor that rescales l and the output accumulator:
  // exactly 1 once the maximum stops moving, which lets the kernels skip the rescale.
  __device__ __forceinline__ float advance(float tile_max, float& alpha) {
    const float m_new = fmaxf(m2, tile_max);
    const float mu = exp_base(m_new);
    alpha = fast_exp2(m2 - mu);
    m2 = m_new;
    return mu;
  }

  // Second half: the rescaled old sum plus the tile's sum of exp2(s - base).
  __device__ __forceinline__ void add(float alpha, float tile_sum) { l = l * alpha + tile_sum; }
};

struct Finalised {
  float out_scale;  // multiply the unnormalised accumulator by this
  float lse;        // natural log of the softmax denominator
};

// m2: running max (log2 domain), l: sum of exp2(s - m2), sink2: sink * log2(e) or -inf.
// A row that saw nothing (and has no sink) gets output 0 and lse -inf.
__device__ __forceinline__ Finalised finalise(float m2, float l, float sink2) {
  const float M = fmaxf(m2, sink2);
  if (M == -INFINITY) return {0.f, -INFINITY};
  const float sc = exp2f(m2 - M);  // 0 when m2 = -inf
  const float denom = l * sc + exp2f(sink2 - M);
  return {sc / denom, (M + log2f(denom)) * kLn2};
}

}  // namespace pa
