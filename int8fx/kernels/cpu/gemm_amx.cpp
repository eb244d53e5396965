// Exact int8 GEMM on AMX-INT8 tiles: C[M, N] = A[M, K] @ B[N, K]^T in int32.
//
// An AMX multiply (TDPBSSD, signed x signed, exact int32 accumulation) takes a 16 x 64-byte
// tile of its first operand in plain row-major order, but its second operand packed in
// groups of four bytes: row k4 holds 16 columns x 4 consecutive k. CB's rows are the
// plain layout, so the roles are swapped: the *weight* is the first operand, loaded
// straight from CB (no repacking of the weight, ever), and the *activation*, M x K bytes,
// is packed once per call (each 16 x 64-byte block of A, seen as 16 x 16 int32, transposed
// in AVX-512 registers). Each tile product is then C^T, [16 rows of B] x [16 rows of A],
// transposed back the same way in the epilogue, which dequantizes 16 outputs per step.
//
// Blocking: 2 x 2 result tiles (tmm0-3), two weight tiles (tmm4-5) and two activation tiles
// (tmm6-7): 32 rows of B x 32 rows of A per pass over K. The activation is zero-padded to
// whole tiles, so the last k-step of a weight row may read bytes past K: they belong to
// the next row of CB and meet zeros. Only a group of B rows that holds CB's last row (or
// fewer than 16 rows) is copied into a zero-padded buffer, so nothing reads past CB's end.
//
// The same file holds the outlier part of a bf16 model in AMX-BF16 tiles (below).
//
// Written without AMX hardware at hand (Intel SDE is not available here), first run on an
// AMX machine on 2026-12-02, where its self-check and tests passed. Built with
// -DINT8FX_EMULATE_AMX, the tile instructions become the scalar stand-ins of amx_emulation.h,
// and the tests compare that build with the reference on every AVX-512 machine. On AMX
// hardware, isa.cpp runs amx_self_check() before the dispatch may use this kernel, and the
// tests compare it with the reference there too.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include "kernels.h"

// The activation packing and the epilogue transpose 16 x 16 blocks with AVX-512 (every AMX
// CPU has it), in the emulated build too: its tests need an AVX-512 CPU.
#pragma GCC push_options
#ifdef INT8FX_EMULATE_AMX
#include "amx_emulation.h"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,amx-tile,amx-int8,amx-bf16")
#endif

#include "dequantize_avx512.h"

namespace int8fx {
namespace {

constexpr int64_t kTileRows = 16;
constexpr int64_t kTileBytes = 64;                     // bytes of K per tile row
constexpr int64_t kTileSize = kTileRows * kTileBytes;  // 1 KiB

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

// All eight tiles 16 rows x 64 bytes (the int32 results: 16 x 16).
void configure_tiles() {
  TileConfig config;
  std::memset(&config, 0, sizeof config);
  config.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = kTileBytes;
    config.rows[t] = kTileRows;
  }
  _tile_loadconfig(&config);
}

// NG groups of 16 B rows x MG groups of 16 A rows over all k-steps, left in tmm0-3 (group
// (g, h) in tmm(g * 2 + h)) for store_tiles.
template <int NG, int MG>
void multiply_tiles(const int8_t* const* weight, const int64_t* weight_stride, const int8_t* const* activation, int64_t k_steps) {
  _tile_zero(0);
  if (MG > 1) _tile_zero(1);
  if (NG > 1) _tile_zero(2);
  if (NG > 1 && MG > 1) _tile_zero(3);
  for (int64_t s = 0; s < k_steps; ++s) {
    _tile_loadd(4, weight[0] + s * kTileBytes, weight_stride[0]);
    if (NG > 1) _tile_loadd(5, weight[1] + s * kTileBytes, weight_stride[1]);
    _tile_loadd(6, activation[0] + s * kTileSize, kTileBytes);
    if (MG > 1) _tile_loadd(7, activation[1] + s * kTileSize, kTileBytes);
    _tile_dpbssd(0, 4, 6);
    if (MG > 1) _tile_dpbssd(1, 4, 7);
    if (NG > 1) _tile_dpbssd(2, 5, 6);
    if (NG > 1 && MG > 1) _tile_dpbssd(3, 5, 7);
  }
}

// The results of multiply_tiles<NG, MG> to `tiles` (NG * MG tiles of 16 x 16 int32, group
// (g, h) at (g * 2 + h) * 256).
template <int NG, int MG>
void store_tiles(int32_t* tiles) {
  _tile_stored(0, tiles, kTileBytes);
  if (MG > 1) _tile_stored(1, tiles + 256, kTileBytes);
  if (NG > 1) _tile_stored(2, tiles + 512, kTileBytes);
  if (NG > 1 && MG > 1) _tile_stored(3, tiles + 768, kTileBytes);
}

// r[i] element j becomes r[j] element i: 16 x 16 int32 in registers. Unpacks transpose the
// 4 x 4 blocks within each 128-bit lane, then two rounds of lane shuffles transpose the
// 4 x 4 grid of lanes.
inline void transpose_16x16(__m512i (&r)[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 16; i += 2) {
    a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // b[4g + j], lane L: rows 4g..4g+3 of column 4L + j.
  for (int g = 0; g < 16; g += 4) {
    b[g + 0] = _mm512_unpacklo_epi64(a[g], a[g + 2]);
    b[g + 1] = _mm512_unpackhi_epi64(a[g], a[g + 2]);
    b[g + 2] = _mm512_unpacklo_epi64(a[g + 1], a[g + 3]);
    b[g + 3] = _mm512_unpackhi_epi64(a[g + 1], a[g + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i s0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x44), s1 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xEE);
    const __m512i s2 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x44), s3 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xEE);
    r[0 + j] = _mm512_shuffle_i32x4(s0, s2, 0x88);
    r[4 + j] = _mm512_shuffle_i32x4(s0, s2, 0xDD);
    r[8 + j] = _mm512_shuffle_i32x4(s1, s3, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(s1, s3, 0xDD);
  }
}

// Hands tile (g, h) to `out` row by row of A: tile[r][c] is C[m + c, n + r], so the tile is
// transposed first, then dequantized 16 outputs per step (dequantize_avx512.h). An outlier
// part computed here reads the columns linear_op.cpp gathered for it; without them (never
// asked of this kernel by linear_op.cpp) GemmOutput reads the weight's own columns.
void emit_tile(const int32_t* tile, int64_t m, int64_t a_rows, int64_t n, int64_t b_rows, const GemmOutput& out) {
  __m512i rows[kTileRows];
  for (int r = 0; r < kTileRows; ++r) rows[r] = _mm512_load_si512(tile + r * kTileRows);
  transpose_16x16(rows);
  const __mmask16 mask = __mmask16((1u << b_rows) - 1);
  if (out.c32) {
    for (int64_t c = 0; c < a_rows; ++c) _mm512_mask_storeu_epi32(out.c32 + (m + c) * out.ldc + n, mask, rows[c]);
  } else if (out.outliers && !out.outliers->gathered) {
    alignas(64) int32_t values[kTileRows];
    for (int64_t c = 0; c < a_rows; ++c) {
      _mm512_store_si512(values, rows[c]);
      out(m + c, n, values, int(b_rows));
    }
  } else if (out.outliers && out.outliers->X_by_column) {
    __m512 sums[kTileRows];
    outlier_sums16(*out.outliers, m, n, mask, sums);
    // Unrolled: with constant indices the sums stay in registers.
    _Pragma("GCC unroll 16") for (int c = 0; c < kTileRows; ++c)
      if (c < a_rows) dequantize16(out, rows[c], m + c, n, mask, &sums[c]);
  } else {
    for (int64_t c = 0; c < a_rows; ++c) dequantize16(out, rows[c], m + c, n, mask);
  }
}

}  // namespace

int64_t amx_row_groups(int64_t M) { return (M + kTileRows - 1) / kTileRows; }

int64_t amx_packed_bytes(int64_t M, int64_t K) { return amx_row_groups(M) * ((K + kTileBytes - 1) / kTileBytes) * kTileSize; }

// Activation tile (row group g, k-step s) at (g * k_steps + s) KiB: row k4 holds, for each
// of its 16 rows of A, the 4 bytes A[16 g + c, 64 s + 4 k4 ...]; zeros past M and K.
// A tile is the 16 x 64-byte block of A seen as 16 x 16 int32, transposed. Packs the row
// groups [first_group, last_group) (the threads pack a share each: gemm.cpp).
void pack_activation_amx(const int8_t* A, int64_t M, int64_t K, int64_t first_group, int64_t last_group, int8_t* packed) {
  const int64_t k_steps = (K + kTileBytes - 1) / kTileBytes;
  for (int64_t m = first_group * kTileRows; m < std::min(M, last_group * kTileRows); m += kTileRows) {
    for (int64_t s = 0; s < k_steps; ++s) {
      const int64_t k = s * kTileBytes, bytes = std::min(kTileBytes, K - k);
      const __mmask64 mask = bytes == kTileBytes ? ~__mmask64(0) : (__mmask64(1) << bytes) - 1;
      __m512i block[kTileRows];
      for (int64_t r = 0; r < kTileRows; ++r)
        block[r] = m + r < M ? _mm512_maskz_loadu_epi8(mask, A + (m + r) * K + k) : _mm512_setzero_si512();
      transpose_16x16(block);
      int8_t* tile = packed + ((m / kTileRows) * k_steps + s) * kTileSize;
      for (int64_t r = 0; r < kTileRows; ++r) _mm512_storeu_si512(tile + r * kTileBytes, block[r]);
    }
  }
}

namespace {

// A block of results waiting for its epilogue: NG x MG tiles from output (m, n) on.
struct PendingBlock {
  int NG = 0, MG = 0;
  int64_t m = 0, n = 0, m_end = 0;
  int64_t b_rows[2] = {0, 0};
};

void emit_block(const PendingBlock& block, const int32_t* tiles, const GemmOutput& out) {
  for (int g = 0; g < block.NG; ++g)
    for (int h = 0; h < block.MG; ++h) {
      const int64_t first_m = block.m + h * kTileRows;
      emit_tile(tiles + (g * 2 + h) * 256, first_m, std::min(kTileRows, block.m_end - first_m), block.n + g * kTileRows,
                block.b_rows[g], out);
    }
}

template <int NG, int MG>
void multiply_emit_store(const int8_t* const* weight, const int64_t* weight_stride, const int8_t* const* activation, int64_t k_steps,
                         const PendingBlock& previous, const int32_t* previous_tiles, int32_t* tiles, const GemmOutput& out) {
  multiply_tiles<NG, MG>(weight, weight_stride, activation, k_steps);
  if (previous.NG) emit_block(previous, previous_tiles, out);
  store_tiles<NG, MG>(tiles);
}

}  // namespace

// Blocks of 32 x 32 results, software-pipelined: each block's tile products are issued
// before the previous block's epilogue, which the core's vector units then run while the
// tile unit computes (the tile stores wait for the products; the epilogue does not). In
// program order, one block after the other, the epilogue and the products took turns:
// with 7 outlier columns the epilogue grew by 54 us a call on SmolLM2's down_proj at M = 512.
void sweep_amx(const GemmProblem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, const GemmOutput& out) {
  const int64_t K = p.K, k_steps = (K + kTileBytes - 1) / kTileBytes, padded_k = k_steps * kTileBytes;
  configure_tiles();
  std::unique_ptr<int8_t[]> padded;  // allocated where needed: most sweeps never are
  alignas(64) int32_t tiles[2][4 * 256];  // the block being stored, and the previous one
  PendingBlock previous;
  int slot = 0;
  for (int64_t n = n0; n < n1; n += 2 * kTileRows) {
    const int NG = n1 - n > kTileRows ? 2 : 1;
    const int8_t* weight[2];
    int64_t weight_stride[2], b_rows[2] = {0, 0};
    for (int g = 0; g < NG; ++g) {
      const int64_t first = n + g * kTileRows;
      b_rows[g] = std::min(kTileRows, n1 - first);
      if (b_rows[g] == kTileRows && (first + kTileRows < p.N || K % kTileBytes == 0)) {
        weight[g] = p.B + first * K;
        weight_stride[g] = K;
      } else {  // ragged group, or the one holding CB's last row: zero-padded copy
        if (!padded) padded.reset(new int8_t[2 * kTileRows * padded_k]);
        int8_t* copy = padded.get() + g * kTileRows * padded_k;
        std::memset(copy, 0, size_t(kTileRows * padded_k));
        for (int64_t r = 0; r < b_rows[g]; ++r) std::memcpy(copy + r * padded_k, p.B + (first + r) * K, size_t(K));
        weight[g] = copy;
        weight_stride[g] = padded_k;
      }
    }
    for (int64_t m = m0; m < m1; m += 2 * kTileRows) {
      const int MG = m1 - m > kTileRows ? 2 : 1;
      const int8_t* activation[2] = {p.a_packed + (m / kTileRows) * k_steps * kTileSize, nullptr};
      if (MG == 2) activation[1] = activation[0] + k_steps * kTileSize;
      const int32_t* previous_tiles = tiles[1 - slot];
      if (NG == 2 && MG == 2) multiply_emit_store<2, 2>(weight, weight_stride, activation, k_steps, previous, previous_tiles, tiles[slot], out);
      else if (NG == 2) multiply_emit_store<2, 1>(weight, weight_stride, activation, k_steps, previous, previous_tiles, tiles[slot], out);
      else if (MG == 2) multiply_emit_store<1, 2>(weight, weight_stride, activation, k_steps, previous, previous_tiles, tiles[slot], out);
      else multiply_emit_store<1, 1>(weight, weight_stride, activation, k_steps, previous, previous_tiles, tiles[slot], out);
      previous.NG = NG;
      previous.MG = MG;
      previous.m = m;
      previous.n = n;
      previous.m_end = m1;
      previous.b_rows[0] = b_rows[0];
      previous.b_rows[1] = b_rows[1];
      slot = 1 - slot;
    }
  }
  if (previous.NG) emit_block(previous, tiles[1 - slot], out);
  _tile_release();
}

// ---------------------------------------------------------------- the outlier part in bf16 tiles

// The outlier part X[:, columns] @ W[:, columns]^T of a bf16 activation and a bf16 weight, by
// AMX-BF16 tiles (TDPBF16PS: bf16 pairs multiplied into fp32 sums): their products are exact in
// fp32, and the sums are fp32, as BLAS's. Where hundreds of columns are outliers (SmolLM2's last
// down_proj layers over a prompt), fp32 BLAS takes 1.3 us a column at M = 512, N = 576.
// X [M, count] and W [count, N] come as fp32 holding bf16 values (the gathered columns), so the
// conversion keeps their top halves.
constexpr int64_t kBf16PerTileRow = 32;

inline uint16_t bf16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return uint16_t(bits >> 16);
}

int64_t bf16_k_steps(int64_t count) { return ceil_div(count, kBf16PerTileRow); }

int64_t amx_bf16_weight_elements(int64_t count, int64_t N) { return ceil_div(N, kTileRows) * bf16_k_steps(count) * 512; }

// W's tile (n group h, k-step s) at (h * steps + s) * 512: row p holds, for each of the 16
// outputs n, the pair W[32 s + 2 p, n], W[32 s + 2 p + 1, n]; zeros past count and N.
void pack_outlier_weight_amx_bf16(const float* W, int64_t count, int64_t N, int64_t first_group, int64_t last_group, uint16_t* packed) {
  const int64_t steps = bf16_k_steps(count);
  for (int64_t h = first_group; h < last_group; ++h)
    for (int64_t s = 0; s < steps; ++s) {
      uint16_t* tile = packed + (h * steps + s) * 512;
      for (int64_t p = 0; p < 16; ++p)
        for (int64_t j = 0; j < 16; ++j) {
          const int64_t n = h * kTileRows + j;
          for (int64_t i = 0; i < 2; ++i) {
            const int64_t o = s * kBf16PerTileRow + 2 * p + i;
            tile[p * 32 + 2 * j + i] = o < count && n < N ? bf16_bits(W[o * N + n]) : 0;
          }
        }
    }
}

// out[m, :] = X[m, :] @ W for the rows of the 16-row groups [first_group, last_group).
void outlier_rows_amx_bf16(const float* X, int64_t M, int64_t count, const uint16_t* packed_weight, int64_t N, int64_t first_group,
                           int64_t last_group, float* out) {
  const int64_t steps = bf16_k_steps(count), n_groups = ceil_div(N, kTileRows);
  std::unique_ptr<uint16_t[]> rows(new uint16_t[steps * 512]);  // one group's X, tile by tile
  alignas(64) float sums[kTileRows * kTileRows];
  configure_tiles();
  for (int64_t g = first_group; g < last_group; ++g) {
    const int64_t m0 = g * kTileRows, m_count = std::min(kTileRows, M - m0);
    // Row r of the group fills row r of every tile: 32 values a tile, the top halves of X's
    // fp32 values, zeros past count and past M.
    for (int64_t r = 0; r < kTileRows; ++r)
      for (int64_t o = 0; o < steps * kBf16PerTileRow; o += 16) {
        const int64_t left = r < m_count ? std::max<int64_t>(0, std::min<int64_t>(16, count - o)) : 0;
        const __mmask16 valid = __mmask16((1u << left) - 1);
        const __m512i bits = _mm512_maskz_loadu_epi32(valid, X + (m0 + std::min(r, m_count - 1)) * count + o);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(rows.get() + (o / kBf16PerTileRow) * 512 + r * 32 + o % kBf16PerTileRow),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
      }
    // Three groups of 16 outputs at a time: three independent chains of tile products (one
    // chain waits on each product's latency, several times its issue interval).
    for (int64_t h = 0; h < n_groups; h += 3) {
      const int64_t NG = std::min<int64_t>(3, n_groups - h);
      const uint16_t* weight = packed_weight + h * steps * 512;
      _tile_zero(0);
      if (NG > 1) _tile_zero(1);
      if (NG > 2) _tile_zero(2);
      for (int64_t s = 0; s < steps; ++s) {
        _tile_loadd(3, rows.get() + s * 512, kTileBytes);
        _tile_loadd(4, weight + s * 512, kTileBytes);
        _tile_dpbf16ps(0, 3, 4);
        if (NG > 1) {
          _tile_loadd(5, weight + (steps + s) * 512, kTileBytes);
          _tile_dpbf16ps(1, 3, 5);
        }
        if (NG > 2) {
          _tile_loadd(6, weight + (2 * steps + s) * 512, kTileBytes);
          _tile_dpbf16ps(2, 3, 6);
        }
      }
      for (int64_t j = 0; j < NG; ++j) {
        if (j == 0) _tile_stored(0, sums, kTileBytes);
        if (j == 1) _tile_stored(1, sums, kTileBytes);
        if (j == 2) _tile_stored(2, sums, kTileBytes);
        const int64_t n0 = (h + j) * kTileRows, n_count = std::min(kTileRows, N - n0);
        for (int64_t r = 0; r < m_count; ++r) std::memcpy(out + (m0 + r) * N + n0, sums + r * kTileRows, size_t(n_count) * sizeof(float));
      }
    }
  }
  _tile_release();
}

// The bf16 tiles on small integers, whose products and sums are exact in any order: the
// dispatch uses them only if this returns true.
bool amx_bf16_self_check() {
  const int64_t M = 19, N = 21, count = 45;
  std::unique_ptr<float[]> X(new float[M * count]), W(new float[count * N]), out(new float[M * N]);
  for (int64_t i = 0; i < M * count; ++i) X[i] = float(int(i * 7 % 17) - 8);
  for (int64_t i = 0; i < count * N; ++i) W[i] = float(int(i * 5 % 13) - 6);
  std::unique_ptr<uint16_t[]> packed(new uint16_t[amx_bf16_weight_elements(count, N)]);
  pack_outlier_weight_amx_bf16(W.get(), count, N, 0, ceil_div(N, kTileRows), packed.get());
  outlier_rows_amx_bf16(X.get(), M, count, packed.get(), N, 0, ceil_div(M, kTileRows), out.get());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float expected = 0;
      for (int64_t o = 0; o < count; ++o) expected += X[m * count + o] * W[o * N + n];
      if (out[m * N + n] != expected) return false;
    }
  return true;
}

// Runs the kernel on shapes with a ragged edge in every dimension and compares it with
// plain int32 arithmetic; the dispatch uses AMX only if this returns true.
bool amx_self_check() {
  const int64_t M = 35, N = 37, K = 130;
  std::unique_ptr<int8_t[]> A(new int8_t[M * K]), B(new int8_t[N * K]);
  uint32_t state = 12345;
  auto next = [&state]() { state = state * 1664525u + 1013904223u; return int8_t(int(state >> 24) % 255 - 127); };
  for (int64_t i = 0; i < M * K; ++i) A[i] = next();
  for (int64_t i = 0; i < N * K; ++i) B[i] = next();
  A[0] = -128;  // the activation may hold -128
  std::unique_ptr<int8_t[]> packed(new int8_t[amx_packed_bytes(M, K)]);
  pack_activation_amx(A.get(), M, K, 0, amx_row_groups(M), packed.get());
  std::unique_ptr<int32_t[]> C(new int32_t[M * N]);
  GemmOutput store;
  store.c32 = C.get();
  store.ldc = N;
  sweep_amx(GemmProblem{A.get(), B.get(), M, N, K, nullptr, packed.get()}, 0, M, 0, N, store);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      int32_t expected = 0;
      for (int64_t k = 0; k < K; ++k) expected += int32_t(A[m * K + k]) * int32_t(B[n * K + k]);
      if (C[m * N + n] != expected) return false;
    }
  return true;
}

}  // namespace int8fx

#ifdef INT8FX_EMULATE_AMX
// C [M, N] int32 = A [M, K] @ B [N, K]^T through the emulated tiles, one thread (for tests),
// in tasks of m_chunk rows of A (a multiple of 16) x n_block rows of B, as gemm.cpp splits.
extern "C" void int8fx_emulated_amx_gemm(const int8_t* A, const int8_t* B, int32_t* C, int64_t M, int64_t N, int64_t K,
                                         int64_t m_chunk, int64_t n_block) {
  std::unique_ptr<int8_t[]> packed(new int8_t[int8fx::amx_packed_bytes(M, K)]);
  int8fx::pack_activation_amx(A, M, K, 0, int8fx::amx_row_groups(M), packed.get());
  int8fx::GemmOutput store;
  store.c32 = C;
  store.ldc = N;
  const int8fx::GemmProblem problem{A, B, M, N, K, nullptr, packed.get()};
  for (int64_t m = 0; m < M; m += m_chunk)
    for (int64_t n = 0; n < N; n += n_block) int8fx::sweep_amx(problem, m, std::min(M, m + m_chunk), n, std::min(N, n + n_block), store);
}

extern "C" int int8fx_emulated_amx_self_check() { return int8fx::amx_self_check() && int8fx::amx_bf16_self_check(); }

// out [M, N] = X [M, count] @ W [count, N] through the emulated bf16 tiles (values: bf16's).
extern "C" void int8fx_emulated_amx_bf16_outliers(const float* X, int64_t M, int64_t count, const float* W, int64_t N, float* out) {
  std::unique_ptr<uint16_t[]> packed(new uint16_t[int8fx::amx_bf16_weight_elements(count, N)]);
  int8fx::pack_outlier_weight_amx_bf16(W, count, N, 0, int8fx::ceil_div(N, 16), packed.get());
  int8fx::outlier_rows_amx_bf16(X, M, count, packed.get(), N, 0, int8fx::ceil_div(M, 16), out);
}

// The dequantizing epilogue, emulated: out [M, N] = C * SCA * SCB / 127^2, plus the outlier
// part (already in out with add_outliers; or, with `count` columns, X[:, columns] times
// their gathered weight [count, N]), plus the bias.
extern "C" void int8fx_emulated_amx_linear(const int8_t* A, const int8_t* B, int64_t M, int64_t N, int64_t K, const float* SCA,
                                           const float* SCB, const float* bias, int add_outliers, const float* X,
                                           const int64_t* columns, int64_t count, const float* gathered, float* out) {
  std::unique_ptr<int8_t[]> packed(new int8_t[int8fx::amx_packed_bytes(M, K)]);
  int8fx::pack_activation_amx(A, M, K, 0, int8fx::amx_row_groups(M), packed.get());
  int8fx::GemmOutput output;
  output.out = out;
  output.ldc = N;
  output.SCA = SCA;
  output.SCB = SCB;
  output.bias = bias;
  output.add_outliers = add_outliers != 0;
  std::unique_ptr<float[]> x_outliers(new float[M * count + 1]);  // X[:, columns], as linear_op.cpp passes it
  for (int64_t m = 0; m < M; ++m)
    for (int64_t o = 0; o < count; ++o) x_outliers[m * count + o] = X[m * K + columns[o]];
  int8fx::OutlierColumns outliers{x_outliers.get(), K, columns, count, int8fx::FpWeight{nullptr, int8fx::FpWeight::kFloat32, 0, 0},
                                  B, SCB, N};
  outliers.gathered = gathered;
  const std::vector<float> by_column = int8fx::transpose_outlier_inputs(x_outliers.get(), M, count);
  outliers.X_by_column = by_column.data();
  outliers.X_by_column_stride = int8fx::by_column_stride(M);
  if (count > 0) output.outliers = &outliers;
  int8fx::sweep_amx(int8fx::GemmProblem{A, B, M, N, K, nullptr, packed.get()}, 0, M, 0, N, output);
}
#endif
#pragma GCC pop_options
