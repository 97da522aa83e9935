"""Quantize stage: (Recipe, model, CalibrationSet) -> QuantizedModel, through the recipe's engine."""

from __future__ import annotations

import time

from sm120_quant.errors import CheckFailed
from sm120_quant.quantize.model import QuantizedModel
from sm120_quant.recipes.schema import Engine, Recipe, Scheme


def _modelopt(recipe, quantized, calib, forward_loop):
    from sm120_quant.quantize.modelopt_engine import calibrate

    return calibrate(recipe, quantized, forward_loop)


def _llmcompressor(recipe, quantized, calib, forward_loop):
    from sm120_quant.quantize.llmc_engine import calibrate

    return calibrate(recipe, quantized, calib)


_ENGINES = {Engine.MODELOPT: _modelopt, Engine.LLMCOMPRESSOR: _llmcompressor}


def quantize(recipe: Recipe, model, tokenizer, source, calib, progress: bool = True) -> QuantizedModel:
    from sm120_quant.quantize.progress import calibration_loop

    quantized = QuantizedModel(model=model, tokenizer=tokenizer, source=source, engine=recipe.engine,
                               scheme=recipe.scheme)
    probe = _probe_batch(calib)
    reference = _logits(model, probe)
    if recipe.moe.expand_experts:
        _timed(quantized, "expand_experts", _expand, quantized)
        _require_same_logits(quantized, probe, reference, "expanding the fused experts",
                             "set moe.expand_experts: false")
    with calibration_loop(recipe, quantized, calib, progress=progress) as forward_loop:
        if recipe.scheme is Scheme.NVFP4_AWQ_LITE:
            _timed(quantized, "awq_search", _smooth, recipe, quantized, forward_loop)
            _require_same_logits(quantized, probe, reference, "folding the AWQ-lite scales",
                                 "report this model; use scheme: nvfp4 meanwhile")
        return _ENGINES[recipe.engine](recipe, quantized, calib, forward_loop)


def _timed(quantized: QuantizedModel, name: str, fn, *args) -> None:
    start = time.perf_counter()
    fn(*args)
    quantized.timings[name] = time.perf_counter() - start


def _expand(quantized: QuantizedModel) -> None:
    from sm120_quant.quantize.moe import expand_experts

    quantized.expanded_modules = expand_experts(quantized.model)
    quantized.notes.append(f"expanded {len(quantized.expanded_modules)} fused expert modules into per-expert "
                           "linears")


def _smooth(recipe: Recipe, quantized: QuantizedModel, forward_loop) -> None:
    from sm120_quant.errors import UserError
    from sm120_quant.quantize import awq

    if not recipe.moe.expand_experts:
        raise UserError("scheme nvfp4_awq_lite needs moe.expand_experts: true (AWQ-lite searches per-expert "
                        "linears); set it or use scheme: nvfp4")
    smoothing = awq.smooth(quantized.model, forward_loop, recipe.exclude)
    quantized.smoothing = [r.to_dict() for r in smoothing.groups]
    quantized.notes.append(awq.describe(smoothing))


# On CPU the rewrites are bit-exact. On CUDA, cuBLAS picks kernels (and reduction orders) by shape, so two
# [I]-row matmuls need not round like one [2I]-row matmul, and a rounding difference can flip a near-tied expert
# choice: 1.4e-2 relative logits error was measured at GLM-4.7 dimensions (3 random layers, H200). A real mistake
# (gate and up swapped, a scale not folded) moves the logits by order 1.
CUDA_LOGITS_TOLERANCE = 5e-2


def _require_same_logits(quantized: QuantizedModel, probe: dict, reference, what: str, fix: str) -> None:
    from sm120_quant.verify.reader import relative_error

    logits = _logits(quantized.model, probe)
    diff = float((logits - reference).abs().max())
    if logits.device.type == "cpu":
        if diff != 0.0:
            raise CheckFailed(f"{what} changed the logits (max |diff| {diff:g}) although it must be exact for this "
                              f"architecture; {fix}")
        quantized.notes.append(f"{what}: logits unchanged (bit-identical)")
        return
    rel = relative_error(logits, reference)
    if rel > CUDA_LOGITS_TOLERANCE:
        raise CheckFailed(f"{what} changed the logits (relative error {rel:.2e} > {CUDA_LOGITS_TOLERANCE:g}); {fix}")
    quantized.notes.append(f"{what}: logits relative error {rel:.1e} (CUDA kernel rounding)")


def _probe_batch(calib) -> dict:
    batch = next(iter(calib))
    return {k: v[:1, -64:] for k, v in batch.items()}


def _logits(model, batch: dict):
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
