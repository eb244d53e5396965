// The fp outlier part of the LLM.int8() linear, out [M, N] = X[:, O] @ W[:, O]^T in fp32,
// where O (the outlier columns) is a handful of the K columns. Only those columns of the
// weight are read: of the fp weight when the caller kept it, else of CB, dequantized as
// reference.dequantize_rows does (CB * (SCB / 127)).

#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include <ATen/Parallel.h>

#include "kernels.h"

namespace int8fx {
namespace {

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
      const float dequantize = SCB[n] / kInt8Max;
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

}  // namespace int8fx
