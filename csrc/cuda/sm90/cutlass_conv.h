// The CUTLASS sm_90a implicit-GEMM int8 convolution (cutlass_conv.cuh) as conv.cu sees it: plain functions, no
// CUTLASS headers. Built only with the sm_90a target (TORCHQUANT_CUTLASS); runs on compute capability 9.0 only.
#pragma once
#include <cstdint>

#include "arg_checks.h"
#include "cuda/gemm.cuh"

namespace torchquant::sm90 {

// The operands of one convolution: x the NHWC input (int8 or uint8, contiguous), w the packed weight [OC, KH, KW, C]
// with rows ldw bytes apart (pack_int8_weight's layout for one group), the output written by the epilogue as a
// contiguous NHWC tensor (rows of OC elements). TMA's im2col fills the taps outside the image with zeros.
struct ConvOperands {
  const void* x;
  const int8_t* w;
  int64_t ldw;
};

// Whether the kernels can take the convolution: one group, 16-byte aligned input pixels (C a multiple of 16) and
// weight rows, output rows (OC * element size) a multiple of 16 bytes, traversal strides up to 8 (TMA im2col). The
// padding and dilation limits of TMA im2col are CUTLASS's own can_implement, checked by run_cutlass_conv.
bool cutlass_conv_can_run(const ConvGeometry& g, const ConvOperands& operands, const void* out,
                          int64_t out_channels, int64_t out_element_size);

// Runs the convolution unless CUTLASS's can_implement rejects it (then nothing is launched); returns whether it ran.
bool run_cutlass_conv(bool x_unsigned, const ConvGeometry& g, const ConvOperands& operands, int64_t out_channels,
                      const DequantEpilogue& epilogue);

// One (activation type, output type) pair; explicitly instantiated, one translation unit per output type.
template <class A, class Out>
bool run_cutlass_conv_dequant(const ConvGeometry& g, const ConvOperands& operands, int64_t out_channels,
                              const DequantEpilogue& epilogue);

}  // namespace torchquant::sm90
