// Exact int8 GEMM tiles for AVX-512 VNNI: C[M, N] = A[M, K] @ B[N, K]^T in int32.
//
// vpdpbusd multiplies 64 unsigned bytes by 64 signed bytes and adds each group of four
// products into an int32 lane, without saturation. Our operands are both signed, so the
// weight is offset: b + 128 (b XOR 0x80 read as unsigned, in [1, 255] since CB has no
// -128) times a signed a gives sum(a * b) + 128 * sum(a). The row sums of A are computed
// once per call (gemm.cpp) and taken back off at the end. Every step is int32 arithmetic
// modulo 2^32, so the result is exact whenever the true dot product fits in int32 (|a*b|
// <= 128 * 127 per product: K up to 132,000). Offsetting the weight, not the activation,
// is what makes this cheap: one XOR per loaded row of B, shared by the MR rows of A.
//
// The layout is CB's own (rows with K contiguous, as bitsandbytes stores it): every output
// is a dot product of two contiguous rows, accumulated in 16 lanes and reduced at the end.
// The tail of K (not a multiple of 64) is a masked load, zero-filled: a zero activation
// contributes nothing whatever the weight.

#include <algorithm>
#include <cstdint>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

namespace int8fx {
namespace {

constexpr int kStep = 64;  // bytes of K per vector

inline __m512i load(const int8_t* p) { return _mm512_loadu_si512(p); }
inline __m512i load_tail(const int8_t* p, __mmask64 mask) { return _mm512_maskz_loadu_epi8(mask, p); }
inline __mmask64 tail_mask(int64_t bytes) { return (__mmask64(1) << bytes) - 1; }  // bytes < 64

// Rows m..m+MR of A against rows n..n+NR of B: MR * NR accumulators of 16 int32 lanes
// (16 of the 32 zmm registers at 4 x 4, plus 4 rows of A, one of B and the offset).
template <int MR, int NR>
void tile(const GemmProblem& p, int64_t m, int64_t n, const GemmOutput& out) {
  const int64_t K = p.K;
  const int8_t* a_rows = p.A + m * K;
  const int8_t* b_rows = p.B + n * K;
  const __m512i offset = _mm512_set1_epi8(char(0x80));
  __m512i acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_si512();
  // One row of A (decode) streams the weight: fetch the next tile's rows of B ahead, the
  // hardware prefetcher does not ramp up on rows only K bytes long.
  const char* next_tile = reinterpret_cast<const char*>(b_rows + NR * K);
  int64_t k = 0;
  for (; k + kStep <= K; k += kStep) {
    if (MR == 1) {
      for (int line = 0; line < NR * kStep; line += 64) _mm_prefetch(next_tile + k * NR + line, _MM_HINT_T0);
    }
    __m512i a[MR];
    for (int i = 0; i < MR; ++i) a[i] = load(a_rows + i * K + k);
    for (int j = 0; j < NR; ++j) {
      const __m512i b = _mm512_xor_si512(load(b_rows + j * K + k), offset);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], b, a[i]);
    }
  }
  if (k < K) {
    const __mmask64 mask = tail_mask(K - k);
    __m512i a[MR];
    for (int i = 0; i < MR; ++i) a[i] = load_tail(a_rows + i * K + k, mask);
    for (int j = 0; j < NR; ++j) {
      const __m512i b = _mm512_xor_si512(load_tail(b_rows + j * K + k, mask), offset);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], b, a[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    const int32_t correction = int32_t(uint32_t(p.a_row_sums[m + i]) << 7);  // 128 * sum(a), mod 2^32
    int32_t sums[NR];
    for (int j = 0; j < NR; ++j) sums[j] = int32_t(uint32_t(_mm512_reduce_add_epi32(acc[i][j])) - uint32_t(correction));
    out(m + i, n, sums, NR);
  }
}

template <int R, int NR>
void tile_rows(const GemmProblem& p, int64_t m, int64_t n, int64_t nr, const GemmOutput& out) {
  if (nr == NR) {
    tile<R, NR>(p, m, n, out);
  } else {
    for (int64_t j = 0; j < nr; ++j) tile<R, 1>(p, m, n + j, out);
  }
}

// Rows of A in tiles of MR, the leftover rows (M not a multiple of MR) in one thinner
// tile; the ragged edge of B in single columns.
template <int MR, int NR>
void sweep(const GemmProblem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, const GemmOutput& out) {
  static_assert(MR <= 4, "leftover rows are handled for tiles of up to 4 rows");
  for (int64_t n = n0; n < n1; n += NR) {
    const int64_t nr = std::min<int64_t>(NR, n1 - n);
    int64_t m = m0;
    for (; m + MR <= m1; m += MR) tile_rows<MR, NR>(p, m, n, nr, out);
    switch (m1 - m) {
      case 3: tile_rows<3, NR>(p, m, n, nr, out); break;
      case 2: tile_rows<2, NR>(p, m, n, nr, out); break;
      case 1: tile_rows<1, NR>(p, m, n, nr, out); break;
      default: break;
    }
  }
}

}  // namespace

// Tiles measured on a 2-core EPYC (Zen 4), M = 2-48 on 4096 x 4096, 576 x 1536 and
// 1536 x 576: 4 x 4 was up to 1.6x faster than 4 x 6 and 3 x 8, and as fast as 2 x 8.
// Rows of A and B are K bytes apart: at K = 4096 every one of them maps to the same L1
// set, and a tile reads MR + NR of them at once, so fewer rows in flight beat more reuse.
// One row of A (decode) takes 1 x 8: the weight streams, prefetched.
void sweep_avx512_vnni(const GemmProblem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, const GemmOutput& out) {
  if (p.M == 1) {
    sweep<1, 8>(p, m0, m1, n0, n1, out);
  } else {
    sweep<4, 4>(p, m0, m1, n0, n1, out);
  }
}

// sums[m] = sum_k A[m, k], exact in int32 (|sum| <= 128 * K).
void row_sums_avx512_vnni(const int8_t* A, int64_t M, int64_t K, int32_t* sums) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* row = A + m * K;
    __m512i acc = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + kStep <= K; k += kStep) acc = _mm512_dpbusd_epi32(acc, ones, load(row + k));
    if (k < K) acc = _mm512_dpbusd_epi32(acc, ones, load_tail(row + k, tail_mask(K - k)));
    sums[m] = _mm512_reduce_add_epi32(acc);
  }
}

}  // namespace int8fx

#pragma GCC pop_options
