// Host-side choices for the CUTLASS sm_90a GEMMs and convolution: which kernel shape, whether a problem qualifies,
// and the (activation, output) type switch onto the translation units that instantiate them.
#include <ATen/cuda/CUDAContext.h>
#include <cutlass/numeric_types.h>

#include "check.h"
#include "cuda/common.cuh"
#include "cuda/sm90/cutlass_conv.h"
#include "cuda/sm90/cutlass_gemm.h"

namespace torchquant::sm90 {

CutlassTile cutlass_tile_for(int64_t m, int64_t n) {
  const int64_t tiles = ((m + 127) / 128) * ((n + 255) / 256);
  return tiles >= at::cuda::getCurrentDeviceProperties()->multiProcessorCount ? CutlassTile::Large
                                                                               : CutlassTile::StreamK;
}

bool cutlass_can_run(const GemmArgs& args, const void* out, int64_t ldo, int64_t out_element_size) {
  // rows that overlap (an expanded operand's stride 0) make no TMA descriptor: the tiled kernels take them
  const bool rows_apart = (args.m == 1 || args.lda >= args.k) && (args.n == 1 || args.ldb >= args.k);
  return rows_apart && args.groups == 1 && args.k % 16 == 0 && args.lda % 16 == 0 && args.ldb % 16 == 0 &&
         is_aligned<int8_t, 16>(static_cast<const int8_t*>(args.a)) && is_aligned<int8_t, 16>(args.b) &&
         (ldo * out_element_size) % 16 == 0 && (args.n * out_element_size) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(out) % 16 == 0;
}

namespace {

template <class T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<activation type>{}, TypeTag<output type>{}) for the pair an epilogue needs: the switch onto the
// explicitly instantiated kernels.
template <class Fn>
auto with_element_types(bool a_unsigned, OutKind kind, Fn&& fn) {
  const auto with_output = [&](auto a) {
    switch (kind) {
      case OutKind::Float32: return fn(a, TypeTag<float>{});
      case OutKind::Float16: return fn(a, TypeTag<cutlass::half_t>{});
      case OutKind::BFloat16: return fn(a, TypeTag<cutlass::bfloat16_t>{});
      case OutKind::Int8: return fn(a, TypeTag<int8_t>{});
      case OutKind::UInt8: return fn(a, TypeTag<uint8_t>{});
      case OutKind::Int32: break;  // Int32Epilogue's, not a dequantizing epilogue
    }
    TQ_CHECK(false, "CUTLASS dequantizing epilogue: unsupported output kind ", static_cast<int>(kind));
    return fn(a, TypeTag<float>{});  // not reached
  };
  return a_unsigned ? with_output(TypeTag<uint8_t>{}) : with_output(TypeTag<int8_t>{});
}

}  // namespace

void run_cutlass_gemm(CutlassTile tile, bool a_unsigned, const GemmArgs& args, const DequantEpilogue& epilogue) {
  with_element_types(a_unsigned, epilogue.kind, [&](auto a, auto out) {
    run_cutlass_dequant<typename decltype(a)::type, typename decltype(out)::type>(tile, args, epilogue);
  });
}

bool cutlass_conv_can_run(const ConvGeometry& g, const ConvOperands& operands, const void* out,
                          int64_t out_channels, int64_t out_element_size) {
  return g.groups == 1 && g.channels % 16 == 0 && operands.ldw % 16 == 0 &&
         is_aligned<int8_t, 16>(static_cast<const int8_t*>(operands.x)) && is_aligned<int8_t, 16>(operands.w) &&
         (out_channels * out_element_size) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
         g.stride_h <= 8 && g.stride_w <= 8 && g.height + 2 * g.pad_h <= INT32_MAX &&
         g.width + 2 * g.pad_w <= INT32_MAX;  // CUTLASS's extents are int
}

bool run_cutlass_conv(bool x_unsigned, const ConvGeometry& g, const ConvOperands& operands, int64_t out_channels,
                      const DequantEpilogue& epilogue) {
  return with_element_types(x_unsigned, epilogue.kind, [&](auto a, auto out) {
    return run_cutlass_conv_dequant<typename decltype(a)::type, typename decltype(out)::type>(g, operands,
                                                                                              out_channels, epilogue);
  });
}

}  // namespace torchquant::sm90
