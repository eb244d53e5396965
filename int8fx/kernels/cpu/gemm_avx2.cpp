// Exact int8 GEMM tiles for AVX2: C[M, N] = A[M, K] @ B[N, K]^T in int32.
//
// A and B are row-major with K contiguous (the layouts of CA and CB), so every output
// is a dot product of two contiguous rows. The multiply is AVX2's vpmaddubsw, which
// takes one unsigned and one signed int8 operand and adds adjacent products into a
// *saturating* int16. To keep it exact we feed it |a| (unsigned) and b * sign(a): a
// pair sum is then at most 2 * 128 * 127 = 32512 < 32767 as long as b != -128 (A may
// hold any int8). vpmaddwd with ones then widens the pairs to int32.
//
// A tile of MR rows of A against NR rows of B keeps MR * NR int32x8 accumulators in
// registers (16 ymm registers on AVX2), reduced horizontally at the end. gemm.cpp splits
// the work between threads and calls sweep_avx2 on each piece.

#include <algorithm>
#include <cstdint>

#include "kernels.h"

namespace int8fx {
namespace {

inline __m256i load32(const int8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

inline int32_t horizontal_sum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Rows m..m+MR of A against rows n..n+NR of B (rows are K apart), each result to `out`.
template <int MR, int NR>
void tile(const int8_t* A, const int8_t* B, int64_t K, int64_t m, int64_t n, const GemmOutput& out) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* a_rows = A + m * K;
  const int8_t* b_rows = B + n * K;
  __m256i acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
  // A single row of A (decode) streams the weight from memory: rows of B are short
  // (K bytes) and the hardware prefetcher does not ramp up on them, so fetch the rows two
  // tiles ahead into L2 while this one computes. (This kernel on an AMD EPYC Zen 4, SmolLM2's
  // 30 layers of int8 linears at M = 1, weights from memory: 0.82-0.89x the time of fetching
  // the next tile into L1; with the weights in cache 1.04-1.07x. Not measured on Zen 3.)
  const char* next_tile = reinterpret_cast<const char*>(b_rows + 2 * NR * K);
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if (MR == 1) {
      for (int line = 0; line < NR * 32; line += 64) _mm_prefetch(next_tile + k * NR + line, _MM_HINT_T1);
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
    out(m + i, n, sums, NR);
  }
}

// The NR rows of B in flight stay in L1 while the rows of A pass over them; ragged edges
// take thinner tiles.
template <int MR, int NR>
void sweep(const GemmProblem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, const GemmOutput& out) {
  for (int64_t n = n0; n < n1; n += NR) {
    const int64_t nr = std::min<int64_t>(NR, n1 - n);
    int64_t m = m0;
    for (; m + MR <= m1; m += MR) {
      if (nr == NR) {
        tile<MR, NR>(p.A, p.B, p.K, m, n, out);
      } else {
        for (int64_t j = 0; j < nr; ++j) tile<MR, 1>(p.A, p.B, p.K, m, n + j, out);
      }
    }
    for (; m < m1; ++m) {
      if (nr == NR) {
        tile<1, NR>(p.A, p.B, p.K, m, n, out);
      } else {
        for (int64_t j = 0; j < nr; ++j) tile<1, 1>(p.A, p.B, p.K, m, n + j, out);
      }
    }
  }
}

}  // namespace

// Tile shapes measured on a 2-core EPYC (Zen 3): 1 x 8 streams the weight at M = 1
// (one thread, hot cache: about 22 GB/s). For M > 1, with both threads at M = 512 on
// SmolLM2's shapes and 4096 x 4096, 2 x 6 was as fast as or up to 9% faster than the
// best of 2 x 4, 4 x 2, 3 x 4 and 4 x 3 in two runs, although its 12 accumulators, a and
// |a| for two rows, b and ones do not all fit the 16 ymm registers.
void sweep_avx2(const GemmProblem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, const GemmOutput& out) {
  if (p.M == 1) {
    sweep<1, 8>(p, m0, m1, n0, n1, out);
  } else {
    sweep<2, 6>(p, m0, m1, n0, n1, out);
  }
}

}  // namespace int8fx
