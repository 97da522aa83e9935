"""Read any quantized checkpoint's linear weights back to float, with our reference math, one module at a time.

transformers cannot be trusted for this: reloading compressed-tensors NVFP4 MoE checkpoints ignores the global scale
(expert weights ~30,000x off) and FP8-block MoE reload fails. Layouts understood:

| layout     | producer                  | tensors of module X                                                          |
|------------|---------------------------|------------------------------------------------------------------------------|
| nvfp4      | ModelOpt                  | weight u8 [o,i/2], weight_scale e4m3 [o,i/16], weight_scale_2 f32            |
| ct_nvfp4   | compressed-tensors        | weight_packed u8, weight_scale e4m3, weight_global_scale f32 (= 1/scale_2)   |
| fp8_block  | compressed-tensors        | weight e4m3 [o,i], weight_scale [ceil(o/128), ceil(i/128)]                    |
| fp8        | ModelOpt / c-t per-tensor | weight e4m3, weight_scale scalar (or [o,1] per channel)                       |
| dense      | unquantized               | weight bf16/f16/f32                                                          |

Scales are reported in ModelOpt's convention whatever the layout: `global_scale` is the NVFP4 `weight_scale_2` (the
reciprocal of compressed-tensors' `weight_global_scale`) and `input_scale` is `activation amax / (6*448)` for NVFP4
(the reciprocal of `input_global_scale`) or the static FP8 input scale.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from sm120_quant.errors import UserError
from sm120_quant.quantize import formats

INDEX = "model.safetensors.index.json"
NVFP4_LAYOUTS = frozenset({"nvfp4", "ct_nvfp4"})
# Stands in for a NaN E4M3 byte while the rest of the tensor is dequantized: E4M3 0x38 is 1.0.
_E4M3_ONE = 0x38


class Activation(str, Enum):
    """How the serving runtime quantizes a linear module's input."""

    NONE = "none"
    """Activations stay in the compute dtype (unquantized modules, weight-only schemes)."""
    NVFP4 = "nvfp4"
    """Static global scale `input_scale` (calibrated amax / (6*448)), E4M3 scale per 16 values computed per call."""
    FP8_GROUP = "fp8_group"
    """Dynamic: one fp32 scale `amax / 448` per token and group of `group_size` input columns (FP8_BLOCK)."""
    FP8_TOKEN = "fp8_token"
    """Dynamic: one fp32 scale `amax / 448` per token."""
    FP8_TENSOR = "fp8_tensor"
    """Static: the calibrated `input_scale` for the whole tensor."""


@dataclass(frozen=True)
class ActivationScheme:
    kind: Activation
    group_size: int | None = None


@dataclass(frozen=True)
class LinearWeight:
    module: str
    layout: str
    weight: torch.Tensor  # float32, dequantized
    input_scale: float | None  # NVFP4 static activation scale (amax / (6*448)); None when activations are dynamic
    global_scale: float | None = None  # the NVFP4 weight_scale_2 the weight was dequantized with
    defects: tuple[str, ...] = ()  # what is wrong with the stored tensors (NaN scales, zero scales, all-zero weight)


class CheckpointReader:
    """Lazy access to the tensors of a safetensors checkpoint (single file or sharded with an index)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        shards = sorted(folder.glob("*.safetensors"))
        if not shards:
            raise UserError(f"{folder}: no .safetensors files; pass a checkpoint folder")
        index_path = folder / INDEX
        if index_path.exists():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            self._where = {k: folder / v for k, v in weight_map.items()}
        else:
            self._where = {}
            for shard in shards:
                with safe_open(shard, "pt") as f:
                    names = f.keys()
                self._where.update({k: shard for k in names})
        self._open = {}
        self._groups: list[tuple[list[str], dict]] | None = None

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise UserError(f"{self.folder}: tensor {key!r} is not in the checkpoint")
        self._slice(key)
        return self._open[self._where[key]].get_tensor(key)

    def config(self) -> dict:
        path = self.folder / "config.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{self.folder}: no config.json; pass a Hugging Face checkpoint folder") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON at line {e.lineno}; repair or re-export the file") from None

    def linear_modules(self) -> list[str]:
        """Modules with a 2-D weight (quantized or not): `X` for every `X.weight` / `X.weight_packed`."""
        names = set()
        for key in self._where:
            for suffix in (".weight", ".weight_packed"):
                if key.endswith(suffix):
                    names.add(key[: -len(suffix)])
        return sorted(names)

    def layout(self, module: str) -> str:
        if f"{module}.weight_packed" in self:
            return "ct_nvfp4"
        if f"{module}.weight_scale_2" in self:
            return "nvfp4"
        if f"{module}.weight_scale" in self:
            scale_shape = self._slice(f"{module}.weight_scale").get_shape()
            weight = self._slice(f"{module}.weight")
            out, in_ = weight.get_shape()
            # [ceil(out/128), ceil(in/128)] is a block scale even when in <= 128 makes it one column wide; a
            # per-channel scale is [out, 1].
            blocks = [-(-out // 128), -(-in_ // 128)]
            is_block = weight.get_dtype() == "F8_E4M3" and scale_shape == blocks and scale_shape != [out, 1]
            return "fp8_block" if is_block else "fp8"
        return "dense"

    def _slice(self, key: str):
        """The safetensors slice of `key`: shape and dtype without reading the data."""
        from safetensors import safe_open

        shard = self._where[key]
        if shard not in self._open:
            self._open[shard] = safe_open(shard, "pt")
        return self._open[shard].get_slice(key)

    def global_scale(self, module: str) -> float | None:
        """The NVFP4 `weight_scale_2` (compressed-tensors: `1 / weight_global_scale`); None for other layouts."""
        layout = self.layout(module)
        if layout == "nvfp4":
            return float(self.get(f"{module}.weight_scale_2"))
        if layout == "ct_nvfp4":
            return float(1.0 / self.get(f"{module}.weight_global_scale").float())
        return None

    def input_scale(self, module: str) -> float | None:
        """The static input scale in ModelOpt's convention (compressed-tensors: `1 / input_global_scale`), or None."""
        if f"{module}.input_global_scale" in self:
            return float(1.0 / self.get(f"{module}.input_global_scale").float())
        if f"{module}.input_scale" in self:
            return float(self.get(f"{module}.input_scale"))
        return None

    def linear(self, module: str, *, global_scale: float | None = None, keep_nan: bool = False) -> LinearWeight:
        """The module's weight dequantized to float32, with its static input scale when it has one.

        `global_scale` replaces the stored NVFP4 `weight_scale_2`: a runtime that fuses sibling projections into one
        layer uses one global scale for all of them (see `verify.emulate`). `keep_nan` dequantizes NaN scale bytes
        to NaN weights (and lists them in `defects`) instead of refusing the module, to show what a runtime computes.
        """
        layout = self.layout(module)
        g = lambda suffix: self.get(f"{module}.{suffix}")
        defects: list[str] = []
        input_scale = self.input_scale(module)
        if input_scale is not None and not (input_scale > 0 and input_scale != float("inf")):
            defects.append(f"input scale is {input_scale:g}; activations quantize to inf/NaN")
        try:
            if layout in NVFP4_LAYOUTS:
                stored = self.global_scale(module)
                if not (stored > 0 and stored != float("inf")):
                    defects.append(f"global weight scale is {stored:g}")
                used = stored if global_scale is None else global_scale
                packed = g("weight" if layout == "nvfp4" else "weight_packed")
                block_scale = _nan_bytes_to_one(g("weight_scale"), module, keep_nan, defects)
                if used >= 0 and used != float("inf"):
                    w = formats.dequantize_nvfp4(packed, block_scale.clean, torch.tensor(used, dtype=torch.float32))
                elif keep_nan:
                    w = formats.dequantize_nvfp4(packed, block_scale.clean, torch.tensor(1.0)) * used
                else:
                    raise ValueError(f"global weight scale is {used:g}")
                w = _put_nan(w, block_scale.nan, (1, formats.NVFP4_GROUP))
                if not bool(packed.any()):
                    defects.append("every E2M1 code is zero")
                return LinearWeight(module, layout, w, input_scale, used, tuple(defects))
            if layout == "fp8_block":
                w_fp8 = _nan_bytes_to_one(g("weight"), module, keep_nan, defects)
                scale = g("weight_scale")
                bad_scale = ~torch.isfinite(scale)
                if bool(bad_scale.any()):
                    if not keep_nan:
                        raise ValueError(f"weight_scale: {int(bad_scale.sum())} non-finite block scale(s)")
                    defects.append(f"{int(bad_scale.sum())} non-finite block scale(s) in weight_scale")
                w = formats.dequantize_fp8_block(w_fp8.clean, torch.where(bad_scale, 1.0, scale.float()))
                w = _put_nan(_put_nan(w, w_fp8.nan, (1, 1)), bad_scale, formats.FP8_BLOCK)
                if not bool(w_fp8.clean.view(torch.uint8).any()):
                    defects.append("every FP8 value is zero")
            elif layout == "fp8":
                scale = g("weight_scale")
                w = (g("weight").float() * scale.float().reshape(-1, 1) if scale.numel() > 1
                     else formats.dequantize_fp8_per_tensor(g("weight"), scale))
            else:
                w = g("weight").float()
        except ValueError as e:
            raise UserError(f"{self.folder}: {module}: {e}") from None
        return LinearWeight(module, layout, w, input_scale, None, tuple(defects))

    def activation(self, module: str) -> ActivationScheme:
        """How a runtime quantizes this module's input, from the checkpoint's quantization config and its tensors."""
        layout = self.layout(module)
        if layout == "dense":
            return ActivationScheme(Activation.NONE)
        if layout in NVFP4_LAYOUTS:
            # Both producers write a static input scale exactly when activations are quantized (W4A4, not W4A16).
            return ActivationScheme(Activation.NVFP4 if self.input_scale(module) is not None else Activation.NONE)
        args = self._input_activation_args(module)
        if args is None:
            # ModelOpt FP8 writes a static input_scale; a weight-only FP8 export has none.
            return ActivationScheme(Activation.FP8_TENSOR if self.input_scale(module) is not None
                                    else Activation.NONE)
        if not args.get("dynamic"):
            if self.input_scale(module) is None:
                raise UserError(f"{self.folder}: {module}: the quantization config asks for static input "
                                "activations but the checkpoint has no input_scale; re-export the checkpoint")
            return ActivationScheme(Activation.FP8_TENSOR)
        strategy = args.get("strategy")
        if strategy == "group":
            return ActivationScheme(Activation.FP8_GROUP, int(args["group_size"]))
        if strategy == "token":
            return ActivationScheme(Activation.FP8_TOKEN)
        raise UserError(f"{self.folder}/config.json: quantization_config input_activations strategy {strategy!r} "
                        f"for {module} is not emulated; verify supports group and token")

    def _input_activation_args(self, module: str) -> dict | None:
        """compressed-tensors `input_activations` of the config group that targets `module`; None when the
        checkpoint has no such config (ModelOpt) or the group quantizes weights only."""
        if self._groups is None:
            qcfg = self.config().get("quantization_config") or {}
            self._groups = []
            if qcfg.get("quant_method") == "compressed-tensors":
                for group in (qcfg.get("config_groups") or {}).values():
                    self._groups.append((list(group.get("targets") or []), group.get("input_activations") or {}))
        for targets, args in self._groups:
            if any(_targets(t, module) for t in targets):
                return args or None
        return None


def _targets(target: str, module: str) -> bool:
    """compressed-tensors target matching: `re:` regexes, class names (every module here is a Linear), exact names."""
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == "Linear" or target == module


@dataclass(frozen=True)
class _Cleaned:
    clean: torch.Tensor  # the E4M3 tensor with NaN bytes replaced by 1.0
    nan: torch.Tensor  # bool, where the NaN bytes were


def _nan_bytes_to_one(t: torch.Tensor, module: str, keep_nan: bool, defects: list[str]) -> _Cleaned:
    if t.dtype != torch.float8_e4m3fn:
        return _Cleaned(t, torch.zeros(t.shape, dtype=torch.bool))
    nan = formats.e4m3_nan_bytes(t)
    if not bool(nan.any()):
        return _Cleaned(t, nan)
    if not keep_nan:
        raise ValueError(f"{int(nan.sum())} NaN byte(s) (0x7F/0xFF) in an E4M3 tensor")
    defects.append(f"{int(nan.sum())} NaN E4M3 byte(s) in the weight or its block scales")
    clean = t.view(torch.uint8).clone()
    clean[nan] = _E4M3_ONE
    return _Cleaned(clean.view(torch.float8_e4m3fn), nan)


def _put_nan(w: torch.Tensor, nan: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Set NaN in every element of `w` covered by a True entry of `nan` (one entry per `block` of `w`)."""
    if not bool(nan.any()):
        return w
    mask = nan.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: w.shape[0], : w.shape[1]]
    return w.masked_fill(mask, float("nan"))


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Relative Frobenius error ||approx - exact|| / ||exact|| (0 when both are zero)."""
    exact = exact.float()
    denom = exact.norm()
    diff = (approx.float() - exact).norm()
    return float(diff / denom) if denom > 0 else float(diff)


def weight_errors(source: Path, checkpoint: Path) -> dict[str, tuple[str, float]]:
    """Per quantized linear: (layout, relative Frobenius error of its dequantized weight vs the source weight)."""
    quant = CheckpointReader(checkpoint)
    src = CheckpointReader(source)
    errors = {}
    for module in quant.linear_modules():
        layout = quant.layout(module)
        if layout == "dense" or f"{module}.weight" not in src:
            continue
        errors[module] = (layout, relative_error(quant.linear(module).weight, src.get(f"{module}.weight")))
    return errors
