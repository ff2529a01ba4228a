// Matrix products and buffers shared by the CPU ops (ATen).
//
// - empty_large: a tensor for a big buffer, from the block cache (block_cache.h): reused across
//   calls, backed by huge pages where the kernel grants them.
// - matmul: result (+)= a b on oneDNN where it is faster, else ATen (MKL).
// - use_packed_gemm<T>: whether packed_gemm.h runs the products of this scalar type here.

#pragma once

#include <ATen/ATen.h>

#include <type_traits>

#include "packed_gemm.h"

namespace fastrnn_cpu {

// An uninitialised CPU tensor whose storage comes from the block cache: a block freed by an
// earlier call, or a new one (2 MiB aligned and advised to be huge pages from 2 MiB on): page
// faults on fresh 4 KiB pages otherwise cost more than the cell passes of large layers.
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options);

// result = a b (accumulate: result += a b) for 2-D a, b and a 2-D result.
void matmul(const at::Tensor& result, const at::Tensor& a, const at::Tensor& b, bool accumulate);

// Whether products of scalar type T run on packed_gemm (float32 on an AVX-512 CPU).
template <typename T>
bool use_packed_gemm() {
  return std::is_same_v<T, float> && packed_gemm_supported();
}

}  // namespace fastrnn_cpu
