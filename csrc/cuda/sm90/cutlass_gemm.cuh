// The Hopper (sm_90a) int8 GEMMs built from CUTLASS 3.x: TMA loads, warp-specialized persistent kernels from the
// collective builders, and the dequantize epilogue as an epilogue visitor tree. Included by the translation units of
// this folder, one per (activation type, output type), each instantiating run_cutlass_gemm for its pair, so that the
// slow CUTLASS compiles run in parallel. gemm.cu picks these kernels through cutlass_gemm.h.
//
// Numerics: the accumulator is exact int32 (wrapping, like the mma.sync kernels); the epilogue computes
//   centered = acc - x_zero_point * w_sum[n]       (uint32 arithmetic, modulo 2^32)
//   y = clamp_activation(float(centered) * x_scale[m or 0] * w_scale[n] + bias[n], clamp)
// with the float operations of DequantEpilogue (gemm.cuh) in the same order and rounded one by one (__fmul_rn,
// __fadd_rn: no contraction into fused multiply-adds), then stores y as fp32/fp16/bf16 (round to nearest even) or
// requantizes it with quantize_value. Without bias, the bias node reads -0.0f: y + (-0.0f) == y for every y, -0.0
// and NaN included, so the result is the bias-free one bit for bit.
#pragma once
// CUTLASS's device-side asserts are function calls inside the main loop, which make ptxas serialize the wgmma
// pipeline (warning C7510): these translation units are built without them. This header comes first in each.
#ifndef NDEBUG
#define NDEBUG
#endif
#include <cstdint>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/gemm/kernel/tile_scheduler.hpp>

#include "check.h"
#include "cuda/sm90/cutlass_gemm.h"

namespace torchquant::sm90 {

using namespace cute;

// The two kernel shapes of the dispatch (cutlass_gemm.h, CutlassTile):
//   Large:   128 x 256 x 128-byte tiles on 2-CTA clusters (the B tile multicast to both), cooperative (two consumer
//            warpgroups share each tile), persistent over the tiles.
//   StreamK: 128 x 128 x 128-byte tiles, cooperative, stream-K scheduling: when the tiles do not fill the GPU
//            (small M), the k-iterations are spread over all multiprocessors and the int32 partial sums reduced
//            in a workspace before the epilogue (integer sums, so exact in any order).
struct LargeConfig {
  using TileShape = Shape<_128, _256, _128>;
  using ClusterShape = Shape<_2, _1, _1>;
  using Scheduler = cutlass::gemm::PersistentScheduler;
};
struct StreamKConfig {
  using TileShape = Shape<_128, _128, _128>;
  using ClusterShape = Shape<_1, _1, _1>;
  using Scheduler = cutlass::gemm::StreamKScheduler;
};

// ---------------------------------------------------------------------------------------------------------------
// Epilogue visitor tree nodes
// ---------------------------------------------------------------------------------------------------------------

// centered = acc - zero_point * w_sum (modulo 2^32). Sm90Compute instantiates the functor with the scalar and the
// fragment type, and passes both the scalar instance's Arguments: the run-time zero point.
struct CenterArguments {
  int32_t zero_point = 0;
};

template <class>
struct CenterFn {
  using Arguments = CenterArguments;
  template <int N>
  CUTLASS_DEVICE cutlass::Array<int32_t, N> operator()(cutlass::Array<int32_t, N> const& acc,
                                                      cutlass::Array<int32_t, N> const& w_sum,
                                                      Arguments const& args) const {
    cutlass::Array<int32_t, N> out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i)
      out[i] = static_cast<int32_t>(static_cast<uint32_t>(acc[i]) -
                                    static_cast<uint32_t>(args.zero_point) * static_cast<uint32_t>(w_sum[i]));
    return out;
  }
};

struct DequantArguments {
  float inv_out_scale = 1.0f;   // requantized outputs only
  float out_zero_point = 0.0f;  // requantized outputs only
  ActivationClamp clamp;        // the fused activation (none: -inf / +inf)
  QuantFormat out_format{};     // requantized outputs only: the range of out_bits bits
};

// y = centered * row_scale * column_scale + bias (one rounding each), clamped, requantized to out_format when Out
// is int8/uint8; the result is a float that the store converts to Out (round to nearest even; exact for requantized
// integers).
template <class Out>
struct DequantFor {
  template <class>
  struct Fn {
    using Arguments = DequantArguments;
    template <int N>
    CUTLASS_DEVICE cutlass::Array<float, N> operator()(
        cutlass::Array<float, N> const& centered, cutlass::Array<float, N> const& row_scale,
        cutlass::Array<float, N> const& column_scale, cutlass::Array<float, N> const& bias,
        Arguments const& args) const {
      cutlass::Array<float, N> y;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < N; ++i) {
        y[i] = clamp_activation(
            __fadd_rn(__fmul_rn(__fmul_rn(centered[i], row_scale[i]), column_scale[i]), bias[i]), args.clamp);
        if constexpr (std::is_same_v<Out, int8_t> || std::is_same_v<Out, uint8_t>)
          y[i] = quantize_value(y[i], args.inv_out_scale, args.out_zero_point, args.out_format, Rounding::Nearest);
      }
      return y;
    }
  };
};

template <class Config, class Out>
using DequantTree = cutlass::epilogue::fusion::Sm90EVT<
    cutlass::epilogue::fusion::Sm90Compute<DequantFor<Out>::template Fn, Out, float,
                                           cutlass::FloatRoundStyle::round_to_nearest>,
    cutlass::epilogue::fusion::Sm90EVT<
        cutlass::epilogue::fusion::Sm90Compute<CenterFn, int32_t, int32_t,
                                               cutlass::FloatRoundStyle::round_to_nearest>,
        cutlass::epilogue::fusion::Sm90AccFetch,
        // w_sum[n]; nullptr (zero point 0) reads 0 without touching memory
        cutlass::epilogue::fusion::Sm90RowBroadcast<0, typename Config::TileShape, int32_t, int32_t>>,
    // x_scale[m] per row, or x_scale[0] for every row: the M stride is a run-time bool
    cutlass::epilogue::fusion::Sm90ColBroadcast<0, typename Config::TileShape, float, float, Stride<bool, _0, _0>>,
    cutlass::epilogue::fusion::Sm90RowBroadcast<0, typename Config::TileShape, float, float>,   // w_scale[n]
    cutlass::epilogue::fusion::Sm90RowBroadcast<0, typename Config::TileShape, float, float>>;  // bias[n] or -0.0f

// Fills a DequantTree's arguments from the epilogue: a tuple {center, x_scale, w_scale, bias, dequant}; center is
// {acc, w_sum, zero point}.
template <class TreeArguments>
void set_dequant_arguments(TreeArguments& dequant, const DequantEpilogue& e) {
  auto& center = get<0>(dequant);
  center.op_1 = {e.x_zero_point != 0 ? e.w_sum : nullptr, 0, {}};
  center.op_2 = {e.x_zero_point};
  get<1>(dequant) = {e.x_scale, 0.0f, {e.per_row_scale, _0{}, _0{}}};
  get<2>(dequant) = {e.w_scale, 0.0f, {}};
  get<3>(dequant) = {e.bias, -0.0f, {}};
  get<4>(dequant) = {e.inv_out_scale, e.out_zero_point, e.clamp, e.out_format};
}

// The raw accumulator (int8_mm).
using Int32Tree = cutlass::epilogue::fusion::Sm90AccFetch;

// ---------------------------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------------------------

template <class Config, class ElementA, class Out, class Tree>
struct Kernel {
  static constexpr int kAlignmentOut = 16 / sizeof(Out);  // TMA stores: 16-byte rows
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Config::TileShape, typename Config::ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float, void, cutlass::layout::RowMajor, kAlignmentOut,
      Out, cutlass::layout::RowMajor, kAlignmentOut, cutlass::epilogue::TmaWarpSpecializedCooperative,
      Tree>::CollectiveOp;
  // A [M, K] K-major (row-major), B [N, K] K-major (column-major [K, N]): the "TN" int8 GEMM, 16-byte aligned rows.
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, cutlass::layout::RowMajor, 16, int8_t,
      cutlass::layout::ColumnMajor, 16, int32_t, typename Config::TileShape, typename Config::ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                          typename Config::Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
};

// Runs a CUTLASS device operator (a GemmUniversalAdapter or a ConvUniversalAdapter) on the current stream; `what`
// names it in the messages.
template <class Operator>
void launch(typename Operator::Arguments& arguments, const char* what) {
  const at::Device device(at::kCUDA, c10::cuda::current_device());
  arguments.hw_info.device_id = device.index();
  arguments.hw_info.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  Operator op;
  cutlass::Status status = op.can_implement(arguments);
  TQ_CHECK(status == cutlass::Status::kSuccess, what, ": the CUTLASS kernel cannot take this problem: ",
           cutlass::cutlassGetStatusString(status));
  const size_t workspace_bytes = Operator::get_workspace_size(arguments);
  at::Tensor workspace;
  if (workspace_bytes > 0)
    workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, at::TensorOptions().dtype(at::kByte).device(device));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  status = op.initialize(arguments, workspace_bytes > 0 ? workspace.data_ptr() : nullptr, stream);
  TQ_CHECK(status == cutlass::Status::kSuccess, what, ": CUTLASS initialize failed: ",
           cutlass::cutlassGetStatusString(status));
  status = op.run(stream);
  TQ_CHECK(status == cutlass::Status::kSuccess, what, ": CUTLASS launch failed: ",
           cutlass::cutlassGetStatusString(status));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The operand part of the arguments: A rows lda bytes apart, B rows ldb bytes apart, D rows ldo elements apart.
template <class K, class ElementA, class Out>
typename K::Gemm::Arguments arguments(const GemmArgs& g, Out* out, int64_t ldo) {
  using GemmKernel = typename K::GemmKernel;
  typename GemmKernel::StrideA stride_a{};
  typename GemmKernel::StrideB stride_b{};
  typename GemmKernel::StrideD stride_d{};
  get<0>(stride_a) = g.lda;
  get<0>(stride_b) = g.ldb;
  get<0>(stride_d) = ldo;
  typename K::Gemm::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = {static_cast<int>(g.m), static_cast<int>(g.n), static_cast<int>(g.k), 1};
  args.mainloop = {static_cast<const ElementA*>(g.a), stride_a, g.b, stride_b};
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = stride_d;
  args.epilogue.ptr_D = out;
  args.epilogue.dD = stride_d;
  return args;
}

template <class Config, class ElementA, class Out>
void run_dequant(const GemmArgs& g, const DequantEpilogue& e) {
  using K = Kernel<Config, ElementA, Out, DequantTree<Config, Out>>;
  auto args = arguments<K, ElementA, Out>(g, static_cast<Out*>(e.out), e.ldo);
  set_dequant_arguments(args.epilogue.thread, e);
  launch<typename K::Gemm>(args, "int8 GEMM");
}

template <class Config>
void run_int32(const GemmArgs& g, const Int32Epilogue& e) {
  using K = Kernel<Config, int8_t, int32_t, Int32Tree>;
  auto args = arguments<K, int8_t, int32_t>(g, e.out, e.ldo);
  launch<typename K::Gemm>(args, "int8_mm");
}

template <class A, class Out>
void run_cutlass_dequant(CutlassTile tile, const GemmArgs& args, const DequantEpilogue& epilogue) {
  if (tile == CutlassTile::Large) run_dequant<LargeConfig, A, Out>(args, epilogue);
  else run_dequant<StreamKConfig, A, Out>(args, epilogue);
}

}  // namespace torchquant::sm90
