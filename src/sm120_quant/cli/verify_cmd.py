"""`quantize verify`: a thin command over `sm120_quant.verify.verify.verify_checkpoint`. Registered on the `quantize`
app as `app.command("verify")(verify)`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sm120_quant.cli.common import out
from sm120_quant.errors import CheckFailed

if TYPE_CHECKING:
    from sm120_quant.verify.verify import VerifyReport

_SHOWN_FAILURES = 8


def verify(
    ckpt: Annotated[Path, typer.Argument(help="Quantized checkpoint folder (ModelOpt or compressed-tensors).",
                                         show_default=False)],
    source: Annotated[str, typer.Option("--source", help="The BF16 model it was quantized from: hub id, local "
                                                         "folder or tiny://NAME.", show_default=False)],
    prompts: Annotated[Path | None, typer.Option(
        "--prompts", help="Held-out prompts: one per line, or .jsonl with {\"text\": ...} per line (default: the "
                          "recipe's verify.prompts, else built-in prompts).")] = None,
    recipe: Annotated[str | None, typer.Option(
        "--recipe", help="Take the thresholds (and prompts) from this recipe's verify: section (name or path).")]
    = None,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Write verify.json and verify.png into this folder.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=2, help="Tokens per prompt (longer ones are cut).")]
    = 256,
    generate: Annotated[int, typer.Option("--generate", min=0, help="Greedy tokens per generation prompt (0: none).")]
    = 16,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Run the checkpoint (dequantized by our reference math, activations quantized as the runtime does) and its
    source on held-out prompts, layer by layer; exit 1 when a threshold is crossed."""
    from sm120_quant.models.load import resolve_source
    from sm120_quant.recipes.load import load_recipe
    from sm120_quant.recipes.schema import ModelSpec, VerifySpec
    from sm120_quant.verify.prompts import load_prompts
    from sm120_quant.verify.verify import verify_checkpoint

    spec = load_recipe(recipe).recipe.verify if recipe else VerifySpec()
    report = verify_checkpoint(ckpt, resolve_source(ModelSpec(id=source)), spec,
                               prompts=load_prompts(prompts) if prompts else None, device=device, out_dir=out_dir,
                               max_prompt_tokens=max_tokens, generate_tokens=generate)
    if as_json:
        out.print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False), markup=False, highlight=False)
    else:
        _print_report(report)
    if not report.passed:
        first = report.failures[0]
        raise CheckFailed(f"{ckpt}: {len(report.failures)} verification failure(s); first: {first.message}")


def _print_report(report: VerifyReport) -> None:
    from rich.table import Table

    out.print(f"{report.checkpoint} vs {report.source}: {report.prompts} prompts, {report.tokens} positions",
              markup=False)
    out.print(f"logits cosine {report.cosine:.5f} (min {report.cosine_min:.4f})  KL {report.kl:.5f} nats "
              f"(max {report.kl_max:.4f})  top-1 {report.top1:.1%}  perplexity {report.ppl_source:.4g} -> "
              f"{report.ppl_quantized:.4g}", markup=False)
    table = Table("layer", "kind", "local err", "stream err", "routing", "worst weight err", "worst module",
                  "NaN/Inf")
    for m in report.layers:
        routing = "" if m.routing_local is None else f"{m.routing_local:.1%} / {m.routing_stream:.1%}"
        weight = "" if m.weight_error is None else f"{m.weight_error:.4f}"
        table.add_row(str(m.index), m.kind, f"{m.local_error:.4f}", f"{m.stream_error:.4f}", routing, weight,
                      m.worst_module or "", str(m.nonfinite) if m.nonfinite else "")
    out.print(table)
    for g in report.generations:
        out.print(f"prompt {g.prompt!r}\n  source:    {g.source!r}\n  quantized: {g.quantized!r}  "
                  f"({g.same_tokens} leading tokens agree)", markup=False)
    for note in report.notes:
        out.print(f"note: {note}", markup=False)
    for f in report.failures[:_SHOWN_FAILURES]:
        out.print(f"FAIL {f.check}: {f.message}", markup=False)
    if len(report.failures) > _SHOWN_FAILURES:
        out.print(f"... and {len(report.failures) - _SHOWN_FAILURES} more (--json lists all)", markup=False)
    out.print("PASS" if report.passed else "FAIL", markup=False)
    for path in report.files:
        out.print(path, markup=False)
