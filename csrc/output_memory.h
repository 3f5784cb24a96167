// The memory of the ops' outputs. On the CPU an output comes from a cache of freed output blocks (csrc/cpu/
// output_memory.cpp): glibc gives a freed block at the top of its heap back to the OS once the free space there
// passes its trim threshold, and maps a block above its mmap threshold afresh, so that an output of the same size a
// moment later is new memory, page-faulted and zeroed by the OS on first touch, in a model on many of its layers'
// calls (all-MiniLM-L6-v2 at batch 32: 3591 page faults a forward, 2566 in its quantized layers' outputs).
// On other devices these are at::empty and friends.
#pragma once
#include <cstdint>

#include <ATen/ATen.h>

namespace torchquant {

// at::empty(sizes, options.memory_format(format)).
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                        at::MemoryFormat format = at::MemoryFormat::Contiguous);
// at::empty_strided(sizes, strides, options).
at::Tensor empty_strided_output(at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options);
// at::empty_like(like, options, at::MemoryFormat::Preserve): like's strides where it is dense, else dense strides in
// the order of like's.
at::Tensor empty_like_output(const at::Tensor& like, const at::TensorOptions& options);

// The CPU cache: freed output blocks of kCachedOutputMinBytes and more are kept while they take at most `limit` bytes
// together (past it the oldest go back to torch's CPU allocator), and handed out again to outputs of the same size
// class (sizes rounded up by at most an eighth; exact sizes while the limit is 0), the most recently freed first.
// Under AddressSanitizer every output is an exact allocation, freed with the output.
constexpr int64_t kCachedOutputMinBytes = int64_t{64} << 10;
constexpr int64_t kDefaultOutputCacheLimit = int64_t{64} << 20;
struct OutputCacheInfo {
  int64_t limit;         // bytes of free blocks kept at most
  int64_t cached_bytes;  // bytes of free blocks kept now
  int64_t cached_blocks;
  int64_t reused;        // outputs served from kept blocks
  int64_t allocated;     // outputs of cacheable size that took new memory from torch's CPU allocator
};
OutputCacheInfo output_cache_info();
// Sets the limit (0: keep nothing) and frees kept blocks past it.
void set_output_cache_limit(int64_t bytes);

}  // namespace torchquant
