// Vector widths for memory-bound copies.
//
// A row copy moves `row_bytes` bytes; it uses the widest access (16, 8, 4 or 2 bytes) that divides
// the row length, both row strides and the base addresses, so one thread issues one 16-byte load
// where the layout allows it and the kernel stays correct for any layout.
#pragma once

#include <cstdint>

namespace pa {

// Raw storage of one vector of `Bytes` bytes, loaded and stored in a single instruction.
template <int Bytes> struct Vec;
template <> struct Vec<16> {
  using type = uint4;
};
template <> struct Vec<8> {
  using type = uint2;
};
template <> struct Vec<4> {
  using type = uint32_t;
};
template <> struct Vec<2> {
  using type = uint16_t;
};

// Global loads issued where they are written. A kernel that wants its loads in flight while it
// waits on something else (a slot index, say) and then branches on that cannot use plain loads:
// nvcc, and ptxas after it, move a load whose value is only used past a branch (an early return)
// below that branch, so the thread would wait for one, branch, and only then issue the other.
// ptxas keeps a relaxed gpu-scope load in place, and it compiles to the same L2-cached load as
// ld.global.cg (a streaming load, not allocated in L1). The caller must only use these on
// addresses that are valid whichever way the branch goes.
__device__ __forceinline__ uint4 ldg_now(const uint4* p) {
  uint4 v;
  asm volatile("ld.relaxed.gpu.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 ldg_now(const uint2* p) {
  uint2 v;
  asm volatile("ld.relaxed.gpu.global.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
__device__ __forceinline__ uint32_t ldg_now(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ uint16_t ldg_now(const uint16_t* p) {
  uint16_t v;
  asm volatile("ld.relaxed.gpu.global.u16 %0, [%1];" : "=h"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ float ldg_now(const float* p) {
  float v;
  asm volatile("ld.relaxed.gpu.global.f32 %0, [%1];" : "=f"(v) : "l"(p));
  return v;
}

// The widest of 16/8/4/2 bytes that divides every value given (byte counts and addresses).
__host__ inline int widest_vector(uint64_t combined) {
  if (combined % 16 == 0) return 16;
  if (combined % 8 == 0) return 8;
  if (combined % 4 == 0) return 4;
  return 2;
}

}  // namespace pa
