"""The trained tiny model: disjoint training and held-out text, a loss that drops, a complete cached checkpoint,
and repeatable training."""

from __future__ import annotations

import json

from safetensors import safe_open

from sm120_quant.models.trained import (
    QUICK,
    TrainSpec,
    _train_into,
    code_files,
    heldout_code_files,
    trained_tiny_model,
    training_code_files,
)


def test_training_and_heldout_files_split_the_corpus():
    train, heldout = set(training_code_files()), set(heldout_code_files())
    assert not train & heldout
    assert train | heldout == set(code_files())
    assert 0.09 < len(heldout) / len(code_files()) < 0.11


def _tensors(folder):
    with safe_open(folder / "model.safetensors", "pt") as f:
        names = f.keys()
        return {k: f.get_tensor(k) for k in names}


def test_quick_training_learns_and_keeps_the_checkpoint_complete(trained_glm47, tiny_glm47):
    log = json.loads((trained_glm47 / "sm120_quant_trained.json").read_text())
    assert log["loss_first"] > 7.5  # ln(2048) = 7.62: uniform over the vocabulary
    assert log["loss_last10"] < log["loss_first"] - 1.0
    trained, base = _tensors(trained_glm47), _tensors(tiny_glm47)
    assert {k: (t.dtype, t.shape) for k, t in trained.items()} == {k: (t.dtype, t.shape) for k, t in base.items()}
    assert all(trained[k].equal(base[k]) for k in base if k.startswith("model.layers.4."))  # MTP layer untouched
    assert not trained["model.layers.1.mlp.experts.0.gate_proj.weight"].equal(
        base["model.layers.1.mlp.experts.0.gate_proj.weight"])
    assert (trained_glm47 / "tokenizer.json").read_bytes() == (tiny_glm47 / "tokenizer.json").read_bytes()


def test_training_is_cached(trained_glm47):
    stamp = (trained_glm47 / "model.safetensors").stat().st_mtime_ns
    assert trained_tiny_model("glm47", QUICK) == trained_glm47
    assert (trained_glm47 / "model.safetensors").stat().st_mtime_ns == stamp


def test_training_is_repeatable(tiny_glm47, tmp_path):
    spec = TrainSpec(steps=2, batch=1, seq_len=32, warmup=1)
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        _train_into(tiny_glm47, spec, tmp_path / run)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
