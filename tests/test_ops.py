"""The ``int8fx`` custom ops against the reference: exact int8 parts, bounded fp parts."""

import pytest
import torch

import int8fx.ops  # noqa: F401
from int8fx import reference
from int8fx.kernels import cpu
from int8fx.kernels.cpu import torch_path

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def activations(M, K, dtype, outlier_columns=(), magnitude=30.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    for c in outlier_columns:
        x[:, c] = magnitude * torch.sign(torch.randn(M, generator=g))
    return x.to(dtype)


def weights(N, K, seed=1):
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) / K**0.5


def test_torch_path_int8_mm_is_exact():
    # Extreme values everywhere: any fp accumulation of 127*127*K would lose low bits.
    g = torch.Generator().manual_seed(0)
    CA = torch.randint(-127, 128, (5, 3000), dtype=torch.int8, generator=g)
    CB = torch.randint(-127, 128, (9, 3000), dtype=torch.int8, generator=g)
    assert torch.equal(torch_path.int8_mm(CA, CB), reference.int8_matmul(CA, CB))


def _rounding_bound(y_ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Where the op and the reference may differ: summation order of the fp outlier matmul
    (<= n_outliers * eps * sum |x_o||w_o|) plus one final rounding to the output dtype."""
    eps = torch.finfo(x.dtype).eps
    x_o = x.float()[:, columns].abs()
    w_o = w.float()[:, columns].abs()
    return columns.sum() * eps * (x_o @ w_o.t()) + eps * y_ref.float().abs()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("fp_weight", [True, False])
def test_int8_linear_matches_reference(dtype, threshold, with_bias, fp_weight):
    x = activations(11, 40, dtype, outlier_columns=(0, 17))
    W = weights(13, 40)
    bias = torch.randn(13) if with_bias else None
    CB, SCB = torch.ops.int8fx.quantize_weight(W)
    w = W if fp_weight else None
    y = torch.ops.int8fx.int8_linear(x, CB, SCB, bias, threshold, w)
    y_ref = reference.int8_linear(x, CB, SCB, bias, threshold, w)
    assert y.dtype == dtype and y.shape == (11, 13)
    columns = reference.outlier_columns(x, threshold)
    source = W if fp_weight else reference.dequantize_rows(CB, SCB)
    assert ((y.float() - y_ref.float()).abs() <= _rounding_bound(y_ref, x, source, columns)).all()


def test_outliers_use_fp_weight_columns_when_given():
    x = activations(4, 16, torch.float32, outlier_columns=(5,))
    W = weights(6, 16)
    CB, SCB = torch.ops.int8fx.quantize_weight(W)
    with_fp = torch.ops.int8fx.int8_linear(x, CB, SCB, None, 6.0, W)
    with_int8 = torch.ops.int8fx.int8_linear(x, CB, SCB, None, 6.0, None)
    # The two differ exactly by x_o @ (W_o - dequant(W)_o)^T.
    difference = x[:, 5:6] @ (W[:, 5:6] - reference.dequantize_rows(CB, SCB)[:, 5:6]).t()
    torch.testing.assert_close(with_fp - with_int8, difference, rtol=0, atol=1e-5)
    assert difference.abs().max() > 1e-4  # the test would not notice a mix-up otherwise


def test_quantize_weight_op_matches_reference():
    W = weights(7, 9)
    CB, SCB = torch.ops.int8fx.quantize_weight(W)
    CB_ref, SCB_ref = reference.quantize_weight(W)
    assert torch.equal(CB, CB_ref) and torch.equal(SCB, SCB_ref)


@pytest.mark.parametrize("shape", [(3, 16), (2, 3, 16), (2, 2, 3, 16)])
def test_opcheck_int8_linear(shape):
    x = torch.randn(*shape, requires_grad=True)
    x.data[..., 4] = 9.0
    W = weights(8, 16)
    CB, SCB = torch.ops.int8fx.quantize_weight(W)
    bias = torch.randn(8, requires_grad=True)
    torch.library.opcheck(torch.ops.int8fx.int8_linear.default, (x, CB, SCB, bias, 6.0, W))
    torch.library.opcheck(torch.ops.int8fx.int8_linear.default, (x, CB, SCB, None, 0.0, None))


def siblings_case(shape=(3, 16), requires_grad=False):
    x = torch.randn(*shape, requires_grad=requires_grad)
    x.data[..., 4] = 9.0
    Ws = [weights(n, shape[-1], seed=n) for n in (8, 5)]
    CB, SCB = zip(*(torch.ops.int8fx.quantize_weight(W) for W in Ws))
    bias = [torch.randn(8, requires_grad=requires_grad), None]
    return x, list(CB), list(SCB), bias, [Ws[0], None]


@pytest.mark.parametrize("shape", [(3, 16), (2, 3, 16)])
def test_opcheck_int8_linear_siblings(shape):
    x, CB, SCB, bias, weight = siblings_case(shape, requires_grad=True)
    torch.library.opcheck(torch.ops.int8fx.int8_linear_siblings.default, (x, CB, SCB, bias, 6.0, weight))


def test_siblings_gradients_are_their_linears():
    x, CB, SCB, bias, weight = siblings_case(requires_grad=True)
    outputs = torch.ops.int8fx.int8_linear_siblings(x, CB, SCB, bias, 6.0, weight)
    grads = [torch.randn_like(y) for y in outputs]
    torch.autograd.backward(outputs, grads)
    x_grad, bias_grad = x.grad, bias[0].grad
    x.grad = bias[0].grad = None
    separate = [torch.ops.int8fx.int8_linear(x, *entries[:3], 6.0, entries[3]) for entries in zip(CB, SCB, bias, weight)]
    torch.autograd.backward(separate, grads)
    assert torch.equal(x_grad, x.grad) and torch.equal(bias_grad, bias[0].grad)
    assert all(torch.equal(a, b) for a, b in zip(outputs, separate))


def test_opcheck_quantize_weight():
    torch.library.opcheck(torch.ops.int8fx.quantize_weight.default, (weights(5, 7),))


def test_autograd_gives_input_and_bias_gradients_only():
    x = activations(6, 16, torch.float32, outlier_columns=(2,)).requires_grad_()
    W = weights(5, 16).requires_grad_()
    bias = torch.randn(5, requires_grad=True)
    CB, SCB = torch.ops.int8fx.quantize_weight(W.detach())
    y = torch.ops.int8fx.int8_linear(x, CB, SCB, bias, 6.0, W)
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.testing.assert_close(x.grad, reference.int8_linear_input_grad(grad, CB, SCB))
    torch.testing.assert_close(bias.grad, grad.sum(0))
    assert W.grad is None  # quantized weights are frozen


def test_fake_output_shape_does_not_depend_on_outliers():
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    W = weights(8, 16)
    CB, SCB = torch.ops.int8fx.quantize_weight(W)

    def f(x, CB, SCB, W):
        return torch.ops.int8fx.int8_linear(x, CB, SCB, None, 6.0, W)

    gm = make_fx(f, tracing_mode="symbolic")(activations(5, 16, torch.float32, (3,)), CB, SCB, W)
    x_val = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"][0]
    out_val = [n for n in gm.graph.nodes if n.op == "output"][0].args[0].meta["val"]
    assert out_val.shape[0] == x_val.shape[0] and out_val.shape[1] == 8
    # No data-dependent (unbacked) size was created, nor reached the output.
    assert not free_unbacked_symbols(out_val)
    assert not x_val.shape[0].node.shape_env.pending_fresh_unbacked_symbols


def test_clear_errors_on_bad_arguments():
    W = weights(8, 16)
    CB, SCB = torch.ops.int8fx.quantize_weight(W)
    with pytest.raises(RuntimeError, match="last dimension"):
        torch.ops.int8fx.int8_linear(torch.randn(2, 15), CB, SCB, None, 6.0, None)
    with pytest.raises(RuntimeError, match="floating-point input"):
        torch.ops.int8fx.int8_linear(torch.ones(2, 16, dtype=torch.long), CB, SCB, None, 6.0, None)
    with pytest.raises(RuntimeError, match="CB must be"):
        torch.ops.int8fx.int8_linear(torch.randn(2, 16), CB.float(), SCB, None, 6.0, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        torch.ops.int8fx.int8_linear(torch.randn(2, 16), CB, SCB, torch.zeros(3), 6.0, None)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_torch_fallback_path_matches_reference(monkeypatch, threshold):
    # The pure-torch CPU path runs where the C++ library cannot be built: test it on every machine.
    int_mm_calls = []
    int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: int_mm_calls.append(1) or int_mm(a, b))
    x = activations(9, 40, torch.float32, outlier_columns=(4, 31))
    x[3, 7] = 6.0
    columns = reference.outlier_columns(x, threshold)
    W = weights(12, 40)
    CB, SCB = torch.ops.int8fx.quantize_weight(W)
    bias = torch.randn(12)
    y = torch_path.int8_linear_torch(x, CB, SCB, bias, threshold, W)
    y_ref = reference.int8_linear(x, CB, SCB, bias, threshold, W)
    assert int_mm_calls == [1]
    assert ((y - y_ref).abs() <= _rounding_bound(y_ref, x, W, columns)).all()


def test_op_runs_the_torch_path_where_the_library_cannot_load(monkeypatch):
    monkeypatch.setattr(cpu, "load", lambda: False)
    calls = []
    run = torch_path.int8_linear_torch
    monkeypatch.setattr(torch_path, "int8_linear_torch", lambda *args: calls.append(1) or run(*args))
    x = activations(3, 16, torch.float32, outlier_columns=(2,))
    CB, SCB = torch.ops.int8fx.quantize_weight(weights(4, 16))
    # Only the Python default kernel consults load(): call it below the C++ CPU kernel.
    y = torch.ops.int8fx.int8_linear.default.redispatch(
        torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd), x, CB, SCB, None, 6.0, None
    )
    assert calls == [1]
    assert torch.equal(y, run(x, CB, SCB, None, 6.0, None))


def test_each_device_has_its_kernel_registered():
    # CUDA: kernels.cuda.register binds the Triton path (checked here without a GPU); CPU: the
    # pure-torch default until the C++ library takes the CPU key.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("int8fx::int8_linear", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("int8fx::int8_linear_siblings", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("int8fx::int8_linear", "CompositeExplicitAutograd")
