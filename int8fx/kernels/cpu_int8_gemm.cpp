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
// B is walked in blocks of rows sized to stay in L2 while all rows of A pass over them;
// the blocks are split between threads. Built by cpu_int8_gemm.py and called via ctypes:
// only ATen/Parallel.h is included, which keeps the first-use compile to a few seconds.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include <ATen/Parallel.h>

namespace {

constexpr int64_t kL2BlockBytes = 256 * 1024;  // half of a 512 KiB L2: room for rows of A

inline __m256i load32(const int8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

inline int32_t horizontal_sum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// C[0:MR, 0:NR] = A[0:MR, :] @ B[0:NR, :]^T; rows of A and B are K apart, rows of C ldc.
template <int MR, int NR>
void tile(const int8_t* A, const int8_t* B, int32_t* C, int64_t K, int64_t ldc) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m256i a[MR], a_abs[MR];
    for (int i = 0; i < MR; ++i) {
      a[i] = load32(A + i * K + k);
      a_abs[i] = _mm256_sign_epi8(a[i], a[i]);
    }
    for (int j = 0; j < NR; ++j) {
      const __m256i b = load32(B + j * K + k);
      for (int i = 0; i < MR; ++i) {
        const __m256i pairs = _mm256_maddubs_epi16(a_abs[i], _mm256_sign_epi8(b, a[i]));
        acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      int32_t sum = horizontal_sum(acc[i][j]);
      for (int64_t t = k; t < K; ++t) sum += int32_t(A[i * K + t]) * int32_t(B[j * K + t]);
      C[i * ldc + j] = sum;
    }
}

// Rows [n0, n1) of B against all of A, in MR x NR tiles; ragged edges take thinner tiles.
template <int MR, int NR>
void sweep(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; m += MR) {
    const bool full_rows = m + MR <= M;
    for (int64_t n = n0; n < n1; n += NR) {
      const int64_t nr = std::min<int64_t>(NR, n1 - n);
      const int8_t* a = A + m * K;
      const int8_t* b = B + n * K;
      int32_t* c = C + m * N + n;
      if (full_rows && nr == NR) {
        tile<MR, NR>(a, b, c, K, N);
      } else if (full_rows) {
        for (int64_t j = 0; j < nr; ++j) tile<MR, 1>(a, b + j * K, c + j, K, N);
      } else {
        for (int64_t i = m; i < M; ++i) {
          if (nr == NR) {
            tile<1, NR>(A + i * K, b, C + i * N + n, K, N);
          } else {
            for (int64_t j = 0; j < nr; ++j) tile<1, 1>(A + i * K, b + j * K, C + i * N + n + j, K, N);
          }
        }
      }
    }
  }
}

template <int MR, int NR>
void gemm(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K) {
  const int64_t block = std::max<int64_t>(NR, kL2BlockBytes / std::max<int64_t>(K, 1) / NR * NR);
  const int64_t blocks = (N + block - 1) / block;
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      sweep<MR, NR>(A, B, C, M, N, K, i * block, std::min(N, (i + 1) * block));
    }
  });
}

}  // namespace

// A: int8 [M, K], B: int8 [N, K] with no -128, C: int32 [M, N]; all contiguous.
extern "C" void int8fx_int8_gemm(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K) {
  // Tile shapes measured on a 2-core EPYC (Zen 3), one thread: 1 x 8 streams the weight
  // at about 22 GB/s at M = 1; for M > 1, 2 x 4 was as fast as any tile tried (2 x 6,
  // 3 x 3, 3 x 4, 4 x 2; within the machine's noise) and fits the 16 registers without
  // spilling (8 accumulators, a and |a| for two rows, b, ones).
  if (M == 1) {
    gemm<1, 8>(A, B, C, M, N, K);
  } else {
    gemm<2, 4>(A, B, C, M, N, K);
  }
}
