#pragma once
// The quantize family runs elementwise over memory. A non-overlapping, dense tensor is read where it lies (its
// numel() values from data_ptr(), in memory order) and the output takes its strides, the layout torch.empty_like
// gives: a channels-last or transposed input gives an output laid out the same, without a transposing copy. Any
// other tensor is first copied into empty_like's dense layout.

#include <ATen/ATen.h>
#include <c10/util/MaybeOwned.h>

#include <utility>

namespace torchquant {

inline c10::MaybeOwned<at::Tensor> dense_in_memory(const at::Tensor& x) {
  if (x.is_non_overlapping_and_dense()) return c10::MaybeOwned<at::Tensor>::borrowed(x);
  at::Tensor dense = at::empty_like(x);
  dense.copy_(x);
  return c10::MaybeOwned<at::Tensor>::owned(std::move(dense));
}

// t (of dense's sizes) laid out as dense, whose memory order the kernels walk: t itself when its strides are
// dense's (a dimension of size 1 may have any stride: it moves no offset).
inline c10::MaybeOwned<at::Tensor> in_layout_of(const at::Tensor& t, const at::Tensor& dense) {
  bool same = true;
  for (int64_t d = 0; d < t.dim(); ++d) same = same && (t.size(d) <= 1 || t.stride(d) == dense.stride(d));
  if (same) return c10::MaybeOwned<at::Tensor>::borrowed(t);
  at::Tensor copy = at::empty_strided(dense.sizes(), dense.strides(), t.options());
  copy.copy_(t);
  return c10::MaybeOwned<at::Tensor>::owned(std::move(copy));
}

}  // namespace torchquant
