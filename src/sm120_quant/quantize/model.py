"""The output of the quantize stage: a calibrated model plus what the later stages need to know about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sm120_quant.models.load import SourceCheckpoint
from sm120_quant.recipes.schema import Engine, Scheme


@dataclass
class QuantizedModel:
    """A model whose quantizers are calibrated (ModelOpt) or whose modifiers were applied (llm-compressor).

    Mutable on purpose: the model object is the engine's live torch module, handed to the engine's exporter.
    """

    model: Any
    tokenizer: Any
    source: SourceCheckpoint
    engine: Engine
    scheme: Scheme
    expanded_modules: list[str] = field(default_factory=list)
    quantizers_enabled: int = 0
    quantizers_total: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    coverage: dict[str, Any] = field(default_factory=dict)
    coverage_check: Any = None  # calib_data.coverage.CoverageCheck, for the report's table and heat map
    smoothing: list[dict[str, Any]] = field(default_factory=list)
    # Set by an engine when the source weights are not what was quantized (AWQ smoothing); see report.weight_error.
    weight_errors: dict[str, tuple[str, float]] | None = None
