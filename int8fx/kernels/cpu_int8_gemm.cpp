// Exact int8 GEMM for AVX2 CPUs without VNNI: C[M, N] = A[M, K] @ B[N, K]^T in int32.
//
// A and B are row-major with K contiguous (the layouts of CA and CB), so every output
// is a dot product of two contiguous rows. The multiply is AVX2's vpmaddubsw, which
// takes one unsigned and one signed int8 operand and adds adjacent products into a
// *saturating* int16. To keep it exact we feed it |a| (unsigned) and b * sign(a): a
// pair sum is then at most 2 * 128 * 127 = 32512 < 32767 as long as b != -128 (A may
// hold any int8). vpmaddwd with ones then widens the pairs to int32.
//
// Blocking: a tile of MR rows of A against NR rows of B keeps MR * NR int32x8
// accumulators in registers (16 ymm registers on AVX2), reduced horizontally at the end.
// The work is split into tasks, (a chunk of rows of A) x (a block of rows of B sized to
// stay in L2), shared by torch's threads; with few rows of A (decode) the weight is
// instead split evenly between the threads. The tiles hand their results to a store functor:
// int32 for the bare GEMM, dequantization + outlier part + bias for the fused linear.
//
// Built by cpu_int8_gemm.py, alone for ctypes (the GEMM and the activation quantization)
// and with cpu_int8_linear_op.cpp as int8fx::int8_linear's CPU kernel. Only
// ATen/Parallel.h is included, which keeps this file's compile to a few seconds.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include <ATen/Parallel.h>

#include "cpu_int8_kernels.h"

namespace {

constexpr int64_t kL2BlockBytes = 256 * 1024;  // half of a 512 KiB L2: room for rows of A
constexpr int64_t kMinStreamBytes = 64 * 1024;  // few rows of A: the least weight worth a thread
constexpr int64_t kStreamingRows = 16;  // below this many rows of A, the weight is streamed once
constexpr int64_t kRowsPerTask = 64;  // rows of A per task (a multiple of the 2-row tile): 64 x K bytes in L2

inline __m256i load32(const int8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

inline int32_t horizontal_sum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Where a tile's finished dot products go (`count` consecutive outputs of row m from
// column n): the int32 GEMM stores them, the fused linear dequantizes them in the same
// step (no int32 [M, N] round trip through memory).
struct StoreInt32 {
  int32_t* C;
  int64_t ldc;
  void operator()(int64_t m, int64_t n, const int32_t* values, int count) const {
    std::copy(values, values + count, C + m * ldc + n);
  }
};

// out[m, n] = (float(c) * (SCA[m] * SCB[n])) / 127^2, one fp32 rounding per step in the
// order of reference.dequantize_output (torch divides by the scalar, it does not multiply
// by its reciprocal); four lanes at a time, each lane rounding exactly as the scalar tail.
// When add_outliers, out already holds the outlier part Y16 and the sum is Y8 + Y16; the
// bias, when given, is added last: (Y8 + Y16) + b as in the reference.
struct StoreDequantized {
  float* out;
  int64_t ldc;
  const float* SCA;
  const float* SCB;
  const float* bias;  // may be null
  bool add_outliers;
  void operator()(int64_t m, int64_t n, const int32_t* values, int count) const {
    float* o = out + m * ldc + n;
    const float* scb = SCB + n;
    const float* b = bias ? bias + n : nullptr;
    const __m128 sa = _mm_set1_ps(SCA[m]), divisor = _mm_set1_ps(16129.0f);
    int j = 0;
    for (; j + 4 <= count; j += 4) {
      const __m128 value = _mm_cvtepi32_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(values + j)));
      __m128 y = _mm_div_ps(_mm_mul_ps(value, _mm_mul_ps(sa, _mm_loadu_ps(scb + j))), divisor);
      if (add_outliers) y = _mm_add_ps(y, _mm_loadu_ps(o + j));
      if (b) y = _mm_add_ps(y, _mm_loadu_ps(b + j));
      _mm_storeu_ps(o + j, y);
    }
    for (; j < count; ++j) {
      float y = float(values[j]) * (SCA[m] * scb[j]) / 16129.0f;
      if (add_outliers) y = y + o[j];
      if (b) y = y + b[j];
      o[j] = y;
    }
  }
};

// Rows m..m+MR of A against rows n..n+NR of B (rows are K apart), each result to store.
template <int MR, int NR, class Store>
void tile(const int8_t* A, const int8_t* B, int64_t K, int64_t m, int64_t n, const Store& store) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* a_rows = A + m * K;
  const int8_t* b_rows = B + n * K;
  __m256i acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
  // A single row of A (decode) streams the weight from memory: rows of B are short
  // (K bytes) and the hardware prefetcher does not ramp up on them, so fetch the next
  // tile's rows (the NR * K bytes after these) while this one computes.
  const char* next_tile = reinterpret_cast<const char*>(b_rows + NR * K);
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if (MR == 1) {
      for (int line = 0; line < NR * 32; line += 64) _mm_prefetch(next_tile + k * NR + line, _MM_HINT_T0);
    }
    __m256i a[MR], a_abs[MR];
    for (int i = 0; i < MR; ++i) {
      a[i] = load32(a_rows + i * K + k);
      a_abs[i] = _mm256_sign_epi8(a[i], a[i]);
    }
    for (int j = 0; j < NR; ++j) {
      const __m256i b = load32(b_rows + j * K + k);
      for (int i = 0; i < MR; ++i) {
        const __m256i pairs = _mm256_maddubs_epi16(a_abs[i], _mm256_sign_epi8(b, a[i]));
        acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    int32_t sums[NR];
    for (int j = 0; j < NR; ++j) {
      sums[j] = horizontal_sum(acc[i][j]);
      for (int64_t t = k; t < K; ++t) sums[j] += int32_t(a_rows[i * K + t]) * int32_t(b_rows[j * K + t]);
    }
    store(m + i, n, sums, NR);
  }
}

// Rows [m0, m1) of A against rows [n0, n1) of B. The NR rows of B in flight stay in L1
// while the rows of A pass over them; ragged edges take thinner tiles.
template <int MR, int NR, class Store>
void sweep(const int8_t* A, const int8_t* B, int64_t K, int64_t m0, int64_t m1, int64_t n0, int64_t n1, const Store& store) {
  for (int64_t n = n0; n < n1; n += NR) {
    const int64_t nr = std::min<int64_t>(NR, n1 - n);
    int64_t m = m0;
    for (; m + MR <= m1; m += MR) {
      if (nr == NR) {
        tile<MR, NR>(A, B, K, m, n, store);
      } else {
        for (int64_t j = 0; j < nr; ++j) tile<MR, 1>(A, B, K, m, n + j, store);
      }
    }
    for (; m < m1; ++m) {
      if (nr == NR) {
        tile<1, NR>(A, B, K, m, n, store);
      } else {
        for (int64_t j = 0; j < nr; ++j) tile<1, 1>(A, B, K, m, n + j, store);
      }
    }
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The work is split into tasks of (rows of A) x (a block of rows of B), numbered so that
// consecutive tasks share rows of A: torch's thread pool hands each thread a contiguous
// range of tasks, and every thread then gets a similar mix of (possibly uneven) blocks.
template <int MR, int NR, class Store>
void gemm(const int8_t* A, const int8_t* B, int64_t M, int64_t N, int64_t K, const Store& store) {
  if (M == 0 || N == 0) return;
  const int64_t threads = at::get_num_threads();
  int64_t n_blocks, m_chunk;
  if (M < kStreamingRows) {
    // Each row of B is used by few rows of A: the weight streams from memory once, so split
    // it evenly between the threads, in blocks big enough to pay for waking a thread.
    n_blocks = std::max<int64_t>(1, std::min(threads, N * K / kMinStreamBytes));
    m_chunk = M;
  } else {
    // Blocks of B rows that stay in L2 while a chunk of A rows passes over them.
    n_blocks = std::max<int64_t>(1, ceil_div(N * K, kL2BlockBytes));
    m_chunk = kRowsPerTask;
  }
  const int64_t n_block = ceil_div(ceil_div(N, n_blocks), NR) * NR;
  n_blocks = ceil_div(N, n_block);
  const int64_t m_chunks = std::max<int64_t>(1, ceil_div(M, m_chunk));
  at::parallel_for(0, m_chunks * n_blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t m0 = task / n_blocks * m_chunk, n0 = task % n_blocks * n_block;
      sweep<MR, NR>(A, B, K, m0, std::min(M, m0 + m_chunk), n0, std::min(N, n0 + n_block), store);
    }
  });
}

// Tile shapes measured on a 2-core EPYC (Zen 3): 1 x 8 streams the weight at M = 1
// (one thread, hot cache: about 22 GB/s). For M > 1, with both threads at M = 512 on
// SmolLM2's shapes and 4096 x 4096, 2 x 6 was as fast as or up to 9% faster than the
// best of 2 x 4, 4 x 2, 3 x 4 and 4 x 3 in two runs, although its 12 accumulators, a and
// |a| for two rows, b and ones do not all fit the 16 ymm registers.
template <class Store>
void dispatch_gemm(const int8_t* A, const int8_t* B, int64_t M, int64_t N, int64_t K, const Store& store) {
  if (M == 1) {
    gemm<1, 8>(A, B, M, N, K, store);
  } else {
    gemm<2, 6>(A, B, M, N, K, store);
  }
}

}  // namespace

// A: int8 [M, K], B: int8 [N, K] with no -128, C: int32 [M, N]; all contiguous.
extern "C" void int8fx_int8_gemm(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K) {
  dispatch_gemm(A, B, M, N, K, StoreInt32{C, N});
}

// ---------------------------------------------------------------- activation quantization
//
// Row-wise LLM.int8() quantization of X [M, K] fp32 (cpu_int8_linear.quantize_activation
// in one call instead of ~15 torch ops and a host sync), bit-exact with
// reference.quantize_activation:
//   * outliers are |x| >= threshold compared in fp32 (NaN never is one);
//   * the row scale is the max |x| over the row's non-outlier elements, NaN when the row
//     holds a NaN (torch.amax propagates it);
//   * the inverse scale is torch's `127 / absmax`, which is `absmax.reciprocal() * 127`
//     (two fp32 roundings, not one division), and 0 unless absmax > 0 (so NaN -> 0);
//   * round half to even (the default MXCSR mode, as torch.round), clamp to [-127, 127];
//     a NaN product (NaN * 0, or 0 * inf for a subnormal absmax) becomes 0, which is what
//     torch's float -> int8 conversion gives for NaN.
// Two passes over X: scales and outlier columns, then the quantized values.

namespace {

// Max |x| over the non-outlier elements of a row of K floats; marks its outlier columns.
float row_absmax(const float* x, int64_t K, float threshold, bool use_threshold, uint8_t* outlier) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 thr = _mm256_set1_ps(threshold);
  __m256 acc = _mm256_setzero_ps();
  __m256 nan = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k));
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
    const float a = std::fabs(x[k]);
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
  return q != q ? 0.0f : std::min(127.0f, std::max(-127.0f, q));
}

void quantize_row(const float* x, int64_t K, float absmax, int8_t* out) {
  const float inverse_scale = absmax > 0 ? (1.0f / absmax) * 127.0f : 0.0f;
  const __m256 scale = _mm256_set1_ps(inverse_scale);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m256i q[4];
    for (int i = 0; i < 4; ++i) {
      __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8 * i), scale),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm256_and_ps(v, _mm256_cmp_ps(v, v, _CMP_ORD_Q));  // NaN -> 0
      q[i] = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, v)));
    }
    // The packs interleave 128-bit lanes; the permute restores element order.
    const __m256i words = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    const __m256i ordered = _mm256_permutevar8x32_epi32(words, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), ordered);
  }
  for (; k < K; ++k) out[k] = int8_t(quantize_one(x[k], inverse_scale));
}

// X: fp32 [M, K] contiguous. Writes CA int8 [M, K], SCA fp32 [M] and outlier [K] (1 for
// an outlier column, which must come in zeroed); returns the outlier columns, ascending.
// use_threshold is the caller's `threshold > 0`, decided in double: a tiny threshold may
// round to 0 in fp32 and must still mark every element.
std::vector<int64_t> quantize_rows(const float* X, int64_t M, int64_t K, bool use_threshold, float threshold,
                                   int8_t* CA, float* SCA, uint8_t* outlier) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  at::parallel_for(0, M, grain, [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; ++m) SCA[m] = row_absmax(X + m * K, K, threshold, use_threshold, outlier);
  });
  std::vector<int64_t> columns;
  for (int64_t k = 0; k < K; ++k)
    if (outlier[k]) columns.push_back(k);
  at::parallel_for(0, M, grain, [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; ++m) {
      quantize_row(X + m * K, K, SCA[m], CA + m * K);
      for (int64_t k : columns) CA[m * K + k] = 0;
    }
  });
  return columns;
}

}  // namespace

// quantize_activation for Python (cpu_int8_gemm.quantize_rows); returns the number of outlier columns.
extern "C" int64_t int8fx_quantize_rows(const float* X, int64_t M, int64_t K, int32_t use_threshold,
                                        float threshold, int8_t* CA, float* SCA, uint8_t* outlier) {
  return int64_t(quantize_rows(X, M, K, use_threshold != 0, threshold, CA, SCA, outlier).size());
}

// ---------------------------------------------------------------- the fused linear
//
// reference.int8_linear in three steps for an fp32 X (cpu_int8_kernels.h): quantize the
// rows, the fp outlier part into the output, then the int8 GEMM whose tiles dequantize
// and add the outlier part and the bias as they finish. cpu_int8_linear_op.cpp chains
// them as int8fx::int8_linear's CPU kernel, so a compiled graph calls it with no Python
// in between: per-call overhead is most of the cost of a small layer at decode (M = 1).

namespace {

inline float to_float(float w) { return w; }
inline float to_float(int8fx::BFloat16Bits w) {  // bf16 is the top half of an fp32
  const uint32_t bits = uint32_t(w.bits) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}
inline float to_float(int8fx::HalfBits w) { return _cvtsh_ss(w.bits); }

// out[M, N] = X[:, columns] @ Wc^T in fp32, columns in ascending order, where Wc holds the
// outlier columns of the fp weight W (element [n, k] at W[n * w_row + k * w_col]) or,
// when W is null, of CB dequantized as reference.dequantize_rows does: CB * (SCB / 127).
// Column by column, vectorized over N: wide outlier sets (a tiny threshold) are slower
// than a BLAS matmul would be, but real activations have a handful of outlier columns.
template <class T>
void outlier_part_of(const float* X, int64_t M, int64_t K, const std::vector<int64_t>& columns, const T* W,
                  int64_t w_row, int64_t w_col, const int8_t* CB, const float* SCB, int64_t N, float* out) {
  const int64_t count = int64_t(columns.size());
  // The columns transposed to [count, N], so each outlier adds one contiguous row.
  std::unique_ptr<float[]> columns_t(new float[count * N]);
  at::parallel_for(0, N, 256, [&](int64_t first, int64_t last) {
    for (int64_t n = first; n < last; ++n) {
      const float dequantize = SCB[n] / 127.0f;
      for (int64_t o = 0; o < count; ++o)
        columns_t[o * N + n] = W ? to_float(W[n * w_row + columns[o] * w_col]) : float(CB[n * K + columns[o]]) * dequantize;
    }
  });
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(N * count, 1));
  at::parallel_for(0, M, grain, [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; ++m) {
      float* row = out + m * N;
      const float x0 = X[m * K + columns[0]];
      for (int64_t n = 0; n < N; ++n) row[n] = x0 * columns_t[n];
      for (int64_t o = 1; o < count; ++o) {
        const float x = X[m * K + columns[o]];
        const float* w = columns_t.get() + o * N;
        for (int64_t n = 0; n < N; ++n) row[n] += x * w[n];
      }
    }
  });
}

}  // namespace

namespace int8fx {

std::vector<int64_t> quantize_activation(const float* X, int64_t M, int64_t K, bool use_threshold, float threshold,
                                         int8_t* CA, float* SCA) {
  std::vector<uint8_t> outlier(K, 0);
  return quantize_rows(X, M, K, use_threshold, threshold, CA, SCA, outlier.data());
}

void outlier_part(const float* X, int64_t M, int64_t K, const std::vector<int64_t>& columns, const FpWeight& W,
                  const int8_t* CB, const float* SCB, int64_t N, float* out) {
  switch (W.type) {
    case FpWeight::kFloat32:
      outlier_part_of(X, M, K, columns, static_cast<const float*>(W.data), W.row_stride, W.column_stride, CB, SCB, N, out);
      break;
    case FpWeight::kBFloat16:
      outlier_part_of(X, M, K, columns, static_cast<const BFloat16Bits*>(W.data), W.row_stride, W.column_stride, CB, SCB, N, out);
      break;
    case FpWeight::kFloat16:
      outlier_part_of(X, M, K, columns, static_cast<const HalfBits*>(W.data), W.row_stride, W.column_stride, CB, SCB, N, out);
      break;
  }
}

void gemm_dequantize(const int8_t* CA, const int8_t* CB, const float* SCA, const float* SCB, int64_t M, int64_t N,
                     int64_t K, const float* bias, bool add_outliers, float* out) {
  dispatch_gemm(CA, CB, M, N, K, StoreDequantized{out, N, SCA, SCB, bias, add_outliers});
}

}  // namespace int8fx
