"""Fast unit tests: metric formulas, the runtime's fused scales, activation quantization, the reader's NaN handling
and activation schemes, prompt files, failure naming."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from sm120_quant.errors import UserError
from sm120_quant.quantize import formats
from sm120_quant.verify.emulate import compare_weights, quantize_input, runtime_scales
from sm120_quant.verify.metrics import LayerTotals, TokenTotals, same_expert_sets, token_stats
from sm120_quant.verify.prompts import load_prompts
from sm120_quant.verify.reader import Activation, ActivationScheme, CheckpointReader

# --------------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------------


def test_token_stats_match_per_position_formulas():
    gen = torch.Generator().manual_seed(0)
    ls, lq = torch.randn(6, 11, generator=gen), torch.randn(6, 11, generator=gen)
    ids = torch.randint(0, 11, (6,), generator=gen)
    st = token_stats(ls, lq, ids)
    for t in range(6):
        p, q = ls[t].double().softmax(-1), lq[t].double().softmax(-1)
        assert float(st.kl[t]) == pytest.approx(float(sum(p[v] * math.log(p[v] / q[v]) for v in range(11))))
        assert float(st.cosine[t]) == pytest.approx(float(ls[t] @ lq[t] / (ls[t].norm() * lq[t].norm())), rel=1e-6)
        assert bool(st.top1[t]) == (int(ls[t].argmax()) == int(lq[t].argmax()))
    for t in range(5):
        assert float(st.nll_source[t]) == pytest.approx(-math.log(float(ls[t].double().softmax(-1)[ids[t + 1]])))


def test_identical_logits_give_perfect_scores():
    logits = torch.randn(4, 9)
    totals = TokenTotals()
    totals.add(token_stats(logits, logits.clone(), torch.tensor([1, 2, 3, 4])))
    s = totals.summary()
    assert s["cosine"] == pytest.approx(1.0) and s["kl"] == pytest.approx(0.0, abs=1e-12) and s["top1"] == 1.0
    assert s["ppl_source"] == s["ppl_quantized"]


def test_token_totals_pool_positions_over_prompts():
    totals = TokenTotals()
    a = token_stats(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
                    torch.tensor([0, 1]))
    b = token_stats(torch.tensor([[1.0, 0.0]] * 3), torch.tensor([[1.0, 0.0]] * 3), torch.tensor([0, 0, 0]))
    totals.add(a)
    totals.add(b)
    s = totals.summary()
    assert s["top1"] == pytest.approx(4 / 5)  # one disagreement in five positions
    assert s["cosine"] == pytest.approx((1 + 0 + 3) / 5)
    assert s["cosine_min"] == pytest.approx(0.0)


def test_nan_is_sticky_in_extremes():
    totals = TokenTotals()
    totals.add(token_stats(torch.ones(2, 3), torch.tensor([[1.0, float("nan"), 0], [1.0, 2, 3]]),
                           torch.tensor([0, 1])))
    s = totals.summary()
    assert math.isnan(s["kl_max"]) and math.isnan(s["cosine_min"]) and math.isnan(s["kl"])


def test_same_expert_sets_ignores_order():
    a = torch.tensor([[0, 3], [1, 2], [5, 6]])
    b = torch.tensor([[3, 0], [1, 4], [6, 5]])
    assert same_expert_sets(a, b).tolist() == [True, False, True]


def test_layer_error_definitions():
    x = torch.zeros(1, 2, 2)
    y_s = torch.tensor([[[3.0, 0.0], [0.0, 4.0]]])  # the layer adds norm 5
    y_l = y_s + torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    t = LayerTotals()
    t.add(x, y_s, y_l, x, y_s * 2)
    assert t.local_error() == pytest.approx(1 / 5)
    assert t.stream_error() == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------------------------
# Runtime scales and activation quantization
# --------------------------------------------------------------------------------------------------------------------


def _nvfp4_tensors(module: str, w: torch.Tensor, scale_2: float, input_scale: float, ct: bool = False) -> dict:
    q = formats.quantize_nvfp4(w, torch.tensor(scale_2))
    if ct:
        return {f"{module}.weight_packed": q.packed, f"{module}.weight_scale": q.block_scale,
                f"{module}.weight_global_scale": torch.tensor([1 / scale_2]),
                f"{module}.input_global_scale": torch.tensor([1 / input_scale])}
    return {f"{module}.weight": q.packed, f"{module}.weight_scale": q.block_scale,
            f"{module}.weight_scale_2": torch.tensor(scale_2), f"{module}.input_scale": torch.tensor(input_scale)}


@pytest.fixture
def mixed_scales(tmp_path):
    """gate/up pairs and q/k/v with different global and input scales, in both layouts."""
    w = torch.randn(32, 32) * 0.02

    def write(folder, ct):
        tensors = {}
        for parent in ("model.layers.1.mlp.experts.0", "model.layers.1.mlp.shared_experts"):
            tensors |= _nvfp4_tensors(f"{parent}.gate_proj", w, 1e-5, 0.01, ct)
            tensors |= _nvfp4_tensors(f"{parent}.up_proj", w, 4e-5, 0.03, ct)
        for proj, s in (("q_proj", 1e-5), ("k_proj", 3e-5), ("v_proj", 2e-5)):
            tensors |= _nvfp4_tensors(f"model.layers.1.self_attn.{proj}", w, s, s * 1000, ct)
        folder.mkdir()
        save_file(tensors, folder / "model.safetensors")
        (folder / "config.json").write_text("{}")
        return CheckpointReader(folder)

    return write(tmp_path / "modelopt", False), write(tmp_path / "ct", True)


def test_routed_expert_keeps_gate_scale_and_max_input(mixed_scales):
    for reader in mixed_scales:
        up = runtime_scales(reader, "model.layers.1.mlp.experts.0.up_proj")
        gate = runtime_scales(reader, "model.layers.1.mlp.experts.0.gate_proj")
        assert up == pytest.approx((1e-5, 0.03)) and gate == pytest.approx((1e-5, 0.03))


def test_fused_linears_take_max_in_modelopt_and_min_in_compressed_tensors(mixed_scales):
    modelopt, ct = mixed_scales
    assert runtime_scales(modelopt, "model.layers.1.self_attn.k_proj") == pytest.approx((3e-5, 0.03))
    assert runtime_scales(modelopt, "model.layers.1.mlp.shared_experts.gate_proj") == pytest.approx((4e-5, 0.03))
    # compressed-tensors stores 1/scale and the runtime takes the max of those: the smallest scale wins
    assert runtime_scales(ct, "model.layers.1.self_attn.k_proj") == pytest.approx((1e-5, 0.01))
    assert runtime_scales(ct, "model.layers.1.mlp.shared_experts.up_proj") == pytest.approx((1e-5, 0.01))


def test_runtime_global_scale_changes_the_dequantized_weight(mixed_scales):
    reader = mixed_scales[0]
    own = reader.linear("model.layers.1.mlp.experts.0.up_proj")
    shared = reader.linear("model.layers.1.mlp.experts.0.up_proj", global_scale=1e-5)
    assert torch.allclose(shared.weight * 4, own.weight, rtol=1e-6)


def test_nvfp4_activation_is_fake_quant_with_calibrated_amax():
    x = torch.randn(3, 64)
    got = quantize_input(x, ActivationScheme(Activation.NVFP4), 0.002)
    assert torch.equal(got, formats.fake_quant_nvfp4(x, torch.tensor(0.002 * 6 * 448)))


@pytest.mark.parametrize("scale", [0.0, float("nan")])
def test_unusable_nvfp4_input_scale_gives_nan(scale):
    assert torch.isnan(quantize_input(torch.randn(2, 32), ActivationScheme(Activation.NVFP4), scale)).all()


def test_fp8_group_activation_matches_per_token_group_reference():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 200, generator=gen) * torch.linspace(0.1, 10, 200)
    got = quantize_input(x, ActivationScheme(Activation.FP8_GROUP, 128), None)
    expected = torch.empty_like(x)
    for i in range(2):
        for t in range(3):
            for start in (0, 128):
                g = x[i, t, start:start + 128]
                scale = g.abs().max() / 448
                expected[i, t, start:start + 128] = (g / scale).to(torch.float8_e4m3fn).float() * scale
    assert torch.equal(got, expected)


def test_fp8_token_and_tensor_activations():
    x = torch.tensor([[1.0, -3.0, 0.1], [300.0, 0.5, 2.0]])
    token = quantize_input(x, ActivationScheme(Activation.FP8_TOKEN), None)
    assert float(token[1, 0]) == 300.0 and float(token[0, 1]) == -3.0  # each row's amax maps to 448 exactly
    tensor = quantize_input(x, ActivationScheme(Activation.FP8_TENSOR), 0.5)
    assert tensor.tolist()[1] == [224.0, 0.5, 2.0]  # 300 / 0.5 saturates at 448


# --------------------------------------------------------------------------------------------------------------------
# Weight comparison: exact folds are no error, anything else is
# --------------------------------------------------------------------------------------------------------------------


def _layer(tensors: dict) -> torch.nn.Module:
    layer = torch.nn.Module()
    for key, t in tensors.items():
        *path, leaf = key.split(".")
        parent = layer
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.register_buffer(leaf, t)
    return layer


def _gqa_layer(gen):
    """post_attention_layernorm -> router + up/down, and v -> o with 2 KV heads of head_dim 4 feeding 4 q heads."""
    return {
        "input_layernorm.weight": torch.rand(6, generator=gen) + 0.5,
        "self_attn.v_proj.weight": torch.randn(8, 6, generator=gen), "self_attn.v_proj.bias": torch.randn(8, generator=gen),
        "self_attn.o_proj.weight": torch.randn(6, 16, generator=gen),
        "post_attention_layernorm.weight": torch.rand(6, generator=gen) + 0.5,
        "mlp.gate.weight": torch.randn(3, 6, generator=gen),
        "mlp.up_proj.weight": torch.randn(5, 6, generator=gen), "mlp.down_proj.weight": torch.randn(6, 5, generator=gen),
    }


def _errors(src: dict, quant: dict) -> dict:
    side = SimpleNamespace(layouts={}, activations={}, defects={}, rescaled={},
                           skeleton=SimpleNamespace(config=SimpleNamespace(head_dim=4)))
    return {r.module: r.error for r in compare_weights("layer", _layer(src), _layer(quant), side)}


def test_exact_power_of_two_folds_are_no_error():
    gen = torch.Generator().manual_seed(0)
    src = _gqa_layer(gen)
    s_v = 2.0 ** torch.randint(-3, 4, (8,), generator=gen).float()  # one scale per v channel
    s_o = s_v[((torch.arange(16) // 4) // 2) * 4 + torch.arange(16) % 4]  # each q head reads its KV head's channel
    s_up = 2.0 ** torch.randint(-3, 4, (5,), generator=gen).float()
    s_norm = 2.0 ** torch.randint(-3, 4, (6,), generator=gen).float()
    folded = dict(src)
    folded["self_attn.v_proj.weight"] = src["self_attn.v_proj.weight"] / s_v[:, None]
    folded["self_attn.v_proj.bias"] = src["self_attn.v_proj.bias"] / s_v
    folded["self_attn.o_proj.weight"] = src["self_attn.o_proj.weight"] * s_o
    folded["post_attention_layernorm.weight"] = src["post_attention_layernorm.weight"] / s_norm
    folded["mlp.gate.weight"] = src["mlp.gate.weight"] * s_norm
    folded["mlp.up_proj.weight"] = src["mlp.up_proj.weight"] * s_norm / s_up[:, None]
    folded["mlp.down_proj.weight"] = src["mlp.down_proj.weight"] * s_up
    assert max(_errors(src, folded).values()) < 1e-6


def test_a_norm_rescale_missing_a_consumer_blames_that_consumer():
    src = _gqa_layer(torch.Generator().manual_seed(1))
    broken = dict(src)
    broken["post_attention_layernorm.weight"] = src["post_attention_layernorm.weight"] * 2
    broken["mlp.up_proj.weight"] = src["mlp.up_proj.weight"] / 2  # compensated; the router is not
    errors = _errors(src, broken)
    assert errors["layer.mlp.gate"] == pytest.approx(1.0) and errors["layer.mlp.up_proj"] < 1e-6


# --------------------------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------------------------


def test_nan_block_scale_becomes_nan_block_of_16(tmp_path):
    tensors = _nvfp4_tensors("m", torch.randn(4, 64) * 0.1, 1e-4, 1e-3)
    tensors["m.weight_scale"].view(torch.uint8)[2, 1] = 0x7F
    save_file(tensors, tmp_path / "model.safetensors")
    reader = CheckpointReader(tmp_path)
    with pytest.raises(UserError, match="NaN byte"):
        reader.linear("m")
    w = reader.linear("m", keep_nan=True)
    nan = torch.isnan(w.weight)
    assert int(nan.sum()) == 16 and bool(nan[2, 16:32].all())
    assert w.defects == ("1 NaN E4M3 byte(s) in the weight or its block scales",)


def test_zero_input_scale_is_a_defect(tmp_path):
    tensors = _nvfp4_tensors("m", torch.randn(4, 32), 1e-3, 0.0)
    save_file(tensors, tmp_path / "model.safetensors")
    assert CheckpointReader(tmp_path).linear("m").defects == ("input scale is 0; activations quantize to inf/NaN",)


def _ct_config(folder, input_activations):
    folder.mkdir(exist_ok=True)
    save_file({"a.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn), "a.weight_scale": torch.ones(1, 1),
               "b.weight": torch.zeros(4, 4)}, folder / "model.safetensors")
    config = {"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {
        "group_0": {"targets": ["re:^a$"], "input_activations": input_activations}}}}
    (folder / "config.json").write_text(json.dumps(config))
    return CheckpointReader(folder)


@pytest.mark.parametrize("args, expected", [
    ({"dynamic": True, "strategy": "group", "group_size": 128}, ActivationScheme(Activation.FP8_GROUP, 128)),
    ({"dynamic": True, "strategy": "token"}, ActivationScheme(Activation.FP8_TOKEN)),
    (None, ActivationScheme(Activation.NONE)),
])
def test_activation_scheme_from_compressed_tensors_config(tmp_path, args, expected):
    reader = _ct_config(tmp_path / "ckpt", args)
    assert reader.activation("a") == expected
    assert reader.activation("b") == ActivationScheme(Activation.NONE)  # unquantized


def test_static_fp8_activation_without_input_scale_is_refused(tmp_path):
    reader = _ct_config(tmp_path / "ckpt", {"dynamic": False, "strategy": "tensor"})
    with pytest.raises(UserError, match="no input_scale"):
        reader.activation("a")


# --------------------------------------------------------------------------------------------------------------------
# Prompt files
# --------------------------------------------------------------------------------------------------------------------


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\nsecond prompt\n")
    assert load_prompts(txt) == ["first prompt", "second prompt"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"text": "a\\nb"}\n{"text": "c"}\n')
    assert load_prompts(jsonl) == ["a\nb", "c"]
    jsonl.write_text('{"content": "x"}\n')
    with pytest.raises(UserError, match=r"p.jsonl:1: expected an object"):
        load_prompts(jsonl)
    with pytest.raises(UserError, match="not found"):
        load_prompts(tmp_path / "missing.txt")
