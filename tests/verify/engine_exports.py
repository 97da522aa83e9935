"""Exports made by calling the quantization engines directly with their stock configs, for any transformers decoder
(the product pipeline is GLM-only; these also serve the dense SmolLM2 in benchmarks/bench_quality.py):

- ModelOpt NVFP4 (unified HF format): `mtq.quantize(NVFP4_DEFAULT_CFG)` with expanded experts and the pure-torch CPU
  fake-quant, calibrated on the given token batches, then `export_hf_checkpoint`;
- compressed-tensors FP8 block: llm-compressor `oneshot(FP8_BLOCK)` (data-free), then
  `save_pretrained(save_compressed=True)`.
"""

from __future__ import annotations

from pathlib import Path


def load(source: Path):
    from sm120_quant.models.load import load_model, resolve_source
    from sm120_quant.recipes.schema import ModelSpec

    spec = ModelSpec(id=str(source))
    return load_model(spec, resolve_source(spec), device="cpu")


def modelopt_nvfp4(source: Path, out: Path, batches: list, probes: tuple = ()) -> list[tuple]:
    """Export; for each probe (token ids [T]) return (BF16 logits, ModelOpt's fake-quantized W4A4 logits): ModelOpt's
    own emulation of what it exports, computed in the model's BF16."""
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint

    from sm120_quant.quantize.cpu_fakequant import cpu_nvfp4_fakequant
    from sm120_quant.quantize.moe import expand_experts

    model = load(source)
    expand_experts(model)

    def loop(m):
        for ids in batches:
            m(ids)

    def logits() -> list:
        return [model(ids[None]).logits[0].float() for ids in probes]

    with torch.no_grad(), cpu_nvfp4_fakequant():
        before = logits()
        mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, loop)
        after = logits()
        export_hf_checkpoint(model, export_dir=out)
    return list(zip(before, after))


def llmc_fp8_block(source: Path, out: Path) -> None:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    model = load(source)
    # As the bundled FP8-block recipes: the router stays BF16, and vLLM fuses q_a_proj with kv_a_proj_with_mqa
    # (576 outputs, not a multiple of 128), so both stay BF16.
    ignore = ["lm_head", "re:.*mlp\\.gate$", "re:.*q_a_proj$", "re:.*kv_a_proj_with_mqa$"]
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="FP8_BLOCK", ignore=ignore))
    model.save_pretrained(out, save_compressed=True)
