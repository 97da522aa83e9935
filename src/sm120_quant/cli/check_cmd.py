"""`quantize check` and `quantize fix`: thin commands over the checkpoint doctor (`sm120_quant.exporters.check` and
`.fix`). Registered on the `quantize` app as `app.command("check")(check)` and `app.command("fix")(fix)`."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sm120_quant.cli.common import err, out
from sm120_quant.errors import CheckFailed

if TYPE_CHECKING:
    from sm120_quant.exporters.check import CheckReport

CkptArg = Annotated[Path, typer.Argument(help="Checkpoint folder: config.json, safetensors shards (and index).",
                                         show_default=False)]
RuntimeOpt = Annotated[str | None, typer.Option(
    "--runtime", help="Target runtime, vllm==X or sglang==X: version-dependent rules use it (default: both, "
                      "version unknown).")]
TpOpt = Annotated[int | None, typer.Option(
    "--tp", min=1, help="Tensor-parallel size to check divisibility for (default: the TP=1 requirements).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")]

# A rule that fires on every expert prints this many keys in human mode; --json lists them all.
_SHOWN_PER_RULE = 5


def check(
    ckpt: CkptArg,
    runtime: RuntimeOpt = None,
    tp: TpOpt = None,
    deep: Annotated[bool, typer.Option("--deep", help="Also read block scales and weights (NaN bytes, zero "
                                                      "scales, all-zero weights).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Report what vLLM / SGLang will reject or silently get wrong in a quantized checkpoint; exit 1 on findings."""
    from sm120_quant.exporters.check import check_checkpoint

    report = check_checkpoint(ckpt, runtime=runtime, tp=tp, deep=deep)
    if as_json:
        out.print(json.dumps(report.to_dict(), indent=2), markup=False, highlight=False)
    else:
        _print_report(report)
    if report.findings:
        raise CheckFailed(f"{ckpt}: {len(report.errors)} error(s), {len(report.warnings)} warning(s)")


def fix(
    ckpt: CkptArg,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the repaired copy; must not exist.",
                                          show_default=False)],
    only: Annotated[list[str] | None, typer.Option(
        "--only", help="Repair only these rules (repeat, or comma-separate); default: every repairable rule.")] = None,
    source: Annotated[Path | None, typer.Option(
        "--source", help="The BF16 checkpoint the export was made from: MTP weights and the router bias come from "
                         "it.")] = None,
    runtime: RuntimeOpt = None,
    tp: TpOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a repaired copy of a checkpoint (never in place) and check the copy; exit 1 if findings remain."""
    from sm120_quant.exporters.fix import fix_checkpoint

    rules = [r.strip() for item in only for r in item.split(",") if r.strip()] if only else None
    result = fix_checkpoint(ckpt, out_dir, only=rules, source=source, runtime=runtime, tp=tp)
    if as_json:
        out.print(json.dumps(result.to_dict(), indent=2), markup=False, highlight=False)
    else:
        for a in result.actions:
            added = f" (added error {a.added_error:.4f})" if a.added_error is not None else ""
            out.print(f"FIXED {a.rule.value:18} {a.key}: {a.action}{added}", markup=False, highlight=False)
        if result.max_added_error is not None:
            out.print(f"largest added weight error (relative Frobenius): {result.max_added_error:.4f}", markup=False)
        out.print(str(result.out), markup=False, highlight=False)
        if result.after.findings:
            _print_report(result.after)
    if result.after.findings:
        raise CheckFailed(f"{result.out}: {len(result.after.findings)} finding(s) remain after the repairs")
    err.print(f"{len(result.actions)} repair(s); the copy checks clean", markup=False, highlight=False)


def _print_report(report: CheckReport) -> None:
    by_rule = defaultdict(list)
    for f in report.findings:
        by_rule[(f.level.value, f.rule.value)].append(f)
    for (level, rule), findings in by_rule.items():
        for f in findings[:_SHOWN_PER_RULE]:
            out.print(f"{level:5} {rule:20} {f.key}\n      {f.message}\n      runtime: {f.runtime_effect}\n"
                      f"      fix: {f.fix}", markup=False, highlight=False)
        if len(findings) > _SHOWN_PER_RULE:
            out.print(f"      ... and {len(findings) - _SHOWN_PER_RULE} more {rule} finding(s) (--json lists all)",
                      markup=False, highlight=False)
    target = f"{report.runtime or 'any runtime'}, TP{report.tp or 1}{', deep' if report.deep else ''}"
    out.print(f"{report.path}: {report.layout}, {report.files} file(s), {report.tensors} tensors ({target}): "
              f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)", markup=False, highlight=False)
