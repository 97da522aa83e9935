"""`serve plan`: KV bytes per token from the config, weights from headers or config, and seed 001's RTX 5080 numbers."""

from __future__ import annotations

import json

import pytest
from serve_support import GLM47_CONFIG, REAP_CONFIG, REAP_QUANT, write_ckpt

from sm120_quant.cli.serve_cmd import main
from sm120_quant.errors import UserError
from sm120_quant.serve.model_info import inspect_checkpoint
from sm120_quant.serve.plan import PlanRequest, estimate_weight_bytes, kv_bytes_per_token, plan_memory
from sm120_quant.serve.profiles import GIB, get_gpu


@pytest.fixture
def reap(tmp_path):
    return inspect_checkpoint(write_ckpt(tmp_path / "reap", REAP_CONFIG, REAP_QUANT))


def within(value: float, target: float, rel: float = 0.05) -> bool:
    return abs(value - target) <= rel * target


def test_kv_bytes_per_token_mla_and_gqa(reap, tmp_path):
    # MLA: one latent of 512 + 64 per layer, on every TP rank alike.
    assert kv_bytes_per_token(reap, "auto", 1) == (512 + 64) * 2 * 47 == 54144
    assert kv_bytes_per_token(reap, "fp8", 1) == 27072
    assert kv_bytes_per_token(reap, "fp8", 4) == 27072
    # GQA: K and V for the KV heads this rank holds.
    glm47 = inspect_checkpoint(write_ckpt(tmp_path / "g", GLM47_CONFIG, REAP_QUANT))
    assert kv_bytes_per_token(glm47, "auto", 1) == 2 * 8 * 128 * 2 * 92 == 376832
    assert kv_bytes_per_token(glm47, "auto", 4) == 2 * 2 * 128 * 2 * 92 == 94208
    assert kv_bytes_per_token(glm47, "fp8", 4) == 47104
    with pytest.raises(UserError, match="--kv-cache-dtype int4: choose one of"):
        kv_bytes_per_token(glm47, "int4", 1)


def test_seed001_rtx5080_fp8_kv_blocks_within_5_percent(reap):
    """Seed 001 option B: NVFP4 weights 13.46 GiB (vLLM's 'Model loading took'), FP8 KV, utilization 0.97, one
    sequence, 256 batched tokens; 733 blocks x 16 = 11,728 tokens found by binary search (734 OOMs in warmup)."""
    plan = plan_memory(
        reap,
        PlanRequest(
            "rtx-5080",
            get_gpu("rtx-5080"),
            kv_cache_dtype="fp8",
            gpu_memory_utilization=0.97,
            max_num_seqs=1,
            max_num_batched_tokens=256,
            weights_gib=13.46,
        ),
    )
    assert within(plan.num_blocks, 733), plan.num_blocks
    assert within(plan.max_model_len, 11728), plan.max_model_len
    assert within(plan.activation_gib, 1.09), plan.activation_gib  # seed 001's "inference activation peak"
    assert plan.num_blocks == 731 and plan.max_model_len == 11696
    # vLLM's own accounting would allocate more than fits: the override is what seed 001 had to find by hand.
    assert plan.vllm_blocks == 985
    assert "--num-gpu-blocks-override 731" in plan.flags and "--max-model-len 11696" in plan.flags
    assert plan.concurrency == 1.0


def test_seed001_weights_estimated_from_config_within_5_percent(reap):
    # Linear parameters: 47 MLA layers x 21,757,952 + 1 dense MLP x 62,914,560 + 46 x 49 experts x 9,437,184
    # = 22,356,951,040 at 0.5625 B (NVFP4 + E4M3 block scales); BF16: embeddings + lm_head 2 x 154,880 x 2,048 and
    # 46 routers x 48 x 2,048 = 638,910,464 parameters. Then + MLA W_UK/W_UV copies: 47 x 512 x 20 x 448 x 2 B.
    plan = plan_memory(reap, PlanRequest("rtx-5080", get_gpu("rtx-5080"), kv_cache_dtype="fp8"))
    assert within(plan.weights_gib, 13.46, rel=0.02), plan.weights_gib
    assert plan.weights_source == "estimated from config.json + MLA W_UK/W_UV copies"
    assert estimate_weight_bytes(reap) == 22_356_951_040 * 9 // 16 + 638_910_464 * 2 == 13_853_605_888


def test_seed001_bf16_option_fits_its_context(reap):
    """Option A: BF16 KV at utilization 0.965 with 8 sequences; seed 001 served 4,928 tokens of context."""
    plan = plan_memory(
        reap,
        PlanRequest(
            "rtx-5080",
            get_gpu("rtx-5080"),
            kv_cache_dtype="auto",
            gpu_memory_utilization=0.965,
            max_num_seqs=8,
            max_num_batched_tokens=512,
            weights_gib=13.46,
            max_model_len=4928,
        ),
    )
    assert plan.kv_bytes_per_token == 54144
    assert plan.num_blocks * 16 >= 4928
    assert plan.concurrency == round(plan.num_blocks * 16 / 4928, 2)


def test_weights_from_safetensors_headers_exclude_the_mtp_layer(tiny_glm47):
    from sm120_quant.exporters.safetensors_header import read_header

    ck = inspect_checkpoint(tiny_glm47)
    tensors = read_header(tiny_glm47 / "model.safetensors").tensors
    mtp = sum(t.nbytes for n, t in tensors.items() if n.startswith("model.layers.4."))
    assert ck.mtp_weights and ck.mtp_bytes == mtp > 0
    assert ck.weight_bytes == sum(t.nbytes for t in tensors.values()) - mtp
    plan = plan_memory(ck, PlanRequest("rtx-5090", get_gpu("rtx-5090"), tp=2))
    assert plan.weights_gib == round(ck.weight_bytes / 2 / GIB, 3)
    assert plan.weights_source == "safetensors headers"


def test_a_model_that_does_not_fit_is_refused(tmp_path):
    glm47 = inspect_checkpoint(write_ckpt(tmp_path / "g", GLM47_CONFIG, REAP_QUANT))
    with pytest.raises(UserError, match="does not fit on 1 x rtx-5090: weights .* use more GPUs"):
        plan_memory(glm47, PlanRequest("rtx-5090", get_gpu("rtx-5090"), tp=1))


def test_plan_cli_json(tmp_path, capsys):
    folder = write_ckpt(tmp_path / "reap", REAP_CONFIG, REAP_QUANT)
    with pytest.raises(SystemExit) as e:
        main(
            [
                "plan",
                str(folder),
                "--gpu",
                "rtx-5080",
                "--kv-cache-dtype",
                "fp8",
                "--gpu-memory-utilization",
                "0.97",
                "--max-num-seqs",
                "1",
                "--max-num-batched-tokens",
                "256",
                "--weights-gib",
                "13.46",
                "--json",
            ]
        )
    assert e.value.code == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["num_blocks"], result["max_model_len"], result["kv_bytes_per_token"]) == (731, 11696, 27072)


def test_plan_cli_unknown_gpu_is_a_usage_error(tmp_path, capsys):
    folder = write_ckpt(tmp_path / "reap", REAP_CONFIG, REAP_QUANT)
    with pytest.raises(SystemExit) as e:
        main(["plan", str(folder), "--gpu", "rtx-4090"])
    assert e.value.code == 2
    assert "--gpu rtx-4090: unknown GPU; choose one of rtx-pro-6000" in capsys.readouterr().err
