"""Load the source model and tokenizer a recipe names: a hub id, a local folder, or a tiny:// model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sm120_quant.errors import UserError
from sm120_quant.models.tiny import build_tiny_model, tiny_name
from sm120_quant.recipes.schema import ModelSpec

# Files every export copies from the source so the checkpoint serves with the same chat template and tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json")


@dataclass(frozen=True)
class SourceCheckpoint:
    """The BF16 source on local disk: where its config, safetensors and tokenizer files are."""

    folder: Path
    config: dict[str, Any]

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "")

    @property
    def num_hidden_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def mtp_layers(self) -> int:
        return int(self.config.get("num_nextn_predict_layers") or 0)


def resolve_source(spec: ModelSpec) -> SourceCheckpoint:
    """Find (or build, or download) the source checkpoint folder; fail with the fix when it cannot be had."""
    name = tiny_name(spec.id)
    if name is not None:
        folder = build_tiny_model(name)
    elif Path(spec.id).expanduser().is_dir():
        folder = Path(spec.id).expanduser()
    else:
        folder = _download(spec)
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise UserError(f"{folder}: no config.json; model.id must name a Hugging Face checkpoint folder") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{config_path}: invalid JSON at line {e.lineno}; repair or re-download the file") from None
    return SourceCheckpoint(folder, config)


def _download(spec: ModelSpec) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise UserError(f"model.id {spec.id!r} is not a local folder and huggingface_hub is not installed; "
                        "pip install 'sm120-quant[hub]' or pass a local path") from None
    try:
        return Path(snapshot_download(spec.id, revision=spec.revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt",
                                                      "README.md", "LICENSE*"]))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise UserError(f"model.id {spec.id!r}: cannot be downloaded ({type(e).__name__}); check the id and your "
                        "network or token, or download it first (`hf download ID --local-dir DIR`) and set "
                        "model.id to DIR") from None


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    source = resolve_source(spec)
    return AutoTokenizer.from_pretrained(source.folder, trust_remote_code=spec.trust_remote_code)


def load_model(spec: ModelSpec, source: SourceCheckpoint, device: str = "cpu"):
    """The model in the recipe's dtype, in eval mode. MTP tensors in the checkpoint are not part of the transformers
    model (it drops them at load); the exporter copies them from `source` instead."""
    import torch
    from transformers import AutoModelForCausalLM

    from sm120_quant.quiet import library_output

    dtype = getattr(torch, spec.dtype)
    # Quiet too because the load report would list every MTP tensor as UNEXPECTED, by design here.
    with library_output():
        model = AutoModelForCausalLM.from_pretrained(
            source.folder, dtype=dtype, trust_remote_code=spec.trust_remote_code, device_map=device,
            # ModelOpt calibrates fused experts only in eager mode, and expansion reproduces eager bit for bit.
            experts_implementation="eager")
    if not getattr(model.config, "architectures", None):
        # ModelOpt's export iterates config.architectures and fails on None.
        model.config.architectures = [type(model).__name__]
    return model.eval()
