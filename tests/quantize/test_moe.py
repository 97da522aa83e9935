import pytest
import torch

from sm120_quant.models.load import load_model, resolve_source
from sm120_quant.quantize.moe import ExpandedExperts, expand_experts
from sm120_quant.recipes.schema import ModelSpec


@pytest.mark.parametrize("name", ["glm47", "glm47-flash"])
def test_expansion_keeps_logits_bit_identical_and_writes_hub_names(name, tmp_path):
    spec = ModelSpec(id=f"tiny://{name}")
    source = resolve_source(spec)
    model = load_model(spec, source)
    fused_gate_up = model.model.layers[1].mlp.experts.gate_up_proj.detach().clone()
    ids = torch.randint(0, 2000, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    assert expand_experts(model) == [f"model.layers.{i}.mlp.experts" for i in (1, 2, 3)]
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, ExpandedExperts) and len(experts) == 8
    # gate is the first half of gate_up, up the second
    assert torch.equal(experts[3].gate_proj.weight, fused_gate_up[3, :128])
    assert torch.equal(experts[3].up_proj.weight, fused_gate_up[3, 128:])
    names = set(model.state_dict())
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in names
    assert not any("gate_up_proj" in n for n in names)
