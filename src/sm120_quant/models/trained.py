"""The tiny GLM models trained for a few minutes on CPU on Python source text, so quantization quality can be measured
on weights that mean something (random weights give near-flat next-token distributions, where KL and top-1 say
little).

Training text is this interpreter's standard library, split by file: every tenth file (in sorted path order) is held
out for evaluation (`heldout_code_files`), the rest is training text (`training_code_files`). Training is seeded (the
initial weights are the tiny model's, the batches come from a seeded generator) and the result is cached under
`cache_root()/trained/`; on the same machine and torch build it is bit-for-bit repeatable. The folder is a complete
source checkpoint like the tiny model's (tokenizer, chat template, MTP layer, BF16 weights), usable as `model.id`.

Two lengths: `QUICK` (a minute on an idle two-core CPU; what the tests use) and `FULL` (a few minutes; the quality
benchmark).
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sm120_quant.models.tiny import build_tiny_model, cache_root

# Bump when anything below changes what gets trained: the cache key includes it.
TRAIN_VERSION = "1"
# Folders of the stdlib that are tests, demos, vendored or installed packages, or generated tables.
_SKIPPED_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages",
                           "dist-packages", "__pycache__", "encodings", "pydoc_data"})
_HELDOUT_EVERY = 10
_MAX_FILE_BYTES = 200_000


@dataclass(frozen=True)
class TrainSpec:
    steps: int
    batch: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 20
    seed: int = 0


QUICK = TrainSpec(steps=40, batch=4)
FULL = TrainSpec(steps=400)
# Tokenize only as much text as the run can sample well: this many times the tokens it reads.
_STREAM_FACTOR = 4


@functools.cache
def code_files() -> tuple[Path, ...]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if _SKIPPED_DIRS.isdisjoint(rel.parts[:-1]) and path.stat().st_size <= _MAX_FILE_BYTES:
            files.append(path)
    return tuple(files)


def training_code_files() -> list[Path]:
    return [p for i, p in enumerate(code_files()) if i % _HELDOUT_EVERY]


def heldout_code_files() -> list[Path]:
    return [p for i, p in enumerate(code_files()) if not i % _HELDOUT_EVERY]


def trained_tiny_model(name: str = "glm47", spec: TrainSpec = FULL, cache_dir: Path | None = None) -> Path:
    """The folder of tiny model `name` trained by `spec`, training it on first use."""
    root = (cache_dir or cache_root()) / "trained"
    key = f"{name}-{spec.steps}x{spec.batch}x{spec.seq_len}-lr{spec.lr:g}-seed{spec.seed}-v{TRAIN_VERSION}"
    target = root / key
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        _train_into(build_tiny_model(name, cache_dir), spec, tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # another process finished first; its copy is equivalent
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _token_stream(tokenizer, spec: TrainSpec):
    """Training files in a seeded order, tokenized (EOS between files) until the stream is long enough."""
    import random

    import torch

    files = training_code_files()
    random.Random(spec.seed).shuffle(files)
    wanted = _STREAM_FACTOR * spec.steps * spec.batch * spec.seq_len
    ids: list[int] = []
    for path in files:
        ids += tokenizer(path.read_text(encoding="utf-8", errors="replace"))["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= wanted:
            break
    return torch.tensor(ids, dtype=torch.long)


def _train_into(base: Path, spec: TrainSpec, folder: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base)
    stream = _token_stream(tokenizer, spec)
    torch.manual_seed(spec.seed)
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists the MTP layer as UNEXPECTED, by design
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, experts_implementation="eager")
    finally:
        hf_logging.set_verbosity(previous)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, spec))
    batches = torch.Generator().manual_seed(spec.seed)
    losses = []
    for step in range(spec.steps):
        offsets = torch.randint(0, len(stream) - spec.seq_len, (spec.batch,), generator=batches)
        ids = torch.stack([stream[o:o + spec.seq_len] for o in offsets.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    staging = folder / ".staging"
    model.save_pretrained(staging)
    trained = load_file(staging / "model.safetensors")
    shutil.rmtree(staging)
    for f in base.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "sm120_quant_tiny.json"):
            shutil.copy2(f, folder / f.name)
    tensors = load_file(base / "model.safetensors")
    # The base keeps the MTP layer (not part of the transformers model) and the dtypes of every stored tensor.
    missing = sorted(set(trained) - set(tensors))
    if missing:
        raise RuntimeError(f"training saved tensors the tiny checkpoint does not have: {missing[:3]}")
    tensors.update({k: t.to(tensors[k].dtype) for k, t in trained.items()})
    save_file(dict(sorted(tensors.items())), folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "sm120_quant_trained.json").write_text(json.dumps({
        "base": base.name, "spec": asdict(spec), "version": TRAIN_VERSION, "training_tokens": len(stream),
        "loss_first": losses[0], "loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "loss_every_10": losses[::10], "seconds": round(time.perf_counter() - start, 1),
    }, indent=2) + "\n")


def _lr_factor(step: int, spec: TrainSpec) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < spec.warmup:
        return (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
