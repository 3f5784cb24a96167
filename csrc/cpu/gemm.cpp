// CPU kernels of int8_mm, pack_int8_weight and int8_linear (schemas in csrc/ops.cpp) on the engine of gemm_core.
#include "cpu/simd.h"  // first: see there
#include "check.h"
#include <algorithm>
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "arg_checks.h"
#include "cpu/gemm_core.h"
#include "cpu/gemm_ops.h"
#include "cpu/isa.h"
#include "cpu/per_token.h"
#include "output_memory.h"

namespace torchquant::gemm {

Epilogue epilogue_for(const EpilogueInputs& in, uint8_t flip, void* out, int64_t out_row_stride,
                      std::vector<int32_t>& col_offset) {
  // sum_k (x - zp) w = sum_k x_u8 w - (zp + shift) * w_sum, computed modulo 2^32 like the accumulators
  const uint32_t shift = static_cast<uint32_t>(in.x_zero_point + (flip != 0 ? 128 : 0));
  const int64_t n = in.w_sum.numel();
  const int32_t* sums = in.w_sum.data_ptr<int32_t>();
  col_offset.resize(n);
  for (int64_t i = 0; i < n; ++i) col_offset[i] = static_cast<int32_t>(shift * static_cast<uint32_t>(sums[i]));
  Epilogue ep;
  ep.kind = in.kind;
  ep.out = out;
  ep.out_row_stride = out_row_stride;
  ep.col_offset = col_offset.data();
  ep.row_scale = in.x_scale.data_ptr<float>();
  ep.per_row_scale = in.x_scale.numel() > 1;
  ep.col_scale = in.w_scale.data_ptr<float>();
  ep.bias = in.bias.has_value() ? in.bias->data_ptr<float>() : nullptr;
  ep.clamp = in.clamp;
  ep.gelu = in.gelu;
  if (in.kind == OutKind::Int8 || in.kind == OutKind::UInt8) {
    ep.inv_out_scale = in.inv_out_scale;
    ep.out_zero_point = in.out_zero_point;
    ep.qmin = in.out_format.qmin;
    ep.qmax = in.out_format.qmax;
  }
  return ep;
}

namespace {

// Where a's packed rows take at most kInt8MmFewRowsBytes, or at most kInt8MmWideBRowsBytes and half of b's, int8_mm's
// threads each pack and multiply blocks of b of at most kInt8MmBlockBytes packed bytes (whole 64-column panels; at
// least one panel), see int8_mm_cpu
constexpr int64_t kInt8MmBlockBytes = int64_t{1} << 20;
constexpr int64_t kInt8MmFewRowsBytes = int64_t{1} << 20;
constexpr int64_t kInt8MmWideBRowsBytes = int64_t{8} << 20;  // (the most measured: 2048 x 4096 rows)

at::Tensor int8_mm_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_int8_mm_operands(a, b);
  TQ_CHECK(a.device().is_cpu() && b.device().is_cpu(), "int8_mm: a and b must both be on the CPU, got ",
              a.device(), " and ", b.device());
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  at::Tensor out = empty_output({m, n}, a.options().dtype(at::kInt));
  if (m == 0 || n == 0) return out;
  if (k == 0) return out.zero_();
  bool amx = false;
  const CpuIsa isa = cpu_isa(&amx);
  // Against b in the nn.Linear layout (w.t()), a few rows read b's columns in place: packing b, each call, cost more
  // than the products (1 x 4096 x 4096, 1 thread: 1.1-1.4 ms packed, 0.58-0.59 ms in place on AMX; 1.89 -> 0.60 ms on
  // the AVX2 path). On AMX tiles so do up to 384 rows (multiply_rows_amx).
  if (amx && b.stride(0) == 1 && rows_in_place_on_amx(m, k, n)) {
    multiply_rows_amx(a.data_ptr<int8_t>(), m, k, a.stride(0), a.stride(1), b.data_ptr<int8_t>(), b.stride(1), n,
                      out.data_ptr<int32_t>(), n);
    return out;
  }
  if (m <= kFewRowsMax && b.stride(0) == 1 && isa != CpuIsa::Scalar) {
    multiply_few_rows(a.data_ptr<int8_t>(), m, k, a.stride(0), a.stride(1), b.data_ptr<int8_t>(), b.stride(1), n,
                      out.data_ptr<int32_t>(), n, isa);
    return out;
  }
  const int64_t depth = gemm_packed_depth(m, k, isa);  // both operands zero filled to this depth
  const ScratchScope weights_scope(Scratch::Weights), activations_scope(Scratch::Activations);
  const int64_t a_bytes = checked_mul("int8_mm", "the packed a size", m, depth);
  uint8_t* a_packed = scratch_buffer(Scratch::Activations, a_bytes);
  pack_activation_rows(reinterpret_cast<const uint8_t*>(a.data_ptr<int8_t>()), m, k, a.stride(0), a.stride(1), 0x80,
                       a_packed, depth, isa);
  std::vector<int32_t> col_offset(n);
  GemmArgs args;
  args.a = a_packed;
  args.lda = depth;
  args.ldb = depth;
  args.m = m;
  args.k = depth;
  Epilogue ep;
  ep.kind = OutKind::Int32;
  ep.out_row_stride = n;
  // columns [n0, n0 + cols) of b packed into b_packed, then multiplied
  const auto multiply_columns = [&](int64_t n0, int64_t cols, int8_t* b_packed) {
    pack_weight(b.data_ptr<int8_t>() + n0 * b.stride(1), cols, k, b.stride(1), b.stride(0), depth, b_packed,
                col_offset.data() + n0, isa);
    for (int64_t c = n0; c < n0 + cols; ++c)  // the +128 shift of a
      col_offset[c] = static_cast<int32_t>(128u * static_cast<uint32_t>(col_offset[c]));
    GemmArgs block = args;
    block.b = b_packed;
    block.n = cols;
    Epilogue block_ep = ep;
    block_ep.out = out.data_ptr<int32_t>() + n0;
    block_ep.col_offset = col_offset.data() + n0;
    gemm_u8s8(block, block_ep, isa);
  };
  // Where a's rows are few and b is large, each thread packs and multiplies blocks of b's columns of its own (about
  // 1 MB packed), each read while it is still in L2, in one parallel region (pack_weight's and gemm_u8s8's regions
  // run inline there). Packed whole first, b went out to memory and came back before the products read it (and over
  // 32 MB its scratch buffer was allocated anew each call): b in the nn.Linear layout, caches cold, 1 thread on a
  // Xeon, 128 x 4096 x 4096 0.61x -> 0.97-1.03x torch._int_mm, 32 x 4096 x 11008 0.31x -> 1.00-1.33x. Blocks
  // packed by all threads together, then multiplied, took two fork-joins a block. So do more rows of a against a b
  // at least twice their size, each block going over all of them (1 thread, against packing b whole:
  // 512 x 4096 x 11008 71.0 -> 30.7 ms, 1024 x 4096 x 4096 29.8 -> 21.4 ms, 2048 x 4096 x 11008 262 -> 186 ms;
  // 2 threads 37.5 -> 17.0, 13.5 -> 11.5 ms; but b no larger than a, 2048^3 on 2 threads, 5.6 -> 5.9 ms).
  // (as many blocks as fit kInt8MmBlockBytes, rounded up to a multiple of the threads: equal shares)
  const int64_t threads = at::get_num_threads(), n_panels = ceil_div(n, kPackAlign);
  const int64_t blocks = round_up(ceil_div(n_panels, std::max<int64_t>(1, kInt8MmBlockBytes / depth / kPackAlign)),
                                  threads);
  const int64_t block_cols = ceil_div(n_panels, blocks) * kPackAlign;
  const int64_t b_bytes = n_panels * kPackAlign * depth;
  const bool blocks_of_b =
      a_bytes <= kInt8MmFewRowsBytes || (a_bytes <= kInt8MmWideBRowsBytes && b_bytes >= 2 * a_bytes);
  if (blocks_of_b && blocks > threads) {
    at::parallel_for(0, ceil_div(n, block_cols), 1, [&](int64_t begin, int64_t end) {
      const ScratchScope thread_weights_scope(Scratch::Weights);
      int8_t* b_packed = reinterpret_cast<int8_t*>(
          scratch_buffer(Scratch::Weights, checked_mul("int8_mm", "the packed b size", block_cols, depth)));
      for (int64_t i = begin; i < end; ++i)
        multiply_columns(i * block_cols, std::min(block_cols, n - i * block_cols), b_packed);
    });
    return out;
  }
  multiply_columns(0, n, reinterpret_cast<int8_t*>(scratch_buffer(
                             Scratch::Weights,
                             checked_mul("int8_mm", "the packed b size", round_up(n, kPackAlign), depth))));
  return out;
}

at::Tensor pack_int8_weight_cpu(const at::Tensor& w) {
  check_weight_to_pack(w);
  const PackedWeightLayout layout = packed_weight_layout(w);
  const int64_t extras = conv_weight_extra_bytes(w.sizes());
  at::Tensor packed = empty_packed_weight(w, layout, false, extras);
  int8_t* dst = packed.data_ptr<int8_t>();
  const at::Tensor w3 = w.dim() == 5 ? w.reshape({layout.groups, layout.n, layout.k}) : w;  // a conv weight's matrix
  const CpuIsa isa = cpu_isa();
  for (int64_t g = 0; g < layout.groups; ++g) {
    const int8_t* src = w3.data_ptr<int8_t>() + (w3.dim() == 3 ? g * w3.stride(0) : 0);
    pack_weight(src, layout.n, layout.k, w3.stride(-2), w3.stride(-1), layout.kp, dst + g * layout.group_bytes,
                nullptr, isa);
  }
  if (extras > 0) pack_conv_weight_extras(w, dst, layout.kp, dst + layout.groups * layout.group_bytes);
  return packed;
}

// int8_linear's kernel. rows_padded: x_q's rows (unsigned) are readable up to round_up(K, 4) bytes, so that the
// GEMM reads them in place whatever K is. gelu: the epilogue's activation (float outputs).
at::Tensor int8_linear_impl(const char* op, const at::Tensor& x_q, const at::Tensor& x_scale, int64_t x_zero_point,
                            const at::Tensor& w_packed, const at::Tensor& w_sum, const at::Tensor& w_scale,
                            const std::optional<at::Tensor>& bias, int64_t out_features, at::ScalarType out_dtype,
                            std::optional<double> out_scale, int64_t out_zero_point, int64_t out_bits,
                            std::optional<double> clamp_min, std::optional<double> clamp_max, bool rows_padded,
                            Gelu gelu) {
  LinearFront f = int8_linear_front(x_q, x_scale, x_zero_point, w_packed, w_sum, w_scale, bias, out_features,
                                    out_dtype, out_scale, out_zero_point, out_bits, clamp_min, clamp_max);
  f.epilogue.gelu = gelu;
  const int64_t m = f.m, n = f.n, k = f.k;
  if (m == 0) return f.out;

  const at::Tensor x2 = x_q.reshape({m, k});
  const uint8_t flip = activation_flip(x_q);
  const uint8_t* x_bytes = static_cast<const uint8_t*>(x2.data_ptr());
  const CpuIsa isa = cpu_isa();
  GemmArgs args;
  const ScratchScope activations_scope(Scratch::Activations);
  if (flip == 0 && x2.stride(1) == 1 && (k % 4 == 0 || rows_padded)) {  // uint8 rows are read in place
    args.a = x_bytes;
    args.lda = x2.stride(0);
  } else {
    args.lda = round_up(k, 4);
    uint8_t* a_packed = scratch_buffer(Scratch::Activations, checked_mul(op, "the packed x_q size", m, args.lda));
    pack_activation_rows(x_bytes, m, k, x2.stride(0), x2.stride(1), flip, a_packed, args.lda, isa);
    args.a = a_packed;
  }
  args.b = w_packed.data_ptr<int8_t>();
  args.ldb = f.weight.kp;
  args.m = m;
  args.n = n;
  args.k = k;
  args.a_below_128 = isa == CpuIsa::Avx2 && flip == 0 && bytes_below_128(x_bytes, m, k, x2.stride(0), x2.stride(1));
  thread_local std::vector<int32_t> col_offset;  // kept across calls: no allocation per call of a small layer
  gemm_u8s8(args, epilogue_for(f.epilogue, flip, f.out.data_ptr(), n, col_offset), isa);
  return f.out;
}

at::Tensor int8_linear_cpu(const at::Tensor& x_q, const at::Tensor& x_scale, int64_t x_zero_point,
                           const at::Tensor& w_packed, const at::Tensor& w_sum, const at::Tensor& w_scale,
                           const std::optional<at::Tensor>& bias, int64_t out_features, at::ScalarType out_dtype,
                           std::optional<double> out_scale, int64_t out_zero_point, std::optional<double> clamp_min,
                           std::optional<double> clamp_max, int64_t out_bits) {
  return int8_linear_impl("int8_linear", x_q, x_scale, x_zero_point, w_packed, w_sum, w_scale, bias, out_features,
                          out_dtype, out_scale, out_zero_point, out_bits, clamp_min, clamp_max, false, Gelu::None);
}

// quantize_per_token(x, 8) + int8_linear in one pass over x: the per-token quantization writes the GEMM's activation
// rows itself, as the unsigned bytes q + 128 zero padded to round_up(K, 4), which int8_linear reads in place as
// uint8 activations with zero point 128. The same integers (sum (q + 128 - 128) * w) and epilogue as the two ops,
// without the int8 tensor between them and the second pass that re-laid it for the GEMM. The activation runs in the
// epilogue, on the float32 y before the cast: no pass of its own over the output.
at::Tensor int8_linear_dynamic_with(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_sum,
                                    const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                                    int64_t out_features, Gelu gelu) {
  constexpr const char* op = "int8_linear_dynamic";
  TQ_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
           ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TQ_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension [..., K]");
  const int64_t k = x.size(-1);
  TQ_CHECK(k >= 1, op, ": x's last dimension (K) must be >= 1");
  const int64_t m = x.numel() / k;
  const int64_t lda = round_up(k, 4);
  const ScratchScope activations_scope(Scratch::Activations);
  uint8_t* rows =
      scratch_buffer(Scratch::Activations, std::max<int64_t>(checked_mul(op, "the quantized x size", m, lda), 1));
  at::Tensor x_scale = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  quantize_rows_per_token(x.contiguous(), m, 8, 128, rows, lda, x_scale.data_ptr<float>());
  c10::SmallVector<int64_t, 6> strides(x.dim(), 1);
  for (int64_t d = x.dim() - 2; d >= 0; --d) strides[d] = (d == x.dim() - 2 ? lda : strides[d + 1] * x.size(d + 1));
  const at::Tensor x_q = at::from_blob(rows, x.sizes(), strides, x.options().dtype(at::kByte));
  return int8_linear_impl(op, x_q, x_scale, 128, w_packed, w_sum, w_scale, bias, out_features, x.scalar_type(),
                          std::nullopt, 0, 8, std::nullopt, std::nullopt, true, gelu);
}

at::Tensor int8_linear_dynamic_cpu(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_sum,
                                   const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                                   int64_t out_features) {
  return int8_linear_dynamic_with(x, w_packed, w_sum, w_scale, bias, out_features, Gelu::None);
}

at::Tensor int8_linear_dynamic_activation_cpu(const at::Tensor& x, const at::Tensor& w_packed,
                                              const at::Tensor& w_sum, const at::Tensor& w_scale,
                                              const std::optional<at::Tensor>& bias, int64_t out_features,
                                              c10::string_view activation) {
  const Gelu gelu = parse_activation("int8_linear_dynamic", activation);
  return int8_linear_dynamic_with(x, w_packed, w_sum, w_scale, bias, out_features, gelu);
}

}  // namespace
}  // namespace torchquant::gemm

TORCH_LIBRARY_IMPL(torchquant, CPU, m) {
  m.impl("int8_mm", &torchquant::gemm::int8_mm_cpu);
  m.impl("pack_int8_weight", &torchquant::gemm::pack_int8_weight_cpu);
  m.impl("int8_linear", &torchquant::gemm::int8_linear_cpu);
  m.impl("int8_linear_dynamic", &torchquant::gemm::int8_linear_dynamic_cpu);
  m.impl("int8_linear_dynamic.activation", &torchquant::gemm::int8_linear_dynamic_activation_cpu);
}
