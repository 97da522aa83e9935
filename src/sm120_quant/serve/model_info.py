"""What `serve` needs to know about a checkpoint folder: attention kind, quantization, KV-cache dtype, MTP, weight bytes.

Read from config.json (+ hf_quant_config.json) and the safetensors headers; no tensor data is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sm120_quant.errors import UserError
from sm120_quant.exporters.safetensors_header import read_header

# model_type -> attention kind. MLA caches one latent (kv_lora_rank + qk_rope_head_dim) per token and layer.
ATTENTION_KIND = {
    "glm4_moe": "gqa",
    "glm4_moe_lite": "mla",
    "deepseek_v2": "mla",
    "deepseek_v3": "mla",
    "glm_moe_dsa": "mla",
}
QUANT_NONE = "none"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    config: dict[str, Any]
    model_type: str
    attention: str  # "gqa" | "mla"
    quantization: str  # "modelopt_fp4" | "modelopt" | "compressed-tensors" | "none"
    kv_cache_dtype: str  # "fp8" when the checkpoint ships KV scales for an FP8 cache, else "auto"
    mtp_layers: int
    mtp_weights: bool
    weight_bytes: int | None  # tensor bytes vLLM loads (MTP layer excluded, unless only an index gives the total)
    mtp_bytes: int  # tensor bytes of the MTP layer (0 when unknown)

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}); pass a checkpoint folder") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix or re-export the file") from e


def _quantization(config: dict[str, Any], folder: Path) -> tuple[str, str]:
    """(vLLM quantization method, KV-cache dtype) from config.json's quantization_config or hf_quant_config.json."""
    qc = config.get("quantization_config")
    legacy = folder / "hf_quant_config.json"
    if qc is None and legacy.exists():
        qc = {"quant_method": "modelopt", **_read_json(legacy)}
    if qc is None:
        return QUANT_NONE, "auto"
    method = str(qc.get("quant_method", "")).lower()
    if method.startswith("modelopt"):
        inner = qc.get("quantization", qc)
        algo = str(inner.get("quant_algo", "")).upper()
        kv_algo = inner.get("kv_cache_quant_algo")
        kv_scheme = inner.get("kv_cache_scheme") or {}
        kv_fp8 = kv_algo == "FP8" or (kv_scheme.get("type") == "float" and kv_scheme.get("num_bits") == 8)
        if "FP4" in algo:
            return "modelopt_fp4", "fp8" if kv_fp8 else "auto"
        if "FP8" in algo:
            return "modelopt", "fp8" if kv_fp8 else "auto"
        raise UserError(
            f"{folder}: ModelOpt quant_algo {algo or '(none)'} is not NVFP4 or FP8; re-export the checkpoint"
        )
    if method == "compressed-tensors":
        kv = qc.get("kv_cache_scheme") or {}
        return "compressed-tensors", "fp8" if kv.get("type") == "float" and kv.get("num_bits") == 8 else "auto"
    raise UserError(f"{folder}/config.json: quant_method {method!r} is not modelopt or compressed-tensors")


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: no config.json; pass a Hugging Face checkpoint folder")
    config = _read_json(folder / "config.json")
    model_type = config.get("model_type", "")
    if model_type not in ATTENTION_KIND:
        raise UserError(
            f"{folder}/config.json: model_type {model_type!r} is not one serve knows ({', '.join(sorted(ATTENTION_KIND))})"
        )
    quantization, kv_dtype = _quantization(config, folder)
    n_layers = int(config["num_hidden_layers"])
    mtp = int(config.get("num_nextn_predict_layers") or 0)
    mtp_prefix = f"model.layers.{n_layers}."
    shards = sorted(folder.glob("*.safetensors"))
    weight_bytes: int | None = None
    mtp_bytes = 0
    mtp_weights = False
    if shards:
        weight_bytes = 0
        for shard in shards:
            for name, info in read_header(shard).tensors.items():
                if name.startswith(mtp_prefix):
                    mtp_bytes += info.nbytes
                else:
                    weight_bytes += info.nbytes
        mtp_weights = mtp_bytes > 0
    elif (folder / "model.safetensors.index.json").exists():
        # An index without its shards (a plan made before downloading): only the total is known, MTP included.
        index = _read_json(folder / "model.safetensors.index.json")
        weight_bytes = index.get("metadata", {}).get("total_size")
        mtp_weights = any(n.startswith(mtp_prefix) for n in index.get("weight_map", {}))
    return CheckpointInfo(
        path=folder,
        config=config,
        model_type=model_type,
        attention=ATTENTION_KIND[model_type],
        quantization=quantization,
        kv_cache_dtype=kv_dtype,
        mtp_layers=mtp,
        mtp_weights=mtp_weights,
        weight_bytes=weight_bytes,
        mtp_bytes=mtp_bytes,
    )
