"""Turn a recipe's `calibration:` section into one tokenized, hashed CalibrationSet that every engine consumes.

Steps, in order: check lengths against the model, then per pass: open the source (seeded order), render each sample
(conversations through the chat template, raw text as is), apply the pass's length range and the truncation policy,
drop duplicates, stop at the pass's sample count (or pack into full rows); then batch with padding and hash.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from sm120_quant.calib_data.sources import ChatSample, Sample, TextSample, open_pass
from sm120_quant.errors import UserError
from sm120_quant.recipes.calibration import (
    CalibPass,
    CalibrationSpec,
    Packing,
    PaddingSide,
    Truncation,
)

HASH_MAGIC = b"sm120-calib/1\n"
FIRST_SAMPLES = 3


@dataclass(frozen=True)
class CalibBatch:
    pass_name: str
    input_ids: torch.Tensor  # [rows, length] int64, padded with the set's pad_token_id
    attention_mask: torch.Tensor  # [rows, length] int64, 1 on real tokens

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


@dataclass(frozen=True)
class PassSummary:
    name: str
    source: str
    samples: int
    tokens: int
    min_len: int
    max_len: int
    first_samples: tuple[str, ...]  # the first rows decoded with special tokens: what the model sees


@dataclass(frozen=True)
class CalibrationSet:
    """Token rows grouped by pass, their padded batches, and a content hash.

    Iterating gives `{"input_ids", "attention_mask"}` dicts, one per batch, for `model(**batch)` forward loops;
    `to_hf_dataset()` gives the unpadded rows for engines that batch themselves (llm-compressor's oneshot).
    """

    sequences: tuple[torch.Tensor, ...]  # 1-D int64 per row, unpadded, in pass order
    batches: tuple[CalibBatch, ...]
    passes: tuple[PassSummary, ...]
    content_hash: str
    padding_side: PaddingSide
    pad_token_id: int
    batch_size: int

    @property
    def num_samples(self) -> int:
        return len(self.sequences)

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (b.as_kwargs() for b in self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def to_hf_dataset(self):
        import datasets

        rows = [s.tolist() for s in self.sequences]
        return datasets.Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})


class _Renderer:
    """Sample -> token ids, as the model will see them."""

    def __init__(self, tokenizer, thinking: bool):
        self.tokenizer = tokenizer
        self.thinking = thinking

    def tokens(self, s: Sample) -> list[int]:
        if isinstance(s, TextSample):
            return list(self.tokenizer(s.text, add_special_tokens=True)["input_ids"])
        return list(self.tokenizer(self.chat_text(s), add_special_tokens=False)["input_ids"])

    def chat_text(self, s: ChatSample) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"{s.origin}: the tokenizer has no chat template, so conversations cannot be rendered; "
                            "use a tokenizer with one or a text source")
        # With thinking off the model writes no reasoning, so none is shown to it either; templates that already
        # drop reasoning for enable_thinking=False render the same text.
        drop = () if self.thinking else ("reasoning_content",)
        messages = [{k: v for k, v in m.items() if k not in drop} for m in s.messages]
        # The template adds its own prefix ([gMASK]<sop> for GLM), hence add_special_tokens=False when tokenizing.
        return self.tokenizer.apply_chat_template(
            messages, tools=list(s.tools) or None, tokenize=False, add_generation_prompt=False,
            enable_thinking=self.thinking,
        )

    def count(self, s: Sample) -> int:
        return len(self.tokens(s))


def _source_label(p: CalibPass) -> str:
    detail = getattr(p, "builtin", None) or getattr(p, "path", "")
    return f"{p.source} {getattr(detail, 'value', detail)}"


@dataclass
class _Tally:
    read: int = 0
    short: int = 0
    long: int = 0
    dupes: int = 0


def _rows_of_pass(p: CalibPass, spec: CalibrationSpec, want: int, render: _Renderer, seen: set[bytes],
                  eos: int | None, max_model_len: int | None, tick) -> list[list[int]]:
    limit = spec.max_tokens(p)
    tally = _Tally()
    rows: list[list[int]] = []
    stream: list[int] = []
    for s in open_pass(p, spec.seed, render.count):
        tally.read += 1
        ids = render.tokens(s)
        if len(ids) < p.min_tokens:
            tally.short += 1
            continue
        if spec.packing is Packing.NONE and len(ids) > limit:
            if spec.truncation is Truncation.ERROR:
                model = (f" and the model's max length {max_model_len}"
                         if max_model_len is not None and len(ids) > max_model_len else "")
                raise UserError(
                    f"{s.origin}: sample has {len(ids)} tokens, more than pass {p.name}'s max_tokens {limit}{model}; "
                    "shorten it, or set calibration.truncation to truncate or drop"
                )
            if spec.truncation is Truncation.DROP:
                tally.long += 1
                continue
            ids = ids[:limit]
        if spec.dedupe:
            key = hashlib.sha256(np.asarray(ids, "<i4").tobytes()).digest()
            if key in seen:
                tally.dupes += 1
                continue
            seen.add(key)
        if spec.packing is Packing.NONE:
            rows.append(ids)
            tick()
        else:
            stream += ids + [eos]
            while len(stream) >= limit and len(rows) < want:
                rows.append(stream[:limit])
                stream = stream[limit:]
                tick()
        if len(rows) == want:
            return rows
    raise UserError(
        f"calibration pass {p.name}: {_source_label(p)} gave {len(rows)} of {want} rows ({tally.read} samples read: "
        f"{tally.short} under min_tokens {p.min_tokens}, {tally.long} over max_tokens {limit}, {tally.dupes} "
        "duplicates); lower samples, widen the length range or add data"
    )


def _batches(name: str, rows: list[list[int]], batch_size: int, pad: int, side: PaddingSide) -> list[CalibBatch]:
    out = []
    for j in range(0, len(rows), batch_size):
        chunk = rows[j:j + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for k, r in enumerate(chunk):
            cols = slice(width - len(r), width) if side is PaddingSide.LEFT else slice(0, len(r))
            ids[k, cols] = torch.tensor(r, dtype=torch.long)
            mask[k, cols] = 1
        out.append(CalibBatch(name, ids, mask))
    return out


def content_hash(spec: CalibrationSpec, pad: int, rows_by_pass: list[tuple[str, list[list[int]]]]) -> str:
    """sha256 over the exact token rows and how they are laid out, as hex.

    Bytes, in order: b"sm120-calib/1\\n"; u32 batch_size, u32 pad_token_id, u32 number of passes; the padding side
    ("left"/"right") and b"\\n"; then per pass: u32 len(name), the UTF-8 name, u32 row count, and per row u32 length
    followed by the token ids as int32. All integers little-endian. Seeds, paths and policies enter only through the
    tokens they produce, so two recipes that yield the same rows have the same hash.
    """
    h = hashlib.sha256(HASH_MAGIC)
    h.update(struct.pack("<III", spec.batch_size, pad, len(rows_by_pass)))
    h.update(spec.padding_side.value.encode() + b"\n")
    for name, rows in rows_by_pass:
        encoded = name.encode()
        h.update(struct.pack("<I", len(encoded)) + encoded + struct.pack("<I", len(rows)))
        for r in rows:
            h.update(struct.pack("<I", len(r)))
            h.update(np.asarray(r, "<i4").tobytes())
    return h.hexdigest()


def _special_ids(spec: CalibrationSpec, tokenizer) -> tuple[int, int | None]:
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise UserError("tokenizer: no pad_token and no eos_token, so batches cannot be padded; set pad_token")
    if spec.packing is Packing.PACK and eos is None:
        raise UserError("tokenizer: no eos_token to separate packed samples; set packing: none or an eos_token")
    return pad, eos


def build_calibration_set(spec: CalibrationSpec, tokenizer, *, max_model_len: int | None = None,
                          progress: bool = True) -> CalibrationSet:
    """Build the calibration rows of `spec` with `tokenizer`; same spec, seed, tokenizer and environment, same hash.

    `max_model_len` (the model's max_position_embeddings) is checked against max_seq_len before any data is read.
    """
    if max_model_len is not None and spec.max_seq_len > max_model_len:
        raise UserError(f"calibration.max_seq_len {spec.max_seq_len} exceeds the model's max length {max_model_len}; "
                        "lower max_seq_len (and the passes' max_tokens/target_tokens)")
    pad, eos = _special_ids(spec, tokenizer)
    render = _Renderer(tokenizer, spec.thinking)
    counts = spec.sample_counts()
    seen: set[bytes] = set()
    rows_by_pass: list[tuple[str, list[list[int]]]] = []

    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True, disable=not progress) as bar:
        for p in spec.passes:
            task = bar.add_task(f"calibration {p.name}", total=counts[p.name])
            rows = _rows_of_pass(p, spec, counts[p.name], render, seen, eos, max_model_len,
                                 lambda task=task: bar.advance(task))
            rows_by_pass.append((p.name, rows))

    batches: list[CalibBatch] = []
    summaries = []
    for p, (name, rows) in zip(spec.passes, rows_by_pass, strict=True):
        batches += _batches(name, rows, spec.batch_size, pad, spec.padding_side)
        lengths = [len(r) for r in rows]
        summaries.append(PassSummary(
            name=name, source=_source_label(p), samples=len(rows), tokens=sum(lengths), min_len=min(lengths),
            max_len=max(lengths),
            first_samples=tuple(tokenizer.decode(r, skip_special_tokens=False) for r in rows[:FIRST_SAMPLES]),
        ))
    return CalibrationSet(
        sequences=tuple(torch.tensor(r, dtype=torch.long) for _, rows in rows_by_pass for r in rows),
        batches=tuple(batches),
        passes=tuple(summaries),
        content_hash=content_hash(spec, pad, rows_by_pass),
        padding_side=spec.padding_side,
        pad_token_id=pad,
        batch_size=spec.batch_size,
    )
