"""The recipe's `calibration:` section: which data the engines see, in which order, and what to do about experts
that routing leaves without data.

A section is a list of passes. Each pass is one source (a Hugging Face dataset, a local file or folder, or a built-in
offline generator) plus how many samples to take from it and which token lengths to keep. The passes are flattened
so a YAML pass reads as one mapping:

    calibration:
      max_seq_len: 2048
      passes:
        - {name: coding, source: builtin, builtin: agentic, samples: 256}
        - {name: broad, source: jsonl, path: data/chats.jsonl, format: messages, samples: 192}
        - {name: deep, source: builtin, builtin: long_context, target_tokens: 8192, max_tokens: 9000, samples: 64}

Relative paths are resolved against the `base_dir` entry of the pydantic validation context when the recipe loader
passes one (the recipe file's folder), otherwise against the current directory at build time.
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

PASS_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class SampleFormat(str, Enum):
    """How a record's column is read.

    `text` is raw text, tokenized as is (the tokenizer's own special tokens, no chat template). `messages` is a
    conversation (a list of {role, content, reasoning_content?, tool_calls?}) rendered through the tokenizer's chat
    template, with the tools of `tools_column` when one is named.
    """

    TEXT = "text"
    MESSAGES = "messages"


class TextUnit(str, Enum):
    """How a .txt file is cut into samples: the whole file, blank-line-separated paragraphs, or non-empty lines."""

    FILE = "file"
    PARAGRAPH = "paragraph"
    LINE = "line"


class BuiltinName(str, Enum):
    """Offline generators that need nothing downloaded; all are deterministic in (seed, sample index).

    code: windows of real Python source shipped with the interpreter (and the packages named in `packages`).
    agentic: multi-step tool-calling coding conversations (tool schemas, reasoning, tool calls and tool results
      that quote real source), with English or Chinese system prompts.
    structured: conversions between JSON, YAML, CSV and SQL of generated tables.
    chat: multi-turn chat about standard-library modules, answered from their real docstrings.
    bilingual_system: Chinese and English system prompts with single-turn requests in either language.
    long_context: one conversation that quotes whole source files until the rendered sample is `target_tokens` long.
    """

    CODE = "code"
    AGENTIC = "agentic"
    STRUCTURED = "structured"
    CHAT = "chat"
    BILINGUAL_SYSTEM = "bilingual_system"
    LONG_CONTEXT = "long_context"


class PaddingSide(str, Enum):
    """Where pad tokens go in a batch; ModelOpt's calibration loader expects left padding."""

    LEFT = "left"
    RIGHT = "right"


class Packing(str, Enum):
    """`none`: one sample per row, padded to the batch's longest. `pack`: a pass's samples are joined with the EOS
    token and cut into rows of exactly the pass's max_tokens (the last partial row is dropped), so nothing is padded."""

    NONE = "none"
    PACK = "pack"


class Truncation(str, Enum):
    """What happens to a sample longer than its pass's max_tokens: keep its first max_tokens tokens, skip it, or stop
    the build naming the sample."""

    TRUNCATE = "truncate"
    DROP = "drop"
    ERROR = "error"


class CoveragePolicy(str, Enum):
    """What to do about routed experts that natural top-k routing gave fewer than `min_tokens` calibration tokens.

    warn: list them in the report; an expert with no tokens gets the engine's fallback input scale.
    fail: stop the run before export, naming every such (layer, expert).
    calibrate_all: during calibration every token also goes through every expert, so each expert's input
      statistics come from all calibration tokens; the layer output still uses only the top-k experts.
    """

    WARN = "warn"
    FAIL = "fail"
    CALIBRATE_ALL = "calibrate_all"


class CoverageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: CoveragePolicy = CoveragePolicy.WARN
    min_tokens: int = Field(16, ge=1, description="an expert routed fewer tokens than this is under-covered")


def _resolve(path: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    if base is None or path.is_absolute():
        return path
    return Path(base) / path


LocalPath = Annotated[Path, AfterValidator(_resolve)]


class PassFields(BaseModel):
    """Fields every pass has, whatever its source."""

    model_config = ConfigDict(extra="forbid")

    name: str
    samples: int | None = Field(None, ge=1, description="rows this pass contributes; None: a weighted share")
    weight: float | None = Field(None, gt=0, description="share of calibration.num_samples when samples is unset")
    min_tokens: int = Field(1, ge=1, description="samples shorter than this are skipped")
    max_tokens: int | None = Field(None, ge=1, description="longer samples follow `truncation`; default max_seq_len")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not PASS_NAME.match(v):
            raise ValueError(f"pass name {v!r} must be lowercase letters, digits, '_' or '-'")
        return v

    @model_validator(mode="after")
    def _counts(self):
        if self.samples is not None and self.weight is not None:
            raise ValueError(f"pass {self.name}: set samples or weight, not both")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"pass {self.name}: min_tokens {self.min_tokens} > max_tokens {self.max_tokens}")
        return self


class RecordFields(BaseModel):
    """How records with columns (jsonl, parquet, datasets) become samples."""

    format: SampleFormat = SampleFormat.TEXT
    column: str | None = Field(None, description="default: 'text' for format text, 'messages' for format messages")
    tools_column: str | None = Field(None, description="column holding the tool schemas of a messages record")

    @property
    def data_column(self) -> str:
        if self.column is not None:
            return self.column
        return "text" if self.format is SampleFormat.TEXT else "messages"

    @model_validator(mode="after")
    def _tools_need_messages(self):
        if self.tools_column is not None and self.format is not SampleFormat.MESSAGES:
            raise ValueError("tools_column needs format: messages")
        return self


class HFDatasetPass(PassFields, RecordFields):
    source: Literal["hf_dataset"]
    path: str = Field(description="dataset id on the hub, e.g. allenai/WildChat-nontoxic, or a local dataset folder")
    config: str | None = None
    split: str = "train"
    revision: str | None = Field(None, description="pin a commit for reproducible calibration")
    streaming: bool = Field(False, description="stream and shuffle in a 10k buffer instead of downloading the split")


class JsonlPass(PassFields, RecordFields):
    source: Literal["jsonl"]
    path: LocalPath


class ParquetPass(PassFields, RecordFields):
    source: Literal["parquet"]
    path: LocalPath


class TextPass(PassFields):
    source: Literal["text"]
    path: LocalPath
    unit: TextUnit = TextUnit.FILE


class FolderPass(PassFields, RecordFields):
    """Every file under `path` matching `pattern`: .jsonl and .parquet files give records (read with format/column),
    any other file is one raw-text sample. Files are read in sorted path order before the seeded shuffle."""

    source: Literal["folder"]
    path: LocalPath
    pattern: str = "**/*"


class BuiltinPass(PassFields):
    source: Literal["builtin"]
    builtin: BuiltinName
    target_tokens: int | None = Field(None, ge=16, description="long_context only: rendered length of each sample")
    packages: list[str] = Field(
        default_factory=list, description="code and long_context: importable packages whose .py files join the stdlib"
    )

    @model_validator(mode="after")
    def _options(self):
        long = self.builtin is BuiltinName.LONG_CONTEXT
        if long and self.target_tokens is None:
            raise ValueError(f"pass {self.name}: builtin long_context needs target_tokens")
        if not long and self.target_tokens is not None:
            raise ValueError(f"pass {self.name}: target_tokens is only for builtin long_context")
        if self.packages and self.builtin not in (BuiltinName.CODE, BuiltinName.LONG_CONTEXT):
            raise ValueError(f"pass {self.name}: packages is only for builtin code and long_context")
        if long and self.max_tokens is not None and self.target_tokens > self.max_tokens:
            raise ValueError(f"pass {self.name}: target_tokens {self.target_tokens} > max_tokens {self.max_tokens}")
        return self


CalibPass = Annotated[
    HFDatasetPass | JsonlPass | ParquetPass | TextPass | FolderPass | BuiltinPass,
    Field(discriminator="source"),
]


class CalibrationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    passes: list[CalibPass] = Field(min_length=1)
    seed: int = 0
    num_samples: int | None = Field(None, ge=1, description="total rows; passes without samples split it by weight")
    max_seq_len: int = Field(2048, ge=16)
    batch_size: int = Field(1, ge=1)
    thinking: bool = Field(True, description="chat template's enable_thinking; GLM-4.7 serves with thinking on")
    padding_side: PaddingSide = PaddingSide.LEFT
    packing: Packing = Packing.NONE
    truncation: Truncation = Truncation.TRUNCATE
    dedupe: bool = Field(True, description="drop a sample whose tokens equal an earlier sample's (across passes)")
    coverage: CoverageSpec = Field(default_factory=CoverageSpec)

    @model_validator(mode="after")
    def _passes(self):
        names = [p.name for p in self.passes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"pass names must be unique; repeated: {', '.join(dupes)}")
        for p in self.passes:
            if p.max_tokens is not None and p.max_tokens > self.max_seq_len:
                raise ValueError(f"pass {p.name}: max_tokens {p.max_tokens} > max_seq_len {self.max_seq_len}")
            if isinstance(p, BuiltinPass) and p.target_tokens is not None and p.target_tokens > self.max_seq_len:
                raise ValueError(f"pass {p.name}: target_tokens {p.target_tokens} > max_seq_len {self.max_seq_len}")
        self.sample_counts()
        return self

    def max_tokens(self, p: PassFields) -> int:
        return self.max_seq_len if p.max_tokens is None else p.max_tokens

    def sample_counts(self) -> dict[str, int]:
        """Rows per pass: explicit `samples`, and `num_samples` minus those split over the rest by weight.

        The split rounds down and hands the leftover rows one each to the largest remainders (ties to the earlier
        pass), so the counts always sum to num_samples.
        """
        explicit = {p.name: p.samples for p in self.passes if p.samples is not None}
        weighted = [p for p in self.passes if p.samples is None]
        if not weighted:
            if self.num_samples is not None and self.num_samples != sum(explicit.values()):
                raise ValueError(
                    f"num_samples {self.num_samples} != sum of the passes' samples {sum(explicit.values())}"
                )
            return explicit
        if self.num_samples is None:
            raise ValueError(f"pass {weighted[0].name} has no samples; set it or calibration.num_samples")
        left = self.num_samples - sum(explicit.values())
        if left < len(weighted):
            raise ValueError(
                f"num_samples {self.num_samples} leaves {left} rows for {len(weighted)} weighted passes; raise it"
            )
        weights = [1.0 if p.weight is None else p.weight for p in weighted]
        shares = [left * w / sum(weights) for w in weights]
        counts = [int(s) for s in shares]
        by_remainder = sorted(range(len(weighted)), key=lambda i: (-(shares[i] - counts[i]), i))
        for i in by_remainder[: left - sum(counts)]:
            counts[i] += 1
        if min(counts) < 1:
            raise ValueError(f"num_samples {self.num_samples} gives a weighted pass no rows; raise it or its weight")
        share = dict(zip((p.name for p in weighted), counts, strict=True))
        return {p.name: explicit[p.name] if p.name in explicit else share[p.name] for p in self.passes}
