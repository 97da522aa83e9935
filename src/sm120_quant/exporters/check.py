"""The checkpoint doctor: find what vLLM, SGLang or TRT-LLM will reject or silently get wrong in an NVFP4 (ModelOpt
unified HF) or NVFP4 / FP8-block (compressed-tensors) checkpoint, before anyone loads it on a GPU.

`check_checkpoint` reads config.json, hf_quant_config.json, the safetensors index and the safetensors headers. It
also reads the fp32 scalar scales of fused groups (`weight_scale_2`/`input_scale`, or compressed-tensors'
`weight_global_scale`/`input_global_scale`): comparing them needs their values, and they are 4 bytes each, so this
is a few thousand positioned reads, not tensor data. With `deep=True` it reads whole tensors too (block scales,
every scalar, the quantized weights) to find NaN bytes, zero scales and all-zero weights.

Every finding names the tensor, module or config key, what the runtime will do with it, and the fix. Behaviour of
the runtimes is taken from /work/shared/reference/serving-runtimes.md (which cites the vLLM/SGLang sources and
issues); statements marked "derived" there or here were worked out from that code, not observed on a GPU.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import struct
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, NamedTuple

from sm120_quant.errors import UserError
from sm120_quant.exporters.safetensors_header import SafetensorsHeader, TensorInfo, TensorReader, read_header


class Level(StrEnum):
    ERROR = "ERROR"
    WARN = "WARN"


class Rule(StrEnum):
    """One id per check; `quantize fix --only` takes the same ids."""

    CONFIG = "config"
    INDEX = "index"
    DTYPE_SHAPE = "dtype-shape"
    MISSING_SCALE = "missing-scale"
    FUSED_SCALES = "fused-scales"
    FUSED_PARTIAL = "fused-partial"
    EXCLUDED_QUANTIZED = "excluded-quantized"
    EXCLUDED_SCALES = "excluded-scales"
    NOT_EXCLUDED = "bf16-not-excluded"
    PRE_QUANT_SCALE = "pre-quant-scale"
    BLOCK_SCALES = "block-scales"
    SCALAR_SCALES = "scalar-scales"
    ZERO_WEIGHT = "zero-weight"
    KV_SCALES = "kv-scales"
    KV_SCALE_NAMES = "kv-scale-names"
    KV_SCALES_MLA = "kv-scales-mla"
    TP_HEADS = "tp-heads"
    TP_NVFP4 = "tp-nvfp4"
    TP_FP8_BLOCK = "tp-fp8-block"
    TP_SGLANG_SCALE_DIM = "tp-sglang-scale-dim"
    MTP_MISSING = "mtp-missing"
    MTP_QUANTIZED = "mtp-quantized"
    MTP_NOT_EXCLUDED = "mtp-not-excluded"
    ROUTER = "router"
    SHARED_EXPERTS_BF16 = "shared-experts-bf16"


@dataclass(frozen=True)
class Finding:
    level: Level
    rule: Rule
    key: str
    message: str
    runtime_effect: str
    fix: str


@dataclass(frozen=True)
class CheckReport:
    path: Path
    layout: str
    runtime: str | None
    tp: int | None
    deep: bool
    files: int
    tensors: int
    findings: tuple[Finding, ...]

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.level is Level.ERROR)

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.level is Level.WARN)

    @property
    def clean(self) -> bool:
        return not self.findings

    def rules(self) -> set[Rule]:
        return {f.rule for f in self.findings}

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "layout": self.layout, "runtime": self.runtime, "tp": self.tp, "deep": self.deep,
            "files": self.files, "tensors": self.tensors,
            "summary": {"errors": len(self.errors), "warnings": len(self.warnings)},
            "findings": [
                {"level": f.level.value, "rule": f.rule.value, "key": f.key, "message": f.message,
                 "runtime_effect": f.runtime_effect, "fix": f.fix}
                for f in self.findings
            ],
        }


# ---------------------------------------------------------------------------------------------------------------
# Runtime versions. The one table of version-dependent runtime behaviour; every row cites where it comes from.


@dataclass(frozen=True)
class Runtime:
    name: str
    version: Any  # packaging.version.Version, or None when only the runtime name was given

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}=={self.version}"


RUNTIMES = ("vllm", "sglang")


def parse_runtime(spec: str) -> Runtime:
    """`vllm==0.15.1`, `sglang==0.5.8.post1`, or a bare `vllm` / `sglang` (version unknown)."""
    from packaging.version import InvalidVersion, Version

    name, sep, version = spec.strip().partition("==")
    name = name.strip().lower()
    if name not in RUNTIMES or (sep and not version.strip()):
        raise UserError(f"--runtime {spec!r}: expected vllm==VERSION or sglang==VERSION (or a bare vllm / sglang)")
    if not sep:
        return Runtime(name, None)
    try:
        return Runtime(name, Version(version.strip()))
    except InvalidVersion:
        raise UserError(f"--runtime {spec!r}: {version.strip()!r} is not a version number; e.g. vllm==0.15.1") from None


@dataclass(frozen=True)
class RuntimeIssue:
    affected_below: str | None  # the first release that can contain the fix; None: every release so far
    fixed_in: str | None  # the first release known to contain it; None: no release confirmed
    source: str


class Status(Enum):
    AFFECTED = "affected"
    UNCONFIRMED = "unconfirmed"
    FIXED = "fixed"


# Sources: /work/shared/reference/serving-runtimes.md sections 2 and 5, the PR pages it cites, and
# /work/shared/seeds/000 and 002 (AlexGS74/glm47-nvfp4-sm120). A release at or above `affected_below` but below a
# confirmed `fixed_in` is "unconfirmed": the fix merged in that window, but no source says which release shipped it.
RUNTIME_ISSUES: Mapping[str, Mapping[str, RuntimeIssue]] = {
    # glm4_moe's stacked q/k/v mapping renames `self_attn.k_proj.k_scale` to `qkv_proj.k_scale` before the kv-scale
    # remap: `KeyError: 'layers.N.self_attn.qkv_proj.k_scale'` (seen on vLLM 0.15.1, seed 000). vllm#41755 (opened
    # 2026-05-05, merged) remaps inside the loop; v0.20.0 was on PyPI by 2026-05-06, so 0.20.x and older crash.
    # sglang#18546 (commit 33c33a7de, merged about 2026-02-20, after v0.5.8.post1 of 2026-02-05) is the SGLang fix.
    "glm4-kv-scale-keyerror": {
        "vllm": RuntimeIssue("0.21.0", None, "vllm#41755"),
        "sglang": RuntimeIssue("0.5.9", None, "sglang#18546"),
    },
    # `assert weight_scale.shape[dim] % 16 == 0` ("Expected w2_weight_scale.dim(2) to be divisible by 16") in
    # modelopt_quant.py; removed by sglang#12497, which fixes sglang#14388 (December 2025), so after v0.5.6
    # (2025-12-02). The Tengyunw/GLM-4.7-NVFP4 card (2025-12-26) still patched it out (seed 002).
    "sglang-nvfp4-scale-dim16": {
        "sglang": RuntimeIssue("0.5.7", None, "sglang#12497"),
    },
}


def issue_status(issue: str, runtime: Runtime) -> Status | None:
    """How `runtime` stands on a table row; None when the row does not concern that runtime."""
    from packaging.version import Version

    row = RUNTIME_ISSUES[issue].get(runtime.name)
    if row is None:
        return None
    if runtime.version is None:
        return Status.UNCONFIRMED
    if row.fixed_in is not None and runtime.version >= Version(row.fixed_in):
        return Status.FIXED
    if row.affected_below is None or runtime.version < Version(row.affected_below):
        return Status.AFFECTED
    return Status.UNCONFIRMED


# ---------------------------------------------------------------------------------------------------------------
# Layouts: which tensors a quantized Linear carries, with which dtype and shape.


class Layout(StrEnum):
    MODELOPT_NVFP4 = "modelopt-nvfp4"
    CT_NVFP4 = "compressed-tensors-nvfp4"
    CT_FP8_BLOCK = "compressed-tensors-fp8-block"


class Role(Enum):
    WEIGHT = "weight"
    BLOCK_SCALE = "block scale"
    GLOBAL_SCALE = "global weight scale"
    INPUT_SCALE = "input scale"


SCALAR_SHAPES = ((), (1,))
FLOAT_DTYPES = frozenset({"BF16", "F16", "F32"})


@dataclass(frozen=True)
class ParamSpec:
    leaf: str
    role: Role
    dtypes: frozenset[str]
    shape: Callable[[int, int], tuple[int, ...]] | None  # of (out, in); None for a scalar

    def expected(self, out: int, in_: int) -> str:
        return "[] or [1]" if self.shape is None else str(list(self.shape(out, in_)))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ModelOpt: X.weight U8 [out, in/2], X.weight_scale F8_E4M3 [out, in/16], X.weight_scale_2 F32 [], X.input_scale F32 []
# (hands-on-quantization-cpu.md section 3). compressed-tensors NVFP4: weight_packed / weight_scale /
# weight_global_scale [1] / input_global_scale [1], the global scales reciprocal (section 5). FP8 block: weight
# F8_E4M3 [out, in], weight_scale [ceil(out/128), ceil(in/128)] -- vLLM declares it fp32; llm-compressor writes BF16
# and vLLM's copy_ casts it, so both are fine.
LAYOUT_PARAMS: Mapping[Layout, tuple[ParamSpec, ...]] = {
    Layout.MODELOPT_NVFP4: (
        ParamSpec("weight", Role.WEIGHT, frozenset({"U8"}), lambda o, i: (o, i // 2)),
        ParamSpec("weight_scale", Role.BLOCK_SCALE, frozenset({"F8_E4M3"}), lambda o, i: (o, i // 16)),
        ParamSpec("weight_scale_2", Role.GLOBAL_SCALE, frozenset({"F32"}), None),
        ParamSpec("input_scale", Role.INPUT_SCALE, frozenset({"F32"}), None),
    ),
    Layout.CT_NVFP4: (
        ParamSpec("weight_packed", Role.WEIGHT, frozenset({"U8"}), lambda o, i: (o, i // 2)),
        ParamSpec("weight_scale", Role.BLOCK_SCALE, frozenset({"F8_E4M3"}), lambda o, i: (o, i // 16)),
        ParamSpec("weight_global_scale", Role.GLOBAL_SCALE, frozenset({"F32"}), None),
        ParamSpec("input_global_scale", Role.INPUT_SCALE, frozenset({"F32"}), None),
    ),
    Layout.CT_FP8_BLOCK: (
        ParamSpec("weight", Role.WEIGHT, frozenset({"F8_E4M3"}), lambda o, i: (o, i)),
        ParamSpec("weight_scale", Role.BLOCK_SCALE, frozenset({"F32", "BF16", "F16"}),
                  lambda o, i: (_cdiv(o, 128), _cdiv(i, 128))),
    ),
}


def param(layout: Layout, role: Role) -> ParamSpec | None:
    return next((p for p in LAYOUT_PARAMS[layout] if p.role is role), None)


def is_nvfp4(layout: Layout) -> bool:
    return layout in (Layout.MODELOPT_NVFP4, Layout.CT_NVFP4)


# Every leaf name that belongs to a quantized Linear in any layout (a BF16 module carrying one is half-converted).
QUANT_LEAVES = frozenset(p.leaf for specs in LAYOUT_PARAMS.values() for p in specs if p.role is not Role.WEIGHT) | {
    "weight_packed", "pre_quant_scale"}
# The Linear layers vLLM/SGLang hand to the quantization method (the router `mlp.gate`, `eh_proj`, `lm_head` and the
# embeddings never are: glm4_moe builds them with quant_config=None or as non-Linear layers).
LINEAR_PROJS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "q_a_proj",
                          "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"})
# Groups a runtime loads as one fused layer: qkv_proj, gate_up_proj (dense, shared expert, each routed expert's w13)
# and fused_qkv_a_proj (glm4_moe_lite `packed_modules_mapping`).
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"))
_FUSED_OF = {proj: group for group in FUSED_GROUPS for proj in group}
KV_SCALE_LEAVES = ("k_scale", "v_scale", "kv_scale", "q_scale")
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------------------------
# Loading: config files, index and headers. Every unusable input is a UserError (exit 2).


class TensorRef(NamedTuple):
    file: str
    info: TensorInfo


@dataclass(frozen=True)
class QuantSpec:
    layout: Layout
    algo: str
    exclude: tuple[str, ...]
    exclude_key: str
    kv_cache: str | None
    config_findings: tuple[Finding, ...]


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: Mapping[str, Any]
    hf_quant_config: Mapping[str, Any] | None
    quant: QuantSpec
    index: Mapping[str, Any] | None
    headers: Mapping[str, SafetensorsHeader]
    tensors: Mapping[str, TensorRef]
    index_findings: tuple[Finding, ...]

    @property
    def mtp_layers(self) -> range:
        """The MTP layers' indices: they follow the decoder layers (`model.layers.{num_hidden_layers}` on)."""
        n = self.config.get("num_hidden_layers")
        k = self.config.get("num_nextn_predict_layers") or 0
        if type(n) is not int or type(k) is not int or n < 0 or not 0 <= k <= MAX_MTP_LAYERS:
            return range(0)
        return range(n, n + k)


INDEX_NAME = "model.safetensors.index.json"
# GLM and DeepSeek checkpoints carry one MTP layer; a config claiming thousands is corrupt, not a model.
MAX_MTP_LAYERS = 16
HF_QUANT_CONFIG = "hf_quant_config.json"


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"{path}: not valid JSON ({str(e)[:100]}); re-export or re-download it") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level is a JSON {type(data).__name__}, not an object; re-export it")
    return data


def _exclude_matcher(layout: Layout, patterns: tuple[str, ...]) -> Callable[[str], bool]:
    """Whether a module is skipped by the quantization method.

    ModelOpt (vLLM `is_layer_excluded`): exact name, a dotted parent, or an fnmatch pattern where `path*` means
    `path` or `path.*` (vllm#28072). compressed-tensors (`match_name`): exact name, or `re:` + `re.match`.
    """
    exact = frozenset(p for p in patterns if not p.startswith("re:") and not any(c in p for c in "*?["))
    if layout is Layout.MODELOPT_NVFP4:
        prefixes = frozenset(p[:-1] for p in patterns if p.endswith("*") and not any(c in p[:-1] for c in "*?["))
        dotted = tuple(p + "." for p in prefixes)
        globs = tuple(p for p in patterns if any(c in p for c in "*?[") and p[:-1] not in prefixes)

        def modelopt(module: str) -> bool:
            if module in exact or module in prefixes or module.startswith(dotted):
                return True
            parent = module
            while "." in parent:
                parent = parent.rpartition(".")[0]
                if parent in exact:
                    return True
            return any(fnmatch.fnmatchcase(module, g) for g in globs)

        return modelopt
    regexes = []
    for p in patterns:
        if p.startswith("re:"):
            try:
                regexes.append(re.compile(p[3:]))
            except re.error as e:
                raise UserError(f"quantization_config.ignore: {p!r} is not a valid regex ({e}); fix the pattern") \
                    from None

    def compressed_tensors(module: str) -> bool:
        return module in exact or any(r.match(module) for r in regexes)

    return compressed_tensors


def _obj(value: Any, where: str) -> dict[str, Any]:
    """A JSON object from a config file; absent (null) reads as empty, anything else is unusable input."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(value).__name__}; re-export the checkpoint")
    return value


def _quant_spec(path: Path, config: Mapping[str, Any], hf_quant: Mapping[str, Any] | None) -> QuantSpec:
    qc = config.get("quantization_config")
    if qc is not None:
        qc = _obj(qc, f"{path / 'config.json'}: quantization_config")
    method = (qc or {}).get("quant_method")
    if method == "compressed-tensors":
        if hf_quant is not None:
            raise UserError(f"{path}: config.json says compressed-tensors but {HF_QUANT_CONFIG} is a ModelOpt config; "
                            "remove the one that does not describe the weights")
        return _ct_spec(path, qc)
    if method == "modelopt" or (qc is None and hf_quant is not None):
        return _modelopt_spec(path, qc, hf_quant)
    if qc is None:
        raise UserError(f"{path}: config.json has no quantization_config and there is no {HF_QUANT_CONFIG}; "
                        "this is not a quantized checkpoint")
    raise UserError(f"{path / 'config.json'}: quant_method {method!r} is not supported; check reads ModelOpt and "
                    "compressed-tensors checkpoints")


_MODELOPT_ALGOS = frozenset({"NVFP4", "NVFP4_AWQ"})


def _modelopt_spec(path: Path, qc: Mapping[str, Any] | None, hf_quant: Mapping[str, Any] | None) -> QuantSpec:
    findings: list[Finding] = []
    legacy = None
    if hf_quant is not None:
        legacy = _obj(hf_quant.get("quantization"), f"{path / HF_QUANT_CONFIG}: quantization")
    # vLLM reads config.json's quantization_config when it is present and only falls back to hf_quant_config.json
    # (get_quant_config); SGLang and TRT-LLM read hf_quant_config.json.
    source = qc if qc is not None else legacy
    algo = str(source.get("quant_algo") or "").upper()
    if algo == "MIXED_PRECISION":
        where = f"{path}: quantized_layers"
        layers = _obj((legacy or {}).get("quantized_layers") or source.get("quantized_layers"), where)
        algos = {str(_obj(v, where).get("quant_algo", "")).upper() for v in layers.values()}
        if not algos or not algos <= _MODELOPT_ALGOS:
            raise UserError(f"{path}: MIXED_PRECISION with layer algorithms {sorted(algos)}; check supports NVFP4 and "
                            "NVFP4_AWQ layers only")
    elif algo not in _MODELOPT_ALGOS:
        raise UserError(f"{path}: ModelOpt quant_algo {algo or None!r} is not supported; check reads NVFP4 checkpoints")

    if qc is not None:
        exclude, exclude_key = qc.get("ignore", []), "config.json:quantization_config.ignore"
        scheme = qc.get("kv_cache_scheme")
        fp8 = isinstance(scheme, dict) and scheme.get("type") == "float" and scheme.get("num_bits") == 8
        kv = "FP8" if fp8 else None
        if legacy is not None and kv != (legacy.get("kv_cache_quant_algo") or None):
            findings.append(Finding(
                Level.WARN, Rule.CONFIG, "config.json:quantization_config.kv_cache_scheme",
                f"config.json says KV cache {kv}, {HF_QUANT_CONFIG} says {legacy.get('kv_cache_quant_algo')}",
                "vLLM follows config.json, SGLang and TRT-LLM follow hf_quant_config.json: they disagree on the KV "
                "cache dtype.", "Make both files describe the same KV cache quantization."))
    else:
        exclude, exclude_key = legacy.get("exclude_modules", []), f"{HF_QUANT_CONFIG}:quantization.exclude_modules"
        kv = legacy.get("kv_cache_quant_algo") or None
        missing = [k for k in ("group_size", "kv_cache_quant_algo", "exclude_modules") if k not in legacy]
        if missing:
            findings.append(Finding(
                Level.ERROR, Rule.CONFIG, f"{HF_QUANT_CONFIG}:quantization",
                f"missing {', '.join(missing)} (null is allowed, absent is not)",
                "vLLM raises ValueError: NVFP4 quantization requires the following fields in hf_quant_config.json",
                f"Add {', '.join(missing)} to {HF_QUANT_CONFIG} (exclude_modules: [], kv_cache_quant_algo: null)."))
    if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
        raise UserError(f"{path}: {exclude_key} is not a list of strings; re-export the checkpoint")
    if qc is not None and legacy is not None:
        other = legacy.get("exclude_modules") or []
        if not isinstance(other, list) or not all(isinstance(p, str) for p in other):
            raise UserError(f"{path / HF_QUANT_CONFIG}: quantization.exclude_modules is not a list of strings; "
                            "re-export the checkpoint")
        if sorted(other) != sorted(exclude):
            findings.append(Finding(
                Level.WARN, Rule.CONFIG, f"{HF_QUANT_CONFIG}:quantization.exclude_modules",
                f"differs from config.json quantization_config.ignore "
                f"({len(set(other) ^ set(exclude))} entries in only one of them)",
                "vLLM skips the modules config.json lists; SGLang and TRT-LLM skip the ones hf_quant_config.json "
                "lists, so one of them quantizes a BF16 module or skips a quantized one.",
                "Make the two lists identical."))
    group = (legacy or {}).get("group_size", (qc or {}).get("group_size", 16))
    if group not in (None, 16):
        findings.append(Finding(
            Level.ERROR, Rule.CONFIG, f"{HF_QUANT_CONFIG}:quantization.group_size", f"group_size is {group!r}",
            "NVFP4 blocks are 16 values; vLLM sizes weight_scale as [out, in/group_size], so the block scales load "
            "into the wrong shape.", "Set group_size to 16 (and re-export if the scales really use another size)."))
    if kv not in (None, "FP8", "NVFP4"):
        findings.append(Finding(
            Level.ERROR, Rule.CONFIG, f"{HF_QUANT_CONFIG}:quantization.kv_cache_quant_algo",
            f"kv_cache_quant_algo {kv!r}",
            "vLLM accepts only FP8 and NVFP4 (KV_CACHE_QUANT_ALGOS) and raises ValueError.",
            "Set kv_cache_quant_algo to FP8 or null."))
    return QuantSpec(Layout.MODELOPT_NVFP4, algo, tuple(exclude), exclude_key, kv, tuple(findings))


def _ct_spec(path: Path, qc: Mapping[str, Any]) -> QuantSpec:
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise UserError(f"{path / 'config.json'}: compressed-tensors quantization_config has no config_groups; "
                        "re-export the checkpoint")
    where = f"{path / 'config.json'}: quantization_config.config_groups"
    groups = {name: _obj(g, f"{where}.{name}") for name, g in groups.items()}
    weights = {name: _obj(g.get("weights"), f"{where}.{name}.weights") for name, g in groups.items()}
    formats = {str(g.get("format") or qc.get("format")) for g in groups.values()}
    findings: list[Finding] = []
    if formats == {"nvfp4-pack-quantized"}:
        layout = Layout.CT_NVFP4
    elif formats == {"float-quantized"}:
        if not all(w.get("strategy") == "block" for w in weights.values()):
            raise UserError(f"{path / 'config.json'}: float-quantized without strategy 'block'; check reads FP8 "
                            "block checkpoints only")
        layout = Layout.CT_FP8_BLOCK
        for name, g in groups.items():
            block = weights[name].get("block_structure")
            if block != [128, 128]:
                findings.append(Finding(
                    Level.ERROR, Rule.CONFIG, f"config.json:quantization_config.config_groups.{name}.weights",
                    f"block_structure {block!r}",
                    "vLLM's SM120 CUTLASS block-FP8 kernel is fixed at 1x128x128 granularity (and DeepGEMM is not "
                    "built for SM120); other block shapes fall back or fail.",
                    "Re-quantize with block_structure [128, 128]."))
            act = _obj(g.get("input_activations"), f"{where}.{name}.input_activations")
            if act and act.get("dynamic") is not True:
                findings.append(Finding(
                    Level.ERROR, Rule.CONFIG, f"config.json:quantization_config.config_groups.{name}.input_activations",
                    "static input activations with block weights",
                    "vLLM's CompressedTensorsW8A8Fp8 asserts `not self.is_static_input_scheme` for block weights.",
                    "Use dynamic per-group (group_size 128) activations, as llm-compressor's FP8_BLOCK scheme does."))
    else:
        raise UserError(f"{path / 'config.json'}: compressed-tensors format {sorted(formats)} is not "
                        "supported; check reads nvfp4-pack-quantized and float-quantized (block)")
    ignore = qc.get("ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        raise UserError(f"{path / 'config.json'}: quantization_config.ignore is not a list of strings; re-export it")
    kv = "FP8" if qc.get("kv_cache_scheme") else None
    return QuantSpec(layout, str(layout), tuple(ignore), "config.json:quantization_config.ignore", kv, tuple(findings))


def _index_findings(weight_map: Mapping[str, str], tensors: Mapping[str, TensorRef]) -> Iterator[Finding]:
    for name, f in weight_map.items():
        if name not in tensors:
            yield Finding(Level.ERROR, Rule.INDEX, name, f"listed in the index under {f} but in no shard header",
                          "transformers and SGLang fail to find the tensor; vLLM never loads it.",
                          "Regenerate model.safetensors.index.json from the shard headers.")
        elif tensors[name].file != f:
            yield Finding(Level.ERROR, Rule.INDEX, name, f"index says {f}, the tensor is in {tensors[name].file}",
                          "Loaders that open the file the index names fail to find the tensor.",
                          "Regenerate model.safetensors.index.json from the shard headers.")
    for name, ref in tensors.items():
        if name not in weight_map:
            yield Finding(Level.WARN, Rule.INDEX, name, f"in {ref.file} but not in the index",
                          "transformers ignores it; vLLM loads it because it reads whole files.",
                          "Add it to model.safetensors.index.json or remove it from the shard.")


def load_checkpoint(path: Path) -> Checkpoint:
    """Read the config files and every shard header; no tensor data."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a checkpoint folder (no such directory)")
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json; this is not a Hugging Face checkpoint folder")
    config = read_json(path / "config.json")
    hf_quant = read_json(path / HF_QUANT_CONFIG) if (path / HF_QUANT_CONFIG).is_file() else None
    quant = _quant_spec(path, config, hf_quant)

    index = None
    findings: list[Finding] = []
    if (path / INDEX_NAME).is_file():
        index = read_json(path / INDEX_NAME)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{path / INDEX_NAME}: weight_map is not a map of tensor names to file names; re-export it")
        files = sorted(set(weight_map.values()))
        for f in files:
            if "/" in f or f.startswith(".") or not (path / f).is_file():
                raise UserError(f"{path / INDEX_NAME}: shard {f!r} is missing; the download is incomplete")
    else:
        weight_map = None
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise UserError(f"{path}: no *.safetensors files; this is not a safetensors checkpoint")

    headers = {f: read_header(path / f) for f in files}
    tensors: dict[str, TensorRef] = {}
    for f, header in headers.items():
        for name in header.tensors.keys() & tensors.keys():
            findings.append(Finding(
                Level.ERROR, Rule.INDEX, name, f"stored in both {tensors[name].file} and {f}",
                "vLLM loads both copies in file order and the later one wins; transformers loads the index's.",
                "Keep one copy and fix the index."))
        make = tuple.__new__  # the same TensorRef, without NamedTuple's Python-level __new__ (90k+ of them)
        tensors |= {name: make(TensorRef, (f, info)) for name, info in header.tensors.items() if name not in tensors}
    if weight_map is not None and weight_map != {name: ref.file for name, ref in tensors.items()}:
        findings.extend(_index_findings(weight_map, tensors))
    return Checkpoint(path, config, hf_quant, quant, index, headers, tensors, tuple(findings))


# ---------------------------------------------------------------------------------------------------------------
# Model structure: the Linear modules, their expected shapes from config.json, the fused groups.


class Module:
    """One Linear of the checkpoint and what the rules ask about it, worked out once (GLM-4.7 has 44k of them)."""

    __slots__ = ("category", "excluded", "fweight", "mtp", "name", "params", "parent", "proj", "quantized", "qweight",
                 "shape")

    def __init__(self, name: str):
        self.name = name
        self.params: dict[str, TensorRef] = {}
        self.parent, _, self.proj = name.rpartition(".")
        self.category = ("expert" if ".mlp.experts." in name else "shared" if ".mlp.shared_experts." in name
                         else "dense" if ".mlp." in name else "attn")
        self.qweight: TensorRef | None = None  # the weight in a quantized dtype
        self.fweight: TensorRef | None = None  # the weight in BF16/F16/F32
        self.quantized = False  # a quantized weight or any quantization tensor
        self.excluded = False
        self.mtp = False
        self.shape: tuple[int, int] | None = None  # (out, in)

    @property
    def is_expert(self) -> bool:
        return self.category == "expert"

    @property
    def is_shared_expert(self) -> bool:
        return self.category == "shared"


def _int(cfg: Mapping[str, Any], key: str) -> int | None:
    v = cfg.get(key)
    return v if type(v) is int and v > 0 else None


def config_shape(cfg: Mapping[str, Any], category: str, proj: str) -> tuple[int, int] | None:
    """(out, in) of a Linear from config.json, for the GLM-4.7 (glm4_moe) and GLM-4.7-Flash (glm4_moe_lite) layouts;
    `category` is attn, dense, shared or expert. None when the config does not determine it (another
    architecture, or a key missing)."""
    model_type = cfg.get("model_type")
    hidden = _int(cfg, "hidden_size")
    if model_type not in ("glm4_moe", "glm4_moe_lite") or hidden is None:
        return None
    if category != "attn":
        if category == "expert":
            inter = _int(cfg, "moe_intermediate_size")
        elif category == "shared":
            moe, shared = _int(cfg, "moe_intermediate_size"), _int(cfg, "n_shared_experts")
            inter = moe * shared if moe and shared else None
        else:
            inter = _int(cfg, "intermediate_size")
        if inter is None or proj not in ("gate_proj", "up_proj", "down_proj"):
            return None
        return (hidden, inter) if proj == "down_proj" else (inter, hidden)
    heads = _int(cfg, "num_attention_heads")
    if heads is None:
        return None
    if model_type == "glm4_moe":
        head_dim = _int(cfg, "head_dim") or hidden // heads
        kv = _int(cfg, "num_key_value_heads") or heads
        return {"q_proj": (heads * head_dim, hidden), "k_proj": (kv * head_dim, hidden),
                "v_proj": (kv * head_dim, hidden), "o_proj": (hidden, heads * head_dim)}.get(proj)
    nope, rope, v_dim = (_int(cfg, k) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    kv_lora, q_lora = _int(cfg, "kv_lora_rank"), _int(cfg, "q_lora_rank")
    if None in (nope, rope, v_dim, kv_lora):
        return None
    shapes = {"kv_a_proj_with_mqa": (kv_lora + rope, hidden), "kv_b_proj": (heads * (nope + v_dim), kv_lora),
              "o_proj": (hidden, heads * v_dim), "q_proj": (heads * (nope + rope), hidden)}
    if q_lora:
        shapes |= {"q_a_proj": (q_lora, hidden), "q_b_proj": (heads * (nope + rope), q_lora)}
    return shapes.get(proj)


def is_mla(cfg: Mapping[str, Any]) -> bool:
    return _int(cfg, "kv_lora_rank") is not None


# ---------------------------------------------------------------------------------------------------------------
# The run: one context shared by the rules.


# Scalars of one shard are read with a single positioned read when they lie within this span (safetensors' writer
# puts all fp32 tensors together, so in real exports they do).
SCALAR_SPAN = 16 << 20


class CheckContext:
    def __init__(self, ckpt: Checkpoint, runtime: Runtime | None, tp: int | None, deep: bool):
        self.ckpt = ckpt
        self.runtime = runtime
        self.tp = tp
        self.deep = deep
        self.layout = ckpt.quant.layout
        self.specs = {p.leaf: p for p in LAYOUT_PARAMS[self.layout]}
        self.weight_spec = param(self.layout, Role.WEIGHT)
        self._exclude_match = _exclude_matcher(self.layout, ckpt.quant.exclude)
        self._excluded: dict[str, bool] = {}
        self.mtp_prefixes = tuple(f"model.layers.{i}." for i in ckpt.mtp_layers)
        self.modules: dict[str, Module] = {}
        for name, ref in ckpt.tensors.items():
            module, _, leaf = name.rpartition(".")
            if module.rpartition(".")[2] in LINEAR_PROJS:
                m = self.modules.get(module)
                if m is None:
                    m = self.modules[module] = Module(module)
                m.params[leaf] = ref
        shapes: dict[tuple[str, str], tuple[int, int] | None] = {}
        for m in self.modules.values():
            m.qweight, m.fweight = self._quantized_weight(m.params), self._float_weight(m.params)
            m.quantized = m.qweight is not None or not QUANT_LEAVES.isdisjoint(m.params)
            m.excluded = self._exclude_match(m.name)
            m.mtp = self.is_mtp(m.name)
            key = (m.category, m.proj)
            if key not in shapes:
                shapes[key] = config_shape(ckpt.config, m.category, m.proj)
            m.shape = shapes[key] or self._tensor_shape(m)
        self._readers: dict[str, TensorReader] = {}
        self._scalars: dict[tuple[str, int], float] = {}
        self.cache: dict[str, dict] = {}  # per-run memo tables of the rules

    # -- tensor access
    def reader(self, file: str) -> TensorReader:
        if file not in self._readers:
            self._readers[file] = TensorReader(self.ckpt.path / file)
        return self._readers[file]

    def prefetch_scalars(self, refs: list[TensorRef]) -> None:
        """Read the fp32 scalars among `refs` with one read per shard when they sit close together."""
        by_file: dict[str, list[TensorInfo]] = defaultdict(list)
        for ref in refs:
            if ref.info.dtype == "F32" and ref.info.end - ref.info.start == 4:
                by_file[ref.file].append(ref.info)
        for file, infos in by_file.items():
            lo, hi = min(i.start for i in infos), max(i.end for i in infos)
            if hi - lo > SCALAR_SPAN:
                continue
            buf = self.reader(file).read_span(lo, hi, "the scalar scales")
            for i in infos:
                self._scalars[(file, i.start)] = struct.unpack_from("<f", buf, i.start - lo)[0]

    def scalar(self, ref: TensorRef) -> float:
        """The value of a one-element tensor."""
        cached = self._scalars.get((ref.file, ref.info.start))
        if cached is not None:
            return cached
        data = self.reader(ref.file).read_bytes(ref.info)
        if ref.info.dtype == "F32" and len(data) == 4:
            return struct.unpack("<f", data)[0]
        return float(self.reader(ref.file).read(ref.info).float().reshape(-1)[0])

    def tensor(self, ref: TensorRef):
        return self.reader(ref.file).read(ref.info)

    def close(self) -> None:
        for r in self._readers.values():
            r.close()

    # -- names
    def excluded(self, module: str) -> bool:
        hit = self._excluded.get(module)
        if hit is None:
            hit = self._excluded[module] = self._exclude_match(module)
        return hit

    def is_mtp(self, name: str) -> bool:
        return bool(self.mtp_prefixes) and name.startswith(self.mtp_prefixes)

    # -- module facts, computed once in __init__
    def _quantized_weight(self, params: Mapping[str, TensorRef]) -> TensorRef | None:
        ref = params.get(self.weight_spec.leaf)
        if ref is not None and ref.info.dtype in self.weight_spec.dtypes:
            return ref
        # A weight in another layout's quantized form (U8 in an FP8 checkpoint, say) is still not a BF16 weight.
        for leaf in ("weight", "weight_packed"):
            ref = params.get(leaf)
            if ref is not None and ref.info.dtype not in FLOAT_DTYPES:
                return ref
        return None

    @staticmethod
    def _float_weight(params: Mapping[str, TensorRef]) -> TensorRef | None:
        ref = params.get("weight")
        return ref if ref is not None and ref.info.dtype in FLOAT_DTYPES else None

    @staticmethod
    def _tensor_shape(m: Module) -> tuple[int, int] | None:
        """(out, in) from whichever weight tensor is there, for architectures config_shape does not know."""
        ref = m.fweight or m.qweight
        if ref is None or len(ref.info.shape) != 2:
            return None
        out, cols = ref.info.shape
        return (out, cols * 2) if ref.info.dtype == "U8" else (out, cols)


def _finding(level: Level, rule: Rule, key: str, message: str, effect: str, fix: str) -> Finding:
    return Finding(level, rule, key, message, effect, fix)


# ---------------------------------------------------------------------------------------------------------------
# Rules. Each is a generator of findings; `RULES` runs them in order.


def _rule_tensors(ctx: CheckContext) -> Iterator[Finding]:
    """Per quantized / excluded / BF16 Linear: dtypes, shapes, scales present, exclusion consistent."""
    layout = ctx.layout
    for m in ctx.modules.values():
        excluded = m.excluded
        quantized = m.quantized
        qweight, fweight = m.qweight, m.fweight
        if "pre_quant_scale" in m.params:
            yield _finding(
                Level.ERROR, Rule.PRE_QUANT_SCALE, f"{m.name}.pre_quant_scale",
                "AWQ pre_quant_scale present (ModelOpt NVFP4_AWQ / MIXED_PRECISION export)",
                "vLLM's NVFP4 linear and MoE methods have no pre_quant_scale parameter: the tensor is not loaded and "
                "the layer runs without the AWQ input scaling, so its output is wrong.",
                "Re-export with NVFP4_DEFAULT (max calibration); AWQ-lite on this MoE layout also changes routing.")
        if excluded:
            if qweight is not None:
                yield _finding(
                    Level.ERROR, Rule.EXCLUDED_QUANTIZED, f"{m.name}.{qweight.info.name.rpartition('.')[2]}",
                    f"{ctx.ckpt.quant.exclude_key} excludes {m.name} but its weight is {qweight.info.dtype} "
                    f"{list(qweight.info.shape)}",
                    "The runtime builds an unquantized BF16 layer: the packed weight fails the shape check "
                    "(AssertionError in the weight loader) or, for FP8, is read as raw values without its scales.",
                    f"Remove {m.name} from the exclude list, or store it in BF16.")
            elif fweight is not None and quantized:
                leaves = sorted(leaf for leaf in m.params if leaf in QUANT_LEAVES)
                yield _finding(
                    Level.ERROR, Rule.EXCLUDED_SCALES, m.name,
                    f"excluded and BF16 but still carries {', '.join(leaves)}",
                    "An unquantized layer has no such parameters: the model's load_weights raises KeyError on them "
                    "(params_dict lookup) or skips them, depending on the loader.",
                    "Drop the leftover scale tensors (`quantize fix --only excluded-scales`).")
            continue
        if not quantized:
            if fweight is None:
                continue
            if m.mtp:
                yield _finding(
                    Level.ERROR, Rule.MTP_NOT_EXCLUDED, m.name,
                    f"MTP layer module is {fweight.info.dtype} but not in {ctx.ckpt.quant.exclude_key}",
                    "The MTP draft layer is built with the checkpoint's quant config, so its weight parameter is "
                    f"{layout} ({_quant_shape_text(ctx, m)}): loading the BF16 weight fails the shape check when "
                    "speculative decoding (method mtp) is enabled.",
                    f"Exclude the MTP layer (`quantize fix --only {Rule.MTP_NOT_EXCLUDED}`).")
            else:
                yield _finding(
                    Level.ERROR, Rule.NOT_EXCLUDED, m.name,
                    f"{fweight.info.dtype} weight but not in {ctx.ckpt.quant.exclude_key}",
                    f"The runtime creates {layout} parameters for it ({_quant_shape_text(ctx, m)}): loading the BF16 "
                    "weight fails the shape check (AssertionError) or the weight name has no parameter (KeyError).",
                    f"Add {m.name} to the exclude list (`quantize fix --only {Rule.NOT_EXCLUDED}`).")
            continue
        yield from _check_quantized_module(ctx, m)


def _quant_shape_text(ctx: CheckContext, m: Module) -> str:
    shape = m.shape
    spec = ctx.weight_spec
    dims = list(spec.shape(*shape)) if shape is not None else "[...]"
    return f"{spec.leaf} {'/'.join(sorted(spec.dtypes))} {dims}"


def _expected_shapes(ctx: CheckContext, shape: tuple[int, int] | None) -> tuple[tuple[int, ...] | None, ...]:
    """The expected shape of each of the layout's tensors for (out, in); None for scalars or an unknown shape."""
    cache = ctx.cache.setdefault("expected_shapes", {})
    if shape not in cache:
        cache[shape] = tuple(None if spec.shape is None or shape is None else spec.shape(*shape)
                             for spec in LAYOUT_PARAMS[ctx.layout])
    return cache[shape]


def _check_quantized_module(ctx: CheckContext, m: Module) -> Iterator[Finding]:
    shape = m.shape
    for spec, expected in zip(LAYOUT_PARAMS[ctx.layout], _expected_shapes(ctx, shape), strict=True):
        ref = m.params.get(spec.leaf)
        if ref is None:
            yield _missing(m, spec)
            continue
        info = ref.info
        scalar_ok = spec.shape is not None or info.shape in SCALAR_SHAPES
        if info.dtype in spec.dtypes and scalar_ok and (expected is None or info.shape == expected):
            continue
        problems = []
        if info.dtype not in spec.dtypes:
            problems.append(f"dtype {info.dtype}, expected {'/'.join(sorted(spec.dtypes))}")
        if not scalar_ok:
            problems.append(f"shape {list(info.shape)}, expected a scalar ([] or [1])")
        elif expected is not None and info.shape != expected:
            problems.append(f"shape {list(info.shape)}, expected {list(expected)} for (out, in) = {shape}")
        yield _finding(
            Level.ERROR, Rule.DTYPE_SHAPE, f"{m.name}.{spec.leaf}", "; ".join(problems),
            "vLLM's weight loaders assert the parameter shape (AssertionError at load) and copy_ casts dtypes "
            "silently, so a wrong dtype changes the values and a wrong shape stops the load.",
            "Re-export the checkpoint with the exact NVFP4 / FP8-block tensor layout.")
    if shape is not None and shape[1] % 16 and is_nvfp4(ctx.layout):
        yield _finding(
            Level.ERROR, Rule.DTYPE_SHAPE, m.name, f"in_features {shape[1]} is not a multiple of 16",
            "vLLM raises ValueError: Unsupported model when in features size is not multiple of 16.",
            f"Exclude {m.name} from quantization.")


def _missing(m: Module, spec: ParamSpec) -> Finding:
    if spec.role is Role.INPUT_SCALE:
        effect = ("vLLM leaves the static input scale uninitialized; the W4A4 MoE path folds it into the dequant "
                  "alphas (w13_weight_scale_2 *= w13_input_scale), so the expert outputs garbage or zeros depending "
                  "on the allocator (vllm#54427)." if m.is_expert else
                  "vLLM leaves the static input scale uninitialized and quantizes activations with it.")
    elif spec.role is Role.WEIGHT:
        effect = "The layer has no weight to load; the runtime keeps uninitialized memory or raises."
    else:
        effect = (f"vLLM leaves {spec.leaf} uninitialized (newer builds fail with 'NVFP4 weight_scale ... was never "
                  "loaded (still NaN)', vllm#52501).")
    return _finding(Level.ERROR, Rule.MISSING_SCALE, f"{m.name}.{spec.leaf}",
                    f"quantized {m.name} has no {spec.role.value} ({spec.leaf})", effect,
                    "Re-export the checkpoint; this tensor cannot be derived.")


FUSED_NAMES = {"q_proj": "qkv_proj", "gate_proj": "gate_up_proj", "q_a_proj": "fused_qkv_a_proj"}


def fused_groups(ctx: CheckContext) -> Iterator[tuple[str, tuple[str, ...], list[Module]]]:
    """(parent, group, present members) for every fused group with at least two members in the checkpoint."""
    modules = ctx.modules
    for m in modules.values():
        group = _FUSED_OF.get(m.proj)
        if group is None:
            continue
        prefix = m.parent + "."
        # Each group is yielded from its first member present in the checkpoint.
        if m.proj != group[0] and any(prefix + p in modules for p in group[:group.index(m.proj)]):
            continue
        members = [x for x in (modules.get(prefix + p) for p in group) if x is not None]
        if len(members) >= 2:
            yield m.parent, group, members


def _rule_fused(ctx: CheckContext) -> Iterator[Finding]:
    """Fused groups: all members quantized alike, one shared global and input scale."""
    glob_spec, in_spec = param(ctx.layout, Role.GLOBAL_SCALE), param(ctx.layout, Role.INPUT_SCALE)
    groups = list(fused_groups(ctx))
    if glob_spec is not None:
        ctx.prefetch_scalars([r for _, _, members in groups for x in members
                              for r in (x.params.get(glob_spec.leaf), x.params.get(in_spec.leaf)) if r is not None])
    for _, group, members in groups:
        m = members[0]
        state = {x.name: x.quantized for x in members}
        excl = {x.name: x.excluded for x in members}
        fused_name = FUSED_NAMES[group[0]]
        if len(set(state.values())) > 1 or len(set(excl.values())) > 1:
            yield _finding(
                Level.ERROR, Rule.FUSED_PARTIAL, f"{m.parent}.{fused_name}",
                "shards differ: " + ", ".join(f"{x.rpartition('.')[2]} {'quantized' if q else 'BF16'}"
                                              f"{' (excluded)' if excl[x] else ''}" for x, q in state.items()),
                f"vLLM loads {'/'.join(group)} as one {fused_name} layer with one quantization method: it raises "
                "'Detected some but not all shards of ... are quantized' (ModelOpt) or 'Found a different "
                "quantization schemes' (compressed-tensors).",
                f"Quantize or exclude {', '.join(group)} together.")
            continue
        if not all(state.values()) or glob_spec is None:
            continue
        if any(x.excluded for x in members):
            continue
        yield from _compare_scales(ctx, m.parent, members, glob_spec, fused_name, "weight")
        yield from _compare_scales(ctx, m.parent, members, in_spec, fused_name, "input")


def _compare_scales(ctx: CheckContext, parent: str, members: list[Module], spec: ParamSpec, fused_name: str,
                    what: str) -> Iterator[Finding]:
    refs = [x.params.get(spec.leaf) for x in members]
    if any(r is None or r.info.numel != 1 for r in refs):
        return  # reported by the dtype/shape and missing-scale checks
    values = [ctx.scalar(r) for r in refs]
    if len(set(values)) == 1:
        return
    finite = [abs(v) for v in values if math.isfinite(v) and v != 0]
    ratio = max(finite) / min(finite) if len(finite) == len(values) else math.inf
    expert = members[0].is_expert
    listing = ", ".join(f"{x.proj}={v:.6g}" for x, v in zip(members, values, strict=True))
    if expert and what == "weight":
        effect = (f"vLLM's ModelOptNvFp4FusedMoE keeps only the gate's {spec.leaf} for w13 (warning 'w1_weight_scale_2 "
                  f"must match w3_weight_scale_2'), so up_proj is dequantized off by {ratio:.3g}x: garbage output on "
                  "SM120 (vllm#54150). SGLang does the same; TRT-LLM asserts w1_weight_scale_2 == w3_weight_scale_2.")
    elif expert:
        effect = ("vLLM reduces w13 input scales to one value; TRT-LLM asserts 'w1_input_scale != w3_input_scale'; "
                  "gate and up see one activation quantization, so one of them is calibrated for the wrong range.")
    else:
        effect = (f"vLLM warns that global scales differ for parallel layers and uses the max for the whole "
                  f"{fused_name} without rescaling the block scales: shards with the smaller scale are off by up to "
                  f"{ratio:.3g}x.")
    yield _finding(
        Level.ERROR, Rule.FUSED_SCALES, f"{parent}.{fused_name}.{spec.leaf}",
        f"{what} scales differ across the fused shards: {listing} (ratio {ratio:.3g})", effect,
        f"Unify to the max and re-derive block scales and FP4 codes (`quantize fix --only {Rule.FUSED_SCALES}`).")


def _rule_exclusion_groups(ctx: CheckContext) -> Iterator[Finding]:
    """All routed experts of a layer are one FusedMoE layer: one scheme for all of them."""
    by_layer: dict[str, dict[bool, int]] = defaultdict(lambda: {True: 0, False: 0})
    for m in ctx.modules.values():
        if m.is_expert:
            by_layer[m.name.partition(".mlp.experts.")[0] + ".mlp.experts"][m.quantized] += 1
    for experts, counts in by_layer.items():
        if counts[True] and counts[False]:
            yield _finding(
                Level.ERROR, Rule.FUSED_PARTIAL, experts,
                f"{counts[True]} expert projections quantized, {counts[False]} BF16",
                "vLLM builds one FusedMoE per layer with one quantization method: 'All MoE projections need to have "
                "same quantization scheme' (ValueError) or a shape assertion while loading.",
                "Quantize every routed expert projection of the layer, or exclude the whole experts module.")


def _rule_deep(ctx: CheckContext) -> Iterator[Finding]:
    """--deep: NaN E4M3 block scales, non-positive FP8-block scales, zero or non-finite scalar scales, all-zero
    weights."""
    if not ctx.deep:
        return
    import torch

    from sm120_quant.quantize.formats import e4m3_nan_bytes

    for m in ctx.modules.values():
        for leaf, ref in m.params.items():
            key = f"{m.name}.{leaf}"
            spec = ctx.specs.get(leaf)
            if leaf == "weight_scale" and ref.info.dtype == "F8_E4M3":
                nan = int(e4m3_nan_bytes(ctx.tensor(ref)).sum())
                if nan:
                    yield _finding(
                        Level.ERROR, Rule.BLOCK_SCALES, key, f"{nan} block scale byte(s) are NaN (0x7F/0xFF)",
                        "One NaN block scale makes the FP4 GEMM output NaN for every token; the model prints '!!!!' "
                        "(newer vLLM also refuses NaN scales at load).",
                        f"Clamp them to 448 (`quantize fix --only {Rule.BLOCK_SCALES}`), or re-export with block "
                        "scales clamped before the E4M3 cast.")
            elif leaf == "weight_scale" and ref.info.dtype in FLOAT_DTYPES and len(ref.info.shape) == 2:
                t = ctx.tensor(ref).float()
                bad = int((~torch.isfinite(t) | (t <= 0)).sum())
                if bad:
                    yield _finding(
                        Level.ERROR, Rule.BLOCK_SCALES, key, f"{bad} block scale(s) are zero, negative or not finite",
                        "The blocks dequantize to zero, flipped or NaN values.", "Re-quantize this layer.")
            elif ref.info.numel == 1 and (leaf in KV_SCALE_LEAVES or (spec and spec.shape is None)):
                v = ctx.scalar(ref)
                if not math.isfinite(v) or v <= 0:
                    yield _finding(
                        Level.ERROR, Rule.SCALAR_SCALES, key, f"scale is {v}",
                        "A zero or non-finite global/input scale turns the layer's output into zeros, inf or NaN "
                        "(compressed-tensors divides by the global scale; ModelOpt multiplies by it).",
                        "Re-calibrate this layer; the scale cannot be recovered from the checkpoint.")
        q = m.qweight
        if q is not None:
            raw = ctx.reader(q.file).read_bytes(q.info)
            # Both zero encodings: E2M1 codes 0 and 8 (both nibbles), E4M3 0x00 and 0x80.
            mask = 0x77 if q.info.dtype == "U8" else 0x7F
            if raw and not raw.translate(_ZERO_MASKS[mask]).strip(b"\0"):
                yield _finding(
                    Level.ERROR, Rule.ZERO_WEIGHT, q.info.name, "every weight value is zero",
                    "The layer outputs zeros; a quantizer with an uncalibrated amax usually did this.",
                    "Re-quantize this layer from the BF16 weights.")
    for name, ref in ctx.ckpt.tensors.items():
        if name.endswith(tuple("." + k for k in KV_SCALE_LEAVES)) and ref.info.numel == 1 \
                and name.rpartition(".")[0] not in ctx.modules:
            v = ctx.scalar(ref)
            if not math.isfinite(v) or v <= 0:
                yield _finding(Level.ERROR, Rule.SCALAR_SCALES, name, f"KV cache scale is {v}",
                               "An FP8 KV cache quantized with this scale stores zeros, inf or NaN.",
                               "Re-calibrate the KV cache scales or drop them (the runtime then uses 1.0).")


_ZERO_MASKS = {mask: bytes(b & mask for b in range(256)) for mask in (0x77, 0x7F)}


def _kv_tensors(ctx: CheckContext) -> dict[str, TensorRef]:
    leaves = tuple("." + k for k in KV_SCALE_LEAVES)
    return {n: r for n, r in ctx.ckpt.tensors.items() if n.endswith(leaves)}


def _rule_kv(ctx: CheckContext) -> Iterator[Finding]:
    kv = _kv_tensors(ctx)
    declared = ctx.ckpt.quant.kv_cache
    attn_layers = sorted({layer_of(m.name) for m in ctx.modules.values()
                          if ".self_attn." in m.name and not m.mtp} - {None})
    if declared and not kv:
        yield _finding(
            Level.WARN, Rule.KV_SCALES, "kv_cache_quant_algo",
            f"KV cache quantization is {declared} but the checkpoint has no k_scale/v_scale tensors",
            "vLLM falls back to scale 1.0 ('Using KV cache scaling factor 1.0 for fp8_e4m3'): K/V values beyond "
            "+-448 saturate.", "Calibrate the KV cache again, or serve with --kv-cache-dtype auto.")
    if kv and not declared:
        yield _finding(
            Level.WARN, Rule.KV_SCALES, next(iter(kv)),
            f"{len(kv)} k/v scale tensors but the config declares no KV cache quantization",
            "vLLM with --kv-cache-dtype auto forces the scales to 1.0 and ignores them; SGLang's TRT-LLM MLA backend "
            "applied k_scale to a BF16 KV cache and produced garbage (sglang PR #18396).",
            f"Drop the k/v scales (`quantize fix --only {Rule.KV_SCALES}`) or declare the KV cache quantization.")
    if kv and declared and not is_mla(ctx.ckpt.config):
        have = {layer_of(n) for n in kv}
        missing = [i for i in attn_layers if i not in have]
        if missing:
            yield _finding(
                Level.WARN, Rule.KV_SCALES, f"model.layers.{missing[0]}.self_attn",
                f"{len(missing)} of {len(attn_layers)} attention layers have no k/v scale",
                "Those layers use scale 1.0 for their FP8 KV cache.", "Re-calibrate the KV cache scales.")
    if not kv:
        return
    if is_mla(ctx.ckpt.config):
        yield _finding(
            Level.WARN, Rule.KV_SCALES_MLA, next(iter(kv)),
            f"{len(kv)} k/v scales in an MLA model (named for k_proj/v_proj modules MLA does not have)",
            "ModelOpt calibrates them on the decompressed per-head K/V, but vLLM's MLA cache stores the compressed "
            "latent, so the scale does not describe what is cached; vLLM builds before PR #35430 did not load MLA "
            "k/v scales at all.",
            f"Drop them (`quantize fix --only {Rule.KV_SCALES_MLA}`) and serve with --kv-cache-dtype auto, or "
            "calibrate on the latent.")
        return
    modelopt_names = [n for n in kv if re.search(r"\.self_attn\.[kv]_proj\.[kv]_scale$", n)]
    attn_names = [n for n in kv if re.search(r"\.self_attn\.attn\.[kv]_scale$", n)]
    if modelopt_names and ctx.ckpt.config.get("model_type") == "glm4_moe":
        runtimes = [ctx.runtime] if ctx.runtime else [Runtime(r, None) for r in RUNTIMES]
        statuses = {r: issue_status("glm4-kv-scale-keyerror", r) for r in runtimes}
        affected = [str(r) for r, s in statuses.items() if s is Status.AFFECTED]
        unknown = [str(r) for r, s in statuses.items() if s is Status.UNCONFIRMED]
        if affected or unknown:
            rows = RUNTIME_ISSUES["glm4-kv-scale-keyerror"]
            fixes = ", ".join(f"{n}: {row.source}, first possible release {row.affected_below}" for n, row in
                              rows.items())
            yield _finding(
                Level.ERROR if affected else Level.WARN, Rule.KV_SCALE_NAMES, modelopt_names[0],
                f"{len(modelopt_names)} ModelOpt-style k/v scale names (self_attn.k_proj.k_scale)"
                + (f"; {', '.join(affected)} is affected" if affected else
                   f"; not confirmed fixed for {', '.join(unknown)}"),
                "glm4_moe's loader maps k_proj -> qkv_proj before remapping kv scales: KeyError: "
                f"'layers.N.self_attn.qkv_proj.k_scale' at load ({fixes}).",
                f"Rename them to self_attn.k_scale / v_scale, which no stacked mapping touches "
                f"(`quantize fix --only {Rule.KV_SCALE_NAMES}`).")
    if attn_names:
        yield _finding(
            Level.WARN, Rule.KV_SCALE_NAMES, attn_names[0],
            f"{len(attn_names)} k/v scales already named self_attn.attn.*",
            "vLLM's maybe_remap_kv_scale_name rewrites any '.k_scale' to '.attn.k_scale', giving attn.attn.k_scale, "
            "which does not exist: 'Found k_scale in the checkpoint ... k_scale is not loaded', scale 1.0 (derived "
            "from the default pattern of weight_utils.py).",
            f"Rename them to self_attn.k_scale / v_scale (`quantize fix --only {Rule.KV_SCALE_NAMES}`).")


# kind ("expert.down_proj", "attn.q_proj", ...) -> (a module of that kind, its (out, in), how many there are)
Kinds = Mapping[str, tuple[str, tuple[int, int], int]]


def _tp_modules(ctx: CheckContext) -> dict[str, tuple[str, tuple[int, int], int]]:
    """One representative quantized module per kind: kind -> (module name, (out, in), count)."""
    kinds: dict[str, tuple[str, tuple[int, int], int]] = {}
    for m in ctx.modules.values():
        if m.excluded or not m.quantized or m.mtp:
            continue
        shape = m.shape
        if shape is None:
            continue
        kind = ("expert" if m.is_expert else "shared" if m.is_shared_expert else
                "dense" if ".mlp." in m.name else "attn") + "." + m.proj
        name, _, count = kinds.get(kind, (m.name, shape, 0))
        kinds[kind] = (name, shape, count + 1)
    return kinds


def _rule_tp(ctx: CheckContext) -> Iterator[Finding]:
    """Tensor-parallel divisibility; without --tp the TP=1 requirements (which every TP also needs)."""
    tp = ctx.tp or 1
    cfg = ctx.ckpt.config
    heads, kv_heads = _int(cfg, "num_attention_heads"), _int(cfg, "num_key_value_heads")
    if ctx.tp and heads and heads % tp:
        yield _finding(Level.ERROR, Rule.TP_HEADS, "config.json:num_attention_heads",
                       f"{heads} attention heads do not split over TP{tp}",
                       f"vLLM raises: Total number of attention heads ({heads}) must be divisible by tensor parallel "
                       f"size ({tp}).", "Choose a TP size that divides the head count.")
    if ctx.tp and kv_heads and not is_mla(cfg) and (kv_heads % tp if kv_heads >= tp else tp % kv_heads):
        yield _finding(Level.ERROR, Rule.TP_HEADS, "config.json:num_key_value_heads",
                       f"{kv_heads} KV heads neither split over nor replicate evenly to TP{tp}",
                       "vLLM's QKVParallelLinear asserts the KV heads divide (or are divided by) the TP size.",
                       "Choose a TP size that divides, or is a multiple of, the KV head count.")
    kinds = _tp_modules(ctx)
    if is_nvfp4(ctx.layout):
        yield from _tp_nvfp4(kinds, tp)
    else:
        yield from _tp_fp8_block(ctx, kinds, tp)
    if ctx.runtime and ctx.runtime.name == "sglang" and is_nvfp4(ctx.layout):
        yield from _tp_sglang_scale_dim(ctx, kinds, tp)


def _more(count: int) -> str:
    return f" (and {count - 1} more like it)" if count > 1 else ""


def _tp_nvfp4(kinds: Kinds, tp: int) -> Iterator[Finding]:
    for kind, (name, (_, in_), count) in sorted(kinds.items()):
        if kind == "expert.down_proj" and in_ % tp == 0 and (2 * (in_ // tp)) % 128:
            yield _finding(
                Level.ERROR, Rule.TP_NVFP4, name + _more(count),
                f"2 x moe_intermediate_size / TP = 2 x {in_} / {tp} = {2 * in_ // tp}, not a multiple of 128",
                "On SM120 the NVFP4 MoE runs VLLM_CUTLASS / FLASHINFER_CUTLASS, whose block-scale swizzle pads rows "
                "to 128: vLLM raises NotImplementedError('Intermediate size padding for w1 and w3 ... not currently "
                "supported'); SGLang asserts the same (sglang#30887).",
                "Use a TP size that keeps 2*I/TP a multiple of 128 (or expert parallelism), or pad the experts.")
        elif kind == "expert.down_proj" and in_ % tp:
            yield _finding(Level.ERROR, Rule.TP_NVFP4, name + _more(count),
                           f"moe_intermediate_size {in_} does not split over TP{tp}",
                           "vLLM cannot shard the experts' intermediate dimension.", "Choose another TP size.")
        if tp > 1 and kind.endswith(("o_proj", "down_proj")) and not kind.startswith("expert") and (in_ // tp) % 16:
            yield _finding(
                Level.ERROR, Rule.TP_NVFP4, name + _more(count),
                f"row-parallel in_features per shard {in_} / {tp} = {in_ // tp} is not a multiple of 16",
                "vLLM raises ValueError: Unsupported model when in features size is not multiple of 16.",
                "Choose a smaller TP size.")


def _tp_fp8_block(ctx: CheckContext, kinds: Kinds, tp: int) -> Iterator[Finding]:
    """vLLM `validate_fp8_block_shape` (fp8_utils.py) and the FusedMoE block checks, per vLLM layer."""
    cfg = ctx.ckpt.config
    block = 128

    def bad(kind: str, parts: list[int], why: str, effect: str, fix: str) -> Iterator[Finding]:
        name, _, count = kinds[kind]
        wrong = [p for p in parts if p % block]
        if wrong:
            yield _finding(Level.ERROR, Rule.TP_FP8_BLOCK, name + _more(count),
                           f"{why} at TP{tp}: {', '.join(map(str, wrong))} not divisible by {block}", effect, fix)

    col = ("vLLM raises ValueError: Weight output_partition_size = {} is not divisible by weight quantization "
           "block_n = 128.")
    row = ("vLLM raises ValueError: Weight input_size_per_partition = {} is not divisible by weight quantization "
           "block_k = 128.")
    ignore_fix = "Use a smaller TP size (or expert parallelism), or add the module to the ignore list (keep it BF16)."
    if "expert.gate_proj" in kinds:
        inter = kinds["expert.gate_proj"][1][0]
        yield from bad("expert.gate_proj", [inter // tp], "MoE gate/up output per shard",
                       f"vLLM raises ValueError: The output_size of gate's and up's weight = {inter // tp} is not "
                       "divisible by weight quantization block_n = 128.", ignore_fix)
        if tp > 1:
            yield from bad("expert.gate_proj", [inter // tp], "MoE down input per shard",
                           f"vLLM raises ValueError: The input_size of down's weight = {inter // tp} is not divisible "
                           "by weight quantization block_n = 128.", ignore_fix)
    for prefix in ("dense", "shared"):
        if f"{prefix}.gate_proj" in kinds:
            inter = kinds[f"{prefix}.gate_proj"][1][0]
            parts = [inter // tp] * 2 if tp > 1 else [inter]  # merged, not split: the last shard is exempt
            yield from bad(f"{prefix}.gate_proj", parts, "gate_up_proj shard", col.format(inter // tp), ignore_fix)
        if tp > 1 and f"{prefix}.down_proj" in kinds:
            in_ = kinds[f"{prefix}.down_proj"][1][1]
            yield from bad(f"{prefix}.down_proj", [in_ // tp], "down_proj input per shard", row.format(in_ // tp),
                           ignore_fix)
    if "attn.q_proj" in kinds and "attn.k_proj" in kinds:
        q, k = kinds["attn.q_proj"][1][0], kinds["attn.k_proj"][1][0]
        kv_heads = _int(cfg, "num_key_value_heads")
        head_dim = k // kv_heads if kv_heads else None
        k_part = (head_dim if head_dim and kv_heads < tp else k // tp)
        parts = [q // tp, k_part, k_part] if tp > 1 else [q, k]
        yield from bad("attn.q_proj", parts, "qkv_proj shard", col.format(parts[0]), ignore_fix)
    if "attn.q_a_proj" in kinds:
        yield from bad("attn.q_a_proj", [kinds["attn.q_a_proj"][1][0]], "fused_qkv_a_proj q_a shard (replicated)",
                       col.format(kinds["attn.q_a_proj"][1][0]),
                       "Ignore q_a_proj and kv_a_proj_with_mqa together (keep them BF16).")
    for kind in ("attn.q_b_proj", "attn.kv_b_proj", "attn.q_proj"):
        if tp > 1 and kind in kinds and "attn.k_proj" not in kinds:
            out = kinds[kind][1][0]
            yield from bad(kind, [out // tp], f"{kind.partition('.')[2]} output per shard", col.format(out // tp),
                           ignore_fix)
    if tp > 1 and "attn.o_proj" in kinds:
        in_ = kinds["attn.o_proj"][1][1]
        yield from bad("attn.o_proj", [in_ // tp], "o_proj input per shard", row.format(in_ // tp), ignore_fix)


def _tp_sglang_scale_dim(ctx: CheckContext, kinds: Kinds, tp: int) -> Iterator[Finding]:
    status = issue_status("sglang-nvfp4-scale-dim16", ctx.runtime)
    if status is Status.FIXED or status is None:
        return
    row = RUNTIME_ISSUES["sglang-nvfp4-scale-dim16"]["sglang"]
    checks = []
    if "expert.gate_proj" in kinds:
        checks.append(("expert.gate_proj", "w13_weight_scale.dim(2)", kinds["expert.gate_proj"][1][1] // 16))
    if "expert.down_proj" in kinds:
        checks.append(("expert.down_proj", "w2_weight_scale.dim(2)", kinds["expert.down_proj"][1][1] // tp // 16))
    for kind, (_, (_, in_), _) in kinds.items():
        if not kind.startswith("expert"):
            per = in_ // tp if kind.endswith(("o_proj", "down_proj")) else in_
            checks.append((kind, "weight_scale.dim(1)", per // 16))
    for kind, what, value in checks:
        if value % 16:
            name, _, count = kinds[kind]
            yield _finding(
                Level.ERROR if status is Status.AFFECTED else Level.WARN, Rule.TP_SGLANG_SCALE_DIM,
                name + _more(count), f"{what} = {value} at TP{tp} is not a multiple of 16",
                f"{ctx.runtime} asserts 'Expected {what} to be divisible by 16' in modelopt_quant.py (removed by "
                f"{row.source}, first possible release {row.affected_below}).",
                f"Use SGLang >= {row.affected_below} or a TP size that keeps the dimension a multiple of 16.")


def _rule_mtp(ctx: CheckContext) -> Iterator[Finding]:
    layers = ctx.ckpt.mtp_layers
    if not layers:
        return
    for layer in layers:
        prefix = f"model.layers.{layer}."
        names = [n for n in ctx.ckpt.tensors if n.startswith(prefix)]
        if not names:
            yield _finding(
                Level.WARN, Rule.MTP_MISSING, "config.json:num_nextn_predict_layers",
                f"num_nextn_predict_layers is {len(layers)} but there are no {prefix}* tensors (ModelOpt and "
                "llm-compressor drop the MTP layer)",
                "Speculative decoding with the MTP head (vLLM --speculative-config method mtp, SGLang EAGLE) fails "
                "to load the draft weights; plain decoding is unaffected.",
                "Copy the BF16 MTP layer from the source checkpoint (`quantize fix --source BF16_DIR`).")
            continue
        quantized = [m.name for m in ctx.modules.values() if m.name.startswith(prefix) and m.quantized]
        if quantized:
            yield _finding(
                Level.WARN, Rule.MTP_QUANTIZED, quantized[0],
                f"{len(quantized)} MTP modules are quantized",
                "A quantized draft layer lowers the acceptance rate; NVFP4 MTP heads hit the 'weight_scale ... was "
                "never loaded (still NaN)' guard on newer vLLM (vllm#57532).",
                "Replace the MTP layer with the BF16 one and exclude it (`quantize fix --source BF16_DIR`).")


def _rule_router_and_shared(ctx: CheckContext) -> Iterator[Finding]:
    for name, ref in ctx.ckpt.tensors.items():
        if name.endswith(".mlp.gate.e_score_correction_bias") and ref.info.dtype != "F32":
            yield _finding(
                Level.WARN, Rule.ROUTER, name, f"router correction bias is {ref.info.dtype}, not F32",
                "The bias decides top-k expert selection: rounded to BF16 it changes routing against the original; "
                "SGLang's TRT-LLM routing kernel requires bf16/fp32 ('routing_bias must be bfloat16 or float').",
                f"Store it in F32 (`quantize fix --only {Rule.ROUTER}`; with --source it is copied from the source).")
        elif name.endswith(".mlp.gate.weight") and (ref.info.dtype not in FLOAT_DTYPES or
                                                    f"{name[:-7]}.weight_scale" in ctx.ckpt.tensors):
            yield _finding(
                Level.ERROR, Rule.ROUTER, name, f"router weight is quantized ({ref.info.dtype})",
                "The GLM router is an unquantized fp32/bf16 Linear in vLLM and SGLang: a quantized router has no "
                "parameter to load into.", "Re-export with the router (mlp.gate) excluded.")
    if ctx.runtime is not None and ctx.runtime.name != "sglang":
        return
    routed = any(m.is_expert and m.quantized for m in ctx.modules.values())
    shared = [m.name for m in ctx.modules.values() if m.is_shared_expert and not m.quantized
              and not m.mtp]
    if routed and shared:
        yield _finding(
            Level.WARN, Rule.SHARED_EXPERTS_BF16, shared[0].rpartition(".")[0],
            f"{len(shared)} BF16 shared-expert projections next to quantized routed experts",
            "SGLang fuses the shared expert into the routed experts' FP4 slots: 'RuntimeError: The size of tensor a "
            "(...) must match the size of tensor b' or NaN output (sglang#40628 auto-disables it for DeepseekV2 / "
            "GlmMoeDsa only).", "Start SGLang with --disable-shared-experts-fusion.")


RULES: tuple[Callable[[CheckContext], Iterator[Finding]], ...] = (
    _rule_tensors, _rule_fused, _rule_exclusion_groups, _rule_deep, _rule_kv, _rule_tp, _rule_mtp,
    _rule_router_and_shared,
)


def check_checkpoint(path: Path, runtime: str | None = None, tp: int | None = None, deep: bool = False) -> CheckReport:
    """Check one checkpoint folder against what the serving runtimes will do with it.

    Reads headers and config files, plus the scalar global/input scales of fused groups (4 bytes each, needed to
    compare their values); `deep` also reads block scales and weights. Raises UserError for unusable input.
    """
    parsed = parse_runtime(runtime) if runtime is not None else None
    if tp is not None and (type(tp) is not int or tp < 1):
        raise UserError(f"--tp {tp!r}: must be a positive integer")
    ckpt = load_checkpoint(Path(path))
    ctx = CheckContext(ckpt, parsed, tp, deep)
    try:
        findings = [*ckpt.quant.config_findings, *ckpt.index_findings]
        for rule in RULES:
            findings.extend(rule(ctx))
    finally:
        ctx.close()
    return CheckReport(ckpt.path, str(ckpt.quant.layout), str(parsed) if parsed else None, tp, deep,
                       len(ckpt.headers), len(ckpt.tensors), tuple(findings))
