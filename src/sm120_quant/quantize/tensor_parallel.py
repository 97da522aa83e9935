"""Which tensor-parallel sizes a GLM checkpoint's quantized layers split into, from config.json alone.

vLLM shards every attention and MLP layer over the TP ranks and refuses a shard that its quantization cannot cut:
- FP8 block (128x128 weight blocks, activations in dynamic groups of 128), `validate_fp8_block_shape` and the FusedMoE
  checks in fp8_utils.py: a column-parallel layer's output per rank and a row-parallel layer's input per rank must be
  multiples of 128; a merged layer that is not split (TP 1, or replicated) exempts only its last shard; the experts'
  intermediate size per rank must be a multiple of 128 at every TP (gate/up output, and down input once split).
- NVFP4 on SM120 (vLLM's VLLM_CUTLASS / FLASHINFER_CUTLASS MoE): 2 x moe_intermediate_size / TP must be a multiple
  of 128 (the block-scale swizzle pads rows to 128 and vLLM refuses to pad w1/w3); a row-parallel layer's input per
  rank must be a multiple of 16 (one block-scale group).
- Any scheme: the attention heads must divide over the ranks; GQA KV heads must divide or be replicated evenly.
`exporters.check` applies the same rules to a written checkpoint's tensors; this table needs no weights, so a recipe
can state its TP sizes before anything is quantized.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase

from sm120_quant.recipes.schema import Scheme

FP8_BLOCK_N = 128
NVFP4_MOE_ROWS = 128
NVFP4_GROUP = 16


@dataclass(frozen=True)
class ShardCheck:
    """One vLLM layer at one TP size: the per-rank sizes that must be multiples of `multiple`."""

    layer: str  # vLLM layer name: qkv_proj, fused_qkv_a_proj, q_b_proj, kv_b_proj, o_proj, ...
    split: str  # column | row | merged (not split: last shard exempt) | moe
    what: str  # the dimension, in words
    sizes: tuple[int, ...]
    multiple: int
    divides: bool  # the full dimension splits evenly over the ranks

    @property
    def ok(self) -> bool:
        return self.divides and all(s % self.multiple == 0 for s in self.sizes)

    def describe(self) -> str:
        if not self.divides:
            return f"{self.layer}: {self.what} does not split evenly over the ranks"
        bad = ", ".join(dict.fromkeys(str(s) for s in self.sizes if s % self.multiple))
        return f"{self.layer}: {self.what} per rank {bad} is not a multiple of {self.multiple}"


@dataclass(frozen=True)
class TPRow:
    tp: int
    scheme: Scheme
    heads: str | None  # why the attention heads do not split, or None
    checks: tuple[ShardCheck, ...]

    @property
    def ok(self) -> bool:
        return self.heads is None and all(c.ok for c in self.checks)

    @property
    def failures(self) -> tuple[str, ...]:
        return ((self.heads,) if self.heads else ()) + tuple(c.describe() for c in self.checks if not c.ok)

    def to_dict(self) -> dict:
        return {"tp": self.tp, "scheme": self.scheme.value, "ok": self.ok, "failures": list(self.failures),
                "checks": [dict(asdict(c), ok=c.ok) for c in self.checks]}


@dataclass(frozen=True)
class _Layer:
    """A vLLM layer at one TP size: how it splits, its sizes per rank, and the Hugging Face modules it loads (to
    skip it when they are all excluded)."""

    name: str
    split: str  # column | row | merged (replicated, never split) | moe
    what: str
    sizes: tuple[int, ...]  # per rank (the full sizes for merged layers)
    divides: bool
    modules: tuple[str, ...]


def tp_table(config: dict, scheme: Scheme, tp_sizes: Sequence[int] = (1, 2, 4, 8),
             exclude: Iterable[str] = ()) -> list[TPRow]:
    """One row per TP size for GLM-4.7 (GQA, `Glm4MoeForCausalLM`) or GLM-4.7-Flash (MLA, `kv_lora_rank` set).

    `exclude` takes the recipe's module globs: a layer whose modules are all excluded stays BF16 and has no
    quantization constraint."""
    globs = tuple(exclude)
    rows = []
    for tp in tp_sizes:
        layers = [layer for layer in _layers(config, tp)
                  if not all(any(fnmatchcase(m, g) for g in globs) for m in layer.modules)]
        rows.append(TPRow(tp, scheme, _heads(config, tp),
                          tuple(c for layer in layers for c in _checks(layer, scheme, tp))))
    return rows


def tp_markdown(config: dict, tp_sizes: Sequence[int] = (1, 2, 4, 8), exclude: Iterable[str] = (),
                schemes: Sequence[Scheme] = (Scheme.FP8_BLOCK, Scheme.NVFP4)) -> str:
    tables = {s: tp_table(config, s, tp_sizes, exclude) for s in schemes}
    lines = ["| TP | " + " | ".join(s.value for s in schemes) + " |", "|---|" + "---|" * len(schemes)]
    for i, tp in enumerate(tp_sizes):
        cells = ["ok" if tables[s][i].ok else "no: " + "; ".join(tables[s][i].failures) for s in schemes]
        lines.append(f"| {tp} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _heads(config: dict, tp: int) -> str | None:
    heads = config["num_attention_heads"]
    if heads % tp:
        return f"{heads} attention heads do not divide over {tp} ranks"
    kv = config.get("num_key_value_heads")
    if config.get("kv_lora_rank") is None and kv and (kv % tp if kv >= tp else tp % kv):
        return f"{kv} KV heads neither divide over nor replicate evenly to {tp} ranks"
    return None


def _checks(layer: _Layer, scheme: Scheme, tp: int) -> list[ShardCheck]:
    sizes = layer.sizes
    if scheme is Scheme.FP8_BLOCK:
        if layer.split == "merged" or (layer.split == "column" and tp == 1):
            sizes = sizes[:-1]  # a merged layer that is not split: vLLM exempts its last shard
        elif layer.split == "row" and tp == 1:
            sizes = ()  # one unsplit matrix: nothing to check, its last block column may be partial
        return [ShardCheck(layer.name, layer.split, layer.what, sizes, FP8_BLOCK_N, layer.divides)] if sizes else []
    if layer.split == "moe":
        return [ShardCheck(layer.name, layer.split, "2 x " + layer.what, tuple(2 * s for s in sizes), NVFP4_MOE_ROWS,
                           layer.divides)]
    if layer.split == "row" and tp > 1:
        return [ShardCheck(layer.name, layer.split, layer.what, sizes, NVFP4_GROUP, layer.divides)]
    return []


def _layer_kinds(config: dict) -> tuple[list[int], list[int]]:
    """(dense layer indices, MoE layer indices); the MTP layer after them is always excluded."""
    n = config["num_hidden_layers"]
    types = config.get("mlp_layer_types")
    if types:
        return [i for i in range(n) if types[i] != "sparse"], [i for i in range(n) if types[i] == "sparse"]
    first = config.get("first_k_dense_replace", 0)
    return list(range(min(first, n))), list(range(first, n))


def _layers(config: dict, tp: int) -> list[_Layer]:
    dense, moe = _layer_kinds(config)
    every = dense + moe

    def attn(*names: str) -> tuple[str, ...]:
        return tuple(f"model.layers.{i}.self_attn.{n}" for i in every for n in names)

    def mlp(layers: list[int], part: str, *names: str) -> tuple[str, ...]:
        return tuple(f"model.layers.{i}.mlp.{part}{n}" for i in layers for n in names)

    def split(name: str, kind: str, what: str, sizes: tuple[int, ...], modules: tuple[str, ...]) -> _Layer:
        return _Layer(name, kind, what, tuple(s // tp for s in sizes), all(s % tp == 0 for s in sizes), modules)

    heads = config["num_attention_heads"]
    out: list[_Layer] = []
    if config.get("kv_lora_rank") is not None:
        nope, rope, v = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
        if config.get("q_lora_rank"):
            out += [_Layer("fused_qkv_a_proj", "merged", "q_a_proj output (kv_a_proj_with_mqa is the exempt last "
                           "shard)", (config["q_lora_rank"], config["kv_lora_rank"] + rope), True,
                           attn("q_a_proj", "kv_a_proj_with_mqa")),
                    split("q_b_proj", "column", "output", (heads * (nope + rope),), attn("q_b_proj"))]
        else:
            out.append(split("q_proj", "column", "output", (heads * (nope + rope),), attn("q_proj")))
        out += [split("kv_b_proj", "column", "output", (heads * (nope + v),), attn("kv_b_proj")),
                split("o_proj", "row", "input", (heads * v,), attn("o_proj"))]
    else:
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        kv = config.get("num_key_value_heads") or heads
        qkv = split("qkv_proj", "column", "q/k/v output", (heads * head_dim, kv * head_dim, kv * head_dim),
                    attn("q_proj", "k_proj", "v_proj"))
        if kv < tp:  # fewer KV heads than ranks: each rank holds one replicated KV head
            qkv = _Layer(qkv.name, qkv.split, qkv.what, (qkv.sizes[0], head_dim, head_dim), qkv.divides, qkv.modules)
        out += [qkv, split("o_proj", "row", "input", (heads * head_dim,), attn("o_proj"))]
    if dense:
        inter = config["intermediate_size"]
        out += [split("mlp.gate_up_proj", "column", "gate/up output", (inter, inter),
                      mlp(dense, "", "gate_proj", "up_proj")),
                split("mlp.down_proj", "row", "input", (inter,), mlp(dense, "", "down_proj"))]
    if moe:
        inter = config["moe_intermediate_size"]
        shared = inter * (config.get("n_shared_experts") or 0)
        if shared:
            out += [split("shared_experts.gate_up_proj", "column", "gate/up output", (shared, shared),
                          mlp(moe, "shared_experts.", "gate_proj", "up_proj")),
                    split("shared_experts.down_proj", "row", "input", (shared,),
                          mlp(moe, "shared_experts.", "down_proj"))]
        out.append(split("experts", "moe", "moe_intermediate_size", (inter,),
                         mlp(moe, "experts.0.", "gate_proj", "up_proj", "down_proj")))
    return out
