"""Each rule of the checkpoint doctor, triggered on a correct tiny export with exactly one thing broken."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sm120_quant.errors import UserError
from sm120_quant.exporters.check import Level, Rule, Status, check_checkpoint, issue_status, parse_runtime

EXPERT = "model.layers.1.mlp.experts.2"
ATTN = "model.layers.1.self_attn"


def found(report, rule: Rule) -> list:
    return [f for f in report.findings if f.rule is rule]


def one(report, rule: Rule):
    hits = found(report, rule)
    assert len(hits) == 1, [(f.rule, f.key, f.message) for f in report.findings]
    return hits[0]


def set_exclude(cfg_key: str, add=(), remove=()):
    """An editor for config.json (quantization_config.ignore) or hf_quant_config.json (exclude_modules)."""
    def edit(data: dict) -> None:
        lst = data["quantization_config"]["ignore"] if cfg_key == "config" else data["quantization"]["exclude_modules"]
        lst[:] = [p for p in lst if p not in remove] + list(add)
    return edit


def exclude_both(add=(), remove=()):
    return {"config": set_exclude("config", add, remove), "hf_quant": set_exclude("hf", add, remove)}


# ----------------------------------------------------------------------------------------------------------------
# Correct exports


@pytest.mark.parametrize("name", ["modelopt-glm47", "modelopt-flash", "ct-nvfp4-glm47", "ct-fp8-glm47", "ct-fp8-flash"])
def test_correct_export_is_clean(exports, name):
    report = check_checkpoint(exports[name], runtime="vllm==0.15.1", tp=1, deep=True)
    assert report.findings == ()
    assert report.tensors > 250


def test_report_counts_files_and_layout(exports):
    report = check_checkpoint(exports["modelopt-glm47"])
    assert (report.layout, report.files, report.tensors) == ("modelopt-nvfp4", 2, 483)
    assert check_checkpoint(exports["ct-fp8-glm47"]).layout == "compressed-tensors-fp8-block"


# ----------------------------------------------------------------------------------------------------------------
# dtypes and shapes


def test_block_scale_dtype(exports, tmp_path, tools):
    key = f"{EXPERT}.down_proj.weight_scale"
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "c",
                          tensors={key: tools.tensor(exports["modelopt-glm47"], key).float()})
    f = one(check_checkpoint(bad), Rule.DTYPE_SHAPE)
    assert (f.level, f.key) == (Level.ERROR, key)
    assert "dtype F32, expected F8_E4M3" in f.message


def test_global_scale_must_be_scalar(exports, tmp_path, tools):
    key = f"{ATTN}.o_proj.weight_scale_2"
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "c", tensors={key: torch.ones(2)})
    f = one(check_checkpoint(bad), Rule.DTYPE_SHAPE)
    assert f.key == key and "expected a scalar" in f.message


def test_packed_weight_shape_against_config(exports, tmp_path, tools):
    key = f"{ATTN}.o_proj.weight_packed"
    w = tools.tensor(exports["ct-nvfp4-glm47"], key)
    bad = tools.edit(exports["ct-nvfp4-glm47"], tmp_path / "c", tensors={key: w[:, :120].contiguous()})
    f = one(check_checkpoint(bad), Rule.DTYPE_SHAPE)
    assert f.key == key
    assert "shape [256, 120], expected [256, 128] for (out, in) = (256, 256)" in f.message


def test_fp8_block_scale_shape(exports, tmp_path, tools):
    key = "model.layers.0.mlp.gate_proj.weight_scale"
    bad = tools.edit(exports["ct-fp8-glm47"], tmp_path / "c", tensors={key: torch.ones(4, 1)})
    f = one(check_checkpoint(bad), Rule.DTYPE_SHAPE)
    assert f.key == key and "expected [4, 2]" in f.message


def test_in_features_multiple_of_16(exports, tmp_path, tools):
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "c",
                          config=lambda c: c.update(moe_intermediate_size=120))
    hits = [f for f in found(check_checkpoint(bad), Rule.DTYPE_SHAPE) if "multiple of 16" in f.message]
    assert len(hits) == 27  # every down_proj reading moe_intermediate_size: 3 layers x (8 experts + 1 shared)
    assert hits[0].message == "in_features 120 is not a multiple of 16"


# ----------------------------------------------------------------------------------------------------------------
# Fused groups


def test_expert_gate_up_weight_scales_differ(exports, tiny_sources, tmp_path, tools):
    # What ModelOpt 0.45 shipped: gate and up quantized each with its own amax instead of the pair's shared one.
    edits = {}
    for proj in ("gate_proj", "up_proj"):
        module = f"{EXPERT}.{proj}"
        edits |= tools.modelopt_module(module, tools.source_weight(tiny_sources["glm47"], module))
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "c", tensors=edits)
    f = one(check_checkpoint(bad), Rule.FUSED_SCALES)
    assert (f.level, f.key) == (Level.ERROR, f"{EXPERT}.gate_up_proj.weight_scale_2")
    assert "keeps only the gate's weight_scale_2" in f.runtime_effect


def test_qkv_input_scales_differ(exports, tmp_path, tools):
    key = f"{ATTN}.k_proj.input_scale"
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "c",
                          tensors={key: tools.tensor(exports["modelopt-glm47"], key) * 2})
    f = one(check_checkpoint(bad), Rule.FUSED_SCALES)
    assert f.key == f"{ATTN}.qkv_proj.input_scale"
    assert "(ratio 2)" in f.message and "uses the max" in f.runtime_effect


def test_mla_q_a_kv_a_scales_differ(exports, tmp_path, tools):
    key = f"{ATTN}.kv_a_proj_with_mqa.weight_scale_2"
    bad = tools.edit(exports["modelopt-flash"], tmp_path / "c",
                          tensors={key: tools.tensor(exports["modelopt-flash"], key) * 1.5})
    assert one(check_checkpoint(bad), Rule.FUSED_SCALES).key == f"{ATTN}.fused_qkv_a_proj.weight_scale_2"


def test_compressed_tensors_shared_expert_global_scales_differ(exports, tmp_path, tools):
    key = "model.layers.3.mlp.shared_experts.gate_proj.weight_global_scale"
    bad = tools.edit(exports["ct-nvfp4-glm47"], tmp_path / "c",
                          tensors={key: tools.tensor(exports["ct-nvfp4-glm47"], key) / 4})
    f = one(check_checkpoint(bad), Rule.FUSED_SCALES)
    assert f.key == "model.layers.3.mlp.shared_experts.gate_up_proj.weight_global_scale"


def test_fused_group_half_excluded(exports, tiny_sources, tmp_path, tools):
    module = "model.layers.1.self_attn.q_a_proj"
    src = exports["modelopt-flash"]
    bad = tools.edit(src, tmp_path / "c", tensors={
        f"{module}.weight": tools.source_weight(tiny_sources["glm47-flash"], module),
        f"{module}.weight_scale": None, f"{module}.weight_scale_2": None, f"{module}.input_scale": None,
    }, **exclude_both(add=[module]))
    f = one(check_checkpoint(bad), Rule.FUSED_PARTIAL)
    assert f.key == "model.layers.1.self_attn.fused_qkv_a_proj"
    assert "q_a_proj BF16 (excluded), kv_a_proj_with_mqa quantized" in f.message


def test_one_bf16_expert_in_a_quantized_moe(exports, tiny_sources, tmp_path, tools):
    edits = {}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        module = f"{EXPERT}.{proj}"
        edits |= {f"{module}.weight": tools.source_weight(tiny_sources["glm47"], module),
                  f"{module}.weight_scale": None, f"{module}.weight_scale_2": None, f"{module}.input_scale": None}
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "c", tensors=edits,
                          **exclude_both(add=[f"{EXPERT}.{p}" for p in ("gate_proj", "up_proj", "down_proj")]))
    f = one(check_checkpoint(bad), Rule.FUSED_PARTIAL)
    assert (f.key, f.message) == ("model.layers.1.mlp.experts", "21 expert projections quantized, 3 BF16")


# ----------------------------------------------------------------------------------------------------------------
# Scales present / exclusions


def test_missing_input_scale_on_expert(exports, tmp_path, tools):
    key = f"{EXPERT}.down_proj.input_scale"
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "c", tensors={key: None})
    f = one(check_checkpoint(bad), Rule.MISSING_SCALE)
    assert f.key == key and "vllm#54427" in f.runtime_effect


def test_missing_input_global_scale_compressed_tensors(exports, tmp_path, tools):
    key = f"{ATTN}.o_proj.input_global_scale"
    bad = tools.edit(exports["ct-nvfp4-glm47"], tmp_path / "c", tensors={key: None})
    assert one(check_checkpoint(bad), Rule.MISSING_SCALE).key == key


def test_excluded_module_still_quantized(exports, tmp_path, tools):
    module = "model.layers.0.self_attn.o_proj"
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "c", **exclude_both(add=[module]))
    f = one(check_checkpoint(bad), Rule.EXCLUDED_QUANTIZED)
    assert f.key == f"{module}.weight" and "U8 [256, 128]" in f.message


def test_excluded_bf16_module_keeps_scales(exports, tiny_sources, tmp_path, tools):
    module = "model.layers.0.self_attn.o_proj"
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "c",
                          tensors={f"{module}.weight": tools.source_weight(tiny_sources["glm47"], module)},
                          **exclude_both(add=[module]))
    f = one(check_checkpoint(bad), Rule.EXCLUDED_SCALES)
    assert f.key == module and "input_scale, weight_scale, weight_scale_2" in f.message


def test_bf16_module_not_excluded(exports, tiny_sources, tmp_path, tools):
    module = "model.layers.0.mlp.down_proj"
    bad = tools.edit(exports["ct-fp8-glm47"], tmp_path / "c", tensors={
        f"{module}.weight": tools.source_weight(tiny_sources["glm47"], module), f"{module}.weight_scale": None})
    f = one(check_checkpoint(bad), Rule.NOT_EXCLUDED)
    assert f.key == module and "weight F8_E4M3 [256, 512]" in f.runtime_effect


def test_pre_quant_scale(exports, tmp_path, tools):
    key = f"{ATTN}.o_proj.pre_quant_scale"
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "c",
                          tensors={key: torch.ones(256, dtype=torch.bfloat16)})
    assert one(check_checkpoint(bad), Rule.PRE_QUANT_SCALE).key == key


# ----------------------------------------------------------------------------------------------------------------
# --deep


def test_nan_block_scales_only_with_deep(exports, tmp_path, tools):
    key = f"{EXPERT}.gate_proj.weight_scale"
    scale = tools.tensor(exports["modelopt-glm47"], key).clone()
    raw = scale.view(torch.uint8)
    raw[0, 0], raw[5, 3], raw[7, 1] = 0x7F, 0xFF, 0x7F
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "c", tensors={key: scale})
    assert check_checkpoint(bad).findings == ()
    f = one(check_checkpoint(bad, deep=True), Rule.BLOCK_SCALES)
    assert f.key == key and f.message.startswith("3 block scale byte(s) are NaN")


def test_zero_fp8_block_scale(exports, tmp_path, tools):
    key = "model.layers.0.mlp.up_proj.weight_scale"
    scale = tools.tensor(exports["ct-fp8-glm47"], key).clone()
    scale[1, 0] = 0
    bad = tools.edit(exports["ct-fp8-glm47"], tmp_path / "c", tensors={key: scale})
    assert one(check_checkpoint(bad, deep=True), Rule.BLOCK_SCALES).message.startswith("1 block scale(s) are zero")


@pytest.mark.parametrize("value", [0.0, float("inf"), float("nan")], ids=["zero", "inf", "nan"])
def test_bad_scalar_scale(exports, tmp_path, value, tools):
    key = f"{ATTN}.o_proj.weight_scale_2"
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "c", tensors={key: torch.tensor(value)})
    assert check_checkpoint(bad).findings == ()
    f = one(check_checkpoint(bad, deep=True), Rule.SCALAR_SCALES)
    assert f.key == key and f.message == f"scale is {value}"


def test_all_zero_weight(exports, tmp_path, tools):
    key = f"{ATTN}.o_proj.weight"
    # Codes 0 and 8 are +0 and -0: a weight of only those is all zeros.
    zeros = torch.full((256, 128), 0x80, dtype=torch.uint8)
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "c", tensors={key: zeros})
    assert one(check_checkpoint(bad, deep=True), Rule.ZERO_WEIGHT).key == key


# ----------------------------------------------------------------------------------------------------------------
# KV cache scales


def with_kv_scales(tools, src, dst, names: str = "modelopt", declare: bool = True):
    """Add FP8 KV-cache scales to the GLM-4.7 export (layers 0-3), named the ModelOpt way or another way."""
    fmt = {"modelopt": "{a}.{kv}_proj.{kv}_scale", "attn": "{a}.attn.{kv}_scale", "plain": "{a}.{kv}_scale"}[names]
    tensors = {fmt.format(a=f"model.layers.{i}.self_attn", kv=kv): torch.tensor(0.01 * (i + 1))
               for i in range(4) for kv in "kv"}

    def config(c):
        if declare:
            c["quantization_config"]["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}

    def hf(h):
        if declare:
            h["quantization"]["kv_cache_quant_algo"] = "FP8"

    return tools.edit(src, dst, tensors=tensors, config=config, hf_quant=hf)


@pytest.mark.parametrize(("runtime", "level"), [
    ("vllm==0.15.1", Level.ERROR),  # the KeyError of seed 000
    ("vllm==0.20.0", Level.ERROR),  # released before vllm#41755 opened
    ("vllm==0.25.0", Level.WARN),  # after the fix could have landed, no release confirmed
    ("sglang==0.5.8.post1", Level.ERROR),
    ("sglang==0.5.9", Level.WARN),
    (None, Level.WARN),
])
def test_modelopt_kv_scale_names_by_runtime(exports, tmp_path, runtime, level, tools):
    bad = with_kv_scales(tools, exports["modelopt-glm47"], tmp_path / "c")
    f = one(check_checkpoint(bad, runtime=runtime), Rule.KV_SCALE_NAMES)
    assert (f.level, f.key) == (level, "model.layers.0.self_attn.k_proj.k_scale")
    assert "KeyError: 'layers.N.self_attn.qkv_proj.k_scale'" in f.runtime_effect


def test_kv_scales_named_attn_attn(exports, tmp_path, tools):
    bad = with_kv_scales(tools, exports["modelopt-glm47"], tmp_path / "c", names="attn")
    f = one(check_checkpoint(bad, runtime="vllm==0.25.0"), Rule.KV_SCALE_NAMES)
    assert f.level is Level.WARN and "attn.attn.k_scale" in f.runtime_effect


def test_kv_scales_with_plain_names_are_clean(exports, tmp_path, tools):
    ok = with_kv_scales(tools, exports["modelopt-glm47"], tmp_path / "c", names="plain")
    assert check_checkpoint(ok, runtime="vllm==0.15.1", deep=True).findings == ()


def test_kv_declared_but_no_scales(exports, tmp_path, tools):
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "c",
                          config=lambda c: c["quantization_config"].update(
                              kv_cache_scheme={"dynamic": False, "num_bits": 8, "type": "float"}),
                          hf_quant=lambda h: h["quantization"].update(kv_cache_quant_algo="FP8"))
    f = one(check_checkpoint(bad), Rule.KV_SCALES)
    assert f.level is Level.WARN and "scaling factor 1.0" in f.runtime_effect


def test_kv_scales_but_not_declared(exports, tmp_path, tools):
    bad = with_kv_scales(tools, exports["modelopt-glm47"], tmp_path / "c", names="plain", declare=False)
    f = one(check_checkpoint(bad), Rule.KV_SCALES)
    assert f.message == "8 k/v scale tensors but the config declares no KV cache quantization"


def test_kv_config_files_disagree(exports, tmp_path, tools):
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "c",
                          hf_quant=lambda h: h["quantization"].update(kv_cache_quant_algo="FP8"))
    report = check_checkpoint(bad)
    assert one(report, Rule.CONFIG).key == "config.json:quantization_config.kv_cache_scheme"


def test_mla_kv_scales(exports, tmp_path, tools):
    tensors = {f"model.layers.{i}.self_attn.{kv}_proj.{kv}_scale": torch.tensor(0.02) for i in range(4) for kv in "kv"}
    bad = tools.edit(exports["modelopt-flash"], tmp_path / "c", tensors=tensors,
                          config=lambda c: c["quantization_config"].update(
                              kv_cache_scheme={"dynamic": False, "num_bits": 8, "type": "float"}),
                          hf_quant=lambda h: h["quantization"].update(kv_cache_quant_algo="FP8"))
    report = check_checkpoint(bad, runtime="vllm==0.15.1")
    assert [f.rule for f in report.findings] == [Rule.KV_SCALES_MLA]


# ----------------------------------------------------------------------------------------------------------------
# Tensor parallelism


def test_nvfp4_moe_tp(exports):
    # Tiny moe_intermediate_size 128: 2*128/TP is 256, 128, 64 -> TP4 is the tiny GLM's "TP16".
    assert check_checkpoint(exports["modelopt-glm47"], tp=2).findings == ()
    f = one(check_checkpoint(exports["modelopt-glm47"], tp=4), Rule.TP_NVFP4)
    assert f.key == "model.layers.1.mlp.experts.0.down_proj (and 23 more like it)"
    assert "2 x 128 / 4 = 64" in f.message and "NotImplementedError" in f.runtime_effect


def test_heads_tp(exports):
    assert check_checkpoint(exports["modelopt-glm47"], tp=2).findings == ()
    report = check_checkpoint(exports["modelopt-glm47"], tp=3)
    assert {f.key for f in found(report, Rule.TP_HEADS)} == {"config.json:num_attention_heads",
                                                           "config.json:num_key_value_heads"}


def test_fp8_block_moe_tp(exports):
    # Tiny I=128 at TP2 is 64 per shard: GLM-4.7's I=1536 at TP8 (192) in small.
    report = check_checkpoint(exports["ct-fp8-glm47"], tp=2)
    keys = {f.key for f in found(report, Rule.TP_FP8_BLOCK)}
    assert "model.layers.1.mlp.experts.0.gate_proj (and 23 more like it)" in keys
    assert all(f.level is Level.ERROR for f in found(report, Rule.TP_FP8_BLOCK))


def test_fp8_block_kv_b_proj_tp4(exports):
    # GLM-4.7-Flash kv_b_proj at TP4 in small: 4 heads x (32+32) = 256 outputs, 64 per shard.
    report = check_checkpoint(exports["ct-fp8-flash"], tp=4)
    kv_b = [f for f in found(report, Rule.TP_FP8_BLOCK) if ".kv_b_proj" in f.key]
    assert len(kv_b) == 1 and "64 not divisible by 128" in kv_b[0].message
    assert "output_partition_size = 64" in kv_b[0].runtime_effect


def test_sglang_scale_dim_assert(exports):
    f = [x for x in found(check_checkpoint(exports["modelopt-glm47"], runtime="sglang==0.5.4"),
                          Rule.TP_SGLANG_SCALE_DIM) if x.key.startswith("model.layers.1.mlp.experts")]
    assert len(f) == 1 and f[0].level is Level.ERROR
    assert f[0].message == "w2_weight_scale.dim(2) = 8 at TP1 is not a multiple of 16"
    assert found(check_checkpoint(exports["modelopt-glm47"], runtime="vllm==0.15.1"), Rule.TP_SGLANG_SCALE_DIM) == []


# ----------------------------------------------------------------------------------------------------------------
# MTP, router, shared experts


def mtp_names(folder):
    from safetensors import safe_open
    names = []
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            names += [k for k in f.keys() if k.startswith("model.layers.4.")]  # noqa: SIM118 (safe_open)
    return names


def test_mtp_missing(exports, tmp_path, tools):
    src = exports["modelopt-glm47"]
    bad = tools.edit(src, tmp_path / "c", tensors=dict.fromkeys(mtp_names(src)))
    f = one(check_checkpoint(bad), Rule.MTP_MISSING)
    assert f.key == "config.json:num_nextn_predict_layers" and "--source" in f.fix


def test_mtp_quantized(exports, tiny_sources, tmp_path, tools):
    src = exports["modelopt-glm47"]
    edits = {}
    for name in mtp_names(src):
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module.rpartition(".")[2].endswith("_proj") and "eh_proj" not in module:
            edits |= tools.modelopt_module(module, tools.tensor(src, name))
            edits[f"{module}.input_scale"] = torch.tensor(0.001)
    bad = tools.edit(src, tmp_path / "c", tensors=edits, **exclude_both(remove=["model.layers.4*"]))
    f = one(check_checkpoint(bad), Rule.MTP_QUANTIZED)
    assert f.message == "31 MTP modules are quantized"


def test_mtp_bf16_not_excluded(exports, tmp_path, tools):
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "c", **exclude_both(remove=["model.layers.4*"]))
    report = check_checkpoint(bad)
    assert {f.rule for f in report.findings} == {Rule.MTP_NOT_EXCLUDED}
    assert len(report.findings) == 31  # 4 attention + 8 x 3 expert + 3 shared-expert projections


def test_router_bias_dtype(exports, tmp_path, tools):
    key = "model.layers.2.mlp.gate.e_score_correction_bias"
    bad = tools.edit(exports["ct-nvfp4-glm47"], tmp_path / "c",
                          tensors={key: tools.tensor(exports["ct-nvfp4-glm47"], key).bfloat16()})
    f = one(check_checkpoint(bad), Rule.ROUTER)
    assert (f.level, f.key) == (Level.WARN, key)


def test_router_weight_quantized(exports, tmp_path, tools):
    key = "model.layers.2.mlp.gate.weight"
    bad = tools.edit(exports["ct-fp8-glm47"], tmp_path / "c",
                          tensors={key: tools.tensor(exports["ct-fp8-glm47"], key).to(torch.float8_e4m3fn)})
    assert one(check_checkpoint(bad), Rule.ROUTER).level is Level.ERROR


def test_bf16_shared_experts_for_sglang(exports, tiny_sources, tmp_path, tools):
    edits, modules = {}, []
    for layer in (1, 2, 3):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            m = f"model.layers.{layer}.mlp.shared_experts.{proj}"
            modules.append(m)
            edits |= {f"{m}.weight": tools.source_weight(tiny_sources["glm47"], m), f"{m}.weight_scale": None,
                      f"{m}.weight_scale_2": None, f"{m}.input_scale": None}
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "c", tensors=edits, **exclude_both(add=modules))
    f = one(check_checkpoint(bad, runtime="sglang==0.5.9"), Rule.SHARED_EXPERTS_BF16)
    assert f.fix == "Start SGLang with --disable-shared-experts-fusion."
    assert check_checkpoint(bad, runtime="vllm==0.25.0").findings == ()


# ----------------------------------------------------------------------------------------------------------------
# Config files and index


def test_legacy_hf_quant_config_missing_fields(exports, tmp_path, tools):
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "c",
                          config=lambda c: c.pop("quantization_config"),
                          hf_quant=lambda h: h["quantization"].pop("kv_cache_quant_algo"))
    f = one(check_checkpoint(bad), Rule.CONFIG)
    assert f.level is Level.ERROR and "requires the following fields" in f.runtime_effect


def test_exclude_lists_disagree(exports, tmp_path, tools):
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "c", hf_quant=set_exclude("hf", remove=["lm_head"]))
    assert one(check_checkpoint(bad), Rule.CONFIG).level is Level.WARN


def test_fp8_block_structure(exports, tmp_path, tools):
    def edit(c):
        c["quantization_config"]["config_groups"]["group_0"]["weights"]["block_structure"] = [64, 64]
    bad = tools.edit(exports["ct-fp8-glm47"], tmp_path / "c", config=edit)
    assert "block_structure [64, 64]" in one(check_checkpoint(bad), Rule.CONFIG).message


def test_index_points_at_wrong_shard(exports, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(exports["modelopt-glm47"], dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    name = "model.norm.weight"
    index["weight_map"][name] = next(f for f in set(index["weight_map"].values()) if f != index["weight_map"][name])
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    f = one(check_checkpoint(dst), Rule.INDEX)
    assert f.key == name and f.message.startswith("index says")


# ----------------------------------------------------------------------------------------------------------------
# Unusable input: one UserError line each


def test_unusable_inputs(exports, tiny_sources, tmp_path):
    with pytest.raises(UserError, match="not a checkpoint folder"):
        check_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no config\.json"):
        check_checkpoint(tmp_path / "empty")
    with pytest.raises(UserError, match="not a quantized checkpoint"):
        check_checkpoint(tiny_sources["glm47"])
    broken = tmp_path / "json"
    shutil.copytree(exports["ct-fp8-glm47"], broken)
    (broken / "config.json").write_text('{"model_type": "glm4_moe",')
    with pytest.raises(UserError, match=r"config\.json: not valid JSON"):
        check_checkpoint(broken)
    truncated = tmp_path / "cut"
    shutil.copytree(exports["ct-fp8-glm47"], truncated)
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    with pytest.raises(UserError, match="do not cover the data buffer exactly"):
        check_checkpoint(truncated)
    with pytest.raises(UserError, match=r"--runtime 'trtllm==1\.0'"):
        check_checkpoint(exports["ct-fp8-glm47"], runtime="trtllm==1.0")
    with pytest.raises(UserError, match="--tp 0"):
        check_checkpoint(exports["ct-fp8-glm47"], tp=0)


# ----------------------------------------------------------------------------------------------------------------
# The runtime table


@pytest.mark.parametrize(("spec", "status"), [
    ("vllm==0.16.1rc1.dev34+g628302114", Status.AFFECTED), ("vllm==0.21.0", Status.UNCONFIRMED),
    ("vllm", Status.UNCONFIRMED), ("sglang==0.5.8", Status.AFFECTED), ("sglang==0.6.0", Status.UNCONFIRMED),
])
def test_runtime_table(spec, status):
    assert issue_status("glm4-kv-scale-keyerror", parse_runtime(spec)) is status


# ----------------------------------------------------------------------------------------------------------------
# The command: exit codes and output streams


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    import typer

    from sm120_quant.cli.check_cmd import check, fix
    from sm120_quant.cli.common import run_app

    app = typer.Typer()
    app.command("check")(check)
    app.command("fix")(fix)
    with pytest.raises(SystemExit) as exc:
        run_app(app, argv)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def test_cli_clean_json(exports, capsys):
    code, stdout, stderr = run_cli(["check", str(exports["ct-fp8-glm47"]), "--json", "--tp", "1"], capsys)
    report = json.loads(stdout)
    assert (code, report["findings"], report["summary"]) == (0, [], {"errors": 0, "warnings": 0})
    assert stderr == ""


def test_cli_findings_exit_1(exports, tools, tmp_path, capsys):
    key = f"{ATTN}.o_proj.input_scale"
    bad = tools.edit(exports["modelopt-glm47"], tmp_path / "c", tensors={key: None})
    code, stdout, stderr = run_cli(["check", str(bad), "--json"], capsys)
    assert code == 1
    assert [(f["level"], f["rule"], f["key"]) for f in json.loads(stdout)["findings"]] == [
        ("ERROR", "missing-scale", key)]
    assert stderr.startswith("failed:") and "1 error(s), 0 warning(s)" in stderr
    code, stdout, _ = run_cli(["check", str(bad)], capsys)
    assert code == 1 and stdout.startswith(f"ERROR missing-scale        {key}\n")


def test_cli_unusable_input_exit_2(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    code, stdout, stderr = run_cli(["check", str(tmp_path)], capsys)
    assert (code, stdout) == (2, "")
    assert stderr.startswith("error:") and "not valid JSON" in stderr and "Traceback" not in stderr
    assert stderr.count("\n") <= 2  # one logical line (rich may wrap a long path once)


def test_every_rule_has_a_test():
    """Each rule id is triggered (by name) somewhere in this file."""
    from pathlib import Path

    source = Path(__file__).read_text()
    assert [r.name for r in Rule if f"Rule.{r.name}" not in source] == []
