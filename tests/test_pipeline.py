"""`quantize run` end to end on the tiny models: the files, dtypes, shapes and numbers of a real NVFP4 export."""

import json

import pytest
import torch
from safetensors import safe_open

from sm120_quant.cli.quantize_cmd import main
from sm120_quant.pipeline import run_recipe
from sm120_quant.quantize import formats
from sm120_quant.recipes.load import load_recipe
from sm120_quant.verify.reader import CheckpointReader

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["tiny-glm47-nvfp4", "tiny-glm47-flash-nvfp4"])
def export(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / request.param
    report = run_recipe(load_recipe(request.param), output=out, progress=False)
    return request.param, out, report


def _tensors(folder):
    found = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                found[key] = (f.get_slice(key).get_dtype(), f.get_slice(key).get_shape())
    return found


def test_every_quantized_linear_has_the_nvfp4_tensors(export):
    _, folder, _ = export
    tensors = _tensors(folder)
    linears = sorted(k.removesuffix(".weight_scale_2") for k in tensors if k.endswith(".weight_scale_2"))
    assert len(linears) == {"tiny-glm47-nvfp4": 100, "tiny-glm47-flash-nvfp4": 104}[export[0]]
    for m in linears:
        out, packed_in = tensors[f"{m}.weight"][1]
        assert tensors[f"{m}.weight"][0] == "U8"
        assert tensors[f"{m}.weight_scale"] == ("F8_E4M3", [out, packed_in * 2 // 16])
        assert tensors[f"{m}.weight_scale_2"] == ("F32", [])
        assert tensors[f"{m}.input_scale"] == ("F32", [])
    assert not any(k.endswith("pre_quant_scale") for k in tensors)
    assert tensors["model.layers.1.mlp.gate.weight"][0] == "BF16"
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"][0] == "F32"
    assert tensors["lm_head.weight"][0] == "BF16"
    mtp = [k for k in tensors if k.startswith("model.layers.4.")]
    assert mtp and all(tensors[k][0] in ("BF16", "F32") for k in mtp)


def test_configs_agree_and_exclude_what_stays_bf16(export):
    _, folder, _ = export
    hf = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert hf["quant_algo"] == qc["quant_algo"] == "NVFP4"
    assert hf["group_size"] == 16 and hf["kv_cache_quant_algo"] is None
    assert hf["exclude_modules"] == qc["ignore"]
    assert {"lm_head", "model.layers.1.mlp.gate", "model.layers.4*"} <= set(hf["exclude_modules"])
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(_tensors(folder))
    source = load_recipe("tiny-glm47-nvfp4")  # the tokenizer files are the source's, byte for byte
    from sm120_quant.models.load import resolve_source

    src = resolve_source(source.recipe.model).folder
    assert (folder / "chat_template.jinja").read_bytes() == (src / "chat_template.jinja").read_bytes()
    assert (folder / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_fused_groups_share_global_and_input_scales(export):
    _, folder, _ = export
    reader = CheckpointReader(folder)
    groups = [("gate_proj", "up_proj")]
    groups += [("q_proj", "k_proj", "v_proj")] if "flash" not in export[0] else [("q_a_proj", "kv_a_proj_with_mqa")]
    checked = 0
    for module in reader.linear_modules():
        if reader.layout(module) != "nvfp4":
            continue  # the BF16 MTP layer has gate/up too
        for group in groups:
            if module.endswith("." + group[0]):
                base = module.removesuffix(group[0])
                for suffix in ("weight_scale_2", "input_scale"):
                    values = {float(reader.get(f"{base}{leaf}.{suffix}")) for leaf in group}
                    assert len(values) == 1, (base, suffix, values)
                checked += 1
    assert checked >= 29


def test_dequantized_error_per_layer_type_and_report(export):
    _, folder, report = export
    data = json.loads((folder / "report.json").read_text())
    by_type = data["weight_error"]["by_type"]
    assert {"routed_expert.gate_proj", "shared_expert.down_proj", "dense_mlp.up_proj"} <= set(by_type)
    for layer_type, stats in by_type.items():
        assert 0.09 < stats["mean"] < 0.10, (layer_type, stats)
    assert data["checkpoint"] == str(folder) == report.checkpoint
    assert data["check"]["summary"] == {"errors": 0, "warnings": 0}
    assert data["recipe"]["sha256"] == load_recipe(export[0]).sha256
    assert data["calibration"]["num_samples"] == 24
    assert data["versions"]["nvidia-modelopt"] == "0.47.0"
    assert set(data["timings_s"]) >= {"load", "calibration_data", "quantize", "export", "fixups_and_check"}
    assert data["peak_memory_bytes"]["rss"] > 0
    assert data["tensors"]["count"] == len(_tensors(folder))
    assert (folder / "recipe.yaml").exists() and (folder / "expert_coverage.png").stat().st_size > 1000
    assert not list(folder.parent.glob(f".{folder.name}.partial-*"))


def test_dequantization_matches_a_fresh_quantization_of_the_source(export):
    """The export's bytes are exactly what our reference quantizer makes from the source weight with the export's
    global scale (ModelOpt export and formats.quantize_nvfp4 agree bit for bit)."""
    _, folder, _ = export
    from sm120_quant.models.load import resolve_source

    source = CheckpointReader(resolve_source(load_recipe(export[0]).recipe.model).folder)
    quant = CheckpointReader(folder)
    for module in ("model.layers.0.mlp.down_proj", "model.layers.2.mlp.experts.5.up_proj",
                   "model.layers.3.mlp.shared_experts.gate_proj"):
        ours = formats.quantize_nvfp4(source.get(f"{module}.weight"), quant.get(f"{module}.weight_scale_2"))
        assert torch.equal(ours.packed, quant.get(f"{module}.weight"))
        assert torch.equal(ours.block_scale.view(torch.uint8), quant.get(f"{module}.weight_scale").view(torch.uint8))


def test_existing_output_is_refused_without_overwrite(export, capsys):
    _, folder, _ = export
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        main(["run", export[0], "--output", str(folder)])
    assert exit_info.value.code == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.mark.parametrize("recipe", ["tiny-glm47-nvfp4-awq", "tiny-glm47-flash-nvfp4-awq"])
def test_awq_lite_exports_plain_nvfp4_that_checks_clean(recipe, tmp_path):
    folder = tmp_path / recipe
    run_recipe(load_recipe(recipe), output=folder, progress=False)
    hf = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]
    assert hf["quant_algo"] == "NVFP4"
    tensors = _tensors(folder)
    assert not any(k.endswith("pre_quant_scale") for k in tensors)
    data = json.loads((folder / "report.json").read_text())
    assert data["check"]["summary"] == {"errors": 0, "warnings": 0}
    smoothing = data["quantization"]["smoothing"]
    assert smoothing and any(g["alpha"] > 0 for g in smoothing)
    assert all(g["loss_ratio"] <= 1.0 for g in smoothing)
    assert any("folding the AWQ-lite scales: logits unchanged (bit-identical)" in n for n in data["notes"])
    assert any(n.startswith("AWQ-lite:") and "(1 calibration pass)" in n for n in data["notes"])  # tiny: one chunk
    assert "smoothed BF16 weight" in data["weight_error"]["metric"]
    smoothed = {int(g["group"].split(".")[2]) for g in smoothing if g["group"].endswith("mlp_in") and g["alpha"] > 0}
    _assert_routing_unchanged(folder, load_recipe(recipe).recipe, smoothed)


def _assert_routing_unchanged(folder, recipe, smoothed: set[int]) -> None:
    """Every MoE layer of the export routes every token as the BF16 source does: its BF16 path (the folded
    post_attention_layernorm and the compensated router, read from the export's files) on the source's hidden states
    picks the same top-k experts with the same weights; and the norms of the layers whose mlp_in group was smoothed
    (and only those) differ from the source's."""
    from transformers import AutoTokenizer

    from sm120_quant.models.load import load_model, resolve_source

    source = resolve_source(recipe.model)
    model = load_model(recipe.model, source)
    text = "def f(x):\n    return x * 2  # 你好，世界。 Hello!"
    ids = AutoTokenizer.from_pretrained(source.folder)(text, return_tensors="pt")["input_ids"]
    moe = {i: layer for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")}
    inputs = {}
    for i, layer in moe.items():
        layer.post_attention_layernorm.register_forward_pre_hook(lambda m, args, i=i: inputs.setdefault(i, args[0]))
    with torch.no_grad():
        model(ids)
    reader = CheckpointReader(folder)
    rescaled = set()
    for i, layer in moe.items():
        with torch.no_grad():
            before = layer.mlp.gate(layer.post_attention_layernorm(inputs[i]))
            for name in ("post_attention_layernorm.weight", "mlp.gate.weight", "mlp.gate.e_score_correction_bias"):
                param = layer.get_parameter(name) if name.endswith("weight") else layer.get_buffer(name)
                exported = reader.get(f"model.layers.{i}.{name}")
                if name == "post_attention_layernorm.weight" and not torch.equal(param, exported):
                    rescaled.add(i)
                param.copy_(exported)
            after = layer.mlp.gate(layer.post_attention_layernorm(inputs[i]))
        assert torch.equal(after[2], before[2]), f"layer {i}: top-k experts changed"
        assert torch.equal(after[1], before[1]), f"layer {i}: top-k weights changed"
    assert rescaled == smoothed & set(moe)


def test_fixups_repair_a_broken_export_before_it_is_published(export, tmp_path):
    """A gate/up pair with different global scales (what vLLM mis-loads on SM120) is repaired by the recipe's
    fixups, and the repaired folder checks clean."""
    import shutil

    from safetensors.torch import load_file, save_file

    from sm120_quant.models.load import resolve_source
    from sm120_quant.pipeline import fix_and_check

    name, folder, _ = export
    staged = tmp_path / ".staged"
    shutil.copytree(folder, staged)
    tensors = load_file(staged / "model.safetensors")
    key = "model.layers.1.mlp.experts.3.up_proj.weight_scale_2"
    # 0.7, not a power of two: a halved global scale re-quantizes exactly (block scales halve in E4M3)
    tensors[key] = tensors[key] * 0.7
    save_file(tensors, staged / "model.safetensors", metadata={"format": "pt"})
    recipe = load_recipe(name).recipe
    published, check, fixed = fix_and_check(staged, recipe, resolve_source(recipe.model))
    assert published != staged and not staged.exists()
    assert check.clean
    assert {a.rule.value for a in fixed.actions} == {"fused-scales"}
    assert 0 < fixed.max_added_error < 0.05
    repaired = CheckpointReader(published)
    gate = float(repaired.get("model.layers.1.mlp.experts.3.gate_proj.weight_scale_2"))
    assert float(repaired.get(key)) == gate
