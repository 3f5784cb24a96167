// The CPU int8 GEMM engine shared by int8_mm, int8_linear and int8_conv2d (csrc/cpu/gemm.cpp, conv.cpp).
//
// Operands:
//   activations: uint8 rows, one row per output row, `lda` bytes apart, at least round_up(K, 4) readable bytes each
//                (bytes past K multiply zero weights). Signed int8 activations are stored shifted by +128 (x ^ 0x80)
//                so the u8 x s8 instructions apply; the epilogue subtracts the matching correction per column.
//   weights:     packed panels of kPackAlign (64) output columns; inside a panel the bytes run [k / 4][column][k % 4]
//                (the VNNI order: one 64-byte vector holds 4 consecutive k of 16 columns). Zero padded to whole
//                panels and the panel depth GemmArgs::ldb (a multiple of 4, >= K).
// Every path (AVX-512 VNNI, AVX2, scalar) reads the same packed layouts and produces the same integers.
#pragma once
#include <cstdint>
#include <vector>

#include "cpu/isa.h"
#include "gemm_front.h"
#include "quant_math.h"
#include "sizes.h"

namespace torchquant::gemm {

// A weight panel holds kPackAlign output columns (4 zmm of int32 accumulators), so packed weights hold whole panels.
constexpr int64_t kStepBytes = 4 * kPackAlign;  // one k-step (4 values of k) of a panel

// The byte of a packed panel that holds the weight of column col at depth k.
constexpr int64_t panel_byte(int64_t k, int64_t col) { return (k / 4) * kStepBytes + 4 * col + k % 4; }

// What the GEMM's store does with each int32 accumulator acc[m][n] (already summed over k):
//   v = acc - col_offset[n]                                    (zero-point / shift correction)
//   Int32:         out = v
//   float kinds:   out = clamp_activation(gelu(v * row_scale[m or 0] * col_scale[n] + bias[n]), clamp), gelu the
//                  identity unless asked for
//   Int8 / UInt8:  out = clamp(rne(y * inv_out_scale) + out_zero_point, qmin, qmax), y as above
//   with a residual: y = clamp_activation(y + (float(r[m][n] ^ flip) - zero_point) * scale, residual.clamp) after
//   the activation clamp, before the conversion (int8_conv2d.residual; no GELU)

// The residual add of int8_conv2d.residual: bytes [m][n] `row_stride` apart (the output's layout), int8 ones read
// shifted like the activations (r ^ 0x80, with zero_point + 128: the same float values exactly).
struct ResidualInput {
  const uint8_t* data = nullptr;  // none without
  int64_t row_stride = 0;
  uint8_t flip = 0;
  float scale = 1.0f, zero_point = 0.0f;
  ActivationClamp clamp;  // after the add (ReLU: [0, inf))
};

struct Epilogue {
  OutKind kind = OutKind::Int32;
  void* out = nullptr;
  int64_t out_row_stride = 0;  // elements between output rows
  const int32_t* col_offset = nullptr;
  const float* row_scale = nullptr;
  bool per_row_scale = false;
  const float* col_scale = nullptr;
  const float* bias = nullptr;  // nullable
  float inv_out_scale = 1.0f;
  float out_zero_point = 0.0f;
  float qmin = 0.0f;  // the requantized range: the output type's, or inside it (out_bits < 8)
  float qmax = 0.0f;
  ActivationClamp clamp;  // the fused activation (none: -inf / +inf)
  Gelu gelu = Gelu::None;  // float kinds without a clamp only
  bool streaming = false;  // non-temporal stores (with_streaming sets it for outputs larger than the caches)
  ResidualInput residual;  // float, int8 and uint8 kinds
};

// Scratch memory of the calling thread, reused across calls: activations re-laid by the ops, weights packed on the
// fly, activation rows that the GEMM has a RowFiller produce, and the AVX2 kernel's operands widened to int16. A
// fresh multi-megabyte allocation costs a page fault per 4 KB on first touch, as much as the packing itself, so a
// buffer is kept for the next call, but only up to kScratchKeptBytes: a ScratchScope frees larger ones when it ends.
// A failed allocation (std::bad_alloc, a MemoryError in Python) leaves the slot empty and usable.
enum class Scratch { Activations = 0, Weights = 1, GemmRows = 2, WideOperands = 3, PaddedInput = 4 };
// per slot and thread: enough for the weight of a 4096 x 8192 int8_mm, so such calls keep their buffers (a fresh
// 16 MiB buffer cost ~5 ms of page faults, a fifth of a 256 x 4096 x 4096 int8_mm)
constexpr int64_t kScratchKeptBytes = int64_t{32} << 20;
uint8_t* scratch_buffer(Scratch slot, int64_t bytes);

// Frees the calling thread's scratch buffer of one slot if it is larger than kScratchKeptBytes when it goes out of
// scope (on return or exception). Every user of a slot holds one, on the thread that asked for the buffer, for as
// long as any thread reads it.
class ScratchScope {
 public:
  explicit ScratchScope(Scratch slot) : slot_(slot) {}
  ScratchScope(const ScratchScope&) = delete;
  ScratchScope& operator=(const ScratchScope&) = delete;
  ~ScratchScope();

 private:
  Scratch slot_;
};

// Runs the GEMM (GemmArgs, gemm_front.h: activations as above, in place or from fill_rows; k unpadded) with the
// epilogue on the given ISA path, threaded with at::parallel_for.
void gemm_u8s8(const GemmArgs& args, const Epilogue& ep, CpuIsa isa);

// The depth to which a caller that packs both operands pads k (zero bytes past k in both): round_up(k, 64) where
// gemm_u8s8 multiplies work items of m rows on AMX tiles (no k-steps past the last whole tile depth left to the
// vector kernel; a last item of fewer than 8 rows multiplies the zero bytes on it), else round_up(k, 4).
int64_t gemm_packed_depth(int64_t m, int64_t k, CpuIsa isa);

// ep with `streaming` set for an output of `rows` rows, each group of `cols` columns: streaming stores when the
// output is larger than the caches (TORCHQUANT_STREAMING_BYTES, default 16 MB) and they fill whole cache lines (a
// kernel that sets it issues an sfence before its threads join).
Epilogue with_streaming(const Epilogue& ep, int64_t rows, int64_t cols);

// The AVX-512 epilogue's inputs for one panel (up to kPackAlign columns), made once per call: the per-column
// values zero filled past ncols, and for int8/uint8 outputs the requantization folded into one clamp.
//
// Folding: with 1 / out_scale finite and positive (out_scale >= FLT_MIN, as the ops check), clamp_activation(y) *
// inv equals y * inv clamped to [lo * inv, hi * inv] (rounded multiplication by a positive number is monotone),
// rounding to nearest commutes with a clamp to integer bounds, and a clamp of a clamp is one clamp; so
// quantize_value(clamp_activation(y)) is rne(min(q_hi, max(q_lo, y * inv))) + zero point bit for bit, with q_lo /
// q_hi the scalar formula's values at -inf / +inf, and NaN y (NaN y * inv) the zero point: five operations per
// vector instead of nine.
//
// A bound that is the output type's own (q_lo = -128 or 0 less the zero point, or q_hi = 127 or 255 less it) the
// AVX-512 kernel of whole tiles leaves to the packs after the conversion (int32 -> int16 with saturation, the zero
// point added with saturation, int16 -> int8/uint8 with saturation clamp rne(x) + zero point to the type's range;
// a narrower [qmin, qmax] of fewer output bits is never the packs'): the conversion
// keeps the order of values and gives INT_MIN past the int32 range (and for infinities), so the lower one always,
// the upper one where no x of the panel can reach 2^31 nor a float step overflow (see panel_epilogue), two of the
// twelve operations per 16 outputs.
struct PanelEpilogue {
  alignas(64) int32_t offset[kPackAlign];
  alignas(64) float scale[kPackAlign];
  alignas(64) float bias[kPackAlign];  // -0.0 without a bias: y + -0.0 == y for every y, -0.0 included
  uint16_t mask[kPackAlign / 16];  // the valid columns of each 16-column vector
  int ncols, vectors;
  bool may_be_nan;  // whether a requantized y can be NaN (a NaN or infinite bias or scale, per-row scales)
  float clamp_lo, clamp_hi;  // the activation clamp of float outputs
  Gelu gelu;
  float inv_out_scale, q_lo, q_hi;  // with a residual, q_lo / q_hi fold its clamp (the activation clamp comes first)
  bool clamp_q_lo, clamp_q_hi;      // whether the whole-tile requantization must apply q_lo / q_hi in float
  int16_t zero_point;
  float residual_scale, residual_zero_point;
  float residual_lo, residual_hi;  // the residual's clamp (float kinds; folded into q_lo / q_hi for the others)
  uint8_t residual_flip;
};

// The PanelEpilogue of every panel of every group of an output of groups x n columns, [group * panels + panel], for
// the epilogue of the `isa` path: made for the AVX-512 and AVX2 ones (the scalar epilogue reads the Epilogue itself,
// and gets a placeholder). k: the depth of the sums (k products of (x - x zero point) and w each, at most 255 * 128
// in size; zero-filled depth adds nothing).
class PanelEpilogues {
 public:
  PanelEpilogues(const Epilogue& ep, int64_t groups, int64_t n, int64_t k, CpuIsa isa);
  const PanelEpilogue& operator[](int64_t i) const { return panels_.empty() ? unused_ : panels_[i]; }

 private:
  std::vector<PanelEpilogue> panels_;
  PanelEpilogue unused_{};
};

// The fused epilogue of gemm_u8s8 applied to a tile of int32 sums that a kernel made itself (the depthwise conv):
// tile[r * kPackAlign + c] is the sum of output row row0 + r, column col0 + c, for r < rows, c < ncols <= kPackAlign
// (tile 64-byte aligned: the AVX-512 path loads whole rows); panel: the PanelEpilogues entry of the panel starting at
// column col0.
void epilogue_tile(const Epilogue& ep, const PanelEpilogue& panel, const int32_t* tile, int64_t row0, int64_t rows,
                   int64_t col0, int64_t ncols, CpuIsa isa);

// int8_conv2d without an im2col copy for windows inside the input: groups == 1, uint8 channels-last x, dil_w == 1.
// A kernel row of the window is kw * channels consecutive input bytes, and the same k range of the packed weight (k
// runs (kh, kw, c)), so each run of up to 6 output pixels along an output row is multiplied kernel row by kernel row
// straight from the input, consecutive pixels stride_w * channels bytes apart. The weight's kernel rows are
// round_up(kw * channels, 4) deep (zero weights past kw * channels: the bytes read past the window's row multiply
// them), args.k = kh times that. Pixels whose windows reach into the padding (or whose padded rows would be read
// past the input's end) take their rows from args.fill_rows (im2col, the same padded layout). On AVX2 the rows of an
// item's windows are widened to int16 instead (pad_byte, x's zero point, where they leave the input) for the wide
// kernel. args as for gemm_u8s8 (m: the output pixels) with groups == 1.
void conv_u8s8_in_place(const GemmArgs& args, const ConvGeometry& g, const uint8_t* x, uint8_t pad_byte,
                        const Epilogue& ep, CpuIsa isa);

// Whether conv_u8s8_amx takes the conv g: groups == 1, undilated kernel rows of whole 64-byte k-chunks (kw *
// channels a multiple of 64: 3x3 kernels over a multiple of 64 channels), padding narrower than the kernel, and at
// least 7 of 8 multiplied pixels stored (see AmxLines in gemm_core.cpp).
bool amx_pads_windows(const ConvGeometry& g);

// int8_conv2d on AMX tiles (the avx512_amx path) for a conv amx_pads_windows takes, with uint8 channels-last x: each
// thread copies the rows of one image at a time with their padding (pad_byte, x's zero point) into a scratch buffer
// of its own as its work reaches them, from which every window is read in place, kernel row by kernel row (a
// tile's 16 rows are 16 pixels' bytes of one k-chunk); with stride 1 a tile's rows run on across output rows,
// through the windows that straddle two padded rows, which are multiplied and not stored. args as for gemm_u8s8
// with groups == 1 (k = kh * kw * channels, unpadded).
void conv_u8s8_amx(const GemmArgs& args, const ConvGeometry& g, const uint8_t* x, uint8_t pad_byte,
                   const Epilogue& ep);

// Whether conv_u8s8_amx_blocks takes the conv g: ungrouped, stride 2 both ways, undilated, at most 4 channels, a
// kernel of at most 8 x 8 and padding narrower than it (a network's stem: 7x7 over 3 channels, whose 21-byte kernel
// rows are no whole k-chunk), where the stride-1 conv it becomes is one conv_u8s8_amx takes.
bool amx_takes_blocks(const ConvGeometry& g);

// int8_conv2d on AMX tiles of a conv amx_takes_blocks takes, with uint8 channels-last x: each 2x2 block of the
// padded input (the padding x's zero point) becomes one pixel of 16 channels (4 x channels, then the zero point),
// which makes the conv an unpadded stride-1 conv with a ceil(kh / 2) x 4 kernel whose rows are one 64-byte k-chunk,
// run by conv_u8s8_amx against the weight rearranged alike (zeros for the taps past kh x kw: ResNet's stem
// multiplies 256 bytes of k for its 147). args as for gemm_u8s8 with groups == 1.
void conv_u8s8_amx_blocks(const GemmArgs& args, const ConvGeometry& g, const uint8_t* x, uint8_t pad_byte,
                          const Epilogue& ep);

// The kernel taps a direct conv takes at most (one bit each in a 64-bit mask).
constexpr int64_t kMaxDirectTaps = 64;

// int8_conv2d as a direct conv on the AVX-512 path: groups == 1, uint8 channels-last x with a multiple of 4 channels,
// n a multiple of kPackAlign, at most kMaxDirectTaps kernel taps. Groups of up to 6 output pixels are multiplied tap
// by tap straight from the input (each pixel's tap is g.channels consecutive bytes, the same k range of the packed
// weight for every pixel: k runs (kh, kw, c)), with taps outside the input reading pad_byte (the zero point); where
// pad_byte is 0 the taps outside the input for all pixels of a group are skipped (they add nothing). Pixels are
// grouped by which of their taps lie inside, across output rows and images. args as for gemm_u8s8 (m: the output
// pixels, b / ldb: the packed weight; a and fill_rows unused).
void conv_u8s8_direct(const GemmArgs& args, const ConvGeometry& g, const uint8_t* x, uint8_t pad_byte,
                      const Epilogue& ep);

// Packs w[n, k] (element (n, k) at w + n * stride_n + k * stride_k) into round_up(n, kPackAlign) / kPackAlign
// panels of depth kp at dst, with the isa path's vector code. With col_sums non-null also writes col_sums[n] =
// sum_k w[n, k].
void pack_weight(const int8_t* w, int64_t n, int64_t k, int64_t stride_n, int64_t stride_k, int64_t kp, int8_t* dst,
                 int32_t* col_sums, CpuIsa isa);

// Whether the bytes of src[m, k] (element at src + i * stride_m + j * stride_k) are all below 128 (GemmArgs::
// a_below_128: the AVX2 path then multiplies any int8 weight as bytes); false at the first one that is not. Called
// on the AVX2 path only, where it pays.
bool bytes_below_128(const uint8_t* src, int64_t m, int64_t k, int64_t stride_m, int64_t stride_k);

// Copies src[m, k] (element at src + i * stride_m + j * stride_k) into rows of lda bytes, XOR-ing each byte with
// `flip` (0x80 turns int8 into the shifted uint8 form, 0 copies uint8) and zero filling columns k..lda, with the
// isa path's vector code.
void pack_activation_rows(const uint8_t* src, int64_t m, int64_t k, int64_t stride_m, int64_t stride_k, uint8_t flip,
                          uint8_t* dst, int64_t lda, CpuIsa isa);

// out[i, c] = sum_j a[i, j] * b[c, j], exact int32 (wrapping as int32 sums do), for the few rows of a
// (m <= kFewRowsMax; element (i, j) at a + i * stride_m + j * stride_k) against columns of b read in place: column c
// is the k bytes at b + c * ldb (the nn.Linear layout of int8_mm's b, w.t()). b streams once from memory, without
// the packing copy that a product of more rows pays back. On the AVX-512 paths (a shifted to uint8, vpdpbusd) and
// the AVX2 one (a widened to int16, vpmaddwd).
constexpr int64_t kFewRowsMax = 8;
void multiply_few_rows(const int8_t* a, int64_t m, int64_t k, int64_t stride_m, int64_t stride_k, const int8_t* b,
                       int64_t ldb, int64_t n, int32_t* out, int64_t ldo, CpuIsa isa);

// multiply_few_rows' product for the rows that rows_in_place_on_amx takes, on AMX tiles (the avx512_amx path): 16
// columns of b read in place, 64 bytes of k each, are tdpbssd's first operand and a's rows, packed as a weight
// panel, its second (int8 x int8, exact, wrapping as int32 sums do), so that each tile of sums is a block of out
// transposed. b streams from memory once (up to 32 rows; more rows go over each block of b again while it is in
// L2), without the packing copy: 16 x 4096 x 4096, 1 thread on a Xeon, 1.40 ms packed, 0.72-0.78 ms in place.
constexpr int64_t kAmxRowsMax = 384;
// Whether multiply_rows_amx takes m rows against a b of k x n: from 8 to 384 rows (1 thread on a Xeon, against
// packing b: 9-64 rows 1.45-2.64x, 128 rows 1.22-1.57x, 256 rows 1.04-1.34x, 384 rows 1.04-2.40x; 512 rows 0.85-1.55x,
// 1024 rows 0.75-0.80x; 8 rows against the vpdpbusd kernel of multiply_few_rows 0.72-0.88 against 0.87-0.93 ms at
// 4096 x 4096), and from 4 rows where b takes at most 4 MB (against that kernel, whose sums of lanes at the end of
// each column cost most at small k: 4-7 x 384 x 1536 28-41 -> 10-13 us, 4-7 x 768 x 3072 107-139 -> 89-93 us;
// streaming a larger b from memory, 64 columns a tile block, it is slower: 4 x 4096 x 4096 0.65 -> 0.77 ms).
bool rows_in_place_on_amx(int64_t m, int64_t k, int64_t n);
void multiply_rows_amx(const int8_t* a, int64_t m, int64_t k, int64_t stride_m, int64_t stride_k, const int8_t* b,
                       int64_t ldb, int64_t n, int32_t* out, int64_t ldo);

// dst[0..8) (+)= the column sums of two accumulators of 4 columns x 2 partial sums each (columns 0-3 in lo, 4-7 in
// hi): written when first, else added (the AVX2 kernels' vpmaddwd lanes of one column).
TQ_TARGET_AVX2 inline __attribute__((always_inline)) void store_column_sums_avx2(__m256i lo, __m256i hi,
                                                                               int32_t* dst, bool first) {
  // hadd gives columns (0 1 4 5 | 2 3 6 7); the 64-bit permute puts them in order
  const __m256i sums = _mm256_permute4x64_epi64(_mm256_hadd_epi32(lo, hi), 0xD8);
  __m256i* d = reinterpret_cast<__m256i*>(dst);
  _mm256_storeu_si256(d, first ? sums : _mm256_add_epi32(_mm256_loadu_si256(d), sums));
}

}  // namespace torchquant::gemm
