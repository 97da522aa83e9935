"""Export stage: QuantizedModel -> Checkpoint. The engine writes its format; then every export gets the same
finishing steps (tokenizer and chat template, MTP layer, exclusions)."""

from __future__ import annotations

import time
from pathlib import Path

from sm120_quant.exporters.checkpoint import Checkpoint, copy_tokenizer_files
from sm120_quant.exporters.modelopt_export import export_modelopt
from sm120_quant.exporters.mtp import copy_mtp_layers
from sm120_quant.models.load import TOKENIZER_FILES
from sm120_quant.quantize.model import QuantizedModel
from sm120_quant.recipes.schema import Engine, Recipe

_FORMATS = {Engine.MODELOPT: "modelopt", Engine.LLMCOMPRESSOR: "compressed-tensors"}


def _export_llmcompressor(quantized: QuantizedModel, folder: Path, max_shard_size: str) -> None:
    from sm120_quant.exporters.llmc_export import export_llmcompressor

    export_llmcompressor(quantized, folder, max_shard_size)


_EXPORTERS = {Engine.MODELOPT: export_modelopt, Engine.LLMCOMPRESSOR: _export_llmcompressor}


def export(quantized: QuantizedModel, recipe: Recipe, folder: Path) -> Checkpoint:
    start = time.perf_counter()
    _EXPORTERS[quantized.engine](quantized, folder, recipe.export.max_shard_size)
    quantized.timings["export"] = time.perf_counter() - start
    copied = copy_tokenizer_files(quantized.source.folder, folder, TOKENIZER_FILES)
    quantized.notes.append(f"copied from source: {', '.join(copied)}")
    if recipe.fixups.copy_mtp:
        n = copy_mtp_layers(quantized.source, folder)
        if n:
            quantized.notes.append(f"MTP layer: copied {n} BF16 tensors from the source and excluded them")
    return Checkpoint(folder, _FORMATS[quantized.engine])
