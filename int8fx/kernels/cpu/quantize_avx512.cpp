// quantize.cpp's two row functions with AVX-512, for the CPUs that have it: same results,
// bit for bit (the conventions are listed in quantize.cpp). On a server core the AVX2
// versions are bound by their instruction count, not by memory (7 G elements/s on two
// Xeon cores, 110 us for a 512 x 1536 activation); these do a quarter of the work:
//   * the absmax is taken on the integer bits of |x|: for non-negative floats the integer
//     order is the float order, and every NaN's bits lie above inf's, so one integer max
//     keeps a NaN (a float max would drop it) and no separate NaN test is needed;
//   * four independent accumulators, so the max is not one chain of dependent instructions;
//   * rows whose products can neither be NaN nor leave +-127.5 (a finite, normal absmax)
//     are quantized by multiply, round and a saturating narrowing store, without the clamp
//     and NaN masks; every other row returns false and takes quantize.cpp's exact path.
// Outlier elements may saturate to -128 or 127 here: their columns are zeroed afterwards.

#include <cfloat>
#include <cstdint>
#include <cstring>
#include <limits>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")

namespace int8fx {
namespace {

constexpr int32_t kInfinityBits = 0x7F800000;

// 16 consecutive elements as fp32; with `valid`, only those lanes are read (zeros elsewhere).
inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const float* x, __mmask16 valid) { return _mm512_maskz_loadu_ps(valid, x); }
inline __m512 bf16_to_fp32(__m256i bits) {  // bf16 is the top half of an fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline __m512 load16(const BFloat16Bits* x) { return bf16_to_fp32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))); }
inline __m512 load16(const BFloat16Bits* x, __mmask16 valid) { return bf16_to_fp32(_mm256_maskz_loadu_epi16(valid, x)); }
inline __m512 load16(const HalfBits* x) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))); }
inline __m512 load16(const HalfBits* x, __mmask16 valid) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, x)); }

inline __m512i abs_bits(__m512 x) { return _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFFFFFF)); }

inline __mmask16 lanes_below(int64_t count) { return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1); }

// The lanes of `valid` whose |x| (bits) counts towards the row's absmax: all but the outliers,
// which are marked in `outlier` (|x| >= threshold: bits >= the threshold's bits; NaN, whose
// bits compare above too, never is one).
inline __mmask16 non_outliers(__m512i bits, __m512i threshold, __mmask16 valid, uint8_t* outlier) {
  const __mmask16 large = _mm512_mask_cmpge_epi32_mask(valid, bits, threshold);
  if (!large) return valid;
  const __mmask16 outliers = _mm512_mask_cmple_epi32_mask(large, bits, _mm512_set1_epi32(kInfinityBits));
  // Relaxed atomic stores: rows run on several threads and may mark the same column.
  for (int lane = 0; lane < 16; ++lane)
    if (outliers >> lane & 1) __atomic_store_n(outlier + lane, uint8_t(1), __ATOMIC_RELAXED);
  return valid & ~outliers;
}

int32_t bits_of(float value) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

}  // namespace

namespace {

// The max of the bits of |x| over a row's non-outlier elements (with kUseThreshold: the
// others are marked), in four accumulators.
template <bool kUseThreshold, class T>
int32_t absmax_bits(const T* x, int64_t K, float threshold, uint8_t* outlier) {
  // kUseThreshold: threshold > 0 in double, so its fp32 bits are those of a value >= 0.
  const __m512i limit = _mm512_set1_epi32(bits_of(threshold));
  auto fold = [&](__m512i& acc, __m512 values, __mmask16 valid, int64_t k) {
    const __m512i bits = abs_bits(values);
    const __mmask16 keep = kUseThreshold ? non_outliers(bits, limit, valid, outlier + k) : valid;
    acc = _mm512_mask_max_epi32(acc, keep, acc, bits);
  };
  __m512i acc0 = _mm512_setzero_si512(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    fold(acc0, load16(x + k), 0xFFFF, k);
    fold(acc1, load16(x + k + 16), 0xFFFF, k + 16);
    fold(acc2, load16(x + k + 32), 0xFFFF, k + 32);
    fold(acc3, load16(x + k + 48), 0xFFFF, k + 48);
  }
  for (; k < K; k += 16) {
    const __mmask16 valid = lanes_below(K - k);
    fold(acc0, load16(x + k, valid), valid, k);
  }
  return _mm512_reduce_max_epi32(_mm512_max_epi32(_mm512_max_epi32(acc0, acc1), _mm512_max_epi32(acc2, acc3)));
}

}  // namespace

template <class T>
float row_absmax_avx512(const T* x, int64_t K, float threshold, bool use_threshold, uint8_t* outlier) {
  const int32_t bits = use_threshold ? absmax_bits<true>(x, K, threshold, outlier) : absmax_bits<false>(x, K, threshold, outlier);
  if (bits > kInfinityBits) return std::numeric_limits<float>::quiet_NaN();
  float absmax;
  std::memcpy(&absmax, &bits, sizeof absmax);
  return absmax;
}

template <class T>
bool quantize_row_avx512(const T* x, int64_t K, float absmax, int8_t* out) {
  const float inverse_scale = absmax > 0 ? (1.0f / absmax) * kInt8Max : 0.0f;
  // A finite absmax with a finite inverse: no product is NaN, and a non-outlier's (|x| <= absmax)
  // is at most 127 * (1 + 3 * 2^-24) in magnitude, so it rounds into [-127, 127] unclamped.
  if (!(absmax <= FLT_MAX && inverse_scale > 0 && inverse_scale <= FLT_MAX)) return false;
  const __m512 scale = _mm512_set1_ps(inverse_scale);
  auto quantize = [&](__m512 values) {
    return _mm512_cvt_roundps_epi32(_mm512_mul_ps(values, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  };
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm512_cvtsepi32_epi8(quantize(load16(x + k))));
  if (k < K) {
    const __mmask16 valid = lanes_below(K - k);
    _mm512_mask_cvtsepi32_storeu_epi8(out + k, valid, quantize(load16(x + k, valid)));
  }
  return true;
}

template float row_absmax_avx512(const float*, int64_t, float, bool, uint8_t*);
template float row_absmax_avx512(const BFloat16Bits*, int64_t, float, bool, uint8_t*);
template float row_absmax_avx512(const HalfBits*, int64_t, float, bool, uint8_t*);
template bool quantize_row_avx512(const float*, int64_t, float, int8_t*);
template bool quantize_row_avx512(const BFloat16Bits*, int64_t, float, int8_t*);
template bool quantize_row_avx512(const HalfBits*, int64_t, float, int8_t*);

}  // namespace int8fx
#pragma GCC pop_options
