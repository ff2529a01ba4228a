// Dynamically quantized int8 products (int8_gemm.h).

#include "int8_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <utility>

#include "kernel_attributes.h"
#include "packed_gemm.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTRNN_INT8_X86 1
#endif

namespace fastrnn_cpu {
namespace {

enum class Int8Isa { kGeneric, kAvx2, kVnni };

// The float32 kernels' choice (packed_gemm.h), narrowed to what this CPU has for int8.
Int8Isa int8_isa() {
#ifdef FASTRNN_INT8_X86
  static const Int8Isa isa = [] {
    if (avx512_kernels() && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vnni")) {
      return Int8Isa::kVnni;
    }
    return packed_gemm_supported() ? Int8Isa::kAvx2 : Int8Isa::kGeneric;
  }();
  return isa;
#else
  return Int8Isa::kGeneric;
#endif
}

// Where a tile's sums go: y rows [b0, b0 + R), columns [n0, n0 + 16 P) of which `columns` are
// in y (the last panel may hold fewer than 16 rows of w); the pointers are at (b0, n0).
struct Epilogue {
  float* y;
  int64_t ldy;
  int64_t columns;
  const float* w_scale;
  const int32_t* w_sum;  // subtracted 128 times by the vnni kernels
  const float* x_scale;
  const float* bias;     // or null
};

// y[r][n0 + 16 p + j] from the 16 int32 sums (of x_q itself, no offset) of row r and panel p.
FASTRNN_INLINE void store_sums(const int32_t* sums, int64_t r, int64_t p, const Epilogue& e) {
  const int64_t first = p * kPanelRows;
  const int64_t count = std::min<int64_t>(kPanelRows, e.columns - first);
  float* out = e.y + r * e.ldy + first;
  for (int64_t j = 0; j < count; ++j) {
    const int64_t n = first + j;
    out[j] = float(sums[j]) * (e.x_scale[r] * e.w_scale[n]) +
             (e.bias != nullptr ? e.bias[n] : 0.0f);
  }
}

// A tile of R rows of x and P panels: sums over `quads` groups of 4 entries of K.
template <int R, int P>
void tile_generic(int64_t quads, const int8_t* panels, int64_t panel_bytes, const int8_t* x,
                  int64_t ldx, const Epilogue& e) {
  for (int r = 0; r < R; ++r) {
    for (int p = 0; p < P; ++p) {
      int32_t sums[kPanelRows] = {};
      const int8_t* panel = panels + p * panel_bytes;
      for (int64_t k = 0; k < quads; ++k) {
        for (int64_t j = 0; j < kPanelRows; ++j) {
          for (int64_t i = 0; i < 4; ++i) {
            sums[j] += int32_t(x[r * ldx + 4 * k + i]) * panel[k * 64 + 4 * j + i];
          }
        }
      }
      store_sums(sums, r, p, e);
    }
  }
}

#ifdef FASTRNN_INT8_X86

// acc + a (unsigned bytes) . b (signed bytes) in groups of 4, as _mm512_dpbusd_epi32, in place:
// GCC moves the intrinsic's sums between registers at every step of a loop carrying many.
FASTRNN_INLINE __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "vm"(b));
  return acc;
}

// vpdpbusd on x + 128 (4 bytes of a row, broadcast) and 64 bytes of each panel; the sums of a
// row and panel stay in one register, one lane per output.
template <int R, int P>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void tile_vnni(
    int64_t quads, const int8_t* panels, int64_t panel_bytes, const int8_t* x, int64_t ldx,
    const Epilogue& e) {
  __m512i acc[R][P];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) acc[r][p] = _mm512_setzero_si512();
  }
  for (int64_t k = 0; k < quads; ++k) {
    __m512i w[P];
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) w[p] = _mm512_loadu_si512(panels + p * panel_bytes + k * 64);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t quad;  // already x + 128 (quantize_rows for these kernels)
      std::memcpy(&quad, x + r * ldx + 4 * k, sizeof(quad));
      const __m512i xb = _mm512_set1_epi32(quad);
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p) acc[r][p] = dpbusd(acc[r][p], xb, w[p]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512 x_scale = _mm512_set1_ps(e.x_scale[r]);
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) {
      const int64_t first = p * kPanelRows;
      const int64_t count = std::min<int64_t>(kPanelRows, e.columns - first);
      const __mmask16 mask = count >= 16 ? __mmask16(0xffff) : __mmask16((1u << count) - 1);
      const __m512i offset = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(mask, e.w_sum + first), 7);
      const __m512 sums = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][p], offset));
      const __m512 scale = _mm512_mul_ps(x_scale, _mm512_maskz_loadu_ps(mask, e.w_scale + first));
      __m512 value = _mm512_mul_ps(sums, scale);
      if (e.bias != nullptr) {
        value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(mask, e.bias + first));
      }
      _mm512_mask_storeu_ps(e.y + r * e.ldy + first, mask, value);
    }
  }
}

// |x| (vpsignb) times the panel with x's sign, pairs to int16 (vpmaddubsw), then to int32
// (vpmaddwd by ones): 8 outputs per register, two per panel.
template <int R, int P>
__attribute__((target("avx2"))) void tile_avx2(int64_t quads, const int8_t* panels,
                                               int64_t panel_bytes, const int8_t* x, int64_t ldx,
                                               const Epilogue& e) {
  __m256i acc[R][P][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) acc[r][p][0] = acc[r][p][1] = _mm256_setzero_si256();
  }
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t k = 0; k < quads; ++k) {
    __m256i w[P][2];
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) {
      const int8_t* at = panels + p * panel_bytes + k * 64;
      w[p][0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
      w[p][1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at + 32));
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t quad;
      std::memcpy(&quad, x + r * ldx + 4 * k, sizeof(quad));
      const __m256i xb = _mm256_set1_epi32(quad);
      const __m256i magnitude = _mm256_sign_epi8(xb, xb);
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p) {
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(w[p][h], xb));
          acc[r][p][h] = _mm256_add_epi32(acc[r][p][h], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) {
      alignas(32) int32_t sums[kPanelRows];
      _mm256_store_si256(reinterpret_cast<__m256i*>(sums), acc[r][p][0]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(sums + 8), acc[r][p][1]);
      store_sums(sums, r, p, e);
    }
  }
}

#endif  // FASTRNN_INT8_X86

using Tile = void (*)(int64_t, const int8_t*, int64_t, const int8_t*, int64_t, const Epilogue&);

// The tiles of one ISA: for R rows of x (1..kMaxRows), the widest (panels[R - 1] panels) and
// the one-panel tile for what is left of a chunk of panels.
struct Tiles {
  int max_rows;
  int panels[8];
  Tile wide[8];
  Tile narrow[8];
};

template <template <int, int> class Kernel, int... kPanels, std::size_t... kIndex>
constexpr Tiles make_tiles(std::integer_sequence<int, kPanels...>,
                           std::index_sequence<kIndex...>) {
  return Tiles{int(sizeof...(kIndex)), {kPanels...},
               {&Kernel<int(kIndex) + 1, kPanels>::run...},
               {&Kernel<int(kIndex) + 1, 1>::run...}};
}

#define FASTRNN_TILE_KERNEL(Name, function)                                                    \
  template <int R, int P>                                                                       \
  struct Name {                                                                                 \
    static void run(int64_t quads, const int8_t* panels, int64_t panel_bytes, const int8_t* x, \
                    int64_t ldx, const Epilogue& e) {                                          \
      function<R, P>(quads, panels, panel_bytes, x, ldx, e);                                   \
    }                                                                                           \
  };

FASTRNN_TILE_KERNEL(Generic, tile_generic)
// At most 4 rows (one panel at a time): plain loops gain nothing from wider tiles.
const Tiles kGenericTiles = make_tiles<Generic>(std::integer_sequence<int, 1, 1, 1, 1>(),
                                                std::make_index_sequence<4>());
#ifdef FASTRNN_INT8_X86
FASTRNN_TILE_KERNEL(Vnni, tile_vnni)
FASTRNN_TILE_KERNEL(Avx2, tile_avx2)
// 32 registers: R * P sums, P panels and a broadcast, with room for the dependency chains of
// vpdpbusd (latency ~4) at one row.
const Tiles kVnniTiles = make_tiles<Vnni>(std::integer_sequence<int, 8, 8, 5, 4, 3, 2, 2, 2>(),
                                          std::make_index_sequence<8>());
// 16 registers: 2 R P sums, 2 P panels, the broadcast, its magnitude, ones and two temporaries.
const Tiles kAvx2Tiles = make_tiles<Avx2>(std::integer_sequence<int, 2, 1, 1, 1>(),
                                          std::make_index_sequence<4>());
#endif

// Panels per chunk: the chunk's weights (at most this many bytes) stay in L2 while every row
// of x passes over them.
constexpr int64_t kChunkBytes = int64_t(256) << 10;

}  // namespace

FASTRNN_CLONES void quantize_rows(const float* x, int64_t rows, int64_t depth, int64_t ldx,
                                  int8_t* q, int64_t ldq, float* scale) {
  const bool offset = int8_isa() == Int8Isa::kVnni;
  for (int64_t b = 0; b < rows; ++b) {
    const float* row = x + b * ldx;
    float largest = 0.0f;
    bool finite = true;
    for (int64_t k = 0; k < depth; ++k) {
      const float magnitude = std::fabs(row[k]);
      largest = magnitude > largest ? magnitude : largest;
      finite = finite && magnitude <= 3.4028235e38f;  // false for NaN and infinities
    }
    const float inverse = largest > 0.0f ? 127.0f / largest : 0.0f;
    const int flip = offset ? 0x80 : 0;  // q + 128 as unsigned bytes: q with its sign bit flipped
    int8_t* out = q + b * ldq;
    for (int64_t k = 0; k < depth; ++k) {
      const float value = std::nearbyint(row[k] * inverse);
      out[k] = static_cast<int8_t>(int(std::min(127.0f, std::max(-127.0f, value))) ^ flip);
    }
    std::fill(out + depth, out + ldq, int8_t(0));
    scale[b] = finite ? largest / 127.0f : NAN;
  }
}

void gemm_int8(int64_t rows, int64_t depth, const int8_t* panels, const float* w_scale,
               const int32_t* w_sum, const int8_t* x, int64_t ldx, const float* x_scale,
               int64_t batch, float* y, int64_t ldy, const float* bias, bool backwards) {
  const Int8Isa isa = int8_isa();
  const Tiles* tiles = &kGenericTiles;
#ifdef FASTRNN_INT8_X86
  if (isa == Int8Isa::kVnni) tiles = &kVnniTiles;
  if (isa == Int8Isa::kAvx2) tiles = &kAvx2Tiles;
#endif
  const int64_t quads = (depth + 3) / 4, panel_bytes = int8_panel_bytes(depth);
  const int64_t total = (rows + kPanelRows - 1) / kPanelRows;
  if (std::all_of(x_scale, x_scale + batch, [](float scale) { return scale == 0.0f; })) {
    // every row of x is zero (a recurrence's first step from a zero state): the sums are 0,
    // and y is what the kernels make of them, without reading the weights
    const int32_t zeros[kPanelRows] = {};
    for (int64_t b = 0; b < batch; ++b) {
      const Epilogue e{y + b * ldy, ldy, rows, w_scale, w_sum, x_scale + b, bias};
      for (int64_t p = 0; p < total; ++p) store_sums(zeros, 0, p, e);
    }
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(panel_bytes, 1));
  const int64_t chunks = (total + chunk - 1) / chunk;
  for (int64_t i = 0; i < chunks; ++i) {
    const int64_t c0 = (backwards ? chunks - 1 - i : i) * chunk, c1 = std::min(total, c0 + chunk);
    for (int64_t b = 0; b < batch;) {
      const int height = int(std::min<int64_t>(tiles->max_rows, batch - b));
      const int wide = tiles->panels[height - 1];
      // panels [p, p + wide) (whole) or p alone
      const auto tile = [&](int64_t p, bool whole) {
        const int64_t n0 = p * kPanelRows;
        const Epilogue e{y + b * ldy + n0, ldy, rows - n0, w_scale + n0, w_sum + n0,
                         x_scale + b, bias == nullptr ? nullptr : bias + n0};
        (whole ? tiles->wide : tiles->narrow)[height - 1](
            quads, panels + p * panel_bytes, panel_bytes, x + b * ldx, ldx, e);
      };
      if (backwards) {
        for (int64_t p = c1; p > c0;) {
          const bool whole = p - wide >= c0;
          p -= whole ? wide : 1;
          tile(p, whole);
        }
      } else {
        for (int64_t p = c0; p < c1;) {
          const bool whole = p + wide <= c1;
          tile(p, whole);
          p += whole ? wide : 1;
        }
      }
      b += height;
    }
  }
}

const char* int8_kernels() {
  switch (int8_isa()) {
    case Int8Isa::kVnni: return "vnni";
    case Int8Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace fastrnn_cpu
