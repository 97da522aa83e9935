"""`quantize calib show`: the real command on a recipe for the tiny GLM-4.7, in human and JSON modes."""

from __future__ import annotations

import json

import pytest
from calib_support import PARAGRAPHS, write_jsonl
from typer.testing import CliRunner

from sm120_quant.calib_data.build import build_calibration_set
from sm120_quant.cli.calib_cmd import app
from sm120_quant.recipes.load import load_recipe

RECIPE = """
model: {id: "tiny://glm47"}
scheme: nvfp4
engine: modelopt
export: {output_dir: out}
calibration:
  max_seq_len: 256
  batch_size: 2
  passes:
    - {name: notes, source: jsonl, path: notes.jsonl, samples: 4}
    - {name: bilingual, source: builtin, builtin: bilingual_system, samples: 2}
"""


@pytest.fixture()
def recipe(tmp_path, glm47_dir):
    write_jsonl(tmp_path / "notes.jsonl", [{"text": p} for p in PARAGRAPHS])
    (tmp_path / "r.yaml").write_text(RECIPE, encoding="utf-8")
    return tmp_path / "r.yaml"


def test_show_json_matches_the_builder(recipe, tokenizer):
    result = CliRunner().invoke(app, ["show", str(recipe), "--json", "--samples", "2", "--chars", "0"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    calib = build_calibration_set(load_recipe(recipe).recipe.calibration, tokenizer, progress=False)
    assert shown["content_hash"] == calib.content_hash
    assert (shown["num_samples"], shown["num_tokens"], shown["batches"]) == (6, calib.num_tokens, 3)
    assert [(p["name"], p["source"], p["samples"]) for p in shown["passes"]] == [
        ("notes", f"jsonl {recipe.parent / 'notes.jsonl'}", 4), ("bilingual", "builtin bilingual_system", 2)]
    assert shown["passes"][0]["first_samples"][0] in PARAGRAPHS
    assert shown["passes"][1]["first_samples"][0].startswith("[gMASK]<sop><|system|>")


def test_show_prints_passes_hash_and_samples(recipe):
    result = CliRunner().invoke(app, ["show", str(recipe), "--chars", "40"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "content hash: " in out and "batches: 3 of up to 2 rows, left-padded" in out
    assert "notes sample 0" in out and "bilingual sample 0" in out
    assert "more characters]" in out
    assert out.index("notes") < out.index("bilingual")
