"""The one error boundary shared by both console scripts, and the option aliases commands share."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

from sm120_quant import __version__
from sm120_quant.errors import CheckFailed, UserError

# Results go to stdout, everything a person reads about the run (progress, warnings, errors) to stderr.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2


def version_callback(value: bool) -> None:
    if value:
        out.print(f"sm120-quant {__version__}")
        raise typer.Exit(EXIT_OK)


def _usage_error_types() -> tuple[type, ...]:
    """typer 0.29 vendors its own copy of click, whose exceptions are not click's; accept both."""
    import click

    types: list[type] = [click.exceptions.ClickException]
    try:
        from typer._click.exceptions import ClickException as TyperClickException

        types.append(TyperClickException)
    except ImportError:
        pass
    return tuple(types)


RecipeArg = Annotated[str, typer.Argument(help="A bundled recipe name (see `quantize recipes`) or a YAML file path.")]


def run_app(app: typer.Typer, argv: list[str] | None = None) -> None:
    """Run a typer app; known errors become one stderr line and an exit code, unknown ones keep their traceback."""
    try:
        app(args=argv, standalone_mode=False)
    except UserError as e:
        err.print(f"[bold red]error:[/] {e}", markup=True)
        sys.exit(EXIT_USAGE)
    except CheckFailed as e:
        err.print(f"[bold red]failed:[/] {e}", markup=True)
        sys.exit(EXIT_FINDINGS)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(EXIT_FINDINGS)
    except Exception as e:  # usage errors (missing argument, bad option value) arrive here in non-standalone mode
        if isinstance(e, _usage_error_types()):
            e.show()
            sys.exit(EXIT_USAGE)
        raise
    sys.exit(EXIT_OK)

