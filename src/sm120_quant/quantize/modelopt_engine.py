"""Calibrate with NVIDIA Model Optimizer (NVFP4 W4A4, max or AWQ-lite)."""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from collections.abc import Callable, Iterable

from sm120_quant.errors import UserError
from sm120_quant.quantize.model import QuantizedModel
from sm120_quant.quiet import library_output
from sm120_quant.recipes.schema import KVCache, Recipe


def modelopt_config(recipe: Recipe) -> dict:
    """The `mtq.quantize` config for the recipe: the stock NVFP4 max-calibration config, the recipe's exclusions, FP8
    KV if asked. AWQ-lite is not ModelOpt's here: our smoothing (quantize/awq.py) has already been folded into the
    BF16 weights, so both schemes calibrate with max and export plain NVFP4."""
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    if recipe.kv_cache is KVCache.FP8:
        cfg["quant_cfg"].extend(copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"]))
    for pattern in recipe.exclude:
        cfg["quant_cfg"].append({"quantizer_name": quantizer_glob(pattern), "enable": False})
    return cfg


def quantizer_glob(module_glob: str) -> str:
    """Module-name glob (`model.layers.0.*`, `*self_attn*`) -> ModelOpt quantizer-name glob for its quantizers."""
    return module_glob if module_glob.endswith("*") else module_glob + ".*"


def calibrate(recipe: Recipe, quantized: QuantizedModel, forward_loop: Callable[[object], None]) -> QuantizedModel:
    import modelopt.torch.quantization as mtq
    import torch

    model = quantized.model
    if next(model.parameters()).device.type == "cpu":
        from sm120_quant.quantize.cpu_fakequant import enable_cpu_nvfp4_fakequant

        enable_cpu_nvfp4_fakequant()
    from sm120_quant.calib_data.coverage import ExpertCoverage, calibrate_all_experts, check_coverage
    from sm120_quant.recipes.calibration import CoveragePolicy

    spec = recipe.calibration.coverage
    all_experts = calibrate_all_experts(model) if spec.policy is CoveragePolicy.CALIBRATE_ALL else nullcontext()
    start = time.perf_counter()
    forget_moe_registrations(model)
    with torch.no_grad(), library_output(), ExpertCoverage(model) as coverage, all_experts:
        mtq.quantize(model, modelopt_config(recipe), forward_loop)
    quantized.timings["calibrate"] = time.perf_counter() - start
    check = check_coverage(coverage.coverage_table(), spec.policy, spec.min_tokens)
    quantized.coverage = check.to_dict()
    quantized.coverage_check = check
    if check.under:
        from sm120_quant.calib_data.coverage import describe_under

        quantized.notes.append(describe_under(check.under, spec.min_tokens))
    if quantized.expanded_modules:
        # ModelOpt's max calibration syncs the input amax of a layer's experts (layer_sync_moe_local_experts_amax),
        # so every expert's input_scale is its layer's widest, whether or not the expert itself saw tokens.
        quantized.notes.append("routed experts of a layer share one input_scale (ModelOpt syncs expert input amax)")
    quantizers = [m for m in model.modules() if type(m).__name__ == "TensorQuantizer"]
    quantized.quantizers_total = len(quantizers)
    quantized.quantizers_enabled = sum(1 for q in quantizers if q.is_enabled)
    missing = [name for name, m in model.named_modules()
               if type(m).__name__ == "TensorQuantizer" and m.is_enabled and getattr(m, "amax", None) is None
               and not name.endswith(("k_bmm_quantizer", "v_bmm_quantizer"))]
    if missing:
        raise UserError(f"calibration left {len(missing)} enabled quantizers without statistics (first: {missing[0]}); "
                        "the calibration data never reached them: add samples or set "
                        "calibration.coverage.policy: calibrate_all")
    if quantized.smoothing:
        quantized.weight_errors = quantizer_weight_errors(model)
    return quantized


def forget_moe_registrations(model) -> None:
    """ModelOpt registers an MoE block class the first time it sees one, process-wide, with the wrapper that fits
    that model: a sequential MoE for a list of expert linears (our expansion), none for fused experts. A second model
    of the same class in the process (fused after expanded, as in tests and benchmarks) would get the first one's
    wrapper; forgetting this model's MoE block classes lets ModelOpt decide again from what it sees now."""
    from modelopt.torch.quantization.nn import QuantModuleRegistry

    for cls in {type(m) for m in model.modules() if hasattr(m, "gate") and hasattr(m, "experts")}:
        if cls in QuantModuleRegistry and QuantModuleRegistry.get_key(cls) == f"hf.{cls.__name__}":
            QuantModuleRegistry.unregister(cls)


def quantizer_weight_errors(model) -> dict[str, tuple[str, float]]:
    """Relative error of each fake-quantized weight vs the weight that was quantized, one module at a time.

    After AWQ smoothing the source checkpoint's weights are no longer what was quantized (they were multiplied by
    the smoothing scales), so comparing the export with the source would measure the smoothing, not the
    quantization."""
    import torch

    from sm120_quant.verify.reader import relative_error

    errors = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            quantizer = getattr(module, "weight_quantizer", None)
            if quantizer is None or not quantizer.is_enabled or getattr(module, "weight", None) is None:
                continue
            errors[name] = ("nvfp4", relative_error(quantizer(module.weight), module.weight))
    return errors


def make_forward_loop(batches: Iterable[dict], progress: Callable[[int], None] | None = None):
    """ModelOpt calls this with the model; it runs every calibration batch through it once."""
    import torch

    def loop(model) -> None:
        device = next(model.parameters()).device
        with torch.no_grad():
            for batch in batches:
                model(**{k: v.to(device) for k, v in batch.items()})
                if progress:
                    progress(1)

    return loop
