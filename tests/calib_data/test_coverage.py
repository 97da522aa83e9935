"""Expert coverage on the tiny GLM-4.7 (and GLM-4.7-Flash) models: counts, table, heat map, fail and calibrate_all."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from calib_support import PARAGRAPHS, spec_of, write_jsonl
from torch.overrides import TorchFunctionMode

from sm120_quant.calib_data.build import build_calibration_set
from sm120_quant.calib_data.coverage import (
    ExpertCoverage,
    ScaleSource,
    calibrate_all_experts,
    check_coverage,
    moe_layers,
)
from sm120_quant.errors import CheckFailed, UserError
from sm120_quant.models.tiny import build_tiny_model
from sm120_quant.recipes.calibration import CoveragePolicy

TOP_K, EXPERTS = 2, 8


def _load(folder):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the MTP layer's tensors are reported as unexpected, by design
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation="eager").eval()


@pytest.fixture()
def model(glm47_dir):
    return _load(glm47_dir)


def _forward(model, calib) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**batch).logits for batch in calib]


class FusedExpertInputs(TorchFunctionMode):
    """The rows each expert's slice of the fused gate_up_proj multiplies, found from the weight's storage offset:
    exactly the inputs a per-expert input quantizer of that expert would calibrate on."""

    def __init__(self, model):
        super().__init__()
        self.params = {m.layer: m.block.experts.gate_up_proj for m in moe_layers(model)}
        self.rows: Counter = Counter()
        self.amax: dict[tuple[int, int], float] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear:
            x, w = args[0], args[1]
            for layer, p in self.params.items():
                if w.dim() == 2 and w.untyped_storage().data_ptr() == p.untyped_storage().data_ptr() \
                        and w.shape == p.shape[1:]:
                    key = (layer, (w.storage_offset() - p.storage_offset()) // p.stride(0))
                    self.rows[key] += x.shape[0]
                    self.amax[key] = max(self.amax.get(key, 0.0), float(x.abs().max()))
        return func(*args, **(kwargs or {}))


def _calib(tmp_path, tokenizer, text: str, **spec):
    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in PARAGRAPHS])
    return build_calibration_set(spec_of(text, tmp_path), tokenizer, progress=False)


def test_coverage_table_counts_every_real_token(model, tokenizer, tmp_path):
    calib = _calib(tmp_path, tokenizer, "batch_size: 3\npasses: [{name: c, source: jsonl, path: c.jsonl, samples: 6}]")
    assert int(calib.batches[0].attention_mask.sum()) < calib.batches[0].attention_mask.numel()  # padded
    with ExpertCoverage(model) as cov:
        _forward(model, calib)
    table = cov.coverage_table()
    assert table.layers == (1, 2, 3) and table.top_k == TOP_K
    # Every real token is routed to exactly top_k experts in every MoE layer; pad positions are not counted.
    assert table.tokens == (calib.num_tokens,) * 3
    assert [sum(row) for row in table.counts] == [TOP_K * calib.num_tokens] * 3
    assert all(len(row) == EXPERTS for row in table.counts)

    markdown = table.to_markdown(16).splitlines()
    assert markdown[0] == "| layer | tokens | min | median | max | experts < 16 |"
    assert markdown[2].startswith(f"| 1 | {calib.num_tokens} | {min(table.counts[0])} |")
    assert len(markdown) == 2 + 3

    png = cov.save_heatmap(tmp_path / "coverage.png", min_tokens=16)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 300 and height >= 200

    _forward(model, calib)  # hooks are gone after the with-block
    assert cov.coverage_table() == table


def test_fail_stops_naming_the_unreached_expert_and_calibrate_all_gives_it_statistics(model, tokenizer, tmp_path):
    # Three tokens, top-2 of 8: at most six experts per layer can be reached.
    calib = _calib(tmp_path, tokenizer,
                   "passes: [{name: c, source: jsonl, path: c.jsonl, samples: 1, max_tokens: 3}]")
    assert calib.num_tokens == 3
    with ExpertCoverage(model) as cov, FusedExpertInputs(model) as natural:
        natural_logits = _forward(model, calib)
    table = cov.coverage_table()
    unreached = [(layer, e) for layer, e, n in table.under(1)]
    assert len(unreached) >= 3 * (EXPERTS - 3 * TOP_K)
    assert all(natural.rows[key] == 0 for key in unreached)

    with pytest.raises(CheckFailed) as failed:
        check_coverage(table, CoveragePolicy.FAIL, min_tokens=1)
    for layer, e in unreached:
        assert f"layer {layer} expert {e} (0 tokens)" in str(failed.value)
    assert str(failed.value).startswith(f"expert coverage: {len(unreached)} routed experts got fewer than 1 ")

    moe_inputs = {}
    hooks = [m.block.register_forward_pre_hook(
        lambda mod, args, layer=m.layer: moe_inputs.__setitem__(layer, float(args[0].abs().max())))
        for m in moe_layers(model)]
    with ExpertCoverage(model) as again, calibrate_all_experts(model), FusedExpertInputs(model) as forced:
        all_logits = _forward(model, calib)
    for h in hooks:
        h.remove()

    assert torch.equal(all_logits[0], natural_logits[0])  # outputs are still the top-k outputs, bit for bit
    assert again.coverage_table() == table  # the table keeps reporting natural routing
    for layer in table.layers:
        for e in range(EXPERTS):
            # Each expert saw each of the three tokens exactly once, and its largest input is the layer's.
            assert forced.rows[layer, e] == 3
            assert forced.amax[layer, e] == pytest.approx(moe_inputs[layer])

    sources = check_coverage(table, CoveragePolicy.CALIBRATE_ALL, min_tokens=1).sources
    assert {sources[key] for key in unreached} == {ScaleSource.ALL_TOKENS}
    assert all(sources[layer, e] is ScaleSource.ROUTED for layer, e, n in
               [(layer, e, n) for layer, row in zip(table.layers, table.counts) for e, n in enumerate(row) if n])
    warned = check_coverage(table, CoveragePolicy.WARN, min_tokens=2)
    assert {warned.sources[key] for key in unreached} == {ScaleSource.FALLBACK}
    report = warned.to_dict()
    assert report["scale_sources"]["fallback"]["count"] == len(unreached)
    assert report["layers"]["1"]["per_expert"] == list(table.counts[0])


def test_calibrate_all_skips_padding_and_works_on_expanded_experts(model, tokenizer, tmp_path):
    from sm120_quant.quantize.moe import expand_experts

    calib = _calib(tmp_path, tokenizer, "batch_size: 2\npasses: [{name: c, source: jsonl, path: c.jsonl, samples: 2}]")
    natural_logits = _forward(model, calib)
    with FusedExpertInputs(model) as natural:
        _forward(model, calib)
    with calibrate_all_experts(model), FusedExpertInputs(model) as forced:
        _forward(model, calib)
    for layer in (1, 2, 3):
        extra = sum(forced.rows[layer, e] - natural.rows[layer, e] for e in range(EXPERTS))
        assert extra == calib.num_tokens * (EXPERTS - TOP_K)  # real tokens only, each unrouted pair once

    expand_experts(model)
    rows: Counter = Counter()
    hooks = [m.block.experts[e].gate_proj.register_forward_pre_hook(
        lambda mod, args, key=(m.layer, e): rows.update({key: args[0].shape[0]}))
        for m in moe_layers(model) for e in range(EXPERTS)]
    with calibrate_all_experts(model):
        expanded_logits = _forward(model, calib)
    for h in hooks:
        h.remove()
    assert torch.equal(expanded_logits[0], natural_logits[0])
    assert rows == forced.rows


def test_glm47_flash_routers(tokenizer, tmp_path):
    model = _load(build_tiny_model("glm47-flash"))
    calib = _calib(tmp_path, tokenizer, "passes: [{name: c, source: jsonl, path: c.jsonl, samples: 2}]")
    with ExpertCoverage(model) as cov:
        natural = _forward(model, calib)
    table = cov.coverage_table()
    assert table.layers == (1, 2, 3)
    assert [sum(row) for row in table.counts] == [TOP_K * calib.num_tokens] * 3
    with calibrate_all_experts(model):
        forced = _forward(model, calib)
    assert all(torch.equal(a, b) for a, b in zip(natural, forced, strict=True))


def test_glm51_moe_block():
    from transformers import GlmMoeDsaConfig
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaMoE

    config = GlmMoeDsaConfig(hidden_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                             n_group=1, topk_group=1, n_shared_experts=1)
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    block = GlmMoeDsaMoE(config)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    layer = torch.nn.Module()
    layer.mlp = block
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Identity(), layer])
    x = torch.randn(1, 5, 64)
    with ExpertCoverage(model) as cov, torch.no_grad():
        natural = block(x)
    assert cov.coverage_table().layers == (1,) and sum(cov.coverage_table().counts[0]) == TOP_K * 5
    with calibrate_all_experts(model), torch.no_grad():
        assert torch.equal(block(x), natural)


def test_a_model_without_moe_routers_is_rejected():
    with pytest.raises(UserError, match=r"Linear: no Glm4Moe/Glm4MoeLite/GlmMoeDsa MoE router found"):
        ExpertCoverage(torch.nn.Linear(2, 2))
