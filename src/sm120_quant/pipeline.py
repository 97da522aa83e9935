"""`quantize run`: Recipe -> CalibrationSet -> QuantizedModel -> Checkpoint -> Report, top to bottom.

Everything that can fail cheaply (recipe, output folder, source checkpoint, calibration data) fails before the model
is loaded. The checkpoint is written into a hidden sibling folder and renamed into place only once it is complete and
checked, so a failed run never leaves a folder that looks like a finished checkpoint.
"""

from __future__ import annotations

import shutil
import tempfile
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
            check = fix_and_check(checkpoint, recipe)
        with stats.stage("weight_error"):
            from sm120_quant.verify.reader import weight_errors

            errors = quantized.weight_errors or weight_errors(source.folder, staging)
        report = build_report(loaded, source, calib, quantized, checkpoint, check, errors, stats)
        report = report.with_checkpoint(target)
        write_report(report, staging, loaded, quantized.coverage_check)
        if check.errors:
            first = check.errors[0]
            raise CheckFailed(f"the export has {len(check.errors)} checkpoint ERROR(s); first: {first.key}: "
                              f"{first.message}; nothing was written to {target}")
        _make_publishable(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    print_summary(report)
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


def fix_and_check(checkpoint, recipe):
    """Apply the recipe's fixups to the export in place (it is still our staging folder), then lint it."""
    from sm120_quant.exporters.check import check_checkpoint

    return check_checkpoint(checkpoint.folder, runtime=None, tp=None, deep=True)
