// Scalar quantization math shared by the CPU and CUDA kernels, so both produce the same integers.
// SIMD code paths must reproduce these functions exactly; tests compare them against each other.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TQ_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TQ_HOST_DEVICE inline
#endif

namespace torchquant {

enum class Rounding : int { Nearest = 0, Truncate = 1 };

// The integer range of a (bits, signed) format. Signed 1 bit is sign binarization: {-1, +1}.
struct QuantFormat {
  float qmin;
  float qmax;
  bool binary;
};

TQ_HOST_DEVICE QuantFormat quant_format(int64_t bits, bool is_signed) {
  if (is_signed && bits == 1) return {-1.0f, 1.0f, true};
  if (is_signed) return {-static_cast<float>(1 << (bits - 1)), static_cast<float>((1 << (bits - 1)) - 1), false};
  return {0.0f, static_cast<float>((1 << bits) - 1), false};
}

// Rounded, un-clamped x * inv_scale (before adding the zero point). inv_scale is 1.0f / scale in float32,
// exactly as torch.fake_quantize_per_*_affine computes it; rintf rounds half to even in the default mode.
TQ_HOST_DEVICE float round_scaled(float x, float inv_scale, Rounding rounding) {
  const float v = x * inv_scale;
  return rounding == Rounding::Nearest ? rintf(v) : truncf(v);
}

// The quantized value as an integer-valued float: NaN -> zero_point, +-inf -> qmax / qmin.
TQ_HOST_DEVICE float quantize_value(float x, float inv_scale, float zero_point, QuantFormat f, Rounding rounding) {
  if (x != x) return zero_point;
  if (f.binary) return x >= 0.0f ? 1.0f : -1.0f;
  const float q = round_scaled(x, inv_scale, rounding) + zero_point;
  return fminf(fmaxf(q, f.qmin), f.qmax);
}

// The per-token scale of a row whose largest finite |x| is absmax: absmax / qmax, 1.0 for a row without a
// nonzero finite value, and at least the smallest normal float32, so that 1 / scale stays finite (a subnormal
// scale would make 0 * (1 / scale) NaN). The exported ONNX graph computes the same Max.
TQ_HOST_DEVICE float per_token_scale(float absmax, float qmax) {
  return absmax > 0.0f ? fmaxf(absmax / qmax, FLT_MIN) : 1.0f;
}

// A fused activation clamp: y = min(max(y, lo), hi), lo/hi at -inf/+inf when not asked for (ReLU: lo = 0; ReLU6:
// lo = 0, hi = 6). NaN stays NaN, as torch.clamp keeps it; written as comparisons so that SIMD max/min (which
// return their second operand on NaN) give the same bits: max(lo, y) == (y < lo ? lo : y).
struct ActivationClamp {
  float lo = -INFINITY;
  float hi = INFINITY;
};

TQ_HOST_DEVICE float clamp_activation(float y, ActivationClamp c) {
  y = y < c.lo ? c.lo : y;
  return y > c.hi ? c.hi : y;
}

// How quantized_add and quantized_mul combine their two dequantized operands.
enum class BinaryOp : uint8_t { Add, Multiply };

// quantized_add's and quantized_mul's element map apart from the scales (shared by the CPU and CUDA kernels, set up
// by prepare_quantized_binary): y = (float(a) - a_zero_point) * a_scale `op` (float(b) - b_zero_point) * b_scale,
// then clamp_activation(y, clamp), then the float cast or, for int8/uint8 outputs, quantize_value(y, inv_out_scale,
// out_zero_point, out_format).
struct BinaryMap {
  BinaryOp op;
  float a_zero_point, b_zero_point;
  ActivationClamp clamp;  // relu: [0, inf)
  float inv_out_scale, out_zero_point;
  QuantFormat out_format;
};

// The first tap inside the input (index >= 0) of a max-pool window starting at `start` with taps `dilation` apart:
// computed rather than stepped to, as the left padding may be up to half of a kernel of 2^62 (stepping would loop
// that many times). May lie past the window's end (no tap inside).
TQ_HOST_DEVICE int64_t first_tap_inside(int64_t start, int64_t dilation) {
  if (start >= 0) return start;
  const int64_t taps_before = -start / dilation + (-start % dilation != 0);
  return start + taps_before * dilation;
}

// How many taps `dilation` apart lie in [first, end): counted without forming first + k * dilation past end, which
// could overflow int64 for dilations near 2^63.
TQ_HOST_DEVICE int64_t taps_inside(int64_t first, int64_t end, int64_t dilation) {
  return first < end ? (end - 1 - first) / dilation + 1 : 0;
}

// quantize then dequantize; NaN stays NaN.
TQ_HOST_DEVICE float fake_quantize_value(float x, float scale, float inv_scale, float zero_point, QuantFormat f,
                                         Rounding rounding) {
  if (x != x) return x;
  return (quantize_value(x, inv_scale, zero_point, f, rounding) - zero_point) * scale;
}

// Whether the straight-through gradient passes: the un-clamped quantized value lies inside [qmin, qmax]
// (binary: |x| <= scale). NaN passes no gradient.
TQ_HOST_DEVICE bool fake_quantize_passes_grad(float x, float scale, float inv_scale, float zero_point, QuantFormat f,
                                              Rounding rounding) {
  if (f.binary) return fabsf(x) <= scale;
  const float q = round_scaled(x, inv_scale, rounding) + zero_point;
  return q >= f.qmin && q <= f.qmax;
}

// fake_quantize_error (the mse observer's search) sums each chunk of kErrorChunk elements of a row (16 KB of
// float32, read from L1 once per candidate) in kErrorLanes float32 lanes: element i of the chunk in lane
// i % kErrorLanes, each term d * d added with one fused multiply-add, in order; then the lanes as sum_error_lanes
// adds them, then the chunks in order, in double. Every CPU path and the CUDA kernel sum in that order.
constexpr int kErrorLanes = 64;
constexpr int64_t kErrorChunk = 4096;

// The lanes' sum in double, as a tree: the upper half added to the lower half, 32 lanes, then 16, ... then 1.
TQ_HOST_DEVICE double sum_error_lanes(const float* lanes) {
  double s[kErrorLanes / 2];
  for (int l = 0; l < kErrorLanes / 2; ++l) s[l] = static_cast<double>(lanes[l]) + lanes[l + kErrorLanes / 2];
  for (int half = kErrorLanes / 4; half >= 1; half /= 2)
    for (int l = 0; l < half; ++l) s[l] += s[l + half];
  return s[0];
}

}  // namespace torchquant
