"""The tiny GLM-4.7 checkpoint and its tokenizer (real byte-level BPE, GLM-4.7 chat template), built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from sm120_quant.models.tiny import build_tiny_model


@pytest.fixture(scope="session")
def glm47_dir() -> Path:
    return build_tiny_model("glm47")


@pytest.fixture(scope="session")
def tokenizer(glm47_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(glm47_dir)
