"""Rebuild a checkpoint's model in the source's BF16 architecture, one decoder layer at a time, computing what a serving
runtime computes: dequantized weights (our reference math, `verify.reader`), the runtime's shared scales for fused
projections, and fake-quantized activations where the scheme quantizes them.

Both sides of a comparison (source and quantized) are built here from a meta-device skeleton of the transformers
model, so only one decoder layer per side needs to be in memory. Fused experts are expanded into per-expert linears
(`quantize.moe.expand_experts`, bit-exact with the eager fused forward) so every expert's tensors load by their
on-disk names.

Runtime semantics emulated (vLLM 0.15 to 0.32, `layers/quantization/modelopt.py`, `compressed_tensors/...`,
`utils/flashinfer_fp4_moe.py`):

- q/k/v, gate/up (dense and shared experts) and q_a/kv_a load as one fused linear with one NVFP4 global weight scale
  and one input scale: the max of the members' (ModelOpt), or the max of the members' reciprocal global scales
  (compressed-tensors), i.e. the smallest scale in ModelOpt's convention.
- A routed expert's gate/up (w13) keeps only gate's global weight scale ("w1_weight_scale_2 must match
  w3_weight_scale_2") and takes the max of the two input scales (the per-expert CUTLASS path SM120 uses).
- NVFP4 activations: an E4M3 scale per 16 values under the static global input scale (`formats.fake_quant_nvfp4`);
  an input scale of 0 gives a global scale of 1/0, so the runtime's output is NaN.
- FP8 activations: dynamic per token and group of 128 (FP8_BLOCK), dynamic per token, or static per tensor.
- KV-cache quantization is not emulated.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sm120_quant.errors import UserError
from sm120_quant.quantize import formats
from sm120_quant.verify.reader import NVFP4_LAYOUTS, Activation, ActivationScheme, CheckpointReader, relative_error

FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"))
_ROUTED_W13 = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj)$")

# Which norm's weight multiplies each module's input, relative to a decoder layer. Weights are compared as
# W * norm_weight, so a smoothing scale folded exactly into a norm and all its consumers (AWQ) is no error, and a norm
# rescaled without compensating every consumer (the router, say) shows in the consumers it missed.
NORM_CONSUMERS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.q_a_proj",
                         "self_attn.kv_a_proj_with_mqa")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj", "mlp.gate", "mlp.shared_experts.gate_proj",
                                  "mlp.shared_experts.up_proj", "mlp.experts.*.gate_proj", "mlp.experts.*.up_proj")),
    ("self_attn.q_a_layernorm", ("self_attn.q_b_proj",)),
    ("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",)),
)
HEAD_NORM_CONSUMERS = (("model.norm", ("lm_head",)),)
# A producer's output rows divided by a power of two that multiplies its consumer's input columns (AWQ-lite's exact
# output folds, `quantize.awq`; o_proj columns map to v_proj rows through the GQA head grouping). Weights are compared
# with that scale undone, reading it off the partner and never off the module itself, so a module that is wrong
# cannot explain itself away.
ROW_FOLDS = (("self_attn.v_proj", "self_attn.o_proj"), ("up_proj", "down_proj"))


# --------------------------------------------------------------------------------------------------------------------
# Runtime scales and activation quantization
# --------------------------------------------------------------------------------------------------------------------


def runtime_scales(reader: CheckpointReader, module: str) -> tuple[float | None, float | None]:
    """(global weight scale, input scale) that the runtime computes `module` with, in ModelOpt's convention."""
    own = reader.global_scale(module), reader.input_scale(module)
    layout = reader.layout(module)
    if layout not in NVFP4_LAYOUTS:
        return own
    parent, _, proj = module.rpartition(".")
    siblings = next((group for group in FUSED_SIBLINGS if proj in group), None)
    if siblings is None:
        return own
    members = [f"{parent}.{p}" for p in siblings if reader.layout(f"{parent}.{p}") == layout]
    globals_ = [reader.global_scale(m) for m in members]
    inputs = [s for s in (reader.input_scale(m) for m in members) if s is not None]
    if _ROUTED_W13.search(module):
        weight_scale = globals_[0] if members[0].endswith("gate_proj") else own[0]
        return weight_scale, _reduce(max, inputs)
    if layout == "nvfp4":
        return _reduce(max, globals_), _reduce(max, inputs)
    # compressed-tensors stores reciprocals and the runtime takes their max: the smallest scale here
    return _reduce(min, globals_), _reduce(min, inputs)


def _reduce(pick, values: list[float]) -> float | None:
    """min/max as torch computes them on the runtime's stacked scales: NaN wins."""
    if not values:
        return None
    return math.nan if any(math.isnan(v) for v in values) else pick(values)


def quantize_input(x: torch.Tensor, scheme: ActivationScheme, input_scale: float | None) -> torch.Tensor:
    """What the runtime feeds the GEMM: `x` quantized and dequantized by `scheme`, in `x`'s dtype."""
    kind = scheme.kind
    if kind is Activation.NONE:
        return x
    if kind is Activation.NVFP4:
        if not input_scale or not math.isfinite(input_scale):
            return torch.full_like(x, float("nan"))
        amax = torch.tensor(input_scale * formats.E2M1_MAX * formats.E4M3_MAX, dtype=torch.float32)
        return formats.fake_quant_nvfp4(x, amax)
    if kind is Activation.FP8_TENSOR:
        scale = torch.tensor(input_scale, dtype=torch.float32)
        q = (x.float() / scale).clamp(-formats.E4M3_MAX, formats.E4M3_MAX).to(torch.float8_e4m3fn)
        return formats.dequantize_fp8_per_tensor(q, scale, dtype=x.dtype)
    group = scheme.group_size if kind is Activation.FP8_GROUP else x.shape[-1]
    rows = x.reshape(-1, x.shape[-1]).float()
    q, scale = formats.quantize_fp8_block(rows, (1, group), quotient_dtype=torch.float32)
    return formats.dequantize_fp8_block(q, scale, (1, group), dtype=x.dtype).reshape(x.shape)


# --------------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Monitor:
    """What the emulated linears saw: per module, the count of non-finite outputs from finite inputs and whether any
    output was non-zero (a module whose every output is exactly zero for non-zero inputs is dead)."""

    nonfinite: dict[str, int] = field(default_factory=dict)
    first_nonfinite: list[str] = field(default_factory=list)
    live: dict[str, bool] = field(default_factory=dict)
    _last: tuple | None = None

    def quantized_input(self, x: torch.Tensor, scheme: ActivationScheme, input_scale: float | None) -> torch.Tensor:
        """`quantize_input`, computed once for fused siblings (q/k/v, gate/up), which get the same input tensor with
        the same scheme and scale, as the runtime quantizes a fused layer's input once."""
        key = (scheme, input_scale)
        if self._last is not None and self._last[0] is x and self._last[1] == key:
            return self._last[2]
        # A non-finite input is already a finding upstream; quantizing it would only raise.
        xq = quantize_input(x, scheme, input_scale) if bool(torch.isfinite(x).all()) else x
        self._last = (x, key, xq)
        return xq

    def observe(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """Count non-finite outputs computed from finite inputs: where a NaN starts, not where it travels."""
        bad = int((~torch.isfinite(y)).sum()) if bool(torch.isfinite(x).all()) else 0
        if bad:
            if name not in self.nonfinite:
                self.first_nonfinite.append(name)
            self.nonfinite[name] = self.nonfinite.get(name, 0) + bad
        if bool(x.any()):
            self.live[name] = self.live.get(name, False) or bool(y.any())

    def dead(self) -> list[str]:
        return [name for name, live in self.live.items() if not live]

    def reset(self) -> None:
        self.nonfinite.clear()
        self.first_nonfinite.clear()
        self.live.clear()
        self._last = None


class QuantLinear(nn.Module):
    """A linear layer computing as the runtime does: `F.linear(quantize_input(x), dequantized weight, bias)`."""

    def __init__(self, name: str, linear: nn.Linear, scheme: ActivationScheme, input_scale: float | None,
                 monitor: Monitor):
        super().__init__()
        self.name, self.scheme, self.input_scale, self.monitor = name, scheme, input_scale, monitor
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(self.monitor.quantized_input(x, self.scheme, self.input_scale), self.weight, self.bias)
        self.monitor.observe(self.name, x, y)
        return y


@dataclass(frozen=True)
class ModuleRecord:
    """One tensor-bearing module of the quantized side, compared with the source."""

    module: str
    layout: str
    activation: str
    error: float
    """Relative Frobenius error of the weight the runtime computes with vs the source weight, both multiplied by the
    weight of the norm feeding the module (NORM_CONSUMERS); for 1-D tensors (biases, the router's correction bias,
    per-head q/k norms) the plain relative error."""
    defects: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------------------------------
# One side of the comparison
# --------------------------------------------------------------------------------------------------------------------


def load_skeleton(config_folder: Path):
    """The transformers model on the meta device, with fused experts expanded to per-expert linears."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from sm120_quant.quantize.moe import expand_experts

    config = AutoConfig.from_pretrained(config_folder)
    config._attn_implementation = "sdpa"
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    finally:
        hf_logging.set_verbosity(previous)
    expand_experts(skeleton)
    return skeleton


class Side:
    """One model (source or quantized checkpoint) over a shared skeleton: embeds, builds decoder layers, and ends in
    logits. `quantized=False` computes with unquantized activations (the source)."""

    def __init__(self, reader: CheckpointReader, skeleton, *, quantized: bool, dtype: torch.dtype, device: str,
                 keep_layers: bool):
        self.reader, self.skeleton, self.quantized = reader, skeleton, quantized
        self.dtype, self.device, self.keep_layers = dtype, device, keep_layers
        self.monitor = Monitor()
        self.defects: dict[str, tuple[str, ...]] = {}
        # Runtime global scale / stored global scale, where a fused group makes them differ.
        self.rescaled: dict[str, float] = {}
        self.layouts: dict[str, str] = {}
        self.activations: dict[str, str] = {}
        self._layers: dict[int, nn.Module] = {}
        self._fp32 = set(getattr(type(skeleton), "_keep_in_fp32_modules_strict", None) or ())
        self.embed_tokens = self.build("model.embed_tokens", skeleton.model.embed_tokens)
        self.norm = self.build("model.norm", skeleton.model.norm)
        stored_head = "lm_head.weight" in reader or "lm_head.weight_packed" in reader
        self.lm_head = (self.build("lm_head", skeleton.lm_head)
                        if stored_head or not skeleton.config.tie_word_embeddings
                        else _tied_head(self.embed_tokens, skeleton.lm_head))
        self.rotary = type(skeleton.model.rotary_emb)(config=skeleton.config).to(device)

    @property
    def num_layers(self) -> int:
        return self.skeleton.config.num_hidden_layers

    def layer(self, index: int) -> nn.Module:
        if index in self._layers:
            return self._layers[index]
        layer = self.build(f"model.layers.{index}", self.skeleton.model.layers[index])
        if self.keep_layers:
            self._layers[index] = layer
        return layer

    def build(self, prefix: str, meta: nn.Module) -> nn.Module:
        """A real copy of `meta` with every tensor from the checkpoint; quantized linears become QuantLinear."""
        module = copy.deepcopy(meta)
        state = {}
        for name, sub in list(module.named_modules()):
            full = f"{prefix}.{name}" if name else prefix
            if not isinstance(sub, nn.Linear) or self.reader.layout(full) == "dense":
                continue
            scale_2, input_scale = runtime_scales(self.reader, full)
            weight = self.reader.linear(full, global_scale=scale_2, keep_nan=True)
            self.layouts[full] = weight.layout
            stored = self.reader.global_scale(full)
            defects = weight.defects
            if stored is not None and scale_2 != stored and math.isfinite(stored) and stored > 0:
                self.rescaled[full] = scale_2 / stored
                defects += ((f"global weight scale {stored:.6g} differs from its fused siblings'; the runtime "
                             f"computes this projection with {scale_2:.6g} ({scale_2 / stored:.4g}x its own)"),)
            if defects:
                self.defects[full] = defects
            state[f"{name}.weight" if name else "weight"] = weight.weight
            scheme = self.reader.activation(full) if self.quantized else ActivationScheme(Activation.NONE)
            self.activations[full] = scheme.kind.value
            replacement = QuantLinear(full, sub, scheme, input_scale, self.monitor)
            if name:
                parent, _, child = name.rpartition(".")
                setattr(module.get_submodule(parent) if parent else module, child, replacement)
            else:
                module = replacement
        for key in module.state_dict(keep_vars=True):
            if key in state:
                continue
            full = f"{prefix}.{key}"
            if full not in self.reader:
                raise UserError(f"{self.reader.folder}: tensor {full!r} is missing; the checkpoint does not match the "
                                "source architecture (run `quantize check` on it)")
            state[key] = self.reader.get(full)
        for key, tensor in state.items():
            if tensor.is_floating_point():
                keep_fp32 = any(part in self._fp32 for part in key.split("."))
                tensor = tensor.to(torch.float32 if keep_fp32 else self.dtype)
            state[key] = tensor.to(self.device)
        module.load_state_dict(state, strict=True, assign=True)
        return module.eval()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids.to(self.device)[None])

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decoder layer on one sequence [1, T, H]: (output, the router's top-k expert indices or None)."""
        from transformers.masking_utils import create_causal_mask

        positions = torch.arange(hidden.shape[1], device=self.device)[None]
        mask = create_causal_mask(config=self.skeleton.config, inputs_embeds=hidden, attention_mask=None,
                                  past_key_values=None, position_ids=positions)
        router = _router(layer)
        captured = []
        handle = router.register_forward_hook(lambda m, a, out: captured.append(out[-1])) if router else None
        try:
            out = layer(hidden, attention_mask=mask, position_ids=positions,
                        position_embeddings=self.rotary(hidden, positions))
        finally:
            if handle:
                handle.remove()
        out = out[0] if isinstance(out, tuple) else out
        return out, (captured[0] if captured else None)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))[0].float()

    def outer(self) -> nn.Module:
        """Embedding, final norm and lm_head under their checkpoint names, for `compare_weights`."""
        root, model = nn.Module(), nn.Module()
        model.embed_tokens, model.norm = self.embed_tokens, self.norm
        root.model, root.lm_head = model, self.lm_head
        return root


def num_experts(layer: nn.Module) -> int:
    """Routed experts of a decoder layer (0 for a dense layer)."""
    router = _router(layer)
    return int(getattr(router, "num_experts", 0)) if router is not None else 0


def _router(layer: nn.Module) -> nn.Module | None:
    """GLM/DeepSeek-style MoE routers (`mlp.gate`, not a linear) return (logits, weights, top-k indices)."""
    gate = getattr(getattr(layer, "mlp", None), "gate", None)
    return gate if isinstance(gate, nn.Module) and not isinstance(gate, (nn.Linear, QuantLinear)) else None


def _tied_head(embedding: nn.Embedding, meta_head: nn.Linear) -> nn.Linear:
    head = nn.Linear(meta_head.in_features, meta_head.out_features, bias=False, device="meta")
    head.weight = embedding.weight
    return head


# --------------------------------------------------------------------------------------------------------------------
# Weight comparison
# --------------------------------------------------------------------------------------------------------------------


def compare_weights(prefix: str, source: nn.Module, quantized: nn.Module, side: Side, *,
                    norm_consumers=NORM_CONSUMERS, row_folds=ROW_FOLDS) -> list[ModuleRecord]:
    """Compare every tensor of a built quantized module (a decoder layer, or the head) with the source's."""
    src, q = source.state_dict(), quantized.state_dict()
    folded_norms = {f"{norm}.weight" for norm, _ in norm_consumers}
    head_dim = getattr(side.skeleton.config, "head_dim", None)
    # Folds are read off the weights as exported: a partner the runtime rescales (a fused-scale defect of its own)
    # must not make this module look wrong too.
    exported = dict(q)
    for key in q:
        owner = f"{prefix}.{key.removesuffix('.weight')}"
        if key.endswith(".weight") and owner in side.rescaled:
            exported[key] = q[key] / side.rescaled[owner]
    records = []
    for key, s in src.items():
        if key in folded_norms:
            continue
        owner = key.rpartition(".")[0]
        full = f"{prefix}.{owner}" if prefix else owner
        norm = _feeding_norm(owner, norm_consumers)
        w_s, w_q = s.float(), q[key].float()
        fold = _row_fold(owner, src, exported, row_folds, head_dim, norm_consumers)
        if fold is not None:
            axis, scale = fold
            if axis == "rows":  # a producer's weight [out, in] or bias [out]
                w_q = w_q * (scale[:, None] if w_q.dim() == 2 else scale)
            elif w_q.dim() == 2:  # a consumer's columns
                w_q = w_q / scale[None, :]
        if norm is not None and key.endswith(".weight") and s.dim() == 2:
            w_s, w_q = w_s * src[f"{norm}.weight"].float(), w_q * q[f"{norm}.weight"].float()
        tensor = key.rpartition(".")[2]
        records.append(ModuleRecord(
            module=full if tensor == "weight" else f"{full}.{tensor}",
            layout=side.layouts.get(full, "dense") if tensor == "weight" else "dense",
            activation=side.activations.get(full, Activation.NONE.value) if tensor == "weight" else "none",
            error=relative_error(w_q, w_s),
            defects=side.defects.get(full, ()) if tensor == "weight" else (),
        ))
    return records


def _row_fold(owner: str, src: dict, q: dict, row_folds, head_dim: int | None, norm_consumers
              ) -> tuple[str, torch.Tensor] | None:
    """("rows", s) for a producer, ("columns", s) for a consumer of an exact power-of-two fold, s read off the
    partner (a producer's rows with its own input norm folded in); None when `owner` is in no fold pair."""
    for producer, consumer in row_folds:
        for mine, other, axis in ((producer, consumer, "rows"), (consumer, producer, "columns")):
            if owner != mine and not owner.endswith("." + mine):
                continue
            partner = owner[: len(owner) - len(mine)] + other
            p_key = f"{partner if axis == 'columns' else owner}.weight"
            c_key = f"{owner if axis == 'columns' else partner}.weight"
            if p_key not in src or c_key not in src:
                return None
            channel = _consumer_channels(src[p_key].shape[0], src[c_key].shape[1], head_dim)
            if channel is None:
                return None
            if axis == "columns":  # s = ||P_j|| / ||P'_j|| per producer row, spread over the consumer's columns
                norm = _feeding_norm(p_key.rpartition(".")[0], norm_consumers)
                p_src, p_q = src[p_key].double(), q[p_key].double()
                if norm is not None:
                    p_src, p_q = p_src * src[f"{norm}.weight"].double(), p_q * q[f"{norm}.weight"].double()
                return axis, _pow2(_norms(p_src, 1), _norms(p_q, 1))[channel]
            # s = ||C'_j|| / ||C_j|| over the consumer columns fed by producer row j
            rows = src[p_key].shape[0]
            return axis, _pow2(_channel_norms(q[c_key], channel, rows), _channel_norms(src[c_key], channel, rows))
    return None


def _channel_norms(consumer: torch.Tensor, channel: torch.Tensor, rows: int) -> torch.Tensor:
    """Per producer row: the norm of the consumer columns it feeds."""
    squares = consumer.double().pow(2).sum(0)
    return torch.zeros(rows, dtype=torch.float64).index_add_(0, channel, squares).sqrt()


def _consumer_channels(producer_rows: int, consumer_columns: int, head_dim: int | None) -> torch.Tensor | None:
    """The producer row feeding each consumer column: identity, or GQA (each KV head's rows feed its q heads')."""
    columns = torch.arange(consumer_columns)
    if consumer_columns == producer_rows:
        return columns
    if head_dim and consumer_columns % producer_rows == 0 and producer_rows % head_dim == 0:
        group = consumer_columns // producer_rows
        return (columns // head_dim) // group * head_dim + columns % head_dim
    return None


def _norms(w: torch.Tensor, dim: int) -> torch.Tensor:
    return w.double().pow(2).sum(dim).sqrt()


def _pow2(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den rounded to the nearest power of two (1 where either is zero or non-finite), as float32."""
    ratio = num / den
    usable = torch.isfinite(ratio) & (ratio > 0)
    exponent = torch.where(usable, torch.log2(torch.where(usable, ratio, 1.0)).round(), 0.0)
    return torch.exp2(exponent).float()


def _feeding_norm(module: str, norm_consumers) -> str | None:
    for norm, consumers in norm_consumers:
        if any(fnmatch.fnmatchcase(module, c) for c in consumers):
            return norm
    return None
