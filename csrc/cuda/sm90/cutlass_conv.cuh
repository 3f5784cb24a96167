// The Hopper (sm_90a) int8 convolution built from CUTLASS 3.x's implicit-GEMM conv: the activation tiles come
// straight from the NHWC input through TMA's im2col mode (no im2col buffer), the weight tiles through ordinary TMA
// from the packed [OC, KH, KW, C] weight, wgmma accumulates in int32, and the epilogue is the GEMMs' visitor tree
// (cutlass_gemm.cuh: the same float operations in the same order, so the same bits as the mma.sync path and the
// CPU). Included by the translation units conv_<out>.cu, one per output type, each instantiating
// run_cutlass_conv_dequant for int8 and uint8 activations. conv.cu picks this kernel through cutlass_conv.h.
#pragma once
#include "cuda/sm90/cutlass_gemm.cuh"  // first: it sets NDEBUG before any CUTLASS header

#include <cutlass/conv/collective/collective_builder.hpp>
#include <cutlass/conv/convnd_problem_shape.hpp>
#include <cutlass/conv/device/conv_universal_adapter.hpp>
#include <cutlass/conv/kernel/conv_universal.hpp>

#include "cuda/sm90/cutlass_conv.h"

namespace torchquant::sm90 {

// The GEMM view of the convolution: M = batch * OH * OW output pixels, N = OC, K = (C, KW, KH). CUTLASS 4.2's sm90
// conv kernels are not persistent (one CTA per output tile, one consumer warpgroup), so the epilogue of one tile
// overlaps the main loop of another only when two CTAs share a multiprocessor: 128 x 64 tiles (64 int32
// accumulators per thread) and kStages pipeline stages keep each CTA within half of the registers and shared memory.
// 64 output channels (ResNets' narrow layers) fill the tile exactly, where a 128-wide tile would compute zeros in
// half of every step. The k-tile is 64 channels of one filter tap (TMA im2col loads one tap at a time): C = 64 fills
// it, C = 128, 256, ... take several.
struct ConvConfig {
  using TileShape = Shape<_128, _64, Shape<_64>>;
  using ClusterShape = Shape<_1, _1, _1>;
  static constexpr int kStages = 7;                             // 12 KiB each
  static constexpr int kMaxSharedBytes = (228 / 2 - 1) * 1024;  // half a multiprocessor, less the per-CTA reserve
};

using ConvProblem = cutlass::conv::ConvProblemShape<cutlass::conv::Operator::kFprop, 2>;

template <class ElementA, class Out>
struct ConvKernel {
  static constexpr int kAlignmentOut = 16 / sizeof(Out);  // TMA stores: 16-byte output pixels
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ConvConfig::TileShape, ConvConfig::ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float, void, cutlass::layout::TensorNHWC,
      kAlignmentOut, Out, cutlass::layout::TensorNHWC, kAlignmentOut, cutlass::epilogue::TmaWarpSpecialized,
      DequantTree<ConvConfig, Out>>::CollectiveOp;
  using Mainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop, ElementA,
      cutlass::layout::TensorNHWC, 16, int8_t, cutlass::layout::TensorNHWC, 16, int32_t, ConvConfig::TileShape,
      ConvConfig::ClusterShape, cutlass::conv::collective::StageCount<ConvConfig::kStages>,
      cutlass::conv::KernelImplicitTmaWarpSpecializedSm90>::CollectiveOp;
  // PersistentScheduler is what the default (void) scheduler means here; naming it keeps CUTLASS 2.x's GemmUniversal
  // (also declared, through the GEMM headers) from matching the same arguments
  using Kernel =
      cutlass::conv::kernel::ConvUniversal<ConvProblem, Mainloop, Epilogue, cutlass::gemm::PersistentScheduler>;
  using Conv = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
  static_assert(Kernel::SharedStorageSize <= ConvConfig::kMaxSharedBytes, "two CTAs per multiprocessor");
};

template <class A, class Out>
bool run_cutlass_conv_dequant(const ConvGeometry& g, const ConvOperands& operands, int64_t out_channels,
                              const DequantEpilogue& e) {
  using K = ConvKernel<A, Out>;
  using Kernel = typename K::Kernel;
  const auto c = static_cast<int>(g.channels);
  const auto kw = static_cast<int>(g.kw);
  const ConvProblem problem(
      cutlass::conv::Mode::kCrossCorrelation,
      {static_cast<int>(g.batch), static_cast<int>(g.height), static_cast<int>(g.width), c},  // input, NHWC
      {g.height * g.width * g.channels, g.width * g.channels, g.channels, 1},
      {static_cast<int>(out_channels), static_cast<int>(g.kh), kw, c},  // filter [OC, KH, KW, C], rows ldw apart
      {operands.ldw, kw * g.channels, g.channels, 1},
      {static_cast<int>(g.pad_h), static_cast<int>(g.pad_w)}, {static_cast<int>(g.pad_h), static_cast<int>(g.pad_w)},
      {static_cast<int>(g.stride_h), static_cast<int>(g.stride_w)},
      {static_cast<int>(g.dil_h), static_cast<int>(g.dil_w)}, 1);
  // CUTLASS derives the output extent itself: it must be the one int8_conv2d allocated
  TQ_CHECK(problem.shape_C[1] == g.out_h && problem.shape_C[2] == g.out_w && problem.shape_C[3] == out_channels,
           "int8_conv2d: CUTLASS's output shape differs from the allocated one");

  typename Kernel::StrideD stride_d{};  // ((OW, OH, batch), OC, -): the output pixels of the flattened M
  get<0, 0>(stride_d) = out_channels;
  get<0, 1>(stride_d) = g.out_w * out_channels;
  get<0, 2>(stride_d) = g.out_h * g.out_w * out_channels;
  typename K::Conv::Arguments args{};
  args.problem_shape = problem;
  args.mainloop = {static_cast<const A*>(operands.x), operands.w};
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = stride_d;
  args.epilogue.ptr_D = static_cast<Out*>(e.out);
  args.epilogue.dD = stride_d;
  set_dequant_arguments(args.epilogue.thread, e);
  if (K::Conv::can_implement(args) != cutlass::Status::kSuccess) return false;
  launch<typename K::Conv>(args, "int8_conv2d");
  return true;
}

}  // namespace torchquant::sm90
