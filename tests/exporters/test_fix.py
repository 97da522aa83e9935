"""`fix_checkpoint`: every repair makes the check clean, keeps the dequantized weights within a stated tolerance and
copies everything it does not touch byte for byte."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from sm120_quant.errors import UserError
from sm120_quant.exporters.check import Rule, check_checkpoint
from sm120_quant.exporters.fix import FIXABLE, fix_checkpoint
from sm120_quant.quantize import formats

EXPERT = "model.layers.1.mlp.experts.2"
# Re-deriving a member's codes against a larger shared global scale moves its dequantized weight by this much at
# most (relative Frobenius norm; measured 0.017-0.04 on the tiny models), and the repaired weight stays this close
# to the BF16 original (a correct export is at 0.095, the NVFP4 round-off of these Gaussian weights).
ADDED_ERROR_TOL = 0.05
VS_BF16_TOL = 0.115


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def dequant_modelopt(tools, folder, module) -> torch.Tensor:
    return formats.dequantize_nvfp4(tools.tensor(folder, f"{module}.weight"),
                                    tools.tensor(folder, f"{module}.weight_scale"),
                                    tools.tensor(folder, f"{module}.weight_scale_2"))


def dequant_ct(tools, folder, module) -> torch.Tensor:
    return formats.dequantize_nvfp4(tools.tensor(folder, f"{module}.weight_packed"),
                                    tools.tensor(folder, f"{module}.weight_scale"),
                                    1.0 / tools.tensor(folder, f"{module}.weight_global_scale"))


def all_tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for shard in folder.glob("*.safetensors"):
        out |= load_file(shard)
    return out


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def test_fused_scales_modelopt(exports, tiny_sources, tools, tmp_path):
    src = tiny_sources["glm47"]
    edits = {}
    # gate/up quantized each on its own amax (the ModelOpt 0.45 bug), up with 1/10 of its weight so the global
    # scales differ ~10x as in vllm#54974; q/k/v of layer 2 each on its own amax.
    for proj, factor in (("gate_proj", 1.0), ("up_proj", 0.1)):
        m = f"{EXPERT}.{proj}"
        edits |= tools.modelopt_module(m, tools.source_weight(src, m).float() * factor)
    for proj in ("q_proj", "k_proj", "v_proj"):
        m = f"model.layers.2.self_attn.{proj}"
        edits |= tools.modelopt_module(m, tools.source_weight(src, m))
    edits["model.layers.2.self_attn.v_proj.input_scale"] = torch.tensor(0.004)
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "bad", tensors=edits)
    assert {f.rule for f in check_checkpoint(bad).findings} == {Rule.FUSED_SCALES}

    result = fix_checkpoint(bad, tmp_path / "fixed")
    assert result.after.findings == ()
    requantized = {a.key for a in result.actions if a.added_error is not None}
    assert requantized == {f"{EXPERT}.up_proj", "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj"}
    assert 0 < result.max_added_error <= ADDED_ERROR_TOL
    for module in requantized | {f"{EXPERT}.gate_proj", "model.layers.2.self_attn.k_proj"}:
        before, after = dequant_modelopt(tools, bad, module), dequant_modelopt(tools, tmp_path / "fixed", module)
        assert rel(after, before) <= ADDED_ERROR_TOL
        original = tools.source_weight(src, module).float() * (0.1 if module.endswith("experts.2.up_proj") else 1)
        assert rel(after, original) <= VS_BF16_TOL
    fixed = tmp_path / "fixed"
    for proj in ("q_proj", "k_proj", "v_proj"):  # the largest of the three input scales
        assert float(tools.tensor(fixed, f"model.layers.2.self_attn.{proj}.input_scale")) == pytest.approx(0.004)
    # Every tensor no repair touched keeps its bytes.
    changed = {f"{m}.{leaf}" for m in requantized for leaf in ("weight", "weight_scale", "weight_scale_2")} | {
        f"model.layers.2.self_attn.{p}.input_scale" for p in ("q_proj", "k_proj")}
    before_all, after_all = all_tensors(bad), all_tensors(fixed)
    assert before_all.keys() == after_all.keys()
    same = {k for k in before_all if torch.equal(raw(before_all[k]), raw(after_all[k]))}
    assert before_all.keys() - same <= changed  # a block scale may round to the same E4M3 value
    assert {f"{m}.weight_scale_2" for m in requantized} <= before_all.keys() - same


def test_fused_scales_compressed_tensors(exports, tools, tmp_path):
    key = "model.layers.3.mlp.shared_experts.up_proj.weight_global_scale"
    module = key.removesuffix(".weight_global_scale")
    bad = tools.edit(exports["ct-nvfp4-glm47"], tmp_path / "bad",
                     tensors={key: tools.tensor(exports["ct-nvfp4-glm47"], key) * 3})
    result = fix_checkpoint(bad, tmp_path / "fixed")
    assert result.after.findings == ()
    # The reciprocal scale 3x larger means a global scale 3x smaller: up is re-quantized to gate's scale.
    assert [a.key for a in result.actions] == [module]
    before, after = dequant_ct(tools, bad, module), dequant_ct(tools, tmp_path / "fixed", module)
    assert rel(after, before) <= ADDED_ERROR_TOL
    assert torch.equal(tools.tensor(tmp_path / "fixed", key),
                       tools.tensor(bad, key.replace("up_proj", "gate_proj")))


def test_nan_block_scales(exports, tools, tmp_path):
    key = f"{EXPERT}.gate_proj.weight_scale"
    scale = tools.tensor(exports["modelopt-glm47"], key).clone()
    scale.view(torch.uint8)[3, 2] = 0xFF
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "bad", tensors={key: scale})
    result = fix_checkpoint(bad, tmp_path / "fixed", only=["block-scales"])
    assert result.after.findings == ()
    fixed = tools.tensor(tmp_path / "fixed", key).view(torch.uint8)
    expected = scale.view(torch.uint8).clone()
    expected[3, 2] = 0x7E  # 448.0
    assert torch.equal(fixed, expected)


@pytest.mark.parametrize("names", ["modelopt", "attn"])
def test_kv_scale_names(exports, tools, tmp_path, names):
    fmt = {"modelopt": "{a}.{kv}_proj.{kv}_scale", "attn": "{a}.attn.{kv}_scale"}[names]
    tensors = {fmt.format(a=f"model.layers.{i}.self_attn", kv=kv): torch.tensor(0.01 * (i + 1))
               for i in range(4) for kv in "kv"}
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "bad", tensors=tensors,
                     config=lambda c: c["quantization_config"].update(
                         kv_cache_scheme={"dynamic": False, "num_bits": 8, "type": "float"}),
                     hf_quant=lambda h: h["quantization"].update(kv_cache_quant_algo="FP8"))
    result = fix_checkpoint(bad, tmp_path / "fixed", runtime="vllm==0.15.1")
    assert result.after.findings == ()
    assert float(tools.tensor(tmp_path / "fixed", "model.layers.3.self_attn.v_scale")) == pytest.approx(0.04)


def test_mla_kv_scales_dropped(exports, tools, tmp_path):
    tensors = {f"model.layers.{i}.self_attn.{kv}_proj.{kv}_scale": torch.tensor(0.02) for i in range(4) for kv in "kv"}
    bad = tools.edit(exports["modelopt-flash"], tmp_path / "bad", tensors=tensors,
                     config=lambda c: c["quantization_config"].update(
                         kv_cache_scheme={"dynamic": False, "num_bits": 8, "type": "float"}),
                     hf_quant=lambda h: h["quantization"].update(kv_cache_quant_algo="FP8"))
    result = fix_checkpoint(bad, tmp_path / "fixed")
    assert result.after.findings == ()
    hf = json.loads((tmp_path / "fixed" / "hf_quant_config.json").read_text())
    assert hf["quantization"]["kv_cache_quant_algo"] is None


def test_undeclared_kv_scales_dropped(exports, tools, tmp_path):
    tensors = {f"model.layers.{i}.self_attn.{kv}_scale": torch.tensor(0.02) for i in range(4) for kv in "kv"}
    bad = tools.edit(exports["ct-fp8-glm47"], tmp_path / "bad", tensors=tensors)
    result = fix_checkpoint(bad, tmp_path / "fixed")
    assert result.after.findings == () and len(result.actions) == 8


def test_bf16_module_excluded(exports, tiny_sources, tools, tmp_path):
    module = "model.layers.0.mlp.down_proj"
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "bad", tensors={
        f"{module}.weight": tools.source_weight(tiny_sources["glm47"], module), f"{module}.weight_scale": None,
        f"{module}.weight_scale_2": None, f"{module}.input_scale": None})
    result = fix_checkpoint(bad, tmp_path / "fixed")
    assert result.after.findings == ()
    fixed = tmp_path / "fixed"
    assert module in json.loads((fixed / "config.json").read_text())["quantization_config"]["ignore"]
    assert module in json.loads((fixed / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    # No tensor changed, so every shard is byte-identical.
    assert all(digest(f) == digest(fixed / f.name) for f in bad.glob("*.safetensors"))


def test_excluded_module_scales_dropped(exports, tiny_sources, tools, tmp_path):
    module = "model.layers.0.self_attn.o_proj"
    exclude = {"config": lambda c: c["quantization_config"]["ignore"].append(module),
               "hf_quant": lambda h: h["quantization"]["exclude_modules"].append(module)}
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "bad",
                     tensors={f"{module}.weight": tools.source_weight(tiny_sources["glm47"], module)}, **exclude)
    result = fix_checkpoint(bad, tmp_path / "fixed")
    assert result.after.findings == ()
    assert sorted(a.key for a in result.actions) == [f"{module}.{x}" for x in ("input_scale", "weight_scale",
                                                                               "weight_scale_2")]


def mtp_tensors(folder) -> dict[str, torch.Tensor]:
    return {k: v for k, v in all_tensors(folder).items() if k.startswith("model.layers.4.")}


def test_mtp_copied_from_source(exports, tiny_sources, tools, tmp_path):
    src = exports["modelopt-glm47"]
    bad = tools.edit(src, tmp_path / "bad", tensors=dict.fromkeys(mtp_tensors(src)),
                     config=lambda c: c["quantization_config"]["ignore"].remove("model.layers.4*"),
                     hf_quant=lambda h: h["quantization"]["exclude_modules"].remove("model.layers.4*"))
    without = fix_checkpoint(bad, tmp_path / "no-source")
    assert [f.rule for f in without.unfixed] == [Rule.MTP_MISSING]
    assert [f.rule for f in without.after.findings] == [Rule.MTP_MISSING]

    result = fix_checkpoint(bad, tmp_path / "fixed", source=tiny_sources["glm47"])
    assert result.after.findings == ()
    copied = mtp_tensors(tmp_path / "fixed")
    expected = mtp_tensors(tiny_sources["glm47"])
    assert copied.keys() == expected.keys() and all(torch.equal(copied[k], expected[k]) for k in expected)
    index = json.loads((tmp_path / "fixed" / "model.safetensors.index.json").read_text())
    assert {index["weight_map"][k] for k in expected} == {"model-mtp.safetensors"}
    assert "model.layers.4*" in json.loads((tmp_path / "fixed" / "hf_quant_config.json").read_text())[
        "quantization"]["exclude_modules"]


def test_mtp_layer_excluded(exports, tools, tmp_path):
    bad = tools.edit(exports["ct-nvfp4-glm47"], tmp_path / "bad",
                     config=lambda c: c["quantization_config"]["ignore"].remove(r"re:model\.layers\.4\..*"))
    result = fix_checkpoint(bad, tmp_path / "fixed")
    assert result.after.findings == ()
    assert [a.action for a in result.actions] == [
        r"added 're:model\.layers\.4\..*' to config.json:quantization_config.ignore"]


def test_router_bias(exports, tiny_sources, tools, tmp_path):
    key = "model.layers.2.mlp.gate.e_score_correction_bias"
    original = tools.tensor(tiny_sources["glm47"], key)
    bad = tools.edit(exports["ct-fp8-glm47"], tmp_path / "bad", tensors={key: original.bfloat16()})
    cast = fix_checkpoint(bad, tmp_path / "cast")
    assert cast.after.findings == ()
    assert torch.equal(tools.tensor(tmp_path / "cast", key), original.bfloat16().float())
    fix_checkpoint(bad, tmp_path / "copied", source=tiny_sources["glm47"])
    assert torch.equal(tools.tensor(tmp_path / "copied", key), original)


def test_only_limits_the_repairs(exports, tiny_sources, tools, tmp_path):
    module = "model.layers.0.mlp.down_proj"
    key = "model.layers.2.mlp.gate.e_score_correction_bias"
    bad = tools.edit(exports["ct-fp8-glm47"], tmp_path / "bad", tensors={
        f"{module}.weight": tools.source_weight(tiny_sources["glm47"], module), f"{module}.weight_scale": None,
        key: tools.tensor(exports["ct-fp8-glm47"], key).bfloat16()})
    result = fix_checkpoint(bad, tmp_path / "fixed", only=["router"])
    assert [f.rule for f in result.after.findings] == [Rule.NOT_EXCLUDED]
    assert [f.rule for f in result.unfixed] == [Rule.NOT_EXCLUDED]


def test_clean_checkpoint_is_copied_byte_for_byte(exports, tmp_path):
    src = exports["modelopt-glm47"]
    result = fix_checkpoint(src, tmp_path / "copy")
    assert result.actions == () and result.after.findings == ()
    files = sorted(p.name for p in src.iterdir())
    assert files == sorted(p.name for p in (tmp_path / "copy").iterdir())
    assert all(digest(src / f) == digest(tmp_path / "copy" / f) for f in files)


def test_refuses_to_overwrite_or_guess(exports, tmp_path):
    src = exports["ct-fp8-glm47"]
    (tmp_path / "exists").mkdir()
    with pytest.raises(UserError, match="already exists"):
        fix_checkpoint(src, tmp_path / "exists")
    with pytest.raises(UserError, match="must not be inside"):
        fix_checkpoint(src, src / "fixed")
    with pytest.raises(UserError, match="not a repairable rule"):
        fix_checkpoint(src, tmp_path / "x", only=["tp-nvfp4"])
    assert not (tmp_path / "x").exists()
    assert set(FIXABLE) < set(Rule)


def test_cli_fix(exports, tools, tmp_path, capsys):
    import typer

    from sm120_quant.cli.check_cmd import fix
    from sm120_quant.cli.common import run_app

    key = f"{EXPERT}.up_proj.input_scale"
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "bad",
                     tensors={key: tools.tensor(exports["modelopt-glm47"], key) * 2})
    app = typer.Typer()
    app.command("fix")(fix)
    app.command("unused")(lambda: None)  # two commands, so typer keeps `fix` as a subcommand
    with pytest.raises(SystemExit) as exc:
        run_app(app, ["fix", str(bad), "--out", str(tmp_path / "fixed"), "--only", "fused-scales,kv-scales"])
    captured = capsys.readouterr()
    assert exc.value.code == 0
    assert f"FIXED fused-scales       {EXPERT}.gate_proj.input_scale" in captured.out
    assert captured.err.strip() == "1 repair(s); the copy checks clean"
