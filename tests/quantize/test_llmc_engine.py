"""The llm-compressor engine and its compressed-tensors export, on the tiny GLM models with the real llm-compressor."""

import json
import math
import re
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn

from sm120_quant.calib_data.coverage import CoverageTable, MoELayer
from sm120_quant.errors import CheckFailed, UserError
from sm120_quant.exporters.llmc_export import LLMC_RECIPE_KEPT, ct_ignore_entry, export_llmcompressor
from sm120_quant.models.load import load_model, resolve_source
from sm120_quant.quantize import formats
from sm120_quant.quantize import llmc_engine as engine
from sm120_quant.quantize.model import QuantizedModel
from sm120_quant.quantize.moe import expand_experts
from sm120_quant.quantize.tensor_parallel import tp_table
from sm120_quant.recipes.calibration import CoverageSpec
from sm120_quant.recipes.load import load_recipe
from sm120_quant.recipes.schema import Engine, KVCache, MoESpec, Scheme
from sm120_quant.verify.reader import CheckpointReader, relative_error

FP8_RECIPE = "tiny-glm47-fp8-block.yaml"
FLASH_FP8_RECIPE = "tiny-glm47-flash-fp8-block.yaml"


def ct_matches(entry: str, name: str) -> bool:
    """How compressed-tensors and vLLM read an ignore entry (exact name, or `re:` with re.match)."""
    return bool(re.match(entry[3:], name)) if entry.startswith("re:") else entry == name


# --- ignore entries -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("glob", "entry"), [
    ("lm_head", "lm_head"),
    ("model.embed_tokens", "model.embed_tokens"),
    ("*mlp.gate", r"re:.*mlp\.gate$"),
    ("model.layers.[0-2].*", r"re:model\.layers\.[0-2]\..*$"),
    ("model.layers.92*", r"re:model\.layers\.92.*$"),
    ("*kv_b_pro?", r"re:.*kv_b_pro.$"),
    ("layers.[!0]", r"re:layers\.[^0]$"),
    ("a[b", r"re:a\[b$"),  # an unclosed bracket is a literal, as in fnmatch
    ("x[b-a]", r"re:x(?!)$"),  # a reversed range matches nothing, as in fnmatch (and is an error in `re`)
    ("x[!b-a]", r"re:x.$"),
    ("x[a-c-]", r"re:x[a-c\-]$"),
])
def test_ct_ignore_entry(glob, entry):
    assert ct_ignore_entry(glob) == entry


def test_router_entry_keeps_expert_gate_proj_quantized():
    entry = ct_ignore_entry("*mlp.gate")
    assert ct_matches(entry, "model.layers.1.mlp.gate")
    assert not ct_matches(entry, "model.layers.1.mlp.experts.0.gate_proj")
    assert not ct_matches(entry, "model.layers.1.mlp.shared_experts.gate_proj")


@given(st.text(alphabet="ab.*?[]!0-", max_size=8), st.text(alphabet="ab.[]!0-^", max_size=8))
def test_ct_ignore_entry_matches_exactly_what_fnmatch_matches(glob, name):
    assert ct_matches(ct_ignore_entry(glob), name) == fnmatchcase(name, glob)


def test_ignore_list_of_the_tiny_recipes():
    assert engine.ignore_list(load_recipe(FP8_RECIPE).recipe) == ["lm_head", "model.embed_tokens", r"re:.*mlp\.gate$"]
    assert engine.ignore_list(load_recipe(FLASH_FP8_RECIPE).recipe)[-1] == r"re:.*kv_b_proj$"


# --- exclusions vLLM can load ---------------------------------------------------------------------------------------

MLA_LAYER = {f"model.layers.1.self_attn.{p}": 256 for p in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                                                             "kv_b_proj", "o_proj")}
EXPERTS = {f"model.layers.1.mlp.experts.{e}.{p}": 256 for e in range(4) for p in engine.EXPERT_PROJS}


def test_q_a_and_kv_a_are_excluded_together_or_not_at_all():
    with pytest.raises(UserError, match=r"kv_a_proj_with_mqa BF16 but quantizes the rest .*fused_qkv_a_proj"):
        engine.check_exclusions(MLA_LAYER, ("*kv_a_proj_with_mqa",))
    both = engine.check_exclusions(MLA_LAYER, ("*kv_a_proj_with_mqa", "*q_a_proj"))
    assert both == {"model.layers.1.self_attn.q_a_proj", "model.layers.1.self_attn.kv_a_proj_with_mqa"}
    assert engine.check_exclusions(MLA_LAYER, ()) == set()


def test_gate_up_and_qkv_and_experts_are_not_split_either():
    gate_up = {"model.layers.0.mlp.gate_proj": 8, "model.layers.0.mlp.up_proj": 8, "model.layers.0.mlp.down_proj": 8}
    with pytest.raises(UserError, match="gate_up_proj"):
        engine.check_exclusions(gate_up, ("*.up_proj",))
    qkv = {f"model.layers.0.self_attn.{p}_proj": 8 for p in "qkv"}
    with pytest.raises(UserError, match="qkv_proj"):
        engine.check_exclusions(qkv, ("*v_proj",))
    with pytest.raises(UserError, match="one FusedMoE"):
        engine.check_exclusions(EXPERTS, ("*.experts.[0-1].*",))
    assert len(engine.check_exclusions(EXPERTS, ("*.experts.*",))) == 12


def test_fp8_block_refuses_inputs_that_no_group_of_128_divides():
    recipe = load_recipe(FP8_RECIPE).recipe
    inputs = dict(MLA_LAYER, **{"model.layers.1.self_attn.kv_b_proj": 64})
    with pytest.raises(UserError, match=r"kv_b_proj \(in_features 64\) and 0 more .* multiple of 128"):
        engine.check_input_groups(recipe, inputs, set())
    engine.check_input_groups(recipe, inputs, {"model.layers.1.self_attn.kv_b_proj"})
    nvfp4 = recipe.model_copy(update={"scheme": Scheme.NVFP4})
    engine.check_input_groups(nvfp4, inputs, set())  # 64 is four NVFP4 groups of 16


def test_kv_cache_fp8_is_refused_before_anything_runs():
    recipe = load_recipe(FP8_RECIPE).recipe.model_copy(update={"kv_cache": KVCache.FP8})
    quantized = QuantizedModel(model=None, tokenizer=None, source=None, engine=Engine.LLMCOMPRESSOR,
                               scheme=recipe.scheme)
    with pytest.raises(UserError, match="--kv-cache-dtype fp8"):
        engine.calibrate(recipe, quantized, None)


# --- the expert count -----------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_quantized(tiny_glm47):
    spec = load_recipe(FP8_RECIPE).recipe.model
    source = resolve_source(spec)
    return QuantizedModel(model=load_model(spec, source), tokenizer=None, source=source,
                          engine=Engine.LLMCOMPRESSOR, scheme=Scheme.FP8_BLOCK)


def test_expert_count_refuses_fused_and_unquantized_experts(tiny_quantized):
    with pytest.raises(CheckFailed, match=r"model.layers.1.mlp.experts: the routed experts are still fused"):
        engine._check_experts(tiny_quantized, set())
    expand_experts(tiny_quantized.model)
    with pytest.raises(CheckFailed, match=r"^72 routed-expert linears were not quantized"):
        engine._check_experts(tiny_quantized, set())
    every_expert = {n for n, m in tiny_quantized.model.named_modules() if engine.EXPERT_LINEAR.match(n)}
    engine._check_experts(tiny_quantized, every_expert)
    assert tiny_quantized.notes[-1].startswith("routed experts: 0 of 72 expert linears quantized (3 MoE layers")


def test_expert_count_follows_config(tiny_quantized):
    expand_experts(tiny_quantized.model)
    tiny_quantized.model.config.first_k_dense_replace = 0
    with pytest.raises(CheckFailed, match="found 3 MoE layers with routed experts, config.json implies 4"):
        engine._check_experts(tiny_quantized, set())


# --- coverage -------------------------------------------------------------------------------------------------------


class FakeExpert(nn.Module):
    def __init__(self, scales):
        super().__init__()
        for proj, value in zip(engine.EXPERT_PROJS, scales, strict=True):
            layer = nn.Linear(4, 4)
            layer.input_global_scale = nn.Parameter(torch.tensor([value]), requires_grad=False)
            setattr(self, proj, layer)


class FakeCounts:
    """What _apply_coverage reads from _RouterCounts: the MoE layers and the routed-token table."""

    def __init__(self, experts: nn.ModuleList, per_expert: tuple[int, ...]):
        block = nn.Module()
        block.experts = experts
        self.layers = [MoELayer(1, "model.layers.1.mlp", block, len(experts), 1)]
        self._table = CoverageTable((1,), (per_expert,), (sum(per_expert),), 1)

    def table(self):
        return self._table


def coverage_recipe(policy):
    recipe = load_recipe(FP8_RECIPE).recipe
    calibration = recipe.calibration.model_copy(update={"coverage": CoverageSpec(policy=policy, min_tokens=4)})
    return recipe.model_copy(update={"scheme": Scheme.NVFP4, "calibration": calibration})


def test_unreached_expert_gets_the_layers_widest_input_range():
    experts = nn.ModuleList([FakeExpert((600.0, 600.0, 4000.0)), FakeExpert((0.0, 0.0, 0.0)),
                             FakeExpert((500.0, 500.0, 4500.0))])
    quantized = QuantizedModel(model=None, tokenizer=None, source=None, engine=Engine.LLMCOMPRESSOR,
                               scheme=Scheme.NVFP4)
    engine._apply_coverage(coverage_recipe("warn"), quantized, FakeCounts(experts, (9, 0, 9)))
    # smallest global scale = largest amax; gate and up share theirs
    assert [float(experts[1].gate_proj.input_global_scale), float(experts[1].up_proj.input_global_scale),
            float(experts[1].down_proj.input_global_scale)] == [500.0, 500.0, 4000.0]
    assert float(experts[0].gate_proj.input_global_scale) == 600.0
    assert quantized.coverage["scale_sources"]["fallback"] == {"count": 1, "experts": ["1.1"]}
    assert quantized.coverage["under"] == [{"layer": 1, "expert": 1, "tokens": 0}]


def test_fail_policy_names_the_expert_and_calibrate_all_needs_no_fallback():
    experts = nn.ModuleList([FakeExpert((600.0, 600.0, 4000.0)), FakeExpert((1.0, 1.0, 1.0))])
    quantized = QuantizedModel(model=None, tokenizer=None, source=None, engine=Engine.LLMCOMPRESSOR,
                               scheme=Scheme.NVFP4)
    with pytest.raises(CheckFailed, match="layer 1 expert 1 \\(2 tokens\\)"):
        engine._apply_coverage(coverage_recipe("fail"), quantized, FakeCounts(experts, (9, 2)))
    engine._apply_coverage(coverage_recipe("calibrate_all"), quantized, FakeCounts(experts, (9, 0)))
    assert float(experts[1].gate_proj.input_global_scale) == 1.0  # every token reached it: no fallback
    assert quantized.coverage["scale_sources"]["all_tokens"]["experts"] == ["1.1"]


# --- MLA kv_b_proj --------------------------------------------------------------------------------------------------


def test_flattening_the_mla_latent_changes_no_logit(tiny_glm47_flash):
    spec = load_recipe(FLASH_FP8_RECIPE).recipe.model
    model = load_model(spec, resolve_source(spec))
    ids = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        handles = engine._flatten_latent_inputs(model)
        # registered later, as llm-compressor's observers are: it sees what they will see
        seen = []
        model.model.layers[0].self_attn.kv_b_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
        after = model(ids).logits
    assert len(handles) == 4  # one kv_b_proj per decoder layer
    assert seen == [torch.Size([2, 24, 64])]  # [batch, seq, kv_lora_rank], not [batch, 1, seq, kv_lora_rank]
    assert torch.equal(before, after)


# --- FP8 block end to end through the engine and the export (llm-compressor's own linearization) --------------------


@pytest.fixture(scope="module")
def fp8_export(tmp_path_factory, request):
    request.getfixturevalue("tiny_glm47")
    recipe = load_recipe(FP8_RECIPE).recipe.model_copy(update={"moe": MoESpec(expand_experts=False)})
    source = resolve_source(recipe.model)
    quantized = QuantizedModel(model=load_model(recipe.model, source), tokenizer=None, source=source,
                               engine=Engine.LLMCOMPRESSOR, scheme=recipe.scheme)
    engine.calibrate(recipe, quantized, None)  # FP8 block never reads the calibration data
    folder = tmp_path_factory.mktemp("fp8") / "ckpt"
    folder.mkdir()
    export_llmcompressor(quantized, folder, "5GB")
    return quantized, folder


def test_fp8_engine_linearizes_and_counts_every_expert(fp8_export):
    quantized, _ = fp8_export
    assert "linearize_experts" in quantized.timings
    assert "routed experts: 72 of 72 expert linears quantized (3 MoE layers x 8 experts x gate/up/down)" in \
        quantized.notes
    assert quantized.coverage["applies"] is False
    # every Linear but lm_head: 4 x (q, k, v, o) + 3 dense + 3 x 3 shared + 72 experts
    assert (quantized.quantizers_enabled, quantized.quantizers_total) == (100, 101)


def test_fp8_quantization_config(fp8_export):
    _, folder = fp8_export
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == ("compressed-tensors", "float-quantized",
                                                                           "compressed")
    (group,) = qc["config_groups"].values()
    weights, acts = group["weights"], group["input_activations"]
    assert (weights["num_bits"], weights["type"], weights["strategy"], weights["block_structure"],
            weights["dynamic"]) == (8, "float", "block", [128, 128], False)
    assert (acts["num_bits"], acts["strategy"], acts["group_size"], acts["dynamic"]) == (8, "group", 128, True)
    assert qc["ignore"] == ["model.layers.1.mlp.gate", "model.layers.2.mlp.gate", "model.layers.3.mlp.gate",
                            "lm_head"]
    assert (folder / LLMC_RECIPE_KEPT).is_file() and not (folder / "recipe.yaml").exists()


def test_fp8_tensors_are_e4m3_with_ceil_div_block_scales(fp8_export, tiny_glm47):
    _, folder = fp8_export
    reader, source = CheckpointReader(folder), CheckpointReader(tiny_glm47)
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    quantized = sorted(k[: -len(".weight_scale")] for k in keys if k.endswith(".weight_scale"))
    assert len(quantized) == 100
    assert sum(1 for m in quantized if ".mlp.experts." in m) == 72
    errors = []
    for module in quantized:
        weight, scale = reader.get(f"{module}.weight"), reader.get(f"{module}.weight_scale")
        out, in_ = weight.shape
        assert weight.dtype == torch.float8_e4m3fn
        assert tuple(scale.shape) == (math.ceil(out / 128), math.ceil(in_ / 128))
        errors.append(relative_error(formats.dequantize_fp8_block(weight, scale.float()),
                                     source.get(f"{module}.weight")))
    assert 0.024 < min(errors) and max(errors) < 0.029
    assert reader.get("lm_head.weight").dtype == torch.bfloat16
    assert reader.get("model.layers.1.mlp.gate.weight").dtype == source.get("model.layers.1.mlp.gate.weight").dtype
    assert not any(k.startswith("model.layers.4.") for k in keys)  # llm-compressor drops the MTP layer


def test_tp_table_agrees_with_the_checkpoint_doctor(fp8_export):
    from sm120_quant.exporters.check import check_checkpoint

    _, folder = fp8_export
    config = json.loads((folder / "config.json").read_text())
    for row in tp_table(config, Scheme.FP8_BLOCK, tp_sizes=(1, 2)):
        report = check_checkpoint(folder, tp=row.tp)
        tp_errors = [f for f in report.findings if f.rule.startswith("tp-") and f.level.name == "ERROR"]
        assert row.ok == (not tp_errors), (row.tp, row.failures, tp_errors)


# --- NVFP4 with coverage on the MLA model (slow: llm-compressor's sequential pipeline) -----------------------------


@pytest.mark.slow
def test_nvfp4_flash_quantizes_kv_b_proj_counts_tokens_and_covers_a_dead_expert(tiny_glm47_flash, tmp_path):
    from transformers import AutoTokenizer

    from sm120_quant.calib_data.build import build_calibration_set

    recipe = load_recipe(FLASH_FP8_RECIPE).recipe
    calibration = recipe.calibration.model_copy(update={
        "max_seq_len": 48, "coverage": CoverageSpec(policy="warn", min_tokens=8)})
    recipe = recipe.model_copy(update={"scheme": Scheme.NVFP4, "exclude": [], "calibration": calibration})
    source = resolve_source(recipe.model)
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    calib = build_calibration_set(recipe.calibration, tokenizer, progress=False)
    model = load_model(recipe.model, source)
    expand_experts(model)
    # This router bias keeps expert 5 of layer 2 out of every top-k: no calibration token reaches it.
    model.model.layers[2].mlp.gate.e_score_correction_bias[5] = -1e4
    quantized = QuantizedModel(model=model, tokenizer=tokenizer, source=source, engine=Engine.LLMCOMPRESSOR,
                               scheme=Scheme.NVFP4)
    engine.calibrate(recipe, quantized, calib)
    export_llmcompressor(quantized, tmp_path, "5GB")

    coverage = quantized.coverage
    tokens = calib.num_tokens
    for layer in ("1", "2", "3"):
        assert coverage["layers"][layer]["tokens"] == tokens  # counted once, not again in the propagation pass
        assert sum(coverage["layers"][layer]["per_expert"]) == 2 * tokens  # top-2
    assert coverage["layers"]["2"]["per_expert"][5] == 0
    assert coverage["scale_sources"]["fallback"]["experts"] == ["2.5"]
    reader = CheckpointReader(tmp_path)

    def scale(e, p):
        return float(reader.get(f"model.layers.2.mlp.experts.{e}.{p}.input_global_scale"))

    covered = [e for e in range(8) if e != 5]
    assert scale(5, "gate_proj") == scale(5, "up_proj") == min(scale(e, "gate_proj") for e in covered)
    assert scale(5, "down_proj") == min(scale(e, "down_proj") for e in covered)
    # kv_b_proj sees the 4-D MLA latent; with the flattening hook it is calibrated like any linear.
    kv_b = reader.linear("model.layers.1.self_attn.kv_b_proj")
    assert kv_b.layout == "ct_nvfp4" and 0 < kv_b.input_scale < math.inf
    source_reader = CheckpointReader(Path(source.folder))
    assert relative_error(kv_b.weight, source_reader.get("model.layers.1.self_attn.kv_b_proj.weight")) < 0.11


# --- `quantize run` on the bundled tiny FP8-block recipes (slow: the whole pipeline) -------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("recipe_name", "model"), [(FP8_RECIPE, "tiny_glm47"), (FLASH_FP8_RECIPE, "tiny_glm47_flash")])
def test_quantize_run_writes_a_clean_fp8_block_checkpoint_with_the_mtp_layer(recipe_name, model, tmp_path, request):
    from sm120_quant.pipeline import run_recipe

    source = request.getfixturevalue(model)
    folder = tmp_path / "ckpt"
    report = run_recipe(load_recipe(recipe_name), output=folder, device="cpu", progress=False)

    assert report.check["summary"] == {"errors": 0, "warnings": 0}
    by_type = report.weight_error["by_type"]
    assert all(0.024 < t["mean"] and t["max"] < 0.029 for t in by_type.values()), by_type
    assert sum(t["count"] for k, t in by_type.items() if k.startswith("routed_expert.")) == 72
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["block_structure"] == [128, 128]
    # The MTP layer (model.layers.4.*) is back, byte for byte BF16, and every module of it is ignored.
    src, out = CheckpointReader(source), CheckpointReader(folder)
    mtp = [k for k in src.keys() if k.startswith("model.layers.4.")]
    assert len(mtp) > 30 and all(torch.equal(src.get(k), out.get(k)) for k in mtp)
    modules = {k.rsplit(".", 1)[0] for k in mtp if k.endswith(".weight")}
    assert all(any(ct_matches(e, m) for e in qc["ignore"]) for m in modules)
    if recipe_name == FLASH_FP8_RECIPE:
        # q_a_proj / kv_a_proj_with_mqa quantized together; kv_a's 80 rows get one partial block row.
        assert out.get("model.layers.1.self_attn.kv_a_proj_with_mqa.weight").dtype == torch.float8_e4m3fn
        assert tuple(out.get("model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale").shape) == (1, 2)
        assert out.get("model.layers.1.self_attn.kv_b_proj.weight").dtype == torch.bfloat16
        assert "model.layers.1.self_attn.kv_b_proj" in qc["ignore"]
