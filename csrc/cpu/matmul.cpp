// The matrix products and buffers of matmul.h.

#include "matmul.h"

#include <ATen/EmptyTensor.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>

#if defined(__linux__)
#include <dlfcn.h>
#endif

#include "block_cache.h"

namespace fastrnn_cpu {

using at::Tensor;

namespace {

// A c10 allocator over block_cache.h: tensors from it reuse big blocks across calls (their
// storages stay resizable, like at::empty's).
class CachedBlockAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    auto block = std::make_unique<Block>();
    block->data = acquire_block(bytes, &block->capacity);
    void* data = block->data;
    return {data, block.release(), &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* data = nullptr;
    std::size_t capacity = 0;
  };

  static void release(void* context) {
    std::unique_ptr<Block> block(static_cast<Block*>(context));
    release_block(block->data, block->capacity);
  }
};

}  // namespace

Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  // Never destroyed: storages keep a pointer to their allocator.
  static CachedBlockAllocator* allocator = new CachedBlockAllocator();
  Tensor result = at::detail::empty_generic(sizes, allocator,
                                            c10::DispatchKeySet(c10::DispatchKey::CPU),
                                            c10::typeMetaToScalarType(options.dtype()),
                                            std::nullopt);
  // Like at::empty: poisoned when torch is asked to fill uninitialised memory.
  const auto& context = at::globalContext();
  if (context.deterministicAlgorithms() && context.deterministicFillUninitializedMemory()) {
    result.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return result;
}

namespace {

// oneDNN's matmul (at::native::mkldnn_matmul), faster than at::mm here for float32. Its header is
// not shipped and it may change between torch versions, so it is looked up at run time.
using MkldnnMatmul = void (*)(const Tensor&, const Tensor&, const Tensor&, float, float);
MkldnnMatmul mkldnn_matmul_fn() {
#if defined(__linux__)
  static const MkldnnMatmul fn = reinterpret_cast<MkldnnMatmul>(
      dlsym(RTLD_DEFAULT, "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff"));
  return fn;
#else
  return nullptr;
#endif
}

// Contiguous, or the transpose of a contiguous matrix: the layouts oneDNN takes without a copy.
bool plain_or_transposed(const Tensor& t) {
  return t.is_contiguous() || (t.stride(0) == 1 && t.stride(1) == t.size(0));
}

// Multiply-adds below which oneDNN's per-call cost outweighs its faster kernel.
constexpr int64_t kMkldnnMinWork = int64_t(1) << 21;

// Cleared for good when oneDNN refuses a call (a torch built without it).
std::atomic<bool> mkldnn_usable{true};

}  // namespace

void matmul(const Tensor& result, const Tensor& a, const Tensor& b, bool accumulate) {
  static const MkldnnMatmul mkldnn = mkldnn_matmul_fn();
  if (mkldnn != nullptr && mkldnn_usable.load(std::memory_order_relaxed) &&
      at::globalContext().userEnabledMkldnn() && result.scalar_type() == at::kFloat &&
      result.is_contiguous() && plain_or_transposed(a) && plain_or_transposed(b) &&
      a.size(0) * a.size(1) * b.size(1) >= kMkldnnMinWork) {
    try {
      mkldnn(a, b, result, accumulate ? 1.0f : 0.0f, 1.0f);
      return;
    } catch (const c10::Error&) {
      mkldnn_usable.store(false);
    }
  }
  if (accumulate) {
    result.addmm_(a, b);
  } else {
    at::mm_out(const_cast<Tensor&>(result), a, b);
  }
}

}  // namespace fastrnn_cpu

// The block cache from Python: bytes held in free blocks; free them all (returns the bytes freed).
// And which kernels run here: "avx512_bf16", "avx512", "avx2" or "generic" (packed_gemm.h).
TORCH_LIBRARY_FRAGMENT(fastrnn_cpu, m) {
  m.def("kernel_isa() -> str", [] {
    return std::string(fastrnn_cpu::packed_gemm_bf16_supported() ? "avx512_bf16"
                       : fastrnn_cpu::avx512_kernels()           ? "avx512"
                       : fastrnn_cpu::packed_gemm_supported()    ? "avx2"
                                                                 : "generic");
  });
  m.def("cached_bytes() -> int",
        [] { return static_cast<int64_t>(fastrnn_cpu::cached_block_bytes()); });
  m.def("empty_cache() -> int",
        [] { return static_cast<int64_t>(fastrnn_cpu::release_cached_blocks()); });
}
