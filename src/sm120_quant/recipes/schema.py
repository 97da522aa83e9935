"""The recipe schema: one YAML file says everything a quantization run does.

Every model forbids unknown keys, so a typo is an error that names the key, never a silently ignored setting.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from sm120_quant.recipes.calibration import CalibrationSpec, LocalPath


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class Scheme(str, Enum):
    """What the weights (and activations) become."""

    NVFP4 = "nvfp4"
    """W4A4: E2M1 weights in blocks of 16 with E4M3 block scales and an fp32 global scale; static fp32 input scales."""
    NVFP4_AWQ_LITE = "nvfp4_awq_lite"
    """NVFP4 after AWQ-lite smoothing folded exactly into the preceding norms, exported as plain NVFP4."""
    FP8_BLOCK = "fp8_block"
    """E4M3 weights with one fp32 scale per 128x128 block; activations quantized dynamically per group of 128."""
    W4A16 = "w4a16"
    """Weight-only NVFP4 (llm-compressor), for comparison runs."""


class Engine(str, Enum):
    MODELOPT = "modelopt"
    LLMCOMPRESSOR = "llmcompressor"


# Which engine can produce which scheme; the recipe validator and the CLI's error messages read this one table.
ENGINE_SCHEMES: dict[Engine, frozenset[Scheme]] = {
    Engine.MODELOPT: frozenset({Scheme.NVFP4, Scheme.NVFP4_AWQ_LITE}),
    Engine.LLMCOMPRESSOR: frozenset({Scheme.FP8_BLOCK, Scheme.NVFP4, Scheme.W4A16}),
}


class ModelSpec(Strict):
    id: str = Field(description="Hugging Face hub id, local folder, or tiny://glm47 | tiny://glm47-flash")
    revision: str | None = None
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    trust_remote_code: bool = False


class ArchitectureHints(Strict):
    family: Literal["auto", "glm4_moe", "glm4_moe_lite"] = "auto"
    """`auto` reads config.json's model_type."""
    mtp_layers: int | None = Field(default=None, ge=0)
    """Number of MTP (next-token-prediction) layers stored after the decoder layers; None reads
    `num_nextn_predict_layers` from config.json."""


class MoESpec(Strict):
    expand_experts: bool = True
    """Replace fused 3-D expert parameters by per-expert nn.Linear modules during calibration, so every expert gets
    its own weight and input quantizers."""


class KVCache(str, Enum):
    NONE = "none"
    FP8 = "fp8"


class ExportSpec(Strict):
    output_dir: str
    """Relative paths are resolved against the current directory. `quantize run --output` overrides it."""
    max_shard_size: str = "5GB"


class FixupsSpec(Strict):
    """Repairs applied to every export whose check finds the problem (`quantize fix` does the same by hand)."""

    shared_global_scales: bool = True
    """Give every fused group (q/k/v, gate/up, q_a/kv_a) one weight_scale_2 and input_scale, re-deriving block scales."""
    repair_e4m3_scales: bool = True
    """Replace NaN bytes (0x7F/0xFF) in E4M3 block scales by 448."""
    kv_scales: bool = True
    """Rename k/v scales to `self_attn.k_scale`/`v_scale` (which every runtime loads) and drop undeclared ones."""
    exclusions: bool = True
    """List BF16 modules (router, MTP) in the exclusion lists and drop leftover scales of excluded modules."""
    copy_mtp: bool = True
    """Copy the source's MTP layer back in BF16 (both engines drop it) and exclude it."""


class VerifySpec(Strict):
    """`quantize verify` thresholds (metric definitions: `sm120_quant.verify.metrics`). NaN/Inf outputs, dead
    modules, checkpoint defects (NaN or zero scales) and changed unquantized tensors always fail."""

    enabled: bool = True
    prompts: LocalPath | None = None
    """A text file with one held-out prompt per line (`.jsonl`: one {"text": ...} per line), relative to the recipe's
    folder; None uses built-in prompts unrelated to calibration data."""
    max_kl: float = Field(default=0.5, ge=0)
    """Mean KL(source || quantized) of the next-token distributions, in nats."""
    min_top1: float = Field(default=0.2, ge=0, le=1)
    """Fraction of positions where both models' most likely next token is the same. The default passes the random-
    weight tiny models (near-flat distributions: 0.27 for NVFP4 GLM-4.7-Flash); raise it for trained models."""
    min_cosine: float = Field(default=0.8, ge=-1, le=1)
    """Mean cosine similarity of the two models' logits (random-weight tiny NVFP4 GLM-4.7-Flash: 0.855; a community
    NVFP4 GLM-4.7 was measured at 0.9975, FP8 at 0.9998)."""
    min_routing_agreement: float = Field(default=0.5, ge=0, le=1)
    """Per MoE layer, on the source's hidden states: fraction of tokens whose top-k expert set is unchanged."""
    max_layer_error: float = Field(default=0.8, ge=0)
    """Per decoder layer, on the source's hidden states: ||quantized - source output|| / ||source output - input||
    (1.0 for a layer that adds nothing; NVFP4 on the tiny models 0.05-0.35, FP8 block 0.02-0.12)."""
    max_weight_error: float = Field(default=0.3, ge=0)
    """Per quantized tensor: relative error of the weight the runtime computes with (fused scales applied) vs the
    source weight. NVFP4 is about 0.1 and FP8-block about 0.03 on any weights."""


class UploadSpec(Strict):
    repo_id: str | None = None
    private: bool = True
    revision: str | None = None


class Recipe(Strict):
    description: str = ""
    model: ModelSpec
    architecture: ArchitectureHints = ArchitectureHints()
    scheme: Scheme
    engine: Engine
    calibration: CalibrationSpec
    exclude: list[str] = Field(default_factory=list)
    """Module-name globs kept in BF16 in addition to the ones every export keeps (lm_head, embeddings, routers, MTP)."""
    moe: MoESpec = MoESpec()
    kv_cache: KVCache = KVCache.NONE
    export: ExportSpec
    fixups: FixupsSpec = FixupsSpec()
    verify: VerifySpec = VerifySpec()
    upload: UploadSpec = UploadSpec()

    @field_validator("engine")
    @classmethod
    def _engine_supports_scheme(cls, engine: Engine, info: ValidationInfo) -> Engine:
        scheme = info.data.get("scheme")  # absent when scheme itself failed validation
        if scheme is not None and scheme not in ENGINE_SCHEMES[engine]:
            supported = ", ".join(sorted(s.value for s in ENGINE_SCHEMES[engine]))
            raise ValueError(f"engine {engine.value!r} cannot produce scheme {scheme.value!r}; it supports {supported}")
        return engine
