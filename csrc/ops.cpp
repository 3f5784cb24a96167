// The one place where every torchquant op schema is declared. CPU kernels register in csrc/cpu/*.cpp,
// CUDA kernels in csrc/cuda/*.cu, fake (meta) kernels in torchquant/_ops/*.py, autograd kernels in
// csrc/quantize_autograd.cpp and csrc/linear_dynamic.cpp, autocast kernels of the layer ops in csrc/autocast.cpp.
#include <Python.h>
#include <torch/library.h>

#include "sizes.h"

// Conventions shared by every op:
//   scale:       float32 tensor, 1 element (per-tensor) or one per channel along `axis` (per-channel)
//   zero_point:  int32 tensor, same length as scale
//   axis:        None for per-tensor, else a non-negative dimension of x
//   bits/signed: signed b bits -> [-2^(b-1), 2^(b-1)-1] stored in int8 (b = 1: sign binarization, {-1, +1});
//                unsigned b bits -> [0, 2^b - 1] stored in uint8
//   rounding:    "nearest" (round half to even) or "truncate" (toward zero)
//   packed int8 weights: made by pack_int8_weight from w [G?, N, K]: int8 of w's logical shape (the kernels check it
//                against their other arguments) with strides [round_up(N, 64) * round_up(K, 64)?, round_up(K, 64), 1]
//                over a zero-padded buffer whose byte order is the device's own (CPU: VNNI blocks, CUDA:
//                row-major). int8_conv2d's is packed as [G, OC/G, KH, KW, C/G] (pack_conv_weight).
TORCH_LIBRARY(torchquant, m) {
  // ---- quantize family: csrc/cpu/quantize.cpp, csrc/cuda/quantize.cu ----
  m.def("quantize(Tensor x, Tensor scale, Tensor zero_point, int? axis, int bits, bool signed, str rounding) -> Tensor");
  m.def("dequantize(Tensor q, Tensor scale, Tensor zero_point, int? axis, ScalarType dtype) -> Tensor");
  m.def("fake_quantize(Tensor x, Tensor scale, Tensor zero_point, int? axis, int bits, bool signed, str rounding) -> Tensor");
  // grad * (x inside the clamp range): the straight-through gradient, recomputed from x (no mask is stored)
  m.def("fake_quantize_backward(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, int? axis, int bits, bool signed, str rounding) -> Tensor");
  // the mse observer's search: per candidate f and row c, the sum over the row of (fake_quantize(rows[c, r],
  // scale[f, c], zero_point[f, c]) - rows[c, r])^2; rows float32 [C, R], scale float32 and zero_point int32 [F, C]
  // -> float64 [F, C], summed in the same order on every CPU path and on CUDA; scale and zero_point must be valid
  // qparams of the format (the CPU kernel checks their values, the CUDA kernel does not read them on the host)
  m.def("fake_quantize_error(Tensor rows, Tensor scale, Tensor zero_point, int bits, bool signed, str rounding) -> Tensor");
  // symmetric per-row (per-token) quantization over the last dim: scale[r] = absmax(row r) / (2^(bits-1) - 1)
  // (1.0 for an all-zero row); returns (int8 q shaped like x, float32 scale shaped x.shape[:-1])
  m.def("quantize_per_token(Tensor x, int bits) -> (Tensor, Tensor)");

  // ---- integer matrix family: csrc/cpu/gemm.cpp + csrc/cpu/conv.cpp, csrc/cuda/gemm.cu + csrc/cuda/conv.cu ----
  // exact int32 [M, N] = a [M, K] int8 @ b [K, N] int8, any strides
  m.def("int8_mm(Tensor a, Tensor b) -> Tensor");
  // [N, K] or [G, N, K] int8 weight, or a conv weight [G, N, KH, KW, C] (packed as [G, N, KH*KW*C]) -> packed
  // weight of the same shape (see above)
  m.def("pack_int8_weight(Tensor w) -> Tensor");
  // y[m, n] = (sum_k (x_q[m, k] - x_zero_point) * w[n, k]) * x_scale[m or 0] * w_scale[n] + bias[n]
  // x_q: [M, K] int8 or uint8; x_scale: float32 [M] (per token) or [1]; w_sum[n] = sum_k w[n, k] (int32);
  // out_dtype float32/float16/bfloat16, or int8/uint8 with out_scale: requantized
  // clamp(rne(y * (1 / out_scale)) + out_zero_point) for integer-only pipelines, clamped to the range of out_bits
  // bits in [2, 8] ([0, 2^out_bits - 1] for uint8, [-2^(out_bits - 1), 2^(out_bits - 1) - 1] for int8; 8: the
  // type's own), the integers of a fake-quantized activation of that many bits.
  // clamp_min / clamp_max (each optional, finite, clamp_min <= clamp_max): a fused activation applied to y before
  // the conversion, y = min(max(y, float(clamp_min)), float(clamp_max)) with NaN kept (ReLU: clamp_min 0; ReLU6 /
  // hardtanh: both).
  m.def("int8_linear(Tensor x_q, Tensor x_scale, int x_zero_point, Tensor w_packed, Tensor w_sum, Tensor w_scale, "
        "Tensor? bias, int out_features, ScalarType out_dtype, float? out_scale=None, int out_zero_point=0, "
        "float? clamp_min=None, float? clamp_max=None, int out_bits=8) -> Tensor");
  // the int8-dynamic Linear forward in one call: quantize_per_token(x, 8) then int8_linear with x_zero_point 0 and
  // out_dtype = x's dtype (one implementation for every device: csrc/linear_dynamic.cpp)
  m.def("int8_linear_dynamic(Tensor x, Tensor w_packed, Tensor w_sum, Tensor w_scale, Tensor? bias, "
        "int out_features) -> Tensor");
  // the same with a float activation applied to y before the cast to x's dtype, as torch.nn.functional.gelu computes
  // it: "gelu" (the erf form) or "gelu_tanh" (approximate="tanh"); the CPU kernel computes it in the GEMM's epilogue.
  // (An overload rather than a defaulted argument: inductor's C++ wrapper calls ops with the arguments its graph
  // holds, which leaves out those at their default.)
  m.def("int8_linear_dynamic.activation(Tensor x, Tensor w_packed, Tensor w_sum, Tensor w_scale, Tensor? bias, "
        "int out_features, str activation) -> Tensor");
  // x_q: [B, C, H, W] int8/uint8 (any memory format); weight packed as [G, OC/G, KH, KW, C/G] (the
  // reduction index ordered (kh, kw, c)); output [B, OC, OH, OW] of out_dtype in channels-last memory format,
  // float or requantized to int8/uint8 with out_scale / out_zero_point / out_bits, and clamped by clamp_min /
  // clamp_max, as in int8_linear.
  m.def("int8_conv2d(Tensor x_q, Tensor x_scale, int x_zero_point, Tensor w_packed, Tensor w_sum, Tensor w_scale, "
        "Tensor? bias, int out_channels, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
        "int groups, ScalarType out_dtype, float? out_scale=None, int out_zero_point=0, float? clamp_min=None, "
        "float? clamp_max=None, int out_bits=8) -> Tensor");
  // the same conv with a residual add (an integer pipeline's conv + add [+ ReLU] in one op): y as int8_conv2d
  // computes it for a float32 output (clamped by clamp_min / clamp_max), then y = y + float(residual -
  // residual_zero_point) * residual_scale in float32 (the product rounded, then the sum), y = max(y, 0) when relu, and
  // the output conversion of int8_conv2d. residual: int8/uint8 of the output's shape on x_q's device (any memory
  // format; channels-last is read without a copy); residual_scale: float32 [1]. The CPU kernel adds it in the
  // conv's epilogue; the CUDA kernel runs the conv with a float32 output, then the add, the ReLU and the output
  // conversion in one element-wise pass (quantized_add's). (An overload without defaults: see
  // int8_linear_dynamic.activation.)
  m.def("int8_conv2d.residual(Tensor x_q, Tensor x_scale, int x_zero_point, Tensor w_packed, Tensor w_sum, "
        "Tensor w_scale, Tensor? bias, int out_channels, int[2] kernel_size, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, ScalarType out_dtype, float? out_scale, int out_zero_point, float? clamp_min, "
        "float? clamp_max, Tensor residual, Tensor residual_scale, int residual_zero_point, bool relu, "
        "int out_bits) -> Tensor");

  // ---- integer element-wise ops: csrc/cpu/quantize.cpp, csrc/cuda/quantize.cu ----
  // y = float(a - a_zero_point) * a_scale + float(b - b_zero_point) * b_scale in float32 (those operations in that
  // order, no fused multiply-add), then y = max(y, 0) when relu; a and b int8 or uint8 (each either) of the same
  // shape, any strides; scales float32 [1]. Output of a's shape and memory format: float32/float16/bfloat16 (a cast),
  // or int8/uint8 requantized with out_scale / out_zero_point / out_bits as in int8_linear (a residual add in an
  // integer pipeline).
  m.def("quantized_add(Tensor a, Tensor a_scale, int a_zero_point, Tensor b, Tensor b_scale, int b_zero_point, "
        "ScalarType out_dtype, float? out_scale=None, int out_zero_point=0, bool relu=False, "
        "int out_bits=8) -> Tensor");
  // y = float(a - a_zero_point) * a_scale * (float(b - b_zero_point) * b_scale) in float32 (each product rounded):
  // quantized_add's map with a product (a squeeze-excitation block's x * gate in an integer pipeline). a and b
  // broadcast as torch's a * b does; the output has the broadcast shape (the memory format of the operand of that
  // shape, a's where both are) and quantized_add's output dtypes and conversion. The CPU kernel reads a broadcast
  // operand in place (its values dequantized once), the CUDA kernel a copy expanded to the output's shape.
  m.def("quantized_mul(Tensor a, Tensor a_scale, int a_zero_point, Tensor b, Tensor b_scale, int b_zero_point, "
        "ScalarType out_dtype, float? out_scale=None, int out_zero_point=0, int out_bits=8) -> Tensor");
  // y[i] = table[uint8 bits of x[i]]: an element-wise function of a quantized tensor (an activation in an integer
  // pipeline) as a 256-entry table. x int8 or uint8, any shape and strides; table 1-d with 256 entries, int8 or
  // uint8 (the output dtype), on x's device. An int8 x indexes by its two's-complement byte (-128 -> 128, -1 -> 255).
  // Output of x's shape and memory format: csrc/cpu/lookup.cpp, csrc/cuda/quantize.cu.
  m.def("quantized_lookup(Tensor x, Tensor table) -> Tensor");
  // torch.nn.functional.max_pool2d of an int8/uint8 x [B?, C, H, W] (same output size, memory format and argument
  // rules) on every device: csrc/cpu/pool.cpp and csrc/cuda/pool.cu (torch's CUDA max_pool2d takes floats only).
  m.def("quantized_max_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
        "bool ceil_mode) -> Tensor");
  // torch.sum(x, dim, keepdim, dtype=torch.int32) of an int8/uint8 x: the exact int32 sums of an average pool on
  // integers. csrc/cpu/pool.cpp (a channels-last x over H and W, vectorized over the channels); elsewhere torch's
  // sum (CompositeExplicitAutograd, there too).
  m.def("quantized_sum(Tensor x, int[] dim, bool keepdim=False) -> Tensor");
  // torch.nn.functional.avg_pool2d of x's dequantized values, (x - zero_point) * scale, of an int8/uint8 x
  // [B?, C, H, W] (same output size, memory format and argument rules), as float32: each window's exact sum of
  // x - zero_point over its elements inside the input, times scale, over the divisor (float32 steps, the same on
  // every device). csrc/cpu/pool.cpp (a channels-last x); elsewhere torch's float32 average pools with divisor 1
  // (CompositeExplicitAutograd, there too).
  m.def("quantized_avg_pool2d(Tensor x, float scale, int zero_point, int[2] kernel_size, int[2] stride, "
        "int[2] padding, bool ceil_mode=False, bool count_include_pad=True, int? divisor_override=None) -> Tensor");
  // torch.nn.functional.adaptive_avg_pool2d of x's dequantized values, as quantized_avg_pool2d: window (i, j) spans
  // rows [floor(i * H / out_h), ceil((i + 1) * H / out_h)) and the columns alike; its exact sum of x - zero_point,
  // times scale, over its element count (float32 steps, the same on every device). csrc/cpu/pool.cpp (a
  // channels-last x); elsewhere torch's adaptive pool of x - zero_point, each window's sum recovered exactly from
  // its mean (CompositeExplicitAutograd, there too).
  m.def("quantized_adaptive_avg_pool2d(Tensor x, float scale, int zero_point, int[2] output_size) -> Tensor");

  // ---- the CPU code path the kernels run now: "avx512_vnni", "avx2" or "scalar" (csrc/cpu/isa.cpp) ----
  m.def("cpu_kernel_path() -> str");
  // multiply-adds per second of one core running only that path's multiply-add instruction: the benchmarks' limit
  m.def("cpu_multiply_add_peak(int iterations) -> float");
}

// A module torchquant._C that Python can import; loading it runs the registrations above.
// Its functions are the direct Python calls of the quantize family (csrc/python_calls.cpp); PACK_ALIGN is the
// packed weights' padding (kPackAlign), for the fake kernel of pack_int8_weight.
extern PyMethodDef torchquant_python_calls[];
static PyModuleDef torchquant_module = {PyModuleDef_HEAD_INIT, "_C", "torchquant compiled ops", -1,
                                        torchquant_python_calls};
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&torchquant_module);
  if (module != nullptr && PyModule_AddIntConstant(module, "PACK_ALIGN", torchquant::kPackAlign) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
