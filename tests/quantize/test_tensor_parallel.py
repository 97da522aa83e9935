"""The TP table from config.json, on the real GLM-4.7 and GLM-4.7-Flash dimensions (config.json values as published)."""

import json

import pytest

from sm120_quant.quantize.tensor_parallel import tp_markdown, tp_table
from sm120_quant.recipes.schema import Scheme

GLM47 = {
    "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "hidden_size": 5120, "head_dim": 128,
    "num_attention_heads": 96, "num_key_value_heads": 8, "intermediate_size": 12288, "moe_intermediate_size": 1536,
    "n_routed_experts": 160, "n_shared_experts": 1, "num_experts_per_tok": 8, "num_hidden_layers": 92,
    "first_k_dense_replace": 3, "num_nextn_predict_layers": 1, "vocab_size": 151552,
}
GLM47_FLASH = {
    "architectures": ["Glm4MoeLiteForCausalLM"], "model_type": "glm4_moe_lite", "hidden_size": 2048,
    "num_attention_heads": 20, "num_key_value_heads": 20, "intermediate_size": 10240, "moe_intermediate_size": 1536,
    "n_routed_experts": 64, "n_shared_experts": 1, "num_experts_per_tok": 4, "num_hidden_layers": 47,
    "first_k_dense_replace": 1, "num_nextn_predict_layers": 1, "q_lora_rank": 768, "kv_lora_rank": 512,
    "qk_nope_head_dim": 192, "qk_rope_head_dim": 64, "v_head_dim": 256, "vocab_size": 154880,
}


def failing_layers(row):
    return {c.layer for c in row.checks if not c.ok}


def test_glm47_fp8_block_splits_at_tp_1_2_4_and_not_8():
    rows = tp_table(GLM47, Scheme.FP8_BLOCK)
    assert [r.tp for r in rows] == [1, 2, 4, 8]
    assert [r.ok for r in rows] == [True, True, True, False]
    # 1536 / 8 = 192: the routed and the shared experts; attention (qkv 1536/128/128, o_proj 1536) still splits.
    assert failing_layers(rows[3]) == {"experts", "shared_experts.gate_up_proj", "shared_experts.down_proj"}
    experts = next(c for c in rows[3].checks if c.layer == "experts")
    assert experts.sizes == (192,) and experts.multiple == 128
    qkv = next(c for c in rows[3].checks if c.layer == "qkv_proj")
    assert qkv.sizes == (1536, 128, 128) and qkv.ok
    assert "experts: moe_intermediate_size per rank 192 is not a multiple of 128" in rows[3].failures


def test_glm47_nvfp4_splits_at_every_tp():
    rows = tp_table(GLM47, Scheme.NVFP4)
    assert all(r.ok for r in rows)
    experts = next(c for c in rows[3].checks if c.layer == "experts")
    assert experts.sizes == (384,) and experts.multiple == 128  # 2 x 1536 / 8


def test_glm47_flash_fp8_block_kv_b_proj_stops_tp4_and_heads_stop_tp8():
    rows = tp_table(GLM47_FLASH, Scheme.FP8_BLOCK)
    assert [r.ok for r in rows] == [True, True, False, False]
    assert failing_layers(rows[2]) == {"kv_b_proj"}
    kv_b = next(c for c in rows[2].checks if c.layer == "kv_b_proj")
    assert kv_b.sizes == (2240,)  # 20 heads x (192 + 256) / 4
    assert rows[3].heads == "20 attention heads do not divide over 8 ranks"
    # q_a_proj (768) is checked, kv_a_proj_with_mqa (576) is the fused layer's exempt last shard.
    fused = next(c for c in rows[0].checks if c.layer == "fused_qkv_a_proj")
    assert fused.sizes == (768,) and fused.ok


def test_glm47_flash_excluding_kv_b_proj_frees_tp4():
    rows = tp_table(GLM47_FLASH, Scheme.FP8_BLOCK, exclude=["*kv_b_proj"])
    assert [r.ok for r in rows] == [True, True, True, False]
    assert "kv_b_proj" not in {c.layer for r in rows for c in r.checks}


def test_excluding_only_some_layers_keeps_the_check():
    # Layers 0-2 of GLM-4.7 are its dense layers: excluding them drops the dense MLP, not the attention of 3-91.
    rows = tp_table(GLM47, Scheme.FP8_BLOCK, exclude=["model.layers.[0-2].*"])
    layers = {c.layer for c in rows[1].checks}
    assert "mlp.gate_up_proj" not in layers and "qkv_proj" in layers and "experts" in layers


def test_glm47_flash_nvfp4_only_the_heads_stop_tp8():
    rows = tp_table(GLM47_FLASH, Scheme.NVFP4)
    assert [r.ok for r in rows] == [True, True, True, False]
    assert rows[3].failures == ("20 attention heads do not divide over 8 ranks",)


def test_fewer_kv_heads_than_ranks_replicate_one_head_per_rank():
    config = dict(GLM47, num_key_value_heads=2)
    row = tp_table(config, Scheme.FP8_BLOCK, tp_sizes=(4,))[0]
    qkv = next(c for c in row.checks if c.layer == "qkv_proj")
    assert qkv.sizes == (3072, 128, 128) and row.heads is None
    assert tp_table(dict(GLM47, num_key_value_heads=3), Scheme.NVFP4, tp_sizes=(4,))[0].heads is not None


@pytest.mark.parametrize("config", [GLM47, GLM47_FLASH], ids=["glm47", "glm47-flash"])
def test_to_dict_is_json_and_mirrors_the_row(config):
    row = tp_table(config, Scheme.FP8_BLOCK)[3]
    data = json.loads(json.dumps(row.to_dict()))
    assert data["tp"] == 8 and data["scheme"] == "fp8_block" and data["ok"] is False
    assert data["failures"] == list(row.failures)
    assert {c["layer"] for c in data["checks"] if not c["ok"]} == failing_layers(row)


def test_markdown_table_has_one_row_per_tp():
    table = tp_markdown(GLM47)
    lines = table.splitlines()
    assert lines[0] == "| TP | fp8_block | nvfp4 |"
    assert lines[2:5] == ["| 1 | ok | ok |", "| 2 | ok | ok |", "| 4 | ok | ok |"]
    assert lines[5].startswith("| 8 | no: ") and lines[5].endswith("| ok |")


def test_tiny_glm47_config(tiny_glm47):
    config = json.loads((tiny_glm47 / "config.json").read_text())
    rows = tp_table(config, Scheme.FP8_BLOCK)
    # moe_intermediate 128 splits into 64 at TP2; 4 heads stop TP8.
    assert [r.ok for r in rows] == [True, False, False, False]
    assert "experts" in failing_layers(rows[1])
    assert rows[3].heads == "4 attention heads do not divide over 8 ranks"
