"""Exact NVFP4 and FP8-E4M3 reference math: the single source of truth for export, fix, check and verify.

Every function is pure torch, runs on any device, and reproduces the producer's bytes:

- NVFP4 weights (`quantize_nvfp4`, `dequantize_nvfp4`) match ModelOpt 0.47 `NVFP4QTensor` bit for bit.
- NVFP4 fake quantization (`fake_quant_nvfp4`) follows ModelOpt's Triton kernel `fp4_fake_quant_block`, which is what
  calibration runs on a GPU. It is not the same math as the export path (see its docstring).
- FP8 blocks (`quantize_fp8_block`) match compressed-tensors 0.19 / llm-compressor `FP8_BLOCK` bit for bit, and FP8
  per-tensor (`quantize_fp8_per_tensor`) matches ModelOpt's FP8 export.

Layout facts (ModelOpt `nvfp4_tensor.py`, compressed-tensors `pack_fp4_to_uint8`): an E2M1 code is 4 bits, bits 0-2
index `{0, 0.5, 1, 1.5, 2, 3, 4, 6}` and bit 3 is the sign; two codes share a byte, the even column in the low
nibble. `W[n, k] = e2m1(code) * float(block_scale[n, k // 16]) * global_scale`.

NaN or infinite input is a bug in the caller's data, never something to quantize: every entry point raises
`ValueError` naming the problem, and callers wrap it into a `UserError` that names the tensor.
"""

from dataclasses import dataclass

import torch

E2M1_MAX = 6.0
E4M3_MAX = 448.0
NVFP4_GROUP = 16
FP8_BLOCK = (128, 128)

# E2M1 value of each 4-bit code. Code 8 is +0.0, not -0.0, as in ModelOpt's table, so dequantized bytes match.
_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Midpoints between neighbouring magnitudes. A magnitude above a midpoint rounds up, one below rounds down.
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
# Round half to even: at these midpoints the upper neighbour (1.0, 2.0, 4.0: codes 2, 4, 6) has the even code, so a
# tie rounds up; at the others (0.25, 1.25, 2.5, 5.0) the lower neighbour is even and a tie rounds down.
_E2M1_TIES_UP = (0.75, 1.75, 3.5)
_E2M1_SIGN = 0b1000

# The smallest positive E4M3 value (subnormal 2**-9). ModelOpt clamps block scales up to it so that a block with a
# tiny amax keeps a non-zero scale instead of underflowing to 0.
_E4M3_MIN_SUBNORMAL = 2.0**-9
# Constants of ModelOpt's Triton kernel `fp4_fake_quant_block`, which works in fp32.
_FAKEQUANT_ZERO_GLOBAL_SCALE = 1e-12
_FAKEQUANT_MIN_BLOCK_SCALE = 1e-5
# 1 / (6 * 448) as torch's CUDA division by a Python number forms it: an fp32 division on the host (the fp64 quotient
# rounded to fp32 could round differently).
_GLOBAL_SCALE_RECIPROCAL = torch.tensor(1.0) / torch.tensor(E2M1_MAX * E4M3_MAX)

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_E4M3_NAN_MAGNITUDE = 0x7F


@dataclass(frozen=True)
class NVFP4Weight:
    """An NVFP4 weight as stored in a ModelOpt unified HF checkpoint.

    `packed` is `X.weight` (uint8 [out, in/2]), `block_scale` is `X.weight_scale` (float8_e4m3fn [out, in/16]) and
    `global_scale` is `X.weight_scale_2` (fp32 scalar).
    """

    packed: torch.Tensor
    block_scale: torch.Tensor
    global_scale: torch.Tensor


def f32_to_e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Round already-scaled values to E2M1 codes (uint8 0..15), half to even, saturating at ±6.

    Negative values that round to zero keep their sign bit (code 8), and -0.0 gives code 0, as ModelOpt's `_cast_fp4`.
    """
    _require_float(x, "x")
    _require_finite(x, "x")
    return _round_to_e2m1(x)


def e2m1_codes_to_f32(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8 0..15) to their float32 values."""
    _require_codes(codes, "codes")
    table = torch.tensor(_E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return table[codes.long()]


def pack_uint4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes [..., n] (n even) into bytes [..., n/2]: column 2j in the low nibble, 2j+1 in the high."""
    _require_codes(codes, "codes")
    if codes.dim() == 0 or codes.shape[-1] % 2:
        raise ValueError(f"codes: last dimension must be even to pack two codes a byte, got shape {list(codes.shape)}")
    return (codes[..., 1::2] << 4) | codes[..., 0::2]


def unpack_uint4(packed: torch.Tensor) -> torch.Tensor:
    """Unpack bytes [..., n] into 4-bit codes [..., 2n]: low nibble first."""
    _require_dtype(packed, torch.uint8, "packed")
    if packed.dim() == 0:
        raise ValueError("packed: expected at least one dimension, got a scalar")
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """The fp32 global (second-level) scale `amax / (6 * 448)`, elementwise.

    Dividing by the largest E2M1 value times the largest E4M3 value puts the largest block scale of the tensor at the
    top of the E4M3 range, which is where E4M3 has the most relative precision to spare.
    """
    _require_float(amax, "amax")
    _require_finite(amax, "amax")
    if bool((amax < 0).any()):
        raise ValueError("amax: must be >= 0, got a negative value")
    return amax.float() / (E2M1_MAX * E4M3_MAX)


def quantize_nvfp4(w: torch.Tensor, global_scale: torch.Tensor | None = None) -> NVFP4Weight:
    """Quantize a weight [out, in] to NVFP4 exactly as ModelOpt 0.47 exports it.

    `global_scale` defaults to `nvfp4_global_scale(amax(w))`; pass one to share it between layers (q/k/v, gate/up).
    Per 16-element block: `block_scale = e4m3(clamp(block_amax / (6 * global_scale), 2**-9, 448))`, where a block
    whose ratio is exactly 0 gets scale 1.0 (ModelOpt's rule, not the clamp floor). Values are divided by
    `float(block_scale) * global_scale` and rounded to E2M1 half to even, saturating at ±6.

    A weight that is all zeros (global scale 0) gets codes 0, block scales 1.0 and global scale 0. ModelOpt writes
    NaN block scales (0/0) and 0x77 bytes there, which dequantize to NaN; this is the one deliberate deviation.
    """
    _require_weight(w, "w")
    blocks = w.float().reshape(*w.shape[:-1], w.shape[-1] // NVFP4_GROUP, NVFP4_GROUP)
    amax = blocks.abs().amax()
    if global_scale is None:
        global_scale = nvfp4_global_scale(amax)
    else:
        global_scale = _require_scalar_scale(global_scale, "global_scale")
        if global_scale == 0 and amax > 0:
            raise ValueError("global_scale: is 0 but w has non-zero values; every value would saturate")

    scale_shape = blocks.shape[:-1]
    if global_scale == 0:
        return NVFP4Weight(
            packed=torch.zeros(*w.shape[:-1], w.shape[-1] // 2, dtype=torch.uint8, device=w.device),
            block_scale=torch.ones(scale_shape, device=w.device).to(torch.float8_e4m3fn),
            global_scale=global_scale,
        )

    block_amax = blocks.abs().amax(dim=-1)
    # `E2M1_MAX * global_scale` is rounded to fp32 before the division, as in ModelOpt.
    ratio = block_amax / (E2M1_MAX * global_scale)
    ratio = torch.where(ratio == 0, torch.ones_like(ratio), ratio)
    block_scale = ratio.clamp(min=_E4M3_MIN_SUBNORMAL, max=E4M3_MAX).to(torch.float8_e4m3fn)
    # The two scales are multiplied in fp32 first and the value is divided by the product, as in ModelOpt.
    scaled = blocks / (block_scale.float() * global_scale).unsqueeze(-1)
    codes = _round_to_e2m1(scaled.reshape(w.shape))
    return NVFP4Weight(packed=pack_uint4(codes), block_scale=block_scale, global_scale=global_scale)


def dequantize_nvfp4(
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """NVFP4 bytes back to a tensor [out, in]: `e2m1 * (float(block_scale) * global_scale)`, computed in fp32.

    The scale product is formed first and the result rounded once to `dtype`, as ModelOpt's `NVFP4QTensor.dequantize`.
    """
    _require_dtype(packed, torch.uint8, "packed")
    _require_dtype(block_scale, torch.float8_e4m3fn, "block_scale")
    global_scale = _require_scalar_scale(global_scale, "global_scale")
    columns = packed.shape[-1] * 2 if packed.dim() else 0
    expected = (*packed.shape[:-1], columns // NVFP4_GROUP)
    if packed.dim() == 0 or columns % NVFP4_GROUP or tuple(block_scale.shape) != expected:
        raise ValueError(
            f"block_scale: shape {list(block_scale.shape)} does not fit packed {list(packed.shape)}; "
            f"expected {list(expected)} (one scale per {NVFP4_GROUP} values)"
        )
    nan_count = int(e4m3_nan_bytes(block_scale).sum())
    if nan_count:
        raise ValueError(f"block_scale: {nan_count} NaN byte(s) (0x7F/0xFF); the weight cannot be dequantized")
    values = e2m1_codes_to_f32(unpack_uint4(packed))
    values = values.reshape(*expected, NVFP4_GROUP)
    scale = (block_scale.float() * global_scale).unsqueeze(-1)
    return (values * scale).reshape(*packed.shape[:-1], columns).to(dtype)


def fake_quant_nvfp4(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """Quantize then dequantize `x` in blocks of 16 along the last dim, as ModelOpt's Triton `fp4_fake_quant_block`.

    This is what ModelOpt computes on a GPU for NVFP4 weights and activations during calibration and AWQ search, so
    the CPU path built on it calibrates to the same amax values. It differs from `quantize_nvfp4` in three ways that
    only show for blocks far below the tensor's amax:

    - block scales are not clamped up to 2**-9: a ratio below 2**-10 rounds to an E4M3 zero;
    - a block whose final scale `float(block_scale) * global_scale` is below 1e-5 uses scale 1.0 instead, which
      rounds its (tiny) values to zero;
    - `amax == 0` means a global scale of 1e-12, not an all-zero result.

    A last dimension that is not a multiple of 16 ends in a shorter block, as the kernel's zero padding gives. The
    result has the shape and dtype of `x` (float32, bfloat16 or float16); `amax` is the calibrated global amax, one
    value. Every zero is `+0.0`, as the kernel gives (measured with Triton 3.6 on an H200: its `where(x >= 0, r, -r)`
    does not produce `-0.0`).

    The global scale is formed as on a GPU, where ModelOpt computes `amax / (6 * 448)` with torch, which divides a
    CUDA tensor by a Python number by multiplying with its fp32 reciprocal (up to 1 ulp from the IEEE quotient).
    The other divisions here are IEEE. Triton lowers fp32 `/` to PTX `div.full.f32` (up to 2 ulp off), so on a GPU
    a quotient within a few ulp of an E2M1 midpoint or an E4M3 rounding point can land on the other side.
    """
    _require_float(x, "x")
    if x.dim() == 0:
        raise ValueError("x: expected at least one dimension, got a scalar")
    _require_finite(x, "x")
    amax = _require_scalar_scale(amax, "amax")

    columns = x.shape[-1]
    padding = -columns % NVFP4_GROUP
    xf = torch.nn.functional.pad(x.float(), (0, padding))
    blocks = xf.reshape(*xf.shape[:-1], -1, NVFP4_GROUP)

    global_scale = amax.float() * _GLOBAL_SCALE_RECIPROCAL.to(x.device)
    global_scale = torch.where(global_scale > 0, global_scale, _fp32(_FAKEQUANT_ZERO_GLOBAL_SCALE, x.device))
    magnitude = blocks.abs()
    ratio = (magnitude.amax(dim=-1, keepdim=True) / (E2M1_MAX * global_scale)).clamp(max=E4M3_MAX)
    scale = ratio.to(torch.float8_e4m3fn).float() * global_scale
    scale = torch.where(scale >= _fp32(_FAKEQUANT_MIN_BLOCK_SCALE, x.device), scale, torch.ones_like(scale))

    rounded = e2m1_codes_to_f32(_round_to_e2m1(magnitude / scale)) * scale
    signed = torch.where((blocks < 0) & (rounded > 0), -rounded, rounded)
    return signed.reshape(xf.shape)[..., :columns].to(x.dtype)


def quantize_fp8_block(
    w: torch.Tensor, block: tuple[int, int] = FP8_BLOCK, *, quotient_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight [out, in] to FP8-E4M3 with one scale per block, as compressed-tensors' `FP8_BLOCK`.

    Edge blocks are zero-padded (scales are [ceil(out/bh), ceil(in/bw)]). As in compressed-tensors, the scale is
    `block_amax / 448` rounded to `w`'s dtype, and an all-zero block gets that dtype's machine epsilon as its scale.
    The scale is returned as float32, which holds it exactly (`scale.to(w.dtype)` is lossless: llm-compressor stores
    it in the weight's dtype, e.g. BF16).

    `quotient_dtype` is the dtype `w / scale` is rounded to before the E4M3 cast. compressed-tensors rounds it to
    `w`'s dtype on CPU (the default, None) but computes it in float32 in its CUDA Triton kernel (`torch.float32`).
    For bf16 weights the two differ by one E4M3 step in about 3% of the values (double rounding).

    A weight of exactly -0.0 gives byte 0x00, as llm-compressor's `oneshot`, which adds its zero point (0) to the
    quotient; `model_free_ptq` passes no zero point and writes 0x80 there.
    """
    _require_weight(w, "w", group=1)
    if w.dim() != 2:
        raise ValueError(f"w: FP8 block quantization needs a 2-D weight, got shape {list(w.shape)}")
    if quotient_dtype not in (None, *_FLOAT_DTYPES):
        raise ValueError(f"quotient_dtype: expected None or a float16/bfloat16/float32 dtype, got {quotient_dtype}")
    block_rows, block_cols = _require_block(block)
    rows, cols = w.shape
    padded = torch.nn.functional.pad(w, (0, -cols % block_cols, 0, -rows % block_rows))
    grid = (padded.shape[0] // block_rows, padded.shape[1] // block_cols)
    blocks = padded.reshape(grid[0], block_rows, grid[1], block_cols).transpose(1, 2)

    block_amax = blocks.abs().amax(dim=(-1, -2))
    scale = block_amax / torch.tensor(E4M3_MAX, dtype=w.dtype, device=w.device)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(w.dtype).eps, dtype=w.dtype, device=w.device), scale)
    quotient_dtype = w.dtype if quotient_dtype is None else quotient_dtype
    # Adding 0.0 turns -0.0 into +0.0, as compressed-tensors' zero point does.
    quotient = blocks.to(quotient_dtype) / scale.to(quotient_dtype)[..., None, None] + 0.0
    scaled = quotient.clamp(-E4M3_MAX, E4M3_MAX)
    quantized = scaled.to(torch.float8_e4m3fn).transpose(1, 2).reshape(padded.shape)[:rows, :cols]
    return quantized.contiguous(), scale.float()


def dequantize_fp8_block(
    w_fp8: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int] = FP8_BLOCK,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """FP8 block weight back to a tensor: `float(w_fp8) * float(scale)` per block, rounded once to `dtype`."""
    _require_dtype(w_fp8, torch.float8_e4m3fn, "w_fp8")
    _require_float(scale, "scale")
    if w_fp8.dim() != 2:
        raise ValueError(f"w_fp8: expected a 2-D weight, got shape {list(w_fp8.shape)}")
    block_rows, block_cols = _require_block(block)
    rows, cols = w_fp8.shape
    expected = (-(-rows // block_rows), -(-cols // block_cols))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"scale: shape {list(scale.shape)} does not fit weight {[rows, cols]} with blocks {list(block)}; "
            f"expected {list(expected)}"
        )
    _require_finite(scale, "scale")
    _require_no_fp8_nan(w_fp8, "w_fp8")
    expanded = scale.float().repeat_interleave(block_rows, 0).repeat_interleave(block_cols, 1)[:rows, :cols]
    return (w_fp8.float() * expanded).to(dtype)


def quantize_fp8_per_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize to FP8-E4M3 with one fp32 scale `amax / 448`, as ModelOpt's FP8 export.

    As in ModelOpt's `to_quantized_weight`, `w / scale` is rounded to `w`'s dtype before the E4M3 cast. An all-zero
    tensor gets scale 0 and zero bytes (ModelOpt writes NaN bytes there).
    """
    _require_float(w, "w")
    _require_finite(w, "w")
    scale = w.abs().amax().float() / E4M3_MAX
    if scale == 0:
        return torch.zeros(w.shape, device=w.device).to(torch.float8_e4m3fn), scale
    scaled = (w.float() / scale).to(w.dtype).clamp(-E4M3_MAX, E4M3_MAX)
    return scaled.to(torch.float8_e4m3fn), scale


def dequantize_fp8_per_tensor(
    w_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """FP8 per-tensor weight back to a tensor: `float(w_fp8) * float(scale)`, rounded once to `dtype`."""
    _require_dtype(w_fp8, torch.float8_e4m3fn, "w_fp8")
    scale = _require_scalar_scale(scale, "scale")
    _require_no_fp8_nan(w_fp8, "w_fp8")
    return (w_fp8.float() * scale).to(dtype)


def e4m3_nan_bytes(t: torch.Tensor) -> torch.Tensor:
    """Which elements of a float8_e4m3fn tensor are NaN (bytes 0x7F and 0xFF, E4M3FN's only NaN encodings)."""
    _require_dtype(t, torch.float8_e4m3fn, "t")
    return (t.view(torch.uint8) & _E4M3_NAN_MAGNITUDE) == _E4M3_NAN_MAGNITUDE


def _round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """`f32_to_e2m1_codes` without input checks, for quotients whose overflow to inf must saturate as in ModelOpt."""
    magnitude = x.float().abs()
    midpoints = torch.tensor(_E2M1_MIDPOINTS, device=x.device)
    ties_up = torch.tensor(_E2M1_TIES_UP, device=x.device)
    # bucketize counts the midpoints strictly below each magnitude; a tie that rounds up passes one more.
    magnitude_codes = torch.bucketize(magnitude, midpoints) + torch.isin(magnitude, ties_up)
    sign = (x < 0).to(torch.uint8) * _E2M1_SIGN
    return sign | magnitude_codes.to(torch.uint8)


def _fp32(value: float, device: torch.device) -> torch.Tensor:
    # The Triton kernel compares against fp32 literals; a Python float could be compared in float64.
    return torch.tensor(value, dtype=torch.float32, device=device)


def _require_dtype(t: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != dtype:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a {dtype} tensor, got {got}")


def _require_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a float16/bfloat16/float32 tensor, got {got}")


def _require_finite(t: torch.Tensor, name: str) -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        nans = int(torch.isnan(t).sum())
        raise ValueError(f"{name}: contains {nans} NaN and {int(bad.sum()) - nans} infinite value(s)")


def _require_codes(codes: torch.Tensor, name: str) -> None:
    _require_dtype(codes, torch.uint8, name)
    if bool((codes > 0x0F).any()):
        raise ValueError(f"{name}: E2M1 codes must be 0..15, got {int(codes.max())}")


def _require_no_fp8_nan(t: torch.Tensor, name: str) -> None:
    nan_count = int(e4m3_nan_bytes(t).sum())
    if nan_count:
        raise ValueError(f"{name}: {nan_count} NaN byte(s) (0x7F/0xFF)")


def _require_scalar_scale(scale: torch.Tensor, name: str) -> torch.Tensor:
    """A finite, non-negative one-element tensor, returned as a 0-dim float32 tensor."""
    _require_float(scale, name)
    if scale.numel() != 1:
        raise ValueError(f"{name}: expected one value, got shape {list(scale.shape)}")
    _require_finite(scale, name)
    if scale < 0:
        raise ValueError(f"{name}: must be >= 0, got {float(scale)}")
    return scale.float().reshape(())


def _require_weight(w: torch.Tensor, name: str, group: int = NVFP4_GROUP) -> None:
    _require_float(w, name)
    if w.dim() < 2 or w.shape[-1] % group:
        raise ValueError(f"{name}: expected [out, in] with in divisible by {group}, got shape {list(w.shape)}")
    _require_finite(w, name)


def _require_block(block: tuple[int, int]) -> tuple[int, int]:
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise ValueError(f"block: expected two positive ints, got {block!r}")
    return block[0], block[1]
