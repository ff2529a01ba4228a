// C [M, N] = A [M, K] B [K, N] (+ bias, or C += A B) in float32, for a B that multiplies many As:
// the recurrent weights, used once per time step, and the input weights, used for every row.
// B is packed once into panels of 32 columns ([K, 32] each, zero-padded past N); a kernel then
// computes tiles of 8 rows x 32 columns (AVX-512: 16 zmm accumulators) or 6 rows x 16 columns
// (AVX2/FMA: 12 ymm accumulators), in registers across chunks of K. Framework-free and
// single-threaded: callers split rows or panels over threads.
//
// Legend: M rows of A and C, K depth, N columns of B and C.

#pragma once

#include <cstdint>

#include "block_cache.h"

namespace fastrnn_cpu {

constexpr int64_t kPanelColumns = 32;  // columns of B per packed panel

// Calls pack(p, sources) for panels [first, last) of B [K, N] given column by column:
// sources[n] = column(p * kPanelColumns + n), null past the N columns (zero padding).
template <typename Column, typename Pack>
void for_each_panel(Column column, int64_t columns, int64_t first, int64_t last, Pack pack) {
  const float* sources[kPanelColumns];
  for (int64_t p = first; p < last; ++p) {
    for (int64_t n = 0; n < kPanelColumns; ++n) {
      const int64_t index = p * kPanelColumns + n;
      sources[n] = index < columns ? column(index) : nullptr;
    }
    pack(p, sources);
  }
}

// B packed into panels of kPanelColumns columns, each [K, kPanelColumns] row-major.
class PackedMatrix {
 public:
  static constexpr int64_t kPanelColumns = fastrnn_cpu::kPanelColumns;

  // Allocates room for B [K, N]; the panels are then filled by pack_panels.
  void reset(int64_t depth, int64_t columns);
  // Fills panels [first, last) from B given by strides: b(k, n) = source[k * stride_k + n * stride_n].
  void pack_panels(const float* source, int64_t stride_k, int64_t stride_n, int64_t first,
                   int64_t last);
  // Fills panels [first, last) from B given column by column: column(n) points at b(0, n), and
  // b(k, n) follows at column(n)[k] (rows of a row-major W for B = W^T).
  template <typename Column>
  void pack_panels_by_column(Column column, int64_t first, int64_t last) {
    for_each_panel(column, columns_, first, last, [&](int64_t p, const float* const* sources) {
      pack_panel(sources, data() + p * depth_ * kPanelColumns);
    });
  }
  // reset and pack every panel.
  void pack(const float* source, int64_t depth, int64_t columns, int64_t stride_k,
            int64_t stride_n);

  int64_t depth() const { return depth_; }      // K
  int64_t columns() const { return columns_; }  // N
  int64_t panels() const { return (columns_ + kPanelColumns - 1) / kPanelColumns; }
  const float* panel(int64_t index) const {     // [K, kPanelColumns]
    return data() + index * depth_ * kPanelColumns;
  }

 private:
  // panel[k, n] = sources[n][k] (0 for a null source), by AVX-512 or AVX transposes: like
  // packed_gemm, only where packed_gemm_supported().
  void pack_panel(const float* const* sources, float* panel) const;
  float* data() const { return static_cast<float*>(buffer_.data()); }

  CachedBuffer buffer_;
  int64_t depth_ = 0;
  int64_t columns_ = 0;
};

// B packed for bfloat16 dot products: panels of 32 columns, each [K/2, 32, 2] (the two entries of
// a pair of rows k side by side), zero-padded past N and, for odd K, past K.
class PackedMatrixBf16 {
 public:
  static constexpr int64_t kPanelColumns = fastrnn_cpu::kPanelColumns;

  void reset(int64_t depth, int64_t columns);
  // Fills panels [first, last) from float32 B given column by column (see PackedMatrix), rounded
  // to bfloat16 (to nearest even).
  template <typename Column>
  void pack_panels_by_column(Column column, int64_t first, int64_t last) {
    for_each_panel(column, columns_, first, last, [&](int64_t p, const float* const* sources) {
      pack_panel(sources, data() + p * pair_rows() * kPanelColumns * 2);
    });
  }

  int64_t depth() const { return depth_; }      // K
  int64_t columns() const { return columns_; }  // N
  int64_t pair_rows() const { return (depth_ + 1) / 2; }
  int64_t panels() const { return (columns_ + kPanelColumns - 1) / kPanelColumns; }
  const uint16_t* panel(int64_t index) const {  // [K/2, kPanelColumns, 2]
    return data() + index * pair_rows() * kPanelColumns * 2;
  }

  // float32 -> bfloat16 bits, rounded to nearest even (NaN stays NaN).
  static uint16_t to_bfloat16(float value);

 private:
  // panel[k / 2, n, k % 2] = bfloat16 of sources[n][k] (0 for a null source or k past K); only
  // where packed_gemm_bf16_supported().
  void pack_panel(const float* const* sources, uint16_t* panel) const;
  uint16_t* data() const { return static_cast<uint16_t*>(buffer_.data()); }

  CachedBuffer buffer_;
  int64_t depth_ = 0;
  int64_t columns_ = 0;
};

// Whether this CPU runs packed_gemm: AVX-512F (8x32 tiles) or AVX2 with FMA (6x16 tiles), unless
// FASTRNN_CPU_ISA=generic; where it does not, callers multiply another way.
bool packed_gemm_supported();
// Whether the AVX-512 kernels run (AVX-512F, and FASTRNN_CPU_ISA is neither "avx2" nor
// "generic"): packed_gemm's larger tiles, the transposing packer, the LSTM cell of rnn_cpu.cpp.
bool avx512_kernels();

// c = a b + bias (accumulate: c += a b) on the calling thread.
// a: [M, K] rows lda apart; b: packed [K, N]; c: [M, N] rows ldc apart; bias: [N] or null
// (ignored when accumulating). last_panel_first reads b's panels from the last (the same
// results): a loop of products alternating it starts each with the panels the previous one
// read last, still in cache.
void packed_gemm(int64_t rows, const float* a, int64_t lda, const PackedMatrix& b, float* c,
                 int64_t ldc, const float* bias, bool accumulate, bool last_panel_first = false);

// y [B, N] (rows ldy apart) = x [B, K] (rows ldx apart) w [N, K]^T + bias [N] (bias may be
// null) on the calling thread, for a few rows of activations (a step at batch <= 4): each
// weight read once where it lies (rows of w ldw apart, no packing), in blocks of 8 rows, each
// block's dot products with up to 3 rows of x at once (AVX-512; AVX2: one), again from L1 for
// the next rows of x; each a sum over K in vector lanes. Only where packed_gemm_supported().
void gemv_rows(int64_t rows, int64_t depth, const float* w, int64_t ldw, const float* x,
               int64_t ldx, int64_t batch, float* y, int64_t ldy, const float* bias);

// y [K] = g [N] w [N, K] (accumulate: y += g w) on the calling thread: the transposed product
// of gemv_rows (the backward of a step at batch 1), reading each weight once where it lies, in
// blocks of 128 (AVX2: 64) columns over all rows. Only where packed_gemm_supported().
void gemv_columns(int64_t rows, int64_t depth, const float* w, int64_t ldw, const float* g,
                  float* y, bool accumulate);

// gemv_rows for bfloat16 w (rows ldw apart) and x [B, K] (rows ldx apart): bfloat16 products
// summed in float32 into y [B, N] (rows ldy apart), + bias [N] (or null): vdpbf16ps where
// packed_gemm_bf16_supported(), else (AVX2) float32 FMAs of the values made float32 as they
// are loaded, a row of x at a time. Only where gemv_bf16_supported().
void gemv_rows_bf16(int64_t rows, int64_t depth, const uint16_t* w, int64_t ldw,
                    const uint16_t* x, int64_t ldx, int64_t batch, float* y, int64_t ldy,
                    const float* bias);

// Whether this CPU runs packed_gemm_bf16 and to_bfloat16_rows (avx512_kernels(), and AVX-512
// BW, VL and BF16).
bool packed_gemm_bf16_supported();

// Whether this CPU runs gemv_rows_bf16: packed_gemm_bf16_supported() or packed_gemm_supported().
bool gemv_bf16_supported();

// dst [M, even(K)] = bfloat16 of src [M, K] (rows src_stride and dst_stride apart), rounded to
// nearest even, with a zero column appended when K is odd: the a operand of packed_gemm_bf16.
void to_bfloat16_rows(const float* src, int64_t rows, int64_t columns, int64_t src_stride,
                      uint16_t* dst, int64_t dst_stride);

// c = a b + bias (accumulate: c += a b) with bfloat16 products summed in float32.
// a: bfloat16 bits [M, K] rows lda apart, each row readable (and zero) up to an even length;
// b: packed [K, N]; c: float32 [M, N] rows ldc apart; bias: [N] or null.
void packed_gemm_bf16(int64_t rows, const uint16_t* a, int64_t lda, const PackedMatrixBf16& b,
                      float* c, int64_t ldc, const float* bias, bool accumulate,
                      bool last_panel_first = false);

}  // namespace fastrnn_cpu
