// How a layer's steps split over threads (layer_plan.h).

#include "layer_plan.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "packed_gemm.h"

namespace fastrnn_cpu {

Tensor checked_lengths(const std::optional<Tensor>& lengths, int64_t seq_len, int64_t batch) {
  if (!lengths.has_value()) return Tensor();
  TORCH_CHECK(lengths->device().is_cpu() && lengths->scalar_type() == at::kLong &&
                  lengths->dim() == 1 && lengths->size(0) == batch,
              "fastrnn cpu: lengths must be a CPU int64 tensor of shape [B]");
  Tensor result = lengths->contiguous();
  const int64_t* data = result.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(data[b] >= 1 && data[b] <= seq_len, "fastrnn cpu: lengths must lie in [1, T]");
  }
  return result;
}

int64_t units_per_block(int64_t hidden) {
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), hidden / 64));
  const int64_t units = (hidden + blocks - 1) / blocks;
  return blocks == 1 ? hidden : (units + 15) / 16 * 16;
}

int64_t rows_per_group() { return avx512_kernels() ? 8 : 12; }

int64_t row_groups(int64_t batch, int64_t unit_blocks) {
  const char* forced = std::getenv("FASTRNN_CPU_SPLIT");
  const int64_t threads = at::get_num_threads();
  int64_t groups = std::min<int64_t>(threads, batch / rows_per_group());
  if (forced != nullptr && std::strcmp(forced, "units") == 0) groups = 1;
  if (forced != nullptr && std::strcmp(forced, "rows") == 0) {
    groups = std::min<int64_t>(threads, batch);
    unit_blocks = 1;
  }
  return groups >= 2 && groups >= unit_blocks ? groups : 1;
}

at::ScalarType compute_type(at::ScalarType dtype) {
  return dtype == at::kBFloat16 || dtype == at::kHalf ? at::kFloat : dtype;
}

Tensor to_compute(const Tensor& t, at::ScalarType compute) {
  return t.defined() ? t.to(compute).contiguous() : t;
}

}  // namespace fastrnn_cpu
