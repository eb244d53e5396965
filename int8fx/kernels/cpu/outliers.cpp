// The fp outlier part of the LLM.int8() linear, out [M, N] = X[:, O] @ W[:, O]^T in fp32,
// where O (the outlier columns) is a handful of the K columns. Only those columns of the
// weight are read: of the fp weight when the caller kept it, else of CB, dequantized as
// reference.dequantize_rows does (CB * (SCB / 127)).

#include <algorithm>
#include <cstdint>
#include <memory>

#include <ATen/Parallel.h>

#include "kernels.h"

namespace int8fx {

// out[M, N] = X[:, columns] @ Wc^T in fp32, columns in ascending order, Wc being the outlier
// columns of the fp weight or of CB dequantized (OutlierColumns::raw and the scale below).
// Column by column, vectorized over N: wide outlier sets (a tiny threshold) are slower
// than a BLAS matmul would be, but real activations have a handful of outlier columns.
void outlier_part(const OutlierColumns& outliers, int64_t M, float* out) {
  const int64_t count = outliers.count, N = outliers.N;
  const float* X = outliers.X;
  // The columns transposed to [count, N], so each outlier adds one contiguous row (the
  // caller may have gathered them already).
  std::unique_ptr<float[]> own;
  const float* columns_t = outliers.gathered;
  if (columns_t == nullptr) {
    own.reset(new float[count * N]);
    gather_outlier_columns(outliers, own.get());
    columns_t = own.get();
  }
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(N * count, 1));
  at::parallel_for(0, M, grain, [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; ++m) {
      float* row = out + m * N;
      const float x0 = X[m * count];
      for (int64_t n = 0; n < N; ++n) row[n] = x0 * columns_t[n];
      for (int64_t o = 1; o < count; ++o) {
        const float x = X[m * count + o];
        const float* w = columns_t + o * N;
        for (int64_t n = 0; n < N; ++n) row[n] += x * w[n];
      }
    }
  });
}

namespace {

// gathered [count, N] = W[:, columns] for an fp weight of element type T, 16 outputs at a
// time: their 16 rows of W stay in cache over all the columns, and each column's 16 values
// are written to one line.
template <class T>
void gather_fp_columns(const OutlierColumns& outliers, float* gathered) {
  const T* W = static_cast<const T*>(outliers.W.data);
  const int64_t N = outliers.N, count = outliers.count;
  const int64_t row_stride = outliers.W.row_stride, column_stride = outliers.W.column_stride;
  at::parallel_for(0, ceil_div(N, 16), 1, [&](int64_t first, int64_t last) {
    for (int64_t n0 = first * 16; n0 < std::min(N, last * 16); n0 += 16) {
      const int64_t n1 = std::min(N, n0 + 16);
      for (int64_t o = 0; o < count; ++o) {
        const T* column = W + outliers.columns[o] * column_stride;
        for (int64_t n = n0; n < n1; ++n) gathered[o * N + n] = to_float(column[n * row_stride]);
      }
    }
  });
}

}  // namespace

void gather_outlier_columns(const OutlierColumns& outliers, float* gathered) {
  const int64_t N = outliers.N, count = outliers.count;
  if (outliers.W.data && !outliers.gathered) {  // the fp weight: read as it is, by its type
    switch (outliers.W.type) {
      case FpWeight::kFloat32: gather_fp_columns<float>(outliers, gathered); return;
      case FpWeight::kBFloat16: gather_fp_columns<BFloat16Bits>(outliers, gathered); return;
      case FpWeight::kFloat16: gather_fp_columns<HalfBits>(outliers, gathered); return;
    }
  }
  at::parallel_for(0, N, 256, [&](int64_t first, int64_t last) {  // CB's columns, dequantized
    for (int64_t n = first; n < last; ++n)
      for (int64_t o = 0; o < count; ++o) gathered[o * N + n] = outliers.scaled(n, o);
  });
}

}  // namespace int8fx
