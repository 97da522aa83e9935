"""`quantize verify` through the CLI's error boundary: JSON on stdout, exit 0 on a good export, exit 1 naming the
layer on a broken one, exit 2 on unusable input; and streaming layer by layer gives the same numbers."""

from __future__ import annotations

import json

import pytest
import typer
from verify_faults import nan_block_scale, planted

from sm120_quant.cli.common import run_app
from sm120_quant.cli.verify_cmd import verify
from sm120_quant.models.load import resolve_source
from sm120_quant.recipes.schema import ModelSpec, VerifySpec
from sm120_quant.verify.verify import verify_checkpoint

pytestmark = pytest.mark.slow

app = typer.Typer()
app.command("verify")(verify)


@app.callback()
def _root() -> None:
    """Stands in for the quantize app, where the lead registers `verify`."""


def _run(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        run_app(app, argv)
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("The river froze early that year, and the ferry stayed on the far bank until March.\n"
                    "int main(void) { return sizeof(long) == 8 ? 0 : 1; }\n")
    return path


def test_json_report_and_exit_0(flash_fp8, tiny_glm47_flash, prompts_file, tmp_path, capsys):
    code, out, _ = _run(["verify", str(flash_fp8), "--source", str(tiny_glm47_flash), "--prompts", str(prompts_file),
                         "--max-tokens", "48", "--generate", "2", "--out", str(tmp_path / "report"), "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["passed"] is True and report["prompts"] == 2 and len(report["layers"]) == 4
    assert json.loads((tmp_path / "report" / "verify.json").read_text()) == report
    assert (tmp_path / "report" / "verify.png").read_bytes()[:4] == b"\x89PNG"


def test_broken_export_exits_1_naming_the_layer(flash_fp8, tiny_glm47_flash, prompts_file, tmp_path, capsys):
    broken = planted(flash_fp8, tmp_path / "broken", nan_block_scale("model.layers.3.mlp.shared_experts.down_proj"))
    code, out, err = _run(["verify", str(broken), "--source", str(tiny_glm47_flash), "--prompts", str(prompts_file),
                           "--max-tokens", "48", "--generate", "0"], capsys)
    assert code == 1
    assert "model.layers.3.mlp.shared_experts.down_proj: 1 non-finite block scale(s)" in err
    assert "FAIL nonfinite: layer 3:" in out


def test_recipe_thresholds_and_prompts(flash_fp8, tiny_glm47_flash, prompts_file, tmp_path, capsys):
    """verify: in a recipe sets the thresholds, and its prompts path resolves against the recipe's folder."""
    recipe = prompts_file.parent / "strict.yaml"
    recipe.write_text(f"""model: {{id: {tiny_glm47_flash}}}
scheme: fp8_block
engine: llmcompressor
calibration: {{passes: [{{name: code, source: builtin, builtin: code, samples: 1}}]}}
export: {{output_dir: unused}}
verify: {{prompts: {prompts_file.name}, max_kl: 0.0}}
""")
    code, out, err = _run(["verify", str(flash_fp8), "--source", str(tiny_glm47_flash), "--recipe", str(recipe),
                           "--max-tokens", "48", "--generate", "0", "--json"], capsys)
    report = json.loads(out)
    assert code == 1 and report["prompts"] == 2 and report["thresholds"]["max_kl"] == 0.0
    assert [f["check"] for f in report["failures"]] == ["kl"]
    assert f"kl {report['kl']:.4g} crosses 0" in err


def test_wrong_source_exits_2(flash_fp8, tiny_glm47, capsys):
    code, _, err = _run(["verify", str(flash_fp8), "--source", str(tiny_glm47)], capsys)
    assert code == 2
    assert "model_type is 'glm4_moe_lite' but the source" in err


def test_streaming_layer_by_layer_matches_in_memory(flash_nvfp4, tiny_glm47_flash):
    source = resolve_source(ModelSpec(id=str(tiny_glm47_flash)))
    prompts = ["A short held-out line about tide tables and harbour walls, long enough for a dozen tokens."]
    kept = verify_checkpoint(flash_nvfp4, source, VerifySpec(), prompts=prompts, generate_tokens=0,
                             keep_in_memory=True)
    streamed = verify_checkpoint(flash_nvfp4, source, VerifySpec(), prompts=prompts, generate_tokens=0,
                                 keep_in_memory=False)
    a, b = kept.to_dict(), streamed.to_dict()
    for d in (a, b):
        d.pop("seconds")
    assert a == b
