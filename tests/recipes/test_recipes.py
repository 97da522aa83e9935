import subprocess
import sys

import pytest

from sm120_quant.cli.quantize_cmd import main
from sm120_quant.errors import UserError
from sm120_quant.recipes.load import bundled_recipes, dump_recipe, load_recipe, parse_recipe
from sm120_quant.recipes.schema import Engine, Scheme

EXPECTED_BUNDLED = {
    "tiny-glm47-nvfp4.yaml", "tiny-glm47-flash-nvfp4.yaml", "glm47-nvfp4.yaml", "glm47-flash-nvfp4.yaml",
    "glm47-fp8-block.yaml", "glm51-nvfp4-experts-only.yaml",
}


@pytest.mark.parametrize("name", sorted(bundled_recipes()))
def test_bundled_recipe_validates_and_round_trips(name):
    loaded = load_recipe(name)
    assert parse_recipe(dump_recipe(loaded.recipe)) == loaded.recipe
    assert sum(loaded.recipe.calibration.sample_counts().values()) >= 1


def test_every_documented_recipe_is_bundled():
    assert EXPECTED_BUNDLED <= set(bundled_recipes())


def test_bundled_recipes_carry_the_field_settings():
    glm47 = load_recipe("glm47-nvfp4").recipe
    assert (glm47.scheme, glm47.engine, glm47.moe.expand_experts) == (Scheme.NVFP4_AWQ_LITE, Engine.MODELOPT, True)
    assert glm47.calibration.num_samples == 512
    assert {p.name for p in glm47.calibration.passes} == {"code", "instruction", "agentic", "structured"}
    fp8 = load_recipe("glm47-fp8-block").recipe
    assert fp8.scheme is Scheme.FP8_BLOCK and fp8.engine is Engine.LLMCOMPRESSOR
    assert {"lm_head", "*mlp.gate", "*q_a_proj", "*kv_a_proj_with_mqa"} <= set(fp8.exclude)
    glm51 = load_recipe("glm51-nvfp4-experts-only").recipe
    assert {"*self_attn*", "*shared_experts*"} <= set(glm51.exclude)
    assert [p.name for p in glm51.calibration.passes] == ["coding", "broad", "deep"]


def test_recipe_resolves_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_recipe("tiny-glm47-nvfp4.yaml").recipe.model.id == "tiny://glm47"
    assert load_recipe("tiny-glm47-nvfp4").name == "tiny-glm47-nvfp4"


def test_a_path_wins_over_a_bundled_name(tmp_path, monkeypatch):
    text = load_recipe("tiny-glm47-nvfp4").text.replace("out/tiny-glm47-nvfp4", "elsewhere")
    (tmp_path / "tiny-glm47-nvfp4.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    assert load_recipe("tiny-glm47-nvfp4.yaml").recipe.export.output_dir == "elsewhere"


GOOD = load_recipe("tiny-glm47-nvfp4").text

# (id, recipe text, substrings the one-line error must contain)
MALFORMED = [
    ("typo-key", GOOD.replace("scheme: nvfp4", "schem: nvfp4"), ["bad.yaml:", "'schem'", "did you mean 'scheme'"]),
    ("nested-typo", GOOD.replace("expand_experts: true", "expand_expert: true"),
     ["bad.yaml:18", "moe.expand_expert", "did you mean 'expand_experts'"]),
    ("pass-typo", GOOD.replace("builtin: code, samples: 8", "builtin: code, smples: 8"),
     ["bad.yaml:13", "calibration.passes.1.smples", "did you mean 'samples'"]),
    ("wrong-type", GOOD.replace("batch_size: 4", "batch_size: four"),
     ["bad.yaml:10", "calibration.batch_size", "valid integer", "'four'"]),
    ("missing-model", GOOD.replace("model:\n  id: tiny://glm47\n", ""), ["required key 'model' is missing"]),
    ("unknown-scheme", GOOD.replace("scheme: nvfp4", "scheme: nvfp5"), ["bad.yaml:6", "scheme", "'nvfp5'"]),
    ("engine-scheme", GOOD.replace("scheme: nvfp4", "scheme: fp8_block"),
     ["bad.yaml:7", "engine 'modelopt' cannot produce scheme 'fp8_block'"]),
    ("bad-yaml", GOOD.replace("  max_seq_len: 256", "  max_seq_len: [256"), ["bad.yaml:", "invalid YAML"]),
    ("empty", "", ["bad.yaml", "the recipe is empty"]),
    ("not-a-mapping", "- nvfp4\n- modelopt\n", ["bad.yaml:1", "mapping"]),
    ("unknown-builtin", GOOD.replace("builtin: chat", "builtin: chit-chat"), ["bad.yaml:15", "builtin"]),
    ("bad-kv-cache", GOOD + "kv_cache: fp16\n", ["kv_cache", "'fp16'"]),
]


@pytest.mark.parametrize("text,expected", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_recipe_gives_one_line_error(tmp_path, capsys, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["show", str(path)])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    message = " ".join(stderr.split())  # rich may wrap; the message itself is one line
    assert stderr.strip().count("\nerror:") == 0
    for fragment in expected:
        assert fragment in message, message


def test_missing_recipe_suggests_the_closest_bundled_one():
    with pytest.raises(UserError, match="did you mean 'tiny-glm47-nvfp4.yaml'"):
        load_recipe("tiny-glm47-nvfp4.yml")


def test_cli_exit_codes_from_a_real_process(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("scheme: [")
    result = subprocess.run([sys.executable, "-m", "sm120_quant", "show", str(bad)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    ok = subprocess.run([sys.executable, "-m", "sm120_quant", "show", "tiny-glm47-nvfp4"], capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0
    assert parse_recipe(ok.stdout) == load_recipe("tiny-glm47-nvfp4").recipe
