"""`quantize run`: Recipe -> CalibrationSet -> QuantizedModel -> Checkpoint -> Report, top to bottom.

Everything that can fail cheaply (recipe, output folder, source checkpoint, calibration data) fails before the model
is loaded. The checkpoint is written into a hidden sibling folder and renamed into place only once it is complete and
checked, so a failed run never leaves a folder that looks like a finished checkpoint.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from sm120_quant.errors import CheckFailed, UserError
from sm120_quant.recipes.load import LoadedRecipe


def resolve_output(loaded: LoadedRecipe, output: Path | None, overwrite: bool) -> Path:
    target = (output or Path(loaded.recipe.export.output_dir)).expanduser().resolve()
    if target.exists() and not overwrite:
        raise UserError(f"{target}: already exists; pass --overwrite to replace it or --output to choose another folder")
    if target.exists() and not target.is_dir():
        raise UserError(f"{target}: exists and is not a folder; choose another --output")
    return target


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: choose auto, cpu or cuda")
    return device


def run_recipe(loaded: LoadedRecipe, output: Path | None = None, overwrite: bool = False, device: str = "auto",
               progress: bool = True):
    from sm120_quant.calib_data.build import build_calibration_set
    from sm120_quant.exporters.export import export
    from sm120_quant.models.load import load_model, resolve_source
    from sm120_quant.quantize import quantize
    from sm120_quant.report import RunStats, build_report, print_summary, write_report

    recipe = loaded.recipe
    target = resolve_output(loaded, output, overwrite)
    device = pick_device(device)
    stats = RunStats()

    with stats.stage("load"):
        source = resolve_source(recipe.model)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source.folder, trust_remote_code=recipe.model.trust_remote_code)
    with stats.stage("calibration_data"):
        calib = build_calibration_set(recipe.calibration, tokenizer,
                                      max_model_len=source.config.get("max_position_embeddings"), progress=progress)
    with stats.stage("load"):
        model = load_model(recipe.model, source, device=device)
    with stats.stage("quantize"):
        quantized = quantize(recipe, model, tokenizer, source, calib, progress=progress)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        with stats.stage("export"):
            checkpoint = export(quantized, recipe, staging)
        del model, quantized.model  # the export holds everything that follows; free the calibrated model
        with stats.stage("fixups_and_check"):
            staging, check, fixed = fix_and_check(staging, recipe, source)
            checkpoint = replace(checkpoint, folder=staging)
        # Fail before verification, the expensive step: an export with doctor ERRORs is never published anyway.
        if check.errors:
            first = check.errors[0]
            raise CheckFailed(f"the export has {len(check.errors)} checkpoint ERROR(s); first: {first.key}: "
                              f"{first.message}; nothing was written to {target}")
        if fixed is not None:
            rules = ", ".join(sorted({a.rule.value for a in fixed.actions}))
            quantized.notes.append(f"fixups: {len(fixed.actions)} repairs ({rules}); max added weight error "
                                   f"{fixed.max_added_error}")
        verified = None
        if recipe.verify.enabled:
            with stats.stage("verify"):
                from sm120_quant.verify.verify import verify_checkpoint

                verified = verify_checkpoint(staging, source, recipe.verify, device=device, out_dir=staging)
        with stats.stage("tensor_parallel"):
            by_tp = doctor_by_runtime_and_tp(staging, target)
        with stats.stage("weight_error"):
            from sm120_quant.verify.reader import weight_errors

            errors = quantized.weight_errors or weight_errors(source.folder, staging)
        report = build_report(loaded, source, calib, quantized, checkpoint, check, errors, stats)
        report = replace(report.with_checkpoint(target), fixups=fixed.to_dict() if fixed else None,
                         tensor_parallel=by_tp, tp_table=tp_rows(source.config, recipe),
                         verify=verify_summary(verified))
        write_report(report, staging, loaded, quantized.coverage_check)
        if verified is not None and not verified.passed:
            first = verified.failures[0]
            raise CheckFailed(f"verification against the BF16 source failed: {first.message} "
                              f"({len(verified.failures)} failure(s)); nothing was written to {target}")
        _make_publishable(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    print_summary(report)
    from sm120_quant.exporters.hub import upload_after_run

    upload_after_run(target, recipe.upload, progress=progress)  # no-op unless the recipe names upload.repo_id
    return report


def _make_publishable(folder: Path) -> None:
    """mkdtemp makes the staging folder private (0700) and some writers create 0600 files; the finished checkpoint
    gets the permissions any folder the user creates would have."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


TP_SIZES = (1, 2, 4, 8)


def verify_summary(verified) -> dict | None:
    """The headline of `quantize verify` for report.json (the full report is verify.json beside it)."""
    if verified is None:
        return None
    routing = [m.routing_local for m in verified.layers if m.routing_local is not None]
    return {"passed": verified.passed, "worst_layer": verified.worst_layer,
            "metrics": {"cosine": verified.cosine, "kl": verified.kl, "top1": verified.top1,
                        "routing_agreement": min(routing) if routing else None,
                        "ppl": {"source": verified.ppl_source, "quantized": verified.ppl_quantized}},
            "failures": [f.message for f in verified.failures], "details": "verify.json"}


def doctor_by_runtime_and_tp(folder: Path, target: Path) -> list[dict]:
    """The doctor's verdict for vLLM and SGLang at each common TP size (headers only: about a second on a full
    GLM-4.7), for the report and the model card."""
    from sm120_quant.exporters.check import check_checkpoint

    return [{**check_checkpoint(folder, runtime=runtime, tp=tp).to_dict(), "path": str(target)}
            for runtime in ("vllm", "sglang") for tp in TP_SIZES]


def tp_rows(config: dict, recipe) -> list[dict]:
    """Which TP sizes divide every quantized shard of this architecture and scheme, from config.json alone."""
    from sm120_quant.quantize.tensor_parallel import tp_table

    return [row.to_dict() for row in tp_table(config, recipe.scheme, TP_SIZES, exclude=recipe.exclude)]


def fixup_rules(fixups) -> set:
    from sm120_quant.exporters.check import Rule

    rules = set()
    if fixups.shared_global_scales:
        rules.add(Rule.FUSED_SCALES)
    if fixups.repair_e4m3_scales:
        rules.add(Rule.BLOCK_SCALES)
    if fixups.kv_scales:
        rules |= {Rule.KV_SCALE_NAMES, Rule.KV_SCALES, Rule.KV_SCALES_MLA}
    if fixups.exclusions:
        rules |= {Rule.NOT_EXCLUDED, Rule.MTP_NOT_EXCLUDED, Rule.EXCLUDED_SCALES, Rule.ROUTER}
    if fixups.copy_mtp:
        rules |= {Rule.MTP_MISSING, Rule.MTP_QUANTIZED}
    return rules


def fix_and_check(folder: Path, recipe, source) -> tuple[Path, object, object]:
    """Lint the export; when it has findings the recipe's fixups repair, write the repaired copy beside it (still a
    hidden staging folder) and lint that. Returns (folder to publish, its check report, the fix result or None)."""
    from sm120_quant.exporters.check import check_checkpoint
    from sm120_quant.exporters.fix import fix_checkpoint

    check = check_checkpoint(folder, runtime=None, tp=None, deep=True)
    rules = fixup_rules(recipe.fixups) & check.rules()
    if not rules:
        return folder, check, None
    fixed = folder.with_name(folder.name + "-fixed")
    result = fix_checkpoint(folder, fixed, only=sorted(r.value for r in rules), source=source.folder)
    shutil.rmtree(folder)
    return fixed, result.after, result
