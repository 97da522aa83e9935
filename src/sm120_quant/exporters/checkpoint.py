"""The exported checkpoint folder and the edits every export gets after the engine wrote it."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from sm120_quant.errors import UserError

INDEX = "model.safetensors.index.json"
HF_QUANT_CONFIG = "hf_quant_config.json"


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    quant_format: str  # "modelopt" | "compressed-tensors"

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("*.safetensors"))

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing; the folder is not a complete Hugging Face checkpoint") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}; repair or re-export it") from None


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def copy_tokenizer_files(source: Path, dest: Path, names: tuple[str, ...]) -> list[str]:
    """Copy the source's tokenizer, chat template and generation config byte for byte (the engines rewrite or drop
    some of them; the served model must use the upstream chat template)."""
    copied = []
    for name in names:
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
            copied.append(name)
    return copied


def add_exclusions(folder: Path, modules: list[str]) -> list[str]:
    """Add module names (or `prefix*` globs) to the exclusion lists that runtimes read, in every place the format
    keeps one: hf_quant_config.json `exclude_modules` and config.json `quantization_config.ignore`. Returns what was
    new."""
    config_path = folder / "config.json"
    config = read_json(config_path)
    qc = config.get("quantization_config")
    if qc is None:
        raise UserError(f"{config_path}: no quantization_config; this is not a quantized checkpoint")
    if qc.get("quant_method") == "compressed-tensors":
        # compressed-tensors (and vLLM reading it) match exact names or `re:` regexes, not globs.
        from sm120_quant.exporters.llmc_export import ct_ignore_entry

        modules = [ct_ignore_entry(m) for m in modules]
    added = [m for m in modules if m not in qc.setdefault("ignore", [])]
    qc["ignore"].extend(added)
    write_json(config_path, config)
    hf_path = folder / HF_QUANT_CONFIG
    if hf_path.exists():
        hf = read_json(hf_path)
        excl = hf["quantization"].setdefault("exclude_modules", [])
        excl.extend(m for m in modules if m not in excl)
        write_json(hf_path, hf)
    return added
