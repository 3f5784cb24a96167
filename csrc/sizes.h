// Size arithmetic shared by the CPU and CUDA kernels (host code only): the packed weight's padding, and the int64
// products and sums of user-given sizes, which raise instead of wrapping around. A wrapped size would let a kernel
// allocate a small buffer and then index far past it.
#pragma once
#include <cstdint>
#include <limits>

#include "check.h"

namespace torchquant {

// Packed int8 weights pad N and K to multiples of this (csrc/ops.cpp).
constexpr int64_t kPackAlign = 64;

// a * b of sizes a, b >= 0; `op` and `what` name the operator and the size in the message.
inline int64_t checked_mul(const char* op, const char* what, int64_t a, int64_t b) {
  TQ_CHECK(a == 0 || b <= std::numeric_limits<int64_t>::max() / a, op, ": ", what, " overflows int64 (", a, " * ",
           b, ")");
  return a * b;
}

// a + b of sizes a, b >= 0.
inline int64_t checked_add(const char* op, const char* what, int64_t a, int64_t b) {
  TQ_CHECK(b <= std::numeric_limits<int64_t>::max() - a, op, ": ", what, " overflows int64 (", a, " + ", b, ")");
  return a + b;
}

// a / b rounded down and up, for any a and b >= 1 (C++ division truncates toward zero)
constexpr int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-(a + 1)) / b) - 1; }
constexpr int64_t ceil_div(int64_t a, int64_t b) { return a >= 0 ? a / b + (a % b != 0) : -((-a) / b); }

// x rounded up to a multiple of m (x >= 0, m >= 1).
inline int64_t round_up(int64_t x, int64_t m) {
  TQ_CHECK(x <= std::numeric_limits<int64_t>::max() - (m - 1), "size ", x, " rounded up to a multiple of ", m,
           " overflows int64");
  return (x + m - 1) / m * m;
}

}  // namespace torchquant
