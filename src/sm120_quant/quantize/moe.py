"""Expand fused MoE experts (transformers 5: 3-D `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`) into
per-expert `gate_proj` / `up_proj` / `down_proj` nn.Linear modules.

With per-expert Linears every expert gets its own weight and input quantizers and its own calibration statistics, and
the module names are the hub's per-expert tensor names (`mlp.experts.N.gate_proj.weight`), which is what vLLM loads.
"""

from __future__ import annotations

import torch
from torch import nn


class ExpertMLP(nn.Module):
    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act_fn):
        super().__init__()
        self.gate_proj = _linear(gate)
        self.up_proj = _linear(up)
        self.down_proj = _linear(down)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpandedExperts(nn.ModuleList):
    """Drop-in replacement for a fused experts module: same `forward(hidden, top_k_index, top_k_weights)` math,
    children named `0..E-1` so state-dict names are the per-expert hub names."""

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)
        self.num_experts = len(experts)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for (e,) in hit.tolist():
            top_k_pos, token_idx = torch.where(mask[e])
            y = self[e](hidden_states[token_idx]) * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    return layer


def is_fused_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
            and gate_up.dim() == 3 and down.dim() == 3 and gate_up.shape[0] == down.shape[0]
            and gate_up.shape[1] == 2 * down.shape[2])


def expand_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module in place; returns the names of the replaced modules."""
    targets = [(name, m) for name, m in model.named_modules() if is_fused_experts(m)]
    for name, fused in targets:
        inter = fused.down_proj.shape[2]
        experts = [
            ExpertMLP(fused.gate_up_proj[e, :inter], fused.gate_up_proj[e, inter:], fused.down_proj[e], fused.act_fn)
            for e in range(fused.gate_up_proj.shape[0])
        ]
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, ExpandedExperts(experts))
    return [name for name, _ in targets]
