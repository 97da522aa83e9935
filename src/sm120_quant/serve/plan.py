"""`serve plan`: how a checkpoint fits on a GPU under vLLM, and the flags that follow.

The arithmetic is vLLM v1's (gpu_worker.determine_available_memory): the KV cache gets
    gpu_memory_utilization * total - weights - peak activation - non-torch memory,
and it is cut into blocks of 16 tokens. Two more limits decide whether that number survives warmup:
  * memory outside vLLM's budget (CUDA context, a desktop on the card) must fit in (1 - utilization) * total, else the
    physical limit is lower than vLLM's and warmup OOMs (seed 001: 733 blocks work, 734 do not);
  * the sampler warmup allocates ~3 x max_num_seqs x vocab fp32 logits after the cache exists (seed 000's OOM).
Estimates come from config.json; `--weights-gib` etc. take the numbers vLLM logs ("Model loading took X GiB") instead.
KV bytes per token: GQA stores K and V per KV head, 2 x kv_heads/TP x head_dim x bytes x layers; MLA stores one latent
(kv_lora_rank + qk_rope_head_dim) x bytes x layers, the same on every TP rank.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from sm120_quant.errors import UserError
from sm120_quant.serve.model_info import QUANT_NONE, CheckpointInfo
from sm120_quant.serve.profiles import GIB, Gpu, load_arch

BLOCK_SIZE = 16
# vLLM's cap on the MLA chunked-prefill workspace (tokens), MLACommonMetadataBuilder.determine_chunked_prefill_workspace_size.
MLA_WORKSPACE_CAP = 64 * 1024
# Bytes per parameter of a quantized linear layer: NVFP4 = 4-bit codes + one E4M3 scale per 16; FP8-block = 1 byte +
# one fp32 scale per 128x128 block.
BYTES_PER_PARAM = {
    "modelopt_fp4": 0.5 + 1 / 16,
    "modelopt": 1.0,
    "compressed-tensors": 1.0 + 4 / (128 * 128),
    QUANT_NONE: 2.0,
}
KV_BYTES = {"auto": 2, "bfloat16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}


@dataclass(frozen=True)
class PlanRequest:
    gpu_name: str
    gpu: Gpu
    tp: int = 1
    gpu_memory_utilization: float | None = None
    kv_cache_dtype: str | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    weights_gib: float | None = None
    activation_gib: float | None = None
    overhead_gib: float | None = None
    reserved_outside_gib: float | None = None


@dataclass(frozen=True)
class MemoryPlan:
    gpu: str
    tp: int
    gpu_memory_utilization: float
    total_gib: float
    weights_gib: float
    weights_source: str
    activation_gib: float
    activation_source: str
    overhead_gib: float
    reserved_outside_gib: float
    sampler_warmup_gib: float
    kv_cache_dtype: str
    kv_bytes_per_token: int
    kv_budget_vllm_gib: float
    kv_budget_physical_gib: float
    kv_cache_gib: float
    num_blocks: int
    vllm_blocks: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    concurrency: float
    flags: tuple[str, ...]
    notes: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _cfg(config: dict, key: str, default: Any = None) -> Any:
    value = config.get(key, default)
    if value is None:
        raise UserError(f"config.json: {key} is missing; serve plan needs it")
    return value


def _dense_layers(config: dict) -> int:
    if "mlp_layer_types" in config:
        return sum(1 for t in config["mlp_layer_types"] if t == "dense")
    return int(config.get("first_k_dense_replace", 0))


def estimate_weight_bytes(ckpt: CheckpointInfo) -> int:
    """Parameter bytes from config.json alone: quantized linears at the format's rate, embeddings, lm_head and the
    MoE router in BF16 (the exclusions every sm120-quant recipe keeps). The MTP layer is not counted."""
    c = ckpt.config
    hidden, layers = int(_cfg(c, "hidden_size")), ckpt.num_layers
    heads = int(_cfg(c, "num_attention_heads"))
    if ckpt.attention == "mla":
        nope, rope, v = int(_cfg(c, "qk_nope_head_dim")), int(_cfg(c, "qk_rope_head_dim")), int(_cfg(c, "v_head_dim"))
        kv_lora, q_lora = int(_cfg(c, "kv_lora_rank")), c.get("q_lora_rank")
        q = hidden * q_lora + q_lora * heads * (nope + rope) if q_lora else hidden * heads * (nope + rope)
        attn = q + hidden * (kv_lora + rope) + kv_lora * heads * (nope + v) + heads * v * hidden
    else:
        head_dim = int(c.get("head_dim") or hidden // heads)
        kv_heads = int(_cfg(c, "num_key_value_heads"))
        attn = hidden * head_dim * (heads + 2 * kv_heads) + heads * head_dim * hidden
    dense = _dense_layers(c)
    experts, inter = int(_cfg(c, "n_routed_experts")), int(_cfg(c, "moe_intermediate_size"))
    shared = int(c.get("n_shared_experts") or 0)
    mlp_dense = 3 * hidden * int(_cfg(c, "intermediate_size"))
    mlp_moe = (experts + shared) * 3 * hidden * inter
    linear_params = layers * attn + dense * mlp_dense + (layers - dense) * mlp_moe
    vocab = int(_cfg(c, "vocab_size"))
    bf16_params = vocab * hidden * (1 if c.get("tie_word_embeddings") else 2) + (layers - dense) * experts * hidden
    return int(linear_params * BYTES_PER_PARAM[ckpt.quantization] + bf16_params * 2)


def mla_absorbed_bytes(ckpt: CheckpointInfo, tp: int) -> int:
    """vLLM dequantizes a quantized kv_b_proj into model-dtype W_UK/W_UV copies per layer (MLAAttention
    process_weights_after_loading); an unquantized one is only viewed."""
    if ckpt.attention != "mla" or ckpt.quantization == QUANT_NONE:
        return 0
    c = ckpt.config
    per_layer = (
        int(c["kv_lora_rank"]) * int(c["num_attention_heads"]) * (int(c["qk_nope_head_dim"]) + int(c["v_head_dim"]))
    )
    return ckpt.num_layers * per_layer * 2 // tp


def kv_bytes_per_token(ckpt: CheckpointInfo, kv_dtype: str, tp: int) -> int:
    if kv_dtype not in KV_BYTES:
        raise UserError(f"--kv-cache-dtype {kv_dtype}: choose one of {', '.join(KV_BYTES)}")
    c, nbytes = ckpt.config, KV_BYTES[kv_dtype]
    if ckpt.attention == "mla":
        return (int(c["kv_lora_rank"]) + int(c["qk_rope_head_dim"])) * nbytes * ckpt.num_layers
    heads = int(c["num_attention_heads"])
    head_dim = int(c.get("head_dim") or int(c["hidden_size"]) // heads)
    kv_heads = max(1, int(c["num_key_value_heads"]) // tp)
    return 2 * kv_heads * head_dim * nbytes * ckpt.num_layers


def estimate_activation_bytes(ckpt: CheckpointInfo, tp: int, tokens: int, seqs: int, max_model_len: int) -> int:
    """The profile run's torch peak above the weights, from config.json: the larger of two phases, plus the sampler's
    fp32 logits for max_num_seqs rows.

    The forward of max_num_batched_tokens tokens holds one layer's transients (hidden states, q/k/v, the fused-MoE
    caches). MLA also up-projects the chunked-prefill context through kv_b_proj: workspace x heads/TP x
    (qk_nope + v_head) in the model dtype, workspace = min(max(8 x max_model_len, 4 x max_num_seqs x 16), 64K)
    tokens; that phase is the 1.09 GiB seed 001 measured for GLM-4.7-Flash."""
    c = ckpt.config
    hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    topk, inter = int(c.get("num_experts_per_tok") or 1), int(c.get("moe_intermediate_size") or 0)
    per_token = 8 * hidden * 2 + topk * (3 * inter // tp + hidden) * 2 * 2
    workspace = 0
    if ckpt.attention == "mla":
        nope, rope, v = int(c["qk_nope_head_dim"]), int(c["qk_rope_head_dim"]), int(c["v_head_dim"])
        per_token += heads // tp * (2 * (nope + rope) + v) * 2
        ws_tokens = max(min(max(8 * max_model_len, 4 * seqs * BLOCK_SIZE), MLA_WORKSPACE_CAP), seqs * BLOCK_SIZE)
        workspace = ws_tokens * heads // tp * (nope + v) * 2
    else:
        head_dim = int(c.get("head_dim") or hidden // heads)
        per_token += (heads + 2 * int(c["num_key_value_heads"])) // tp * head_dim * 2 * 2
    logits = min(seqs, tokens) * int(c["vocab_size"]) * 4 * 2
    return max(tokens * per_token, workspace) + logits


def plan_memory(ckpt: CheckpointInfo, req: PlanRequest) -> MemoryPlan:
    gpu = req.gpu
    if req.tp < 1:
        raise UserError(f"--tp {req.tp}: needs at least 1")
    util = req.gpu_memory_utilization or gpu.gpu_memory_utilization
    total = gpu.total_memory_gib * GIB
    big = gpu.total_memory_gib >= 70
    # vLLM v1's API-server defaults depend on the card's memory (EngineArgs._set_default_args).
    seqs = req.max_num_seqs or (1024 if big else 256)
    tokens = req.max_num_batched_tokens or (8192 if big else 2048)
    kv_dtype = req.kv_cache_dtype or ckpt.kv_cache_dtype
    kv_per_token = kv_bytes_per_token(ckpt, kv_dtype, req.tp)
    overhead = (req.overhead_gib if req.overhead_gib is not None else load_arch(gpu.arch).non_torch_overhead_gib) * GIB
    reserved = (req.reserved_outside_gib if req.reserved_outside_gib is not None else gpu.reserved_outside_gib) * GIB
    notes: list[str] = []

    if req.weights_gib is not None:
        weights, weights_source = req.weights_gib * GIB, "given (--weights-gib)"
    elif ckpt.weight_bytes is not None:
        weights = ckpt.weight_bytes / req.tp + mla_absorbed_bytes(ckpt, req.tp)
        weights_source = "safetensors headers" + (" + MLA W_UK/W_UV copies" if mla_absorbed_bytes(ckpt, 1) else "")
    else:
        weights = estimate_weight_bytes(ckpt) / req.tp + mla_absorbed_bytes(ckpt, req.tp)
        weights_source = "estimated from config.json" + (
            " + MLA W_UK/W_UV copies" if mla_absorbed_bytes(ckpt, 1) else ""
        )

    context_cap = int(ckpt.config.get("max_position_embeddings") or 0) or 1 << 20
    max_len = req.max_model_len or context_cap
    sampler = 3 * seqs * int(ckpt.config["vocab_size"]) * 4
    # The MLA workspace depends on max_model_len, which depends on the KV budget: iterate to the fixed point.
    for _ in range(5):
        if req.activation_gib is not None:
            activation, activation_source = req.activation_gib * GIB, "given (--activation-gib)"
        else:
            activation = estimate_activation_bytes(ckpt, req.tp, tokens, seqs, max_len)
            activation_source = "estimated from config.json"
        fixed = weights + activation + overhead
        budget_vllm = util * total - fixed
        budget_physical = total - reserved - weights - overhead - max(activation, sampler)
        kv = min(budget_vllm, budget_physical)
        blocks = max(0, math.floor(kv / (BLOCK_SIZE * kv_per_token)))
        if req.max_model_len is not None:
            break
        new_len = max(BLOCK_SIZE, min(context_cap, blocks * BLOCK_SIZE))
        if new_len == max_len:
            break
        max_len = new_len
    vllm_blocks = max(0, math.floor(budget_vllm / (BLOCK_SIZE * kv_per_token)))

    if blocks == 0:
        raise UserError(
            f"{ckpt.path}: does not fit on {req.tp} x {req.gpu_name}: weights {weights / GIB:.2f} GiB, activation "
            f"{activation / GIB:.2f} GiB and overhead {overhead / GIB:.2f} GiB leave no KV cache; use more GPUs (--tp)"
        )
    flags = [f"--gpu-memory-utilization {util}", f"--max-model-len {max_len}"]
    if kv_dtype != "auto":
        flags.append(f"--kv-cache-dtype {kv_dtype}")
    if req.max_num_seqs:
        flags.append(f"--max-num-seqs {seqs}")
    if req.max_num_batched_tokens:
        flags.append(f"--max-num-batched-tokens {tokens}")
    if budget_physical < budget_vllm:
        flags.append(f"--num-gpu-blocks-override {blocks}")
        notes.append(
            f"vLLM's own budget ({util} x total) would give {vllm_blocks} blocks, but only {blocks} fit beside the "
            f"{reserved / GIB:.2f} GiB outside its accounting: without the override warmup runs out of memory"
        )
    if max_len > blocks * BLOCK_SIZE:
        notes.append(f"--max-model-len {max_len} is more than the KV cache holds ({blocks * BLOCK_SIZE} tokens)")
    return MemoryPlan(
        gpu=req.gpu_name,
        tp=req.tp,
        gpu_memory_utilization=util,
        total_gib=round(total / GIB, 3),
        weights_gib=round(weights / GIB, 3),
        weights_source=weights_source,
        activation_gib=round(activation / GIB, 3),
        activation_source=activation_source,
        overhead_gib=round(overhead / GIB, 3),
        reserved_outside_gib=round(reserved / GIB, 3),
        sampler_warmup_gib=round(sampler / GIB, 3),
        kv_cache_dtype=kv_dtype,
        kv_bytes_per_token=kv_per_token,
        kv_budget_vllm_gib=round(budget_vllm / GIB, 3),
        kv_budget_physical_gib=round(budget_physical / GIB, 3),
        kv_cache_gib=round(blocks * BLOCK_SIZE * kv_per_token / GIB, 3),
        num_blocks=blocks,
        vllm_blocks=vllm_blocks,
        max_model_len=max_len,
        max_num_seqs=seqs,
        max_num_batched_tokens=tokens,
        concurrency=round(blocks * BLOCK_SIZE / max_len, 2),
        flags=tuple(flags),
        notes=tuple(notes),
    )
