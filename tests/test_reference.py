"""Pins the conventions of ``int8fx.reference`` with small hand-computed cases."""

import torch

from int8fx import reference


def test_weight_quantization_uses_plain_absmax_and_rounds_half_to_even():
    # Row 0 has absmax 127, so the scale is exactly 1 and the ties stay ties:
    # 62.5 -> 62, -0.5 -> -0, 1.5 -> 2 (half to even; half away from zero would give 63, -1, 2).
    W = torch.tensor([[127.0, 62.5, -0.5, 1.5], [0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 0.5, 0.25]])
    CB, SCB = reference.quantize_weight(W)
    assert SCB.tolist() == [127.0, 0.0, 2.0]  # the absmax itself, not absmax / 127
    assert CB.dtype == torch.int8
    # Row 2: 1 * 127/2 = 63.5 -> 64 (even), -2 -> -127, 0.5 -> 31.75 -> 32, 0.25 -> 15.875 -> 16.
    assert CB.tolist() == [[127, 62, 0, 2], [0, 0, 0, 0], [64, -127, 32, 16]]


def test_zero_weight_row_dequantizes_to_zero_without_nan():
    CB, SCB = reference.quantize_weight(torch.zeros(2, 3))
    dequantized = reference.dequantize_rows(CB, SCB)
    assert torch.equal(dequantized, torch.zeros(2, 3))


def test_outlier_columns_use_greater_or_equal():
    x = torch.tensor([[1.0, 6.0, -2.0, 0.0], [0.5, 5.99, 3.0, -6.0]])
    assert reference.outlier_columns(x, 6.0).tolist() == [False, True, False, True]
    assert reference.outlier_columns(x, 6.01).tolist() == [False, False, False, False]
    assert reference.outlier_columns(x, 0.0).tolist() == [False, False, False, False]


def test_activation_scale_ignores_outlier_elements_but_not_their_columns():
    x = torch.tensor([[1.0, 6.0, -2.0, 0.5], [3.0, 1.0, -5.9, 4.0]])
    (CA, SCA), columns = reference.quantize_activation(x, 6.0)
    assert columns.tolist() == [False, True, False, False]
    # Row 0: the outlier 6.0 is excluded, absmax 2. Row 1: its 1.0 in the outlier column is
    # not an outlier element, so it may count (here 5.9 wins anyway).
    assert SCA.tolist() == [2.0, torch.tensor(5.9).item()]
    # Row 0: 63.5 -> 64, -127, 31.75 -> 32; row 1: 3*127/5.9 = 64.58 -> 65, -127, 86.1 -> 86.
    assert CA.tolist() == [[64, 0, -127, 32], [65, 0, -127, 86]]


def test_outlier_element_below_threshold_in_outlier_column_sets_the_row_scale():
    x = torch.tensor([[7.0, 1.0], [5.0, 2.0]])
    (CA, SCA), _ = reference.quantize_activation(x, 6.0)
    assert SCA.tolist() == [1.0, 5.0]  # row 1's 5.0 sits in the outlier column but counts
    assert CA.tolist() == [[0, 127], [0, 51]]  # 2 * 127 / 5 = 50.8 -> 51; column 0 zeroed


def test_zero_row_gives_bias_only_without_nan():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.5]])
    CB, SCB = reference.quantize_weight(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]]))
    bias = torch.tensor([0.25, -0.5])
    (CA, SCA), _ = reference.quantize_activation(x, 6.0)
    assert SCA[0] == 0 and torch.equal(CA[0], torch.zeros(3, dtype=torch.int8))
    y = reference.int8_linear(x, CB, SCB, bias, 6.0)
    assert torch.equal(y[0], bias)
    assert torch.isfinite(y).all()


def test_int8_and_outlier_parts_add_up_by_hand():
    # One outlier column (index 1); the rest quantizes exactly (values are multiples of absmax/127).
    x = torch.tensor([[127.0 / 127, 10.0, -1.0]])
    W = torch.tensor([[127.0, 3.0, 0.0], [0.0, -2.0, 127.0]])
    CB, SCB = reference.quantize_weight(W)
    y = reference.int8_linear(x, CB, SCB, None, 6.0, weight=W)
    # int8 part: CA = [127, 0, -127], SCA = 1, CB row 0 = [127, 3, 0], row 1 = [0, -2, 127].
    # C32 = [127*127, -127*127]; dequant: C32 * 1 * 127 / 127**2 = [127, -127].
    # outlier part with the fp weight: 10 * [3, -2] = [30, -20].
    assert y.tolist() == [[157.0, -147.0]]
    # bitsandbytes' variant uses the dequantized int8 column: CB[:,1] * SCB / 127 = [3, -2] too here.
    assert reference.int8_linear(x, CB, SCB, None, 6.0).tolist() == [[157.0, -147.0]]
    # threshold 0: the 10.0 becomes the row scale and the small values collapse.
    y0 = reference.int8_linear(x, CB, SCB, None, 0.0)
    assert y0.tolist() != y.tolist()


def test_int8_matmul_is_exact_int32():
    CA = torch.full((1, 4096), -127, dtype=torch.int8)
    CB = torch.full((2, 4096), -127, dtype=torch.int8)
    assert reference.int8_matmul(CA, CB).tolist() == [[127 * 127 * 4096] * 2]


def test_input_gradient_is_grad_times_dequantized_weight():
    CB = torch.tensor([[127, -64], [0, 127]], dtype=torch.int8)
    SCB = torch.tensor([2.0, 1.0])
    grad = torch.tensor([[1.0, 1.0]])
    # dequant = [[2, -64*2/127], [0, 1]]
    expected = torch.tensor([[2.0, -128.0 / 127 + 1.0]])
    torch.testing.assert_close(reference.int8_linear_input_grad(grad, CB, SCB), expected)


def test_output_dtype_and_shape_follow_the_input():
    x = torch.randn(2, 3, 5, 8, dtype=torch.bfloat16)
    CB, SCB = reference.quantize_weight(torch.randn(4, 8))
    y = reference.int8_linear(x, CB, SCB, torch.randn(4), 6.0)
    assert y.shape == (2, 3, 5, 4) and y.dtype == torch.bfloat16


def test_sqnr_db():
    ref = torch.tensor([3.0, 4.0])
    assert reference.sqnr_db(ref, ref) == float("inf")
    assert abs(reference.sqnr_db(ref, ref * 1.1) - 20.0) < 1e-4  # noise = 10% of the signal (1.1 is inexact in fp32)
