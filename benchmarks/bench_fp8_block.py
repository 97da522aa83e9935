"""Time sm120-quant's FP8-block path against calling llm-compressor directly, on the same model.

The model is a GLM-4.7 (`Glm4MoeForCausalLM`) at its real dimensions (hidden 5120, 96/8 heads of 128, 160 routed
experts top-8 with moe_intermediate 1536 plus one shared expert, dense intermediate 12288, vocab 151552), cut to
`--layers` decoder layers (the first dense, the rest MoE), with random BF16 weights built on the device; no download.

  sm120-quant: our expert expansion (quantize.moe) -> llmc_engine.calibrate -> llmc_export.export_llmcompressor
  llm-compressor: linearize_moe -> oneshot(QuantizationModifier FP8_BLOCK) -> save_pretrained(save_compressed=True)

Each path runs in a process of its own (so peak memory is its own) on identically seeded weights; the table gives
seconds per stage, peak GPU memory (torch.cuda.max_memory_allocated) and peak RSS, and whether both checkpoints hold
the same tensors byte for byte. Timing only: nothing here passes or fails.

  python benchmarks/bench_fp8_block.py                  # GPU (H100/H200): GLM-4.7 dims, 3 layers
  python benchmarks/bench_fp8_block.py --tiny           # CPU smoke check: the tiny GLM-4.7 dims
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GLM47 = {
    "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536, "n_routed_experts": 160,
    "num_experts_per_tok": 8, "n_shared_experts": 1, "num_attention_heads": 96, "num_key_value_heads": 8,
    "head_dim": 128, "vocab_size": 151552, "first_k_dense_replace": 1, "partial_rotary_factor": 0.5,
    "use_qk_norm": True, "attention_bias": True, "max_position_embeddings": 202752, "rms_norm_eps": 1e-5,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "n_group": 1, "topk_group": 1,
    "tie_word_embeddings": False,
}
PATHS = {"sm120": "sm120-quant (our expansion + llmc_engine + llmc_export)",
         "llmc": "llm-compressor direct (linearize_moe + oneshot + save_pretrained)"}
GIB = 2**30
WARM_IMPORTS = ("llmcompressor.entrypoints.oneshot", "llmcompressor.modeling.moe.linearize",
                "llmcompressor.modifiers.quantization", "sm120_quant.exporters.llmc_export",
                "sm120_quant.quantize.llmc_engine")


def model_config(tiny: bool, layers: int, experts: int | None = None) -> dict:
    if tiny:
        from sm120_quant.models.tiny import TINY_MODELS

        base = dict(TINY_MODELS["glm47"].config, first_k_dense_replace=1)
    else:
        base = dict(GLM47)
    # No MTP layer: transformers 5.17 aliases num_mtp_layers to num_nextn_predict_layers for Glm4Moe, which makes
    # llm-compressor's save look for MTP tensors in the source safetensors, and random weights have none.
    config = dict(base, num_hidden_layers=layers, num_nextn_predict_layers=0, architectures=["Glm4MoeForCausalLM"],
                  model_type="glm4_moe")
    if experts:
        config["n_routed_experts"] = experts
    return config


def build_model(config: dict, device: str, source: Path):
    """Random BF16 weights, seeded; config.json saved into `source`, which llm-compressor reads back on save."""
    import torch
    from transformers import AutoModelForCausalLM, Glm4MoeConfig

    cfg = Glm4MoeConfig(**{k: v for k, v in config.items() if k != "model_type"})
    cfg.save_pretrained(source)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.config._name_or_path = model.name_or_path = str(source)
    return model.eval()


def run_sm120(model, config: dict, source: Path, out: Path, tiny: bool, timer) -> None:
    from sm120_quant.exporters.llmc_export import export_llmcompressor
    from sm120_quant.models.load import SourceCheckpoint
    from sm120_quant.quantize import llmc_engine
    from sm120_quant.quantize.model import QuantizedModel
    from sm120_quant.quantize.moe import expand_experts
    from sm120_quant.recipes.load import load_recipe

    recipe = load_recipe("tiny-glm47-fp8-block.yaml" if tiny else "glm47-fp8-block.yaml").recipe
    with timer("expand / linearize"):
        expand_experts(model)
    quantized = QuantizedModel(model=model, tokenizer=None, source=SourceCheckpoint(source, config),
                               engine=recipe.engine, scheme=recipe.scheme)
    with timer("oneshot"):
        llmc_engine.calibrate(recipe, quantized, None)  # FP8 block is data-free: no calibration set
    with timer("save"):
        export_llmcompressor(quantized, out, "5GB")


def run_llmc(model, config: dict, source: Path, out: Path, tiny: bool, timer) -> None:
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from llmcompressor.modifiers.quantization import QuantizationModifier

    with timer("expand / linearize"):
        linearize_moe(model)  # what oneshot does first on a fused MoE; called here to time it apart
    with timer("oneshot"):
        oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="FP8_BLOCK",
                                                         ignore=["lm_head", r"re:.*mlp\.gate$"]))
    with timer("save"):
        model.save_pretrained(out, save_compressed=True, max_shard_size="5GB")


RUNNERS = {"sm120": run_sm120, "llmc": run_llmc}


def worker(path: str, args: argparse.Namespace) -> dict:
    import torch

    device = args.device
    cuda = device == "cuda"
    seconds: dict[str, float] = {}

    class timer:
        def __init__(self, stage: str):
            self.stage = stage

        def __enter__(self):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def __exit__(self, *exc):
            if cuda:
                torch.cuda.synchronize()
            seconds[self.stage] = seconds.get(self.stage, 0.0) + time.perf_counter() - self.start

    # Import both stacks before any timer starts, so neither path pays its first import inside a stage.
    for module in WARM_IMPORTS:
        importlib.import_module(module)

    work = Path(args.work) / path
    source, out = work / "source", work / "ckpt"
    source.mkdir(parents=True)
    config = model_config(args.tiny, args.layers, args.experts)
    with timer("build"):
        model = build_model(config, device, source)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        RUNNERS[path](model, config, source, out, args.tiny, timer)
    shards = sorted(out.glob("*.safetensors"))
    return {
        "path": path, "device": torch.cuda.get_device_name() if cuda else "cpu", "seconds": seconds,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "checkpoint_bytes": sum(p.stat().st_size for p in shards), "tensors": tensor_digests(shards),
    }


def tensor_digests(shards: list[Path]) -> dict[str, str]:
    """dtype, shape and a hash of the bytes of every tensor, to compare the two checkpoints."""
    import torch
    from safetensors import safe_open

    digests = {}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key).contiguous()
                raw = t.view(-1).view(torch.uint8).numpy().tobytes()
                digests[key] = f"{t.dtype} {list(t.shape)} {hashlib.blake2b(raw, digest_size=16).hexdigest()}"
    return digests


def table(results: list[dict]) -> str:
    stages = ["expand / linearize", "oneshot", "save"]
    header = (f"| path | {' | '.join(s + ' (s)' for s in stages)} | total (s) | peak GPU (GiB) | peak RSS (GiB) | "
              "tensors | checkpoint (GiB) |")
    lines = [header, "|---|" + "---|" * (len(stages) + 5)]
    for r in results:
        s = r["seconds"]
        gpu = "-" if r["peak_gpu_bytes"] is None else f"{r['peak_gpu_bytes'] / GIB:.1f}"
        lines.append(f"| {PATHS[r['path']]} | " + " | ".join(f"{s.get(k, 0.0):.2f}" for k in stages)
                     + f" | {sum(s.get(k, 0.0) for k in stages):.2f} | {gpu} | {r['peak_rss_bytes'] / GIB:.1f} | "
                     f"{len(r['tensors'])} | {r['checkpoint_bytes'] / GIB:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny GLM-4.7 dims (CPU smoke check)")
    parser.add_argument("--layers", type=int, default=3, help="decoder layers: the first dense, the rest MoE")
    parser.add_argument("--experts", type=int, help="routed experts per MoE layer (default: the model's; fewer to fit "
                        "GLM-4.7 dimensions into CPU memory)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--paths", default="sm120,llmc", help="comma-separated, from: " + ", ".join(RUNNERS))
    parser.add_argument("--work", help="folder for the checkpoints (default: a temporary one, deleted afterwards)")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--worker", choices=tuple(RUNNERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.layers < 2:
        parser.error("--layers must be at least 2 (one dense layer, then MoE layers)")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-fp8-block-"))
    try:
        results = []
        for path in args.paths.split(","):
            if path not in RUNNERS:
                parser.error(f"--paths: unknown path {path!r}; choose from {', '.join(RUNNERS)}")
            shutil.rmtree(work / path, ignore_errors=True)
            cmd = [sys.executable, __file__, "--worker", path, "--layers", str(args.layers), "--device", args.device,
                   "--work", str(work)] + (["--tiny"] if args.tiny else []) + (
                       ["--experts", str(args.experts)] if args.experts else [])
            done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ), check=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            shutil.rmtree(work / path / "ckpt", ignore_errors=True)  # keep the disk to one checkpoint at a time
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    dims = "tiny GLM-4.7" if args.tiny else "GLM-4.7"
    experts = f", {args.experts} routed experts" if args.experts else ""
    print(f"FP8 block, {dims} dimensions{experts}, {args.layers} layers (1 dense + {args.layers - 1} MoE), "
          f"device {results[0]['device']}\n")
    print(table(results))
    if len(results) == 2:
        same = results[0]["tensors"] == results[1]["tensors"]
        print(f"\nsame tensors (names, dtypes, shapes, bytes): {'yes' if same else 'no'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
