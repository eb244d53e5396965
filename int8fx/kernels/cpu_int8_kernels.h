// The fused int8 linear of cpu_int8_gemm.cpp, for the op registration in
// cpu_int8_linear_op.cpp (kept apart so the kernels compile without torch's heavy headers).
#pragma once

#include <cstdint>
#include <vector>

namespace int8fx {

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

// The three steps of reference.int8_linear for an fp32 X [M, K], CB int8 [N, K] with no
// -128 and SCB fp32 [N] (all contiguous); cpu_int8_linear_op.cpp chains them.

// CA int8 [M, K] and SCA fp32 [M] of X, bit-exact with reference.quantize_activation;
// returns the outlier columns in ascending order. use_threshold is the caller's
// `threshold > 0` (decided in double).
std::vector<int64_t> quantize_activation(const float* X, int64_t M, int64_t K, bool use_threshold, float threshold,
                                         int8_t* CA, float* SCA);

// out [M, N] = X[:, columns] @ W[:, columns]^T accumulated in fp32, column by column
// (meant for a handful of columns).
void outlier_part(const float* X, int64_t M, int64_t K, const std::vector<int64_t>& columns, const FpWeight& W,
                  const int8_t* CB, const float* SCB, int64_t N, float* out);

// out [M, N] = (dequantize(CA @ CB^T) (+ out, when add_outliers)) (+ bias, when not null),
// each step rounded in fp32 in the reference's order.
void gemm_dequantize(const int8_t* CA, const int8_t* CB, const float* SCA, const float* SCB, int64_t M, int64_t N,
                     int64_t K, const float* bias, bool add_outliers, float* out);

}  // namespace int8fx
