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

// Calls body(T{}) with T the C++ type of an element-wise op's output dtype: int8_t, uint8_t or a float type.
template <class Body>
void with_output_type(at::ScalarType out_dtype, const Body& body) {
  if (out_dtype == at::kChar || out_dtype == at::kByte) with_byte_type(out_dtype, "out_dtype", body);
  else with_float_type(out_dtype, "out_dtype", body);
}

// Calls body(ap, bp, yp) with the data pointers of a, b (int8 or uint8) and out (float32, float16, bfloat16, int8
// or uint8) as their C++ types: quantized_add's and quantized_mul's kernels.
template <class Body>
void with_binary_pointers(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, const Body& body) {
  with_byte_type(a.scalar_type(), "a", [&](auto a_tag) {
    with_byte_type(b.scalar_type(), "b", [&](auto b_tag) {
      with_output_type(out.scalar_type(), [&](auto out_tag) {
        body(a.data_ptr<decltype(a_tag)>(), b.data_ptr<decltype(b_tag)>(), out.data_ptr<decltype(out_tag)>());
      });
    });
  });
}

}  // namespace torchquant
