"""Report stage: what a run did, measured: versions, recipe hash, calibration, time and peak memory per stage,
per-layer weight error, tensors written, checkpoint size, checkpoint-doctor findings. Written as report.json next to
the weights and printed as a summary."""

from __future__ import annotations

import json
import platform
import resource
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path

from sm120_quant import __version__
from sm120_quant.recipes.load import LoadedRecipe, dump_recipe

PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "nvidia-modelopt", "llmcompressor",
            "compressed-tensors", "tokenizers", "pydantic")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"sm120-quant": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def peak_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class RunStats:
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss: dict[str, int] = field(default_factory=dict)
    peak_gpu: dict[str, int] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.peak_rss[name] = peak_rss_bytes()
            if cuda:
                self.peak_gpu[name] = max(self.peak_gpu.get(name, 0), torch.cuda.max_memory_allocated())


@dataclass(frozen=True)
class Report:
    checkpoint: str
    recipe: dict
    versions: dict
    calibration: dict
    quantization: dict
    timings_s: dict
    peak_memory_bytes: dict
    weight_error: dict
    tensors: dict
    checkpoint_bytes: int
    check: dict
    notes: list
    fixups: dict | None = None  # what the recipe's fixups repaired (exporters.fix), None when nothing needed it
    tensor_parallel: list = field(default_factory=list)  # the doctor's report per runtime (vllm, sglang) and TP
    tp_table: list = field(default_factory=list)  # per TP size: does every quantized shard divide
    verify: dict | None = None  # quantize verify's headline; None when the recipe turned verification off

    def with_checkpoint(self, folder: Path) -> Report:
        """The report once the staging folder has been renamed into place."""
        return replace(self, checkpoint=str(folder), check={**self.check, "path": str(folder)})


def _layer_type(module: str) -> str:
    """`model.layers.3.mlp.experts.7.gate_proj` -> `routed_expert.gate_proj`, for per-type error summaries."""
    parts = module.split(".")
    leaf = parts[-1]
    if "experts" in parts and "shared_experts" not in parts:
        return f"routed_expert.{leaf}"
    if "shared_experts" in parts:
        return f"shared_expert.{leaf}"
    if "self_attn" in parts:
        return f"attention.{leaf}"
    if "mlp" in parts:
        return f"dense_mlp.{leaf}"
    return leaf


def _tensor_summary(folder: Path) -> dict:
    from sm120_quant.exporters.safetensors_header import read_header

    by_dtype: dict[str, int] = defaultdict(int)
    count = 0
    for shard in sorted(folder.glob("*.safetensors")):
        for info in read_header(shard).tensors.values():
            by_dtype[info.dtype] += 1
            count += 1
    return {"count": count, "by_dtype": dict(sorted(by_dtype.items()))}


def build_report(loaded: LoadedRecipe, source, calib, quantized, checkpoint, check, errors,
                 stats: RunStats) -> Report:
    """The report as of the staging folder; `Report.with_checkpoint` moves it to the final folder."""
    per_type: dict[str, list[float]] = defaultdict(list)
    for module, (_, err) in errors.items():
        per_type[_layer_type(module)].append(err)
    return Report(
        checkpoint=str(checkpoint.folder),
        recipe={"name": loaded.name, "path": str(loaded.path), "sha256": loaded.sha256,
                "scheme": loaded.recipe.scheme.value, "engine": loaded.recipe.engine.value,
                "model": loaded.recipe.model.id, "source_folder": str(source.folder)},
        versions=package_versions(),
        calibration={"hash": calib.content_hash, "num_samples": calib.num_samples, "num_tokens": calib.num_tokens,
                     "batches": len(calib),
                     "passes": [{"name": p.name, "source": p.source, "samples": p.samples, "tokens": p.tokens}
                                for p in calib.passes]},
        quantization={"expanded_modules": quantized.expanded_modules,
                      "quantizers_enabled": quantized.quantizers_enabled,
                      "quantizers_total": quantized.quantizers_total,
                      "coverage": quantized.coverage,
                      "smoothing": quantized.smoothing,
                      "engine_timings_s": quantized.timings},
        timings_s=dict(stats.seconds),
        peak_memory_bytes={"rss": max(stats.peak_rss.values(), default=0),
                           "gpu": max(stats.peak_gpu.values(), default=0), "rss_by_stage": stats.peak_rss,
                           "gpu_by_stage": stats.peak_gpu},
        weight_error={
            "metric": ("relative Frobenius error of the quantized weight vs the smoothed BF16 weight it was made from"
                       if quantized.weight_errors else
                       "relative Frobenius error of the dequantized weight vs the source weight"),
            "by_type": {t: {"mean": sum(v) / len(v), "max": max(v), "count": len(v)}
                        for t, v in sorted(per_type.items())},
            "by_module": {m: {"layout": layout, "rel_error": err} for m, (layout, err) in errors.items()},
        },
        tensors=_tensor_summary(checkpoint.folder),
        checkpoint_bytes=checkpoint.size_bytes(),
        check=check.to_dict(),
        notes=list(quantized.notes),
    )


OPTIONAL_SECTIONS = ("fixups", "tensor_parallel", "tp_table", "verify")


def write_report(report: Report, folder: Path, loaded: LoadedRecipe, coverage_check=None) -> None:
    """report.json and recipe.yaml next to the weights; with expert coverage, its table and heat map too."""
    data = asdict(report)
    for key in OPTIONAL_SECTIONS:
        if not data[key]:
            del data[key]  # absent means "not measured in this run", which is what the model card says
    (folder / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    if coverage_check is not None:
        from sm120_quant.calib_data.coverage import save_heatmap

        save_heatmap(coverage_check.table, folder / "expert_coverage.png", coverage_check.min_tokens)
        (folder / "expert_coverage.md").write_text(coverage_check.table.to_markdown(coverage_check.min_tokens))
    (folder / "recipe.yaml").write_text(f"# resolved from {loaded.path}\n" + dump_recipe(loaded.recipe))


def print_summary(report: Report) -> None:
    from rich.table import Table

    from sm120_quant.cli.common import err

    table = Table(title=f"{report.recipe['name']}: {report.recipe['scheme']} via {report.recipe['engine']}",
                  show_header=True)
    table.add_column("layer type")
    table.add_column("linears", justify="right")
    table.add_column("mean rel. error", justify="right")
    table.add_column("max rel. error", justify="right")
    for layer_type, s in report.weight_error["by_type"].items():
        table.add_row(layer_type, str(s["count"]), f"{s['mean']:.4f}", f"{s['max']:.4f}")
    err.print(table)
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in report.timings_s.items())
    err.print(f"stages: {stages}")
    err.print(f"peak RSS {report.peak_memory_bytes['rss'] / 2**30:.2f} GiB"
              + (f", peak GPU {report.peak_memory_bytes['gpu'] / 2**30:.2f} GiB"
                 if report.peak_memory_bytes["gpu"] else ""))
    err.print(f"calibration: {report.calibration.get('num_samples')} samples, "
              f"{report.calibration.get('num_tokens')} tokens, hash {str(report.calibration.get('hash'))[:16]}")
    err.print(f"checkpoint: {report.tensors['count']} tensors, {report.checkpoint_bytes / 2**20:.1f} MiB; "
              f"check: {report.check['summary']['errors']} errors, {report.check['summary']['warnings']} warnings")
    if report.verify is not None:
        m = report.verify["metrics"]
        routing = "–" if m["routing_agreement"] is None else f"{m['routing_agreement']:.1%}"
        err.print(f"verify: {'passed' if report.verify['passed'] else 'FAILED'}; cosine {m['cosine']:.4f}, "
                  f"KL {m['kl']:.4f}, top-1 {m['top1']:.1%}, min routing agreement {routing}, "
                  f"ppl {m['ppl']['source']:.1f} -> {m['ppl']['quantized']:.1f}")
    for note in report.notes:
        err.print(f"note: {note}")
