"""Helpers shared by the calibration-data tests (imported by module name, like tests/serve/serve_support.py)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from sm120_quant.recipes.calibration import CalibrationSpec


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def spec_of(text: str, base_dir: Path | None = None) -> CalibrationSpec:
    """A CalibrationSpec from YAML, with relative paths resolved against base_dir as the recipe loader does."""
    return CalibrationSpec.model_validate(yaml.safe_load(text), context={"base_dir": base_dir} if base_dir else None)


PARAGRAPHS = [
    "The router scores each token against every routed expert.",
    "Only the top-k experts run; their outputs are summed with the router weights.",
    "Calibration measures the largest input each expert sees.",
    "An expert that no token reaches has no input statistics at all.",
    "Left padding keeps the last real token at the end of each row.",
    "Packing joins samples with an end-of-text token and cuts full rows.",
]
