"""The recipe's `calibration:` section: defaults, the source union, sample-count arithmetic and every rejection."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from sm120_quant.recipes.calibration import (
    BuiltinName,
    BuiltinPass,
    CalibrationSpec,
    CoveragePolicy,
    FolderPass,
    HFDatasetPass,
    JsonlPass,
    Packing,
    PaddingSide,
    ParquetPass,
    SampleFormat,
    TextPass,
    Truncation,
)


def spec(text: str, **context) -> CalibrationSpec:
    return CalibrationSpec.model_validate(yaml.safe_load(text), context=context or None)


THREE_PASSES = """
seed: 7
max_seq_len: 9216
passes:
  - {name: coding, source: builtin, builtin: agentic, samples: 256}
  - {name: broad, source: hf_dataset, path: allenai/WildChat-nontoxic, column: conversation, format: messages,
     samples: 192}
  - {name: deep, source: builtin, builtin: long_context, target_tokens: 8192, samples: 64}
coverage: {policy: calibrate_all, min_tokens: 64}
"""


def test_three_pass_section_parses_into_tagged_models():
    s = spec(THREE_PASSES)
    assert [type(p) for p in s.passes] == [BuiltinPass, HFDatasetPass, BuiltinPass]
    assert s.passes[0].builtin is BuiltinName.AGENTIC
    assert s.passes[1].format is SampleFormat.MESSAGES and s.passes[1].data_column == "conversation"
    assert s.passes[1].split == "train"
    assert s.passes[2].target_tokens == 8192
    assert s.sample_counts() == {"coding": 256, "broad": 192, "deep": 64}
    assert s.coverage.policy is CoveragePolicy.CALIBRATE_ALL and s.coverage.min_tokens == 64


def test_defaults_keep_a_minimal_section_short():
    s = spec("passes: [{name: code, source: builtin, builtin: code, samples: 4}]")
    assert (s.seed, s.max_seq_len, s.batch_size, s.thinking, s.num_samples) == (0, 2048, 1, True, None)
    assert s.padding_side is PaddingSide.LEFT and s.packing is Packing.NONE and s.truncation is Truncation.TRUNCATE
    assert s.dedupe is True
    assert s.coverage.policy is CoveragePolicy.WARN and s.coverage.min_tokens == 16
    assert s.max_tokens(s.passes[0]) == 2048


def test_every_source_kind_is_a_union_member(tmp_path):
    s = spec(f"""
passes:
  - {{name: a, source: jsonl, path: {tmp_path}/a.jsonl, samples: 1}}
  - {{name: b, source: parquet, path: b.parquet, format: messages, tools_column: tools, samples: 1}}
  - {{name: c, source: text, path: c.txt, unit: paragraph, samples: 1}}
  - {{name: d, source: folder, path: docs, pattern: "*.md", samples: 1}}
  - {{name: e, source: hf_dataset, path: org/ds, config: en, split: validation, revision: abc123, samples: 1}}
""", base_dir=tmp_path / "recipes")
    assert [type(p) for p in s.passes] == [JsonlPass, ParquetPass, TextPass, FolderPass, HFDatasetPass]
    # Relative paths resolve against the recipe's folder; absolute ones are kept; hub ids are never paths.
    assert s.passes[0].path == tmp_path / "a.jsonl"
    assert s.passes[1].path == tmp_path / "recipes" / "b.parquet"
    assert s.passes[3].path == tmp_path / "recipes" / "docs"
    assert s.passes[4].path == "org/ds"


def test_relative_path_without_context_stays_relative():
    s = spec("passes: [{name: a, source: jsonl, path: data/a.jsonl, samples: 1}]")
    assert s.passes[0].path == Path("data/a.jsonl")


def test_weights_split_num_samples_with_largest_remainder():
    s = spec("""
num_samples: 10
passes:
  - {name: fixed, source: builtin, builtin: code, samples: 3}
  - {name: heavy, source: builtin, builtin: chat, weight: 2}
  - {name: light, source: builtin, builtin: structured}
""")
    # 7 rows left: shares 4.67 and 2.33 round down to 4 + 2, the leftover row goes to the larger remainder.
    assert s.sample_counts() == {"fixed": 3, "heavy": 5, "light": 2}


def test_equal_weights_split_evenly_ties_to_earlier_pass():
    s = spec("""
num_samples: 512
passes: [{name: a, source: builtin, builtin: code}, {name: b, source: builtin, builtin: chat},
         {name: c, source: builtin, builtin: agentic}]
""")
    assert s.sample_counts() == {"a": 171, "b": 171, "c": 170}


def test_dump_then_load_gives_an_equal_spec(tmp_path):
    s = spec(THREE_PASSES)
    again = CalibrationSpec.model_validate(yaml.safe_load(yaml.safe_dump(s.model_dump(mode="json"))))
    assert again == s


@pytest.mark.parametrize(("text", "message"), [
    ("passes: []", "at least 1 item"),
    ("passes: [{name: a, source: builtin, builtin: code, samples: 1, colour: red}]", "Extra inputs"),
    ("passes: [{name: a, source: csv, path: x.csv, samples: 1}]", "does not match any of the expected tags"),
    ("passes: [{name: a, source: builtin, builtin: poetry, samples: 1}]", "'code', 'agentic'"),
    ("passes: [{name: A b, source: builtin, builtin: code, samples: 1}]", "lowercase"),
    ("passes: [{name: a, source: builtin, builtin: code, samples: 1, weight: 2}]", "samples or weight, not both"),
    (("passes: [{name: a, source: builtin, builtin: code, samples: 1}, {name: a, source: builtin, builtin: chat, "
      "samples: 1}]"), "repeated: a"),
    ("passes: [{name: a, source: builtin, builtin: long_context, samples: 1}]", "needs target_tokens"),
    ("passes: [{name: a, source: builtin, builtin: chat, target_tokens: 100, samples: 1}]",
     "only for builtin long_context"),
    ("passes: [{name: a, source: builtin, builtin: chat, packages: [numpy], samples: 1}]", "only for builtin code"),
    (("max_seq_len: 1024\npasses: [{name: a, source: builtin, builtin: long_context, target_tokens: 2048, "
      "samples: 1}]"), "target_tokens 2048 > max_seq_len 1024"),
    ("passes: [{name: a, source: builtin, builtin: code, samples: 1, min_tokens: 9, max_tokens: 8}]",
     "min_tokens 9 > max_tokens 8"),
    ("max_seq_len: 512\npasses: [{name: a, source: builtin, builtin: code, samples: 1, max_tokens: 600}]",
     "max_tokens 600 > max_seq_len 512"),
    ("passes: [{name: a, source: builtin, builtin: code}]", "has no samples; set it or calibration.num_samples"),
    ("num_samples: 5\npasses: [{name: a, source: builtin, builtin: code, samples: 4}]", "!= sum of the passes"),
    (("num_samples: 3\npasses: [{name: a, source: builtin, builtin: code, samples: 3}, "
      "{name: b, source: builtin, builtin: chat}]"), "leaves 0 rows for 1 weighted passes"),
    ("passes: [{name: a, source: jsonl, path: x.jsonl, tools_column: tools, samples: 1}]",
     "tools_column needs format: messages"),
    ("coverage: {policy: ignore}\npasses: [{name: a, source: builtin, builtin: code, samples: 1}]",
     "'warn', 'fail' or 'calibrate_all'"),
])
def test_bad_sections_are_rejected_with_the_reason(text, message):
    with pytest.raises(ValidationError) as e:
        spec(text)
    assert message in str(e.value)
