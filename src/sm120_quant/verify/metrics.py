"""The numbers `quantize verify` reports, as small pure functions over tensors, plus the running sums that let a
layer-by-layer pass add them up over prompts of different lengths.

Definitions (s = source model, q = quantized model, per next-token position t of every held-out prompt):

- logits cosine: cos(logits_s[t], logits_q[t]); the report gives the mean over positions and the minimum.
- KL: KL(P_s || P_q) = sum_v P_s(v) (log P_s(v) - log P_q(v)) in nats, P = softmax(logits); mean and maximum.
- top-1 agreement: the fraction of positions where argmax logits_s[t] == argmax logits_q[t].
- perplexity: exp(mean over positions of -log P(token[t+1] | tokens[..t])), for each model on the same text.
- routing agreement (per MoE layer): the fraction of tokens whose set of top-k experts is the same in both models.
- layer error, local (per decoder layer): ||y_q(x_s) - y_s(x_s)|| / ||y_s(x_s) - x_s||, Frobenius over all tokens,
  where x_s is the source model's input to the layer and y its output: the quantized layer's error relative to what
  the layer adds to the residual stream, with every earlier layer exact. This is what names a broken layer.
- layer error, stream (per decoder layer): ||h_q - h_s|| / ||h_s|| after the layer, each model on its own hidden
  states: the error accumulated up to that layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenStats:
    cosine: torch.Tensor  # [T]
    kl: torch.Tensor  # [T]
    top1: torch.Tensor  # [T] bool
    nll_source: torch.Tensor  # [T-1]
    nll_quantized: torch.Tensor  # [T-1]


def token_stats(logits_source: torch.Tensor, logits_quantized: torch.Tensor, ids: torch.Tensor) -> TokenStats:
    """Per-position metrics of one sequence: logits [T, V] of both models and the sequence's token ids [T]."""
    s, q = logits_source.double(), logits_quantized.double()
    logp_s, logp_q = torch.log_softmax(s, -1), torch.log_softmax(q, -1)
    targets = ids[1:].to(s.device)[:, None]
    return TokenStats(
        cosine=torch.nn.functional.cosine_similarity(s, q, dim=-1),
        kl=(logp_s.exp() * (logp_s - logp_q)).sum(-1),
        top1=s.argmax(-1) == q.argmax(-1),
        nll_source=-logp_s[:-1].gather(1, targets)[:, 0],
        nll_quantized=-logp_q[:-1].gather(1, targets)[:, 0],
    )


def same_expert_sets(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Which rows of two top-k index tensors [N, k] hold the same set of experts (order does not matter)."""
    return (a.sort(-1).values == b.sort(-1).values).all(-1)


@dataclass
class TokenTotals:
    positions: int = 0
    predicted: int = 0
    cosine_sum: float = 0.0
    cosine_min: float = math.inf
    kl_sum: float = 0.0
    kl_max: float = -math.inf
    top1: int = 0
    nll_source: float = 0.0
    nll_quantized: float = 0.0

    def add(self, stats: TokenStats) -> None:
        self.positions += stats.cosine.numel()
        self.predicted += stats.nll_source.numel()
        self.cosine_sum += float(stats.cosine.sum())
        self.cosine_min = _sticky(min, self.cosine_min, float(stats.cosine.min()))
        self.kl_sum += float(stats.kl.sum())
        self.kl_max = _sticky(max, self.kl_max, float(stats.kl.max()))
        self.top1 += int(stats.top1.sum())
        self.nll_source += float(stats.nll_source.sum())
        self.nll_quantized += float(stats.nll_quantized.sum())

    def summary(self) -> dict[str, float]:
        return {
            "cosine": self.cosine_sum / self.positions,
            "cosine_min": self.cosine_min,
            "kl": self.kl_sum / self.positions,
            "kl_max": self.kl_max,
            "top1": self.top1 / self.positions,
            "ppl_source": math.exp(self.nll_source / self.predicted),
            "ppl_quantized": _exp(self.nll_quantized / self.predicted),
        }


@dataclass
class LayerTotals:
    local_error2: float = 0.0
    local_update2: float = 0.0
    stream_error2: float = 0.0
    stream_norm2: float = 0.0
    routed: int = 0
    routing_local: int = 0
    routing_stream: int = 0
    nonfinite_local: int = 0
    nonfinite_stream: int = 0
    expert_tokens: torch.Tensor | None = None  # per expert: how often the source model picks it

    def add(self, x_source: torch.Tensor, y_source: torch.Tensor, y_local: torch.Tensor, x_stream: torch.Tensor,
            y_stream: torch.Tensor) -> None:
        self.local_error2 += _sq(y_local - y_source)
        self.local_update2 += _sq(y_source - x_source)
        self.stream_error2 += _sq(y_stream - y_source)
        self.stream_norm2 += _sq(y_source)
        self.nonfinite_local += int((~torch.isfinite(y_local)).sum())
        if bool(torch.isfinite(x_stream).all()):  # NaN carried in from an earlier layer is that layer's finding
            self.nonfinite_stream += int((~torch.isfinite(y_stream)).sum())

    def add_routing(self, source: torch.Tensor, local: torch.Tensor, stream: torch.Tensor, experts: int) -> None:
        self.routed += source.shape[0]
        counts = torch.bincount(source.flatten().cpu(), minlength=experts)
        self.expert_tokens = counts if self.expert_tokens is None else self.expert_tokens + counts
        self.routing_local += int(same_expert_sets(source, local).sum())
        self.routing_stream += int(same_expert_sets(source, stream).sum())

    def local_error(self) -> float:
        return _ratio(self.local_error2, self.local_update2)

    def stream_error(self) -> float:
        return _ratio(self.stream_error2, self.stream_norm2)


def _sq(t: torch.Tensor) -> float:
    return float(t.double().pow(2).sum())


def _ratio(num2: float, den2: float) -> float:
    if math.isnan(num2):  # NaN propagates: a non-finite output has no error value
        return math.nan
    return math.sqrt(num2 / den2) if den2 > 0 else math.sqrt(num2)


def _sticky(pick, a: float, b: float) -> float:
    """min/max where NaN wins: one NaN position makes the extreme undefined."""
    return math.nan if math.isnan(a) or math.isnan(b) else pick(a, b)


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf
