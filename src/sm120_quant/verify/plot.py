"""One PNG a person can glance at: per-layer error (local and accumulated) and MoE routing agreement, with the
thresholds drawn in and the failing layers marked."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path


def plot_report(report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; never pick an interactive backend
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    layers = [m.index for m in report.layers]
    failing = {f.layer for f in report.failures if f.layer is not None}
    fig, (ax_err, ax_route) = plt.subplots(2, 1, figsize=(max(6.0, 0.18 * len(layers) + 4), 6.5), sharex=True)

    local = [_finite(m.local_error) for m in report.layers]
    stream = [_finite(m.stream_error) for m in report.layers]
    weight = [_finite(m.weight_error) if m.weight_error is not None else float("nan") for m in report.layers]
    dense = [_finite(m.dense_error) for m in report.layers]
    ax_err.bar(layers, local, color=["tab:red" if i in failing else "tab:blue" for i in layers],
               label="local layer error (source input)")
    ax_err.plot(layers, stream, "o-", color="tab:orange", label="accumulated error (own hidden states)")
    ax_err.plot(layers, weight, "s:", color="tab:green", label="worst quantized weight error")
    ax_err.plot(layers, dense, "^:", color="tab:purple", label="worst change of an unquantized tensor")
    ax_err.axhline(report.thresholds["max_layer_error"], color="tab:red", ls="--", lw=1, label="max_layer_error")
    for m in report.layers:
        if m.nonfinite:
            ax_err.annotate("NaN/Inf", (m.index, 0), color="tab:red", ha="center", va="bottom", rotation=90)
    ax_err.set_ylabel("relative error")
    ax_err.legend(fontsize=7, loc="upper left")

    moe = [m for m in report.layers if m.routing_local is not None]
    if moe:
        ax_route.plot([m.index for m in moe], [m.routing_local for m in moe], "o-", label="local (source input)")
        ax_route.plot([m.index for m in moe], [m.routing_stream for m in moe], "x--", label="accumulated")
        ax_route.axhline(report.thresholds["min_routing_agreement"], color="tab:red", ls="--", lw=1,
                         label="min_routing_agreement")
        ax_route.set_ylim(-0.02, 1.02)
        ax_route.legend(fontsize=7, loc="lower left")
    else:
        ax_route.text(0.5, 0.5, "no MoE layers", ha="center", va="center", transform=ax_route.transAxes)
    ax_route.set_ylabel("top-k expert set unchanged")
    ax_route.set_xlabel("decoder layer")
    ax_route.xaxis.set_major_locator(MaxNLocator(integer=True))

    verdict = "PASS" if report.passed else f"FAIL ({len(report.failures)}): {report.failures[0].message}"
    width = int(fig.get_figwidth() * 14)  # characters of a 9-point title line
    fig.suptitle(f"{Path(report.checkpoint).name}\ncosine {report.cosine:.5f}  KL {report.kl:.4f}  "
                 f"top-1 {report.top1:.1%}  ppl {report.ppl_source:.4g} -> {report.ppl_quantized:.4g}\n"
                 + "\n".join(textwrap.wrap(verdict, width, max_lines=2, placeholder=" ...")), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finite(value: float) -> float:
    """Bars cannot show NaN; a non-finite layer is drawn at 0 and annotated instead."""
    return value if math.isfinite(value) else 0.0
