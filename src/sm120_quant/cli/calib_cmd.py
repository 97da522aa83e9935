"""`quantize calib`: look at a recipe's calibration data exactly as the engines will get it."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from sm120_quant.cli.common import RecipeArg, out

app = typer.Typer(
    name="calib",
    help="Inspect a recipe's calibration data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Inspect a recipe's calibration data."""


def _clip(text: str, chars: int) -> str:
    return text if chars == 0 or len(text) <= chars else f"{text[:chars]}\n[... {len(text) - chars} more characters]"


@app.command()
def show(
    recipe: RecipeArg,
    samples: Annotated[int, typer.Option(min=0, max=3, help="First samples to print per pass.")] = 1,
    chars: Annotated[int, typer.Option(min=0, help="Characters per printed sample; 0 prints it whole.")] = 2000,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout instead of tables.")] = False,
) -> None:
    """Build the calibration set and print its passes, sample and token counts, content hash and first samples
    (decoded with special tokens: the text the model sees)."""
    from sm120_quant.calib_data.build import build_calibration_set
    from sm120_quant.models.load import load_tokenizer, resolve_source
    from sm120_quant.recipes.load import load_recipe

    loaded = load_recipe(recipe)
    model = loaded.recipe.model
    calib = build_calibration_set(loaded.recipe.calibration, load_tokenizer(model),
                                  max_model_len=resolve_source(model).config.get("max_position_embeddings"),
                                  progress=not as_json)
    if as_json:
        out.print(json.dumps({
            "recipe": str(loaded.path), "content_hash": calib.content_hash, "num_samples": calib.num_samples,
            "num_tokens": calib.num_tokens, "batches": len(calib),
            "passes": [{"name": p.name, "source": p.source, "samples": p.samples, "tokens": p.tokens,
                        "min_len": p.min_len, "max_len": p.max_len,
                        "first_samples": [_clip(s, chars) for s in p.first_samples[:samples]]}
                       for p in calib.passes],
        }, ensure_ascii=False, indent=2), markup=False, highlight=False)
        return

    from rich.table import Table

    table = Table(title=f"calibration of {loaded.path.name}", title_justify="left")
    for column in ("pass", "source", "samples", "tokens", "min len", "max len"):
        table.add_column(column, justify="right" if column not in ("pass", "source") else "left")
    for p in calib.passes:
        table.add_row(p.name, p.source, str(p.samples), str(p.tokens), str(p.min_len), str(p.max_len))
    table.add_row("total", "", str(calib.num_samples), str(calib.num_tokens), "", "", style="bold")
    out.print(table)
    out.print(f"content hash: {calib.content_hash}")
    out.print(f"batches: {len(calib)} of up to {calib.batch_size} rows, {calib.padding_side.value}-padded")
    for p in calib.passes:
        for k, text in enumerate(p.first_samples[:samples]):
            out.rule(f"{p.name} sample {k}", align="left")
            out.print(_clip(text, chars), markup=False, highlight=False)
