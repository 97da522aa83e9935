"""Load a calibration pass's records and hand them out as samples, shuffled with the pass's seed.

A sample is raw text (tokenized as is) or a conversation (rendered through the chat template). Every sample carries
its origin ("data.jsonl:17", "hf org/ds train[42]") so that an error about it can name it. Builtin passes are
generated in `builtin.py`; this module dispatches to it.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sm120_quant.errors import UserError
from sm120_quant.recipes.calibration import (
    BuiltinPass,
    FolderPass,
    HFDatasetPass,
    JsonlPass,
    ParquetPass,
    RecordFields,
    SampleFormat,
    TextPass,
    TextUnit,
)

ROLES = ("system", "user", "assistant", "tool")
# Keys a chat template reads; anything else a dataset carries (timestamps, language tags, moderation) is dropped so it
# cannot leak into a template that renders unknown keys.
MESSAGE_KEYS = ("role", "content", "reasoning_content", "tool_calls", "tool_call_id", "name")


@dataclass(frozen=True)
class TextSample:
    origin: str
    text: str


@dataclass(frozen=True)
class ChatSample:
    origin: str
    messages: tuple[dict[str, Any], ...]
    tools: tuple[dict[str, Any], ...] = ()


Sample = TextSample | ChatSample

# What a builtin generator needs from the builder: the token count of a sample as the model will see it.
Measure = Callable[[Sample], int]


def pass_seed(seed: int, pass_name: str) -> int:
    """The 64-bit seed of one pass: independent of the other passes, so adding a pass does not reshuffle the rest."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{pass_name}".encode()).digest()[:8], "little")


def open_pass(p, seed: int, measure: Measure) -> Iterator[Sample]:
    """All samples of pass `p` in seeded order; the builder takes as many as it needs."""
    return _OPENERS[type(p)](p, pass_seed(seed, p.name), measure)


def _where(p) -> str:
    return f"calibration pass {p.name}"


def _existing(p, path: Path) -> Path:
    if not path.exists():
        raise UserError(
            f"{_where(p)}: {path} does not exist; fix `path` (relative paths resolve against the recipe's folder)"
        )
    return path


def _shuffled(items: Sequence[Sample], seed: int) -> Iterator[Sample]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return (items[i] for i in order)


def normalize_messages(origin: str, messages: Any) -> tuple[dict[str, Any], ...]:
    """Check a conversation and keep only the keys chat templates read.

    OpenAI-style tool calls carry `arguments` as a JSON string; GLM's template iterates `arguments.items()`, so a
    string is parsed into a mapping here.
    """
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{origin}: messages must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise UserError(f"{origin}: message {i} needs a role in {', '.join(ROLES)}; got {str(m)[:80]!r}")
        content = m.get("content")
        if content is None and not m.get("tool_calls"):
            raise UserError(f"{origin}: message {i} ({m['role']}) has no content")
        kept = {k: m[k] for k in MESSAGE_KEYS if m.get(k) is not None}
        if "tool_calls" in kept:
            kept["tool_calls"] = [_tool_call(origin, i, tc) for tc in kept["tool_calls"]]
        out.append(kept)
    return tuple(out)


def _tool_call(origin: str, i: int, tc: Any) -> dict[str, Any]:
    fn = tc.get("function", tc) if isinstance(tc, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise UserError(f"{origin}: message {i}: a tool call needs function.name; got {str(tc)[:80]!r}")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise UserError(f"{origin}: message {i}: tool call {fn['name']} arguments are not JSON ({e.msg})") from e
    if not isinstance(args, dict):
        raise UserError(f"{origin}: message {i}: tool call {fn['name']} arguments must be an object")
    call = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(tc, dict) and "id" in tc:
        call["id"] = tc["id"]
    return call


def _record_to_sample(p: RecordFields, origin: str, record: dict[str, Any]) -> Sample:
    value = record[p.data_column]
    if p.format is SampleFormat.TEXT:
        if not isinstance(value, str):
            raise UserError(f"{origin}: column {p.data_column!r} is {type(value).__name__}, not text; set format")
        return TextSample(origin, value)
    tools = record.get(p.tools_column) if p.tools_column else None
    if isinstance(tools, str):
        tools = json.loads(tools)
    if tools is not None and not isinstance(tools, list):
        raise UserError(f"{origin}: column {p.tools_column!r} must be a list of tool schemas")
    return ChatSample(origin, normalize_messages(origin, value), tuple(tools or ()))


def _check_columns(p, where: str, columns: Sequence[str]) -> None:
    wanted = [p.data_column] + ([p.tools_column] if p.tools_column else [])
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise UserError(
            f"{where}: no column {missing[0]!r} (columns: {', '.join(columns)}); set `column`/`tools_column`"
        )


def _jsonl_records(p, path: Path) -> list[Sample]:
    samples = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        origin = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{origin}: not valid JSON ({e.msg}); each line must be one JSON object") from e
        if not isinstance(record, dict):
            raise UserError(f"{origin}: a line must be a JSON object, got {type(record).__name__}")
        _check_columns(p, origin, list(record))
        samples.append(_record_to_sample(p, origin, record))
    return samples


def _parquet_records(p, path: Path) -> list[Sample]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    _check_columns(p, str(path), table.column_names)
    rows = table.select([c for c in (p.data_column, p.tools_column) if c]).to_pylist()
    return [_record_to_sample(p, f"{path}[row {i}]", r) for i, r in enumerate(rows)]


def _nonempty(p, where: Path | str, samples: list[Sample]) -> list[Sample]:
    if not samples:
        raise UserError(f"{_where(p)}: {where} has no samples; point `path` at data or remove the pass")
    return samples


def _open_jsonl(p: JsonlPass, seed: int, measure: Measure) -> Iterator[Sample]:
    path = _existing(p, p.path)
    return _shuffled(_nonempty(p, path, _jsonl_records(p, path)), seed)


def _open_parquet(p: ParquetPass, seed: int, measure: Measure) -> Iterator[Sample]:
    path = _existing(p, p.path)
    return _shuffled(_nonempty(p, path, _parquet_records(p, path)), seed)


def _text_units(path: Path, unit: TextUnit) -> list[TextSample]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it or exclude it") from e
    if unit is TextUnit.FILE:
        parts = [text] if text.strip() else []
    elif unit is TextUnit.PARAGRAPH:
        parts = [b.strip() for b in text.split("\n\n") if b.strip()]
    else:
        parts = [line for line in text.splitlines() if line.strip()]
    return [TextSample(f"{path}#{i}", t) for i, t in enumerate(parts)]


def _open_text(p: TextPass, seed: int, measure: Measure) -> Iterator[Sample]:
    path = _existing(p, p.path)
    return _shuffled(_nonempty(p, path, list(_text_units(path, p.unit))), seed)


_FOLDER_READERS: dict[str, Callable[[Any, Path], list[Sample]]] = {
    ".jsonl": _jsonl_records,
    ".parquet": _parquet_records,
}


def _open_folder(p: FolderPass, seed: int, measure: Measure) -> Iterator[Sample]:
    root = _existing(p, p.path)
    if not root.is_dir():
        raise UserError(f"{_where(p)}: {root} is not a folder; use source: text/jsonl/parquet for one file")
    files = sorted(f for f in root.glob(p.pattern) if f.is_file())
    if not files:
        raise UserError(f"{_where(p)}: no file under {root} matches {p.pattern!r}; fix `pattern`")
    samples: list[Sample] = []
    for f in files:
        reader = _FOLDER_READERS.get(f.suffix)
        samples.extend(reader(p, f) if reader else _text_units(f, TextUnit.FILE))
    return _shuffled(_nonempty(p, root, samples), seed)


def _open_hf(p: HFDatasetPass, seed: int, measure: Measure) -> Iterator[Sample]:
    import datasets
    from datasets.exceptions import DatasetsError

    try:
        ds = datasets.load_dataset(p.path, p.config, split=p.split, revision=p.revision, streaming=p.streaming)
    except (OSError, ValueError, DatasetsError) as e:
        # Offline, unknown id, gated repo, bad config or split: OSError (ConnectionError, HTTP errors,
        # DatasetNotFoundError) or ValueError (unknown split/config); all are "this dataset cannot be had".
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(
            f"{_where(p)}: cannot load dataset {p.path!r} (config {p.config!r}, split {p.split!r}): "
            f"{type(e).__name__}: {first[:200]}; check id/config/split, or use a local jsonl/parquet or builtin pass "
            "when the hub is unreachable"
        ) from e
    columns = ds.column_names
    if columns is None:  # streaming datasets learn their columns from the first row
        columns = list(next(iter(ds), {}))
    if (not p.streaming and len(ds) == 0) or not columns:
        raise UserError(f"{_where(p)}: dataset {p.path!r} split {p.split!r} is empty; pick another split")
    _check_columns(p, f"{_where(p)}: dataset {p.path!r}", columns)
    seed32 = seed % 2**32
    ds = ds.shuffle(seed=seed32, buffer_size=10_000) if p.streaming else ds.shuffle(seed=seed32)
    return (_record_to_sample(p, f"hf {p.path} {p.split} (shuffled row {i})", r) for i, r in enumerate(ds))


def _open_builtin(p: BuiltinPass, seed: int, measure: Measure) -> Iterator[Sample]:
    from sm120_quant.calib_data.builtin import generate

    return generate(p, seed, measure)


_OPENERS: dict[type, Callable[[Any, int, Measure], Iterator[Sample]]] = {
    HFDatasetPass: _open_hf,
    JsonlPass: _open_jsonl,
    ParquetPass: _open_parquet,
    TextPass: _open_text,
    FolderPass: _open_folder,
    BuiltinPass: _open_builtin,
}
