"""Plant one realistic defect in a copy of a real checkpoint. Each function takes the checkpoint's tensors (every
shard, by name) and edits them in place; `planted` copies the folder and writes the edited tensors back."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sm120_quant.quantize import formats

Tensors = dict[str, torch.Tensor]


def planted(src: Path, dst: Path, fault: Callable[[Tensors], None]) -> Path:
    shutil.copytree(src, dst)
    shards: dict[Path, Tensors] = {}
    for shard in sorted(dst.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            names = f.keys()
            shards[shard] = {k: f.get_tensor(k) for k in names}
    tensors = {k: t for shard in shards.values() for k, t in shard.items()}
    fault(tensors)
    for shard, names in shards.items():
        save_file({k: tensors[k].contiguous() for k in names}, shard, metadata={"format": "pt"})
    return dst


def _nvfp4_keys(tensors: Tensors, module: str) -> tuple[str, str, str]:
    """(packed, block scale, global scale) names: ModelOpt or compressed-tensors."""
    if f"{module}.weight_packed" in tensors:
        return f"{module}.weight_packed", f"{module}.weight_scale", f"{module}.weight_global_scale"
    return f"{module}.weight", f"{module}.weight_scale", f"{module}.weight_scale_2"


def swap_nibbles(module: str) -> Callable[[Tensors], None]:
    """An exporter that packs the odd column into the low nibble."""

    def fault(tensors: Tensors) -> None:
        key = _nvfp4_keys(tensors, module)[0]
        p = tensors[key]
        tensors[key] = ((p & 0x0F) << 4) | (p >> 4)

    return fault


def own_up_global_scale(expert: str, factor: float = 4.0) -> Callable[[Tensors], None]:
    """An exporter that gives an expert's up_proj its own global scale (`factor` x gate's) and re-derives up's block
    scales for it: correct on its own, wrong in vLLM, which keeps only gate's global scale for the fused w13."""

    def fault(tensors: Tensors) -> None:
        packed, block, glob = _nvfp4_keys(tensors, f"{expert}.up_proj")
        ct = glob.endswith("weight_global_scale")
        scale_2 = 1.0 / tensors[glob].float() if ct else tensors[glob].float()
        w = formats.dequantize_nvfp4(tensors[packed], tensors[block], scale_2.reshape(()))
        q = formats.quantize_nvfp4(w, scale_2.reshape(()) * factor)
        tensors[packed], tensors[block] = q.packed, q.block_scale
        tensors[glob] = (1.0 / q.global_scale if ct else q.global_scale.clone()).reshape(tensors[glob].shape)

    return fault


def zero_weights(module: str) -> Callable[[Tensors], None]:
    """Every code of an NVFP4 weight zero (scales kept): the module computes nothing."""

    def fault(tensors: Tensors) -> None:
        key = _nvfp4_keys(tensors, module)[0]
        tensors[key] = torch.zeros_like(tensors[key])

    return fault


def zero_input_scale(module: str) -> Callable[[Tensors], None]:
    def fault(tensors: Tensors) -> None:
        tensors[f"{module}.input_scale"] = torch.zeros_like(tensors[f"{module}.input_scale"])

    return fault


def nan_block_scale(module: str, row: int = 0, col: int = 0) -> Callable[[Tensors], None]:
    """One NaN block scale: the E4M3 NaN byte 0x7F (NVFP4) or a NaN BF16/F32 scale (FP8 block)."""

    def fault(tensors: Tensors) -> None:
        scale = tensors[f"{module}.weight_scale"].clone()
        if scale.dtype == torch.float8_e4m3fn:
            scale.view(torch.uint8)[row, col] = 0x7F
        else:
            scale[row, col] = float("nan")
        tensors[f"{module}.weight_scale"] = scale

    return fault


def rescale_norm_not_router(layer: int, seed: int = 0) -> Callable[[Tensors], None]:
    """AWQ-style smoothing gone wrong: post_attention_layernorm is scaled per channel by s in [0.7, 1.4] and every
    expert's gate/up is requantized with its input columns divided by s, but the router is left as it was."""

    def fault(tensors: Tensors) -> None:
        prefix = f"model.layers.{layer}."
        norm = prefix + "post_attention_layernorm.weight"
        gen = torch.Generator().manual_seed(seed)
        s = 0.7 + 0.7 * torch.rand(tensors[norm].shape[0], generator=gen)
        tensors[norm] = (tensors[norm].float() * s).to(tensors[norm].dtype)
        parents = sorted({k.rsplit(".", 2)[0] for k in tensors
                          if k.startswith(prefix + "mlp.") and k.rsplit(".", 2)[-2] in ("gate_proj", "up_proj")})
        for parent in parents:
            _requantize_pair(tensors, parent, s)

    return fault


def _requantize_pair(tensors: Tensors, parent: str, s: torch.Tensor) -> None:
    gate, up = f"{parent}.gate_proj", f"{parent}.up_proj"
    if f"{gate}.weight_scale" in tensors and tensors[f"{gate}.weight_scale"].dtype != torch.float8_e4m3fn:
        for m in (gate, up):  # FP8 block
            w = formats.dequantize_fp8_block(tensors[f"{m}.weight"], tensors[f"{m}.weight_scale"]) / s
            q, scale = formats.quantize_fp8_block(w.to(torch.bfloat16))
            tensors[f"{m}.weight"], tensors[f"{m}.weight_scale"] = q, scale.to(tensors[f"{m}.weight_scale"].dtype)
        return
    weights = {}
    for m in (gate, up):
        packed, block, glob = _nvfp4_keys(tensors, m)
        ct = glob.endswith("weight_global_scale")
        scale_2 = (1.0 / tensors[glob].float() if ct else tensors[glob].float()).reshape(())
        weights[m] = formats.dequantize_nvfp4(tensors[packed], tensors[block], scale_2) / s
    shared = formats.nvfp4_global_scale(torch.stack([w.abs().amax() for w in weights.values()]).amax())
    for m, w in weights.items():
        packed, block, glob = _nvfp4_keys(tensors, m)
        q = formats.quantize_nvfp4(w, shared)
        tensors[packed], tensors[block] = q.packed, q.block_scale
        ct = glob.endswith("weight_global_scale")
        tensors[glob] = (1.0 / q.global_scale if ct else q.global_scale.clone()).reshape(tensors[glob].shape)
