// Large CPU buffers kept for reuse across calls (framework-free).
//
// Every call of a layer needs the same big buffers again (outputs, the saved gates, gradients,
// packed weights). Returned to the C library, blocks this large may go back to the OS, and the
// next call faults them in again page by page: a B64 T100 H512 LSTM's forward and backward
// touches ~270 MB of fresh pages per call in torch.nn (67k faults), and fastrnn's 65 MB of
// saved gates alone exceed glibc's largest mmap threshold. The cache keeps freed blocks of 128 KiB
// or more, at most FASTRNN_CPU_CACHE_MB MiB in all (read once; default 512, 0 keeps none), and
// hands them out again for requests of the same size class. Blocks of 2 MiB or more are 2 MiB
// aligned and advised to be huge pages (Linux). Thread-safe.

#pragma once

#include <cstddef>

namespace fastrnn_cpu {

// A block of at least `bytes` (64-byte aligned, never null; throws std::bad_alloc), from the
// cache when it holds one of the size class; *capacity receives its real size, to give back.
void* acquire_block(std::size_t bytes, std::size_t* capacity);
// Gives a block from acquire_block back: cached, or freed when the cache is full or off.
void release_block(void* block, std::size_t capacity);
// Frees every cached block; returns the bytes freed.
std::size_t release_cached_blocks();
// Bytes held in cached (free) blocks.
std::size_t cached_block_bytes();

// One block owned by this object, grown on demand (its contents are then lost).
class CachedBuffer {
 public:
  CachedBuffer() = default;
  CachedBuffer(const CachedBuffer&) = delete;
  CachedBuffer& operator=(const CachedBuffer&) = delete;
  CachedBuffer(CachedBuffer&& other) noexcept;
  CachedBuffer& operator=(CachedBuffer&& other) noexcept;
  ~CachedBuffer();

  // Makes data() hold at least `bytes`.
  void reserve(std::size_t bytes);
  void* data() const { return data_; }

 private:
  void* data_ = nullptr;
  std::size_t capacity_ = 0;
};

}  // namespace fastrnn_cpu
