// Run-time dtype to C++ type dispatch shared by the CPU and CUDA quantize kernels (host code).
#pragma once
#include <ATen/ATen.h>

#include "check.h"

namespace torchquant {

// Calls body(T{}) with T the C++ type of a float32/float16/bfloat16 dtype.
template <class Body>
void with_float_type(at::ScalarType dtype, const char* what, const Body& body) {
  switch (dtype) {
    case at::kFloat: body(float{}); break;
    case at::kHalf: body(at::Half{}); break;
    case at::kBFloat16: body(at::BFloat16{}); break;
    default: TQ_CHECK(false, what, " must be float32, float16 or bfloat16, got ", dtype);
  }
}

// Calls body(T{}) with T = int8_t or uint8_t.
template <class Body>
void with_byte_type(at::ScalarType dtype, const char* what, const Body& body) {
  switch (dtype) {
    case at::kChar: body(int8_t{}); break;
    case at::kByte: body(uint8_t{}); break;
    default: TQ_CHECK(false, what, " must be int8 or uint8, got ", dtype);
  }
}

// Calls body(A{}, B{}, Out{}) with A and B = int8_t or uint8_t for a_dtype and b_dtype, and Out the C++ type of
// out_dtype (float32, float16, bfloat16, int8 or uint8): quantized_add's kernels.
template <class Body>
void with_add_types(at::ScalarType a_dtype, at::ScalarType b_dtype, at::ScalarType out_dtype, const Body& body) {
  with_byte_type(a_dtype, "a", [&](auto a) {
    with_byte_type(b_dtype, "b", [&](auto b) {
      const auto with_out = [&](auto out) { body(a, b, out); };
      if (out_dtype == at::kChar || out_dtype == at::kByte) with_byte_type(out_dtype, "out_dtype", with_out);
      else with_float_type(out_dtype, "out_dtype", with_out);
    });
  });
}

}  // namespace torchquant
