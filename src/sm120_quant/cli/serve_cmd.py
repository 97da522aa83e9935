"""`serve`: patch the vLLM a user serves with, start it with SM120 flags, plan memory, and verify a running server.

vLLM is never imported here: it lives in its own environment, found through --vllm-python (default: the interpreter
behind the `vllm` launcher on PATH), and is driven as a subprocess and over HTTP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sm120_quant.cli.common import err, out, run_app, version_callback

app = typer.Typer(
    name="serve",
    help="Patch, start, plan and verify vLLM for NVFP4 / FP8-block GLM checkpoints on SM120 GPUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

VllmPythonOpt = Annotated[
    Path | None,
    typer.Option("--vllm-python", help="Python of the environment vLLM is installed in; default: `vllm` on PATH."),
]
CkptArg = Annotated[Path, typer.Argument(help="Checkpoint folder (config.json + safetensors).")]
GpuOpt = Annotated[
    str | None,
    typer.Option("--gpu", help="GPU profile: rtx-pro-6000, rtx-5090, rtx-5080, ... or cpu; default: detected."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object on stdout instead of the summary.")]
KvDtypeOpt = Annotated[str | None, typer.Option("--kv-cache-dtype", help="auto, fp8, ...; default: the checkpoint's.")]
UtilOpt = Annotated[
    float | None, typer.Option("--gpu-memory-utilization", min=0.05, max=1.0, help="Default: the GPU profile's.")
]
MaxLenOpt = Annotated[int | None, typer.Option("--max-model-len", min=16, help="Context length to serve.")]


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Patch, start, plan and verify vLLM for NVFP4 / FP8-block GLM checkpoints on SM120 GPUs."""


def _install(vllm_python: Path | None):
    from sm120_quant.serve.vllm_env import find_vllm_python, probe_vllm

    return probe_vllm(find_vllm_python(vllm_python))


@app.command()
def patch(
    check: Annotated[
        bool, typer.Option("--check", help="Report each patch's status; exit 1 if one is pending.")
    ] = False,
    revert: Annotated[bool, typer.Option("--revert", help="Restore the byte-identical originals.")] = False,
    vllm_python: VllmPythonOpt = None,
    assume_version: Annotated[
        str | None, typer.Option("--assume-version", help="Treat a dev build as this checked release.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply the SM120 / GLM-4.7 patches to an installed vLLM (all files or none; --check, --revert)."""
    from sm120_quant.errors import CheckFailed, UserError
    from sm120_quant.serve.patches import Status, apply_patches, check_patches, load_patch_set, revert_patches

    if check and revert:
        raise UserError("--check and --revert: choose one")
    install = _install(vllm_python)
    patch_set = load_patch_set()
    if check:
        report = check_patches(install, patch_set, assume_version)
    elif revert:
        report = revert_patches(install, patch_set, assume_version)
    else:
        report = apply_patches(install, patch_set, assume_version)
    if as_json:
        out.print_json(json.dumps(report.to_json()))
    else:
        out.print(f"vLLM {report.vllm_version} ({report.package_dir}), patches for {report.release}: {report.action}")
        for s in report.states:
            out.print(f"  {s.patch.id:28} {s.status.value:34} {s.detail}", markup=False)
        verb = "restored" if revert else "patched"
        for rel in report.files_written:
            err.print(f"{verb} {report.package_dir.parent / rel}", markup=False)
    if check and any(s.status is Status.PENDING for s in report.states):
        raise CheckFailed(f"{len(report.pending)} patch(es) pending; run `serve patch` to apply them")


def _serve_options(ckpt_gpu: str, **kw):
    from sm120_quant.serve.profiles import ServeOptions

    return ServeOptions(gpu=ckpt_gpu, **{k: v for k, v in kw.items() if v is not None})


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def start(
    ctx: typer.Context,
    ckpt: CkptArg,
    gpu: GpuOpt = None,
    gpus: Annotated[int, typer.Option("--gpus", min=1, help="Tensor-parallel size (number of GPUs).")] = 1,
    host: Annotated[
        str, typer.Option(help="Address to listen on; anything but loopback needs an --api-key.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="SM120_SERVE_API_KEY", help="Require this key.")
    ] = None,
    served_model_name: Annotated[str | None, typer.Option(help="Default: the folder name.")] = None,
    max_model_len: MaxLenOpt = None,
    kv_cache_dtype: KvDtypeOpt = None,
    gpu_memory_utilization: UtilOpt = None,
    num_gpu_blocks_override: Annotated[int | None, typer.Option(min=1, help="From `serve plan`.")] = None,
    moe_backend: Annotated[str, typer.Option(help="auto, marlin, cutlass, flashinfer-cutlass, b12x.")] = "auto",
    mtp: Annotated[int, typer.Option("--mtp", min=0, help="Speculative tokens from the MTP layer (0: off).")] = 0,
    enforce_eager: Annotated[bool, typer.Option(help="No torch.compile / CUDA graphs (fast start).")] = False,
    print_only: Annotated[bool, typer.Option("--print", help="Print the command instead of running it.")] = False,
    vllm_python: VllmPythonOpt = None,
) -> None:
    """Run vLLM for CKPT with the flags the seeds found for SM120; arguments after `--` go to vLLM unchanged."""
    import os

    from sm120_quant.serve.model_info import inspect_checkpoint
    from sm120_quant.serve.profiles import build_command, detect_gpu
    from sm120_quant.serve.vllm_env import find_vllm_python

    python = find_vllm_python(vllm_python)
    opts = _serve_options(
        gpu or detect_gpu(),
        gpus=gpus,
        host=host,
        port=port,
        api_key=api_key,
        served_model_name=served_model_name,
        max_model_len=max_model_len,
        kv_cache_dtype=kv_cache_dtype,
        gpu_memory_utilization=gpu_memory_utilization,
        num_gpu_blocks_override=num_gpu_blocks_override,
        moe_backend=moe_backend,
        mtp_tokens=mtp,
        enforce_eager=enforce_eager,
        extra_args=tuple(ctx.args),
    )
    command = build_command(python, inspect_checkpoint(ckpt), opts)
    for note in command.notes:
        err.print(f"note: {note}", markup=False)
    if print_only:
        out.print(command.shell(), markup=False, soft_wrap=True)
        return
    _warn_pending_patches(python)
    os.execve(command.argv[0], list(command.argv), {**os.environ, **command.env})


def _warn_pending_patches(python: Path) -> None:
    from sm120_quant.errors import UserError
    from sm120_quant.serve.patches import check_patches, load_patch_set
    from sm120_quant.serve.vllm_env import probe_vllm

    try:
        report = check_patches(probe_vllm(python), load_patch_set())
    except UserError as e:
        err.print(f"warning: patches not checked: {e}", markup=False)
        return
    for state in report.pending:
        err.print(f"warning: patch {state.patch.id} is pending ({state.patch.title}); run `serve patch`", markup=False)


@app.command()
def plan(
    ckpt: CkptArg,
    gpu: Annotated[str, typer.Option("--gpu", help="GPU profile (see `serve start --help`).")],
    tp: Annotated[int, typer.Option("--tp", min=1, help="Tensor-parallel size.")] = 1,
    kv_cache_dtype: KvDtypeOpt = None,
    gpu_memory_utilization: UtilOpt = None,
    max_num_seqs: Annotated[int | None, typer.Option(min=1)] = None,
    max_num_batched_tokens: Annotated[int | None, typer.Option(min=16)] = None,
    max_model_len: MaxLenOpt = None,
    weights_gib: Annotated[
        float | None, typer.Option(help="vLLM's 'Model loading took X GiB' instead of the estimate.")
    ] = None,
    activation_gib: Annotated[
        float | None, typer.Option(help="vLLM's torch peak increase instead of the estimate.")
    ] = None,
    overhead_gib: Annotated[float | None, typer.Option(help="Non-torch memory; default: the GPU family's.")] = None,
    reserved_outside_gib: Annotated[
        float | None, typer.Option(help="CUDA context + display; default: the GPU's.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Weights per GPU, activation, KV bytes per token, KV blocks, max context and concurrency, and the vLLM flags."""
    from sm120_quant.serve.model_info import inspect_checkpoint
    from sm120_quant.serve.plan import PlanRequest, plan_memory
    from sm120_quant.serve.profiles import get_gpu

    ck = inspect_checkpoint(ckpt)
    result = plan_memory(
        ck,
        PlanRequest(
            gpu_name=gpu,
            gpu=get_gpu(gpu),
            tp=tp,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_dtype=kv_cache_dtype,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            weights_gib=weights_gib,
            activation_gib=activation_gib,
            overhead_gib=overhead_gib,
            reserved_outside_gib=reserved_outside_gib,
        ),
    )
    if as_json:
        out.print_json(json.dumps(result.to_json()))
        return
    r = result
    rows = [
        ("checkpoint", f"{ck.path} ({ck.model_type}, {ck.attention.upper()}, {ck.quantization})"),
        ("GPU", f"{r.tp} x {r.gpu}, {r.total_gib:.2f} GiB each, utilization {r.gpu_memory_utilization}"),
        ("weights / GPU", f"{r.weights_gib:.2f} GiB ({r.weights_source})"),
        ("activation peak", f"{r.activation_gib:.3f} GiB ({r.activation_source})"),
        ("non-torch overhead", f"{r.overhead_gib:.2f} GiB"),
        ("outside vLLM", f"{r.reserved_outside_gib:.2f} GiB (CUDA context, display)"),
        ("KV bytes / token", f"{r.kv_bytes_per_token} ({r.kv_cache_dtype}, per GPU)"),
        (
            "KV budget",
            f"{r.kv_budget_vllm_gib:.3f} GiB by vLLM's accounting, {r.kv_budget_physical_gib:.3f} GiB physical",
        ),
        ("KV cache", f"{r.num_blocks} blocks x 16 = {r.num_blocks * 16} tokens ({r.kv_cache_gib:.3f} GiB)"),
        ("max context", f"{r.max_model_len} tokens, {r.concurrency} sequences of that length at once"),
        ("vLLM flags", " ".join(r.flags)),
    ]
    for k, v in rows:
        out.print(f"{k:>20}  {v}", markup=False)
    for note in r.notes:
        err.print(f"note: {note}", markup=False)


@app.command()
def verify(
    ckpt: Annotated[Path | None, typer.Argument(help="Checkpoint to start vLLM on; omit with --url.")] = None,
    url: Annotated[str | None, typer.Option("--url", help="Verify a running server instead of starting one.")] = None,
    log: Annotated[
        Path | None, typer.Option("--log", help="Server log: written when starting, read with --url.")
    ] = None,
    gpu: GpuOpt = None,
    gpus: Annotated[int, typer.Option("--gpus", min=1)] = 1,
    max_model_len: MaxLenOpt = None,
    kv_cache_dtype: KvDtypeOpt = None,
    gpu_memory_utilization: UtilOpt = None,
    moe_backend: Annotated[str, typer.Option(help="As for `serve start`.")] = "auto",
    enforce_eager: Annotated[bool, typer.Option(help="Start vLLM without torch.compile / CUDA graphs.")] = False,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="SM120_SERVE_API_KEY")] = None,
    random_weights: Annotated[
        bool, typer.Option("--random-weights", help="Untrained test model: skip the checks that need a trained one.")
    ] = False,
    ready_timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for the server.")] = 600.0,
    request_timeout: Annotated[float, typer.Option(min=1, help="Seconds per request.")] = 120.0,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in the parallel throughput run.")] = 4,
    report: Annotated[Path | None, typer.Option("--report", help="Also write the JSON report here.")] = None,
    vllm_python: VllmPythonOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start vLLM on CKPT (or attach with --url) and check endpoints, outputs, tool calls, reasoning, log, throughput."""
    import tempfile

    from sm120_quant.errors import CheckFailed, UserError
    from sm120_quant.serve.verify import VerifyOptions, verify_checkpoint, verify_url

    if (ckpt is None) == (url is None):
        raise UserError("pass a checkpoint folder or --url, not both and not neither")
    opts = VerifyOptions(
        random_weights=random_weights,
        ready_timeout_s=ready_timeout,
        request_timeout_s=request_timeout,
        concurrency=concurrency,
        api_key=api_key,
    )
    if url is not None:
        result = verify_url(url, opts, log)
    else:
        from sm120_quant.serve.model_info import inspect_checkpoint
        from sm120_quant.serve.profiles import build_command, detect_gpu
        from sm120_quant.serve.server import free_port
        from sm120_quant.serve.vllm_env import find_vllm_python

        port = free_port()
        serve_opts = _serve_options(
            gpu or detect_gpu(),
            gpus=gpus,
            port=port,
            api_key=api_key,
            max_model_len=max_model_len,
            kv_cache_dtype=kv_cache_dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            moe_backend=moe_backend,
            enforce_eager=enforce_eager,
        )
        command = build_command(find_vllm_python(vllm_python), inspect_checkpoint(ckpt), serve_opts)
        log_path = log or Path(tempfile.mkdtemp(prefix="sm120-serve-verify-")) / "vllm.log"
        err.print(f"starting vLLM, log: {log_path}", markup=False)
        result = verify_checkpoint(command, f"http://127.0.0.1:{port}", opts, log_path)
    if report is not None:
        report.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    if as_json:
        out.print_json(json.dumps(result.to_json()))
    else:
        head = f"{result.url} serving {result.model}"
        if result.startup_s is not None:
            head += f", ready in {result.startup_s:.1f} s"
        out.print(head, markup=False)
        for c in result.checks:
            out.print(f"  {c.status.value:4}  {c.name:26} {c.detail}", markup=False)
    if not result.passed:
        raise CheckFailed("; ".join(f"{c.name}: {c.detail}" for c in result.failures))


def main(argv: list[str] | None = None) -> None:
    run_app(app, argv)


if __name__ == "__main__":
    main()
