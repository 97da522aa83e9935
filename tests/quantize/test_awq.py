import pytest
import torch

from sm120_quant.calib_data.build import build_calibration_set
from sm120_quant.models.load import load_model, resolve_source
from sm120_quant.quantize import awq
from sm120_quant.quantize.modelopt_engine import make_forward_loop
from sm120_quant.quantize.moe import expand_experts
from sm120_quant.recipes.load import load_recipe


def _smoothed(name: str, exclude=()):
    loaded = load_recipe(f"tiny-{name}-nvfp4-awq")
    source = resolve_source(loaded.recipe.model)
    from transformers import AutoTokenizer

    calib = build_calibration_set(loaded.recipe.calibration, AutoTokenizer.from_pretrained(source.folder),
                                  progress=False)
    model = load_model(loaded.recipe.model, source)
    expand_experts(model)
    batch = next(iter(calib))
    with torch.no_grad():
        before = model(**batch).logits
        router_before = model.model.layers[2].mlp.gate(model.model.layers[2].post_attention_layernorm(
            model.model.embed_tokens(batch["input_ids"])))
    results = awq.smooth(model, make_forward_loop(list(calib)[:2]), list(exclude))
    with torch.no_grad():
        after = model(**batch).logits
        router_after = model.model.layers[2].mlp.gate(model.model.layers[2].post_attention_layernorm(
            model.model.embed_tokens(batch["input_ids"])))
    return model, results, before, after, router_before, router_after


@pytest.mark.parametrize("name,groups_per_moe_layer", [("glm47", 2 + 1 + 9), ("glm47-flash", 3 + 1 + 9)])
def test_smoothing_folds_exactly_and_keeps_routing(name, groups_per_moe_layer):
    model, results, before, after, router_before, router_after = _smoothed(name)
    assert torch.equal(before, after)  # bit-identical logits: every fold is a power of two
    for b, a in zip(router_before, router_after, strict=True):  # logits, top-k weights, top-k experts
        assert torch.equal(a, b)
    layer2 = [r for r in results if r.name.startswith("model.layers.2.")]
    assert len(layer2) == groups_per_moe_layer
    assert all(r.loss_ratio <= 1.0 for r in results)
    assert any(r.alpha > 0 for r in results)
    for r in results:
        lo, hi = r.exponent_range
        assert -awq.MAX_EXPONENT <= lo <= hi <= awq.MAX_EXPONENT


def test_router_is_compensated_and_norm_rescaled():
    model, results, *_ = _smoothed("glm47")
    from sm120_quant.models.load import load_model as load
    from sm120_quant.recipes.schema import ModelSpec

    spec = ModelSpec(id="tiny://glm47")
    source = load(spec, resolve_source(spec))
    norm_ratio = (source.model.layers[1].post_attention_layernorm.weight.float()
                  / model.model.layers[1].post_attention_layernorm.weight.float())
    router_ratio = (model.model.layers[1].mlp.gate.weight.float() / source.model.layers[1].mlp.gate.weight.float())
    # s divides the norm and multiplies the router's columns by the same powers of two
    assert torch.equal(torch.log2(norm_ratio), torch.log2(norm_ratio).round())
    assert torch.allclose(router_ratio, norm_ratio.expand_as(router_ratio), rtol=0, atol=0, equal_nan=True)


def test_excluded_consumers_are_compensated_not_optimized():
    groups = awq.find_groups(_smoothed("glm47")[0], ["*shared_experts*"])
    mlp_in = next(g for g in groups if g.name == "model.layers.1.mlp_in")
    assert "model.layers.1.mlp.shared_experts.gate_proj" in mlp_in.compensate
    assert "model.layers.1.mlp.shared_experts.gate_proj" not in mlp_in.consumers
    assert not any(g.owner.startswith("model.layers.1.mlp.shared_experts") for g in groups)
