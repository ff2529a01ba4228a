// How a layer's steps split over threads and what they share: the lengths of the sequences, the
// blocks of hidden units or groups of batch rows, the packing of each block's weights, and the
// dtype the kernels compute in. Legend as in rnn_cpu.cpp.

#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "parallel_steps.h"

namespace fastrnn_cpu {

using at::Tensor;

// lengths as a contiguous CPU int64 tensor (undefined when absent), checked against T and B.
Tensor checked_lengths(const std::optional<Tensor>& lengths, int64_t seq_len, int64_t batch);

// The data of checked_lengths' result, or null when every sequence has T steps.
inline const int64_t* lengths_data(const Tensor& lengths) {
  return lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
}

// Hidden units (or columns of h) per block of a step: one block per thread, each with its own
// rows (forward) or columns (backward) of W_hh and a one-thread GEMM; one-thread GEMMs on blocks
// scale better over the threads than one small GEMM split by the BLAS library.
int64_t units_per_block(int64_t hidden);

// Batch rows per thread from which the steps of a layer split by rows (row_groups): a whole
// GEMM tile of rows (packed_gemm.h: 8 on AVX-512; AVX2's 6-row tiles need 12 to stay full, as
// 8 rows run as two tiles of 4, a sixth slower).
int64_t rows_per_group();

// Groups of batch rows that the steps of a layer split into over threads: each thread runs its
// rows through every step with the whole of W_hh (the rows of an RNN never meet), with no
// barrier between steps. 1 where the steps split by blocks of hidden units instead
// (units_per_block): too few rows per thread, or blocks of units keep more threads busy.
// FASTRNN_CPU_SPLIT=units or rows (read at each call) forces one split, to test or compare.
int64_t row_groups(int64_t batch, int64_t unit_blocks);

// Packs the blocks [0, blocks) of a layer's weights: reset(k) makes room for block k,
// pack(k, p0, p1) fills its panels [p0, p1), panels(k) counts them. The one block of a split by
// rows, used by every thread, is packed by all of them, panel by panel; else each block by the
// thread that will use it.
template <typename Reset, typename Pack, typename Panels>
void pack_blocks(int64_t blocks, bool split_by_rows, const Reset& reset, const Pack& pack,
                 const Panels& panels) {
  if (split_by_rows) {
    reset(0);
    parallel_for(0, panels(0), 1, [&](int64_t begin, int64_t end) { pack(0, begin, end); });
    return;
  }
  parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      reset(k);
      pack(k, 0, panels(k));
    }
  });
}

// Runs rows(r0, r1) for each of the groups of batch rows [r0, r1) of row_groups, one thread per
// group.
template <typename Rows>
void for_each_row_group(int64_t batch, int64_t groups, const Rows& rows) {
  parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; ++group) {
      rows(group * batch / groups, (group + 1) * batch / groups);
    }
  });
}

// The dtype the kernels compute a dtype in: float32 for the half types, else the dtype itself.
at::ScalarType compute_type(at::ScalarType dtype);

// t in the compute dtype, contiguous (undefined stays undefined).
Tensor to_compute(const Tensor& t, at::ScalarType compute);

inline Tensor value_or_undefined(const std::optional<Tensor>& t) {
  return t.has_value() ? *t : Tensor();
}

}  // namespace fastrnn_cpu
