// What the C++ files of int8fx's CPU kernels share. Kept free of torch's headers so that
// only linear_op.cpp pays for them at build time.
//
// The library is compiled for AVX2 (-mavx2 -mfma -mf16c, every x86 machine the project
// runs on has it); the files with wider instruction sets switch them on for their own
// functions only (#pragma GCC target), and nothing calls those functions unless isa.cpp
// found the instructions on this CPU.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace int8fx {

// reference.INT8_MAX: quantized values lie in [-127, 127]; a row scale is its absmax, so a
// value dequantizes as q * absmax / 127 and a product of two as c * SCA * SCB / 127^2.
constexpr float kInt8Max = 127.0f;
constexpr float kInt8MaxSquared = kInt8Max * kInt8Max;

// ---------------------------------------------------------------- instruction sets

// The int8 GEMM kernels, in the order of preference where the CPU has them.
enum class Kernel : int {
  kAvx2 = 0,        // vpmaddubsw + vpmaddwd with the sign trick (gemm_avx2.cpp)
  kAvx512Vnni = 1,  // vpdpbusd with an offset weight (gemm_avx512.cpp)
  kAmx = 2,         // AMX-INT8 tiles, from a few rows of A on (gemm_amx.cpp)
  kAvx512VnniPanels = 3,  // vpdpbusd on packed panels of B, large M (gemm_avx512.cpp)
};
const char* kernel_name(Kernel kernel);

// Which kernels this CPU (and its OS) can run, read from CPUID and XGETBV once.
struct CpuFeatures {
  bool avx2 = false;
  bool avx512_vnni = false;   // with AVX-512 F/BW/VL, and the OS saving ZMM state
  bool amx_hardware = false;  // AMX-INT8, with the OS granting this process the tile state
  bool amx_int8 = false;      // amx_hardware, and the AMX kernel passed its self-check
  bool amx_bf16_hardware = false;  // amx_hardware with AMX-BF16
  bool amx_bf16 = false;           // amx_int8, amx_bf16_hardware, and the bf16 outlier kernel passed its self-check
};
const CpuFeatures& cpu_features();
bool can_run(Kernel kernel);
// The instruction set of the activation quantizer (quantize.cpp): both give the same bits.
enum class QuantizerIsa : int { kAvx2 = 0, kAvx512 = 1 };
QuantizerIsa best_quantizer();  // AVX-512 wherever the VNNI kernels may run, else AVX2

// Raw 16-bit patterns of the fp weight when it is not fp32.
struct BFloat16Bits { uint16_t bits; };
struct HalfBits { uint16_t bits; };

// The fp weight [N, K] whose outlier columns are used, read in place with any strides;
// data == nullptr means "dequantize the outlier columns of CB instead".
struct FpWeight {
  enum Type { kFloat32, kBFloat16, kFloat16 };
  const void* data;
  Type type;
  int64_t row_stride;
  int64_t column_stride;
};

inline float to_float(float w) { return w; }
inline float to_float(BFloat16Bits w) {  // bf16 is the top half of an fp32
  const uint32_t bits = uint32_t(w.bits) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}
inline float to_float(HalfBits w) { return _cvtsh_ss(w.bits); }

// The outlier part of row m, output n: sum over the outlier columns c (ascending) of
// X[m, c] * W[n, c] in fp32, W being the fp weight or, without one, CB dequantized as
// reference.dequantize_rows does (CB * (SCB / 127)). Used by GemmOutput at small M, where
// the GEMM streams each row of CB once: at M = 1 without an fp weight, the outlier columns of
// a row are read from CB right after the row itself; otherwise from the gathered columns.
struct OutlierColumns {
  const float* X;  // the activation's outlier columns in fp32, [M, count]: X[m * count + o]
  int64_t K;
  const int64_t* columns;
  int64_t count;
  FpWeight W;
  const int8_t* CB;
  const float* SCB;
  int64_t N;
  // Set by gather_outlier_columns' caller: [count, N], scaled(n, o) at [o * N + n]. The
  // VNNI panels add the outlier part 16 outputs at a time from it; every path reads it
  // instead of the weight's scattered elements, except the one-row tiles without an fp
  // weight, which read CB's rows as they stream them (linear_op.cpp, outlier_cache.cpp).
  const float* gathered = nullptr;
  // Set for the AMX epilogue, which sums 16 rows at a time: X by column, [count, stride]
  // (X_by_column[o * stride + m] = X[m * count + o]; stride >= M + 15, so that a tile's
  // rows past M read allocated memory: transpose_outlier_inputs, by_column_stride).
  const float* X_by_column = nullptr;
  int64_t X_by_column_stride = 0;

  // The weight's element for output n and outlier o: W[n, columns[o]], or CB's dequantized.
  float scaled(int64_t n, int64_t o) const {
    if (gathered) return gathered[o * N + n];
    const float scale = W.data ? 1.0f : SCB[n] / kInt8Max;
    return raw(n, columns[o]) * scale;
  }

  // W[n, k] for the fp weight, CB[n, k] (not yet scaled) without one.
  float raw(int64_t n, int64_t k) const {
    const int64_t at = n * W.row_stride + k * W.column_stride;
    switch (W.data ? int(W.type) : -1) {
      case FpWeight::kFloat32: return static_cast<const float*>(W.data)[at];
      case FpWeight::kBFloat16: return to_float(static_cast<const BFloat16Bits*>(W.data)[at]);
      case FpWeight::kFloat16: return to_float(static_cast<const HalfBits*>(W.data)[at]);
      default: return float(CB[n * K + k]);
    }
  }
  float sum(int64_t m, int64_t n) const {
    const float* x = X + m * count;
    float y = x[0] * scaled(n, 0);
    for (int64_t o = 1; o < count; ++o) y = y + x[o] * scaled(n, o);
    return y;
  }
  // sum() for outputs n..n+3, each lane rounding as sum() does: from the gathered columns or,
  // where they are not gathered (the one-row tiles without an fp weight; an fp weight's
  // columns always are, linear_op.cpp), from CB's four rows the tile has just streamed.
  __m128 sum4(int64_t m, int64_t n) const {
    const float* x = X + m * count;
    if (gathered) {
      __m128 y = _mm_mul_ps(_mm_set1_ps(x[0]), _mm_loadu_ps(gathered + n));
      for (int64_t o = 1; o < count; ++o) y = _mm_add_ps(y, _mm_mul_ps(_mm_set1_ps(x[o]), _mm_loadu_ps(gathered + o * N + n)));
      return y;
    }
    const __m128 scale = _mm_div_ps(_mm_loadu_ps(SCB + n), _mm_set1_ps(kInt8Max));
    const auto cb4 = [&](int64_t o) {  // CB[n..n+3, columns[o]], dequantized
      const int8_t* at = CB + n * K + columns[o];
      return _mm_mul_ps(_mm_cvtepi32_ps(_mm_setr_epi32(at[0], at[K], at[2 * K], at[3 * K])), scale);
    };
    __m128 y = _mm_mul_ps(_mm_set1_ps(x[0]), cb4(0));
    for (int64_t o = 1; o < count; ++o) y = _mm_add_ps(y, _mm_mul_ps(_mm_set1_ps(x[o]), cb4(o)));
    return y;
  }
};

// ---------------------------------------------------------------- GEMM output

// fp32 -> bf16 bits as torch's scalar conversion rounds (c10::BFloat16): to nearest, ties to
// even, and any NaN to the quiet NaN 0x7FC0. (x86's vcvtneps2bf16 flushes subnormals: not used.)
inline uint16_t to_bf16(float y) {
  uint32_t bits;
  std::memcpy(&bits, &y, sizeof bits);
  return y != y ? uint16_t(0x7FC0) : uint16_t((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}
// to_bf16 for 8 lanes, as 8 consecutive uint16 (the low 128 bits of the result used).
inline __m128i to_bf16(__m256 y) {
  const __m256i bits = _mm256_castps_si256(y);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(y, y, _CMP_UNORD_Q)));
  return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
}

// Where a tile's finished int32 dot products go: `count` consecutive outputs of row m,
// from column n. Either stored as int32 (the bare GEMM), or dequantized in the same step
// (no int32 [M, N] round trip through memory):
//   out[m, n] = (float(c) * (SCA[m] * SCB[n])) / 127^2 (+ out[m, n]) (+ bias[n])
// with one fp32 rounding per step in the order of reference.dequantize_output (torch divides
// by the scalar, it does not multiply by its reciprocal). The outlier part Y16 is either
// already in out (add_outliers) or computed here (outliers); the sum is Y8 + Y16, and the
// bias is added last.
struct GemmOutput {
  int32_t* c32 = nullptr;  // set: store int32, ignore the rest
  float* out = nullptr;
  uint16_t* out_bf16 = nullptr;  // set: the result goes here, rounded to bf16 (out keeps an fp32 outlier part)
  int64_t ldc = 0;
  const float* SCA = nullptr;
  const float* SCB = nullptr;
  const float* bias = nullptr;  // may be null
  bool add_outliers = false;
  const OutlierColumns* outliers = nullptr;  // may be null; never with add_outliers

  void operator()(int64_t m, int64_t n, const int32_t* values, int count) const {
    if (c32) {
      for (int j = 0; j < count; ++j) c32[m * ldc + n + j] = values[j];
      return;
    }
    float* o = out + m * ldc + n;
    const float* scb = SCB + n;
    const float* b = bias ? bias + n : nullptr;
    int j = 0;
    const __m256 sa8 = _mm256_set1_ps(SCA[m]), divisor8 = _mm256_set1_ps(kInt8MaxSquared);
    for (; j + 8 <= count; j += 8) {  // each lane rounds exactly as the scalar tail
      const __m256 value = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(values + j)));
      __m256 y = _mm256_div_ps(_mm256_mul_ps(value, _mm256_mul_ps(sa8, _mm256_loadu_ps(scb + j))), divisor8);
      if (add_outliers) y = _mm256_add_ps(y, _mm256_loadu_ps(o + j));
      if (outliers) y = _mm256_add_ps(y, _mm256_set_m128(outliers->sum4(m, n + j + 4), outliers->sum4(m, n + j)));
      if (b) y = _mm256_add_ps(y, _mm256_loadu_ps(b + j));
      if (out_bf16) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out_bf16 + m * ldc + n + j), to_bf16(y));
      } else {
        _mm256_storeu_ps(o + j, y);
      }
    }
    const __m128 sa = _mm_set1_ps(SCA[m]), divisor = _mm_set1_ps(kInt8MaxSquared);
    for (; j + 4 <= count; j += 4) {
      const __m128 value = _mm_cvtepi32_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(values + j)));
      __m128 y = _mm_div_ps(_mm_mul_ps(value, _mm_mul_ps(sa, _mm_loadu_ps(scb + j))), divisor);
      if (add_outliers) y = _mm_add_ps(y, _mm_loadu_ps(o + j));
      if (outliers) y = _mm_add_ps(y, outliers->sum4(m, n + j));
      if (b) y = _mm_add_ps(y, _mm_loadu_ps(b + j));
      if (out_bf16) {
        _mm_storel_epi64(reinterpret_cast<__m128i*>(out_bf16 + m * ldc + n + j), to_bf16(_mm256_castps128_ps256(y)));
      } else {
        _mm_storeu_ps(o + j, y);
      }
    }
    for (; j < count; ++j) {
      float y = float(values[j]) * (SCA[m] * scb[j]) / kInt8MaxSquared;
      if (add_outliers) y = y + o[j];
      if (outliers) y = y + outliers->sum(m, n + j);
      if (b) y = y + b[j];
      if (out_bf16) {
        out_bf16[m * ldc + n + j] = to_bf16(y);
      } else {
        o[j] = y;
      }
    }
  }
};

// C = A [M, K] @ B [N, K]^T, both int8, row-major with K contiguous (CA's and CB's
// layouts), B with no -128. int8_gemm prepares what a kernel needs besides: the row sums
// of A for AVX-512 VNNI, A packed into tiles for AMX.
struct GemmProblem {
  const int8_t* A;
  const int8_t* B;
  int64_t M, N, K;
  const int32_t* a_row_sums;
  const int8_t* a_packed;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The AVX-512 VNNI panel kernel's packed B: 64 rows of B (a panel), then for each group of
// 4 bytes of K the 64 rows' 4 bytes each, offset by 128 (gemm_avx512.cpp).
constexpr int64_t kPanelColumns = 64;
constexpr int64_t kPanelBytesPerGroup = kPanelColumns * 4;
inline int64_t panel_bytes(int64_t K) { return ceil_div(K, 4) * kPanelBytesPerGroup; }

// Rows [m0, m1) of A against rows [n0, n1) of B, each kernel's own tiles (one thread).
void sweep_avx2(const GemmProblem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, const GemmOutput& out);
void sweep_avx512_vnni(const GemmProblem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, const GemmOutput& out);
void sweep_amx(const GemmProblem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, const GemmOutput& out);
// Packs rows [n0, n0 + 64) of B into `panel` (panel_bytes(K), 64-byte aligned), then runs
// rows [m0, m1) of A against it.
void pack_panel_avx512_vnni(const int8_t* B, int64_t N, int64_t K, int64_t n0, uint8_t* panel);
void sweep_panel_avx512_vnni(const GemmProblem& p, const uint8_t* panel, int64_t m0, int64_t m1, int64_t n0, const GemmOutput& out);
void row_sums_avx512_vnni(const int8_t* A, int64_t M, int64_t K, int32_t* sums);
int64_t amx_row_groups(int64_t M);  // 16-row groups of A, the last one zero-padded
int64_t amx_packed_bytes(int64_t M, int64_t K);
void pack_activation_amx(const int8_t* A, int64_t M, int64_t K, int64_t first_group, int64_t last_group, int8_t* packed);
bool amx_self_check();  // the AMX kernel against plain int32 arithmetic (needs AMX)
// The outlier part of a bf16 activation and weight in AMX-BF16 tiles (gemm_amx.cpp): W
// [count, N] (fp32 holding bf16 values) packed by groups of 16 outputs, then out [M, N] =
// X [M, count] @ W for groups of 16 rows.
int64_t amx_bf16_weight_elements(int64_t count, int64_t N);
void pack_outlier_weight_amx_bf16(const float* W, int64_t count, int64_t N, int64_t first_group, int64_t last_group, uint16_t* packed);
void outlier_rows_amx_bf16(const float* X, int64_t M, int64_t count, const uint16_t* packed_weight, int64_t N, int64_t first_group,
                           int64_t last_group, float* out);
bool amx_bf16_self_check();  // the bf16 tiles against exact arithmetic (needs AMX-BF16)

// The whole GEMM with `kernel`, shared by torch's threads (gemm.cpp).
void int8_gemm(Kernel kernel, const int8_t* A, const int8_t* B, int64_t M, int64_t N, int64_t K, const GemmOutput& out);

// One of several products of the same A [M, K]: its own B [N, K] and output.
struct GemmSegment {
  const int8_t* B;
  int64_t N;
  const GemmOutput* out;
};
// Every product A @ B^T of `products` with `kernel`, as one piece of work for the threads.
void int8_gemm(Kernel kernel, const int8_t* A, int64_t M, int64_t K, const std::vector<GemmSegment>& products);

// ---------------------------------------------------------------- quantization and outliers

// CA int8 [M, K] and SCA fp32 [M] of X [M, K] (contiguous; fp32, or bf16 / fp16 read as their
// exact fp32 values), bit-exact with reference.quantize_activation; returns the outlier
// columns in ascending order. use_threshold is the caller's `threshold > 0` (decided in
// double). (quantize.cpp)
template <class T>
std::vector<int64_t> quantize_activation(const T* X, int64_t M, int64_t K, bool use_threshold, float threshold, int8_t* CA, float* SCA,
                                         QuantizerIsa isa);

// quantize.cpp's row functions with AVX-512 (quantize_avx512.cpp): the absmax of a row's
// non-outlier elements (marking its outliers), and its quantized values where the row's
// scale allows the short path (false: the caller quantizes the row with quantize.cpp's).
template <class T>
float row_absmax_avx512(const T* x, int64_t K, float threshold, bool use_threshold, uint8_t* outlier);
template <class T>
bool quantize_row_avx512(const T* x, int64_t K, float absmax, int8_t* out);

// out [M, count] fp32 = X[:, columns] (OutlierColumns::X). (quantize.cpp)
template <class T>
void gather_outlier_inputs(const T* X, int64_t M, int64_t K, const std::vector<int64_t>& columns, float* out);

// OutlierColumns::X_by_column for X [M, count]: [count, by_column_stride(M)] (the pad left unset).
inline int64_t by_column_stride(int64_t M) { return M + 16; }
inline std::vector<float> transpose_outlier_inputs(const float* X, int64_t M, int64_t count) {
  const int64_t stride = by_column_stride(M);
  std::vector<float> by_column(size_t(count * stride));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t o = 0; o < count; ++o) by_column[o * stride + m] = X[m * count + o];
  return by_column;
}

// out [M, N] = the outlier part of every row and output (OutlierColumns::sum) in a pass of
// its own, column by column (meant for a handful of columns). (outliers.cpp)
void outlier_part(const OutlierColumns& outliers, int64_t M, float* out);

// gathered [count, N] = every OutlierColumns::scaled value, one contiguous row per outlier
// column. (outliers.cpp)
void gather_outlier_columns(const OutlierColumns& outliers, float* gathered);

}  // namespace int8fx
