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
#include <cstring>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

#include "dequantize_avx512.h"

namespace int8fx {
namespace {

constexpr int kStep = 64;  // bytes of K per vector

inline __m512i load(const int8_t* p) { return _mm512_loadu_si512(p); }
// A full mask is a plain load (the compiler drops it); a partial one zero-fills.
inline __m512i load_tail(const int8_t* p, __mmask64 mask) { return _mm512_maskz_loadu_epi8(mask, p); }
inline __mmask64 tail_mask(int64_t bytes) { return (__mmask64(1) << bytes) - 1; }  // bytes < 64

// acc += vpdpbusd(b, a) in place. GCC 12's intrinsic copies the accumulator to a fresh
// register for every product, which at 24 accumulators spills them to the stack on every
// step (measured 1.6x slower); the instruction itself accumulates in place.
__attribute__((always_inline)) inline void dpbusd_into(__m512i& acc, __m512i b, __m512i a) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(b), "v"(a));
}

// The lane sums of four accumulators, as the four lanes of one vector: pairs interleaved and
// added within each 128-bit lane, then the 128-bit lanes folded (12 instructions where four
// separate reductions take about 36; at K = 576 a tile has only 9 steps to spread them over).
// Every addition is modulo 2^32, so the order does not change the result.
inline __m128i lane_sums4(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
  const __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
  const __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
  const __m512i s = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));  // lanes: a0 a1 a2 a3
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// Rows m..m+MR of A against rows n..n+NR of B: MR * NR accumulators of 16 int32 lanes
// (16 of the 32 zmm registers at 4 x 4, plus 4 rows of A, one of B and the offset).
template <int MR, int NR>
void tile(const GemmProblem& p, int64_t m, int64_t n, const GemmOutput& out) {
  const int64_t K = p.K;
  const int8_t* a_rows = p.A + m * K;
  const int8_t* b_rows = p.B + n * K;
  const __m512i offset = _mm512_set1_epi8(char(0x80));
  __m512i acc[MR][NR];
  _Pragma("GCC unroll 4") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_si512();
  // One row of A (decode) streams the weight: fetch the rows of B kPrefetchTiles tiles
  // ahead into L2, the hardware prefetcher does not ramp up on rows only K bytes long.
  // (SmolLM2's 30 layers of int8 linears at M = 1, weights from memory, AMD EPYC Zen 4, 2
  // threads, ms per token, alternating: into L1 (T0) 4 tiles ahead 5.9-8.0; into L2 (T1) 4
  // tiles ahead 0.81-0.92x that, 2 tiles ahead 0.76-0.94x; none 1.04-1.26x. With the weight
  // in cache, T1 costs 0-5% where T0 cost 6-18%.)
  constexpr int64_t kPrefetchTiles = 2;
  const char* next_tile = reinterpret_cast<const char*>(b_rows + kPrefetchTiles * NR * K);
  const auto step = [&](int64_t k, __mmask64 mask) __attribute__((always_inline)) {
    __m512i a[MR];
    _Pragma("GCC unroll 4") for (int i = 0; i < MR; ++i) a[i] = load_tail(a_rows + i * K + k, mask);
    _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) {
      const __m512i b = _mm512_xor_si512(load_tail(b_rows + j * K + k, mask), offset);
      _Pragma("GCC unroll 4") for (int i = 0; i < MR; ++i) dpbusd_into(acc[i][j], b, a[i]);
    }
  };
  int64_t k = 0;
  for (; k + kStep <= K; k += kStep) {
    if (MR == 1) {
      for (int line = 0; line < NR * kStep; line += 64) _mm_prefetch(next_tile + k * NR + line, _MM_HINT_T1);
    }
    step(k, ~__mmask64(0));
  }
  if (k < K) step(k, tail_mask(K - k));
  // Every sum is taken before the first call to `out` (see panel_tile).
  int32_t sums[MR][NR];
  _Pragma("GCC unroll 4") for (int i = 0; i < MR; ++i) {
    const uint32_t correction = uint32_t(p.a_row_sums[m + i]) << 7;  // 128 * sum(a), mod 2^32
    if constexpr (NR % 4 == 0) {  // every full-width tile
      const __m128i c = _mm_set1_epi32(int32_t(correction));
      _Pragma("GCC unroll 2") for (int j = 0; j < NR; j += 4) {
        const __m128i s = lane_sums4(acc[i][j], acc[i][j + 1], acc[i][j + 2], acc[i][j + 3]);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(&sums[i][j]), _mm_sub_epi32(s, c));
      }
    } else {
      _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) sums[i][j] = int32_t(uint32_t(_mm512_reduce_add_epi32(acc[i][j])) - correction);
    }
  }
  for (int i = 0; i < MR; ++i) out(m + i, n, sums[i], NR);
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

// ---------------------------------------------------------------- panels (large M)
//
// With many rows of A the dot-product tiles above spend too much on their horizontal
// reductions (one per output, after only K / 64 steps: 9 at K = 576) and re-read both
// operands from L1 for every 16 products. The panel kernel is the other classic shape:
// 64 rows of B are packed as 64 consecutive bytes per group of 4 k (b + 128, unsigned,
// one lane per row of B), so a vpdpbusd multiplies 4 bytes of a row of A, broadcast, by 16
// outputs at once, and the 16 int32 lanes of an accumulator are 16 finished outputs of one
// row: no reduction. A tile is 6 rows of A x 64 outputs (24 accumulators, 4 panel vectors
// and the broadcast: 29 of the 32 zmm registers). Each thread packs the panel it works on
// into a buffer of its own (64 x K bytes: 36 KiB at K = 576, 256 KiB at K = 4096, kept in
// L2) and runs every row of its chunk of A against it, so each panel is packed about once
// per call, however large M is.
//
// K not a multiple of 4: the last group of a row of A is read into zeroed bytes, so the
// packed padding (b = 0) meets zero activations. Panel rows past N are padding too; their
// outputs are computed and dropped.

namespace {

constexpr int kPanelRows = 6;                         // rows of A per tile
constexpr uint32_t kOffsetBytes = 0x80808080u;         // b XOR 0x80 = b + 128 as unsigned, in every byte

inline int32_t group_of(const int8_t* row, int64_t g) {  // bytes 4g..4g+3 of a row
  int32_t bytes;
  std::memcpy(&bytes, row + 4 * g, 4);
  return bytes;
}

inline int32_t last_group_of(const int8_t* row, int64_t K) {  // the partial group, zero-filled
  int32_t bytes = 0;
  std::memcpy(&bytes, row + K / 4 * 4, K % 4);
  return bytes;
}

// One group of 4 k: the 4 panel vectors times the MR rows' broadcast bytes. (The loops are
// unrolled so that every accumulator is a register of its own.)
template <int MR>
__attribute__((always_inline)) inline void panel_step(__m512i (&acc)[MR][4], const uint8_t* b, const int32_t (&a)[MR]) {
  __m512i bv[4];
  _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) bv[j] = _mm512_load_si512(b + 64 * j);
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
    const __m512i ai = _mm512_set1_epi32(a[i]);
    _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) dpbusd_into(acc[i][j], bv[j], ai);
  }
}

// The panel's accumulators dequantized 16 outputs per step (dequantize_avx512.h). An
// outlier part computed here reads the outlier columns gathered beforehand (linear_op.cpp
// always gathers them for this kernel). The bare int32 GEMM still goes through GemmOutput.
template <int MR>
__attribute__((always_inline)) inline void dequantize_panel_rows(const __m512i (&acc)[MR][4], const GemmProblem& p, int64_t m,
                                                                 int64_t n0, int count, const GemmOutput& out) {
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
    const __m512i correction = _mm512_set1_epi32(int32_t(uint32_t(p.a_row_sums[m + i]) << 7));
    _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) {
      const int left = count - 16 * j;
      if (left <= 0) break;
      const __mmask16 mask = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      dequantize16(out, _mm512_sub_epi32(acc[i][j], correction), m + i, n0 + 16 * j, mask);
    }
  }
}

template <int MR>
void panel_tile(const GemmProblem& p, const uint8_t* panel, int64_t m, int64_t n0, const GemmOutput& out) {
  const int64_t K = p.K, full_groups = K / 4;
  const int8_t* a_rows = p.A + m * K;
  __m512i acc[MR][4];
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_si512();
  const uint8_t* b = panel;
  for (int64_t g = 0; g < full_groups; ++g, b += kPanelBytesPerGroup) {
    int32_t a[MR];
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) a[i] = group_of(a_rows + i * K, g);
    panel_step<MR>(acc, b, a);
  }
  if (K % 4) {
    int32_t a[MR];
    for (int i = 0; i < MR; ++i) a[i] = last_group_of(a_rows + i * K, K);
    panel_step<MR>(acc, b, a);
  }
  const int count = int(std::min<int64_t>(kPanelColumns, p.N - n0));
  if (!out.c32 && (!out.outliers || out.outliers->gathered)) {
    dequantize_panel_rows<MR>(acc, p, m, n0, count, out);
    return;
  }
  // Every accumulator is stored before the first call to `out`: indexing them across a
  // call would make the compiler keep them in memory through the loop over K.
  alignas(64) int32_t values[MR][kPanelColumns];
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
    const __m512i correction = _mm512_set1_epi32(int32_t(uint32_t(p.a_row_sums[m + i]) << 7));  // 128 * sum(a), mod 2^32
    _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) _mm512_store_si512(values[i] + 16 * j, _mm512_sub_epi32(acc[i][j], correction));
  }
  for (int i = 0; i < MR; ++i) out(m + i, n0, values[i], count);
}

// Rows r0..r0+15 of B (row r at rows[r]), bytes k0..k0+63 of each: 16 x 16 groups of 4
// bytes transposed in registers, group g of the 16 rows stored at lanes[(k0 / 4 + g) * 64 + r0].
void pack_16x16_groups(const int8_t* const* rows, int64_t k0, uint32_t* lanes, int64_t r0) {
  const __m512i offset = _mm512_set1_epi32(int(kOffsetBytes));
  __m512i u[4][4];  // u[q][c], 128-bit lane L: group 4L + c of rows 4q..4q+3
  for (int q = 0; q < 4; ++q) {
    __m512i r[4];
    for (int i = 0; i < 4; ++i) r[i] = _mm512_xor_si512(_mm512_loadu_si512(rows[4 * q + i] + k0), offset);
    const __m512i t0 = _mm512_unpacklo_epi32(r[0], r[1]), t1 = _mm512_unpackhi_epi32(r[0], r[1]);
    const __m512i t2 = _mm512_unpacklo_epi32(r[2], r[3]), t3 = _mm512_unpackhi_epi32(r[2], r[3]);
    u[q][0] = _mm512_unpacklo_epi64(t0, t2);
    u[q][1] = _mm512_unpackhi_epi64(t0, t2);
    u[q][2] = _mm512_unpacklo_epi64(t1, t3);
    u[q][3] = _mm512_unpackhi_epi64(t1, t3);
  }
  uint32_t* out = lanes + k0 / 4 * kPanelColumns + r0;
  for (int c = 0; c < 4; ++c) {  // a 4 x 4 transpose of 128-bit lanes: lane L of u[q][c] to lane q of group 4L + c
    const __m512i x0 = _mm512_shuffle_i32x4(u[0][c], u[1][c], 0x44), x1 = _mm512_shuffle_i32x4(u[0][c], u[1][c], 0xEE);
    const __m512i x2 = _mm512_shuffle_i32x4(u[2][c], u[3][c], 0x44), x3 = _mm512_shuffle_i32x4(u[2][c], u[3][c], 0xEE);
    _mm512_store_si512(out + (0 + c) * kPanelColumns, _mm512_shuffle_i32x4(x0, x2, 0x88));
    _mm512_store_si512(out + (4 + c) * kPanelColumns, _mm512_shuffle_i32x4(x0, x2, 0xDD));
    _mm512_store_si512(out + (8 + c) * kPanelColumns, _mm512_shuffle_i32x4(x1, x3, 0x88));
    _mm512_store_si512(out + (12 + c) * kPanelColumns, _mm512_shuffle_i32x4(x1, x3, 0xDD));
  }
}

}  // namespace

// Blocks of 16 rows x 64 bytes go through registers; the rest (K's tail past a multiple of
// 64, a block of fewer than 16 rows at N's edge) one group at a time.
void pack_panel_avx512_vnni(const int8_t* B, int64_t N, int64_t K, int64_t n0, uint8_t* panel) {
  const int64_t groups = ceil_div(K, 4), full_groups = K / 4, rows = std::min<int64_t>(kPanelColumns, N - n0);
  uint32_t* lanes = reinterpret_cast<uint32_t*>(panel);  // lanes[g * 64 + r]: row r, group g
  const int64_t vector_bytes = rows == kPanelColumns ? K / 64 * 64 : 0;
  for (int64_t r0 = 0; r0 < rows && vector_bytes > 0; r0 += 16) {
    const int8_t* block[16];
    for (int i = 0; i < 16; ++i) block[i] = B + (n0 + r0 + i) * K;
    for (int64_t k0 = 0; k0 < vector_bytes; k0 += 64) pack_16x16_groups(block, k0, lanes, r0);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* row = B + (n0 + r) * K;
    for (int64_t g = vector_bytes / 4; g < full_groups; ++g) lanes[g * kPanelColumns + r] = uint32_t(group_of(row, g)) ^ kOffsetBytes;
    if (K % 4) lanes[full_groups * kPanelColumns + r] = uint32_t(last_group_of(row, K)) ^ kOffsetBytes;
  }
  for (int64_t r = rows; r < kPanelColumns; ++r)
    for (int64_t g = 0; g < groups; ++g) lanes[g * kPanelColumns + r] = kOffsetBytes;  // b = 0
}

void sweep_panel_avx512_vnni(const GemmProblem& p, const uint8_t* panel, int64_t m0, int64_t m1, int64_t n0, const GemmOutput& out) {
  int64_t m = m0;
  for (; m + kPanelRows <= m1; m += kPanelRows) panel_tile<kPanelRows>(p, panel, m, n0, out);
  switch (m1 - m) {
    case 5: panel_tile<5>(p, panel, m, n0, out); break;
    case 4: panel_tile<4>(p, panel, m, n0, out); break;
    case 3: panel_tile<3>(p, panel, m, n0, out); break;
    case 2: panel_tile<2>(p, panel, m, n0, out); break;
    case 1: panel_tile<1>(p, panel, m, n0, out); break;
    default: break;
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
