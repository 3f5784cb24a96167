// The cache of freed output blocks behind the CPU ops' outputs (why: csrc/output_memory.h). Its blocks come from
// torch's CPU allocator (c10::GetCPUAllocator(), whatever allocator the process set there) and go back to it when
// the cache lets them go; an output smaller than kCachedOutputMinBytes takes that allocator's memory directly.
#include "output_memory.h"

#include <pthread.h>

#include <atomic>
#include <cstdio>
#include <deque>
#include <list>
#include <mutex>
#include <new>
#include <unordered_map>
#include <utility>

#include <ATen/EmptyTensor.h>
#include <ATen/ExpandUtils.h>
#include <c10/core/CPUAllocator.h>

#include "check.h"

namespace torchquant {
namespace {

// A kept output's memory, one allocation from torch's CPU allocator: this header in its first kHeaderBytes, the
// output's data after it, so that the DataPtr's context is its data pointer as with torch's own allocators
// (copy-on-write storages and raw_allocate rely on that).
struct OutputBlock {
  c10::DataPtr memory;           // the whole allocation
  size_t class_bytes;            // the data's bytes
  OutputBlock* next = nullptr;   // in a chain of blocks to free
};
constexpr size_t kHeaderBytes = 64;  // the data keeps torch's 64-byte alignment
static_assert(sizeof(OutputBlock) <= kHeaderBytes, "the header must fit before the data");

OutputBlock* block_of(void* data) { return reinterpret_cast<OutputBlock*>(static_cast<char*>(data) - kHeaderBytes); }
void* data_of(OutputBlock* block) { return static_cast<char*>(block->memory.get()) + kHeaderBytes; }

// A failed output allocation: a std::bad_alloc (MemoryError in Python, as for the kernels' scratch buffers) that
// says how large the output was. Its message lives in the object (nothing to allocate when memory has run out).
class OutputAllocationError : public std::bad_alloc {
 public:
  explicit OutputAllocationError(size_t bytes) noexcept {
    std::snprintf(message_, sizeof(message_), "torchquant: out of memory for an output of %zu bytes", bytes);
  }
  const char* what() const noexcept override { return message_; }

 private:
  char message_[96];
};

// bytes from torch's CPU allocator, which throws std::bad_alloc, or the default one a c10::Error (a RuntimeError in
// Python), when it cannot allocate: either way a std::bad_alloc here.
c10::DataPtr allocate_cpu(size_t bytes) {
  try {
    return c10::GetCPUAllocator()->allocate(bytes);
  } catch (const c10::Error&) {
    throw std::bad_alloc();
  }
}

OutputBlock* new_block(size_t class_bytes) {
  c10::DataPtr memory = allocate_cpu(kHeaderBytes + class_bytes);
  void* header = memory.get();
  return new (header) OutputBlock{std::move(memory), class_bytes};
}

void free_blocks(OutputBlock* chain) {
  while (chain != nullptr) {
    OutputBlock* next = chain->next;
    c10::DataPtr memory = std::move(chain->memory);
    chain->~OutputBlock();
    chain = next;
  }  // (each allocation goes back to torch's CPU allocator as `memory` goes out of scope)
}

// bytes (kCachedOutputMinBytes or more) rounded up to a multiple of an eighth of the largest power of two not above
// it, at most 1/8 more, so that outputs of nearby sizes (a transformer's varying sequence lengths) share blocks.
size_t size_class(size_t bytes) {
  const size_t step = (size_t{1} << (63 - __builtin_clzll(bytes))) / 8;
  return (bytes + step - 1) / step * step;
}

class OutputCache {
 public:
  OutputCache() {
    // A fork while another thread holds the mutex would leave it locked in the child forever.
    pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                   [] { instance().mutex_.unlock(); });
  }

  static OutputCache& instance() {
    // never destroyed: outputs freed while the process exits still come back to it
    static OutputCache* cache = new OutputCache();
    return *cache;
  }

  // Whether freed blocks are kept: when not, outputs take their exact size.
  bool keeps_blocks() const { return limit_.load(std::memory_order_relaxed) > 0; }

  // A kept block of class_bytes, or a new one; if the allocator is out of memory, again after freeing the kept ones.
  OutputBlock* take(size_t class_bytes) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      const auto same_class = by_class_.find(class_bytes);
      if (same_class != by_class_.end() && !same_class->second.empty()) {
        const auto newest = same_class->second.back();
        same_class->second.pop_back();
        OutputBlock* block = *newest;
        by_age_.erase(newest);
        cached_bytes_ -= static_cast<int64_t>(class_bytes);
        ++reused_;
        return block;
      }
    }
    OutputBlock* block = nullptr;
    try {
      block = new_block(class_bytes);
    } catch (const std::bad_alloc&) {
      OutputBlock* kept = nullptr;
      {
        const std::lock_guard<std::mutex> lock(mutex_);
        release_past(0, kept);
      }
      if (kept == nullptr) throw;
      free_blocks(kept);
      block = new_block(class_bytes);
    }
    const std::lock_guard<std::mutex> lock(mutex_);
    ++allocated_;
    return block;
  }

  // Keeps a freed block (frees it if it cannot be kept), letting the oldest kept ones go past the limit. It runs in
  // a DataPtr's deleter, so nothing may escape it.
  void give_back(OutputBlock* block) noexcept {
    OutputBlock* released = nullptr;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (static_cast<int64_t>(block->class_bytes) <= limit_.load(std::memory_order_relaxed) && keep(block)) {
        release_past(limit_.load(std::memory_order_relaxed), released);
      } else {
        released = block;
      }
    }
    free_blocks(released);  // outside the lock: the allocator's free may take a while
  }

  void set_limit(int64_t bytes) {
    TQ_CHECK(bytes >= 0, "set_cpu_output_cache: max_bytes must be >= 0, got ", bytes);
    OutputBlock* released = nullptr;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      limit_.store(bytes, std::memory_order_relaxed);
      release_past(bytes, released);
    }
    free_blocks(released);
  }

  OutputCacheInfo info() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return {limit_.load(std::memory_order_relaxed), cached_bytes_, static_cast<int64_t>(by_age_.size()), reused_,
            allocated_};
  }

 private:
  // Adds block to the kept ones; false (and nothing changed) where the lists could not grow. The caller holds the
  // mutex.
  bool keep(OutputBlock* block) noexcept {
    try {
      by_age_.push_front(block);
    } catch (...) {
      return false;
    }
    try {
      by_class_[block->class_bytes].push_back(by_age_.begin());
    } catch (...) {
      by_age_.pop_front();
      return false;
    }
    cached_bytes_ += static_cast<int64_t>(block->class_bytes);
    return true;
  }

  // Chains the oldest kept blocks onto `released` until the rest take at most `bytes` (the caller holds the mutex).
  void release_past(int64_t bytes, OutputBlock*& released) noexcept {
    while (cached_bytes_ > bytes) {
      OutputBlock* oldest = by_age_.back();
      // the oldest block of its class is the front of the class's queue, which keeps the order of freeing
      const auto same_class = by_class_.find(oldest->class_bytes);
      same_class->second.pop_front();
      if (same_class->second.empty()) by_class_.erase(same_class);
      by_age_.pop_back();
      cached_bytes_ -= static_cast<int64_t>(oldest->class_bytes);
      oldest->next = released;
      released = oldest;
    }
  }

  std::mutex mutex_;
  std::list<OutputBlock*> by_age_;  // kept blocks, the most recently freed first
  std::unordered_map<size_t, std::deque<std::list<OutputBlock*>::iterator>> by_class_;  // oldest first
  std::atomic<int64_t> limit_{kDefaultOutputCacheLimit};  // written under the mutex
  int64_t cached_bytes_ = 0, reused_ = 0, allocated_ = 0;
};

void release_output_block(void* data) { OutputCache::instance().give_back(block_of(data)); }

// Under AddressSanitizer every output is an exact allocation of its own, freed when the output is: rounded-up and
// kept blocks would hide an overrun past an output's end or a use after its free.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kExactOutputs = true;
#else
constexpr bool kExactOutputs = false;
#endif

struct CachingOutputAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t bytes) override {
    OutputCache& cache = OutputCache::instance();
    try {
      if (kExactOutputs || bytes < static_cast<size_t>(kCachedOutputMinBytes)) return allocate_cpu(bytes);
      void* data = data_of(cache.take(cache.keeps_blocks() ? size_class(bytes) : bytes));
      return {data, data, &release_output_block, c10::Device(c10::DeviceType::CPU)};
    } catch (const std::bad_alloc&) {
      throw OutputAllocationError(bytes);
    }
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

c10::Allocator* output_allocator() {
  static auto* allocator = new CachingOutputAllocator();  // never destroyed: a storage keeps a pointer to it
  return allocator;
}

const c10::DispatchKeySet kCpuKeys(c10::DispatchKey::CPU);

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  if (!options.device().is_cpu()) return at::empty(sizes, options.memory_format(format));
  return at::detail::empty_generic(sizes, output_allocator(), kCpuKeys, c10::typeMetaToScalarType(options.dtype()),
                                   format);
}

at::Tensor empty_strided_output(at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options) {
  if (!options.device().is_cpu()) return at::empty_strided(sizes, strides, options);
  return at::detail::empty_strided_generic(sizes, strides, output_allocator(), kCpuKeys,
                                           c10::typeMetaToScalarType(options.dtype()));
}

at::Tensor empty_like_output(const at::Tensor& like, const at::TensorOptions& options) {
  if (!options.device().is_cpu()) return at::empty_like(like, options, at::MemoryFormat::Preserve);
  if (like.is_non_overlapping_and_dense()) return empty_strided_output(like.sizes(), like.strides(), options);
  return empty_strided_output(like.sizes(), at::infer_dense_strides(like.sizes(), like.strides()), options);
}

OutputCacheInfo output_cache_info() { return OutputCache::instance().info(); }

void set_output_cache_limit(int64_t bytes) { OutputCache::instance().set_limit(bytes); }

}  // namespace torchquant
