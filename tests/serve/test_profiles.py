"""`serve start`: every profile file loads, and the vLLM command follows the checkpoint and the GPU."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from serve_support import REAP_CONFIG, REAP_QUANT, write_ckpt

from sm120_quant.cli.serve_cmd import main
from sm120_quant.errors import UserError
from sm120_quant.serve.model_info import inspect_checkpoint
from sm120_quant.serve.profiles import ServeOptions, build_command, load_arch, load_gpus

PY = Path("/opt/vllm/bin/python")


def argv_value(argv: tuple[str, ...], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_every_gpu_profile_names_a_loadable_arch():
    gpus = load_gpus()
    assert {"rtx-pro-6000", "rtx-5090", "rtx-5080", "cpu"} <= set(gpus)
    for name, gpu in gpus.items():
        arch = load_arch(gpu.arch)
        assert arch.parsers.tool_call == "glm47" and arch.parsers.reasoning == "glm45", name
        assert "auto" in arch.moe_backends


def test_glm47_bf16_on_rtx_pro_6000(tiny_glm47):
    cmd = build_command(PY, inspect_checkpoint(tiny_glm47), ServeOptions(gpu="rtx-pro-6000", gpus=4))
    argv = cmd.argv
    assert argv[:5] == (str(PY), "-m", "vllm.entrypoints.cli.main", "serve", str(tiny_glm47))
    assert argv_value(argv, "--host") == "127.0.0.1" and argv_value(argv, "--port") == "8000"
    assert argv_value(argv, "--attention-backend") == "TRITON_ATTN"  # GQA: FlashInfer attention crashes on SM120
    assert argv_value(argv, "--gpu-memory-utilization") == "0.8"
    assert argv_value(argv, "--tensor-parallel-size") == "4"
    assert argv_value(argv, "--tool-call-parser") == "glm47" and argv_value(argv, "--reasoning-parser") == "glm45"
    assert "--enable-auto-tool-choice" in argv and "--quantization" not in argv and "--kv-cache-dtype" not in argv
    assert cmd.env["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn" and cmd.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "the checkpoint has an MTP layer" in " ".join(cmd.notes)


def test_nvfp4_mla_checkpoint_with_fp8_kv_scales_on_rtx_5080(tmp_path):
    quant = {"quantization": {**REAP_QUANT["quantization"], "kv_cache_quant_algo": "FP8"}}
    ck = inspect_checkpoint(write_ckpt(tmp_path / "reap", REAP_CONFIG, quant))
    cmd = build_command(
        PY, ck, ServeOptions(gpu="rtx-5080", moe_backend="marlin", max_model_len=11696, num_gpu_blocks_override=731)
    )
    argv = cmd.argv
    assert argv_value(argv, "--quantization") == "modelopt_fp4"
    assert argv_value(argv, "--attention-backend") == "TRITON_MLA"
    assert argv_value(argv, "--kv-cache-dtype") == "fp8"
    assert argv_value(argv, "--gpu-memory-utilization") == "0.97"
    assert argv_value(argv, "--num-gpu-blocks-override") == "731" and argv_value(argv, "--max-model-len") == "11696"
    assert argv_value(argv, "--moe-backend") == "marlin"
    assert cmd.env["VLLM_NVFP4_GEMM_BACKEND"] == "marlin" and cmd.env["VLLM_TEST_FORCE_FP8_MARLIN"] == "1"


def test_api_key_travels_in_the_environment_and_print_hides_it(tiny_glm47, capsys):
    cmd = build_command(
        PY, inspect_checkpoint(tiny_glm47), ServeOptions(gpu="rtx-5090", api_key="s3cret", host="0.0.0.0")
    )
    assert "s3cret" not in cmd.argv and cmd.env["VLLM_API_KEY"] == "s3cret"
    assert "s3cret" not in cmd.shell() and "VLLM_API_KEY=$VLLM_API_KEY" in cmd.shell()
    assert not any("without an API key" in n for n in cmd.notes)
    open_cmd = build_command(PY, inspect_checkpoint(tiny_glm47), ServeOptions(gpu="rtx-5090", host="0.0.0.0"))
    assert any("--host 0.0.0.0 exposes the server beyond this machine without an API key" in n for n in open_cmd.notes)


def test_mtp_draft_needs_mtp_weights(tmp_path, tiny_glm47):
    ck = inspect_checkpoint(tiny_glm47)
    cmd = build_command(PY, ck, ServeOptions(gpu="rtx-5090", mtp_tokens=1))
    assert json.loads(argv_value(cmd.argv, "--speculative-config")) == {"method": "mtp", "num_speculative_tokens": 1}
    reap = inspect_checkpoint(write_ckpt(tmp_path / "reap", REAP_CONFIG, REAP_QUANT))
    with pytest.raises(UserError, match="--mtp 1: .* has no MTP layer weights"):
        build_command(PY, reap, ServeOptions(gpu="rtx-5080", mtp_tokens=1))


def test_cpu_profile_refuses_quantized_checkpoints(tmp_path):
    reap = inspect_checkpoint(write_ckpt(tmp_path / "reap", REAP_CONFIG, REAP_QUANT))
    with pytest.raises(UserError, match="modelopt_fp4 checkpoints do not run on cpu"):
        build_command(PY, reap, ServeOptions(gpu="cpu"))


def test_start_print_shows_the_exact_command(tiny_glm47, capsys):
    with pytest.raises(SystemExit) as e:
        main(
            [
                "start",
                str(tiny_glm47),
                "--gpu",
                "cpu",
                "--vllm-python",
                "/bin/sh",
                "--enforce-eager",
                "--print",
                "--",
                "--max-num-seqs",
                "4",
            ]
        )
    assert e.value.code == 0
    words = shlex.split(capsys.readouterr().out)
    assert words[0] == "VLLM_CPU_KVCACHE_SPACE=1"
    assert words[1:6] == ["/bin/sh", "-m", "vllm.entrypoints.cli.main", "serve", str(tiny_glm47)]
    assert words[-2:] == ["--max-num-seqs", "4"] and "--enforce-eager" in words
