"""Real exports for the verify tests, built once per cache folder (pytest's, so a fresh clone builds them again):

- ModelOpt NVFP4 (unified HF format): `mtq.quantize(NVFP4_DEFAULT_CFG)` with expanded experts and the pure-torch CPU
  fake-quant, calibrated on a few windows of training text, then `export_hf_checkpoint`;
- compressed-tensors FP8 block: llm-compressor `oneshot(FP8_BLOCK)`, then `save_pretrained(save_compressed=True)`.

Sources: the tiny GLM-4.7-Flash (random weights) and the tiny GLM-4.7 after the QUICK training (trained weights,
so the quality numbers mean something; `sm120_quant.models.trained`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Bump when the export recipe below changes: the cache key includes it.
EXPORT_VERSION = "1"
CALIBRATION_WINDOWS = 4
CALIBRATION_TOKENS = 128


def _exports_root() -> Path:
    return Path(os.environ["SM120_QUANT_CACHE"]) / "verify-exports"


def build_export(source: Path, scheme: str, key: str) -> Path:
    """`scheme` is nvfp4 or fp8_block; the export lands in the cache under `key`, atomically."""
    target = _exports_root() / f"{key}-{scheme}-v{EXPORT_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        {"nvfp4": _modelopt_nvfp4, "fp8_block": _llmc_fp8_block}[scheme](source, tmp / "out")
        (tmp / "out").rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load(source: Path):
    from sm120_quant.models.load import load_model, resolve_source
    from sm120_quant.recipes.schema import ModelSpec

    spec = ModelSpec(id=str(source))
    return load_model(spec, resolve_source(spec), device="cpu")


def _calibration_batches(source: Path):
    import torch
    from transformers import AutoTokenizer

    from sm120_quant.models.trained import training_code_files

    tokenizer = AutoTokenizer.from_pretrained(source)
    batches = []
    for path in training_code_files()[:CALIBRATION_WINDOWS]:
        ids = tokenizer(path.read_text(encoding="utf-8"))["input_ids"][:CALIBRATION_TOKENS]
        batches.append(torch.tensor([ids]))
    return batches


def _modelopt_nvfp4(source: Path, out: Path) -> None:
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint

    from sm120_quant.quantize.cpu_fakequant import cpu_nvfp4_fakequant
    from sm120_quant.quantize.moe import expand_experts

    model = _load(source)
    expand_experts(model)
    batches = _calibration_batches(source)

    def loop(m):
        for ids in batches:
            m(ids)

    with torch.no_grad(), cpu_nvfp4_fakequant():
        mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, loop)
        export_hf_checkpoint(model, export_dir=out)


def _llmc_fp8_block(source: Path, out: Path) -> None:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    model = _load(source)
    # As the bundled FP8-block recipes: the router stays BF16, and vLLM fuses q_a_proj with kv_a_proj_with_mqa
    # (576 outputs, not a multiple of 128), so both stay BF16.
    ignore = ["lm_head", "re:.*mlp\\.gate$", "re:.*q_a_proj$", "re:.*kv_a_proj_with_mqa$"]
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="FP8_BLOCK", ignore=ignore))
    model.save_pretrained(out, save_compressed=True)


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
