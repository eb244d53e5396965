// The CPU kernel of int8fx::int8_linear (schema in int8fx/ops.py), registered with the
// dispatcher when cpu_int8_gemm.py loads this library: a compiled graph's call then goes
// from the dispatcher straight to the AVX2 kernels, with no Python in between. Argument
// errors match the messages of ops._check_int8_linear_args.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <memory>
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

// Wide outlier sets go to BLAS: the kernel's column-by-column loop re-reads the output
// once per column, which a matmul does not (SmolLM2's last down_proj layers see hundreds
// of outlier columns over a 512-token prompt). A handful of columns, or one row (decode),
// stay in the loop: no gathers, no extra allocations. (The two limits are a judgment, not
// tuned: the next thing to measure if outlier-heavy prefill matters.)
bool outliers_by_blas(int64_t M, int64_t count) { return M >= 16 && count >= 8; }

// out [M, N] = X[:, columns] @ W_cols^T by an fp32 matmul, W_cols from the fp weight or,
// without one, the dequantized CB columns (CB * (SCB / 127), as reference.dequantize_rows).
void outlier_part_blas(const at::Tensor& x32, std::vector<int64_t>& columns, const std::optional<at::Tensor>& weight,
                       const at::Tensor& CB, const at::Tensor& SCB, at::Tensor& out) {
  const at::Tensor index = at::from_blob(columns.data(), {int64_t(columns.size())}, at::kLong);
  at::Tensor w_columns;
  if (weight.has_value()) {
    w_columns = weight->index_select(1, index).to(at::kFloat);
  } else {
    w_columns = CB.index_select(1, index).to(at::kFloat).mul(SCB.div(127.0).unsqueeze(1));
  }
  at::mm_out(out, x32.index_select(1, index), w_columns.t());
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
  const int64_t M = x32.size(0);
  at::Tensor out = at::empty({M, N}, x32.options());
  std::unique_ptr<int8_t[]> CA(new int8_t[std::max<int64_t>(M * K, 1)]);
  std::unique_ptr<float[]> SCA(new float[std::max<int64_t>(M, 1)]);
  std::vector<int64_t> columns =
      int8fx::quantize_activation(x32.data_ptr<float>(), M, K, threshold > 0, float(threshold), CA.get(), SCA.get());
  if (!columns.empty() && outliers_by_blas(M, int64_t(columns.size()))) {
    outlier_part_blas(x32, columns, weight, CB_c, SCB_c, out);
  } else if (!columns.empty()) {
    at::Tensor weight_alive;
    const int8fx::FpWeight fp_weight = fp_weight_view(weight, weight_alive);
    int8fx::outlier_part(x32.data_ptr<float>(), M, K, columns, fp_weight, CB_c.data_ptr<int8_t>(), SCB_c.data_ptr<float>(), N,
                         out.data_ptr<float>());
  }
  int8fx::gemm_dequantize(CA.get(), CB_c.data_ptr<int8_t>(), SCA.get(), SCB_c.data_ptr<float>(), M, N, K,
                          bias.has_value() ? bias32.data_ptr<float>() : nullptr, !columns.empty(), out.data_ptr<float>());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return out.to(x.scalar_type()).reshape(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(int8fx, CPU, m) {
  m.impl("int8_linear", &int8_linear_cpu);
}
