"""Correct tiny exports (ModelOpt NVFP4, compressed-tensors NVFP4 and FP8-block) built from the lead's tiny GLM-4.7 /
GLM-4.7-Flash checkpoints with `sm120_quant.quantize.formats`, and a helper that breaks one thing in a copy.

The layouts follow the real exports recorded in /work/shared/reference/hands-on-quantization-cpu.md: per-expert names,
shared global and input scales across q/k/v, gate/up and q_a/kv_a, the router, lm_head and embeddings in BF16, and
the MTP layer copied in BF16 and excluded.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sm120_quant.quantize import formats

# Written independently of check.py's tables on purpose: the fixture must not inherit a bug from the code it tests.
PROJS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "q_a_proj", "q_b_proj",
         "kv_a_proj_with_mqa", "kv_b_proj"}
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"))
NON_WEIGHT_FILES = ("config.json", "model.safetensors")


def _group_key(module: str) -> str:
    parent, _, proj = module.rpartition(".")
    for group in GROUPS:
        if proj in group:
            return f"{parent}.{'+'.join(group)}"
    return module


def _activation_amax(module: str) -> float:
    """A made-up calibrated activation amax: one value per layer and input (shared by experts, as ModelOpt's fused
    experts share one input quantizer), different between inputs."""
    layer = int(module.split(".")[2])
    proj = module.rpartition(".")[2]
    base = {"down_proj": 3.0, "o_proj": 2.0, "q_b_proj": 1.5, "kv_b_proj": 1.25}.get(proj, 4.0)
    return base + 0.25 * layer


def _linear_weights(tensors: Mapping[str, torch.Tensor], mtp_prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module.rpartition(".")[2] in PROJS and not name.startswith(mtp_prefix):
            out[module] = t
    return out


def _global_scales(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One global scale per fused group (the max of the members' amax), as ModelOpt's export syncs them."""
    amax: dict[str, torch.Tensor] = {}
    for module, w in weights.items():
        key = _group_key(module)
        a = w.float().abs().amax()
        amax[key] = torch.maximum(amax[key], a) if key in amax else a
    return {module: formats.nvfp4_global_scale(amax[_group_key(module)]) for module in weights}


def _input_scale(module: str) -> torch.Tensor:
    key = _group_key(module)
    # The group's first member decides, so q/k/v and gate/up share one value.
    first = key.rpartition(".")[0] + "." + key.rpartition(".")[2].split("+")[0]
    return formats.nvfp4_global_scale(torch.tensor(_activation_amax(first)))


def _write(folder: Path, src: Path, tensors: dict[str, torch.Tensor], config: dict, shards: int,
           extra_json: Mapping[str, dict]) -> None:
    folder.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in NON_WEIGHT_FILES and f.name != "sm120_quant_tiny.json":
            shutil.copy2(f, folder / f.name)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name, data in extra_json.items():
        (folder / name).write_text(json.dumps(data, indent=4) + "\n")
    names = sorted(tensors)
    if shards == 1:
        save_file({n: tensors[n].contiguous() for n in names}, folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    per = -(-len(names) // shards)
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i * per:(i + 1) * per]
        save_file({n: tensors[n].contiguous() for n in part}, folder / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def _source(src: Path) -> tuple[dict, dict[str, torch.Tensor], str, int]:
    config = json.loads((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    n = config["num_hidden_layers"]
    return config, tensors, f"model.layers.{n}.", n


def _router_excludes(tensors: Mapping[str, torch.Tensor], mtp: str) -> list[str]:
    return sorted(n.removesuffix(".weight") for n in tensors if n.endswith(".mlp.gate.weight")
                  and not n.startswith(mtp))


def build_modelopt_nvfp4(src: Path, folder: Path, shards: int = 2) -> Path:
    config, tensors, mtp, n = _source(src)
    weights = _linear_weights(tensors, mtp)
    gscales = _global_scales(weights)
    out = {k: v for k, v in tensors.items() if k.removesuffix(".weight") not in weights}
    for module, w in weights.items():
        q = formats.quantize_nvfp4(w.float(), gscales[module])
        out[f"{module}.weight"] = q.packed
        out[f"{module}.weight_scale"] = q.block_scale
        out[f"{module}.weight_scale_2"] = q.global_scale.reshape(())
        out[f"{module}.input_scale"] = _input_scale(module).reshape(())
    exclude = ["lm_head", "model.embed_tokens", *_router_excludes(tensors, mtp), f"model.layers.{n}*"]
    producer = {"name": "modelopt", "version": "0.47.0"}
    config["quantization_config"] = {
        "config_groups": {"group_0": {
            "input_activations": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
            "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
            "targets": ["Linear"]}},
        "ignore": exclude, "quant_algo": "NVFP4", "producer": producer, "quant_method": "modelopt"}
    hf_quant = {"producer": producer, "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None,
                                                        "group_size": 16, "exclude_modules": exclude}}
    _write(folder, src, out, config, shards, {"hf_quant_config.json": hf_quant})
    return folder


def build_ct_nvfp4(src: Path, folder: Path) -> Path:
    config, tensors, mtp, n = _source(src)
    weights = _linear_weights(tensors, mtp)
    gscales = _global_scales(weights)
    out = {k: v for k, v in tensors.items() if k.removesuffix(".weight") not in weights}
    for module, w in weights.items():
        q = formats.quantize_nvfp4(w.float(), gscales[module])
        out[f"{module}.weight_packed"] = q.packed
        out[f"{module}.weight_scale"] = q.block_scale
        # compressed-tensors stores the reciprocal scales, shape [1].
        out[f"{module}.weight_global_scale"] = (1.0 / q.global_scale).reshape(1)
        out[f"{module}.input_global_scale"] = (1.0 / _input_scale(module)).reshape(1)
    scheme = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 16,
              "dynamic": False, "scale_dtype": "torch.float8_e4m3fn"}
    config["quantization_config"] = {
        "config_groups": {"group_0": {"format": "nvfp4-pack-quantized", "weights": scheme,
                                      "input_activations": dict(scheme, dynamic="local"), "targets": ["Linear"]}},
        "format": "nvfp4-pack-quantized", "ignore": ["lm_head", r"re:.*mlp\.gate$", rf"re:model\.layers\.{n}\..*"],
        "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
        "version": "0.19.0"}
    _write(folder, src, out, config, 1, {})
    return folder


def build_ct_fp8_block(src: Path, folder: Path) -> Path:
    config, tensors, mtp, n = _source(src)
    weights = _linear_weights(tensors, mtp)
    out = {k: v for k, v in tensors.items() if k.removesuffix(".weight") not in weights}
    for module, w in weights.items():
        q, scale = formats.quantize_fp8_block(w)
        out[f"{module}.weight"] = q
        out[f"{module}.weight_scale"] = scale.to(w.dtype)  # llm-compressor writes the scale in the weight's dtype
    config["quantization_config"] = {
        "config_groups": {"group_0": {
            "format": "float-quantized",
            "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block",
                        "block_structure": [128, 128], "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "group",
                                  "group_size": 128, "dynamic": True},
            "output_activations": None, "targets": ["Linear"]}},
        "format": "float-quantized", "ignore": ["lm_head", r"re:.*mlp\.gate$", rf"re:model\.layers\.{n}\..*"],
        "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
        "version": "0.19.0"}
    _write(folder, src, out, config, 1, {})
    return folder


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """These tensors are tiny: on a shared 2-core box torch's thread pool costs 10x more than it saves."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_sources(tiny_glm47, tiny_glm47_flash) -> dict[str, Path]:
    """The lead's tiny BF16 checkpoints (tests/conftest.py caches them in pytest's cache folder)."""
    return {"glm47": tiny_glm47, "glm47-flash": tiny_glm47_flash}


@pytest.fixture(scope="session")
def exports(tiny_sources, tmp_path_factory) -> dict[str, Path]:
    """name -> a correct export folder (never modified; tests edit copies)."""
    root = tmp_path_factory.mktemp("exports")
    with one_torch_thread():
        return {
            "modelopt-glm47": build_modelopt_nvfp4(tiny_sources["glm47"], root / "modelopt-glm47"),
            "modelopt-flash": build_modelopt_nvfp4(tiny_sources["glm47-flash"], root / "modelopt-flash", shards=1),
            "ct-nvfp4-glm47": build_ct_nvfp4(tiny_sources["glm47"], root / "ct-nvfp4-glm47"),
            "ct-fp8-glm47": build_ct_fp8_block(tiny_sources["glm47"], root / "ct-fp8-glm47"),
            "ct-fp8-flash": build_ct_fp8_block(tiny_sources["glm47-flash"], root / "ct-fp8-flash"),
        }


def source_weight(source: Path, module: str) -> torch.Tensor:
    """The BF16 weight of `module` in a tiny source checkpoint."""
    with safe_open(source / "model.safetensors", "pt") as f:
        return f.get_tensor(f"{module}.weight")


def modelopt_module(module: str, w: torch.Tensor, global_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """ModelOpt tensors of one module quantized on its own (its own amax unless `global_scale` is given)."""
    with one_torch_thread():
        q = formats.quantize_nvfp4(w.float(), global_scale)
    return {f"{module}.weight": q.packed, f"{module}.weight_scale": q.block_scale,
            f"{module}.weight_scale_2": q.global_scale.reshape(())}


def _shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def edit_checkpoint(
    src: Path,
    dst: Path,
    tensors: Mapping[str, torch.Tensor | None] | None = None,
    rename: Mapping[str, str] | None = None,
    config: Callable[[dict], None] | None = None,
    hf_quant: Callable[[dict], None] | None = None,
) -> Path:
    """Copy `src` to `dst` and break it: set (or, with None, delete) tensors, rename tensors, edit the JSON files.
    New tensors go to the first shard; the index follows."""
    shutil.copytree(src, dst)
    tensors = dict(tensors or {})
    rename = dict(rename or {})
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    shards = _shard_files(dst)
    home = {}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            home |= dict.fromkeys(f.keys(), shard)
    assert set(rename) <= set(home), f"fixture bug: {set(rename) - set(home)}"
    assert all(v is not None or k in home for k, v in tensors.items()), "fixture bug: deleting a missing tensor"
    for shard in shards:
        mine = {k: v for k, v in tensors.items() if home.get(k, shards[0]) == shard}
        moves = {k: v for k, v in rename.items() if home[k] == shard}
        if not mine and not moves:
            continue
        loaded = load_file(shard)
        for old, new in moves.items():
            loaded[new] = loaded.pop(old)
        for name, value in mine.items():
            if value is None:
                del loaded[name]
            else:
                loaded[name] = value
        save_file(loaded, shard, metadata={"format": "pt"})
        if index is not None:
            wm = index["weight_map"]
            for old, new in moves.items():
                wm[new] = wm.pop(old)
            for name, value in mine.items():
                if value is None:
                    del wm[name]
                else:
                    wm[name] = shard.name
    if index is not None:
        index_path.write_text(json.dumps(index, indent=2))
    for fname, fn in (("config.json", config), ("hf_quant_config.json", hf_quant)):
        if fn is not None:
            data = json.loads((dst / fname).read_text())
            fn(data)
            (dst / fname).write_text(json.dumps(data, indent=2))
    return dst


def tensor(folder: Path, name: str) -> torch.Tensor:
    """One tensor of a checkpoint folder, read with the safetensors library (not with the code under test)."""
    for shard in _shard_files(folder):
        loaded = load_file(shard)
        if name in loaded:
            return loaded[name]
    raise KeyError(name)


@pytest.fixture(scope="session")
def tools() -> SimpleNamespace:
    """The helpers above, as a fixture: test modules cannot import this conftest by name without clashing with other
    folders' conftest modules."""
    return SimpleNamespace(edit=edit_checkpoint, tensor=tensor, source_weight=source_weight,
                           modelopt_module=modelopt_module)
