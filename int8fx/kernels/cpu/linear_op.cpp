// The CPU kernels of int8fx::int8_linear and int8fx::int8_linear_siblings (schemas in
// int8fx/ops.py), and their CPU autograd kernels, registered with the dispatcher when
// int8fx.kernels.cpu.load() loads this library: a compiled graph's call then goes from the
// dispatcher straight here, with no Python in between (per-call overhead is most of the cost
// of a small layer at decode). Argument errors match the messages of
// ops._check_int8_linear_args.
//
// reference.int8_linear in three steps: quantize the rows of X (fp32, or bf16 / fp16 read as
// they are), write the fp outlier part into the output, then the int8 GEMM whose tiles
// dequantize and add the outlier part and the bias as they finish (and round the result to
// bf16 for a bf16 X).
//
// Also defined here, for tests and benchmarks (no schema in ops.py: they exist only where
// this library loads):
//   int8fx::_cpu_int8_linear(..., str kernel)   the same linear with a chosen GEMM kernel
//   int8fx::_cpu_int8_linear_siblings(..., str kernel)   int8_linear_siblings likewise
//   int8fx::_cpu_int8_gemm(A, B, str kernel)    the bare int32 GEMM
//   int8fx::_cpu_quantize_activation(x, threshold, isa) -> (CA, SCA, outlier columns)
//   int8fx::_cpu_kernels() -> str                which kernels this CPU runs, best first
//   int8fx::_cpu_chosen_kernel(M, K) -> str      the GEMM the op picks for that shape here
//   int8fx::_cpu_chosen_quantizer() -> str       the activation quantizer it uses: "avx512" or "avx2"
//   int8fx::_cpu_amx_self_check() -> str         "no AMX", "passed", "failed" or "bf16 failed"
//   int8fx::_cpu_outlier_cache() -> (weights, columns, bytes)   what outlier_cache.cpp keeps
//   int8fx::_cpu_clear_outlier_cache()

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"
#include "outlier_cache.h"

namespace int8fx {
namespace {

// ---------------------------------------------------------------- which GEMM

// The int8 GEMMs a call can use: the kernels of gemm*.cpp, or oneDNN's through at::_int_mm.
enum class Gemm { kAuto, kAvx2, kAvx512Vnni, kAvx512VnniPanels, kAmx, kOneDnn };

Gemm parse_gemm(const std::string& name) {
  if (name == "auto") return Gemm::kAuto;
  if (name == "avx2") return Gemm::kAvx2;
  if (name == "avx512_vnni") return Gemm::kAvx512Vnni;
  if (name == "avx512_vnni_panels") return Gemm::kAvx512VnniPanels;
  if (name == "amx") return Gemm::kAmx;
  if (name == "onednn") return Gemm::kOneDnn;
  TORCH_CHECK(false, "unknown CPU int8 kernel '", name, "'; expected auto, avx2, avx512_vnni, avx512_vnni_panels, amx or onednn");
}

// The choice for an [M, K] x [K, N] product on this CPU, from measurements (AMD EPYC Zen 4,
// 2 threads, ms for the bare int8 GEMM; benchmarks/README.md has the whole op's):
// * the dot-product tiles (avx512_vnni) read CB as it is, and reduce each output once at
//   the end, which a long K amortizes: they win below 12 rows, and below 32 when K >= 1024
//   (dot / panels at M = 8, 24: 0.48 / 0.61, 1.22 / 1.22 on 4096 x 4096; 0.025 / 0.036,
//   0.064 / 0.070 on 1536 x 576; but 0.032 / 0.033, 0.082 / 0.064 on 576 x 1536);
// * the panel kernel packs 64 rows of CB at a time and wins or ties from there, oneDNN
//   (at::_int_mm) included: oneDNN repacks the whole weight on every call (about 3 ms for
//   4096 x 4096) and returns int32 for a pass of its own (panels / dot / oneDNN at M = 512:
//   19.9 / 24.8 / 22.4 on 4096 x 4096, 1.13 / 1.96 / 1.12 on 576 x 1536);
// * with AMX (Intel Xeon, 2 threads, the whole op at threshold 6, us): the tiles run 16 rows
//   of A in the time of one, and win from 4 rows on; below, the dot-product tiles stream
//   the weight a little faster (M = 2 / 4: 334 / 354 against 368 / 366 on 4096 x 4096, 15.4 /
//   20.6 against 18.6 / 18.8 on 1536 x 576; M = 16: 759 against 396, 54 against 25).
// Without VNNI, oneDNN's int8 GEMM is a slow generic loop: AVX2 machines keep int8fx's.
Gemm choose_gemm(int64_t M, int64_t K) {
  constexpr int64_t kAmxMinRows = 4, kPanelMinRows = 12, kPanelMinRowsLongK = 32, kLongK = 1024;
  const CpuFeatures& cpu = cpu_features();
  if (cpu.amx_int8 && M >= kAmxMinRows) return Gemm::kAmx;
  if (cpu.avx512_vnni) {
    const bool dot_products = M < kPanelMinRows || (K >= kLongK && M < kPanelMinRowsLongK);
    return dot_products ? Gemm::kAvx512Vnni : Gemm::kAvx512VnniPanels;
  }
  return Gemm::kAvx2;
}

Kernel kernel_of(Gemm gemm) {
  switch (gemm) {
    case Gemm::kAvx512Vnni: return Kernel::kAvx512Vnni;
    case Gemm::kAvx512VnniPanels: return Kernel::kAvx512VnniPanels;
    case Gemm::kAmx: return Kernel::kAmx;
    default: return Kernel::kAvx2;
  }
}

Gemm resolve(Gemm gemm, int64_t M, int64_t K) {
  if (gemm == Gemm::kAuto) return choose_gemm(M, K);
  if (gemm != Gemm::kOneDnn) {
    const Kernel kernel = kernel_of(gemm);
    TORCH_CHECK(can_run(kernel), "the ", kernel_name(kernel), " int8 kernel needs an instruction set this CPU (or its OS) lacks");
  }
  return gemm;
}

// C = A @ B^T handed to `out` row by row, by the chosen GEMM.
void run_gemm(Gemm gemm, const at::Tensor& A, const at::Tensor& B, const GemmOutput& out) {
  const int64_t M = A.size(0), N = B.size(0), K = A.size(1);
  // torch._int_mm on CPU returns wrong values for K = 1 (torch 2.13, seen on AVX-512 VNNI
  // and AMX machines): that case, trivial anyway, never goes to oneDNN. It also returns
  // garbage for rows of A that are not K apart (a one-row view with row stride 0, which
  // torch counts as contiguous; seen on an AMX machine): such an A goes as a copy.
  if (gemm == Gemm::kOneDnn && K >= 2 && M > 0 && N > 0) {
    const bool rows_k_apart = A.stride(0) == K && A.stride(1) == 1;
    const at::Tensor C32 = at::_int_mm(rows_k_apart ? A : A.clone(at::MemoryFormat::Contiguous), B.t());
    const int32_t* c = C32.data_ptr<int32_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / N), [&](int64_t first, int64_t last) {
      for (int64_t m = first; m < last; ++m) out(m, 0, c + m * N, int(N));
    });
    return;
  }
  const Kernel kernel = gemm == Gemm::kOneDnn ? (can_run(Kernel::kAvx512Vnni) ? Kernel::kAvx512Vnni : Kernel::kAvx2) : kernel_of(gemm);
  int8_gemm(kernel, A.data_ptr<int8_t>(), B.data_ptr<int8_t>(), M, N, K, out);
}

// ---------------------------------------------------------------- the outlier part

FpWeight fp_weight_view(const std::optional<at::Tensor>& weight, at::Tensor& keep_alive) {
  if (!weight.has_value()) return {nullptr, FpWeight::kFloat32, 0, 0};
  keep_alive = *weight;
  FpWeight::Type type;
  switch (keep_alive.scalar_type()) {
    case at::kFloat: type = FpWeight::kFloat32; break;
    case at::kBFloat16: type = FpWeight::kBFloat16; break;
    case at::kHalf: type = FpWeight::kFloat16; break;
    default:  // e.g. float64: rare enough for a copy
      keep_alive = keep_alive.to(at::kFloat);
      type = FpWeight::kFloat32;
  }
  return {keep_alive.data_ptr(), type, keep_alive.stride(0), keep_alive.stride(1)};
}

// At small M the GEMM streams each row of CB once and finishes its outputs right away:
// the outlier columns of a row are added then (GemmOutput), while the row is in cache,
// instead of in a pass of their own that misses the cache once per row of the weight
// (4096 x 4096 at M = 1: threshold 6 cost 1.2x threshold 0 that way). With the fp weight
// they come from its gathered columns instead (outlier_cache.cpp). At larger M the outlier
// part is added by the panels or is a small matmul of its own, below.
constexpr int64_t kFusedOutlierMaxRows = 16;
bool outliers_in_the_gemm(int64_t M, Gemm gemm) { return M < kFusedOutlierMaxRows && gemm != Gemm::kOneDnn; }

// Wide outlier sets go to a matmul of their own (fp32 BLAS, or AMX-BF16 tiles for a bf16
// model: outliers_in_bf16_tiles): the kernel's column-by-column loop re-reads the output
// once per column, which a matmul does not (SmolLM2's last down_proj layers see hundreds
// of outlier columns over a 512-token prompt). A handful of columns, or one row (decode),
// stay in the loop: no gathers, no extra allocations. The AMX epilogue sums 16 rows of a
// tile at once and keeps up to 16 columns (Intel Xeon, 2 threads, bf16 input at M = 512, us,
// epilogue / BLAS: 1536 x 576 377 / 493 at 8 columns, 458 / 543 at 16, 583 / 576 at 32;
// 576 x 1536 402 / 509, 570 / 544); the other kernels' limit is a judgment, not tuned.
bool outliers_by_blas(int64_t M, int64_t count, Gemm gemm) { return M >= 16 && count >= (gemm == Gemm::kAmx ? 16 : 8); }

// The VNNI panels and the AMX tiles add a handful of outlier columns as they dequantize,
// 16 outputs at a time, from the columns gathered first ([count, N]: the weight is read
// once, not once per row of X): no pass of its own over the output (at M = 512 that pass
// and the re-read cost threshold 6 up to 1.25x threshold 0 with the bench's cold caches,
// on the panels; 1.14-1.30x at M = 64-512 with AMX, caches warm).
bool dequantizes_16_wide(Gemm gemm) { return gemm == Gemm::kAvx512VnniPanels || gemm == Gemm::kAmx; }
bool outliers_in_the_epilogue(int64_t M, int64_t count, Gemm gemm) { return dequantizes_16_wide(gemm) && !outliers_by_blas(M, count, gemm); }

// out [M, N] = X[:, columns] @ W_cols^T by an fp32 matmul, W_cols^T [count, N] gathered
// (from the columns kept from call to call, or read for this call: the same values in the
// same layout, so the same bits).
void outlier_part_blas(const at::Tensor& x_outliers, const float* gathered, int64_t count, int64_t N, at::Tensor& out) {
  at::mm_out(out, x_outliers, at::from_blob(const_cast<float*>(gathered), {count, N}, at::kFloat));
}

// ---------------------------------------------------------------- the ops

void check_linear_args(const at::Tensor& x, const at::Tensor& CB, const at::Tensor& SCB, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& weight) {
  TORCH_CHECK(CB.dim() == 2 && CB.scalar_type() == at::kChar, "CB must be a 2-D int8 tensor, got ", CB.scalar_type(), " ", CB.sizes());
  const int64_t N = CB.size(0), K = CB.size(1);
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "int8_linear expects a floating-point input, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "input's last dimension ", x.sizes(), " does not match CB's in_features ", K);
  TORCH_CHECK(SCB.dim() == 1 && SCB.size(0) == N && SCB.scalar_type() == at::kFloat, "SCB must be fp32 [", N, "], got ", SCB.scalar_type(), " ", SCB.sizes());
  if (bias.has_value()) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias must be [", N, "], got ", bias->sizes());
  if (weight.has_value()) TORCH_CHECK(weight->dim() == 2 && weight->size(0) == N && weight->size(1) == K, "weight must be [", N, ", ", K, "], got ", weight->sizes());
  for (const at::Tensor* t : {&x, &CB, &SCB}) TORCH_CHECK(t->device().is_cpu(), "int8_linear's CPU kernel got a tensor on ", t->device());
}

// One linear of a call: its weights, its output, and what its GEMM output reads (kept
// alive, at a fixed address, until the GEMM is done).
struct LinearCall {
  at::Tensor CB, SCB, bias32, weight_alive, out;
  at::Tensor out_bf16;  // for a bf16 input: the result, rounded by the GEMM's epilogue (out: fp32 scratch)
  bool callers_cb = true;  // CB is the caller's tensor, not a contiguous copy
  OutlierColumns outliers;
  std::unique_ptr<float[]> gathered;
  GemmOutput dequantize;
};

// The activation quantized once for every linear that reads it, and its outlier columns.
struct QuantizedInput {
  at::Tensor CA, SCA;
  std::vector<int64_t> columns;
  at::Tensor x_outliers;  // fp32 [M, count]: X[:, columns]; undefined without outliers
  std::vector<float> x_by_column;  // x_outliers by column for the AMX epilogue, made by the first linear that needs it

  const float* outliers_by_column() {
    if (x_by_column.empty()) x_by_column = transpose_outlier_inputs(x_outliers.data_ptr<float>(), CA.size(0), int64_t(columns.size()));
    return x_by_column.data();
  }
};

// CA, SCA, the outlier columns and their values of x [M, K] (contiguous, in an input type
// quantize_activation reads: fp32, bf16, fp16).
template <class T>
void quantize_input(const at::Tensor& x, double threshold, QuantizerIsa isa, QuantizedInput& input) {
  const int64_t M = x.size(0), K = x.size(1);
  const T* X = static_cast<const T*>(x.data_ptr());
  input.CA = at::empty({M, K}, x.options().dtype(at::kChar));
  input.SCA = at::empty({M}, x.options().dtype(at::kFloat));
  input.columns =
      quantize_activation(X, M, K, threshold > 0, float(threshold), input.CA.data_ptr<int8_t>(), input.SCA.data_ptr<float>(), isa);
  if (input.columns.empty()) return;  // the common case at decode: no allocation
  input.x_outliers = at::empty({M, int64_t(input.columns.size())}, x.options().dtype(at::kFloat));
  gather_outlier_inputs(X, M, K, input.columns, input.x_outliers.data_ptr<float>());
}

// x [..., K] as [M, K]: bf16 and fp16 are read as they are (their fp32 values are exact, as
// the reference's .float()), without a converted copy; other types are converted to fp32.
QuantizedInput quantize_input(const at::Tensor& x, int64_t K, double threshold, QuantizerIsa isa = best_quantizer()) {
  QuantizedInput input;
  const at::ScalarType type = x.scalar_type();
  const bool read_as_is = type == at::kFloat || type == at::kBFloat16 || type == at::kHalf;
  const int64_t M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);  // well defined for K = 0 too
  const at::Tensor rows = (read_as_is ? x : x.to(at::kFloat)).reshape({M, K}).contiguous();
  if (type == at::kBFloat16) {
    quantize_input<BFloat16Bits>(rows, threshold, isa, input);
  } else if (type == at::kHalf) {
    quantize_input<HalfBits>(rows, threshold, isa, input);
  } else {
    quantize_input<float>(rows, threshold, isa, input);
  }
  return input;
}

// outlier_part_blas for a bf16 activation and a bf16 weight, in AMX-BF16 tiles (gemm_amx.cpp):
// their products are exact in fp32 and the sums fp32, as BLAS's, at the tile unit's rate
// (SmolLM2's bf16 down_proj at M = 512 with 697 outlier columns: see benchmarks/README.md).
bool outliers_in_bf16_tiles(const LinearCall& call, Gemm gemm, const std::optional<at::Tensor>& weight) {
  return gemm == Gemm::kAmx && cpu_features().amx_bf16 && call.out_bf16.defined() && weight.has_value() &&
         weight->scalar_type() == at::kBFloat16;
}

void outlier_part_amx_bf16(const at::Tensor& x_outliers, const float* gathered, int64_t count, int64_t N, at::Tensor& out) {
  const int64_t M = x_outliers.size(0), n_groups = ceil_div(N, 16), m_groups = ceil_div(M, 16);
  std::unique_ptr<uint16_t[]> packed(new uint16_t[amx_bf16_weight_elements(count, N)]);
  at::parallel_for(0, n_groups, 1, [&](int64_t first, int64_t last) {
    pack_outlier_weight_amx_bf16(gathered, count, N, first, last, packed.get());
  });
  at::parallel_for(0, m_groups, 1, [&](int64_t first, int64_t last) {
    outlier_rows_amx_bf16(x_outliers.data_ptr<float>(), M, count, packed.get(), N, first, last, out.data_ptr<float>());
  });
}

// Writes the outlier part where the chosen path wants it: in the output before the GEMM,
// or set up for the GEMM's tiles to add.
void prepare_outliers(LinearCall& call, QuantizedInput& input, Gemm gemm, const std::optional<at::Tensor>& weight) {
  const int64_t M = input.CA.size(0), K = input.CA.size(1), N = call.CB.size(0);
  const FpWeight fp_weight = fp_weight_view(weight, call.weight_alive);
  const float* x_outliers = input.columns.empty() ? nullptr : input.x_outliers.data_ptr<float>();
  call.outliers = OutlierColumns{x_outliers, K, input.columns.data(), int64_t(input.columns.size()), fp_weight,
                                 call.CB.data_ptr<int8_t>(), call.SCB.data_ptr<float>(), N};
  if (input.columns.empty()) return;
  const int64_t count = call.outliers.count;
  // The columns are gathered first, from those kept from call to call (outlier_cache.cpp),
  // unless the tiles of one row (decode) add them from the rows of CB they have just read.
  // With more rows each row of CB would be dequantized once per row of X: reading the
  // gathered columns instead took threshold 6 from 1.14-1.69x threshold 0 to 1.08-1.23x on
  // SmolLM2's shapes at M = 2-8 (3 outlier columns, no fp weight, AMD EPYC Zen 4; equal at
  // M = 1). But columns past what the cache keeps are gathered from CB's scattered elements
  // on every call: with the weights from memory, 8-16 columns of 576 x 1536 at M = 2-8 took
  // 1.12-1.90x the time that way, so such sets stay on CB's rows. A set too wide to keep
  // (BLAS's: hundreds of columns in SmolLM2's last down_proj layers over a prompt) is
  // gathered for this call alone.
  const bool by_blas = outliers_by_blas(M, count, gemm);
  const bool tiles_read_cb = !by_blas && !weight.has_value() && outliers_in_the_gemm(M, gemm) && !dequantizes_16_wide(gemm);
  const bool from_cb_rows = tiles_read_cb && (M == 1 || count > kept_columns_capacity(K));
  if (!from_cb_rows) {
    call.gathered.reset(new float[count * N]);
    if (by_blas && count > kept_columns_capacity(K)) {
      gather_outlier_columns(call.outliers, call.gathered.get());
    } else if (!weight.has_value() && call.callers_cb) {
      gather_kept_outlier_columns(call.CB, call.CB, call.outliers, call.gathered.get());
    } else if (weight.has_value() && call.weight_alive.is_same(*weight) && call.callers_cb) {
      gather_kept_outlier_columns(*weight, call.CB, call.outliers, call.gathered.get());
    } else {  // a converted copy, a new tensor every call: nothing worth keeping
      gather_outlier_columns(call.outliers, call.gathered.get());
    }
    call.outliers.gathered = call.gathered.get();
  }
  if (by_blas) {
    if (outliers_in_bf16_tiles(call, gemm, weight)) {
      outlier_part_amx_bf16(input.x_outliers, call.outliers.gathered, count, N, call.out);
    } else {
      outlier_part_blas(input.x_outliers, call.outliers.gathered, count, N, call.out);
    }
    call.dequantize.add_outliers = true;
    return;
  }
  if (outliers_in_the_epilogue(M, call.outliers.count, gemm) || outliers_in_the_gemm(M, gemm)) {
    call.dequantize.outliers = &call.outliers;
    if (gemm == Gemm::kAmx) {  // its epilogue sums 16 rows at a time: X by column
      call.outliers.X_by_column = input.outliers_by_column();  // once for all the sibling linears
      call.outliers.X_by_column_stride = by_column_stride(M);
    }
  } else {
    outlier_part(call.outliers, M, call.out.data_ptr<float>());
    call.dequantize.add_outliers = true;
  }
}

// reference.int8_linear of x with each (CB, SCB, bias, weight) of the lists: x is quantized,
// and its outlier columns found, once for all of them (sibling linears: q/k/v, gate/up),
// and their GEMMs run as one (int8_gemm's products). Each output is exactly the one linear's.
std::vector<at::Tensor> linears_with(Gemm gemm, const at::Tensor& x, at::TensorList CB, at::TensorList SCB,
                                     const std::vector<std::optional<at::Tensor>>& bias, double threshold,
                                     const std::vector<std::optional<at::Tensor>>& weight) {
  const size_t count = CB.size();
  TORCH_CHECK(count >= 1 && SCB.size() == count && bias.size() == count && weight.size() == count,
              "int8_linear_siblings needs as many CB, SCB, bias and weight entries, at least one; got ", CB.size(), ", ",
              SCB.size(), ", ", bias.size(), ", ", weight.size());
  for (size_t i = 0; i < count; ++i) check_linear_args(x, CB[i], SCB[i], bias[i], weight[i]);
  const int64_t K = CB[0].size(1);
  QuantizedInput input = quantize_input(x, K, threshold);
  const int64_t M = input.CA.size(0);
  gemm = resolve(gemm, M, K);
  std::vector<LinearCall> calls(count);  // sized once: the GEMM outputs point into it
  std::vector<GemmSegment> products;
  for (size_t i = 0; i < count; ++i) {
    LinearCall& call = calls[i];
    call.CB = CB[i].contiguous();
    call.callers_cb = call.CB.is_same(CB[i]);
    call.SCB = SCB[i].contiguous();
    const int64_t N = call.CB.size(0);
    call.out = at::empty({M, N}, input.SCA.options());
    if (bias[i].has_value()) call.bias32 = bias[i]->to(at::kFloat).contiguous();
    call.dequantize.out = call.out.data_ptr<float>();
    if (x.scalar_type() == at::kBFloat16) {  // no fp32 result to convert afterwards
      call.out_bf16 = at::empty({M, N}, input.SCA.options().dtype(at::kBFloat16));
      call.dequantize.out_bf16 = reinterpret_cast<uint16_t*>(call.out_bf16.data_ptr());
    }
    call.dequantize.ldc = N;
    call.dequantize.SCA = input.SCA.data_ptr<float>();
    call.dequantize.SCB = call.SCB.data_ptr<float>();
    call.dequantize.bias = bias[i].has_value() ? call.bias32.data_ptr<float>() : nullptr;
    prepare_outliers(call, input, gemm, weight[i]);
    products.push_back(GemmSegment{call.CB.data_ptr<int8_t>(), N, &call.dequantize});
  }
  if (gemm == Gemm::kOneDnn) {
    for (LinearCall& call : calls) run_gemm(gemm, input.CA, call.CB, call.dequantize);
  } else {
    int8_gemm(kernel_of(gemm), input.CA.data_ptr<int8_t>(), M, K, products);
  }
  std::vector<at::Tensor> outputs;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  for (LinearCall& call : calls) {
    shape.back() = call.CB.size(0);
    outputs.push_back((call.out_bf16.defined() ? call.out_bf16 : call.out.to(x.scalar_type())).reshape(shape));
  }
  return outputs;
}

template <class List>
std::vector<std::optional<at::Tensor>> optionals(const List& list) {
  std::vector<std::optional<at::Tensor>> values;
  for (size_t i = 0; i < list.size(); ++i) values.push_back(list.get(i));
  return values;
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& CB, const at::Tensor& SCB, const std::optional<at::Tensor>& bias,
                           double threshold, const std::optional<at::Tensor>& weight) {
  return linears_with(Gemm::kAuto, x, {CB}, {SCB}, {bias}, threshold, {weight})[0];
}

at::Tensor int8_linear_with_kernel(const at::Tensor& x, const at::Tensor& CB, const at::Tensor& SCB,
                                   const std::optional<at::Tensor>& bias, double threshold,
                                   const std::optional<at::Tensor>& weight, std::string kernel) {
  return linears_with(parse_gemm(kernel), x, {CB}, {SCB}, {bias}, threshold, {weight})[0];
}

std::vector<at::Tensor> int8_linear_siblings_cpu(const at::Tensor& x, at::TensorList CB, at::TensorList SCB,
                                                 const c10::List<std::optional<at::Tensor>>& bias, double threshold,
                                                 const c10::List<std::optional<at::Tensor>>& weight) {
  return linears_with(Gemm::kAuto, x, CB, SCB, optionals(bias), threshold, optionals(weight));
}

std::vector<at::Tensor> int8_linear_siblings_with_kernel(const at::Tensor& x, at::TensorList CB, at::TensorList SCB,
                                                         const c10::List<std::optional<at::Tensor>>& bias, double threshold,
                                                         const c10::List<std::optional<at::Tensor>>& weight, std::string kernel) {
  return linears_with(parse_gemm(kernel), x, CB, SCB, optionals(bias), threshold, optionals(weight));
}

// ---------------------------------------------------------------- autograd
//
// The ops' autograd kernels for CPU tensors. Without a gradient to track (inference, the
// compiled decode step) they hand the call straight to the kernel below; ops.py's Python
// autograd kernel does the same, at about 2.5 us per call (6 us for siblings), a third of a
// small layer's time at decode. With one, they call int8fx::_int8_linear_with_grad (ops.py:
// the autograd.Function), once per sibling.

using LinearSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double,
                                   const std::optional<at::Tensor>&);
using SiblingsSignature = std::vector<at::Tensor>(const at::Tensor&, at::TensorList, at::TensorList,
                                                  const c10::List<std::optional<at::Tensor>>&, double,
                                                  const c10::List<std::optional<at::Tensor>>&);

c10::TypedOperatorHandle<LinearSignature> linear_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<LinearSignature>();
}

// Whether the call must track a gradient (for x or a bias; quantized weights get none).
bool needs_grad(const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  return at::GradMode::is_enabled() && (x.requires_grad() || (bias.has_value() && bias->requires_grad()));
}

bool needs_grad(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& bias) {
  for (size_t i = 0; i < bias.size(); ++i)
    if (needs_grad(x, bias.get(i))) return true;
  return needs_grad(x, std::nullopt);
}

at::Tensor int8_linear_autograd(c10::DispatchKeySet keys, const at::Tensor& x, const at::Tensor& CB, const at::Tensor& SCB,
                                const std::optional<at::Tensor>& bias, double threshold, const std::optional<at::Tensor>& weight) {
  if (needs_grad(x, bias)) {
    static const auto with_grad = linear_op("int8fx::_int8_linear_with_grad");
    return with_grad.call(x, CB, SCB, bias, threshold, weight);
  }
  static const auto op = linear_op("int8fx::int8_linear");
  return op.redispatch(keys & c10::after_autograd_keyset, x, CB, SCB, bias, threshold, weight);
}

std::vector<at::Tensor> int8_linear_siblings_autograd(c10::DispatchKeySet keys, const at::Tensor& x, at::TensorList CB,
                                                      at::TensorList SCB, const c10::List<std::optional<at::Tensor>>& bias,
                                                      double threshold, const c10::List<std::optional<at::Tensor>>& weight) {
  if (needs_grad(x, bias)) {  // one int8_linear per sibling, each with its gradients
    static const auto with_grad = linear_op("int8fx::_int8_linear_with_grad");
    std::vector<at::Tensor> outputs;
    for (size_t i = 0; i < CB.size(); ++i) outputs.push_back(with_grad.call(x, CB[i], SCB[i], bias.get(i), threshold, weight.get(i)));
    return outputs;
  }
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("int8fx::int8_linear_siblings", "").typed<SiblingsSignature>();
  return op.redispatch(keys & c10::after_autograd_keyset, x, CB, SCB, bias, threshold, weight);
}

at::Tensor int8_gemm_op(const at::Tensor& A, const at::Tensor& B, std::string kernel) {
  TORCH_CHECK(A.scalar_type() == at::kChar && B.scalar_type() == at::kChar, "int8 inputs expected, got ", A.scalar_type(), " and ", B.scalar_type());
  TORCH_CHECK(A.dim() == 2 && B.dim() == 2 && A.size(1) == B.size(1), "shapes ", A.sizes(), " and ", B.sizes(), " do not chain");
  TORCH_CHECK(A.device().is_cpu() && B.device().is_cpu(), "CPU tensors expected");
  const at::Tensor A_c = A.contiguous(), B_c = B.contiguous();
  at::Tensor C = at::empty({A.size(0), B.size(0)}, A.options().dtype(at::kInt));
  GemmOutput store;
  store.c32 = C.data_ptr<int32_t>();
  store.ldc = B.size(0);
  run_gemm(resolve(parse_gemm(kernel), A.size(0), A.size(1)), A_c, B_c, store);
  return C;
}

// "auto": the fastest this CPU runs; "avx2" or "avx512": that one (the tests compare them).
QuantizerIsa parse_quantizer(const std::string& name) {
  if (name == "auto") return best_quantizer();
  if (name == "avx2") return QuantizerIsa::kAvx2;
  TORCH_CHECK(name == "avx512", "unknown activation quantizer '", name, "'; expected auto, avx2 or avx512");
  TORCH_CHECK(best_quantizer() == QuantizerIsa::kAvx512, "the avx512 activation quantizer needs AVX-512 F/BW/VL, which this CPU lacks");
  return QuantizerIsa::kAvx512;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_activation_op(const at::Tensor& x, double threshold, const std::string& isa) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "a 2-D CPU tensor expected, got ", x.sizes(), " on ", x.device());
  QuantizedInput input = quantize_input(x, x.size(1), threshold, parse_quantizer(isa));
  at::Tensor index = at::empty({int64_t(input.columns.size())}, input.SCA.options().dtype(at::kLong));
  std::copy(input.columns.begin(), input.columns.end(), index.data_ptr<int64_t>());
  return {input.CA, input.SCA, index};
}

std::string chosen_quantizer_op() { return best_quantizer() == QuantizerIsa::kAvx512 ? "avx512" : "avx2"; }

std::string chosen_kernel_op(int64_t M, int64_t K) {
  const Gemm gemm = choose_gemm(M, K);
  return gemm == Gemm::kOneDnn ? "onednn" : kernel_name(kernel_of(gemm));
}

std::tuple<int64_t, int64_t, int64_t> outlier_cache_op() {
  const OutlierCacheStats stats = outlier_cache_stats();
  return {stats.weights, stats.columns, stats.bytes};
}

void clear_outlier_cache_op() { clear_outlier_cache(); }

std::string amx_self_check_op() {
  const CpuFeatures& cpu = cpu_features();
  if (!cpu.amx_hardware) return "no AMX";
  if (!cpu.amx_int8) return "failed";
  return cpu.amx_bf16_hardware && !cpu.amx_bf16 ? "bf16 failed" : "passed";
}

std::string kernels_op() {
  std::string names;
  for (Kernel kernel : {Kernel::kAmx, Kernel::kAvx512VnniPanels, Kernel::kAvx512Vnni, Kernel::kAvx2}) {
    if (!can_run(kernel)) continue;
    if (!names.empty()) names += ",";
    names += kernel_name(kernel);
  }
  return names;
}

}  // namespace
}  // namespace int8fx

TORCH_LIBRARY_FRAGMENT(int8fx, m) {
  m.def("_cpu_int8_linear(Tensor x, Tensor CB, Tensor SCB, Tensor? bias, float threshold, Tensor? weight, str kernel) -> Tensor");
  m.def("_cpu_int8_linear_siblings(Tensor x, Tensor[] CB, Tensor[] SCB, Tensor?[] bias, float threshold, Tensor?[] weight, str kernel) -> Tensor[]");
  m.def("_cpu_int8_gemm(Tensor A, Tensor B, str kernel='auto') -> Tensor");
  m.def("_cpu_quantize_activation(Tensor x, float threshold, str isa='auto') -> (Tensor, Tensor, Tensor)");
  // No tensor argument: one kernel for every dispatch key.
  m.def("_cpu_kernels() -> str", &int8fx::kernels_op);
  m.def("_cpu_chosen_kernel(int M, int K) -> str", &int8fx::chosen_kernel_op);
  m.def("_cpu_chosen_quantizer() -> str", &int8fx::chosen_quantizer_op);
  m.def("_cpu_amx_self_check() -> str", &int8fx::amx_self_check_op);
  m.def("_cpu_outlier_cache() -> (int, int, int)", &int8fx::outlier_cache_op);
  m.def("_cpu_clear_outlier_cache() -> ()", &int8fx::clear_outlier_cache_op);
}

TORCH_LIBRARY_IMPL(int8fx, AutogradCPU, m) {
  m.impl("int8_linear", &int8fx::int8_linear_autograd);
  m.impl("int8_linear_siblings", &int8fx::int8_linear_siblings_autograd);
}

TORCH_LIBRARY_IMPL(int8fx, CPU, m) {
  m.impl("int8_linear", &int8fx::int8_linear_cpu);
  m.impl("_cpu_int8_linear", &int8fx::int8_linear_with_kernel);
  m.impl("int8_linear_siblings", &int8fx::int8_linear_siblings_cpu);
  m.impl("_cpu_int8_linear_siblings", &int8fx::int8_linear_siblings_with_kernel);
  m.impl("_cpu_int8_gemm", &int8fx::int8_gemm_op);
  m.impl("_cpu_quantize_activation", &int8fx::quantize_activation_op);
}
