"""The model card (README.md) and provenance.json of a finished checkpoint folder.

Everything the card states is read from the folder, never typed in: the run's numbers from report.json (calibration,
weight error, verify, the doctor's verdicts, versions, size), the recipe from recipe.yaml, what is quantized and what
stays BF16 from the safetensors headers and the quantization config, the license from the source checkpoint's own
card. A section whose data the run did not record says "not measured" instead of a number.

provenance.json holds what a reader needs to check the upload against the run: the recipe text and its hash, the
calibration set's hash, the package versions, and the size and sha256 of every file next to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sm120_quant import __version__
from sm120_quant.errors import UserError
from sm120_quant.exporters.check import Checkpoint, Layout, layer_of, load_checkpoint
from sm120_quant.recipes.schema import Recipe, Scheme

REPORT = "report.json"
RECIPE = "recipe.yaml"
CARD = "README.md"
PROVENANCE = "provenance.json"
GENERATED = frozenset({CARD, PROVENANCE})
# Hashes of unchanged files are reused across runs (a resumed upload of 200 GB should not re-read it all); the cache
# is hidden, so it is never uploaded.
HASH_CACHE = Path(".cache") / "sm120-quant" / "sha256.json"
_HASH_BLOCK = 8 << 20

PIPELINE_TAG = "text-generation"
# The card's commands are vLLM / SGLang ones; the Hub shows a vLLM snippet for this library name.
LIBRARY_NAME = "vllm"
NOT_MEASURED = "not measured"


# ---------------------------------------------------------------------------------------------------------------
# Files and hashes


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the folder, POSIX separators
    size: int
    sha256: str


def checkpoint_files(folder: Path) -> list[Path]:
    """Every file of the checkpoint except hidden ones and the two this module generates, in path order."""
    files = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and rel.as_posix() not in GENERATED:
            files.append(p)
    return files


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def hash_files(folder: Path, files: Sequence[Path], progress: bool = False) -> list[FileEntry]:
    """Size and sha256 of each file; a file whose size and mtime match the cache is not read again."""
    cache_path = folder / HASH_CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (FileNotFoundError, ValueError):
        cache = {}
    todo, known = [], {}
    for p in files:
        rel, st = p.relative_to(folder).as_posix(), p.stat()
        hit = cache.get(rel)
        if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns:
            known[rel] = hit["sha256"]
        else:
            todo.append((p, rel, st))
    if todo:
        total = sum(st.st_size for _, _, st in todo)
        if progress:
            from sm120_quant.cli.common import err

            err.print(f"hashing {len(todo)} file(s), {_size(total)}")
        # hashlib releases the GIL on large blocks, so threads read and hash several shards at once.
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            for (p, rel, st), digest in zip(todo, pool.map(lambda t: _sha256_file(t[0]), todo)):
                known[rel] = digest
                cache[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        write_text_atomic(cache_path, json.dumps(cache, indent=1, sort_keys=True) + "\n")
    return [FileEntry(p.relative_to(folder).as_posix(), p.stat().st_size, known[p.relative_to(folder).as_posix()])
            for p in files]


def write_text_atomic(path: Path, text: str) -> None:
    """Write a sibling temporary file and rename it over `path`: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# The inputs: report.json, recipe.yaml, headers and configs, the source's license


def require_hub() -> None:
    """huggingface_hub is the optional `hub` extra; the card's metadata and the upload both need it."""
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise UserError("huggingface_hub is not installed; pip install 'sm120-quant[hub]'") from None


def read_report(folder: Path) -> dict[str, Any]:
    path = folder / REPORT
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; only folders written by `quantize run` (which writes report.json next to "
                        "the weights) can be carded and uploaded") from None
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e}); re-run `quantize run` to write it again") from None
    missing = [k for k in ("recipe", "versions", "calibration", "quantization", "weight_error", "tensors",
                           "checkpoint_bytes", "check") if k not in report]
    if missing:
        raise UserError(f"{path}: no {', '.join(missing)}; it was not written by this version of `quantize run`")
    return report


def read_recipe(folder: Path) -> Recipe | None:
    """The resolved recipe `quantize run` writes next to the weights; None when the folder has none."""
    from sm120_quant.recipes.load import parse_recipe

    path = folder / RECIPE
    if not path.is_file():
        return None
    return parse_recipe(path.read_text(encoding="utf-8"), source=str(path), base_dir=folder)


@dataclass(frozen=True)
class License:
    license: str
    name: str | None = None
    link: str | None = None


def source_license(source_folder: Path) -> License | None:
    """The license the source checkpoint's own card declares (its README.md metadata); None when it declares none."""
    from huggingface_hub.repocard import metadata_load

    card = source_folder / CARD
    if not card.is_file():
        return None
    meta = metadata_load(card) or {}
    value = meta.get("license")
    if not isinstance(value, str):
        return None
    return License(value, meta.get("license_name"), meta.get("license_link"))


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_base_model(model_id: str) -> str | None:
    """The recipe's model id when it names a Hub repo (not tiny://, not a local folder)."""
    if "://" in model_id or Path(model_id).expanduser().exists() or not _HUB_ID.match(model_id):
        return None
    return model_id


@dataclass(frozen=True)
class ComponentRow:
    component: str
    precision: str
    modules: int
    projections: tuple[str, ...]
    bytes: int


# Which part of the model a module belongs to, first match wins; MTP layers are matched by index before this.
_COMPONENTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("Embeddings", re.compile(r"(.*\.)?embed_tokens$")),
    ("LM head", re.compile(r"lm_head$")),
    ("Router (mlp.gate)", re.compile(r".*\.mlp\.gate$")),
    ("Routed experts", re.compile(r".*\.mlp\.experts\.\d+\..*")),
    ("Shared experts", re.compile(r".*\.mlp\.shared_experts\..*")),
    ("Attention", re.compile(r".*\.self_attn\..*")),
    ("Dense MLP", re.compile(r".*\.mlp\..*")),
)
MTP_COMPONENT = "MTP layer"


def _precision(ckpt: Checkpoint, module: str) -> str | None:
    """What the module's matmul weight is stored as; None for tensors that are not a 2-D weight (norms, biases)."""
    t = ckpt.tensors
    weight = t.get(f"{module}.weight_packed") or t.get(f"{module}.weight")
    if weight is None:
        return None
    scale = t.get(f"{module}.weight_scale")
    dtype, shape = weight.info.dtype, weight.info.shape
    if dtype == "U8" and scale is not None and scale.info.dtype == "F8_E4M3":
        return "NVFP4"
    if dtype == "F8_E4M3":
        if scale is not None and len(scale.info.shape) == 2 and len(shape) == 2 and scale.info.shape == (
                -(-shape[0] // 128), -(-shape[1] // 128)):
            return "FP8 (128x128 blocks)"
        return "FP8"
    if len(shape) < 2:
        return None
    return dtype


def component_rows(ckpt: Checkpoint) -> list[ComponentRow]:
    """One row per (component, storage precision): how many matmul modules, which projections, how many bytes."""
    modules: dict[str, list[str]] = {}
    for name in ckpt.tensors:
        modules.setdefault(name.rpartition(".")[0], []).append(name)
    mtp = set(ckpt.mtp_layers)
    rows: dict[tuple[str, str], dict] = {}
    for module, names in modules.items():
        precision = _precision(ckpt, module)
        if precision is None:
            continue
        if layer_of(module) in mtp:
            component = MTP_COMPONENT
        else:
            component = next((label for label, pat in _COMPONENTS if pat.fullmatch(module)), "Other")
        row = rows.setdefault((component, precision), {"modules": 0, "projections": set(), "bytes": 0})
        row["modules"] += 1
        row["projections"].add(f"all of model.layers.{layer_of(module)}" if component == MTP_COMPONENT
                               else module.rpartition(".")[2])
        row["bytes"] += sum(ckpt.tensors[n].info.nbytes for n in names)
    order = [label for label, _ in _COMPONENTS] + ["Other", MTP_COMPONENT]
    return [ComponentRow(c, p, r["modules"], tuple(sorted(r["projections"])), r["bytes"])
            for (c, p), r in sorted(rows.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1]))]


@dataclass(frozen=True)
class CardInputs:
    folder: Path
    repo_id: str | None
    report: Mapping[str, Any]
    recipe: Recipe | None
    ckpt: Checkpoint
    rows: tuple[ComponentRow, ...]
    base_model: str | None
    license: License | None
    forced: tuple[str, ...]

    @property
    def layout(self) -> Layout:
        return self.ckpt.quant.layout

    @property
    def model_ref(self) -> str:
        return self.repo_id or self.folder.name

    @property
    def model_type(self) -> str:
        return str(self.ckpt.config.get("model_type", ""))


def card_inputs(folder: Path, repo_id: str | None = None, forced: Iterable[str] = ()) -> CardInputs:
    require_hub()
    folder = Path(folder)
    report = read_report(folder)
    recipe = read_recipe(folder)
    ckpt = load_checkpoint(folder)
    source = report["recipe"].get("source_folder")
    lic = source_license(Path(source)) if source and Path(source).is_dir() else None
    return CardInputs(folder, repo_id, report, recipe, ckpt, tuple(component_rows(ckpt)),
                      hub_base_model(str(report["recipe"]["model"])), lic, tuple(forced))


# ---------------------------------------------------------------------------------------------------------------
# Formatting


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _num(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) >= 1000 else f"{x:.4f}"
    return str(x)


def _codes(items: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(f"`{i}`" for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out += _flatten(v, f"{key}.")
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out.append((key, v))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Card metadata


# Per on-disk layout: the Hub tags and one sentence on the number format.
LAYOUT_TAGS: Mapping[Layout, tuple[str, ...]] = {
    Layout.MODELOPT_NVFP4: ("nvfp4", "fp4", "modelopt"),
    Layout.CT_NVFP4: ("nvfp4", "fp4", "compressed-tensors", "llm-compressor"),
    Layout.CT_FP8_BLOCK: ("fp8", "fp8-block", "compressed-tensors", "llm-compressor"),
}
LAYOUT_FORMAT: Mapping[Layout, str] = {
    Layout.MODELOPT_NVFP4: "NVFP4 in NVIDIA ModelOpt's unified Hugging Face format (`hf_quant_config.json`): "
                           "E2M1 weights packed two per byte, one E4M3 scale per 16 weights, one FP32 scale per "
                           "tensor (`weight_scale_2`), and a static FP32 activation scale (`input_scale`).",
    Layout.CT_NVFP4: "NVFP4 in compressed-tensors format (`nvfp4-pack-quantized`): E2M1 weights packed two per "
                     "byte, one E4M3 scale per 16 weights, FP32 global scales stored as reciprocals.",
    Layout.CT_FP8_BLOCK: "FP8 (E4M3) weights with one scale per 128x128 block in compressed-tensors format "
                         "(`float-quantized`); activations are quantized at run time per group of 128.",
}
BASE_TAGS = ("sm120", "blackwell", "quantized")


def card_metadata(inputs: CardInputs):
    from huggingface_hub import ModelCardData

    tags = [*LAYOUT_TAGS[inputs.layout], *BASE_TAGS]
    if inputs.model_type:
        tags.append(inputs.model_type)
    if any(r.component == "Routed experts" for r in inputs.rows):
        tags.append("moe")
    lic = inputs.license
    extra = {"base_model_relation": "quantized"} if inputs.base_model else {}
    return ModelCardData(
        base_model=inputs.base_model, license=lic.license if lic else None, license_name=lic.name if lic else None,
        license_link=lic.link if lic else None, library_name=LIBRARY_NAME, pipeline_tag=PIPELINE_TAG, tags=tags,
        **extra)


# ---------------------------------------------------------------------------------------------------------------
# Sections


SCHEME_LABEL: Mapping[str, str] = {
    Scheme.NVFP4.value: "NVFP4 (W4A4)", Scheme.NVFP4_AWQ_LITE.value: "NVFP4 (W4A4, AWQ-lite)",
    Scheme.FP8_BLOCK.value: "FP8-block", Scheme.W4A16.value: "NVFP4 weight-only (W4A16)",
}


def _title(inputs: CardInputs) -> str:
    return inputs.repo_id.split("/", 1)[1] if inputs.repo_id else inputs.folder.name


def _summary(inputs: CardInputs) -> list[str]:
    r, versions = inputs.report, inputs.report["versions"]
    recipe = r["recipe"]
    engine = recipe["engine"]
    engine_pkg = {"modelopt": "nvidia-modelopt", "llmcompressor": "llmcompressor"}.get(engine, engine)
    if inputs.base_model:
        source = f"[{inputs.base_model}](https://huggingface.co/{inputs.base_model})"
        if inputs.recipe is not None and inputs.recipe.model.revision:
            source += f" at revision `{inputs.recipe.model.revision}`"
    else:
        source = f"`{recipe['model']}` (not a Hub model, so no `base_model` metadata)"
    lines = [f"# {_title(inputs)}", ""]
    if inputs.forced:
        lines += ["> **Uploaded with `--force` although:** " + "; ".join(inputs.forced) + ".", ""]
    lines += [
        (f"{SCHEME_LABEL.get(recipe['scheme'], recipe['scheme'])} quantization of {source} for SM120 GPUs "
         "(Blackwell GeForce RTX and RTX PRO cards), "
         f"made with sm120-quant {versions.get('sm120-quant')} and {engine_pkg} {versions.get(engine_pkg)}."),
        "",
        f"- **Format:** {LAYOUT_FORMAT[inputs.layout]}",
        (f"- **Size:** {_size(r['checkpoint_bytes'])} ({r['checkpoint_bytes']} bytes), "
         f"{r['tensors']['count']} tensors."),
        (f"- **Recipe:** `{recipe['name']}` (sha256 `{recipe['sha256']}`), resolved in `{RECIPE}` next to the "
         "weights."),
        (f"- **Evidence:** the run's numbers on this card (size, calibration, quality, doctor, versions) are read "
         f"from `{REPORT}`, the run's own report; the serve plan uses sm120-quant's GPU profiles; `{PROVENANCE}` "
         "lists the sha256 of every file."),
    ]
    if inputs.license is None:
        lines.append("- **License:** the source checkpoint's card declares none; check the base model's terms "
                     "before use.")
    return lines


TP_DEGREES = (1, 2, 4, 8)
# The GPU the card's command is built for; the serve plan covers every SM120 GPU in serve/profiles/gpus.yaml.
COMMAND_GPU = "rtx-pro-6000"
# Why each flag (or flag and value) / variable of the SM120 serve profile is there (serving-runtimes.md, the seeds);
# the comments of serve/profiles/sm120.yaml say the same for the serve helper.
FLAG_WHY: Mapping[str, str] = {
    "--host": "Listen address: loopback only until the server has an API key.",
    "--port": "Port of the OpenAI-compatible HTTP API.",
    "--served-model-name": "The name clients send as `model`.",
    "--dtype": "Activations and the unquantized weights (router, embeddings, lm_head, MTP layer) in BF16.",
    "--quantization": "The checkpoint's format, stated instead of inferred.",
    "--attention-backend TRITON_ATTN": "FlashInfer attention crashes in prefill on SM120.",
    "--attention-backend TRITON_MLA": "The one MLA backend SM120 has: FLASHINFER_MLA needs qk_nope_head_dim 128, "
                                      "CUTLASS_MLA needs SM10x.",
    "--tensor-parallel-size": "GPUs the weights are split over: the smallest count at which they fit this GPU and "
                              "the checkpoint doctor finds no vLLM error.",
    "--kv-cache-dtype": "The checkpoint carries calibrated k/v scales for an FP8 KV cache.",
    "--gpu-memory-utilization": "Share of GPU memory vLLM takes for weights, activations and KV cache.",
    "--moe-backend": "The MoE kernel chosen in the serve profile.",
    "--tool-call-parser": "Turns the model's `<tool_call>` blocks into OpenAI tool calls.",
    "--enable-auto-tool-choice": "Lets the model decide when to call a tool.",
    "--reasoning-parser": "Moves `<think>` text into `reasoning_content`.",
}
ENV_WHY: Mapping[str, str] = {
    "CUDA_DEVICE_ORDER": "GPU numbering matches nvidia-smi under tensor parallelism.",
    "VLLM_WORKER_MULTIPROC_METHOD": "Workers are spawned, not forked with live CUDA contexts.",
    "PYTORCH_ALLOC_CONF": "Less memory fragmentation, which matters most on the smaller cards.",
    "TORCH_CUDA_ARCH_LIST": "Just-in-time kernels (Triton, FlashInfer) are built for SM120 only.",
    "FLASHINFER_CUDA_ARCH_LIST": "Just-in-time kernels (Triton, FlashInfer) are built for SM120 only.",
}
SGLANG_QUANTIZATION: Mapping[Layout, str] = {Layout.MODELOPT_NVFP4: "modelopt_fp4"}


def _tp_verdicts(inputs: CardInputs) -> dict[tuple[str, int], dict] | None:
    """(runtime name, TP) -> the doctor's report for it, from report.json's `tensor_parallel` rows."""
    rows = inputs.report.get("tensor_parallel")
    if rows is None:
        return None
    if not isinstance(rows, list) or not all(isinstance(r, Mapping) and isinstance(r.get("tp"), int)
                                             and isinstance(r.get("runtime"), str) and "summary" in r for r in rows):
        raise UserError(f"{inputs.folder / REPORT}: tensor_parallel must be a list of checkpoint-doctor reports "
                        "(CheckReport.to_dict() with runtime and tp set); re-run `quantize run`")
    return {(r["runtime"].partition("==")[0], r["tp"]): r for r in rows}


def _doctor_rejects(verdicts: Mapping[tuple[str, int], dict] | None, runtime: str, tp: int) -> bool:
    row = verdicts.get((runtime, tp)) if verdicts else None
    return row is not None and row["summary"]["errors"] > 0


def _kv_budget(inputs: CardInputs, gpu, tp: int) -> float:
    """GiB of vLLM's memory budget on one GPU left after its share of the checkpoint (negative: does not fit)."""
    from sm120_quant.serve.profiles import GIB

    return gpu.total_memory_gib * gpu.gpu_memory_utilization - inputs.report["checkpoint_bytes"] / tp / GIB


def _serve_tp(inputs: CardInputs, gpu) -> int:
    verdicts = _tp_verdicts(inputs)
    for tp in TP_DEGREES:
        if _kv_budget(inputs, gpu, tp) > 0 and not _doctor_rejects(verdicts, "vllm", tp):
            return tp
    return TP_DEGREES[-1]


def _shared_experts_bf16(inputs: CardInputs) -> bool:
    precisions = {r.component: r.precision for r in inputs.rows}
    return precisions.get("Shared experts") in ("BF16", "F16", "F32") and "NVFP4" in precisions.get(
        "Routed experts", "")


def vllm_command(inputs: CardInputs):
    """`serve start`'s command for this checkpoint on COMMAND_GPU, pointed at the Hub repo instead of the folder."""
    from dataclasses import replace

    from sm120_quant.serve.model_info import inspect_checkpoint
    from sm120_quant.serve.profiles import ServeOptions, build_command, get_gpu

    gpu = get_gpu(COMMAND_GPU)
    info = replace(inspect_checkpoint(inputs.folder), path=Path(inputs.model_ref))
    opts = ServeOptions(gpu=COMMAND_GPU, gpus=_serve_tp(inputs, gpu), served_model_name=_title(inputs))
    return build_command(Path("python"), info, opts), gpu


def _flag_rows(argv: Sequence[str]) -> list[tuple[str, str]]:
    rows, i = [], 0
    while i < len(argv):
        flag = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
        shown = f"{flag} {value}" if value is not None else flag
        rows.append((shown, FLAG_WHY.get(shown) or FLAG_WHY.get(flag, "From the SM120 serve profile.")))
        i += 2 if value is not None else 1
    return rows


def serve_section(inputs: CardInputs) -> list[str]:
    """The vLLM command `serve start --print` gives for this checkpoint on an RTX PRO 6000, every flag explained,
    and the SGLang equivalent."""
    import shlex

    command, gpu = vllm_command(inputs)
    argv = list(command.argv[command.argv.index("serve") + 1:])
    ref = inputs.model_ref
    lines = ["## Serve on SM120", "",
             f"`serve start {ref} --gpu {COMMAND_GPU} --print` (sm120-quant) prints this command; `--gpu` picks "
             "another card's profile. On an " + gpu.description + ":", "", "```bash"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(command.env.items())]
    flags = _flag_rows(argv[1:])
    lines += [f"vllm serve {shlex.quote(argv[0])} \\"] + [f"  {f} \\" for f, _ in flags[:-1]]
    lines += [f"  {flags[-1][0]}", "```", ""]
    lines += _table(("Flag", "Why"), [(f"`{f}`", why) for f, why in flags]
                    + [(f"`{k}`", ENV_WHY.get(k, "From the SM120 serve profile.")) for k in sorted(command.env)])
    if "--gpu-memory-utilization" in argv:
        lines += ["", f"The memory share on this GPU: {gpu.measured}."]
    if command.notes:
        lines += [""] + [f"- {note}" for note in command.notes]

    tp = argv[argv.index("--tensor-parallel-size") + 1] if "--tensor-parallel-size" in argv else "1"
    sglang = [f"python -m sglang.launch_server --model-path {ref} --tp {tp}"]
    if inputs.layout in SGLANG_QUANTIZATION:
        sglang.append(f"--quantization {SGLANG_QUANTIZATION[inputs.layout]}")
    if "--tool-call-parser" in argv:
        sglang.append(f"--tool-call-parser {argv[argv.index('--tool-call-parser') + 1]} "
                      f"--reasoning-parser {argv[argv.index('--reasoning-parser') + 1]}")
    if _shared_experts_bf16(inputs):
        sglang.append("--disable-shared-experts-fusion")
    lines += ["", "SGLang:", "", "```bash", " \\\n  ".join(sglang), "```"]
    if _shared_experts_bf16(inputs):
        lines += ["", ("`--disable-shared-experts-fusion` is required: the shared experts are BF16 and the routed "
                      "experts NVFP4, and fusing them into one MoE kernel fails or produces NaN.")]
    return lines


# What runs the layout besides SM120 (serving-runtimes.md sections 1 and 3).
HARDWARE: Mapping[Layout, str] = {
    Layout.MODELOPT_NVFP4: "Made for SM120 GPUs, which run NVFP4 natively. vLLM also loads it on older GPUs "
                           "(Hopper, Ada, Ampere) as weight-only FP4 through the Marlin kernel: slower, and the "
                           "activations stay BF16.",
    Layout.CT_NVFP4: "Made for SM120 GPUs, which run NVFP4 natively. vLLM also loads it on older GPUs as weight-only "
                     "FP4 through the Marlin kernel: slower, and the activations stay BF16.",
    Layout.CT_FP8_BLOCK: "Made for SM120 GPUs (CUTLASS block-FP8 kernels for linears, Triton for the MoE); "
                         "FP8-block also runs on Ada and Hopper GPUs.",
}


def plan_section(inputs: CardInputs) -> list[str]:
    """Which SM120 GPUs hold the weights at which TP, and what is left for activations and KV cache.

    Stands in for `serve plan` until sm120_quant.serve has it; the GPU data is the serve profiles'."""
    from sm120_quant.serve.profiles import load_gpus

    verdicts = _tp_verdicts(inputs)
    total = inputs.report["checkpoint_bytes"]
    lines = ["## Hardware and serve plan", "", HARDWARE[inputs.layout], "",
             (f"Per GPU at each tensor-parallel size: the checkpoint's share ({_size(total)} in all) and the GiB of "
              "vLLM's memory budget (total x `--gpu-memory-utilization` of `serve start`'s profile) left for "
              "activations and KV cache."), ""]
    header = ["GPU", "Budget", *(f"TP{tp} ({_size(total // tp)} each)" for tp in TP_DEGREES)]
    rows = []
    for name, gpu in load_gpus().items():
        if gpu.arch != "sm120":
            continue
        cells = [f"{gpu.description} (`{name}`)", f"{gpu.total_memory_gib * gpu.gpu_memory_utilization:.2f} GiB"]
        for tp in TP_DEGREES:
            left = _kv_budget(inputs, gpu, tp)
            cells.append("doctor: ERROR" if _doctor_rejects(verdicts, "vllm", tp)
                         else f"{left:.2f} GiB left" if left > 0 else "does not fit")
        rows.append(cells)
    return lines + _table(header, rows)


def doctor_section(inputs: CardInputs) -> list[str]:
    check = inputs.report["check"]
    s = check["summary"]
    lines = ["## Checkpoint doctor", "",
             (f"`quantize check` on the exported files ({check['layout']}, "
              f"{'deep: every scale and weight read' if check.get('deep') else 'headers and scalar scales'}): "
              f"**{s['errors']} errors, {s['warnings']} warnings**.")]
    if check["findings"]:
        lines += [""] + _table(("Level", "Rule", "Where", "Finding"),
                               ((f["level"], f["rule"], f"`{f['key']}`", f["message"]) for f in check["findings"]))
    lines += ["", "Per runtime and tensor-parallel size:", ""]
    verdicts = _tp_verdicts(inputs)
    if verdicts is None:
        lines.append(f"{NOT_MEASURED.capitalize()} in this run; `quantize check {inputs.model_ref} "
                     "--runtime vllm --tp N` gives the verdict for one runtime and TP.")
        return lines
    rows = []
    for (_, tp), r in sorted(verdicts.items(), key=lambda kv: (kv[0][0] != "vllm", kv[0][0], kv[0][1])):
        first = next((f for f in r.get("findings", []) if f["level"] == "ERROR"), None)
        rows.append((r["runtime"], tp, r["summary"]["errors"], r["summary"]["warnings"],
                     f"{first['rule']}: {first['message']}" if first else "loads"))
    return lines + _table(("Runtime", "TP", "Errors", "Warnings", "Verdict"), rows)


def quantized_section(inputs: CardInputs) -> list[str]:
    lines = ["## What is quantized", "",
             ("From the safetensors headers (each row: matmul modules of that part of the model and how their weights "
              "are stored):"), ""]
    lines += _table(("Part", "Stored as", "Modules", "Projections", "Bytes"),
                    ((r.component, r.precision, r.modules, ", ".join(r.projections), _size(r.bytes))
                     for r in inputs.rows))
    q = inputs.ckpt.quant
    by_dtype = ", ".join(f"{k} {v}" for k, v in inputs.report["tensors"]["by_dtype"].items())
    lines += ["", f"Tensors by dtype: {by_dtype}. Norms and biases are 1-D tensors and stay in their source dtype.",
              "", f"Kept out of quantization by the config (`{q.exclude_key}`): {_codes(q.exclude)}."]
    quant = inputs.report["quantization"]
    if quant.get("quantizers_total"):
        lines += ["", (f"Quantizers enabled during calibration: {quant['quantizers_enabled']} of "
                      f"{quant['quantizers_total']}.")]
    if quant.get("expanded_modules"):
        lines += ["", (f"{len(quant['expanded_modules'])} fused expert modules were expanded to one linear per "
                      "expert for calibration, so each expert has its own scales.")]
    lines.append("")
    lines.append(f"KV cache: {'FP8 with calibrated scales' if q.kv_cache else 'not quantized (BF16)'}.")
    return lines


def calibration_section(inputs: CardInputs) -> list[str]:
    c = inputs.report["calibration"]
    lines = ["## Calibration", "",
             f"{c['num_samples']} samples, {c['num_tokens']} tokens"
             + (f" in {c['batches']} batches" if "batches" in c else "")
             + f"; calibration-set hash `{c['hash']}`.", ""]
    lines += _table(("Pass", "Source", "Samples", "Tokens"),
                    ((p["name"], p["source"], p["samples"], p["tokens"]) for p in c["passes"]))
    coverage = _flatten(inputs.report["quantization"].get("coverage") or {})
    if coverage:
        lines += ["", "Expert coverage:", ""] + _table(("Measure", "Value"), ((k, _num(v)) for k, v in coverage))
    notes = inputs.report.get("notes") or []
    if notes:
        lines += ["", "Notes from the run:", ""] + [f"- {note}" for note in notes]
    return lines


# Which recipe threshold each verify metric is held to, and in which direction.
VERIFY_THRESHOLDS: Mapping[str, tuple[str, str]] = {
    "cosine": ("min_cosine", ">="), "kl": ("max_kl", "<="), "top1": ("min_top1", ">="),
    "routing_agreement": ("min_routing_agreement", ">="),
}


def verify_metrics(report: Mapping[str, Any]) -> list[tuple[str, Any]] | None:
    verify = report.get("verify")
    if verify is None:
        return None
    return _flatten(verify.get("metrics", {}))


def quality_section(inputs: CardInputs) -> list[str]:
    lines = ["## Quality", ""]
    metrics = verify_metrics(inputs.report)
    if metrics is None:
        lines.append(f"Logit agreement with the BF16 model (cosine, KL, top-1, perplexity): {NOT_MEASURED}; "
                     "verify did not run.")
    else:
        verify = inputs.report["verify"]
        spec = inputs.recipe.verify if inputs.recipe is not None else None
        rows = []
        for key, value in metrics:
            bound = VERIFY_THRESHOLDS.get(key)
            limit = f"{bound[1]} {_num(getattr(spec, bound[0]))}" if bound and spec else ""
            rows.append((key, _num(value), limit))
        verdict = verify.get("passed")
        lines.append("Quantized vs BF16 model on held-out prompts"
                     + ("" if verdict is None else f": **{'passed' if verdict else 'failed'}**") + ".")
        lines += [""] + _table(("Metric", "Value", "Threshold"), rows)
    we = inputs.report["weight_error"]
    lines += ["", f"Weight error per layer type ({we['metric']}):", ""]
    lines += _table(("Layer type", "Linears", "Mean", "Max"),
                    ((t, s["count"], _num(s["mean"]), _num(s["max"])) for t, s in we["by_type"].items()))
    return lines


def versions_section(inputs: CardInputs) -> list[str]:
    lines = ["## Tested versions", "", "The packages that made and checked this checkpoint:", ""]
    lines += _table(("Package", "Version"), ((k, v or "not installed") for k, v in inputs.report["versions"].items()))
    return lines


def reproduce_section(inputs: CardInputs) -> list[str]:
    recipe = inputs.report["recipe"]
    return ["## Reproduce", "", f"With sm120-quant {inputs.report['versions'].get('sm120-quant')} installed:", "",
            "```bash", f"quantize run {RECIPE} -o {_title(inputs)}", "```", "",
            (f"`{RECIPE}` is the recipe with every default filled in; the recipe file as run, `{recipe['name']}`, had "
             f"sha256 `{recipe['sha256']}`. `{PROVENANCE}` has the calibration-set hash and the sha256 of every "
             f"file, `{REPORT}` the full run report.")]


SECTIONS = (serve_section, plan_section, doctor_section, quantized_section, calibration_section, quality_section,
            versions_section, reproduce_section)


def render_card(inputs: CardInputs) -> str:
    from huggingface_hub import ModelCard

    body = _summary(inputs)
    for section in SECTIONS:
        body += [""] + section(inputs)
    text = f"---\n{card_metadata(inputs).to_yaml()}\n---\n\n" + "\n".join(body) + "\n"
    ModelCard(text)  # parses the front matter the way the Hub's client does; raises on YAML it cannot read
    return text


def render_model_card(folder: Path, *, repo_id: str | None = None, forced: Iterable[str] = ()) -> str:
    """README.md for a checkpoint folder written by `quantize run`; `forced` lists why an upload went ahead anyway."""
    return render_card(card_inputs(Path(folder), repo_id, forced))


# ---------------------------------------------------------------------------------------------------------------
# Provenance


def render_provenance(folder: Path, files: Sequence[FileEntry]) -> str:
    folder = Path(folder)
    report = read_report(folder)
    recipe_path = folder / RECIPE
    provenance = {
        "producer": {"name": "sm120-quant", "version": __version__},
        "recipe": {**{k: report["recipe"][k] for k in ("name", "sha256", "scheme", "engine", "model")},
                   "resolved": recipe_path.read_text(encoding="utf-8") if recipe_path.is_file() else None},
        "calibration": {k: report["calibration"][k] for k in ("hash", "num_samples", "num_tokens", "passes")},
        "versions": report["versions"],
        "check": report["check"]["summary"],
        "verify": report.get("verify", {}).get("passed") if "verify" in report else NOT_MEASURED,
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files],
    }
    return json.dumps(provenance, indent=2) + "\n"


def write_provenance(folder: Path, progress: bool = False) -> Path:
    """Hash every checkpoint file and write provenance.json next to them."""
    folder = Path(folder)
    files = hash_files(folder, checkpoint_files(folder), progress)
    path = folder / PROVENANCE
    write_text_atomic(path, render_provenance(folder, files))
    return path
