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
template <> struct Vec<16> { using type = uint4; };
template <> struct Vec<8> { using type = uint2; };
template <> struct Vec<4> { using type = uint32_t; };
template <> struct Vec<2> { using type = uint16_t; };

// The widest of 16/8/4/2 bytes that divides every value given (byte counts and addresses).
__host__ inline int widest_vector(uint64_t combined) {
  if (combined % 16 == 0) return 16;
  if (combined % 8 == 0) return 8;
  if (combined % 4 == 0) return 4;
  return 2;
}

}  // namespace pa
