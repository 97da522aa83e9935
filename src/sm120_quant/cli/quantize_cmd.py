"""`quantize`: run recipes, list and show them, and (from sibling modules) check, fix, verify and upload checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sm120_quant.cli import calib_cmd, check_cmd, upload_cmd, verify_cmd
from sm120_quant.cli.common import RecipeArg, out, run_app, version_callback

app = typer.Typer(
    name="quantize",
    help="Quantize BF16 MoE checkpoints to NVFP4 / FP8-block checkpoints that load correctly on SM120 GPUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Quantize BF16 MoE checkpoints to NVFP4 / FP8-block checkpoints that load correctly on SM120 GPUs."""


@app.command()
def run(
    recipe: RecipeArg,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output folder; overrides export.output_dir.")]
    = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
    device: Annotated[str, typer.Option(help="auto (cuda when available), cpu or cuda.")] = "auto",
) -> None:
    """Run a whole recipe: load, calibrate, quantize, export, fix up, check, verify; print the checkpoint path."""
    from sm120_quant.pipeline import run_recipe
    from sm120_quant.recipes.load import load_recipe

    report = run_recipe(load_recipe(recipe), output=output, overwrite=overwrite, device=device)
    out.print(str(report.checkpoint))


@app.command("recipes")
def list_recipes() -> None:
    """List the bundled recipes."""
    from sm120_quant.recipes.load import bundled_recipes, load_recipe

    for name in bundled_recipes():
        loaded = load_recipe(name)
        out.print(f"{name:34} {loaded.recipe.scheme.value:15} {loaded.recipe.model.id}")


@app.command()
def show(recipe: RecipeArg) -> None:
    """Print the fully resolved recipe (every default filled in) as YAML."""
    from sm120_quant.recipes.load import dump_recipe, load_recipe

    loaded = load_recipe(recipe)
    # Plain text: this output is meant to be saved and edited as a recipe, so no console styling or wrapping.
    typer.echo(f"# {loaded.path}\n{dump_recipe(loaded.recipe)}", nl=False)


app.command("check")(check_cmd.check)
app.command("fix")(check_cmd.fix)
app.add_typer(calib_cmd.app, name="calib")
app.command("verify")(verify_cmd.verify)
app.command("upload")(upload_cmd.upload)


def main(argv: list[str] | None = None) -> None:
    run_app(app, argv)


if __name__ == "__main__":
    main()
