// The matrix products and buffers of matmul.h.

#include "matmul.h"

#include <atomic>
#include <cstdint>

#if defined(__linux__)
#include <dlfcn.h>
#include <sys/mman.h>
#endif

namespace fastrnn_cpu {

using at::Tensor;

Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor result = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(1) << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(result.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + result.nbytes()) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
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
constexpr int64_t kMkldnnMinWork = int64_t(1) << 23;

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
