"""Real exports for the verify tests (`engine_exports`: ModelOpt NVFP4 and llm-compressor FP8 block), built once per
cache folder (pytest's, so a fresh clone builds them again).

Sources: the tiny GLM-4.7-Flash (random weights) and the tiny GLM-4.7 after the QUICK training (trained weights,
so the quality numbers mean something; `sm120_quant.models.trained`). NVFP4 calibrates on a few windows of the
training split; the held-out prompts of the tests are the built-in ones, which no training or calibration text holds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from engine_exports import llmc_fp8_block, modelopt_nvfp4

from sm120_quant.verify.prompts import BUILTIN_PROMPTS

# Bump when the exports change: the cache key includes it.
EXPORT_VERSION = "2"
CALIBRATION_WINDOWS = 4
CALIBRATION_TOKENS = 128
# The held-out prompts most tests verify on, and where ModelOpt's own fake-quant logits are kept for them.
PROMPTS = BUILTIN_PROMPTS[:4]
PROMPT_TOKENS = 96
FAKEQUANT_LOGITS = "modelopt_fakequant_logits.pt"


def build_export(source: Path, scheme: str, key: str) -> Path:
    """`scheme` is nvfp4 or fp8_block; the export lands in the cache under `key`, atomically. An NVFP4 export also
    keeps (BF16, ModelOpt fake-quant) logits of PROMPTS in FAKEQUANT_LOGITS (a file verify does not read)."""
    import torch
    from transformers import AutoTokenizer

    target = Path(os.environ["SM120_QUANT_CACHE"]) / "verify-exports" / f"{key}-{scheme}-v{EXPORT_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        if scheme == "nvfp4":
            tokenizer = AutoTokenizer.from_pretrained(source)
            probes = [torch.tensor(tokenizer(p)["input_ids"][:PROMPT_TOKENS]) for p in PROMPTS]
            logits = modelopt_nvfp4(source, tmp / "out", _calibration_batches(tokenizer), probes)
            torch.save(logits, tmp / "out" / FAKEQUANT_LOGITS)
        else:
            llmc_fp8_block(source, tmp / "out")
        (tmp / "out").rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _calibration_batches(tokenizer) -> list:
    import torch

    from sm120_quant.models.trained import training_code_files

    return [torch.tensor([tokenizer(path.read_text(encoding="utf-8"))["input_ids"][:CALIBRATION_TOKENS]])
            for path in training_code_files()[:CALIBRATION_WINDOWS]]


@pytest.fixture(scope="session")
def trained_glm47() -> Path:
    from sm120_quant.models.trained import QUICK, trained_tiny_model

    return trained_tiny_model("glm47", QUICK)


@pytest.fixture(scope="session")
def glm47_nvfp4(trained_glm47) -> Path:
    return build_export(trained_glm47, "nvfp4", trained_glm47.name)


@pytest.fixture(scope="session")
def glm47_fp8(trained_glm47) -> Path:
    return build_export(trained_glm47, "fp8_block", trained_glm47.name)


@pytest.fixture(scope="session")
def flash_nvfp4(tiny_glm47_flash) -> Path:
    return build_export(tiny_glm47_flash, "nvfp4", tiny_glm47_flash.name)


@pytest.fixture(scope="session")
def flash_fp8(tiny_glm47_flash) -> Path:
    return build_export(tiny_glm47_flash, "fp8_block", tiny_glm47_flash.name)
