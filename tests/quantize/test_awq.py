import pytest
import torch
from transformers import AutoTokenizer

from sm120_quant.calib_data.build import build_calibration_set
from sm120_quant.models.load import load_model, resolve_source
from sm120_quant.quantize import awq
from sm120_quant.quantize.modelopt_engine import make_forward_loop
from sm120_quant.quantize.moe import expand_experts
from sm120_quant.recipes.load import load_recipe


def _router_outputs(model, batch):
    layer = model.model.layers[2]
    return layer.mlp.gate(layer.post_attention_layernorm(model.model.embed_tokens(batch["input_ids"])))


def _smooth(name: str, capture_budget=None):
    loaded = load_recipe(f"tiny-{name}-nvfp4-awq")
    source = resolve_source(loaded.recipe.model)
    calib = build_calibration_set(loaded.recipe.calibration, AutoTokenizer.from_pretrained(source.folder),
                                  progress=False)
    model = load_model(loaded.recipe.model, source)
    expand_experts(model)
    reference = load_model(loaded.recipe.model, source)
    batch = next(iter(calib))
    passes = []

    def loop(m):
        passes.append(len(m.model.layers))
        make_forward_loop(calib)(m)

    smoothing = awq.smooth(model, loop, [], capture_rows=128, capture_budget=capture_budget)
    assert smoothing.passes == len(passes)
    return model, reference, smoothing, batch, passes


@pytest.fixture(scope="module", params=["glm47", "glm47-flash"])
def smoothed(request):
    model, reference, smoothing, batch, _ = _smooth(request.param)
    return request.param, model, reference, smoothing.groups, batch


def test_smoothing_folds_exactly_and_keeps_routing(smoothed):
    name, model, reference, results, batch = smoothed
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)  # every fold is a power of two
        for after, before in zip(_router_outputs(model, batch), _router_outputs(reference, batch), strict=True):
            assert torch.equal(after, before)  # router logits, top-k weights, top-k experts
    attention_groups = {"glm47": {"attn_in", "attn_out"}, "glm47-flash": {"attn_in", "q_b_in", "kv_b_in"}}[name]
    layer2 = {r.name.removeprefix("model.layers.2.") for r in results if r.name.startswith("model.layers.2.")}
    assert attention_groups | {"mlp_in", "mlp.shared_experts.mlp_out"} <= layer2
    assert all(r.loss_ratio <= 1.0 for r in results)  # alpha 0 (no smoothing) is always a candidate
    assert any(r.alpha > 0 for r in results)
    for r in results:
        lo, hi = r.exponent_range
        assert -awq.MAX_EXPONENT <= lo <= hi <= awq.MAX_EXPONENT


def test_router_is_compensated_by_the_norms_scale(smoothed):
    _, model, reference, results, _ = smoothed
    smoothed_layers = [int(r.name.split(".")[2]) for r in results if r.name.endswith("mlp_in") and r.alpha > 0
                       and hasattr(model.model.layers[int(r.name.split(".")[2])].mlp, "gate")]
    assert smoothed_layers, "no MoE layer's mlp_in was smoothed"
    i = smoothed_layers[0]
    norm_ratio = (reference.model.layers[i].post_attention_layernorm.weight.float()
                  / model.model.layers[i].post_attention_layernorm.weight.float())
    router_ratio = model.model.layers[i].mlp.gate.weight.float() / reference.model.layers[i].mlp.gate.weight.float()
    assert not torch.equal(norm_ratio, torch.ones_like(norm_ratio))
    assert torch.equal(torch.log2(norm_ratio), torch.log2(norm_ratio).round())
    assert torch.equal(router_ratio, norm_ratio.expand_as(router_ratio))


def test_excluded_consumers_are_compensated_not_optimized(smoothed):
    _, model, *_ = smoothed
    groups = awq.find_groups(model, ["*shared_experts*"])
    mlp_in = next(g for g in groups if g.name == "model.layers.1.mlp_in")
    assert "model.layers.1.mlp.shared_experts.gate_proj" in mlp_in.compensate
    assert "model.layers.1.mlp.shared_experts.gate_proj" not in mlp_in.consumers
    assert not any(g.owner.startswith("model.layers.1.mlp.shared_experts") for g in groups)


def test_search_in_one_layer_passes_finds_what_one_pass_finds(smoothed):
    name, model, _, results, _ = smoothed
    chunked, _, smoothing, _, passes = _smooth(name, capture_budget=0)
    # Each pass runs only the layers up to the one it captures: the layers after it are not needed.
    assert passes == list(range(1, len(model.model.layers) + 1))
    assert smoothing.groups == results
    after, before = chunked.state_dict(), model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in after)
    assert len(chunked.model.layers) == len(model.model.layers)  # the full model is back after the passes
