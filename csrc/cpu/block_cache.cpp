// The block cache of block_cache.h.

#include "block_cache.h"

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>

#if defined(__unix__)
#include <pthread.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastrnn_cpu {
namespace {

constexpr std::size_t kMinBlockBytes = std::size_t(128) << 10;  // smaller: never cached
constexpr std::size_t kSmallClass = std::size_t(64) << 10;       // size classes below kHugePage
constexpr std::size_t kHugePage = std::size_t(2) << 20;

std::size_t round_up(std::size_t bytes, std::size_t multiple) {
  return (bytes + multiple - 1) / multiple * multiple;
}

// The size a request of `bytes` is served with.
std::size_t size_class(std::size_t bytes) {
  if (bytes < kMinBlockBytes) return round_up(bytes, 64);
  return round_up(bytes, bytes < kHugePage ? kSmallClass : kHugePage);
}

void* allocate_block(std::size_t bytes) {
  const std::size_t alignment = bytes >= kHugePage ? kHugePage : 64;
  void* block = std::aligned_alloc(alignment, bytes);
  if (block == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes >= kHugePage) madvise(block, bytes, MADV_HUGEPAGE);
#endif
  return block;
}

std::size_t capacity_from_environment() {
  const char* text = std::getenv("FASTRNN_CPU_CACHE_MB");
  if (text == nullptr || *text == '\0') return std::size_t(512) << 20;
  try {
    return static_cast<std::size_t>(std::stoull(text)) << 20;
  } catch (const std::exception&) {
    return std::size_t(512) << 20;
  }
}

class BlockCache {
 public:
  void* acquire(std::size_t bytes, std::size_t* capacity) {
    const std::size_t wanted = size_class(bytes == 0 ? 1 : bytes);
    if (wanted >= kMinBlockBytes) {
      const std::lock_guard<std::mutex> lock(mutex_);
      // The smallest cached block that fits, if it wastes less than half of itself.
      const auto found = free_.lower_bound(wanted);
      if (found != free_.end() && found->first <= 2 * wanted) {
        *capacity = found->first;
        void* block = found->second;
        cached_bytes_ -= found->first;
        free_.erase(found);
        return block;
      }
    }
    *capacity = wanted;
    return allocate_block(wanted);
  }

  void release(void* block, std::size_t capacity) {
    if (block == nullptr) return;
    if (capacity >= kMinBlockBytes) {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (cached_bytes_ + capacity <= limit_) {
        free_.emplace(capacity, block);
        cached_bytes_ += capacity;
        return;
      }
    }
    std::free(block);
  }

  std::size_t release_all() {
    std::multimap<std::size_t, void*> blocks;
    std::size_t freed;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      freed = cached_bytes_;
      cached_bytes_ = 0;
    }
    for (const auto& [size, block] : blocks) std::free(block);
    return freed;
  }

  std::size_t cached_bytes() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }

 private:
  std::mutex mutex_;
  std::multimap<std::size_t, void*> free_;  // capacity -> block
  std::size_t cached_bytes_ = 0;
  const std::size_t limit_ = capacity_from_environment();
};

// Never destroyed: tensors holding blocks may outlive static destructors at exit.
BlockCache* instance = nullptr;

#if defined(__unix__)
// A child forked while another thread held the cache's lock would wait on it forever: it starts
// with an empty cache instead (the parent's cached blocks stay allocated in it, unused).
void start_empty_in_child() { instance = new BlockCache(); }
#endif

BlockCache& cache() {
  static const bool created = [] {
    instance = new BlockCache();
#if defined(__unix__)
    pthread_atfork(nullptr, nullptr, &start_empty_in_child);
#endif
    return true;
  }();
  (void)created;
  return *instance;
}

}  // namespace

void* acquire_block(std::size_t bytes, std::size_t* capacity) {
  return cache().acquire(bytes, capacity);
}

void release_block(void* block, std::size_t capacity) { cache().release(block, capacity); }

std::size_t release_cached_blocks() { return cache().release_all(); }

std::size_t cached_block_bytes() { return cache().cached_bytes(); }

CachedBuffer::CachedBuffer(CachedBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), capacity_(std::exchange(other.capacity_, 0)) {}

CachedBuffer& CachedBuffer::operator=(CachedBuffer&& other) noexcept {
  if (this != &other) {
    release_block(data_, capacity_);
    data_ = std::exchange(other.data_, nullptr);
    capacity_ = std::exchange(other.capacity_, 0);
  }
  return *this;
}

CachedBuffer::~CachedBuffer() { release_block(data_, capacity_); }

void CachedBuffer::reserve(std::size_t bytes) {
  if (data_ != nullptr && bytes <= capacity_) return;
  release_block(data_, capacity_);
  data_ = nullptr;
  capacity_ = 0;
  data_ = acquire_block(bytes, &capacity_);
}

}  // namespace fastrnn_cpu
