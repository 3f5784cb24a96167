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

}  // namespace torchquant
