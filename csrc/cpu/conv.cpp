// CPU int8_conv2d (schema in csrc/ops.cpp): channels-last input, im2col rows ordered (kh, kw, c) per group, then
// the int8 GEMM of gemm_core with the float epilogue writing the channels-last output directly.
#include "check.h"
#include <algorithm>
#include <cstring>
#include <optional>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "arg_checks.h"
#include "cpu/gemm_core.h"
#include "cpu/gemm_ops.h"
#include "cpu/isa.h"

namespace torchquant::gemm {
namespace {

// Writes the im2col rows of a channels-last input: row (b, oh, ow) holds, for each group, the k = (kh, kw, c)
// window values (XOR flip) in k4 bytes, zero filled past the window; taps outside the image read the zero point.
void im2col_nhwc(const uint8_t* x, const ConvGeometry& g, uint8_t pad_byte, uint8_t flip, int64_t k4, uint8_t* dst) {
  const int64_t cg = g.channels / g.groups;
  const int64_t window = g.kh * g.kw * cg;
  const int64_t lda = g.groups * k4;
  const int64_t rows = g.batch * g.out_h * g.out_w;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(lda, 1));
  // undilated kernel rows of an ungrouped conv read consecutive channels-last pixels
  const bool whole_pixels = g.dil_w == 1 && g.groups == 1;
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    // (b, oh, ow) of the row, stepped rather than divided out per row (three divisions per row were a fifth of a
    // small conv's im2col time)
    int64_t b = begin / (g.out_h * g.out_w), oh = (begin / g.out_w) % g.out_h, ow = begin % g.out_w - 1;
    for (int64_t row = begin; row < end; ++row) {
      if (++ow == g.out_w) {
        ow = 0;
        if (++oh == g.out_h) {
          oh = 0;
          ++b;
        }
      }
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        uint8_t* out = dst + row * lda + grp * k4;
        for (int64_t i = 0; i < g.kh; ++i) {
          const int64_t ih = oh * g.stride_h - g.pad_h + i * g.dil_h;
          const int64_t iw0 = ow * g.stride_w - g.pad_w;
          if (whole_pixels && ih >= 0 && ih < g.height && iw0 >= 0 && iw0 + g.kw <= g.width) {
            // the kernel row lies inside the image: its kw pixels are kw * channels consecutive bytes, one copy
            // (what makes im2col cheap for few channels, where per-tap copies of a few bytes dominate)
            copy_flip(out, x + ((b * g.height + ih) * g.width + iw0) * g.channels, g.kw * cg, flip);
            out += g.kw * cg;
            continue;
          }
          for (int64_t j = 0; j < g.kw; ++j, out += cg) {
            const int64_t iw = ow * g.stride_w - g.pad_w + j * g.dil_w;
            if (ih < 0 || ih >= g.height || iw < 0 || iw >= g.width) {
              std::memset(out, pad_byte, cg);
              continue;
            }
            const uint8_t* src = x + ((b * g.height + ih) * g.width + iw) * g.channels + grp * cg;
            copy_flip(out, src, cg, flip);
          }
        }
        std::memset(out, 0, k4 - window);
      }
    }
  });
}

at::Tensor int8_conv2d_cpu(const at::Tensor& x_q, const at::Tensor& x_scale, int64_t x_zero_point,
                           const at::Tensor& w_packed, const at::Tensor& w_sum, const at::Tensor& w_scale,
                           const std::optional<at::Tensor>& bias, int64_t out_channels, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           at::ScalarType out_dtype) {
  constexpr const char* op = "int8_conv2d";
  const ConvGeometry g = check_conv_arguments(op, x_q, out_channels, kernel_size, stride, padding, dilation, groups);
  const int64_t cg = g.channels / groups, ocg = out_channels / groups;
  const int64_t window = g.kh * g.kw * cg;
  TQ_CHECK(window >= 1, op, ": x_q must have at least one channel");
  check_packed_weight(op, w_packed, groups, ocg, window);
  const OutKind kind = float_out_kind(op, out_dtype);
  TQ_CHECK(x_scale.numel() == 1, op, ": x_scale must have 1 element (per-tensor activations), got ",
              x_scale.numel());
  const int64_t m = g.batch * g.out_h * g.out_w;
  const EpilogueInputs in =
      prepare_epilogue_inputs(op, x_q, x_zero_point, x_scale, m, w_sum, w_scale, bias, out_channels);

  at::Tensor out_nhwc = at::empty({g.batch, g.out_h, g.out_w, out_channels}, x_q.options().dtype(out_dtype));
  at::Tensor out = out_nhwc.permute({0, 3, 1, 2});
  if (m == 0) return out;

  const at::Tensor x_nhwc = x_q.contiguous(at::MemoryFormat::ChannelsLast);
  const uint8_t* x_bytes = static_cast<const uint8_t*>(x_nhwc.data_ptr());
  const uint8_t flip = activation_flip(x_q);
  GemmArgs args;
  const bool pointwise = g.kh == 1 && g.kw == 1 && g.stride_h == 1 && g.stride_w == 1 && g.pad_h == 0 && g.pad_w == 0;
  if (pointwise && flip == 0 && cg % 4 == 0) {  // uint8 1x1: the channels-last input is the GEMM's row matrix
    args.a = x_bytes;
    args.lda = g.channels;
    args.a_group_offset = cg;
  } else {
    const int64_t k4 = round_up(window, 4);
    uint8_t* columns = scratch_buffer(Scratch::Activations, m * groups * k4);
    const uint8_t pad_byte = static_cast<uint8_t>(x_zero_point) ^ flip;
    im2col_nhwc(x_bytes, g, pad_byte, flip, k4, columns);
    args.a = columns;
    args.lda = groups * k4;
    args.a_group_offset = k4;
  }
  args.b = w_packed.data_ptr<int8_t>();
  args.b_group_stride = w_packed.size(1) * w_packed.size(2);
  args.kp = w_packed.size(2);
  args.m = m;
  args.n = ocg;
  args.k = window;
  args.groups = groups;
  gemm_u8s8(args, in.epilogue(kind, out_nhwc.data_ptr(), out_channels), cpu_isa());
  return out;
}

}  // namespace
}  // namespace torchquant::gemm

TORCH_LIBRARY_IMPL(torchquant, CPU, m) { m.impl("int8_conv2d", &torchquant::gemm::int8_conv2d_cpu); }
