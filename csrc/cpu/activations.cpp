// The cells' activations over arrays (activations.h).
//
// sigmoid(x) = 1 / (1 + exp(-x)) with exp computed as SLEEF's expf_u10 computes it, operation for
// operation (Cody-Waite reduction by ln 2 in two parts, a degree-6 polynomial, scaling by 2^q in
// two halves, 0 below -104 and infinity above 100), and an IEEE division: what torch.sigmoid
// runs on AVX-512 and AVX2 CPUs, so the two agree bit for bit.
//
// tanh(x) in float with a final error below ~0.6 ulp (below ~0.1 ulp before rounding, so that it
// is within 1 ulp of torch.tanh, MKL's or SLEEF's, each within 1 ulp of the exact value), and
// 1.0 only from |x| = 9.0108 on, as torch's. For a = |x| below 3.9375 the addition formula
// tanh(a) = (T + t) / (1 + T t) with T = tanh(k/8) from a table (k = round(8 a), as float hi + lo
// parts) and t = tanh(a - k/8) from its odd series to d^5 (|d| = |a - k/8| <= 1/16: the d^7 term
// is 3e-9 of t); the quotient is corrected by its exact remainder (an FMA), so that only the last
// addition rounds. Above it 1 - 2e / (1 + e) with e = exp(-2a) < 3.8e-4 (1 / (1 + e) as its
// series): exp's error reaches the result scaled by 2e / (1 - e^2) < 1e-3. The sign is x's; NaN
// stays NaN.
//
// Double precision and CPUs without AVX2/FMA use the C library (tanh in double for float too).

#include "activations.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <string>

#include "packed_gemm.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTRNN_VECTOR_ACTIVATIONS 1
#endif

namespace fastrnn_cpu {
namespace {

enum class Kernels { kAvx512, kAvx2, kLibm };

Kernels kernels() {
  static const Kernels chosen = avx512_kernels()            ? Kernels::kAvx512
                                : packed_gemm_supported()   ? Kernels::kAvx2
                                                            : Kernels::kLibm;
  return chosen;
}

// SLEEF's expf_u10 constants.
constexpr float kLog2E = 1.442695040888963407359924681001892137426645954152985934135449406931f;
constexpr float kLn2Upper = 0.693145751953125f;
constexpr float kLn2Lower = 1.428606765330187045e-06f;
constexpr float kExpPoly[6] = {0.000198527617612853646278381f, 0.00139304355252534151077271f,
                               0.00833336077630519866943359f, 0.0416664853692054748535156f,
                               0.166666671633720397949219f, 0.5f};

// tanh(k / 8) for k = 0 .. 31, as float hi + lo parts.
alignas(64) constexpr float kTanhTableHi[32] = {
    0.0f, 0.12435299903154373f, 0.24491865932941437f, 0.35835739970207214f,
    0.46211716532707214f, 0.5545997023582458f, 0.6351489424705505f, 0.7039055824279785f,
    0.7615941762924194f, 0.8093010783195496f, 0.8482836484909058f, 0.8798267245292664f,
    0.9051482677459717f, 0.9253461956977844f, 0.9413755536079407f, 0.9540452361106873f,
    0.9640275835990906f, 0.9718727469444275f, 0.9780260920524597f, 0.9828450083732605f,
    0.9866142868995667f, 0.9895597696304321f, 0.9918597340583801f, 0.9936546087265015f,
    0.9950547814369202f, 0.996146559715271f, 0.9969976544380188f, 0.9976609945297241f,
    0.9981778860092163f, 0.9985806345939636f, 0.998894453048706f, 0.9991388916969299f,
};
alignas(64) constexpr float kTanhTableLo[32] = {
    0.0f, 2.740052407190774e-09f, 3.074294818716794e-09f, -1.3512861940512266e-09f,
    -8.067062573502426e-09f, 1.9991135857821973e-08f, 9.916736765092082e-09f, 2.150864197858482e-08f,
    -2.0336655026653716e-08f, -8.117768679483106e-09f, -8.5333926591602e-09f, -2.487728245625931e-08f,
    -1.4101105172414918e-08f, 2.961395750844531e-08f, -1.5110654061345485e-08f, 2.406926213893712e-08f,
    -3.5232736728119107e-09f, -1.030918461708552e-09f, 2.268635412860931e-08f, 2.0799316047259708e-08f,
    1.1251863440975285e-08f, -2.1017548590407387e-08f, -9.490172203641123e-09f, 2.558852862932781e-08f,
    -2.7750189701691852e-08f, -2.9041926197237444e-08f, -1.8951492819496707e-08f, -1.5059834268527084e-08f,
    1.1601982485842655e-08f, 2.4607835769074882e-08f, -1.0322553478658847e-08f, -5.859579044198426e-09f,
};
constexpr float kTanhTableEnd = 3.9375f;  // 31.5 / 8: the table serves |x| below it

#ifdef FASTRNN_VECTOR_ACTIVATIONS
#define FASTRNN_AVX512_FN __attribute__((target("avx512f"), always_inline)) inline
#define FASTRNN_AVX2_FN __attribute__((target("avx2,fma"), always_inline)) inline

// ---- AVX-512, 16 floats --------------------------------------------------------------------

FASTRNN_AVX512_FN __m512 exp16(__m512 d) {
  const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(d, _mm512_set1_ps(kLog2E)));
  const __m512 qf = _mm512_cvtepi32_ps(q);
  __m512 s = _mm512_fmadd_ps(qf, _mm512_set1_ps(-kLn2Upper), d);
  s = _mm512_fmadd_ps(qf, _mm512_set1_ps(-kLn2Lower), s);
  __m512 u = _mm512_set1_ps(kExpPoly[0]);
  for (int k = 1; k < 6; ++k) u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(kExpPoly[k]));
  u = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(_mm512_mul_ps(s, s), u, s));
  // u * 2^q in two halves (SLEEF's vldexp2), so that q past the exponent range stays exact
  const __m512i half = _mm512_srai_epi32(q, 1);
  const __m512 scale1 = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_add_epi32(half, _mm512_set1_epi32(127)), 23));
  const __m512 scale2 = _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_add_epi32(_mm512_sub_epi32(q, half), _mm512_set1_epi32(127)), 23));
  u = _mm512_mul_ps(_mm512_mul_ps(u, scale1), scale2);
  u = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(d, _mm512_set1_ps(-104.0f), _CMP_NLT_US), u);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_set1_ps(100.0f), d, _CMP_LT_OQ), u,
                              _mm512_set1_ps(INFINITY));
}

FASTRNN_AVX512_FN __m512 sigmoid16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

// tanh(a) from the table, for a in [0, kTanhTableEnd) (see the file's comment).
FASTRNN_AVX512_FN __m512 tanh_table16(__m512 a) {
  const __m512 kf = _mm512_roundscale_ps(_mm512_mul_ps(a, _mm512_set1_ps(8.0f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512i k = _mm512_min_epi32(_mm512_cvttps_epi32(kf), _mm512_set1_epi32(31));
  const __m512 d = _mm512_fnmadd_ps(kf, _mm512_set1_ps(0.125f), a);  // exact
  const __m512 hi = _mm512_permutex2var_ps(_mm512_load_ps(kTanhTableHi), k,
                                           _mm512_load_ps(kTanhTableHi + 16));
  const __m512 lo = _mm512_permutex2var_ps(_mm512_load_ps(kTanhTableLo), k,
                                           _mm512_load_ps(kTanhTableLo + 16));
  const __m512 d2 = _mm512_mul_ps(d, d);
  const __m512 series = _mm512_fmadd_ps(d2, _mm512_set1_ps(2.0f / 15.0f),
                                        _mm512_set1_ps(-1.0f / 3.0f));
  const __m512 t = _mm512_fmadd_ps(_mm512_mul_ps(d, d2), series, d);  // tanh(d)
  // numerator hi + t + lo: the sum and its exact rounding error (|hi| >= |t| where hi is not 0)
  const __m512 sum = _mm512_add_ps(hi, t);
  const __m512 numerator_low = _mm512_add_ps(_mm512_add_ps(_mm512_sub_ps(hi, sum), t), lo);
  // denominator 1 + hi t, and what its rounding dropped (with the lo t term)
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 denominator = _mm512_fmadd_ps(hi, t, one);
  const __m512 denominator_low = _mm512_fmadd_ps(
      lo, t, _mm512_fmadd_ps(hi, t, _mm512_sub_ps(one, denominator)));
  // q ~ sum / denominator to 2^-28; its remainder, exact by FMA, corrects it, divided by 2 - den
  // for den (within 6% of 1: 0.4% of a correction of ~1 ulp)
  __m512 reciprocal = _mm512_rcp14_ps(denominator);
  reciprocal = _mm512_mul_ps(reciprocal, _mm512_fnmadd_ps(denominator, reciprocal,
                                                          _mm512_set1_ps(2.0f)));
  const __m512 q = _mm512_mul_ps(sum, reciprocal);
  const __m512 remainder = _mm512_fnmadd_ps(q, denominator, sum);
  const __m512 correction = _mm512_fnmadd_ps(q, denominator_low,
                                             _mm512_add_ps(remainder, numerator_low));
  return _mm512_fmadd_ps(correction, _mm512_sub_ps(_mm512_set1_ps(2.0f), denominator), q);
}

// tanh(a) = 1 - 2e / (1 + e), e = exp(-2a), for a >= kTanhTableEnd (inf gives 1, NaN NaN).
FASTRNN_AVX512_FN __m512 tanh_tail16(__m512 a) {
  const __m512 e = exp16(_mm512_mul_ps(a, _mm512_set1_ps(-2.0f)));
  const __m512 one = _mm512_set1_ps(1.0f);
  // 1 / (1 + e) = 1 - e + e^2 (e^3 < 6e-11)
  const __m512 inverse = _mm512_fnmadd_ps(e, _mm512_sub_ps(one, e), one);
  return _mm512_fnmadd_ps(_mm512_add_ps(e, e), inverse, one);
}

FASTRNN_AVX512_FN __m512 tanh16(__m512 x) {
  const __m512 a = _mm512_abs_ps(x);
  const __mmask16 table = _mm512_cmp_ps_mask(a, _mm512_set1_ps(kTanhTableEnd), _CMP_LT_OQ);
  __m512 magnitude;  // each part only where a lane needs it (most lanes of a cell are in one)
  if (table == 0xFFFF) {
    magnitude = tanh_table16(a);
  } else if (table == 0) {
    magnitude = tanh_tail16(a);
  } else {
    magnitude = _mm512_mask_blend_ps(table, tanh_tail16(a), tanh_table16(a));
  }
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT_MIN));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(magnitude), sign));
}

// Which lanes of the 16 at x[j] are in x[0 .. n).
FASTRNN_AVX512_FN __mmask16 lanes16(int64_t j, int64_t n) {
  return n - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - j)) - 1);
}

// ---- AVX2 with FMA, 8 floats: the same functions -------------------------------------------

FASTRNN_AVX2_FN __m256 exp8(__m256 d) {
  const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(d, _mm256_set1_ps(kLog2E)));
  const __m256 qf = _mm256_cvtepi32_ps(q);
  __m256 s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-kLn2Upper), d);
  s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-kLn2Lower), s);
  __m256 u = _mm256_set1_ps(kExpPoly[0]);
  for (int k = 1; k < 6; ++k) u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(kExpPoly[k]));
  u = _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_mul_ps(s, s), u, s));
  const __m256i half = _mm256_srai_epi32(q, 1);
  const __m256 scale1 = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(half, _mm256_set1_epi32(127)), 23));
  const __m256 scale2 = _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_add_epi32(_mm256_sub_epi32(q, half), _mm256_set1_epi32(127)), 23));
  u = _mm256_mul_ps(_mm256_mul_ps(u, scale1), scale2);
  u = _mm256_and_ps(_mm256_cmp_ps(d, _mm256_set1_ps(-104.0f), _CMP_NLT_US), u);
  return _mm256_blendv_ps(u, _mm256_set1_ps(INFINITY),
                          _mm256_cmp_ps(_mm256_set1_ps(100.0f), d, _CMP_LT_OQ));
}

FASTRNN_AVX2_FN __m256 sigmoid8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

// table[k] for k in [0, 31]: four 8-entry permutes, picked by bits 3 and 4 of k.
FASTRNN_AVX2_FN __m256 table_lookup8(const float* table, __m256i k) {
  const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(k, 28));  // in the sign bit
  const __m256 low = _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_load_ps(table), k),
                                      _mm256_permutevar8x32_ps(_mm256_load_ps(table + 8), k),
                                      bit3);
  const __m256 high = _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_load_ps(table + 16), k),
                                       _mm256_permutevar8x32_ps(_mm256_load_ps(table + 24), k),
                                       bit3);
  return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(k, 27)));
}

FASTRNN_AVX2_FN __m256 tanh_table8(__m256 a) {  // as tanh_table16
  const __m256 kf = _mm256_round_ps(_mm256_mul_ps(a, _mm256_set1_ps(8.0f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i k = _mm256_min_epi32(_mm256_cvttps_epi32(kf), _mm256_set1_epi32(31));
  const __m256 d = _mm256_fnmadd_ps(kf, _mm256_set1_ps(0.125f), a);
  const __m256 hi = table_lookup8(kTanhTableHi, k);
  const __m256 lo = table_lookup8(kTanhTableLo, k);
  const __m256 d2 = _mm256_mul_ps(d, d);
  const __m256 series = _mm256_fmadd_ps(d2, _mm256_set1_ps(2.0f / 15.0f),
                                        _mm256_set1_ps(-1.0f / 3.0f));
  const __m256 t = _mm256_fmadd_ps(_mm256_mul_ps(d, d2), series, d);
  const __m256 sum = _mm256_add_ps(hi, t);
  const __m256 numerator_low = _mm256_add_ps(_mm256_add_ps(_mm256_sub_ps(hi, sum), t), lo);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 denominator = _mm256_fmadd_ps(hi, t, one);
  const __m256 denominator_low = _mm256_fmadd_ps(
      lo, t, _mm256_fmadd_ps(hi, t, _mm256_sub_ps(one, denominator)));
  __m256 reciprocal = _mm256_rcp_ps(denominator);  // 12 bits: two Newton-Raphson steps
  for (int k = 0; k < 2; ++k) {
    reciprocal = _mm256_mul_ps(reciprocal, _mm256_fnmadd_ps(denominator, reciprocal,
                                                            _mm256_set1_ps(2.0f)));
  }
  const __m256 q = _mm256_mul_ps(sum, reciprocal);
  const __m256 remainder = _mm256_fnmadd_ps(q, denominator, sum);
  const __m256 correction = _mm256_fnmadd_ps(q, denominator_low,
                                             _mm256_add_ps(remainder, numerator_low));
  return _mm256_fmadd_ps(correction, _mm256_sub_ps(_mm256_set1_ps(2.0f), denominator), q);
}

FASTRNN_AVX2_FN __m256 tanh_tail8(__m256 a) {  // as tanh_tail16
  const __m256 e = exp8(_mm256_mul_ps(a, _mm256_set1_ps(-2.0f)));
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 inverse = _mm256_fnmadd_ps(e, _mm256_sub_ps(one, e), one);
  return _mm256_fnmadd_ps(_mm256_add_ps(e, e), inverse, one);
}

FASTRNN_AVX2_FN __m256 tanh8(__m256 x) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  const __m256 a = _mm256_andnot_ps(sign_bit, x);
  const __m256 table = _mm256_cmp_ps(a, _mm256_set1_ps(kTanhTableEnd), _CMP_LT_OQ);
  const int lanes = _mm256_movemask_ps(table);  // as in tanh16
  __m256 magnitude;
  if (lanes == 0xFF) {
    magnitude = tanh_table8(a);
  } else if (lanes == 0) {
    magnitude = tanh_tail8(a);
  } else {
    magnitude = _mm256_blendv_ps(tanh_tail8(a), tanh_table8(a), table);
  }
  return _mm256_or_ps(magnitude, _mm256_and_ps(x, sign_bit));
}

// f over x[0 .. n) in vectors of 8, the tail through a zero-padded copy.
#define FASTRNN_MAP8(f, x, n)                                                            \
  do {                                                                                   \
    int64_t j = 0;                                                                       \
    for (; j + 8 <= (n); j += 8) _mm256_storeu_ps((x) + j, f(_mm256_loadu_ps((x) + j)));  \
    if (j < (n)) {                                                                       \
      alignas(32) float tail[8] = {};                                                    \
      std::copy((x) + j, (x) + (n), tail);                                               \
      _mm256_store_ps(tail, f(_mm256_load_ps(tail)));                                    \
      std::copy(tail, tail + ((n) - j), (x) + j);                                        \
    }                                                                                    \
  } while (false)

__attribute__((target("avx512f"))) void sigmoid_avx512(float* x, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = lanes16(j, n);
    _mm512_mask_storeu_ps(x + j, m, sigmoid16(_mm512_maskz_loadu_ps(m, x + j)));
  }
}

__attribute__((target("avx512f"))) void tanh_avx512(float* x, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = lanes16(j, n);
    _mm512_mask_storeu_ps(x + j, m, tanh16(_mm512_maskz_loadu_ps(m, x + j)));
  }
}

__attribute__((target("avx2,fma"))) void sigmoid_avx2(float* x, int64_t n) {
  FASTRNN_MAP8(sigmoid8, x, n);
}

__attribute__((target("avx2,fma"))) void tanh_avx2(float* x, int64_t n) {
  FASTRNN_MAP8(tanh8, x, n);
}
#endif  // FASTRNN_VECTOR_ACTIVATIONS

template <typename T>
void sigmoid_libm(T* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = T(1) / (T(1) + std::exp(-x[j]));
}

// tanh in double rounded to T: for float within 1 ulp of torch.tanh (the C library's tanhf is
// not always)
template <typename T>
void tanh_libm(T* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = static_cast<T>(std::tanh(static_cast<double>(x[j])));
}

}  // namespace

void sigmoid_inplace(float* x, int64_t n) {
#ifdef FASTRNN_VECTOR_ACTIVATIONS
  switch (kernels()) {
    case Kernels::kAvx512: return sigmoid_avx512(x, n);
    case Kernels::kAvx2: return sigmoid_avx2(x, n);
    case Kernels::kLibm: break;
  }
#endif
  sigmoid_libm(x, n);
}

void tanh_inplace(float* x, int64_t n) {
#ifdef FASTRNN_VECTOR_ACTIVATIONS
  switch (kernels()) {
    case Kernels::kAvx512: return tanh_avx512(x, n);
    case Kernels::kAvx2: return tanh_avx2(x, n);
    case Kernels::kLibm: break;
  }
#endif
  tanh_libm(x, n);
}

void sigmoid_inplace(double* x, int64_t n) { sigmoid_libm(x, n); }
void tanh_inplace(double* x, int64_t n) { tanh_libm(x, n); }

const char* activation_kernels() {
  switch (kernels()) {
    case Kernels::kAvx512: return "avx512";
    case Kernels::kAvx2: return "avx2";
    case Kernels::kLibm: break;
  }
  return "libm";
}

}  // namespace fastrnn_cpu

// The activations from Python, for the tests: activation(x, "sigmoid" | "tanh") on a copy of a
// float32 or float64 tensor; activation_kernels() says which functions run.
TORCH_LIBRARY_FRAGMENT(fastrnn_cpu, m) {
  m.def("activation(Tensor x, str name) -> Tensor");
  m.def("activation_kernels() -> str",
        [] { return std::string(fastrnn_cpu::activation_kernels()); });
}

TORCH_LIBRARY_IMPL(fastrnn_cpu, CPU, m) {
  m.impl("activation", [](const at::Tensor& x, c10::string_view name) {
    TORCH_CHECK(name == "sigmoid" || name == "tanh", "fastrnn cpu: unknown activation ", name);
    at::Tensor result = x.contiguous().clone();
    const bool sigmoid = name == "sigmoid";
    AT_DISPATCH_FLOATING_TYPES(result.scalar_type(), "activation", [&] {
      scalar_t* data = result.data_ptr<scalar_t>();
      if (sigmoid) {
        fastrnn_cpu::sigmoid_inplace(data, result.numel());
      } else {
        fastrnn_cpu::tanh_inplace(data, result.numel());
      }
    });
    return result;
  });
}
