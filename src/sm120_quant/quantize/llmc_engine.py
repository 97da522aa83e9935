"""Calibrate with llm-compressor: FP8 block (the community's quality path on SM120), NVFP4 and weight-only NVFP4, all
written as compressed-tensors by `exporters.llmc_export`.

MoE experts. vLLM loads per-expert tensors (`mlp.experts.N.gate_proj.weight`) and llm-compressor quantizes only
nn.Linear, so the fused 3-D experts of transformers 5 must become per-expert Linears: our expansion (`quantize.moe`,
run by the pipeline when `moe.expand_experts` is true), or llm-compressor's `linearize_moe` (run here when the experts
are still fused). Measured: both write byte-identical checkpoints (tiny GLM-4.7, 237 of 237 tensors; GLM-4.7 dimensions
with 32 experts on CPU, 239 of 239) from bit-identical logits, and on a loaded 2-core CPU the whole path costs about
the same either way (expand 4.0 s vs linearize 3.0 s, 81 s vs 71 s in all). They differ on a GPU: `linearize_moe`
allocates every expert Linear on the default (CPU) device, copies the GPU weights into it and lets its offload wrapper
move it back, while ours clones on the model's device; the H200 anchor has `linearize_moe` at 12.3 s of a 12.8 s
oneshot for two GLM-4.7 MoE layers (benchmarks/bench_fp8_block.py times both paths on one GPU). So the bundled recipes
expand with ours, which is also what the ModelOpt engine calibrates. `calibrate_all` works with either:
llm-compressor's experts take `moe_calibrate_all_experts`, ours get `calib_data.coverage.calibrate_all_experts`. Only
NVFP4 reads calibration data at all: FP8 block and weight-only NVFP4 are calibrated from the weights (llm-compressor's
DataFreePipeline). Either way the quantized expert linears are counted against config.json afterwards, because
llm-compressor silently leaves BF16 a fused experts module that nobody linearized.
"""

from __future__ import annotations

import re
import time
from contextlib import nullcontext
from fnmatch import fnmatchcase

from sm120_quant.errors import CheckFailed, UserError
from sm120_quant.exporters.llmc_export import ct_ignore_entry
from sm120_quant.quantize.model import QuantizedModel
from sm120_quant.quiet import library_output
from sm120_quant.recipes.calibration import CoveragePolicy
from sm120_quant.recipes.schema import KVCache, Recipe, Scheme

# compressed-tensors preset per scheme (compressed_tensors.quantization.quant_scheme.PRESET_SCHEMES). W4A16 is the
# weight-only NVFP4 preset, not llm-compressor's int4 "W4A16": our reader, check and verify understand NVFP4 packing.
PRESETS: dict[Scheme, str] = {Scheme.FP8_BLOCK: "FP8_BLOCK", Scheme.NVFP4: "NVFP4", Scheme.W4A16: "NVFP4A16"}

# Static weights with dynamic (FP8 block) or unquantized (NVFP4A16) activations: nothing to calibrate from data.
DATA_FREE = frozenset({Scheme.FP8_BLOCK, Scheme.W4A16})

# Elements per activation (or, weight-only, weight) group along in_features.
ACTIVATION_GROUP: dict[Scheme, int] = {Scheme.FP8_BLOCK: 128, Scheme.NVFP4: 16, Scheme.W4A16: 16}

# Kept BF16 in every llm-compressor export, whatever the recipe says. lm_head: every published FP8/NVFP4 GLM keeps it
# BF16 (quality; vLLM's ParallelLMHead takes it as is). model.embed_tokens: not a Linear, so llm-compressor never
# targets it; listed so the ignore list states the intent. mlp.gate: vLLM's GLM router is a plain fp32 linear with
# e_score_correction_bias, so a quantized gate has nowhere to load. The MTP layer is not in the transformers model at
# all; the export copies it back in BF16 and excludes it.
ALWAYS_EXCLUDED = ("lm_head", "model.embed_tokens", "*mlp.gate")

# vLLM loads these sibling linears as one fused layer and refuses shards with different schemes ("Found different
# quantization schemes for the shards of ..."), so they are excluded together or not at all.
FUSED_GROUPS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "fused_qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
EXPERT_LINEAR = re.compile(r"^(?P<layer>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?:gate|up|down)_proj$")
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


def exclusion_globs(recipe: Recipe) -> tuple[str, ...]:
    return tuple(dict.fromkeys(ALWAYS_EXCLUDED + tuple(recipe.exclude)))


def ignore_list(recipe: Recipe) -> list[str]:
    """The recipe's module globs (plus the always-excluded ones) as llm-compressor / compressed-tensors entries."""
    return [ct_ignore_entry(g) for g in exclusion_globs(recipe)]


def modifier(recipe: Recipe):
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return QuantizationModifier(targets=["Linear"], scheme=PRESETS[recipe.scheme], ignore=ignore_list(recipe))


def linear_inputs(model) -> dict[str, int]:
    """in_features of every Linear llm-compressor will see: the model's nn.Linear modules, plus the per-expert
    Linears that linearizing each still-fused experts module creates."""
    from torch import nn

    from sm120_quant.quantize.moe import is_fused_experts

    inputs = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            inputs[name] = module.in_features
        elif is_fused_experts(module):
            hidden, inter = module.gate_up_proj.shape[2], module.down_proj.shape[2]
            for e in range(module.gate_up_proj.shape[0]):
                inputs.update({f"{name}.{e}.gate_proj": hidden, f"{name}.{e}.up_proj": hidden,
                               f"{name}.{e}.down_proj": inter})
    return inputs


def check_input_groups(recipe: Recipe, inputs: dict[str, int], excluded: set[str]) -> None:
    """Activations are quantized in groups along in_features (FP8 block: dynamic groups of 128; NVFP4: 16), so a
    quantized Linear whose in_features does not split into groups fails in llm-compressor's forward ("unflatten:
    Provided sizes [1, 128] don't multiply up to ... 64") and in vLLM's per_token_group_quant_fp8 assert; llm-compressor
    itself only warns."""
    group = ACTIVATION_GROUP[recipe.scheme]
    bad = sorted(n for n, k in inputs.items() if n not in excluded and k % group)
    if bad:
        raise UserError(f"exclude: {bad[0]} (in_features {inputs[bad[0]]}) and {len(bad) - 1} more quantized linears "
                        f"have in_features that are not a multiple of {group}, the {recipe.scheme.value} activation "
                        "group; add them to exclude (they stay BF16)")


def check_exclusions(names, globs: tuple[str, ...]) -> set[str]:
    """The excluded names; raises UserError when an exclusion splits a layer that vLLM loads fused."""
    excluded = {n for n in names if any(fnmatchcase(n, g) for g in globs)}
    parents: dict[str, dict[str, bool]] = {}
    experts: dict[str, set[bool]] = {}
    for n in names:
        parent, _, leaf = n.rpartition(".")
        parents.setdefault(parent, {})[leaf] = n in excluded
        if m := EXPERT_LINEAR.match(n):
            experts.setdefault(m["layer"], set()).add(n in excluded)
    for parent, leaves in parents.items():
        for fused, members in FUSED_GROUPS.items():
            states = {leaves[m] for m in members if m in leaves}
            if len(states) > 1:
                kept = [m for m in members if leaves.get(m)]
                raise UserError(f"exclude: keeps {', '.join(f'{parent}.{m}' for m in kept)} BF16 but quantizes the "
                                f"rest of {'/'.join(members)}; vLLM loads them as one layer ({fused}) and refuses "
                                "mixed schemes: exclude all of them or none")
    for layer, states in experts.items():
        if len(states) > 1:
            raise UserError(f"exclude: keeps some routed experts of {layer} BF16 and quantizes the others; vLLM runs "
                            "a layer's experts as one FusedMoE with one scheme: exclude all of them or none")
    return excluded


def calibrate(recipe: Recipe, quantized: QuantizedModel, calib) -> QuantizedModel:
    """oneshot with the recipe's preset and exclusions. The model comes back calibrated (llm-compressor's global
    session holds the recipe its save writes, so export in the same process), its expert linears counted against
    config.json and, for NVFP4, its expert coverage measured and the recipe's policy applied."""
    from llmcompressor.modeling.moe.linearize import linearize_moe

    from sm120_quant.calib_data.coverage import calibrate_all_experts
    from sm120_quant.quantize.moe import is_fused_experts

    model = quantized.model
    data_free = recipe.scheme in DATA_FREE
    spec = recipe.calibration.coverage
    calibrate_all = spec.policy is CoveragePolicy.CALIBRATE_ALL and not data_free
    if recipe.kv_cache is not KVCache.NONE:
        raise UserError("kv_cache: fp8 is not implemented for engine llmcompressor; set kv_cache: none and serve with "
                        "--kv-cache-dtype fp8 (vLLM then uses unit KV scales), or use engine modelopt")
    inputs = linear_inputs(model)
    excluded = check_exclusions(inputs, exclusion_globs(recipe))
    check_input_groups(recipe, inputs, excluded)

    fused = [name for name, m in model.named_modules() if is_fused_experts(m)]
    if fused:
        start = time.perf_counter()
        with library_output():
            linearize_moe(model)
        quantized.timings["linearize_experts"] = time.perf_counter() - start
        quantized.notes.append(f"llm-compressor linearized {len(fused)} fused expert modules")
    # Every token through every expert: llm-compressor's own linearized experts do it when asked; ours (ExpandedExperts)
    # get the coverage module's extra expert call instead.
    ours_all = calibrate_all and _has_our_expansion(model)
    counts = None if data_free else _RouterCounts(model)
    latent_hooks = [] if data_free else _flatten_latent_inputs(model)
    start = time.perf_counter()
    try:
        with calibrate_all_experts(model) if ours_all else nullcontext():
            _oneshot(recipe, quantized, calib, calibrate_all and not ours_all)
    finally:
        for handle in latent_hooks:
            handle.remove()
        if counts is not None:
            counts.remove()
    quantized.timings["calibrate"] = time.perf_counter() - start

    _check_experts(quantized, excluded)
    if counts is None:
        quantized.coverage = {"policy": spec.policy.value, "applies": False,
                              "why": f"{recipe.scheme.value} is calibrated from the weights alone (no activation "
                                     "statistics), so no expert needs calibration tokens"}
    else:
        _apply_coverage(recipe, quantized, counts)
    quantized.notes.append(f"llm-compressor {PRESETS[recipe.scheme]}, ignore {ignore_list(recipe)}"
                           + (", kv_b_proj inputs flattened to 3-D for the observers" if latent_hooks else ""))
    return quantized


def _oneshot(recipe: Recipe, quantized: QuantizedModel, calib, calibrate_all: bool) -> None:
    from llmcompressor import oneshot

    data = {}
    if recipe.scheme not in DATA_FREE:
        data = {"dataset": calib.to_hf_dataset(), "num_calibration_samples": calib.num_samples,
                "max_seq_length": recipe.calibration.max_seq_len, "shuffle_calibration_samples": False,
                # One row per batch: llm-compressor's default collator cuts a batch to its shortest row, and
                # padding would route pad tokens through the experts.
                "batch_size": 1}
    with library_output():
        oneshot(model=quantized.model, recipe=modifier(recipe), processor=quantized.tokenizer,
                moe_calibrate_all_experts=calibrate_all, **data)


def _has_our_expansion(model) -> bool:
    from sm120_quant.quantize.moe import ExpandedExperts

    return any(isinstance(m, ExpandedExperts) for m in model.modules())


def expected_moe_layers(config) -> int | None:
    """MoE layers per config.json: GLM-4.7 has `first_k_dense_replace` dense layers first; GLM-4.7-Flash lists each
    layer in `mlp_layer_types`."""
    types = getattr(config, "mlp_layer_types", None)
    if types:
        return sum(1 for t in types if t == "sparse")
    first_dense = getattr(config, "first_k_dense_replace", None)
    return None if first_dense is None else config.num_hidden_layers - first_dense


def _check_experts(quantized: QuantizedModel, excluded: set[str]) -> None:
    """Every routed expert of every MoE layer is a quantized Linear (or excluded), and there are as many as
    config.json says: a fused experts module that nobody linearized is silently left BF16 by llm-compressor."""
    from torch import nn

    from sm120_quant.quantize.moe import is_fused_experts

    model = quantized.model
    n_routed = model.config.n_routed_experts
    layers: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        if name.endswith(".mlp.experts"):
            if is_fused_experts(module):
                raise CheckFailed(f"{name}: the routed experts are still fused 3-D parameters after oneshot; "
                                  "llm-compressor quantizes only nn.Linear, so they would be exported BF16")
            layers[name] = []
        elif (m := EXPERT_LINEAR.match(name)) and isinstance(module, nn.Linear):
            layers.setdefault(m["layer"], []).append((name, module))
    expected_layers = expected_moe_layers(model.config)
    if expected_layers is not None and len(layers) != expected_layers:
        raise CheckFailed(f"found {len(layers)} MoE layers with routed experts, config.json implies {expected_layers}")
    for layer, linears in layers.items():
        if len(linears) != 3 * n_routed:
            raise CheckFailed(f"{layer}: {len(linears)} expert linears, config.json n_routed_experts {n_routed} x "
                              "gate/up/down needs " + str(3 * n_routed))
    missing = [n for linears in layers.values() for n, m in linears
               if n not in excluded and getattr(m, "quantization_scheme", None) is None]
    if missing:
        raise CheckFailed(f"{len(missing)} routed-expert linears were not quantized (first: {missing[0]})")
    total = sum(len(v) for v in layers.values())
    kept = sum(1 for v in layers.values() for n, _ in v if n in excluded)
    quantized.notes.append(f"routed experts: {total - kept} of {total} expert linears quantized ({len(layers)} MoE "
                           f"layers x {n_routed} experts x gate/up/down)")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    quantized.quantizers_total = len(linears)
    quantized.quantizers_enabled = sum(1 for m in linears if getattr(m, "quantization_scheme", None) is not None)


def _flatten_latent_inputs(model) -> list:
    """transformers 5 feeds MLA's kv_b_proj the latent as [batch, 1, seq, kv_lora_rank]; llm-compressor's activation
    observers assume [batch, seq, hidden] and fail ("size of tensor a (128) must match ... (50)"). Dropping the unit
    dim in a pre-hook that runs before llm-compressor's (hooks run in registration order) changes nothing else:
    attention views the output as [batch, seq, heads, dim] either way."""
    handles = []
    for name, module in model.named_modules():
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else None
        if name.endswith(".kv_b_proj") and hasattr(parent, "kv_lora_rank"):
            handles.append(module.register_forward_pre_hook(_drop_unit_head_dim))
    return handles


def _drop_unit_head_dim(module, args):
    x = args[0]
    if x.dim() == 4 and x.shape[1] == 1:
        return (x.squeeze(1), *args[1:])
    return None


def _apply_coverage(recipe: Recipe, quantized: QuantizedModel, counts: _RouterCounts) -> None:
    """The recipe's coverage policy on the routed-token counts (`fail` raises, naming the experts). An expert that
    no token reached keeps an uninitialised input_global_scale (compressed-tensors allocates it with torch.empty and
    llm-compressor only logs "Attempted to calibrate a module ... without statistics"), so it gets the widest range
    its layer's covered experts saw."""
    from sm120_quant.calib_data.coverage import ScaleSource, check_coverage, describe_under

    spec = recipe.calibration.coverage
    check = check_coverage(counts.table(), spec.policy, spec.min_tokens)
    quantized.coverage = check.to_dict()
    fallback = [(layer, e) for (layer, e), source in check.sources.items() if source is ScaleSource.FALLBACK]
    if fallback:
        _fallback_input_scales(quantized.model, counts.layers, fallback)
        quantized.notes.append(f"{len(fallback)} routed experts saw no calibration token; they use the smallest "
                               "input_global_scale (widest range) of their layer's covered experts")
    if check.under:
        quantized.notes.append(describe_under(check.under, spec.min_tokens))


def _fallback_input_scales(model, layers, uncovered: list[tuple[int, int]]) -> None:
    import torch

    by_layer = {m.layer: m for m in layers}
    missing: dict[int, set[int]] = {}
    for layer, e in uncovered:
        missing.setdefault(layer, set()).add(e)
    for layer, experts in missing.items():
        block = by_layer[layer].block.experts
        covered = [block[e] for e in range(by_layer[layer].num_experts) if e not in experts]
        if not covered:
            raise CheckFailed(f"layer {layer}: no routed expert saw a calibration token; add calibration data or set "
                              "calibration.coverage.policy: calibrate_all")
        # gate and up feed one fused w13 GEMM in vLLM and share one input scale, so they share the fallback too.
        fallback = {projs: min(float(getattr(x, p).input_global_scale) for x in covered for p in projs)
                    for projs in (("gate_proj", "up_proj"), ("down_proj",))}
        with torch.no_grad():
            for e in experts:
                for projs, value in fallback.items():
                    for p in projs:
                        getattr(block[e], p).input_global_scale.fill_(value)


class _RouterCounts:
    """Routed tokens per (MoE layer, expert), from each router's top-k, in llm-compressor's calibration pass only.

    The hooks go through llm-compressor's HooksMixin, which switches them off together with its observers (while
    tracing, and in the propagation pass that re-runs each layer on quantized inputs after calibrating it), so each
    calibration token counts once; calib_data.coverage.ExpertCoverage hooks plain forwards and would count both
    passes. Rows are unpadded (batch size 1), so every position is a real token.
    """

    def __init__(self, model):
        from llmcompressor.modifiers.utils.hooks import HooksMixin

        from sm120_quant.calib_data.coverage import RoutedTokens, moe_layers

        self.layers = moe_layers(model)
        self._routed = RoutedTokens(self.layers)
        self._mixin = HooksMixin()
        for m in self.layers:
            self._mixin.register_hook(m.block.gate, self._hook(m), "forward")

    def _hook(self, moe):
        def hook(module, args, output) -> None:
            self._routed.add(moe, output[2].reshape(-1, moe.top_k))

        return hook

    def table(self):
        return self._routed.table()

    def remove(self) -> None:
        self._mixin.remove_hooks()
