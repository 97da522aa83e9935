"""The parts of `serve verify` that need no server: log grep, root-cause extraction, output sanity, the interpreter
lookup, and the CLI's usage errors."""

from __future__ import annotations

import os
import stat

import pytest

from sm120_quant.cli.serve_cmd import main
from sm120_quant.errors import UserError
from sm120_quant.serve.server import root_error
from sm120_quant.serve.verify import grep_log, repetition_ratio
from sm120_quant.serve.vllm_env import find_vllm_python, interpreter_of_script, release_of

# Lines as vLLM 0.15-0.32 print them (serving-runtimes.md quotes the messages).
BAD_LOG = """\
(Worker_TP0 pid=1) INFO 02-21 10:00:01 [nvfp4.py:120] Using 'VLLM_CUTLASS' NvFp4 MoE backend out of potential backends: ['FLASHINFER_TRTLLM', 'FLASHINFER_CUTLASS', 'VLLM_CUTLASS', 'MARLIN']
(Worker_TP0 pid=1) INFO 02-21 10:00:01 [cuda.py:300] Using AttentionBackendEnum.TRITON_ATTN backend.
(Worker_TP0 pid=1) WARNING 02-21 10:00:02 [modelopt.py:900] w1_weight_scale_2 must match w3_weight_scale_2. Accuracy may be affected.
(Worker_TP0 pid=1) WARNING 02-21 10:00:02 [modelopt.py:400] In NVFP4 linear, the global scale for input or weight are different for parallel layers (e.g. q_proj, k_proj, v_proj). Consider using a checkpoint with a shared global NVFP4 scale
(Worker_TP0 pid=1) WARNING 02-21 10:00:03 [weight_utils.py:1140] Found k_scale in the checkpoint (e.g. model.layers.0.self_attn.k_proj.k_scale), but not found the expected name in the model (e.g. model.layers.0.self_attn.attn.k_scale). k_scale is not loaded.
(Worker_TP0 pid=1) WARNING 02-21 10:00:03 [kv_cache.py:90] Using KV cache scaling factor 1.0 for fp8_e4m3. If this is unintended, verify that k/v_scale scaling factors are properly set in the checkpoint.
(Worker_TP0 pid=1) WARNING 02-21 10:00:04 [marlin_utils_fp4.py:30] Your GPU does not have native support for FP4 computation but FP4 quantization is being used. Weight-only FP4 compression will be used leveraging the Marlin kernel.
"""


def test_grep_log_finds_every_known_bad_line_and_the_backends():
    findings, backends = grep_log(BAD_LOG)
    assert [f["name"] for f in findings] == [
        "w1_weight_scale_2 must match",
        "global scale differs",
        "KV scale 1.0",
        "k/v scale not loaded",
        "no native FP4",
    ]
    assert all(f["count"] == 1 for f in findings)
    assert backends == [
        (
            "Using 'VLLM_CUTLASS' NvFp4 MoE backend out of potential backends: "
            "['FLASHINFER_TRTLLM', 'FLASHINFER_CUTLASS', 'VLLM_CUTLASS', 'MARLIN']"
        ),
        "Using AttentionBackendEnum.TRITON_ATTN backend.",
    ]
    assert grep_log("INFO all good\n") == ([], [])


def test_root_error_skips_warnings_and_generic_wrappers():
    log = """\
(APIServer pid=1) WARNING [system_utils.py:255] ... fd limit errors like `OSError: [Errno 24] Too many open files`.
(Worker pid=2) ERROR [multiproc_executor.py:953] AssertionError: Attempted to load weight (torch.Size([128])) into parameter (torch.Size([256]))
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""
    assert root_error(log) == (
        "AssertionError: Attempted to load weight (torch.Size([128])) into parameter (torch.Size([256]))"
    )
    assert root_error("RuntimeError: Engine core initialization failed. See root cause above.\n") is None


def test_repetition_ratio_flags_loops_not_prose():
    assert repetition_ratio("the cat sat " * 20) > 0.9
    assert repetition_ratio("Paris is the capital and largest city of France, on the Seine in the north.") == 0.0
    assert repetition_ratio("too short") == 0.0


def test_interpreter_of_script_reads_both_shebang_forms(tmp_path):
    plain = tmp_path / "vllm"
    plain.write_text("#!/home/u/.local/share/uv/tools/vllm/bin/python\nimport sys\n")
    assert str(interpreter_of_script(plain)) == "/home/u/.local/share/uv/tools/vllm/bin/python"
    long = tmp_path / "vllm-long"
    long.write_text("#!/bin/sh\n'''exec' \"/very/long/path/bin/python\" \"$0\" \"$@\"\n' '''\n")
    assert str(interpreter_of_script(long)) == "/very/long/path/bin/python"
    link = tmp_path / "bin" / "vllm"
    link.parent.mkdir()
    os.symlink(plain, link)
    assert str(interpreter_of_script(link)) == "/home/u/.local/share/uv/tools/vllm/bin/python"
    binary = tmp_path / "vllm-bin"
    binary.write_bytes(b"\x7fELF")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(UserError, match="no shebang line; pass --vllm-python"):
        interpreter_of_script(binary)


def test_find_vllm_python_needs_an_existing_file(tmp_path):
    with pytest.raises(UserError, match="--vllm-python .*: no such file"):
        find_vllm_python(tmp_path / "nope")


@pytest.mark.parametrize(
    ("version", "release"),
    [("0.15.1", "0.15.1"), ("0.32.0+cpu", "0.32.0"), ("0.15.1+cu128", "0.15.1"), ("0.16.1rc1.dev34+g628302114", None)],
)
def test_release_of(version, release):
    assert release_of(version) == release


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["verify"], "pass a checkpoint folder or --url, not both and not neither"),
        (["verify", "ckpt", "--url", "http://127.0.0.1:1"], "pass a checkpoint folder or --url"),
        (["patch", "--check", "--revert", "--vllm-python", "/bin/sh"], "--check and --revert: choose one"),
    ],
)
def test_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("sm120-quant ")


def test_verify_url_with_no_server_fails_with_the_reason(capsys):
    from sm120_quant.serve.server import free_port

    url = f"http://127.0.0.1:{free_port()}"  # bound and released: nothing listens there
    with pytest.raises(SystemExit) as e:
        main(["verify", "--url", url])
    assert e.value.code == 1
    assert f"{url}: no server answers" in capsys.readouterr().err
