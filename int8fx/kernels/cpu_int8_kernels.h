// The fused int8 linear of cpu_int8_gemm.cpp, for the op registration in
// cpu_int8_linear_op.cpp (kept apart so the kernels compile without torch's heavy headers).
#pragma once

#include <cstdint>

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

// out [M, N] fp32 = reference.int8_linear(X, CB, SCB, bias, threshold, W) for X fp32 [M, K],
// CB int8 [N, K] with no -128 and SCB fp32 [N] (all contiguous), bias fp32 [N] or null.
// use_threshold is the caller's `threshold > 0` (decided in double). The outlier part is
// accumulated in fp32.
void int8_linear(const float* X, int64_t M, int64_t K, const int8_t* CB, const float* SCB, int64_t N,
                 const FpWeight& W, const float* bias, bool use_threshold, float threshold, float* out);

}  // namespace int8fx
