"""`quantize verify`: prove a quantized checkpoint computes what its BF16 source computes, on any machine.

Top to bottom: open both checkpoints and check they describe the same architecture; tokenize held-out prompts; then
stream the two models one decoder layer at a time (`verify.emulate`), measuring each layer on the source's own input
(local error, routing) and on each model's own hidden states (stream error); compare the logits; generate a few greedy
continuations when both models fit in memory; check the thresholds of the recipe's `verify:` section; write JSON and a
plot. Threshold failures are findings in the returned report, never exceptions: the caller picks the exit code.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from sm120_quant.errors import UserError
from sm120_quant.models.load import SourceCheckpoint
from sm120_quant.recipes.schema import VerifySpec
from sm120_quant.verify.emulate import ModuleRecord

REPORT_JSON = "verify.json"
REPORT_PNG = "verify.png"
# An unquantized tensor is copied (or folded into a norm) exactly; BF16 re-rounding of a folded smoothing scale moves
# a weight by at most 2**-8 relative per element on either side, so anything past 1% is a changed tensor.
MAX_DENSE_ERROR = 0.01
# Both models are kept in memory (needed for greedy generation) when their dense size is under this share of RAM.
_KEEP_IN_MEMORY_SHARE = 0.4
_ARCH_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads")


@dataclass(frozen=True)
class LayerMetrics:
    index: int
    kind: str  # "moe" when the layer has a router, else "dense"
    local_error: float
    stream_error: float
    routing_local: float | None
    routing_stream: float | None
    weight_error: float | None  # the worst quantized tensor of the layer
    worst_module: str | None
    dense_error: float  # the largest change of an unquantized tensor (router, norms folded into consumers, biases)
    dense_module: str | None
    nonfinite: int  # non-finite values the layer computed from finite inputs (local and stream passes)
    first_nonfinite_module: str | None
    dead_modules: tuple[str, ...]  # quantized linears whose every output was exactly zero for non-zero input
    expert_tokens: tuple[int, ...] | None = None  # MoE: how many held-out tokens the source routes to each expert


@dataclass(frozen=True)
class Generation:
    prompt: str
    source: str
    quantized: str
    same_tokens: int  # leading generated tokens that are identical


@dataclass(frozen=True)
class Failure:
    check: str
    message: str
    layer: int | None = None
    module: str | None = None
    value: float | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class VerifyReport:
    checkpoint: str
    source: str
    prompts: int
    tokens: int
    cosine: float
    cosine_min: float
    kl: float
    kl_max: float
    top1: float
    ppl_source: float
    ppl_quantized: float
    layers: tuple[LayerMetrics, ...]
    modules: tuple[ModuleRecord, ...]
    generations: tuple[Generation, ...]
    thresholds: dict
    failures: tuple[Failure, ...]
    layouts: dict = field(default_factory=dict)  # layout -> number of linear modules
    activations: dict = field(default_factory=dict)  # activation scheme -> number of quantized modules
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    files: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def worst_layer(self) -> int | None:
        """The layer with the largest local error (non-finite counts as largest)."""
        if not self.layers:
            return None
        return max(self.layers, key=lambda m: _sortable(m.local_error)).index

    def to_dict(self) -> dict:
        return _finite_or_none(asdict(self) | {"passed": self.passed, "worst_layer": self.worst_layer})


def verify_checkpoint(checkpoint: Path, source: SourceCheckpoint, spec: VerifySpec, *, prompts: list[str] | None = None,
                      device: str = "cpu", out_dir: Path | None = None, dtype: str = "float32",
                      max_prompt_tokens: int = 256, generate_tokens: int = 16,
                      keep_in_memory: bool | None = None) -> VerifyReport:
    """Compare `checkpoint` with `source` on held-out prompts; write verify.json and verify.png into `out_dir`.

    `prompts` overrides `spec.prompts` (a file) and the built-in prompts. `keep_in_memory=None` keeps both models'
    layers in memory when they fit in 40% of the available RAM, else streams them from the safetensors files layer
    by layer (and skips the greedy generations, which would re-read every layer per token).
    """
    import torch

    from sm120_quant.verify.emulate import HEAD_NORM_CONSUMERS, Side, compare_weights, load_skeleton
    from sm120_quant.verify.metrics import TokenTotals, token_stats
    from sm120_quant.verify.prompts import BUILTIN_PROMPTS, GENERATION_PROMPTS, load_prompts
    from sm120_quant.verify.reader import CheckpointReader

    start = time.perf_counter()
    compute_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if compute_dtype is None:
        raise UserError(f"--dtype {dtype!r}: choose float32 or bfloat16")
    quant_reader, source_reader = CheckpointReader(checkpoint), CheckpointReader(source.folder)
    _check_architecture(quant_reader.config(), source.config, checkpoint, source.folder)
    if prompts is None:
        prompts = load_prompts(Path(spec.prompts)) if spec.prompts else list(BUILTIN_PROMPTS)
    tokenizer = _tokenizer(source.folder)
    sequences = [ids for ids in (_encode(tokenizer, p, max_prompt_tokens) for p in prompts) if ids.numel() >= 2]
    if not sequences:
        raise UserError("verify: every prompt is shorter than 2 tokens; pass longer held-out prompts")

    skeleton = load_skeleton(source.folder)
    keep = _fits_in_memory(source.folder, compute_dtype) if keep_in_memory is None else keep_in_memory
    src = Side(source_reader, skeleton, quantized=False, dtype=compute_dtype, device=device, keep_layers=keep)
    quant = Side(quant_reader, skeleton, quantized=True, dtype=compute_dtype, device=device, keep_layers=keep)
    records = compare_weights("", src.outer(), quant.outer(), quant, norm_consumers=HEAD_NORM_CONSUMERS)

    with torch.no_grad():
        hidden_src = [src.embed(ids) for ids in sequences]
        hidden_q = [quant.embed(ids) for ids in sequences]
        layers = []
        for index in range(src.num_layers):
            layer_s, layer_q = src.layer(index), quant.layer(index)
            layer_records = compare_weights(f"model.layers.{index}", layer_s, layer_q, quant)
            records += layer_records
            layers.append(_run_layer(index, src, quant, layer_s, layer_q, hidden_src, hidden_q, layer_records))
        totals = TokenTotals()
        for ids, h_s, h_q in zip(sequences, hidden_src, hidden_q):
            totals.add(token_stats(src.head(h_s), quant.head(h_q), ids))
        generations = (_generations(src, quant, tokenizer, GENERATION_PROMPTS, generate_tokens)
                       if keep and generate_tokens > 0 else ())

    notes = []
    if not keep and generate_tokens > 0:
        notes.append("greedy generations skipped: the models do not fit in memory together (streamed layer by layer)")
    if (quant_reader.config().get("quantization_config") or {}).get("kv_cache_scheme"):
        notes.append("the checkpoint quantizes the KV cache; KV-cache quantization is not emulated")
    report = VerifyReport(
        checkpoint=str(checkpoint), source=str(source.folder), prompts=len(sequences), tokens=totals.positions,
        **totals.summary(), layers=tuple(layers), modules=tuple(records), generations=tuple(generations),
        thresholds=spec.model_dump(mode="json"), failures=(), layouts=_count(quant.layouts.values()),
        activations=_count(quant.activations.values()), notes=tuple(notes))
    report = replace(report, failures=tuple(find_failures(report, spec)), seconds=time.perf_counter() - start)
    if out_dir is not None:
        report = write_report(report, out_dir)
    return report


def _run_layer(index, src, quant, layer_s, layer_q, hidden_src, hidden_q, records) -> LayerMetrics:
    """Run decoder layer `index` of both models on every prompt; advance both hidden-state lists in place."""
    from sm120_quant.verify.emulate import num_experts
    from sm120_quant.verify.metrics import LayerTotals

    totals = LayerTotals()
    quant.monitor.reset()
    outputs_src, outputs_local, routes_src, routes_local = [], [], [], []
    for h_s in hidden_src:
        y_s, r_s = src.run_layer(layer_s, h_s)
        y_l, r_l = quant.run_layer(layer_q, h_s)
        outputs_src.append(y_s)
        outputs_local.append(y_l)
        routes_src.append(r_s)
        routes_local.append(r_l)
    for p, h_q in enumerate(hidden_q):
        y_q, r_q = quant.run_layer(layer_q, h_q)
        totals.add(hidden_src[p], outputs_src[p], outputs_local[p], h_q, y_q)
        if routes_src[p] is not None:
            totals.add_routing(routes_src[p], routes_local[p], r_q, num_experts(layer_s))
        hidden_src[p], hidden_q[p] = outputs_src[p], y_q
    # Local passes first: a module that breaks on the source's hidden states is named before one that only breaks
    # on the quantized model's own (different routing sends other tokens to other experts).
    first_nonfinite = quant.monitor.first_nonfinite[0] if quant.monitor.first_nonfinite else None
    dead = tuple(quant.monitor.dead())
    quantized = [r for r in records if r.layout != "dense"]
    worst = max(quantized, key=lambda r: _sortable(r.error), default=None)
    dense = max((r for r in records if r.layout == "dense"), key=lambda r: _sortable(r.error), default=None)
    routed = totals.routed
    return LayerMetrics(
        index=index, kind="moe" if routes_src[0] is not None else "dense",
        local_error=totals.local_error(), stream_error=totals.stream_error(),
        routing_local=totals.routing_local / routed if routed else None,
        routing_stream=totals.routing_stream / routed if routed else None,
        weight_error=worst.error if worst else None, worst_module=worst.module if worst else None,
        dense_error=dense.error if dense else 0.0, dense_module=dense.module if dense and dense.error else None,
        nonfinite=totals.nonfinite_local + totals.nonfinite_stream, first_nonfinite_module=first_nonfinite,
        dead_modules=dead,
        expert_tokens=tuple(totals.expert_tokens.tolist()) if totals.expert_tokens is not None else None,
    )


def find_failures(report: VerifyReport, spec: VerifySpec) -> list[Failure]:
    """Every check the report fails, most specific first; each names the layer (and module) it blames."""
    failures = []
    layer_of = {m.index: m for m in report.layers}
    for rec in report.modules:
        for defect in rec.defects:
            failures.append(Failure("defect", f"{rec.module}: {defect}", _layer(rec.module), rec.module))
    for m in report.layers:
        if m.nonfinite:
            where = f" (first in {m.first_nonfinite_module})" if m.first_nonfinite_module else ""
            failures.append(Failure("nonfinite", f"layer {m.index}: {m.nonfinite} NaN/Inf value(s) in its output"
                                    f"{where}", m.index, m.first_nonfinite_module, float(m.nonfinite), 0.0))
        for module in m.dead_modules:
            failures.append(Failure("dead_module", f"{module}: every output is exactly zero", m.index, module))
    quantized = [r for r in report.modules if r.layout != "dense"]
    dense = [r for r in report.modules if r.layout == "dense"]
    for records, limit, what in (
        (quantized, spec.max_weight_error, "quantized weight"),
        # Norm weights are compared folded into their consumers, so this names the consumer a rescale missed.
        (dense, MAX_DENSE_ERROR, "unquantized tensor (times its input norm)"),
    ):
        bad = [r for r in records if not _within(r.error, limit)]
        if bad:
            worst = max(bad, key=lambda r: _sortable(r.error))
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            failures.append(Failure("weight_error", f"{worst.module}: {what} differs from the source by "
                                    f"{_fmt(worst.error)} (limit {limit:g}){more}", _layer(worst.module),
                                    worst.module, worst.error, limit))
    bad = [m for m in report.layers if not _within(m.local_error, spec.max_layer_error)]
    if bad:
        worst = max(bad, key=lambda m: _sortable(m.local_error))
        failures.append(Failure("layer_error", f"layer {worst.index}: local layer error {_fmt(worst.local_error)} > "
                                f"{spec.max_layer_error:g}", worst.index, worst.worst_module, worst.local_error,
                                spec.max_layer_error))
    routed = [m for m in report.layers if m.routing_local is not None]
    bad = [m for m in routed if not m.routing_local >= spec.min_routing_agreement]
    if bad:
        worst = min(bad, key=lambda m: m.routing_local)
        failures.append(Failure("routing_agreement", f"layer {worst.index}: {worst.routing_local:.1%} of tokens keep "
                                f"their top-k experts (< {spec.min_routing_agreement:.0%})", worst.index,
                                f"model.layers.{worst.index}.mlp.gate", worst.routing_local,
                                spec.min_routing_agreement))
    worst_layer = report.worst_layer
    blame = layer_of[worst_layer].worst_module if worst_layer is not None else None
    for name, value, limit, ok in (
        ("kl", report.kl, spec.max_kl, report.kl <= spec.max_kl),
        ("top1", report.top1, spec.min_top1, report.top1 >= spec.min_top1),
        ("cosine", report.cosine, spec.min_cosine, report.cosine >= spec.min_cosine),
    ):
        if not ok:
            failures.append(Failure(name, f"{name} {_fmt(value)} crosses {limit:g}; worst layer {worst_layer} (local "
                                    f"error {_fmt(layer_of[worst_layer].local_error)})", worst_layer, blame, value,
                                    limit))
    return failures


def write_report(report: VerifyReport, out_dir: Path) -> VerifyReport:
    """verify.json and verify.png into `out_dir`; returns the report with their paths in `files`."""
    import json

    from sm120_quant.verify.plot import plot_report

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / REPORT_JSON, out_dir / REPORT_PNG
    plot_report(report, png_path)
    report = replace(report, files=(str(json_path), str(png_path)))
    json_path.write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return report


# --------------------------------------------------------------------------------------------------------------------


def _check_architecture(quant_config: dict, source_config: dict, checkpoint: Path, source: Path) -> None:
    for key in _ARCH_KEYS:
        if quant_config.get(key) != source_config.get(key):
            raise UserError(f"{checkpoint}/config.json: {key} is {quant_config.get(key)!r} but the source {source} has "
                            f"{source_config.get(key)!r}; pass the model the checkpoint was quantized from")


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}: cannot load its tokenizer ({e.__class__.__name__}); the source folder needs "
                        "its tokenizer files") from None


def _encode(tokenizer, text: str, max_tokens: int):
    import torch

    return torch.tensor(tokenizer(text)["input_ids"][:max_tokens], dtype=torch.long)


def _fits_in_memory(folder: Path, dtype) -> bool:
    """Whether both models, dense in `dtype`, fit in the RAM share; from the source's stored (BF16) size."""
    import torch

    stored = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    dense = stored * torch.finfo(dtype).bits / 16
    return 2 * dense < _KEEP_IN_MEMORY_SHARE * _available_memory()


def _available_memory() -> int:
    import os

    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _generations(src, quant, tokenizer, prompts, n: int) -> list[Generation]:
    out = []
    for prompt in prompts:
        ids = _encode(tokenizer, prompt, 10**6)
        new_s, new_q = greedy(src, ids, n), greedy(quant, ids, n)
        same = 0
        while same < n and new_s[same] == new_q[same]:
            same += 1
        out.append(Generation(prompt, tokenizer.decode(new_s), tokenizer.decode(new_q), same))
    return out


def greedy(side, ids, n: int) -> list[int]:
    """`n` greedy tokens after `ids`, recomputing the whole sequence each step (no KV cache: the emulated layers are
    the same objects the metrics ran through)."""
    import torch

    seq = ids.clone()
    new = []
    for _ in range(n):
        hidden = side.embed(seq)
        for index in range(side.num_layers):
            hidden = side.run_layer(side.layer(index), hidden)[0]
        token = int(side.head(hidden)[-1].argmax())
        new.append(token)
        seq = torch.cat([seq, torch.tensor([token])])
    return new


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() else None


def _within(value: float, limit: float) -> bool:
    return value <= limit  # False for NaN


def _sortable(value: float) -> float:
    return math.inf if math.isnan(value) else value


def _fmt(value: float) -> str:
    return "NaN" if math.isnan(value) else f"{value:.4g}"


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return dict(sorted(counts.items()))


def _finite_or_none(obj):
    """JSON has no NaN or Infinity: non-finite numbers become null (the report's failures say what they were)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj
