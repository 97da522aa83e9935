"""NVFP4 / FP8 reference math at three levels: bit-exact tables, the producers' own code, and round-trip error.

(a) hand-checked bytes; (b) ModelOpt 0.47 and compressed-tensors 0.19 on the same input, compared with atol=0;
(c) relative Frobenius error of random normal weights.
"""

import warnings

import pytest
import torch

from sm120_quant.quantize.formats import (
    E2M1_MAX,
    E4M3_MAX,
    FP8_BLOCK,
    NVFP4_GROUP,
    NVFP4Weight,
    dequantize_fp8_block,
    dequantize_fp8_per_tensor,
    dequantize_nvfp4,
    e2m1_codes_to_f32,
    e4m3_nan_bytes,
    f32_to_e2m1_codes,
    fake_quant_nvfp4,
    nvfp4_global_scale,
    pack_uint4,
    quantize_fp8_block,
    quantize_fp8_per_tensor,
    quantize_nvfp4,
    unpack_uint4,
)

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
E4M3_ONE = 0x38
E4M3_448 = 0x7E


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, so that comparisons see signed zeros and NaN payloads."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def scale_bytes(t: torch.Tensor) -> list[int]:
    return t.view(torch.uint8).flatten().tolist()


def rel_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float((approx.float() - ref.float()).norm() / ref.float().norm())


@pytest.fixture(scope="module")
def modelopt_nvfp4():
    with warnings.catch_warnings():
        # ModelOpt warns that transformers 5.17 is newer than it was tested with.
        warnings.simplefilter("ignore")
        from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    return NVFP4QTensor


# ---------------------------------------------------------------------------------------------------------------
# (a) Bit-exact tables
# ---------------------------------------------------------------------------------------------------------------

E2M1_CODES = [
    (0x0, 0.0), (0x1, 0.5), (0x2, 1.0), (0x3, 1.5), (0x4, 2.0), (0x5, 3.0), (0x6, 4.0), (0x7, 6.0),
    (0x8, 0.0), (0x9, -0.5), (0xA, -1.0), (0xB, -1.5), (0xC, -2.0), (0xD, -3.0), (0xE, -4.0), (0xF, -6.0),
]  # fmt: skip


@pytest.mark.parametrize(("code", "value"), E2M1_CODES, ids=[f"code{c:X}" for c, _ in E2M1_CODES])
def test_e2m1_code_decodes(code, value):
    decoded = e2m1_codes_to_f32(torch.tensor([code], dtype=torch.uint8))
    # Code 8 decodes to +0.0, as in ModelOpt's table, so dequantized bits match ModelOpt's.
    assert bits(decoded).item() == bits(torch.tensor([value])).item()


@pytest.mark.parametrize(("code", "value"), E2M1_CODES, ids=[f"code{c:X}" for c, _ in E2M1_CODES])
def test_e2m1_value_encodes(code, value):
    # Code 8 is reached by a negative value that rounds to zero; -0.0 itself gives code 0 (below).
    source = -0.1 if code == 0x8 else value
    assert f32_to_e2m1_codes(torch.tensor([source])).item() == code


TIES = [
    pytest.param(0.25, 0x0, id="0.25_to_0"),  # halfway 0 | 0.5: 0 (code 0) is even
    pytest.param(0.75, 0x2, id="0.75_to_1"),  # halfway 0.5 | 1: 1.0 (code 2) is even
    pytest.param(1.25, 0x2, id="1.25_to_1"),  # halfway 1 | 1.5: 1.0 (code 2) is even
    pytest.param(1.75, 0x4, id="1.75_to_2"),  # halfway 1.5 | 2: 2.0 (code 4) is even
    pytest.param(2.5, 0x4, id="2.5_to_2"),  # halfway 2 | 3: 2.0 (code 4) is even
    pytest.param(3.5, 0x6, id="3.5_to_4"),  # halfway 3 | 4: 4.0 (code 6) is even
    pytest.param(5.0, 0x6, id="5_to_4"),  # halfway 4 | 6: 4.0 (code 6) is even
    pytest.param(-0.75, 0xA, id="-0.75_to_-1"),  # ties are symmetric: magnitude rounds, sign bit kept
    pytest.param(-5.0, 0xE, id="-5_to_-4"),
]


@pytest.mark.parametrize(("value", "code"), TIES)
def test_e2m1_tie_rounds_half_to_even(value, code):
    assert f32_to_e2m1_codes(torch.tensor([value])).item() == code


@pytest.mark.parametrize(
    ("value", "code"),
    [
        pytest.param(0.25 + 2**-24, 0x1, id="just_above_0.25"),
        pytest.param(0.75 - 2**-24, 0x1, id="just_below_0.75"),
        pytest.param(5.0 + 2**-21, 0x7, id="just_above_5"),
        pytest.param(6.5, 0x7, id="6.5_saturates"),
        pytest.param(1e30, 0x7, id="huge_saturates"),
        pytest.param(-7.0, 0xF, id="-7_saturates"),
        pytest.param(-0.0, 0x0, id="negative_zero_is_code_0"),
        pytest.param(-1e-30, 0x8, id="tiny_negative_keeps_sign"),
    ],
)
def test_e2m1_neighbours_and_saturation(value, code):
    assert f32_to_e2m1_codes(torch.tensor([value])).item() == code


@pytest.mark.parametrize(
    ("codes", "packed"),
    [
        pytest.param([0x1, 0x2], [0x21], id="even_column_low_nibble"),
        pytest.param([0xF, 0x0], [0x0F], id="low_only"),
        pytest.param([0x0, 0xF], [0xF0], id="high_only"),
        pytest.param([0x7, 0x8, 0xA, 0x5], [0x87, 0x5A], id="two_bytes"),
    ],
)
def test_pack_unpack_golden_bytes(codes, packed):
    assert pack_uint4(torch.tensor(codes, dtype=torch.uint8)).tolist() == packed
    assert unpack_uint4(torch.tensor(packed, dtype=torch.uint8)).tolist() == codes


def test_pack_rejects_odd_length_and_wide_codes():
    with pytest.raises(ValueError, match="even"):
        pack_uint4(torch.tensor([1, 2, 3], dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..15"):
        pack_uint4(torch.tensor([1, 16], dtype=torch.uint8))


@pytest.mark.parametrize(("amax", "expected"), [(2688.0, 1.0), (0.0, 0.0), (6.0, 6.0 / 2688.0)])
def test_nvfp4_global_scale(amax, expected):
    scale = nvfp4_global_scale(torch.tensor(amax))
    assert scale.dtype == torch.float32
    assert scale.item() == torch.tensor(expected, dtype=torch.float32).item()


def test_quantize_nvfp4_golden_bytes():
    # Global amax 2688 = 6 * 448 gives global scale 1.0, so block scales are block_amax / 6.
    block0 = [2688.0, -1344.0] + [0.0] * 14  # scale 448: 6 -> code 7, -3 -> code 0xD
    block1 = [6.0, 0.75, 0.25, -0.1, -0.0, 5.0, 3.5, 1.25] + [0.0] * 8  # scale 1: RNE per element
    q = quantize_nvfp4(torch.tensor([block0 + block1]))
    assert q.global_scale.item() == 1.0
    assert scale_bytes(q.block_scale) == [E4M3_448, E4M3_ONE]
    assert q.packed.tolist() == [[0xD7, 0, 0, 0, 0, 0, 0, 0, 0x27, 0x80, 0x60, 0x26] + [0] * 4]


def test_quantize_nvfp4_values_at_six_times_scale():
    # The block maximum is exactly 6 * block scale: it is code 7 (or 0xF) whatever the sign.
    w = torch.tensor([[2688.0] + [0.0] * 15 + [-3.0, 1.5] + [0.0] * 14])
    q = quantize_nvfp4(w)
    assert scale_bytes(q.block_scale) == [E4M3_448, 0x30]  # 3 / 6 = 0.5 is byte 0x30
    assert unpack_uint4(q.packed)[0, 16:18].tolist() == [0xF, 0x5]  # -3 / 0.5 = -6, 1.5 / 0.5 = 3


def test_quantize_nvfp4_zero_block_gets_scale_one():
    w = torch.tensor([[2688.0] + [0.0] * 31])
    q = quantize_nvfp4(w)
    assert scale_bytes(q.block_scale) == [E4M3_448, E4M3_ONE]
    assert q.packed[0, 8:].tolist() == [0] * 8


def test_quantize_nvfp4_all_zero_weight():
    # ModelOpt writes NaN scales here (see test_modelopt_all_zero_weight_gives_nan); the reference stays finite.
    q = quantize_nvfp4(torch.zeros(2, 32))
    assert q.global_scale.item() == 0.0
    assert scale_bytes(q.block_scale) == [E4M3_ONE] * 4
    assert q.packed.tolist() == [[0] * 16] * 2
    assert dequantize_nvfp4(q.packed, q.block_scale, q.global_scale).abs().sum().item() == 0.0


@pytest.mark.parametrize(
    ("block_amax", "scale_byte"),
    [
        pytest.param(6 * 2.0**-6, 0x08, id="smallest_normal_2^-6"),
        pytest.param(6 * 2.0**-8, 0x02, id="subnormal_2^-8"),
        pytest.param(6 * 2.0**-9, 0x01, id="smallest_subnormal_2^-9"),
        pytest.param(6 * 2.0**-11, 0x01, id="below_2^-10_clamped_up_to_2^-9"),
        pytest.param(6e-30, 0x01, id="tiny_clamped_up_to_2^-9"),
    ],
)
def test_quantize_nvfp4_tiny_block_scales(block_amax, scale_byte):
    w = torch.tensor([[2688.0] + [0.0] * 15 + [block_amax] + [0.0] * 15])
    assert scale_bytes(quantize_nvfp4(w).block_scale) == [E4M3_448, scale_byte]


def test_quantize_nvfp4_block_scale_clamped_at_448():
    # A shared global scale below amax / 2688 pushes the ratio to 896: the scale stays 448 and values saturate.
    w = torch.tensor([[2688.0, 1000.0] + [0.0] * 14])
    q = quantize_nvfp4(w, global_scale=torch.tensor(0.5))
    assert scale_bytes(q.block_scale) == [E4M3_448]
    assert unpack_uint4(q.packed)[0, :2].tolist() == [0x7, 0x6]  # 12 saturates to 6, 4.46 rounds to 4


def test_dequantize_nvfp4_golden():
    packed = torch.tensor([[0xD7] + [0] * 7], dtype=torch.uint8)
    block_scale = torch.tensor([[2.0]]).to(torch.float8_e4m3fn)
    out = dequantize_nvfp4(packed, block_scale, torch.tensor(0.25), dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert out[0, :2].tolist() == [3.0, -1.5]  # 6 * 2 * 0.25, -3 * 2 * 0.25


def test_dequantize_nvfp4_rejects_nan_scale_and_bad_shape():
    packed = torch.zeros(1, 8, dtype=torch.uint8)
    nan_scale = torch.tensor([[0x7F]], dtype=torch.uint8).view(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="NaN"):
        dequantize_nvfp4(packed, nan_scale, torch.tensor(1.0))
    with pytest.raises(ValueError, match="expected \\[1, 1\\]"):
        dequantize_nvfp4(packed, torch.ones(1, 2).to(torch.float8_e4m3fn), torch.tensor(1.0))


def test_fake_quant_golden_and_signed_zeros():
    x = torch.tensor([[6.0, 0.75, 0.25, -0.1, -0.0, 5.0, 3.5, -2.9] + [0.0] * 8])
    out = fake_quant_nvfp4(x, torch.tensor(2688.0))  # global scale 1, block scale 1
    assert out.tolist() == [[6.0, 1.0, 0.0, 0.0, 0.0, 4.0, 4.0, -3.0] + [0.0] * 8]
    # Zeros are +0.0, whether from -0.0 or from a negative value rounded to zero, as the Triton kernel gives.
    assert not torch.signbit(out[out == 0]).any()


def test_fake_quant_zeroes_block_whose_scale_is_below_1e5():
    # Global amax 0.01 -> global scale 3.72e-6. A block of amax 5e-5 gets E4M3 scale 2.25, i.e. 8.4e-6 < 1e-5, so
    # the kernel uses scale 1.0 and the block becomes 0. The export path keeps it.
    x = torch.tensor([[0.01] + [0.0] * 15 + [5e-5, -2e-5] + [0.0] * 14])
    fq = fake_quant_nvfp4(x, torch.tensor(0.01))
    assert fq[0, 16:18].tolist() == [0.0, -0.0]
    q = quantize_nvfp4(x)
    exported = dequantize_nvfp4(q.packed, q.block_scale, q.global_scale)
    assert exported[0, 16].item() == pytest.approx(5e-5, rel=0.01)


def test_fake_quant_amax_zero_uses_unit_scale():
    # amax 0: global scale 1e-12, every block scale is < 1e-5 and becomes 1.0, so x is rounded to the bare E2M1 grid.
    x = torch.tensor([[0.3, 0.8, 7.0, -1.3] + [0.0] * 12])
    assert fake_quant_nvfp4(x, torch.tensor(0.0)).tolist() == [[0.5, 1.0, 6.0, -1.5] + [0.0] * 12]


def test_fake_quant_partial_last_block_is_zero_padded():
    torch.manual_seed(1)
    x = torch.randn(3, 20, dtype=torch.bfloat16)
    amax = x.abs().amax()
    padded = torch.nn.functional.pad(x, (0, 12))
    assert torch.equal(bits(fake_quant_nvfp4(x, amax)), bits(fake_quant_nvfp4(padded, amax)[:, :20]))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_fake_quant_keeps_dtype_and_shape(dtype):
    x = torch.randn(2, 3, 32).to(dtype)
    out = fake_quant_nvfp4(x, x.abs().amax())
    assert (out.dtype, out.shape) == (dtype, x.shape)


def test_fp8_per_tensor_golden():
    w = torch.tensor([[448.0, -224.0, 1.0, -0.0]])
    q, scale = quantize_fp8_per_tensor(w)
    assert scale.item() == 1.0
    assert scale_bytes(q) == [0x7E, 0xF6, 0x38, 0x80]
    assert dequantize_fp8_per_tensor(q, scale).tolist() == [[448.0, -224.0, 1.0, -0.0]]


def test_fp8_per_tensor_all_zero():
    q, scale = quantize_fp8_per_tensor(torch.zeros(2, 3))
    assert scale.item() == 0.0
    assert scale_bytes(q) == [0] * 6


def test_fp8_block_ceil_div_edges_and_zero_block():
    w = torch.zeros(200, 300)
    w[0, 0] = 896.0  # block (0, 0): scale 2
    w[199, 299] = -4.48  # block (1, 2), the partial corner: scale 0.01
    q, scale = quantize_fp8_block(w)
    assert scale.shape == (2, 3)
    eps = torch.finfo(torch.float32).eps  # all-zero blocks get the dtype's epsilon, as compressed-tensors does
    assert scale.tolist() == [[2.0, eps, eps], [eps, eps, torch.tensor(0.01).item()]]
    assert scale_bytes(q[0, :1]) == [0x7E]
    assert scale_bytes(q[199, 299:]) == [0xFE]
    assert dequantize_fp8_block(q, scale)[199, 299].item() == pytest.approx(-4.48, rel=1e-6)


def test_fp8_block_negative_zero_is_positive_zero():
    q, _ = quantize_fp8_block(torch.tensor([[1.0, -0.0] + [0.0] * 126]))
    assert scale_bytes(q[0, :2]) == [0x7E, 0x00]


@pytest.mark.parametrize(
    ("byte", "is_nan"),
    [(0x7F, True), (0xFF, True), (0x7E, False), (0xFE, False), (0x00, False), (0x80, False)],
    ids=lambda v: f"{v:#04x}" if isinstance(v, int) and not isinstance(v, bool) else str(v),
)
def test_e4m3_nan_bytes(byte, is_nan):
    t = torch.tensor([byte], dtype=torch.uint8).view(torch.float8_e4m3fn)
    assert e4m3_nan_bytes(t).tolist() == [is_nan]


BAD_VALUES = [pytest.param(float("nan"), "1 NaN", id="nan"), pytest.param(float("inf"), "1 infinite", id="inf")]


@pytest.mark.parametrize(("bad", "message"), BAD_VALUES)
@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda t: f32_to_e2m1_codes(t), id="f32_to_e2m1_codes"),
        pytest.param(lambda t: quantize_nvfp4(t), id="quantize_nvfp4"),
        pytest.param(lambda t: fake_quant_nvfp4(t, torch.tensor(1.0)), id="fake_quant_nvfp4_x"),
        pytest.param(lambda t: fake_quant_nvfp4(torch.ones(16), t[0, 0]), id="fake_quant_nvfp4_amax"),
        pytest.param(lambda t: quantize_fp8_block(t), id="quantize_fp8_block"),
        pytest.param(lambda t: quantize_fp8_per_tensor(t), id="quantize_fp8_per_tensor"),
        pytest.param(lambda t: nvfp4_global_scale(t), id="nvfp4_global_scale"),
        pytest.param(lambda t: quantize_nvfp4(torch.ones(1, 16), global_scale=t[0, 0]), id="global_scale"),
    ],
)
def test_non_finite_input_is_rejected(call, bad, message):
    t = torch.ones(2, 32)
    t[0, 0] = bad
    with pytest.raises(ValueError, match=message):
        call(t)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda: quantize_nvfp4(torch.ones(4, 24)), "divisible by 16", id="columns_not_multiple_of_16"),
        pytest.param(lambda: quantize_nvfp4(torch.ones(32)), "\\[out, in\\]", id="one_dimensional"),
        pytest.param(lambda: quantize_nvfp4(torch.ones(2, 16, dtype=torch.float64)), "float64", id="float64"),
        pytest.param(
            lambda: quantize_nvfp4(torch.ones(1, 16), global_scale=torch.tensor(0.0)), "non-zero", id="zero_global"
        ),
        pytest.param(lambda: nvfp4_global_scale(torch.tensor(-1.0)), ">= 0", id="negative_amax"),
        pytest.param(lambda: fake_quant_nvfp4(torch.ones(16), torch.ones(2)), "one value", id="amax_not_scalar"),
        pytest.param(lambda: quantize_fp8_block(torch.ones(2, 2, 2)), "2-D", id="fp8_block_3d"),
        pytest.param(
            lambda: dequantize_fp8_block(torch.zeros(200, 300).to(torch.float8_e4m3fn), torch.ones(1, 3)),
            "expected \\[2, 3\\]",
            id="fp8_block_scale_shape",
        ),
        pytest.param(lambda: e4m3_nan_bytes(torch.ones(2)), "float8_e4m3fn", id="nan_bytes_dtype"),
    ],
)
def test_bad_arguments_are_rejected(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------------------------------------------
# (b) The producers' own code, bit for bit
# ---------------------------------------------------------------------------------------------------------------


def every_finite_bfloat16() -> torch.Tensor:
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return values[torch.isfinite(values)]


def test_e2m1_rounding_matches_modelopt_on_every_bfloat16(modelopt_nvfp4):
    x = every_finite_bfloat16().float()
    assert torch.equal(f32_to_e2m1_codes(x), modelopt_nvfp4._cast_fp4(x.clone()))


def wide_range_weight(dtype: torch.dtype) -> torch.Tensor:
    """Normal values whose block magnitudes span 1e-8..10, so block scales hit 448, subnormals and the 2**-9 floor."""
    torch.manual_seed(0)
    w = torch.randn(64, 512) * torch.logspace(-8, 1, 512)
    w[5, 32:48] = 0.0  # a zero block
    w[7, 0:16] = -0.0
    return w.to(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_quantize_nvfp4_matches_modelopt(modelopt_nvfp4, dtype):
    w = wide_range_weight(dtype)
    ours = quantize_nvfp4(w)
    qtensor, block_scale, global_scale = modelopt_nvfp4.quantize(w.clone(), NVFP4_GROUP)
    assert torch.equal(ours.packed, qtensor._quantized_data)
    assert torch.equal(bits(ours.block_scale), bits(block_scale))
    assert torch.equal(bits(ours.global_scale), bits(global_scale))
    # The scale helpers on their own, too.
    assert torch.equal(bits(ours.global_scale), bits(modelopt_nvfp4.get_weights_scaling_factor_2(w)))
    helper_scale, _ = modelopt_nvfp4.get_weights_scaling_factor(w, NVFP4_GROUP)
    assert torch.equal(bits(ours.block_scale), bits(helper_scale))
    # The set of block scales this weight exercises: the top of the range, subnormals and the clamp floor.
    assert {E4M3_448, 0x01, E4M3_ONE} <= set(scale_bytes(ours.block_scale))


@pytest.mark.parametrize("global_scale", [1e-4, 1e-2], ids=["below_own_amax", "above_own_amax"])
def test_quantize_nvfp4_shared_global_scale_matches_modelopt(modelopt_nvfp4, global_scale):
    w = wide_range_weight(torch.bfloat16)
    shared = torch.tensor(global_scale)
    ours = quantize_nvfp4(w, global_scale=shared)
    qtensor, block_scale, _ = modelopt_nvfp4.quantize(w.clone(), NVFP4_GROUP, weights_scaling_factor_2=shared)
    assert torch.equal(ours.packed, qtensor._quantized_data)
    assert torch.equal(bits(ours.block_scale), bits(block_scale))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_dequantize_nvfp4_matches_modelopt(modelopt_nvfp4, dtype):
    w = wide_range_weight(dtype)
    qtensor, block_scale, global_scale = modelopt_nvfp4.quantize(w.clone(), NVFP4_GROUP)
    theirs = qtensor.dequantize(dtype=dtype, scale=block_scale, double_scale=global_scale, block_sizes={-1: 16})
    ours = dequantize_nvfp4(qtensor._quantized_data, block_scale, global_scale, dtype=dtype)
    assert torch.equal(bits(ours), bits(theirs))


def test_modelopt_all_zero_weight_gives_nan(modelopt_nvfp4):
    # Pins the one deliberate deviation: ModelOpt divides 0 by a zero global scale.
    _, block_scale, global_scale = modelopt_nvfp4.quantize(torch.zeros(2, 32), NVFP4_GROUP)
    assert global_scale.item() == 0.0
    assert e4m3_nan_bytes(block_scale).all()


def test_fake_quant_equals_export_round_trip_for_normal_weights():
    torch.manual_seed(2)
    w = torch.randn(128, 512, dtype=torch.bfloat16)
    q = quantize_nvfp4(w)
    exported = dequantize_nvfp4(q.packed, q.block_scale, q.global_scale, dtype=torch.bfloat16)
    fake = fake_quant_nvfp4(w, w.abs().amax())
    # Bit for bit, zeros included. (Here both global scales are the same fp32 number; the fake-quant one is formed
    # through the reciprocal, as on a GPU, and differs by an ulp for about a fifth of amax values.)
    assert torch.equal(bits(fake), bits(exported))


@pytest.fixture(scope="module")
def compressed_tensors_fp8_block():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=8, type="float", strategy="block", block_structure=[128, 128], symmetric=True)
    return args, quantize, dequantize, calculate_qparams


def ct_block_scale(w: torch.Tensor, args, calculate_qparams):
    """Block min/max as llm-compressor's observer takes them (zero-padded, in w's dtype), then CT's scale rule."""
    rows, cols = w.shape
    padded = torch.nn.functional.pad(w, (0, -cols % 128, 0, -rows % 128))
    blocks = padded.reshape(padded.shape[0] // 128, 128, padded.shape[1] // 128, 128).transpose(1, 2)
    return calculate_qparams(blocks.amin(dim=(-1, -2)), blocks.amax(dim=(-1, -2)), args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fp8_block_matches_compressed_tensors(compressed_tensors_fp8_block, dtype):
    args, ct_quantize, _, calculate_qparams = compressed_tensors_fp8_block
    torch.manual_seed(3)
    w = (torch.randn(200, 320) * torch.logspace(-3, 1, 320)).to(dtype)  # ceil-div edges in both dims
    w[128:, 256:] = 0.0  # an all-zero corner block
    w[0, :5] = -0.0
    ct_scale, ct_zero_point = ct_block_scale(w, args, calculate_qparams)
    # llm-compressor's compressor pads the weight itself, then crops the result.
    padded = torch.nn.functional.pad(w, (0, 64, 0, 56))
    theirs = ct_quantize(padded, ct_scale, ct_zero_point, args, dtype=torch.float8_e4m3fn)[:200, :320]

    ours, scale = quantize_fp8_block(w)
    assert ct_scale.dtype == dtype
    assert torch.equal(bits(scale.to(dtype)), bits(ct_scale))
    assert torch.equal(bits(scale.to(dtype).float()), bits(scale))  # the fp32 scale holds the dtype's value exactly
    assert torch.equal(bits(ours), bits(theirs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fp8_block_dequantize_matches_compressed_tensors(compressed_tensors_fp8_block, dtype):
    args, _, ct_dequantize, _ = compressed_tensors_fp8_block
    torch.manual_seed(4)
    w = torch.randn(256, 384)
    q, scale = quantize_fp8_block(w)
    # compressed-tensors' block path ignores `dtype` and returns the scale's dtype; round once, as we do.
    theirs = ct_dequantize(q, scale, args=args).to(dtype)
    assert torch.equal(bits(dequantize_fp8_block(q, scale, dtype=dtype)), bits(theirs))


def test_fp8_per_tensor_matches_modelopt_export():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from modelopt.torch.export.model_config import QUANTIZATION_FP8
        from modelopt.torch.export.quant_utils import to_quantized_weight
    w = wide_range_weight(torch.bfloat16)
    ours, scale = quantize_fp8_per_tensor(w)
    modelopt_scale = w.abs().amax().float() / E4M3_MAX  # the exported weight_scale: calibrated amax / 448
    theirs = to_quantized_weight(w, modelopt_scale, QUANTIZATION_FP8)
    assert torch.equal(bits(scale), bits(modelopt_scale))
    assert torch.equal(bits(ours), bits(theirs))


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def modelopt_triton_fake_quant():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from modelopt.torch.kernels.quantization import gemm
    if not hasattr(gemm, "fp4_fake_quant_block"):
        pytest.skip("ModelOpt's Triton fp4_fake_quant_block needs triton and compute capability >= 8.9")
    return gemm.fp4_fake_quant_block


def exact_ties() -> torch.Tensor:
    """Rows with block scale s (block amax 6s, global scale 1) holding every E2M1 midpoint times s.

    The scales are powers of two: Triton divides with `div.full.f32`, which is exact only for those, so other
    scales could move an exact tie by an ulp (see `fake_quant_nvfp4`).
    """
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    rows = [torch.cat([torch.tensor([6 * s]), midpoints * s, -midpoints * s, torch.zeros(1)])
            for s in (1.0, 0.5, 4.0, 2.0**-6, 2.0**-8)]  # fmt: skip
    return torch.stack(rows)


# Differences from the Triton kernel allowed per element (see test_fake_quant_matches_modelopt_triton_kernel).
MAX_TRITON_DIFFERENCES = 1e-3

# name -> (input, amax or None for the input's own amax), built only when a GPU test runs.
ACTIVATION_CASES = {
    "randn": lambda: (torch.randn(1024, 2048), None),
    "wide_range": lambda: (torch.randn(512, 2048) * torch.logspace(-4, 1, 2048), None),
    "amax_below_input": lambda: (torch.randn(512, 1024), torch.tensor(1.0)),
    # Global scale ~5e-8: about half the blocks end below the kernel's 1e-5 scale floor and become zero.
    "scale_floor": lambda: (torch.randn(256, 1024) * 3e-5, None),
    "amax_zero": lambda: (torch.randn(64, 64), torch.tensor(0.0)),
    "partial_last_block": lambda: (torch.randn(300, 1000), None),
    "three_dims": lambda: (torch.randn(4, 64, 256), None),
    "ties": lambda: (exact_ties(), torch.tensor(2688.0)),
}


def _nudged(t: torch.Tensor, ulps: int) -> tuple[torch.Tensor, torch.Tensor]:
    lo = hi = t
    for _ in range(ulps):
        lo, hi = torch.nextafter(lo, torch.tensor(-torch.inf)), torch.nextafter(hi, torch.tensor(torch.inf))
    return lo, hi


def sensitive_to_division(x: torch.Tensor, amax: torch.Tensor, ulps: int) -> torch.Tensor:
    """The elements of `fake_quant_nvfp4(x, amax)` that a change of up to `ulps` ulp in one of its two quotients
    (block amax / (6 * global scale), and |x| / block scale) can change: where Triton's `div.full.f32` may round
    to the other side."""
    columns = x.shape[-1]
    xf = torch.nn.functional.pad(x.float(), (0, -columns % NVFP4_GROUP))
    magnitude = xf.reshape(*xf.shape[:-1], -1, NVFP4_GROUP).abs()
    global_scale = amax.float() * (torch.tensor(1.0) / torch.tensor(E2M1_MAX * E4M3_MAX))
    global_scale = torch.where(global_scale > 0, global_scale, torch.tensor(1e-12))
    ratio = (magnitude.amax(dim=-1, keepdim=True) / (E2M1_MAX * global_scale)).clamp(max=E4M3_MAX)
    lo, hi = _nudged(ratio, ulps)
    block_moves = bits(lo.to(torch.float8_e4m3fn)) != bits(hi.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn))
    scale = ratio.to(torch.float8_e4m3fn).float() * global_scale
    scale = torch.where(scale >= torch.tensor(1e-5), scale, torch.ones_like(scale))
    lo, hi = _nudged(magnitude / scale, ulps)
    element_moves = f32_to_e2m1_codes(lo.clamp(min=0)) != f32_to_e2m1_codes(hi)
    moves = (block_moves | element_moves).reshape(xf.shape)
    return moves[..., :columns]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("case", list(ACTIVATION_CASES))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_fake_quant_matches_modelopt_triton_kernel(modelopt_triton_fake_quant, case, dtype):
    torch.manual_seed(8)
    x, amax = ACTIVATION_CASES[case]()
    x = x.to(dtype)
    amax = (x.abs().amax() if amax is None else amax).to(dtype)
    theirs = modelopt_triton_fake_quant(x.cuda(), amax.cuda()).cpu()
    differ = bits(fake_quant_nvfp4(x, amax)) != bits(theirs)
    # Every difference is a quotient within 2 ulp of a rounding point (Triton's division is not IEEE) ...
    assert not (differ & ~sensitive_to_division(x, amax, ulps=2)).any()
    # ... and those are rare.
    assert int(differ.sum()) <= MAX_TRITON_DIFFERENCES * differ.numel()


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantize_nvfp4_on_cuda_matches_modelopt(modelopt_nvfp4, dtype):
    w = wide_range_weight(dtype)
    ours = quantize_nvfp4(w.cuda())
    qtensor, block_scale, global_scale = modelopt_nvfp4.quantize(w.cuda(), NVFP4_GROUP)
    assert torch.equal(bits(ours.global_scale), bits(global_scale.reshape(())))
    assert torch.equal(ours.packed, qtensor._quantized_data)
    assert torch.equal(bits(ours.block_scale), bits(block_scale))
    # Given the same global scale, CPU and CUDA agree byte for byte. The default global scale itself may differ by
    # an ulp: torch on CUDA divides by the Python number 6 * 448 through its reciprocal, as ModelOpt's does.
    on_cpu = quantize_nvfp4(w, ours.global_scale.cpu())
    assert torch.equal(on_cpu.packed, ours.packed.cpu())
    assert torch.equal(bits(on_cpu.block_scale), bits(ours.block_scale.cpu()))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fp8_block_fp32_quotient_matches_compressed_tensors_cuda(compressed_tensors_fp8_block, dtype):
    args, ct_quantize, _, calculate_qparams = compressed_tensors_fp8_block
    torch.manual_seed(9)
    w = (torch.randn(512, 1024) * torch.logspace(-3, 1, 1024)).to(dtype)
    ct_scale, ct_zero_point = ct_block_scale(w, args, calculate_qparams)
    theirs = ct_quantize(w.cuda(), ct_scale.cuda(), ct_zero_point.cuda(), args, dtype=torch.float8_e4m3fn).cpu()
    ours, _ = quantize_fp8_block(w, quotient_dtype=torch.float32)
    assert torch.equal(bits(ours), bits(theirs))


# ---------------------------------------------------------------------------------------------------------------
# (c) Round trips
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nvfp4_round_trip_error(dtype):
    torch.manual_seed(5)
    w = torch.randn(256, 1024).to(dtype)
    q = quantize_nvfp4(w)
    assert isinstance(q, NVFP4Weight)
    assert 0.09 <= rel_error(w, dequantize_nvfp4(q.packed, q.block_scale, q.global_scale)) <= 0.10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fp8_round_trip_error(dtype):
    torch.manual_seed(6)
    w = torch.randn(256, 1024).to(dtype)
    q, scale = quantize_fp8_block(w)
    assert scale.shape == (256 // FP8_BLOCK[0], 1024 // FP8_BLOCK[1])
    assert 0.025 <= rel_error(w, dequantize_fp8_block(q, scale)) <= 0.029
    q, scale = quantize_fp8_per_tensor(w)
    assert 0.025 <= rel_error(w, dequantize_fp8_per_tensor(q, scale)) <= 0.029


def test_global_scale_puts_largest_block_scale_at_448():
    torch.manual_seed(7)
    w = torch.randn(64, 256)
    q = quantize_nvfp4(w)
    assert q.block_scale.float().max().item() == E4M3_MAX
    assert q.global_scale.item() == pytest.approx(w.abs().max().item() / (E2M1_MAX * E4M3_MAX), rel=1e-6)
