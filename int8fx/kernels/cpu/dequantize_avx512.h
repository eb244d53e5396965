// GemmOutput's dequantization 16 outputs at a time, for the kernels whose tiles finish 16
// int32 dot products of a row in one AVX-512 register (the VNNI panels, the AMX tiles).
// GemmOutput takes its int32 values from memory 8 at a time; these keep them in registers.
// Every lane does the same fp32 operations in the same order as GemmOutput, so the same bits.
//
// Included by files compiled with AVX-512 switched on (#pragma GCC target), after the pragma:
// the functions take their instruction set from the including file.
#pragma once

#include "kernels.h"

namespace int8fx {

// OutlierColumns::sum for outputs n..n+15 of row m, from the gathered columns (set by the
// caller: linear_op.cpp gathers them for the kernels that dequantize here).
inline __m512 outlier_sum16(const OutlierColumns& outliers, int64_t m, int64_t n, __mmask16 mask) {
  const float* x = outliers.X + m * outliers.count;
  __m512 y = _mm512_setzero_ps();
  for (int64_t o = 0; o < outliers.count; ++o) {
    const __m512 w = _mm512_maskz_loadu_ps(mask, outliers.gathered + o * outliers.N + n);
    const __m512 product = _mm512_mul_ps(_mm512_set1_ps(x[o]), w);
    y = o == 0 ? product : _mm512_add_ps(y, product);
  }
  return y;
}

// outlier_sum16 for the 16 rows m .. m + 15 of a tile at once, from X by column (rows past
// M read the padding; their sums go unused). One row at a time, a tile's epilogue waits on a
// chain of `count` dependent adds per row; here the 16 rows' chains are independent and each
// sum stays in a register, and a column's 16 X values are broadcasts at fixed offsets from
// one pointer. Same operations in the same order (mul, then add, each rounding): same bits.
inline void outlier_sums16(const OutlierColumns& outliers, int64_t m, int64_t n, __mmask16 mask, __m512 (&sums)[16]) {
  for (int64_t o = 0; o < outliers.count; ++o) {
    const float* x = outliers.X_by_column + o * outliers.X_by_column_stride + m;
    const __m512 w = _mm512_maskz_loadu_ps(mask, outliers.gathered + o * outliers.N + n);
    if (o == 0) {
      _Pragma("GCC unroll 16") for (int r = 0; r < 16; ++r) sums[r] = _mm512_mul_ps(_mm512_set1_ps(x[r]), w);
    } else {
      _Pragma("GCC unroll 16") for (int r = 0; r < 16; ++r) sums[r] = _mm512_add_ps(sums[r], _mm512_mul_ps(_mm512_set1_ps(x[r]), w));
    }
  }
}

// to_bf16 (kernels.h) for 16 lanes: torch's rounding to nearest even, NaN to 0x7FC0.
inline __m256i to_bf16(__m512 y) {
  const __m512i bits = _mm512_castps_si512(y);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(_mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), rounded, _mm512_set1_epi32(0x7FC0)));
}

// out[m, n .. n+15] (the lanes of `mask`) = value * (SCA[m] * SCB[n]) / 127^2, then the
// outlier part (already in the output, or from the gathered columns: outlier_sum, or
// computed here when that is null), then the bias.
inline void dequantize16(const GemmOutput& out, __m512i value, int64_t m, int64_t n, __mmask16 mask, const __m512* outlier_sum = nullptr) {
  float* row = out.out + m * out.ldc + n;
  const __m512 sa = _mm512_set1_ps(out.SCA[m]);
  const __m512 scb = _mm512_maskz_loadu_ps(mask, out.SCB + n);
  __m512 y = _mm512_div_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(value), _mm512_mul_ps(sa, scb)), _mm512_set1_ps(kInt8MaxSquared));
  if (out.add_outliers) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, row));
  if (out.outliers) y = _mm512_add_ps(y, outlier_sum ? *outlier_sum : outlier_sum16(*out.outliers, m, n, mask));
  if (out.bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, out.bias + n));
  if (out.out_bf16) {
    _mm256_mask_storeu_epi16(out.out_bf16 + m * out.ldc + n, mask, to_bf16(y));
  } else {
    _mm512_mask_storeu_ps(row, mask, y);
  }
}

}  // namespace int8fx
