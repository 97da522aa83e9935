"""The forward loop every engine calibrates with: a progress bar, and expert-coverage accounting around it."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext


@contextmanager
def calibration_loop(recipe, quantized, calib, progress: bool = True):
    """Yield `loop(model)`, which runs the calibration set once; engines may call it more than once (AWQ-lite runs
    a search pass and a calibration pass)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sm120_quant.cli.common import err
    from sm120_quant.quantize.modelopt_engine import make_forward_loop

    bar = (Progress(TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=True) if progress else nullcontext())
    with bar:
        task = bar.add_task("calibrate", total=len(calib)) if progress else None

        def advance(n: int) -> None:
            if progress:
                bar.update(task, advance=n)

        def loop(model) -> None:
            if progress:
                bar.reset(task, total=len(calib))
            make_forward_loop(calib, advance)(model)

        yield loop
