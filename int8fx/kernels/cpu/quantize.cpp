// Row-wise LLM.int8() quantization of the activation X [M, K] in one call (instead of ~15
// torch ops and a host sync), bit-exact with reference.quantize_activation. X is fp32, or
// bf16 / fp16 converted to fp32 as each vector is loaded (exact, as torch's .float()):
//   * outliers are |x| >= threshold compared in fp32 (NaN never is one);
//   * the row scale is the max |x| over the row's non-outlier elements, NaN when the row
//     holds a NaN (torch.amax propagates it);
//   * the inverse scale is torch's `127 / absmax`, which is `absmax.reciprocal() * 127`
//     (two fp32 roundings, not one division), and 0 unless absmax > 0 (so NaN -> 0);
//   * round half to even (the default MXCSR mode, as torch.round), clamp to [-127, 127];
//     a NaN product (NaN * 0, or 0 * inf for a subnormal absmax) becomes 0, which is what
//     torch's float -> int8 conversion gives for NaN.
// This file's row functions use AVX2; quantize_avx512.cpp has faster ones for the CPUs with
// AVX-512, bit-exact with these.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>

#include "kernels.h"

namespace int8fx {

namespace {

// The rows of X per piece of a parallel loop over them. Every loop over X's rows splits them
// alike, so that each thread reads or writes again the rows it has in its own cache.
int64_t row_grain(int64_t K) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)); }

// The same for a loop touching `count` elements of each row (the outlier columns): split as
// the quantization was, unless it touches so few lines that waking another thread costs more
// (about 1.5 us; a line the other core holds about 13 ns: measured on a Xeon, 2 threads).
int64_t outlier_grain(int64_t M, int64_t K, int64_t count) { return M * count < 256 ? std::max<int64_t>(M, 1) : row_grain(K); }

// 8 consecutive elements as fp32: bf16 and fp16 convert exactly (as torch's .float()).
inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const BFloat16Bits* x) {  // bf16 is the top half of an fp32
  const __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
}
inline __m256 load8(const HalfBits* x) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))); }

// Max |x| over the non-outlier elements of a row of K values; marks its outlier columns.
template <class T>
float row_absmax(const T* x, int64_t K, float threshold, bool use_threshold, uint8_t* outlier) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 thr = _mm256_set1_ps(threshold);
  __m256 acc = _mm256_setzero_ps();
  __m256 nan = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 a = _mm256_andnot_ps(sign, load8(x + k));
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    if (use_threshold) {
      const __m256 is_outlier = _mm256_cmp_ps(a, thr, _CMP_GE_OQ);
      int bits = _mm256_movemask_ps(is_outlier);
      if (bits) {
        // Relaxed atomic stores: rows run on several threads and may mark the same column.
        for (int lane = 0; lane < 8; ++lane)
          if (bits >> lane & 1) __atomic_store_n(outlier + k + lane, uint8_t(1), __ATOMIC_RELAXED);
        a = _mm256_andnot_ps(is_outlier, a);
      }
    }
    acc = _mm256_max_ps(acc, a);  // a NaN lane is lost here; `nan` keeps it
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  float absmax = _mm_cvtss_f32(m);
  bool has_nan = _mm256_movemask_ps(nan) != 0;
  for (; k < K; ++k) {
    const float a = std::fabs(to_float(x[k]));
    if (a != a) {
      has_nan = true;
    } else if (use_threshold && a >= threshold) {
      __atomic_store_n(outlier + k, uint8_t(1), __ATOMIC_RELAXED);
    } else {
      absmax = std::max(absmax, a);
    }
  }
  return has_nan ? std::numeric_limits<float>::quiet_NaN() : absmax;
}

inline float quantize_one(float x, float inverse_scale) {
  const float q = std::nearbyint(x * inverse_scale);
  return q != q ? 0.0f : std::min(kInt8Max, std::max(-kInt8Max, q));
}

template <class T>
void quantize_row(const T* x, int64_t K, float absmax, int8_t* out) {
  const float inverse_scale = absmax > 0 ? (1.0f / absmax) * kInt8Max : 0.0f;
  const __m256 scale = _mm256_set1_ps(inverse_scale);
  const __m256 lo = _mm256_set1_ps(-kInt8Max), hi = _mm256_set1_ps(kInt8Max);
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m256i q[4];
    for (int i = 0; i < 4; ++i) {
      __m256 v = _mm256_round_ps(_mm256_mul_ps(load8(x + k + 8 * i), scale),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm256_and_ps(v, _mm256_cmp_ps(v, v, _CMP_ORD_Q));  // NaN -> 0
      q[i] = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, v)));
    }
    // The packs interleave 128-bit lanes; the permute restores element order.
    const __m256i words = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    const __m256i ordered = _mm256_permutevar8x32_epi32(words, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), ordered);
  }
  for (; k < K; ++k) out[k] = int8_t(quantize_one(to_float(x[k]), inverse_scale));
}

// X: [M, K] contiguous (fp32, bf16 or fp16). Writes CA int8 [M, K], SCA fp32 [M] and outlier [K] (1 for
// an outlier column, which must come in zeroed); returns the outlier columns, ascending.
// use_threshold is the caller's `threshold > 0`, decided in double: a tiny threshold may
// round to 0 in fp32 and must still mark every element.
// One pass over the rows: a row is quantized right after its scale is found, while it is
// still in cache (a row scale only depends on its own elements); the outlier columns, known
// once every row is done, are zeroed afterwards.
template <class T>
std::vector<int64_t> quantize_rows(const T* X, int64_t M, int64_t K, bool use_threshold, float threshold, int8_t* CA, float* SCA,
                                   uint8_t* outlier, QuantizerIsa isa) {
  const int64_t grain = row_grain(K);
  at::parallel_for(0, M, grain, [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; ++m) {
      const T* x = X + m * K;
      if (isa == QuantizerIsa::kAvx512) {
        SCA[m] = row_absmax_avx512(x, K, threshold, use_threshold, outlier);
        if (quantize_row_avx512(x, K, SCA[m], CA + m * K)) continue;
      } else {
        SCA[m] = row_absmax(x, K, threshold, use_threshold, outlier);
      }
      quantize_row(x, K, SCA[m], CA + m * K);
    }
  });
  std::vector<int64_t> columns;
  for (int64_t k = 0; k < K; ++k)
    if (outlier[k]) columns.push_back(k);
  if (columns.empty()) return columns;
  // Split as the rows were above: each thread zeroes rows it has just written, in its own
  // cache (one thread zeroing them all fetched half the lines from the other core's cache:
  // 7 outlier columns cost 24 us at M = 512 that way, on a Xeon).
  at::parallel_for(0, M, outlier_grain(M, K, int64_t(columns.size())), [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; ++m)
      for (int64_t k : columns) CA[m * K + k] = 0;
  });
  return columns;
}

}  // namespace

template <class T>
std::vector<int64_t> quantize_activation(const T* X, int64_t M, int64_t K, bool use_threshold, float threshold, int8_t* CA, float* SCA,
                                         QuantizerIsa isa) {
  std::vector<uint8_t> outlier(K, 0);
  return quantize_rows(X, M, K, use_threshold, threshold, CA, SCA, outlier.data(), isa);
}

template <class T>
void gather_outlier_inputs(const T* X, int64_t M, int64_t K, const std::vector<int64_t>& columns, float* out) {
  const int64_t count = int64_t(columns.size());
  if (count == 0) return;
  at::parallel_for(0, M, outlier_grain(M, K, count), [&](int64_t first, int64_t last) {  // split as the quantization was
    for (int64_t m = first; m < last; ++m)
      for (int64_t o = 0; o < count; ++o) out[m * count + o] = to_float(X[m * K + columns[o]]);
  });
}

// The input types of the op: fp32, and bf16 / fp16 read without a converted copy.
template std::vector<int64_t> quantize_activation(const float*, int64_t, int64_t, bool, float, int8_t*, float*, QuantizerIsa);
template std::vector<int64_t> quantize_activation(const BFloat16Bits*, int64_t, int64_t, bool, float, int8_t*, float*, QuantizerIsa);
template std::vector<int64_t> quantize_activation(const HalfBits*, int64_t, int64_t, bool, float, int8_t*, float*, QuantizerIsa);
template void gather_outlier_inputs(const float*, int64_t, int64_t, const std::vector<int64_t>&, float*);
template void gather_outlier_inputs(const BFloat16Bits*, int64_t, int64_t, const std::vector<int64_t>&, float*);
template void gather_outlier_inputs(const HalfBits*, int64_t, int64_t, const std::vector<int64_t>&, float*);

}  // namespace int8fx
