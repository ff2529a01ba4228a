// The packed float32 GEMM of packed_gemm.h: packing, and the AVX-512 tile kernel.

#include "packed_gemm.h"

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTRNN_PACKED_GEMM_X86 1
#endif

namespace fastrnn_cpu {

void PackedMatrix::reset(int64_t depth, int64_t columns) {
  depth_ = depth;
  columns_ = columns;
  buffer_.reserve(sizeof(float) * panels() * depth * kPanelColumns);
}

void PackedMatrix::pack_panels(const float* source, int64_t stride_k, int64_t stride_n,
                               int64_t first, int64_t last) {
  for (int64_t p = first; p < last; ++p) {
    const int64_t first_column = p * kPanelColumns;
    const int64_t width = std::min(kPanelColumns, columns_ - first_column);
    float* panel = data() + p * depth_ * kPanelColumns;
    for (int64_t k = 0; k < depth_; ++k) {
      const float* row = source + k * stride_k + first_column * stride_n;
      float* packed = panel + k * kPanelColumns;
      for (int64_t n = 0; n < width; ++n) packed[n] = row[n * stride_n];
      std::fill(packed + width, packed + kPanelColumns, 0.0f);
    }
  }
}

void PackedMatrix::pack(const float* source, int64_t depth, int64_t columns, int64_t stride_k,
                        int64_t stride_n) {
  reset(depth, columns);
  pack_panels(source, stride_k, stride_n, 0, panels());
}

void PackedMatrixBf16::reset(int64_t depth, int64_t columns) {
  depth_ = depth;
  columns_ = columns;
  buffer_.reserve(sizeof(uint16_t) * panels() * pair_rows() * kPanelColumns * 2);
}

uint16_t PackedMatrixBf16::to_bfloat16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

#ifdef FASTRNN_PACKED_GEMM_X86

namespace {

enum class Isa { kGeneric, kAvx2, kAvx512 };

// The float32 kernels to run: the best this CPU has, or what FASTRNN_CPU_ISA asks for ("avx2":
// as on a CPU without AVX-512; "generic": as on one without AVX2/FMA either), to test or compare.
Isa float_isa() {
  static const Isa isa = [] {
    const char* asked = std::getenv("FASTRNN_CPU_ISA");
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (asked != nullptr && std::strcmp(asked, "generic") == 0) return Isa::kGeneric;
    if (asked != nullptr && std::strcmp(asked, "avx2") == 0) {
      return avx2 ? Isa::kAvx2 : Isa::kGeneric;
    }
    if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
    return avx2 ? Isa::kAvx2 : Isa::kGeneric;
  }();
  return isa;
}

}  // namespace

bool packed_gemm_supported() { return float_isa() != Isa::kGeneric; }

bool avx512_kernels() { return float_isa() == Isa::kAvx512; }

namespace {

#define FASTRNN_AVX512_INLINE __attribute__((target("avx512f"), always_inline)) inline

// Which of columns 0-15 and 16-31 of a tile row are kept (columns in 1..32).
struct TileMasks {
  __mmask16 low, high;
};

FASTRNN_AVX512_INLINE TileMasks tile_masks(int64_t columns) {
  return {columns >= 16 ? static_cast<__mmask16>(0xFFFF)
                        : static_cast<__mmask16>((1u << columns) - 1),
          columns >= 32 ? static_cast<__mmask16>(0xFFFF)
          : columns > 16 ? static_cast<__mmask16>((1u << (columns - 16)) - 1)
                         : static_cast<__mmask16>(0)};
}

// The accumulators of a tile start at the bias (its panel's 32 entries; not when accumulating)
// or at zero.
template <int kRows>
FASTRNN_AVX512_INLINE void start_tile(__m512 (&low)[kRows], __m512 (&high)[kRows],
                                      TileMasks masks, const float* bias, bool accumulate) {
  const bool biased = bias != nullptr && !accumulate;
  const __m512 bias_low = biased ? _mm512_maskz_loadu_ps(masks.low, bias) : _mm512_setzero_ps();
  const __m512 bias_high = biased ? _mm512_maskz_loadu_ps(masks.high, bias + 16) : _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
    low[r] = bias_low;
    high[r] = bias_high;
  }
}

// c[kRows, kept columns] = the accumulators (accumulate: c += them).
template <int kRows>
FASTRNN_AVX512_INLINE void finish_tile(__m512 (&low)[kRows], __m512 (&high)[kRows],
                                       TileMasks masks, float* c, int64_t ldc, bool accumulate) {
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
    float* row = c + r * ldc;
    if (accumulate) {
      low[r] = _mm512_add_ps(low[r], _mm512_maskz_loadu_ps(masks.low, row));
      high[r] = _mm512_add_ps(high[r], _mm512_maskz_loadu_ps(masks.high, row + 16));
    }
    _mm512_mask_storeu_ps(row, masks.low, low[r]);
    _mm512_mask_storeu_ps(row + 16, masks.high, high[r]);
  }
}

// c[kRows, columns] = a[kRows, K] panel[K, 32] + bias (accumulate: c += a panel); columns in
// 1..32; bias: this panel's entries (read only under the column masks) or null.
template <int kRows>
__attribute__((target("avx512f"))) void tile(int64_t depth, const float* a, int64_t lda,
                                             const float* panel, float* c, int64_t ldc,
                                             int64_t columns, const float* bias, bool accumulate) {
  const TileMasks masks = tile_masks(columns);
  __m512 low[kRows], high[kRows];  // columns 0-15 and 16-31 of each row
  start_tile<kRows>(low, high, masks, bias, accumulate);
  int64_t k = 0;
  if constexpr (kRows == 1) {
    // one row: a second pair of accumulators takes the odd k, so that four chains of FMAs
    // overlap (two would wait on the FMA latency at every k)
    __m512 low_odd = _mm512_setzero_ps(), high_odd = _mm512_setzero_ps();
    for (; k + 2 <= depth; k += 2) {
      const __m512 a_even = _mm512_set1_ps(a[k]), a_odd = _mm512_set1_ps(a[k + 1]);
      low[0] = _mm512_fmadd_ps(a_even, _mm512_loadu_ps(panel + k * 32), low[0]);
      high[0] = _mm512_fmadd_ps(a_even, _mm512_loadu_ps(panel + k * 32 + 16), high[0]);
      low_odd = _mm512_fmadd_ps(a_odd, _mm512_loadu_ps(panel + k * 32 + 32), low_odd);
      high_odd = _mm512_fmadd_ps(a_odd, _mm512_loadu_ps(panel + k * 32 + 48), high_odd);
    }
    low[0] = _mm512_add_ps(low[0], low_odd);
    high[0] = _mm512_add_ps(high[0], high_odd);
  }
  for (; k < depth; ++k) {
    const __m512 b_low = _mm512_loadu_ps(panel + k * 32);
    const __m512 b_high = _mm512_loadu_ps(panel + k * 32 + 16);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512 a_rk = _mm512_set1_ps(a[r * lda + k]);
      low[r] = _mm512_fmadd_ps(a_rk, b_low, low[r]);
      high[r] = _mm512_fmadd_ps(a_rk, b_high, high[r]);
    }
  }
  finish_tile<kRows>(low, high, masks, c, ldc, accumulate);
}

// tile for at most 16 columns: the first half of each panel row only (bitwise the same sums).
template <int kRows>
__attribute__((target("avx512f"))) void tile_half(int64_t depth, const float* a, int64_t lda,
                                                  const float* panel, float* c, int64_t ldc,
                                                  int64_t columns, const float* bias,
                                                  bool accumulate) {
  const __mmask16 mask = tile_masks(columns).low;
  const bool biased = bias != nullptr && !accumulate;
  __m512 acc[kRows];
#pragma GCC unroll 16
  for (int r = 0; r < kRows; ++r) {
    acc[r] = biased ? _mm512_maskz_loadu_ps(mask, bias) : _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < depth; ++k) {
    const __m512 b_low = _mm512_loadu_ps(panel + k * 32);
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(a[r * lda + k]), b_low, acc[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kRows; ++r) {
    float* row = c + r * ldc;
    if (accumulate) acc[r] = _mm512_add_ps(acc[r], _mm512_maskz_loadu_ps(mask, row));
    _mm512_mask_storeu_ps(row, mask, acc[r]);
  }
}

// The AVX2/FMA tile: c[kRows, columns] = a[kRows, K] half[K, 16] + bias (accumulate: c += ...),
// half being 16 of a panel's 32 columns (rows 32 apart); columns in 1..16; bias: its 16 entries.
__attribute__((target("avx2,fma"), always_inline)) inline __m256i lane_mask(int64_t columns) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(columns)),  // lanes j < columns
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

template <int kRows>
__attribute__((target("avx2,fma"))) void tile_avx2(int64_t depth, const float* a, int64_t lda,
                                                   const float* half, float* c, int64_t ldc,
                                                   int64_t columns, const float* bias,
                                                   bool accumulate) {
  const __m256i mask0 = lane_mask(columns), mask1 = lane_mask(columns - 8);
  const bool biased = bias != nullptr && !accumulate;
  __m256 acc0[kRows], acc1[kRows];  // columns 0-7 and 8-15 of each row
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
    acc0[r] = biased ? _mm256_maskload_ps(bias, mask0) : _mm256_setzero_ps();
    acc1[r] = biased ? _mm256_maskload_ps(bias + 8, mask1) : _mm256_setzero_ps();
  }
  int64_t k = 0;
  if constexpr (kRows <= 2) {
    // few rows: more accumulators over k (phases), so that eight chains of FMAs overlap
    constexpr int kPhases = 4 / kRows;
    __m256 more0[kPhases - 1][kRows], more1[kPhases - 1][kRows];
    for (int p = 0; p < kPhases - 1; ++p) {
      for (int r = 0; r < kRows; ++r) more0[p][r] = more1[p][r] = _mm256_setzero_ps();
    }
    for (; k + kPhases <= depth; k += kPhases) {
#pragma GCC unroll 4
      for (int p = 0; p < kPhases; ++p) {
        const __m256 b0 = _mm256_loadu_ps(half + (k + p) * 32);
        const __m256 b1 = _mm256_loadu_ps(half + (k + p) * 32 + 8);
#pragma GCC unroll 2
        for (int r = 0; r < kRows; ++r) {
          const __m256 a_rk = _mm256_broadcast_ss(a + r * lda + k + p);
          __m256& sum0 = p == 0 ? acc0[r] : more0[p - 1][r];
          __m256& sum1 = p == 0 ? acc1[r] : more1[p - 1][r];
          sum0 = _mm256_fmadd_ps(a_rk, b0, sum0);
          sum1 = _mm256_fmadd_ps(a_rk, b1, sum1);
        }
      }
    }
    for (int p = 0; p < kPhases - 1; ++p) {
      for (int r = 0; r < kRows; ++r) {
        acc0[r] = _mm256_add_ps(acc0[r], more0[p][r]);
        acc1[r] = _mm256_add_ps(acc1[r], more1[p][r]);
      }
    }
  }
  for (; k < depth; ++k) {
    const __m256 b0 = _mm256_loadu_ps(half + k * 32);
    const __m256 b1 = _mm256_loadu_ps(half + k * 32 + 8);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m256 a_rk = _mm256_broadcast_ss(a + r * lda + k);
      acc0[r] = _mm256_fmadd_ps(a_rk, b0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(a_rk, b1, acc1[r]);
    }
  }
  if (columns == 16) {  // masked stores are slow on some CPUs: only for partial halves
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      float* row = c + r * ldc;
      if (accumulate) {
        acc0[r] = _mm256_add_ps(acc0[r], _mm256_loadu_ps(row));
        acc1[r] = _mm256_add_ps(acc1[r], _mm256_loadu_ps(row + 8));
      }
      _mm256_storeu_ps(row, acc0[r]);
      _mm256_storeu_ps(row + 8, acc1[r]);
    }
    return;
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
    float* row = c + r * ldc;
    if (accumulate) {
      acc0[r] = _mm256_add_ps(acc0[r], _mm256_maskload_ps(row, mask0));
      acc1[r] = _mm256_add_ps(acc1[r], _mm256_maskload_ps(row + 8, mask1));
    }
    _mm256_maskstore_ps(row, mask0, acc0[r]);
    _mm256_maskstore_ps(row + 8, mask1, acc1[r]);
  }
}

// pack_panel on AVX2: 8x8 blocks of (column, k) read along k and transposed in registers.
__attribute__((target("avx2,fma"))) void pack_panel_avx2(const float* const* sources,
                                                        int64_t depth, float* panel) {
  for (int64_t group = 0; group < 4; ++group) {  // columns 8 * group .. 8 * group + 7
    const float* const* source = sources + 8 * group;
    for (int64_t k0 = 0; k0 < depth; k0 += 8) {
      const int64_t left = std::min<int64_t>(8, depth - k0);
      const __m256i mask = lane_mask(left);
      __m256 rows[8], t[8];  // rows[i]: column i, k0..k0+7
      for (int i = 0; i < 8; ++i) {
        rows[i] = source[i] == nullptr ? _mm256_setzero_ps()
                  : left == 8          ? _mm256_loadu_ps(source[i] + k0)
                                       : _mm256_maskload_ps(source[i] + k0, mask);
      }
      for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm256_unpacklo_ps(rows[2 * i], rows[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(rows[2 * i], rows[2 * i + 1]);
      }
      for (int i = 0; i < 2; ++i) {
        rows[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        rows[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        rows[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        rows[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
      for (int i = 0; i < 4; ++i) {  // rows[i]: k0 + i and k0 + i + 4 of columns 0-3, 4-7
        t[i] = _mm256_permute2f128_ps(rows[i], rows[i + 4], 0x20);
        t[i + 4] = _mm256_permute2f128_ps(rows[i], rows[i + 4], 0x31);
      }
      for (int64_t j = 0; j < left; ++j) {
        _mm256_storeu_ps(panel + (k0 + j) * 32 + 8 * group, t[j]);
      }
    }
  }
}

// GCC 12 warns about the _mm512_undefined operands inside its own intrinsics headers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// rows[j] = (sources[0][k0 + j], ..., sources[15][k0 + j]) for j in 0..15: sixteen columns of B
// read along k and transposed; 0 for a null source or past depth.
FASTRNN_AVX512_INLINE void load_transposed(const float* const* sources, int64_t k0,
                                           int64_t depth, __m512 (&rows)[16]) {
  const int64_t left = depth - k0;
  const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xFFFF)
                                    : static_cast<__mmask16>((1u << left) - 1);
  for (int i = 0; i < 16; ++i) {
    rows[i] = sources[i] != nullptr ? _mm512_maskz_loadu_ps(mask, sources[i] + k0)
                                    : _mm512_setzero_ps();
  }
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(rows[2 * i], rows[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(rows[2 * i], rows[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    rows[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    rows[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    rows[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    rows[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(rows[i], rows[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(rows[i], rows[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(rows[i + 8], rows[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(rows[i + 8], rows[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    rows[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    rows[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}

__attribute__((target("avx512f"))) void pack_panel_avx512(const float* const* sources,
                                                          int64_t depth, float* panel) {
  __m512 rows[16];
  for (int64_t half = 0; half < 2; ++half) {  // columns 0-15, then 16-31
    for (int64_t k0 = 0; k0 < depth; k0 += 16) {
      load_transposed(sources + 16 * half, k0, depth, rows);
      for (int64_t j = 0; j < std::min<int64_t>(16, depth - k0); ++j) {
        _mm512_storeu_ps(panel + (k0 + j) * 32 + 16 * half, rows[j]);
      }
    }
  }
}

// Pairs of rows k, k + 1 of 16 columns, rounded to bfloat16 and interleaved as the panel holds
// them: (b(k, n0), b(k + 1, n0), b(k, n0 + 1), ...).
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void pack_panel_bf16_avx512(
    const float* const* sources, int64_t depth, int64_t pairs, uint16_t* panel) {
  alignas(64) static constexpr uint16_t kInterleave[32] = {
      0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  __m512 rows[16];
  for (int64_t half = 0; half < 2; ++half) {
    for (int64_t k0 = 0; k0 < 2 * pairs; k0 += 16) {
      load_transposed(sources + 16 * half, k0, depth, rows);  // rows past depth are 0
      for (int64_t j = 0; j < std::min<int64_t>(16, 2 * pairs - k0); j += 2) {
        // lanes 0-15: row k0 + j, lanes 16-31: row k0 + j + 1
        const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(rows[j + 1], rows[j]);
        _mm512_storeu_si512(panel + (((k0 + j) / 2) * 32 + 16 * half) * 2,
                            _mm512_permutexvar_epi16(interleave, both));
      }
    }
  }
}

#pragma GCC diagnostic pop

using Tile = void (*)(int64_t, const float*, int64_t, const float*, float*, int64_t, int64_t,
                     const float*, bool);
constexpr int kTileRows = 8;
// Products per pass of the accumulators: sums over K run in chunks of this depth, added up in c,
// which keeps float32 rounding errors at the level of a blocked BLAS for large K.
constexpr int64_t kDepthChunk = 128;
constexpr Tile kTiles[kTileRows + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>,
                                        tile<5>, tile<6>, tile<7>, tile<8>};
constexpr int kTileRowsHalf = 16;  // 16 accumulators, one per row
constexpr Tile kTilesHalf[kTileRowsHalf + 1] = {
    nullptr, tile_half<1>, tile_half<2>, tile_half<3>, tile_half<4>, tile_half<5>,
    tile_half<6>, tile_half<7>, tile_half<8>, tile_half<9>, tile_half<10>, tile_half<11>,
    tile_half<12>, tile_half<13>, tile_half<14>, tile_half<15>, tile_half<16>};
constexpr int kTileRowsAvx2 = 6;  // 12 accumulators, 2 panel rows and a broadcast: 15 of 16 ymm
constexpr Tile kTilesAvx2[kTileRowsAvx2 + 1] = {nullptr, tile_avx2<1>, tile_avx2<2>,
                                                tile_avx2<3>, tile_avx2<4>, tile_avx2<5>,
                                                tile_avx2<6>};

// Rows of the next tile, `rows` being left: full tiles, but a last two that would leave the
// second with less than half a tile share their rows evenly (8 rows on AVX2: 4 and 4, not 6
// and 2: a tile of few rows has too few accumulators to keep the FMA units busy).
int64_t tile_height(int64_t rows, int64_t tile_rows) {
  if (rows <= tile_rows) return rows;
  if (rows < tile_rows + tile_rows / 2) return rows - rows / 2;
  return tile_rows;
}

// The walk of packed_gemm over tiles of at most tile_rows x tile_columns (32, or 16 for half
// panels): panel by panel (from the last where last_panel_first), then chunks of K (a chunk of
// the panel stays in L1 across the row tiles), then rows. tiles[r] computes r rows.
void run_tiles(const Tile* tiles, int64_t tile_rows, int64_t tile_columns, int64_t rows,
               const float* a, int64_t lda, const PackedMatrix& b, float* c, int64_t ldc,
               const float* bias, bool accumulate, bool last_panel_first) {
  const int64_t width = PackedMatrix::kPanelColumns;
  for (int64_t i = 0; i < b.panels(); ++i) {
    const int64_t p = last_panel_first ? b.panels() - 1 - i : i;
    const int64_t last = std::min(b.columns(), (p + 1) * width);
    for (int64_t first = p * width; first < last; first += tile_columns) {
      const int64_t columns = std::min(tile_columns, last - first);
      const float* columns_of_panel = b.panel(p) + (first - p * width);
      for (int64_t k = 0; k < b.depth(); k += kDepthChunk) {
        const int64_t depth = std::min(kDepthChunk, b.depth() - k);
        for (int64_t m = 0, height; m < rows; m += height) {
          height = tile_height(rows - m, tile_rows);
          tiles[height](depth, a + m * lda + k, lda, columns_of_panel + k * width,
                        c + m * ldc + first, ldc, columns,
                        bias == nullptr ? nullptr : bias + first, accumulate || k > 0);
        }
      }
    }
  }
}

// GCC 12 warns about the undefined operands inside its own _mm512_reduce_add_ps.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// The sums of 8 accumulators' 16 lanes, as 8 lanes (lane r: acc[r]): halves folded pairwise
// across the accumulators, a third of the shuffles and adds of 8 separate reductions.
FASTRNN_AVX512_INLINE __m256 row_sums8(const __m512 (&acc)[8]) {
  __m512 pairs[4];  // pairs[j]: the halves of acc[2j] and acc[2j+1] added, 8 lanes each
  for (int j = 0; j < 4; ++j) {
    pairs[j] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2 * j], acc[2 * j + 1], 0x44),
                             _mm512_shuffle_f32x4(acc[2 * j], acc[2 * j + 1], 0xEE));
  }
  // quads: 4 lanes of each of acc[0..3] (low) and acc[4..7] (high)
  const __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(pairs[0], pairs[1], 0x88),
                                   _mm512_shuffle_f32x4(pairs[0], pairs[1], 0xDD));
  const __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(pairs[2], pairs[3], 0x88),
                                    _mm512_shuffle_f32x4(pairs[2], pairs[3], 0xDD));
  const __m512 mixed = _mm512_add_ps(_mm512_unpacklo_ps(low, high), _mm512_unpackhi_ps(low, high));
  const __m512 sums = _mm512_add_ps(mixed, _mm512_permute_ps(mixed, 0x4E));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps256(_mm512_permutexvar_ps(order, sums));
}

// y[r] = the sum of acc[r]'s lanes + bias[r] (bias may be null), r < kRows.
template <int kRows>
FASTRNN_AVX512_INLINE void store_row_sums(const __m512 (&acc)[kRows], float* y,
                                          const float* bias) {
  if constexpr (kRows == 8) {
    __m256 sums = row_sums8(acc);
    if (bias != nullptr) sums = _mm256_add_ps(sums, _mm256_loadu_ps(bias));
    _mm256_storeu_ps(y, sums);
  } else {
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      y[r] = _mm512_reduce_add_ps(acc[r]) + (bias == nullptr ? 0.0f : bias[r]);
    }
  }
}

#pragma GCC diagnostic pop

// y[b][r] = w[r, :K] . x[b] + bias[r] for kRows rows and kBatch rows of x (ldx apart; y ldy
// apart), AVX-512: one accumulator per row and row of x, 16 lanes of K at a time, each load of
// w feeding kBatch FMAs (the weights streamed from L2 or L3 overlap the multiply-adds of every
// row of x); the lanes are summed at the end. kBatch * kRows + kBatch + 1 <= 32 registers.
template <int kRows, int kBatch>
__attribute__((target("avx512f"))) void gemv_tile(int64_t depth, const float* w, int64_t ldw,
                                                  const float* x, int64_t ldx, float* y,
                                                  int64_t ldy, const float* bias) {
  __m512 acc[kBatch][kRows];
#pragma GCC unroll 8
  for (int b = 0; b < kBatch; ++b) {
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) acc[b][r] = _mm512_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 16 <= depth; k += 16) {
    __m512 xk[kBatch];
#pragma GCC unroll 8
    for (int b = 0; b < kBatch; ++b) xk[b] = _mm512_loadu_ps(x + b * ldx + k);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      __m512 wr = _mm512_loadu_ps(w + r * ldw + k);
      if (kBatch > 1) asm("" : "+v"(wr));  // one load: GCC would fold it into every FMA
#pragma GCC unroll 8
      for (int b = 0; b < kBatch; ++b) acc[b][r] = _mm512_fmadd_ps(wr, xk[b], acc[b][r]);
    }
  }
  if (k < depth) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (depth - k)) - 1);
    __m512 xk[kBatch];
#pragma GCC unroll 8
    for (int b = 0; b < kBatch; ++b) xk[b] = _mm512_maskz_loadu_ps(mask, x + b * ldx + k);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512 wr = _mm512_maskz_loadu_ps(mask, w + r * ldw + k);
#pragma GCC unroll 8
      for (int b = 0; b < kBatch; ++b) acc[b][r] = _mm512_fmadd_ps(wr, xk[b], acc[b][r]);
    }
  }
#pragma GCC unroll 8
  for (int b = 0; b < kBatch; ++b) store_row_sums<kRows>(acc[b], y + b * ldy, bias);
}

// The sums of the 8 lanes of acc[0 .. 4) as 4 floats, each ((l0 + l1) + (l2 + l3)) +
// ((l4 + l5) + (l6 + l7)): the order of every AVX2 gemv tile, whatever its rows, so that a row's
// sum does not depend on the tile it falls in.
__attribute__((target("avx2,fma"))) inline __m128 row_sums4_avx2(__m256 a0, __m256 a1,
                                                                 __m256 a2, __m256 a3) {
  const __m256 quads = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(quads), _mm256_extractf128_ps(quads, 1));
}

// y[r] = the sum of acc[r]'s lanes (row_sums4_avx2's order) + bias[r] (bias may be null),
// r < kRows: the AVX2 store_row_sums.
template <int kRows>
__attribute__((target("avx2,fma"), always_inline)) inline void store_row_sums_avx2(
    const __m256 (&acc)[kRows], float* y, const float* bias) {
  float sums[8];
  const __m256 zero = _mm256_setzero_ps();
#pragma GCC unroll 2
  for (int r0 = 0; r0 < kRows; r0 += 4) {  // rows past kRows as zeros
    const __m256 a1 = r0 + 1 < kRows ? acc[std::min(r0 + 1, kRows - 1)] : zero;
    const __m256 a2 = r0 + 2 < kRows ? acc[std::min(r0 + 2, kRows - 1)] : zero;
    const __m256 a3 = r0 + 3 < kRows ? acc[std::min(r0 + 3, kRows - 1)] : zero;
    _mm_storeu_ps(sums + r0, row_sums4_avx2(acc[r0], a1, a2, a3));
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) y[r] = sums[r] + (bias == nullptr ? 0.0f : bias[r]);
}

// The AVX2/FMA gemv_tile: 8 lanes of K at a time, kRows rows of w by kBatch rows of x (each
// load of w feeding kBatch FMAs; kBatch * kRows + kBatch + 1 <= 16 registers).
template <int kRows, int kBatch>
__attribute__((target("avx2,fma"))) void gemv_tile_avx2(int64_t depth, const float* w,
                                                        int64_t ldw, const float* x,
                                                        int64_t ldx, float* y, int64_t ldy,
                                                        const float* bias) {
  __m256 acc[kBatch][kRows];
#pragma GCC unroll 8
  for (int b = 0; b < kBatch; ++b) {
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) acc[b][r] = _mm256_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 8 <= depth; k += 8) {
    __m256 xk[kBatch];
#pragma GCC unroll 8
    for (int b = 0; b < kBatch; ++b) xk[b] = _mm256_loadu_ps(x + b * ldx + k);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      __m256 wr = _mm256_loadu_ps(w + r * ldw + k);
      if (kBatch > 1) asm("" : "+x"(wr));  // one load: GCC would fold it into every FMA
#pragma GCC unroll 8
      for (int b = 0; b < kBatch; ++b) acc[b][r] = _mm256_fmadd_ps(wr, xk[b], acc[b][r]);
    }
  }
  if (k < depth) {
    const __m256i mask = lane_mask(depth - k);
    __m256 xk[kBatch];
#pragma GCC unroll 8
    for (int b = 0; b < kBatch; ++b) xk[b] = _mm256_maskload_ps(x + b * ldx + k, mask);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m256 wr = _mm256_maskload_ps(w + r * ldw + k, mask);
#pragma GCC unroll 8
      for (int b = 0; b < kBatch; ++b) acc[b][r] = _mm256_fmadd_ps(wr, xk[b], acc[b][r]);
    }
  }
#pragma GCC unroll 8
  for (int b = 0; b < kBatch; ++b) store_row_sums_avx2<kRows>(acc[b], y + b * ldy, bias);
}

// 8 bfloat16 values (their bits) as float32 lanes: exact.
__attribute__((target("avx2,fma"), always_inline)) inline __m256 bf16_lanes(const uint16_t* w) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

// gemv_tile_avx2 with kBatch 1 for bfloat16 w (each value made float32 as it is loaded) and
// float32 x: float32 products of the bfloat16 values, summed as gemv_tile_avx2 sums them.
template <int kRows>
__attribute__((target("avx2,fma"))) void gemv_tile_bf16_avx2(int64_t depth, const uint16_t* w,
                                                             int64_t ldw, const float* x,
                                                             float* y, const float* bias) {
  __m256 acc[kRows];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= depth; k += 8) {
    const __m256 xk = _mm256_loadu_ps(x + k);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      acc[r] = _mm256_fmadd_ps(bf16_lanes(w + r * ldw + k), xk, acc[r]);
    }
  }
  if (k < depth) {  // the last entries through a zero-padded copy
    const __m256i mask = lane_mask(depth - k);
    const __m256 xk = _mm256_maskload_ps(x + k, mask);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      uint16_t tail[8] = {};
      std::memcpy(tail, w + r * ldw + k, sizeof(uint16_t) * (depth - k));
      acc[r] = _mm256_fmadd_ps(bf16_lanes(tail), xk, acc[r]);
    }
  }
  store_row_sums_avx2<kRows>(acc, y, bias);
}

using GemvTileBf16Avx2 = void (*)(int64_t, const uint16_t*, int64_t, const float*, float*,
                                  const float*);
constexpr GemvTileBf16Avx2 kGemvTilesBf16Avx2[] = {
    nullptr, gemv_tile_bf16_avx2<1>, gemv_tile_bf16_avx2<2>, gemv_tile_bf16_avx2<3>,
    gemv_tile_bf16_avx2<4>, gemv_tile_bf16_avx2<5>, gemv_tile_bf16_avx2<6>,
    gemv_tile_bf16_avx2<7>, gemv_tile_bf16_avx2<8>};

// y[k0 .. k0+width) (+)= sum over n of g[n] w[n, k0 .. k0+width), width <= 128 (AVX-512).
__attribute__((target("avx512f"))) void gemv_columns_block(int64_t rows, int64_t width,
                                                           const float* w, int64_t ldw,
                                                           const float* g, float* y,
                                                           bool accumulate) {
  __mmask16 masks[8];
  __m512 acc[8];
  for (int j = 0; j < 8; ++j) {
    const int64_t left = std::clamp<int64_t>(width - 16 * j, 0, 16);
    masks[j] = static_cast<__mmask16>((1u << left) - 1);
    acc[j] = accumulate ? _mm512_maskz_loadu_ps(masks[j], y + 16 * j) : _mm512_setzero_ps();
  }
  for (int64_t n = 0; n < rows; ++n) {
    const __m512 gn = _mm512_set1_ps(g[n]);
    const float* row = w + n * ldw;
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      acc[j] = _mm512_fmadd_ps(gn, _mm512_maskz_loadu_ps(masks[j], row + 16 * j), acc[j]);
    }
  }
  for (int j = 0; j < 8; ++j) _mm512_mask_storeu_ps(y + 16 * j, masks[j], acc[j]);
}

// The AVX2/FMA gemv_columns_block: width <= 64.
__attribute__((target("avx2,fma"))) void gemv_columns_block_avx2(int64_t rows, int64_t width,
                                                                 const float* w, int64_t ldw,
                                                                 const float* g, float* y,
                                                                 bool accumulate) {
  __m256i masks[8];
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) {
    masks[j] = lane_mask(width - 8 * j);
    acc[j] = accumulate ? _mm256_maskload_ps(y + 8 * j, masks[j]) : _mm256_setzero_ps();
  }
  for (int64_t n = 0; n < rows; ++n) {
    const __m256 gn = _mm256_broadcast_ss(g + n);
    const float* row = w + n * ldw;
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      acc[j] = _mm256_fmadd_ps(gn, _mm256_maskload_ps(row + 8 * j, masks[j]), acc[j]);
    }
  }
  for (int j = 0; j < 8; ++j) _mm256_maskstore_ps(y + 8 * j, masks[j], acc[j]);
}

using GemvBatchTile = void (*)(int64_t, const float*, int64_t, const float*, int64_t, float*,
                               int64_t, const float*);
constexpr int kGemvRows = 8;
// Rows of x a gemv tile multiplies at once (AVX-512): 8 weight rows by 3 rows of x fill the
// registers (24 sums, 3 rows of x, a row of w).
constexpr int kGemvBatchTile = 3;
// Rows of x for the next gemv tile, of `left`: 4 as 2 and 2 (a tile of 3 would leave a pass
// of 1, load-bound).
constexpr int64_t gemv_batch_tile(int64_t left) {
  return left == 4 ? 2 : std::min<int64_t>(kGemvBatchTile, left);
}
template <int kBatch>
constexpr std::array<GemvBatchTile, kGemvRows + 1> gemv_tiles() {
  return {nullptr, gemv_tile<1, kBatch>, gemv_tile<2, kBatch>, gemv_tile<3, kBatch>,
          gemv_tile<4, kBatch>, gemv_tile<5, kBatch>, gemv_tile<6, kBatch>,
          gemv_tile<7, kBatch>, gemv_tile<8, kBatch>};
}
constexpr std::array<GemvBatchTile, kGemvRows + 1> kGemvTiles[kGemvBatchTile + 1] = {
    {}, gemv_tiles<1>(), gemv_tiles<2>(), gemv_tiles<3>()};
// AVX2: a block of 8 rows of w runs as two tiles of 4 by 2 rows of x, and by 1 row of x whole.
constexpr int kGemvRowsAvx2Pair = 4;
template <int kBatch, int kMaxRows>
constexpr std::array<GemvBatchTile, kGemvRows + 1> gemv_tiles_avx2() {
  std::array<GemvBatchTile, kGemvRows + 1> tiles{nullptr, gemv_tile_avx2<1, kBatch>,
                                                 gemv_tile_avx2<2, kBatch>,
                                                 gemv_tile_avx2<3, kBatch>,
                                                 gemv_tile_avx2<4, kBatch>};
  if constexpr (kMaxRows == 8) {
    tiles[5] = gemv_tile_avx2<5, kBatch>;
    tiles[6] = gemv_tile_avx2<6, kBatch>;
    tiles[7] = gemv_tile_avx2<7, kBatch>;
    tiles[8] = gemv_tile_avx2<8, kBatch>;
  }
  return tiles;
}
constexpr std::array<GemvBatchTile, kGemvRows + 1> kGemvTilesAvx2[3] = {
    {}, gemv_tiles_avx2<1, kGemvRows>(), gemv_tiles_avx2<2, kGemvRowsAvx2Pair>()};

}  // namespace

void PackedMatrix::pack_panel(const float* const* sources, float* panel) const {
  if (avx512_kernels()) {
    pack_panel_avx512(sources, depth_, panel);
  } else {
    pack_panel_avx2(sources, depth_, panel);
  }
}

void PackedMatrixBf16::pack_panel(const float* const* sources, uint16_t* panel) const {
  pack_panel_bf16_avx512(sources, depth_, pair_rows(), panel);
}

void packed_gemm(int64_t rows, const float* a, int64_t lda, const PackedMatrix& b, float* c,
                 int64_t ldc, const float* bias, bool accumulate, bool last_panel_first) {
  if (avx512_kernels() && b.columns() <= 16) {  // half of a panel: half the multiply-adds
    run_tiles(kTilesHalf, kTileRowsHalf, 16, rows, a, lda, b, c, ldc, bias, accumulate,
              last_panel_first);
  } else if (avx512_kernels()) {
    run_tiles(kTiles, kTileRows, 32, rows, a, lda, b, c, ldc, bias, accumulate,
              last_panel_first);
  } else {  // AVX2/FMA: each panel as two halves of 16 columns
    run_tiles(kTilesAvx2, kTileRowsAvx2, 16, rows, a, lda, b, c, ldc, bias, accumulate,
              last_panel_first);
  }
}

void gemv_rows(int64_t rows, int64_t depth, const float* w, int64_t ldw, const float* x,
               int64_t ldx, int64_t batch, float* y, int64_t ldy, const float* bias) {
  const bool avx512 = avx512_kernels();
  for (int64_t m = 0; m < rows; m += kGemvRows) {
    const int64_t height = std::min<int64_t>(kGemvRows, rows - m);
    const float* block_bias = bias == nullptr ? nullptr : bias + m;
    for (int64_t b = 0; b < batch;) {  // the block's rows from L1 after the first pass
      if (!avx512 && batch - b == 1) {
        kGemvTilesAvx2[1][height](depth, w + m * ldw, ldw, x + b * ldx, ldx, y + b * ldy + m,
                                  ldy, block_bias);
        ++b;
        continue;
      }
      if (!avx512) {  // two rows of x, the block as tiles of up to 4 rows of w
        for (int64_t r = 0; r < height; r += kGemvRowsAvx2Pair) {
          const int64_t rows_r = std::min<int64_t>(kGemvRowsAvx2Pair, height - r);
          kGemvTilesAvx2[2][rows_r](depth, w + (m + r) * ldw, ldw, x + b * ldx, ldx,
                                    y + b * ldy + m + r, ldy,
                                    block_bias == nullptr ? nullptr : block_bias + r);
        }
        b += 2;
        continue;
      }
      const int64_t count = gemv_batch_tile(batch - b);
      kGemvTiles[count][height](depth, w + m * ldw, ldw, x + b * ldx, ldx, y + b * ldy + m,
                                ldy, block_bias);
      b += count;
    }
  }
}

void gemv_columns(int64_t rows, int64_t depth, const float* w, int64_t ldw, const float* g,
                  float* y, bool accumulate) {
  const bool avx512 = avx512_kernels();
  const int64_t block = avx512 ? 128 : 64;
  for (int64_t k = 0; k < depth; k += block) {
    const int64_t width = std::min(block, depth - k);
    if (avx512) {
      gemv_columns_block(rows, width, w + k, ldw, g, y + k, accumulate);
    } else {
      gemv_columns_block_avx2(rows, width, w + k, ldw, g, y + k, accumulate);
    }
  }
}

bool gemv_bf16_supported() { return packed_gemm_bf16_supported() || packed_gemm_supported(); }

bool packed_gemm_bf16_supported() {
  static const bool supported =
      avx512_kernels() && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return supported;
}

namespace {

// c[kRows, columns] = a[kRows, 2*pairs] panel[pairs, 32, 2] + bias (accumulate: c += ...) with
// bfloat16 pair products (vdpbf16ps); columns in 1..32.
template <int kRows>
__attribute__((target("avx512f,avx512bf16"))) void tile_bf16(
    int64_t pairs, const uint16_t* a, int64_t lda, const uint16_t* panel, float* c, int64_t ldc,
    int64_t columns, const float* bias, bool accumulate) {
  const TileMasks masks = tile_masks(columns);
  __m512 low[kRows], high[kRows];
  start_tile<kRows>(low, high, masks, bias, accumulate);
  int64_t k = 0;
  if constexpr (kRows == 1) {  // as in tile<1>: the odd pairs into a second pair of sums
    __m512 low_odd = _mm512_setzero_ps(), high_odd = _mm512_setzero_ps();
    for (; k + 2 <= pairs; k += 2) {
      int32_t even, odd;
      std::memcpy(&even, a + 2 * k, sizeof(even));
      std::memcpy(&odd, a + 2 * k + 2, sizeof(odd));
      const __m512bh a_even = (__m512bh)_mm512_set1_epi32(even);
      const __m512bh a_odd = (__m512bh)_mm512_set1_epi32(odd);
      low[0] = _mm512_dpbf16_ps(low[0], a_even, (__m512bh)_mm512_loadu_si512(panel + k * 64));
      high[0] = _mm512_dpbf16_ps(high[0], a_even,
                                 (__m512bh)_mm512_loadu_si512(panel + k * 64 + 32));
      low_odd = _mm512_dpbf16_ps(low_odd, a_odd,
                                 (__m512bh)_mm512_loadu_si512(panel + k * 64 + 64));
      high_odd = _mm512_dpbf16_ps(high_odd, a_odd,
                                  (__m512bh)_mm512_loadu_si512(panel + k * 64 + 96));
    }
    low[0] = _mm512_add_ps(low[0], low_odd);
    high[0] = _mm512_add_ps(high[0], high_odd);
  }
  for (; k < pairs; ++k) {
    const __m512bh b_low = (__m512bh)_mm512_loadu_si512(panel + k * 64);
    const __m512bh b_high = (__m512bh)_mm512_loadu_si512(panel + k * 64 + 32);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * k, sizeof(pair));
      const __m512bh a_rk = (__m512bh)_mm512_set1_epi32(pair);
      low[r] = _mm512_dpbf16_ps(low[r], a_rk, b_low);
      high[r] = _mm512_dpbf16_ps(high[r], a_rk, b_high);
    }
  }
  finish_tile<kRows>(low, high, masks, c, ldc, accumulate);
}

using TileBf16 = void (*)(int64_t, const uint16_t*, int64_t, const uint16_t*, float*, int64_t,
                          int64_t, const float*, bool);
constexpr TileBf16 kTilesBf16[kTileRows + 1] = {
    nullptr, tile_bf16<1>, tile_bf16<2>, tile_bf16<3>, tile_bf16<4>,
    tile_bf16<5>, tile_bf16<6>, tile_bf16<7>, tile_bf16<8>};

}  // namespace

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void to_bfloat16_rows(
    const float* src, int64_t rows, int64_t columns, int64_t src_stride, uint16_t* dst,
    int64_t dst_stride) {
  for (int64_t m = 0; m < rows; ++m) {
    const float* from = src + m * src_stride;
    uint16_t* to = dst + m * dst_stride;
    for (int64_t n = 0; n < columns; n += 16) {
      const __mmask16 mask = columns - n >= 16 ? 0xFFFF
          : static_cast<__mmask16>((1u << (columns - n)) - 1);
      const __m256bh packed = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, from + n));
      _mm256_mask_storeu_epi16(to + n, mask, (__m256i)packed);
    }
    if (columns % 2 == 1) to[columns] = 0;
  }
}

namespace {

// gemv_tile for bfloat16 w and x: bfloat16 pair products (vdpbf16ps) summed in float32 lanes,
// 32 of K at a time, each load of w feeding kBatch rows of x; the lanes summed at the end.
template <int kRows, int kBatch>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void gemv_tile_bf16(
    int64_t depth, const uint16_t* w, int64_t ldw, const uint16_t* x, int64_t ldx, float* y,
    int64_t ldy, const float* bias) {
  __m512 acc[kBatch][kRows];
#pragma GCC unroll 8
  for (int b = 0; b < kBatch; ++b) {
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) acc[b][r] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < depth; k += 32) {
    const __mmask32 mask = depth - k >= 32 ? ~__mmask32(0)
                                           : static_cast<__mmask32>((1ull << (depth - k)) - 1);
    __m512bh xk[kBatch];
#pragma GCC unroll 8
    for (int b = 0; b < kBatch; ++b) {
      xk[b] = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + b * ldx + k);
    }
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      __m512i wr = _mm512_maskz_loadu_epi16(mask, w + r * ldw + k);
      if (kBatch > 1) asm("" : "+v"(wr));  // one load: GCC would fold it into every product
#pragma GCC unroll 8
      for (int b = 0; b < kBatch; ++b) {
        acc[b][r] = _mm512_dpbf16_ps(acc[b][r], (__m512bh)wr, xk[b]);
      }
    }
  }
#pragma GCC unroll 8
  for (int b = 0; b < kBatch; ++b) store_row_sums<kRows>(acc[b], y + b * ldy, bias);
}

using GemvTileBf16 = void (*)(int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t,
                              float*, int64_t, const float*);
template <int kBatch>
constexpr std::array<GemvTileBf16, kGemvRows + 1> gemv_tiles_bf16() {
  return {nullptr, gemv_tile_bf16<1, kBatch>, gemv_tile_bf16<2, kBatch>,
          gemv_tile_bf16<3, kBatch>, gemv_tile_bf16<4, kBatch>, gemv_tile_bf16<5, kBatch>,
          gemv_tile_bf16<6, kBatch>, gemv_tile_bf16<7, kBatch>, gemv_tile_bf16<8, kBatch>};
}
constexpr std::array<GemvTileBf16, kGemvRows + 1> kGemvTilesBf16[kGemvBatchTile + 1] = {
    {}, gemv_tiles_bf16<1>(), gemv_tiles_bf16<2>(), gemv_tiles_bf16<3>()};

}  // namespace

void gemv_rows_bf16(int64_t rows, int64_t depth, const uint16_t* w, int64_t ldw,
                    const uint16_t* x, int64_t ldx, int64_t batch, float* y, int64_t ldy,
                    const float* bias) {
  if (!packed_gemm_bf16_supported()) {  // AVX2: x as float32, a row of x at a time
    std::vector<float> x_float(batch * depth);
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t k = 0; k < depth; ++k) {
        const uint32_t value = uint32_t(x[b * ldx + k]) << 16;
        std::memcpy(&x_float[b * depth + k], &value, sizeof(float));
      }
    }
    for (int64_t m = 0; m < rows; m += kGemvRows) {
      const int64_t height = std::min<int64_t>(kGemvRows, rows - m);
      for (int64_t b = 0; b < batch; ++b) {  // the block's rows from L1 after the first
        kGemvTilesBf16Avx2[height](depth, w + m * ldw, ldw, x_float.data() + b * depth,
                                   y + b * ldy + m, bias == nullptr ? nullptr : bias + m);
      }
    }
    return;
  }
  for (int64_t m = 0; m < rows; m += kGemvRows) {
    const int64_t height = std::min<int64_t>(kGemvRows, rows - m);
    for (int64_t b = 0; b < batch;) {  // as gemv_rows
      const int64_t count = gemv_batch_tile(batch - b);
      kGemvTilesBf16[count][height](depth, w + m * ldw, ldw, x + b * ldx, ldx, y + b * ldy + m,
                                    ldy, bias == nullptr ? nullptr : bias + m);
      b += count;
    }
  }
}

void packed_gemm_bf16(int64_t rows, const uint16_t* a, int64_t lda, const PackedMatrixBf16& b,
                      float* c, int64_t ldc, const float* bias, bool accumulate,
                      bool last_panel_first) {
  const int64_t width = PackedMatrixBf16::kPanelColumns;
  const int64_t chunk = kDepthChunk / 2;  // pairs per pass of the accumulators
  for (int64_t i = 0; i < b.panels(); ++i) {
    const int64_t p = last_panel_first ? b.panels() - 1 - i : i;
    const int64_t first = p * width, columns = std::min(width, b.columns() - first);
    for (int64_t k = 0; k < b.pair_rows(); k += chunk) {
      const int64_t pairs = std::min(chunk, b.pair_rows() - k);
      for (int64_t m = 0, height; m < rows; m += height) {  // walked as in run_tiles
        height = tile_height(rows - m, kTileRows);
        kTilesBf16[height](pairs, a + m * lda + 2 * k, lda, b.panel(p) + k * width * 2,
                           c + m * ldc + first, ldc, columns,
                           bias == nullptr ? nullptr : bias + first, accumulate || k > 0);
      }
    }
  }
}

#else

void PackedMatrix::pack_panel(const float* const*, float*) const {
  throw std::runtime_error("fastrnn cpu: packing panels needs an x86-64 CPU with AVX2");
}

void PackedMatrixBf16::pack_panel(const float* const*, uint16_t*) const {
  throw std::runtime_error("fastrnn cpu: bfloat16 panels need an x86-64 CPU with AVX512_BF16");
}

bool packed_gemm_supported() { return false; }
bool avx512_kernels() { return false; }
bool packed_gemm_bf16_supported() { return false; }
bool gemv_bf16_supported() { return false; }
void gemv_rows_bf16(int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t,
                    float*, int64_t, const float*) {
  throw std::runtime_error("fastrnn cpu: bfloat16 dot products need an x86-64 CPU with AVX512_BF16");
}

void to_bfloat16_rows(const float*, int64_t, int64_t, int64_t, uint16_t*, int64_t) {
  throw std::runtime_error("fastrnn cpu: to_bfloat16_rows needs an x86-64 CPU with AVX512_BF16");
}

void packed_gemm_bf16(int64_t, const uint16_t*, int64_t, const PackedMatrixBf16&, float*, int64_t,
                      const float*, bool, bool) {
  throw std::runtime_error("fastrnn cpu: packed_gemm_bf16 needs an x86-64 CPU with AVX512_BF16");
}

void packed_gemm(int64_t, const float*, int64_t, const PackedMatrix&, float*, int64_t,
                 const float*, bool, bool) {
  throw std::runtime_error("fastrnn cpu: packed_gemm needs an x86-64 CPU with AVX2");
}

void gemv_rows(int64_t, int64_t, const float*, int64_t, const float*, int64_t, int64_t, float*,
               int64_t, const float*) {
  throw std::runtime_error("fastrnn cpu: gemv_rows needs an x86-64 CPU with AVX2");
}

void gemv_columns(int64_t, int64_t, const float*, int64_t, const float*, float*, bool) {
  throw std::runtime_error("fastrnn cpu: gemv_columns needs an x86-64 CPU with AVX2");
}

#endif

}  // namespace fastrnn_cpu
