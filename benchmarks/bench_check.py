"""Time `quantize check` on checkpoints shaped like the full GLM-4.7 (92 layers + 1 MTP layer, 160 routed experts).

The shards are sparse files: a real header, every tensor at its real offset and size, and only the fp32 scalar scales
written (the check reads those); the rest of the data buffer is a hole, so 200-350 GB checkpoints take no disk space.
Two layouts: compressed-tensors FP8-block (about 88k tensors) and ModelOpt NVFP4 (about 173k tensors).

    .venv/bin/python benchmarks/bench_check.py [--layouts fp8-block nvfp4] [--repeat 3] [--keep DIR]

Prints a table; it checks nothing (a timing script, not a test).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# zai-org/GLM-4.7 config.json (the dimensions that decide tensor shapes).
GLM47 = {
    "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "hidden_size": 5120,
    "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_attention_heads": 96, "num_key_value_heads": 8,
    "head_dim": 128, "num_hidden_layers": 92, "n_routed_experts": 160, "n_shared_experts": 1,
    "first_k_dense_replace": 3, "num_nextn_predict_layers": 1, "vocab_size": 151552, "attention_bias": True,
    "use_qk_norm": True, "num_experts_per_tok": 8, "partial_rotary_factor": 0.5,
}
ITEMSIZE = {"BF16": 2, "F32": 4, "U8": 1, "F8_E4M3": 1}


def linears(cfg: dict, layer: int) -> list[tuple[str, int, int]]:
    """(module, out, in) of every quantized Linear of one decoder layer."""
    h, heads, kv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    p = f"model.layers.{layer}"
    out = [(f"{p}.self_attn.q_proj", heads * hd, h), (f"{p}.self_attn.k_proj", kv * hd, h),
           (f"{p}.self_attn.v_proj", kv * hd, h), (f"{p}.self_attn.o_proj", h, heads * hd)]
    if layer < cfg["first_k_dense_replace"]:
        mlps = [(f"{p}.mlp", cfg["intermediate_size"])]
    else:
        moe = cfg["moe_intermediate_size"]
        mlps = [(f"{p}.mlp.experts.{e}", moe) for e in range(cfg["n_routed_experts"])]
        mlps.append((f"{p}.mlp.shared_experts", moe * cfg["n_shared_experts"]))
    for m, inter in mlps:
        out += [(f"{m}.gate_proj", inter, h), (f"{m}.up_proj", inter, h), (f"{m}.down_proj", h, inter)]
    return out


def quantized(layout: str, module: str, o: int, i: int) -> list[tuple[str, str, list[int]]]:
    if layout == "nvfp4":
        return [(f"{module}.weight", "U8", [o, i // 2]), (f"{module}.weight_scale", "F8_E4M3", [o, i // 16]),
                (f"{module}.weight_scale_2", "F32", []), (f"{module}.input_scale", "F32", [])]
    return [(f"{module}.weight", "F8_E4M3", [o, i]),
            (f"{module}.weight_scale", "BF16", [math.ceil(o / 128), math.ceil(i / 128)])]


def layer_tensors(cfg: dict, layer: int, layout: str | None) -> list[tuple[str, str, list[int]]]:
    """Every tensor of one decoder layer; `layout` None writes it in BF16 (the MTP layer)."""
    h, hd = cfg["hidden_size"], cfg["head_dim"]
    p = f"model.layers.{layer}"
    t = [(f"{p}.input_layernorm.weight", "BF16", [h]), (f"{p}.post_attention_layernorm.weight", "BF16", [h]),
         (f"{p}.self_attn.q_norm.weight", "BF16", [hd]), (f"{p}.self_attn.k_norm.weight", "BF16", [hd])]
    for m, o, i in linears(cfg, layer):
        t += [(f"{m}.weight", "BF16", [o, i])] if layout is None else quantized(layout, m, o, i)
        if m.endswith(("q_proj", "k_proj", "v_proj")):
            t.append((f"{m}.bias", "BF16", [o]))
    if layer >= cfg["first_k_dense_replace"]:
        t += [(f"{p}.mlp.gate.weight", "BF16", [cfg["n_routed_experts"], h]),
              (f"{p}.mlp.gate.e_score_correction_bias", "F32", [cfg["n_routed_experts"]])]
    return t


def write_sparse_shard(path: Path, tensors: list[tuple[str, str, list[int]]]) -> None:
    """A safetensors file with a real header whose data buffer is a hole, except the fp32 scalars (value 0.002),
    which come first as safetensors' own writer puts the widest dtype first."""
    tensors = sorted(tensors, key=lambda t: (-ITEMSIZE[t[1]], t[0]))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in tensors:
        size = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    scalars = [t for t in tensors if t[1] == "F32" and not t[2]]
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.write(struct.pack(f"<{len(scalars)}f", *[0.002] * len(scalars)))
        f.truncate(8 + len(raw) + offset)


def build(root: Path, layout: str) -> tuple[Path, int, int]:
    cfg = dict(GLM47)
    n = cfg["num_hidden_layers"]
    folder = root / f"glm47-{layout}"
    folder.mkdir(parents=True)
    shards = [[("model.embed_tokens.weight", "BF16", [cfg["vocab_size"], cfg["hidden_size"]]),
               ("lm_head.weight", "BF16", [cfg["vocab_size"], cfg["hidden_size"]]),
               ("model.norm.weight", "BF16", [cfg["hidden_size"]])]]
    shards += [layer_tensors(cfg, layer, layout) for layer in range(n)]
    mtp = layer_tensors(cfg, n, None) + [(f"model.layers.{n}.eh_proj.weight", "BF16", [5120, 10240])] + [
        (f"model.layers.{n}.{x}.weight", "BF16", [5120]) for x in ("enorm", "hnorm", "shared_head.norm")]
    shards.append(mtp)
    weight_map = {}
    for k, tensors in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_sparse_shard(folder / file, tensors)
        weight_map |= {t[0]: file for t in tensors}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    routers = [f"model.layers.{i}.mlp.gate" for i in range(cfg["first_k_dense_replace"], n)]
    if layout == "nvfp4":
        exclude = ["lm_head", "model.embed_tokens", *routers, f"model.layers.{n}*"]
        cfg["quantization_config"] = {"quant_algo": "NVFP4", "quant_method": "modelopt", "ignore": exclude,
                                      "producer": {"name": "modelopt", "version": "0.47.0"}}
        (folder / "hf_quant_config.json").write_text(json.dumps({"quantization": {
            "quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": exclude}}))
    else:
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized",
            "ignore": ["lm_head", r"re:.*mlp\.gate$", rf"re:model\.layers\.{n}\..*"], "kv_cache_scheme": None,
            "config_groups": {"group_0": {"format": "float-quantized", "targets": ["Linear"],
                                          "weights": {"strategy": "block", "block_structure": [128, 128]},
                                          "input_activations": {"strategy": "group", "group_size": 128,
                                                                "dynamic": True}}}}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder, len(weight_map), len(shards)


CLI = """
import sys, typer
from sm120_quant.cli.check_cmd import check
from sm120_quant.cli.common import run_app
app = typer.Typer()
app.command("check")(check)
app.command("noop")(lambda: None)
run_app(app, ["check", *sys.argv[1:]])
"""


def _time_cli(folder: Path) -> tuple[float, int]:
    """Wall time and exit code of the command in a fresh interpreter; NaN when typer is not installed here."""
    try:
        import typer  # noqa: F401
    except ImportError:
        return math.nan, -1
    start = time.perf_counter()
    cli = subprocess.run([sys.executable, "-c", CLI, str(folder)], capture_output=True, text=True, check=False,
                         env=dict(os.environ, COLUMNS="200"))
    return time.perf_counter() - start, cli.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", choices=["fp8-block", "nvfp4"], default=["fp8-block", "nvfp4"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="Build the checkpoints here and keep them.")
    args = parser.parse_args()

    from sm120_quant.exporters.check import check_checkpoint

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-check-"))
    rows = []
    try:
        for layout in args.layouts:
            start = time.perf_counter()
            folder, tensors, shards = build(root, layout)
            built = time.perf_counter() - start
            apparent = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            times, report = [], None
            for _ in range(args.repeat):
                start = time.perf_counter()
                report = check_checkpoint(folder)
                times.append(time.perf_counter() - start)
            cli_s, code = _time_cli(folder)
            rows.append((layout, tensors, shards, apparent / 1e9, built, min(times), statistics.median(times),
                         cli_s, code, len(report.findings)))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    print(f"{'layout':10} {'tensors':>8} {'shards':>6} {'apparent GB':>11} {'build s':>8} {'check min s':>11} "
          f"{'median s':>8} {'CLI s':>6} {'exit':>4} {'findings':>8}")
    for r in rows:
        print(f"{r[0]:10} {r[1]:8d} {r[2]:6d} {r[3]:11.1f} {r[4]:8.2f} {r[5]:11.3f} {r[6]:8.3f} {r[7]:6.2f} "
              f"{r[8]:4d} {r[9]:8d}")


if __name__ == "__main__":
    main()
