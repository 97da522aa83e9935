"""Which routed experts the calibration data reached, and a way to reach all of them.

`ExpertCoverage` counts, with forward hooks on the routers, the calibration tokens natural top-k routing sends to
every (MoE layer, routed expert). It hooks transformers' `Glm4MoeTopkRouter`, `Glm4MoeLiteTopkRouter` and
`GlmMoeDsaTopkRouter` (the `mlp.gate` of GLM-4.x, GLM-4.7-Flash and GLM-5.1), whose forward returns
`(router_logits, topk_weights, topk_indices)`.
Padding is not counted: a forward pre-hook on the model keeps the batch's 2-D attention mask and the router hook
drops the masked positions. A router called outside a full-model forward (an engine that runs decoder layers one by
one) counts every position it sees.

`calibrate_all_experts(model)` makes every calibration token also go through every expert, for statistics, while
the layer output stays the top-k output.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Self

import torch
from torch import nn

from sm120_quant.errors import CheckFailed, UserError
from sm120_quant.recipes.calibration import CoveragePolicy

LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
MAX_NAMED = 20
# The eager experts forward builds a one-hot of [tokens, k, E] int64; for the unrouted experts k is E - top_k,
# which for GLM-4.7 (160 experts) is 160x the routed call's. Tokens are fed in chunks that keep it under this.
ONE_HOT_BUDGET_BYTES = 256 * 2**20


def router_types() -> tuple[type[nn.Module], ...]:
    """The routers whose forward returns (router_logits, topk_weights, topk_indices [tokens, top_k])."""
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter
    from transformers.models.glm4_moe_lite.modeling_glm4_moe_lite import Glm4MoeLiteTopkRouter
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaTopkRouter

    return (Glm4MoeTopkRouter, Glm4MoeLiteTopkRouter, GlmMoeDsaTopkRouter)


@dataclass(frozen=True)
class MoELayer:
    layer: int
    name: str  # qualified name of the MoE block, e.g. model.layers.1.mlp
    block: nn.Module  # has .gate (the router) and .experts
    num_experts: int
    top_k: int


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE block with a known router, in layer order; a model without one is a user error."""
    routers = router_types()
    found = []
    for name, module in model.named_modules():
        gate = getattr(module, "gate", None)
        if isinstance(gate, routers) and hasattr(module, "experts"):
            match = LAYER_INDEX.search(name + ".")
            layer = int(match.group(1)) if match else len(found)
            found.append(MoELayer(layer, name, module, gate.num_experts, gate.top_k))
    if not found:
        raise UserError(f"{type(model).__name__}: no Glm4Moe/Glm4MoeLite/GlmMoeDsa MoE router found, so expert "
                        "coverage cannot be measured; it supports GLM-4.x, GLM-4.7-Flash and GLM-5.1 (transformers "
                        "modeling)")
    return sorted(found, key=lambda m: m.layer)


class _MaskTracker:
    """Keeps the 2-D attention mask of the model forward in progress, so hooks deeper down can skip padding."""

    def __init__(self, model: nn.Module):
        self.mask: torch.Tensor | None = None
        self._handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post, always_call=True),
        ]

    def _pre(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _post(self, module, args, output) -> None:
        self.mask = None

    def keep(self, num_tokens: int) -> torch.Tensor | None:
        """Boolean [num_tokens] of real tokens, or None when every position counts."""
        if self.mask is None or self.mask.numel() != num_tokens:
            return None
        return self.mask.reshape(-1).bool()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class ScaleSource(str, Enum):
    """Where an expert's input statistics come from after calibration.

    routed: at least min_tokens tokens reached it through natural top-k routing.
    few_tokens: natural routing gave it 1..min_tokens-1 tokens; real but thin statistics.
    all_tokens: calibrate_all ran every calibration token through it.
    fallback: no token reached it; the engine's fallback (weight-derived or shared scale) applies.
    """

    ROUTED = "routed"
    FEW_TOKENS = "few_tokens"
    ALL_TOKENS = "all_tokens"
    FALLBACK = "fallback"


@dataclass(frozen=True)
class CoverageTable:
    """Tokens routed to each expert: counts[i][e] for MoE layer layers[i]; tokens[i] real tokens seen there."""

    layers: tuple[int, ...]
    counts: tuple[tuple[int, ...], ...]
    tokens: tuple[int, ...]
    top_k: int

    def under(self, min_tokens: int) -> list[tuple[int, int, int]]:
        """(layer, expert, tokens) of every expert routed fewer than min_tokens tokens."""
        return [(layer, e, n) for layer, row in zip(self.layers, self.counts, strict=True)
                for e, n in enumerate(row) if n < min_tokens]

    def scale_sources(self, policy: CoveragePolicy, min_tokens: int) -> dict[tuple[int, int], ScaleSource]:
        out = {}
        for layer, row in zip(self.layers, self.counts, strict=True):
            for e, n in enumerate(row):
                if n >= min_tokens:
                    out[layer, e] = ScaleSource.ROUTED
                elif policy is CoveragePolicy.CALIBRATE_ALL:
                    out[layer, e] = ScaleSource.ALL_TOKENS
                else:
                    out[layer, e] = ScaleSource.FEW_TOKENS if n else ScaleSource.FALLBACK
        return out

    def to_markdown(self, min_tokens: int) -> str:
        """One row per MoE layer: tokens, min/median/max per expert, and the experts under min_tokens."""
        lines = [f"| layer | tokens | min | median | max | experts < {min_tokens} |", "|---|---|---|---|---|---|"]
        for layer, row, tokens in zip(self.layers, self.counts, self.tokens, strict=True):
            ordered = sorted(row)
            low = [f"{e} ({n})" for e, n in enumerate(row) if n < min_tokens]
            lines.append(f"| {layer} | {tokens} | {ordered[0]} | {ordered[len(row) // 2]} | {ordered[-1]} | "
                         f"{', '.join(low) or '-'} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"top_k": self.top_k,
                "layers": {str(layer): {"tokens": t, "per_expert": list(row)}
                           for layer, row, t in zip(self.layers, self.counts, self.tokens, strict=True)}}


@dataclass(frozen=True)
class CoverageCheck:
    """The verdict of `check_coverage`: what the report states about every expert's input statistics."""

    table: CoverageTable
    policy: CoveragePolicy
    min_tokens: int
    under: tuple[tuple[int, int, int], ...]
    sources: dict[tuple[int, int], ScaleSource]

    def to_dict(self) -> dict[str, Any]:
        by_source: dict[str, list[str]] = {s.value: [] for s in ScaleSource}
        for (layer, e), s in sorted(self.sources.items()):
            by_source[s.value].append(f"{layer}.{e}")
        return {"policy": self.policy.value, "min_tokens": self.min_tokens,
                "under": [{"layer": layer, "expert": e, "tokens": n} for layer, e, n in self.under],
                "scale_sources": {s: {"count": len(v), "experts": v if s != ScaleSource.ROUTED.value else []}
                                  for s, v in by_source.items()},
                **self.table.to_dict()}


def describe_under(under: list[tuple[int, int, int]] | tuple[tuple[int, int, int], ...], min_tokens: int) -> str:
    named = ", ".join(f"layer {layer} expert {e} ({n} tokens)" for layer, e, n in under[:MAX_NAMED])
    more = f" and {len(under) - MAX_NAMED} more" if len(under) > MAX_NAMED else ""
    return f"{len(under)} routed experts got fewer than {min_tokens} calibration tokens: {named}{more}"


def check_coverage(table: CoverageTable, policy: CoveragePolicy, min_tokens: int) -> CoverageCheck:
    """Apply the recipe's coverage policy; under `fail`, an under-covered expert raises CheckFailed naming it."""
    under = table.under(min_tokens)
    if under and policy is CoveragePolicy.FAIL:
        raise CheckFailed(f"expert coverage: {describe_under(under, min_tokens)}; add calibration data, or set "
                          "calibration.coverage.policy to calibrate_all (or warn)")
    return CoverageCheck(table, policy, min_tokens, tuple(under), table.scale_sources(policy, min_tokens))


class RoutedTokens:
    """Routed tokens per (MoE layer, expert), fed with each router's top-k indices by the caller's hooks."""

    def __init__(self, layers: list[MoELayer]):
        self.layers = layers
        self._counts: dict[int, torch.Tensor] = {}
        self._tokens: dict[int, int] = {}

    def add(self, moe: MoELayer, topk_indices: torch.Tensor) -> None:
        """`topk_indices` [tokens, top_k]: one row per real (unpadded) token."""
        counts = torch.bincount(topk_indices.reshape(-1), minlength=moe.num_experts)
        previous = self._counts.get(moe.layer)
        # Counted on the router's device; moved to the CPU only when a table is asked for.
        self._counts[moe.layer] = counts if previous is None else previous + counts.to(previous.device)
        self._tokens[moe.layer] = self._tokens.get(moe.layer, 0) + topk_indices.shape[0]

    def table(self) -> CoverageTable:
        rows = []
        for m in self.layers:
            counts = self._counts.get(m.layer)
            rows.append(tuple(counts.cpu().tolist()) if counts is not None else (0,) * m.num_experts)
        return CoverageTable(tuple(m.layer for m in self.layers), tuple(rows),
                             tuple(self._tokens.get(m.layer, 0) for m in self.layers), self.layers[0].top_k)


class ExpertCoverage:
    """Counts calibration tokens per (MoE layer, routed expert) while attached (use as a context manager)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = moe_layers(model)
        self._routed = RoutedTokens(self.layers)
        self._mask: _MaskTracker | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> Self:
        self._mask = _MaskTracker(self.model)
        self._handles = [m.block.gate.register_forward_hook(self._counter(m)) for m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._mask is not None:
            self._mask.remove()
            self._mask = None

    def _counter(self, moe: MoELayer):
        def hook(module, args, output) -> None:
            topk_indices = output[2].reshape(-1, moe.top_k)
            keep = self._mask.keep(topk_indices.shape[0])
            if keep is not None:
                topk_indices = topk_indices[keep.to(topk_indices.device)]
            self._routed.add(moe, topk_indices)

        return hook

    def coverage_table(self) -> CoverageTable:
        return self._routed.table()

    def check_coverage(self, policy: CoveragePolicy, min_tokens: int) -> CoverageCheck:
        return check_coverage(self.coverage_table(), policy, min_tokens)

    def save_heatmap(self, path: Path, min_tokens: int | None = None) -> Path:
        return save_heatmap(self.coverage_table(), path, min_tokens)


def save_heatmap(table: CoverageTable, path: Path, min_tokens: int | None = None) -> Path:
    """A PNG of log10(1 + tokens) per layer (rows) and expert (columns); experts under min_tokens get a red x."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = torch.tensor(table.counts, dtype=torch.float64)
    n_layers, n_experts = counts.shape
    fig = Figure(figsize=(min(40.0, 3 + n_experts * 0.12), min(40.0, 2 + n_layers * 0.18)), dpi=100)
    FigureCanvasAgg(fig)  # no pyplot: the global backend of the caller's process stays untouched
    ax = fig.add_subplot()
    image = ax.imshow(torch.log10(counts + 1).numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(image, ax=ax, label="log10(1 + tokens routed)")
    ax.set_xlabel("routed expert")
    ax.set_ylabel("decoder layer")
    step = max(1, math.ceil(n_layers / 40))
    ax.set_yticks(range(0, n_layers, step), [str(layer) for layer in table.layers[::step]])
    title = f"expert coverage: {sum(table.tokens)} token-layer visits, top-{table.top_k}"
    if min_tokens is not None:
        low = table.under(min_tokens)
        if low:
            row = {layer: i for i, layer in enumerate(table.layers)}
            ax.scatter([e for _, e, _ in low], [row[layer] for layer, _, _ in low], marker="x", c="red", s=12)
        title += f"; {len(low)} experts < {min_tokens} tokens (x)"
    ax.set_title(title, fontsize=9)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _unrouted(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """For each token, the experts its top-k did not pick, ascending: [tokens, num_experts - k]."""
    tokens, k = top_k_index.shape
    routed = torch.zeros(tokens, num_experts, dtype=torch.bool, device=top_k_index.device)
    routed.scatter_(1, top_k_index, True)
    every = torch.arange(num_experts, device=top_k_index.device).expand(tokens, num_experts)
    return every[~routed].reshape(tokens, num_experts - k)


@contextmanager
def calibrate_all_experts(model: nn.Module) -> Iterator[list[MoELayer]]:
    """While active, every real calibration token goes through every routed expert; layer outputs do not change.

    How: a forward hook on each MoE block's `experts` module runs, after the normal top-k call, one more call of
    the same module's `forward(hidden_states, unrouted_index, zero_weights)` where unrouted_index lists for every
    token the experts its top-k skipped. Each (token, expert) pair is thus seen exactly once: routed pairs in the
    normal call, the rest in the extra call, whose output is discarded. The layer output is the normal call's,
    bit for bit, because nothing touches it.

    Supported structure: a MoE block whose `gate` is one of `router_types()` and whose `experts` module is called as
    `experts(hidden_states [T, H], top_k_index [T, k] int, top_k_weights [T, k])` and runs only the experts named in
    top_k_index. That holds for transformers' fused `Glm4MoeExperts`/`Glm4MoeLiteExperts`/`GlmMoeDsaExperts` (3-D
    gate_up_proj/down_proj; eager experts implementation, which ModelOpt forces), for ModelOpt's `_QuantFusedExperts`
    wrapper of them (it intercepts F.linear inside that forward, so its per-expert weight quantizers and shared input
    quantizers see the extra tokens), and for sm120_quant's `ExpandedExperts` (per-expert
    `experts.N.gate_proj/up_proj/down_proj` nn.Linear, each with its own input quantizer once quantized).
    The extra call goes through `module.forward`, so wrappers that replace `forward` (ModelOpt, accelerate offload
    hooks) apply, while nn.Module hooks on the experts module (including this one) are not re-entered.
    Padding positions (from the model forward's 2-D attention mask) are not sent to extra experts.
    """
    layers = moe_layers(model)
    mask = _MaskTracker(model)

    def hook_for(moe: MoELayer):
        def hook(module, args, kwargs, output) -> None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            weights = kwargs.get("top_k_weights", args[2] if len(args) > 2 else None)
            if moe.num_experts == index.shape[-1]:
                return
            rest = _unrouted(index, moe.num_experts)
            keep = mask.keep(rest.shape[0])
            if keep is not None:
                keep = keep.to(rest.device)
                hidden, rest = hidden[keep], rest[keep]
            zeros = torch.zeros(rest.shape, dtype=weights.dtype, device=weights.device)
            chunk = max(1, ONE_HOT_BUDGET_BYTES // (rest.shape[1] * moe.num_experts * 8))
            with torch.no_grad():
                for start in range(0, rest.shape[0], chunk):
                    module.forward(hidden[start:start + chunk], rest[start:start + chunk],
                                   zeros[start:start + chunk])

        return hook

    handles = [m.block.experts.register_forward_hook(hook_for(m), with_kwargs=True) for m in layers]
    try:
        yield layers
    finally:
        for h in handles:
            h.remove()
        mask.remove()
