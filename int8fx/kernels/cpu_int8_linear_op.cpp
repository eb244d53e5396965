// The CPU kernel of int8fx::int8_linear (schema in int8fx/ops.py), registered with the
// dispatcher when cpu_int8_gemm.py loads this library: a compiled graph's call then goes
// from the dispatcher straight to the AVX2 kernels, with no Python in between. Argument
// errors match the messages of ops._check_int8_linear_args.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "cpu_int8_kernels.h"

namespace {

int8fx::FpWeight fp_weight_view(const std::optional<at::Tensor>& weight, at::Tensor& keep_alive) {
  if (!weight.has_value()) return {nullptr, int8fx::FpWeight::kFloat32, 0, 0};
  keep_alive = *weight;
  int8fx::FpWeight::Type type;
  switch (keep_alive.scalar_type()) {
    case at::kFloat: type = int8fx::FpWeight::kFloat32; break;
    case at::kBFloat16: type = int8fx::FpWeight::kBFloat16; break;
    case at::kHalf: type = int8fx::FpWeight::kFloat16; break;
    default:  // e.g. float64: rare enough for a copy
      keep_alive = keep_alive.to(at::kFloat);
      type = int8fx::FpWeight::kFloat32;
  }
  return {keep_alive.data_ptr(), type, keep_alive.stride(0), keep_alive.stride(1)};
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& CB, const at::Tensor& SCB,
                           const std::optional<at::Tensor>& bias, double threshold,
                           const std::optional<at::Tensor>& weight) {
  TORCH_CHECK(CB.dim() == 2 && CB.scalar_type() == at::kChar, "CB must be a 2-D int8 tensor, got ", CB.scalar_type(), " ", CB.sizes());
  const int64_t N = CB.size(0), K = CB.size(1);
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "int8_linear expects a floating-point input, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "input's last dimension ", x.sizes(), " does not match CB's in_features ", K);
  TORCH_CHECK(SCB.dim() == 1 && SCB.size(0) == N && SCB.scalar_type() == at::kFloat, "SCB must be fp32 [", N, "], got ", SCB.scalar_type(), " ", SCB.sizes());
  if (bias.has_value()) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias must be [", N, "], got ", bias->sizes());
  if (weight.has_value()) TORCH_CHECK(weight->dim() == 2 && weight->size(0) == N && weight->size(1) == K, "weight must be [", N, ", ", K, "], got ", weight->sizes());
  for (const at::Tensor* t : {&x, &CB, &SCB}) TORCH_CHECK(t->device().is_cpu(), "int8_linear's CPU kernel got a tensor on ", t->device());

  // fp32 conversion is exact for fp16/bf16 inputs, as the reference's .float().
  const at::Tensor x32 = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const at::Tensor CB_c = CB.contiguous(), SCB_c = SCB.contiguous();
  at::Tensor bias32;
  if (bias.has_value()) bias32 = bias->to(at::kFloat).contiguous();
  at::Tensor weight_alive;
  const int8fx::FpWeight fp_weight = fp_weight_view(weight, weight_alive);
  const int64_t M = x32.size(0);
  at::Tensor out = at::empty({M, N}, x32.options());
  int8fx::int8_linear(x32.data_ptr<float>(), M, K, CB_c.data_ptr<int8_t>(), SCB_c.data_ptr<float>(), N, fp_weight,
                      bias.has_value() ? bias32.data_ptr<float>() : nullptr, threshold > 0, float(threshold),
                      out.data_ptr<float>());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return out.to(x.scalar_type()).reshape(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(int8fx, CPU, m) {
  m.impl("int8_linear", &int8_linear_cpu);
}
