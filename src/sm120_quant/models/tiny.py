"""Tiny GLM-4.7 / GLM-4.7-Flash checkpoints built locally, so every command runs with no hub.

They are real transformers checkpoints (`save_pretrained` layout, per-expert tensor names, a trained byte-level BPE
tokenizer with the GLM special tokens and a GLM-4.7 chat template, an MTP layer like the real checkpoints'), built
deterministically and cached. `tiny://glm47` and `tiny://glm47-flash` in a recipe resolve here.
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from sm120_quant.errors import UserError

TINY_SCHEME = "tiny://"
# Bump when anything below changes what gets built: the cache key includes it.
BUILD_VERSION = "1"

SPECIAL_TOKENS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
# GLM keeps these as added, non-special tokens: they stay visible in decoded text so the tool and reasoning parsers see them.
ADDED_TOKENS = ["/nothink", "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
                "</tool_response>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"]
VOCAB_SIZE = 2048


@dataclass(frozen=True)
class TinySpec:
    name: str
    architecture: str
    config: dict


_MOE = dict(
    n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=128,
    routed_scaling_factor=2.5, norm_topk_prob=True, n_group=1, topk_group=1,
)
_COMMON = dict(
    vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
    max_position_embeddings=16384, rms_norm_eps=1e-5, tie_word_embeddings=False, num_nextn_predict_layers=1,
    initializer_range=0.02,
)

TINY_MODELS: dict[str, TinySpec] = {
    "glm47": TinySpec(
        "glm47", "Glm4MoeForCausalLM",
        dict(_COMMON, **_MOE, num_key_value_heads=2, head_dim=64, first_k_dense_replace=1, use_qk_norm=True,
             attention_bias=True, partial_rotary_factor=0.5),
    ),
    "glm47-flash": TinySpec(
        "glm47-flash", "Glm4MoeLiteForCausalLM",
        dict(_COMMON, **_MOE, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
             qk_rope_head_dim=16, v_head_dim=32, mlp_layer_types=["dense", "sparse", "sparse", "sparse"]),
    ),
}


def cache_root() -> Path:
    """Where built tiny models live: $SM120_QUANT_CACHE, else the user cache dir."""
    env = os.environ.get("SM120_QUANT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sm120-quant"


def tiny_name(model_id: str) -> str | None:
    """`tiny://glm47` -> `glm47`; None for anything that is not a tiny id."""
    if not model_id.startswith(TINY_SCHEME):
        return None
    name = model_id[len(TINY_SCHEME):]
    if name not in TINY_MODELS:
        raise UserError(f"model {model_id!r}: unknown tiny model; choose one of "
                        + ", ".join(TINY_SCHEME + n for n in TINY_MODELS))
    return name


def build_tiny_model(name: str, cache_dir: Path | None = None) -> Path:
    """Return the folder of tiny model `name`, building it on first use (atomically: concurrent callers are safe)."""
    if name not in TINY_MODELS:
        raise UserError(f"tiny model {name!r} does not exist; choose one of {', '.join(TINY_MODELS)}")
    root = cache_dir or cache_root()
    target = root / "tiny" / f"{name}-v{BUILD_VERSION}"
    if (target / "config.json").exists():
        return target
    root.joinpath("tiny").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root / "tiny"))
    try:
        _build_into(TINY_MODELS[name], tmp)
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished first; its copy is identical.
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _tokenizer_corpus() -> list[str]:
    # Python's own stdlib ships on every machine that runs us; a sorted, fixed slice keeps the vocab deterministic.
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py"))[:120]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def chat_template() -> str:
    return resources.files("sm120_quant.models").joinpath("templates/glm47.jinja").read_text(encoding="utf-8")


def build_tokenizer():
    """A byte-level BPE with the GLM-4.7 special tokens and chat template, trained on the local stdlib."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(ADDED_TOKENS), special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token=None,
        clean_up_tokenization_spaces=False,
    )
    fast.add_tokens(ADDED_TOKENS)
    fast.chat_template = chat_template()
    return fast


def _build_into(spec: TinySpec, folder: Path) -> None:
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    tokenizer = build_tokenizer()
    config_cls = getattr(transformers, spec.architecture.replace("ForCausalLM", "Config"))
    model_cls = getattr(transformers, spec.architecture)
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    cfg = dict(spec.config, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, architectures=[spec.architecture])
    n_layers = cfg["num_hidden_layers"]

    # Build one layer more than the model has: that extra decoder layer becomes the MTP layer, saved under
    # `model.layers.{n_layers}.*` exactly as the real GLM checkpoints store it (transformers ignores it on load).
    with_mtp = config_cls(**dict(cfg, num_hidden_layers=n_layers + 1,
                                 **({"mlp_layer_types": cfg["mlp_layer_types"] + ["sparse"]}
                                    if "mlp_layer_types" in cfg else {})))
    torch.manual_seed(0)
    model = model_cls(with_mtp).to(torch.bfloat16)
    _keep_fp32_buffers(model)
    staging = folder / ".staging"
    model.save_pretrained(staging)
    tensors = load_file(staging / "model.safetensors")
    shutil.rmtree(staging)

    hidden = cfg["hidden_size"]
    gen = torch.Generator().manual_seed(1)
    mtp = f"model.layers.{n_layers}."
    tensors[mtp + "eh_proj.weight"] = (torch.randn(hidden, 2 * hidden, generator=gen) * 0.02).to(torch.bfloat16)
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        tensors[mtp + norm + ".weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    tensors[mtp + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors[mtp + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()

    config = config_cls(**cfg)
    config.dtype = torch.bfloat16
    config.save_pretrained(folder)
    save_file(dict(sorted(tensors.items())), folder / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    transformers.GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                  do_sample=False).save_pretrained(folder)
    (folder / "sm120_quant_tiny.json").write_text(json.dumps({"name": spec.name, "build_version": BUILD_VERSION}))


def _keep_fp32_buffers(model) -> None:
    """Casting the whole model to bf16 also casts the rotary `inv_freq` and the router bias; both must stay fp32 or
    the logits move after a reload (the checkpoint stores the bias in fp32 and transformers recomputes inv_freq)."""
    import torch

    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if name in ("inv_freq", "original_inv_freq", "e_score_correction_bias"):
                setattr(module, name, buf.to(torch.float32))
