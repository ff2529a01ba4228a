// Dynamically quantized int8 products for inference (framework-free, single-threaded: callers
// split rows over threads).
//
// y [B, N] = (x_q [B, K] w [N, K]^T) * x_scale[b] * w_scale[n] + bias [N], where w holds int8
// weights per output row (symmetric: w ~ w_q * w_scale[n]), x_q int8 activations per row
// (quantize_rows: x ~ x_q * x_scale[b]), and the products are summed exactly in int32. The values
// are in [-127, 127] on both sides. w comes packed in panels of 16 rows, [K4, 16, 4] each
// (kPanelRows, K4 = K / 4 rounded up, zero-padded): the 4 entries k of a row side by side, so
// that one 64-byte load holds 4 steps of K for 16 outputs and a 4-byte broadcast of x feeds them.
// Kernels, the best this CPU has (FASTRNN_CPU_ISA as for the float32 kernels: "avx2",
// "generic"):
// - vnni (AVX512_VNNI, AVX-512 BW): vpdpbusd on x_q + 128 (unsigned; quantize_rows stores it
//   so for these kernels) and w, the offset taken back through the rows' sums of w (w_sum);
// - avx2: vpmaddubsw on |x_q| and w with x_q's sign (pair sums at most 2 * 127 * 127: no
//   saturation), widened by vpmaddwd;
// - generic: plain loops.
//
// Legend: B rows of x and y, K depth, N rows of w (columns of y).

#pragma once

#include <cstdint>

namespace fastrnn_cpu {

constexpr int64_t kPanelRows = 16;  // rows of w per packed panel

// Row stride (bytes) of quantized activations of depth K: K rounded up to 64, zero-padded by
// quantize_rows (the kernels read whole groups of 4).
inline int64_t int8_row_stride(int64_t depth) { return (depth + 63) / 64 * 64; }

// Bytes of one packed panel of depth K: [K4, 16, 4].
inline int64_t int8_panel_bytes(int64_t depth) { return (depth + 3) / 4 * 4 * kPanelRows; }

// q [rows, ldq] = round(x / scale) (plus 128, as unsigned bytes, for the vnni kernels), scale
// [rows] = max |x| / 127 per row of x [rows, depth] (rows ldx apart); q is zero from depth to
// ldq. A row with a NaN or an infinity gets a NaN scale (its products are NaN); an all-zero
// row, scale 0.
void quantize_rows(const float* x, int64_t rows, int64_t depth, int64_t ldx, int8_t* q,
                   int64_t ldq, float* scale);

// y [batch, rows] (rows of y ldy apart) = x_q w^T dequantized, + bias [rows] (or null).
// panels: w [rows, depth] packed, ceil(rows / 16) panels of int8_panel_bytes(depth) each;
// w_scale [rows], w_sum [rows] (the sum of each row of w); x: int8 rows ldx apart (quantize_rows,
// ldx >= depth rounded up to 4), x_scale [batch]. backwards: the panels are read last to first
// (the sums are exact, so y is the same): a recurrence that reads its weights in turns, each turn
// from where the last one ended, finds the part it read last still in the L2 cache. Where every
// row of x is zero (x_scale 0) the weights are not read: y is 0 * (0 * w_scale) (+ bias), as the
// kernels give it (NaN where a scale is not finite).
void gemm_int8(int64_t rows, int64_t depth, const int8_t* panels, const float* w_scale,
               const int32_t* w_sum, const int8_t* x, int64_t ldx, const float* x_scale,
               int64_t batch, float* y, int64_t ldy, const float* bias, bool backwards = false);

// Which int8 kernels run here: "vnni", "avx2" or "generic".
const char* int8_kernels();

}  // namespace fastrnn_cpu
