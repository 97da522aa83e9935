"""AWQ-lite smoothing that folds exactly, so the export is plain NVFP4 and MoE routing is unchanged.

ModelOpt's AWQ-lite on GLM MoE (0.47) leaves `pre_quant_scale` tensors vLLM does not load, labels the export
MIXED_PRECISION, gives fused experts no search at all, and folds the shared expert's scale into
`post_attention_layernorm` without compensating the router or the routed experts (5-16% of tokens change expert
set). Here every consumer of one input shares one scale vector, and the scale is folded into the BF16 model
*before* calibration:

| group     | scale divides                      | scale multiplies (columns)                                   |
|-----------|------------------------------------|--------------------------------------------------------------|
| attn_in   | input_layernorm.weight             | q/k/v_proj (MLA: q_a_proj, kv_a_proj_with_mqa)               |
| q_b_in    | q_a_layernorm.weight (MLA)         | q_b_proj                                                     |
| kv_b_in   | kv_a_layernorm.weight (MLA)        | kv_b_proj                                                    |
| attn_out  | v_proj rows and bias (GQA)         | o_proj, one scale per KV-head channel shared by its q heads |
| mlp_in    | post_attention_layernorm.weight    | router (BF16, compensated), shared and routed gate/up_proj   |
| mlp_out   | up_proj rows (each MLP / expert)   | its down_proj                                                |

Scales are powers of two. Multiplying or dividing a bf16 (or fp32) number by 2^k is exact, so the smoothed BF16
model computes bit for bit what the source computes: the same logits, the same router scores, the same experts.
Only quantization sees the difference, which is the point. Then plain NVFP4 max calibration runs on the smoothed
model. MLA's o_proj is left to max calibration: its input is not a per-channel image of one quantized projection
we could fold into without touching the latent cache layout.

The search is AWQ-lite's: per group, candidate scales `s = mean|x|^alpha` (normalized, rounded to a power of two)
for alpha on a grid including 0 (s = 1, i.e. no smoothing), and the candidate with the least output error of the
fake-quantized (W4A4) consumers on captured calibration inputs wins. alpha = 0 is always a candidate, so on the
calibration data a group is never worse than max calibration.

Captured inputs of one GLM-4.7 layer take ~4.5 GB (2048 rows for each of 160 experts' gate and down inputs), so
the search runs in passes over consecutive layers sized to a memory budget, each pass stopping after its last
layer. Because every fold is exact, smoothing earlier layers does not change what later layers see: the passes
find what one pass over all layers would.
"""

from __future__ import annotations

import fnmatch
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from sm120_quant.quantize.formats import fake_quant_nvfp4

ALPHAS = tuple(i / 10 for i in range(11))
MAX_EXPONENT = 8  # scales within 2^-8 .. 2^8: far from bf16's range limits, wide enough for activation outliers
CAPTURE_ROWS = 2048  # calibration rows kept per consumer for the search
CPU_CAPTURE_BUDGET = 8 << 30  # bytes of captured inputs per pass on CPU; on CUDA a quarter of the free memory


@dataclass
class Group:
    name: str
    layer: int
    owner: str  # norm (weight divided) or projection (rows divided)
    owner_kind: str  # "norm" | "rows"
    consumers: list[str]  # linears whose columns are multiplied and whose quantization error is minimized
    compensate: list[str] = field(default_factory=list)  # BF16 linears multiplied too, for exactness only
    heads_per_kv: int = 1  # attn_out: each v channel feeds this many o_proj channels (GQA)
    head_dim: int = 0


@dataclass(frozen=True)
class GroupResult:
    name: str
    alpha: float
    exponent_range: tuple[int, int]
    loss_ratio: float  # chosen output error / unsmoothed output error, on the captured inputs

    def to_dict(self) -> dict:
        return {"group": self.name, "alpha": self.alpha, "log2_scale_range": list(self.exponent_range),
                "loss_ratio": self.loss_ratio}


def find_groups(model: nn.Module, excluded: list[str]) -> list[Group]:
    """The smoothing groups of every decoder layer of a GLM-4.7 / GLM-4.7-Flash (or DeepSeek-like) model with
    expanded experts."""
    groups: list[Group] = []
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        attn = layer.self_attn
        if hasattr(attn, "kv_a_proj_with_mqa"):
            groups.append(Group(f"{p}.attn_in", i, f"{p}.input_layernorm", "norm",
                                [f"{p}.self_attn.q_a_proj", f"{p}.self_attn.kv_a_proj_with_mqa"]))
            groups.append(Group(f"{p}.q_b_in", i, f"{p}.self_attn.q_a_layernorm", "norm",
                                [f"{p}.self_attn.q_b_proj"]))
            groups.append(Group(f"{p}.kv_b_in", i, f"{p}.self_attn.kv_a_layernorm", "norm",
                                [f"{p}.self_attn.kv_b_proj"]))
        else:
            groups.append(Group(f"{p}.attn_in", i, f"{p}.input_layernorm", "norm",
                                [f"{p}.self_attn.{n}_proj" for n in "qkv"]))
            heads = attn.o_proj.in_features // attn.head_dim
            kv_heads = attn.v_proj.out_features // attn.head_dim
            groups.append(Group(f"{p}.attn_out", i, f"{p}.self_attn.v_proj", "rows", [f"{p}.self_attn.o_proj"],
                                heads_per_kv=heads // kv_heads, head_dim=attn.head_dim))
        mlp = layer.mlp
        mlps = []
        if hasattr(mlp, "experts"):
            if not isinstance(mlp.experts, nn.ModuleList):
                raise ValueError(f"{p}.mlp.experts: AWQ smoothing needs expanded experts (moe.expand_experts: true)")
            mlps = [f"{p}.mlp.shared_experts"] + [f"{p}.mlp.experts.{e}" for e in range(len(mlp.experts))]
            groups.append(Group(f"{p}.mlp_in", i, f"{p}.post_attention_layernorm", "norm",
                                [f"{m}.{n}_proj" for m in mlps for n in ("gate", "up")], [f"{p}.mlp.gate"]))
        else:
            mlps = [f"{p}.mlp"]
            groups.append(Group(f"{p}.mlp_in", i, f"{p}.post_attention_layernorm", "norm",
                                [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]))
        groups.extend(Group(f"{m}.mlp_out", i, f"{m}.up_proj", "rows", [f"{m}.down_proj"]) for m in mlps)
    for g in groups:
        # An excluded (BF16) consumer is still rescaled, for exactness, but its error is not ours to minimize.
        kept = [c for c in g.consumers if not _excluded(c, excluded)]
        g.compensate += [c for c in g.consumers if c not in kept]
        g.consumers = kept
    return [g for g in groups if g.consumers and not _excluded(g.owner, excluded)]


def _excluded(module: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(module, p) or fnmatch.fnmatchcase(module + ".", p) for p in patterns)


@dataclass(frozen=True)
class Smoothing:
    groups: list[GroupResult]
    passes: int  # calibration passes the search took (layers are captured in memory-sized chunks)


def smooth(model: nn.Module, forward_loop, excluded: list[str], capture_rows: int = CAPTURE_ROWS,
           capture_budget: int | None = None) -> Smoothing:
    """Search and fold AWQ-lite scales into `model` in place; one result per group (groups whose consumers no
    calibration token reached, such as an expert never routed to, keep scale 1). `capture_budget` bounds the bytes
    of inputs captured per calibration pass (default: CPU_CAPTURE_BUDGET, or a quarter of free CUDA memory)."""
    groups = find_groups(model, excluded)
    budget = capture_budget if capture_budget is not None else _default_budget(model)
    chunks = _layer_chunks(model, groups, capture_rows, budget)
    results = []
    for chunk in chunks:
        consumers = sorted({c for g in chunk for c in g.consumers})
        with _first_layers(model, chunk[-1].layer + 1):
            captured = _capture_inputs(model, consumers, forward_loop, capture_rows)
        for g in chunk:
            inputs = {c: captured[c] for c in g.consumers if c in captured}
            if not inputs:
                continue  # no calibration token reached any consumer (an unrouted expert): nothing to fit
            scale, result = _search(model, g, inputs)
            _fold(model, g, scale)
            results.append(result)
        del captured  # before the next pass captures its chunk: two chunks at once would break the budget
    return Smoothing(results, len(chunks))


def _default_budget(model: nn.Module) -> int:
    device = next(model.parameters()).device
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 4
    return CPU_CAPTURE_BUDGET


def _capture_bytes(model: nn.Module, groups: list[Group], capture_rows: int) -> int:
    owners = {_input_owner(c) for g in groups for c in g.consumers}
    weights = [model.get_submodule(o).weight for o in owners]
    return sum(capture_rows * w.shape[1] * w.element_size() for w in weights)


def _layer_chunks(model: nn.Module, groups: list[Group], capture_rows: int, budget: int) -> list[list[Group]]:
    """Consecutive layers' groups, as many layers per chunk as fit the budget (at least one)."""
    by_layer: dict[int, list[Group]] = {}
    for g in groups:
        by_layer.setdefault(g.layer, []).append(g)
    chunks: list[list[Group]] = []
    used = 0
    for layer in sorted(by_layer):
        size = _capture_bytes(model, by_layer[layer], capture_rows)
        if not chunks or used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].extend(by_layer[layer])
        used += size
    return chunks


@contextmanager
def _first_layers(model: nn.Module, count: int):
    """The model runs only its first `count` decoder layers (then its final norm and head): a pass that captures
    a chunk of layers has no use for the layers after it."""
    layers = model.model.layers
    model.model.layers = nn.ModuleList(list(layers)[:count])
    try:
        yield
    finally:
        model.model.layers = layers


# Siblings that read the same input as the first projection of their module: captured once, shared.
_SAME_INPUT_AS = {"up_proj": "gate_proj", "k_proj": "q_proj", "v_proj": "q_proj", "kv_a_proj_with_mqa": "q_a_proj"}


def _input_owner(name: str) -> str:
    parent, _, leaf = name.rpartition(".")
    return f"{parent}.{_SAME_INPUT_AS[leaf]}" if leaf in _SAME_INPUT_AS else name


def _capture_inputs(model: nn.Module, names: list[str], forward_loop, capture_rows: int
                    ) -> dict[str, torch.Tensor]:
    """Up to `capture_rows` input rows of every consumer, kept in the model's dtype on its device."""
    owners = sorted({_input_owner(n) for n in names})
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in owners}
    rows: dict[str, int] = {n: 0 for n in owners}

    def hook(name):
        def pre(module, args):
            if rows[name] >= capture_rows:
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1])[: capture_rows - rows[name]]
            captured[name].append(x.clone())
            rows[name] += x.shape[0]
        return pre

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in owners]
    try:
        forward_loop(model)
    finally:
        for h in handles:
            h.remove()
    by_owner = {n: torch.cat(v) for n, v in captured.items() if v}
    return {n: by_owner[_input_owner(n)] for n in names if _input_owner(n) in by_owner}


def _channel_scale(g: Group, inputs: dict[str, torch.Tensor], alpha: float) -> torch.Tensor:
    """Per input channel of the consumers, a power-of-two scale from mean |x| ^ alpha."""
    # Identical tensors (siblings sharing one capture) count once.
    x = torch.cat(list({id(t): t for t in inputs.values()}.values())).float()
    mean = x.abs().mean(dim=0).clamp(min=1e-8)
    if g.heads_per_kv > 1:
        # o_proj channel (head h, dim d) reads v channel (h // heads_per_kv, d): one scale per v channel.
        kv = mean.reshape(-1, g.heads_per_kv, g.head_dim).amax(dim=1)
        mean = kv.repeat_interleave(g.heads_per_kv, dim=0).reshape(-1)
    s = mean.pow(alpha)
    s = s / (s.max() * s.min()).sqrt()
    return torch.exp2(torch.log2(s).round().clamp(-MAX_EXPONENT, MAX_EXPONENT))


def _group_loss(model, g: Group, inputs: dict[str, torch.Tensor], s: torch.Tensor) -> float:
    """Summed squared output error of the W4A4 fake-quantized consumers with smoothing `s`."""
    total = 0.0
    # Siblings sharing one captured input (gate/up, q/k/v) come one after the other: only the current input's fp32
    # copies are kept (all of a layer's experts at once would take ~13 GB at GLM-4.7 dimensions).
    current = None
    for name, x in inputs.items():
        w = model.get_submodule(name).weight.detach().float()
        s = s.to(w.device)
        if current is None or current[0] is not x:
            xf = x.float()
            xs = xf / s
            current = (x, xf, fake_quant_nvfp4(xs, xs.abs().amax()))
        _, xf, xq = current
        ws = w * s
        total += float((xq @ fake_quant_nvfp4(ws, ws.abs().amax()).T - xf @ w.T).pow(2).sum())
    return total


def _search(model, g: Group, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, GroupResult]:
    best = None
    baseline = None
    tried: set[bytes] = set()
    for alpha in ALPHAS:
        s = _channel_scale(g, inputs, alpha)
        key = s.cpu().numpy().tobytes()
        if key in tried:
            continue
        tried.add(key)
        loss = _group_loss(model, g, inputs, s)
        if alpha == 0.0:
            baseline = loss
        if best is None or loss < best[0]:
            best = (loss, alpha, s)
    loss, alpha, s = best
    exps = torch.log2(s)
    ratio = loss / baseline if baseline else 1.0
    return s, GroupResult(g.name, alpha, (int(exps.min()), int(exps.max())), ratio)


def _fold(model: nn.Module, g: Group, s: torch.Tensor) -> None:
    """Divide the owner by s and multiply every consumer's (and compensated module's) columns by s, in place."""
    with torch.no_grad():
        owner = model.get_submodule(g.owner)
        if g.owner_kind == "norm":
            owner.weight.div_(s.to(owner.weight.device, owner.weight.dtype))
        else:
            rows = s if g.heads_per_kv == 1 else s.reshape(-1, g.heads_per_kv, g.head_dim)[:, 0].reshape(-1)
            owner.weight.div_(rows.to(owner.weight.device, owner.weight.dtype)[:, None])
            if getattr(owner, "bias", None) is not None:
                owner.bias.div_(rows.to(owner.bias.device, owner.bias.dtype))
        for name in g.consumers + g.compensate:
            w = model.get_submodule(name).weight
            w.mul_(s.to(w.device, w.dtype))


def describe(smoothing: Smoothing) -> str:
    results = smoothing.groups
    if not results:
        return "AWQ-lite: no group had calibration inputs"
    smoothed = sum(1 for r in results if r.alpha > 0)
    mean_ratio = math.fsum(r.loss_ratio for r in results) / len(results)
    return (f"AWQ-lite: {smoothed}/{len(results)} groups smoothed with power-of-two scales folded into the BF16 "
            f"model ({smoothing.passes} calibration pass{'es' if smoothing.passes > 1 else ''}); mean output-error "
            f"ratio vs max calibration {mean_ratio:.3f}")
