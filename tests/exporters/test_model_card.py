"""The generated model card and provenance.json, rendered from a finished run's folder (the exporters' tiny
checkpoints plus a report.json written by the report stage's own functions, see hub_server.finished_run)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
from hub_server import edit_report, finished_run, validate_card_metadata
from huggingface_hub import ModelCard
from safetensors import safe_open

from sm120_quant.errors import UserError
from sm120_quant.exporters.check import check_checkpoint
from sm120_quant.exporters.model_card import (
    HASH_CACHE,
    ComponentRow,
    card_inputs,
    read_recipe,
    render_model_card,
    serve_section,
    vllm_command,
    write_provenance,
)
from sm120_quant.quantize import formats
from sm120_quant.recipes.load import load_recipe
from sm120_quant.serve.profiles import load_gpus

REPO = "tester/tiny-glm47-nvfp4"
VERIFY = {"passed": True, "metrics": {"cosine": 0.987654, "kl": 0.01234, "top1": 0.9375,
                                      "ppl": {"bf16": 12.5, "quantized": 12.75}}}


@pytest.fixture(scope="module")
def nvfp4_run(exports, tiny_sources, tmp_path_factory) -> Path:
    return finished_run(exports["modelopt-glm47"], tiny_sources["glm47"], tmp_path_factory.mktemp("run") / "nvfp4")


@pytest.fixture
def run(nvfp4_run, tmp_path) -> Path:
    """A copy the test may edit."""
    return Path(shutil.copytree(nvfp4_run, tmp_path / "nvfp4"))


def tp_reports(folder: Path) -> list[dict]:
    return [check_checkpoint(folder, runtime=rt, tp=tp).to_dict() for rt in ("vllm", "sglang") for tp in (1, 2, 4, 8)]


def source_card(folder: Path, front_matter: str) -> Path:
    folder.mkdir()
    (folder / "README.md").write_text(f"---\n{front_matter}---\n\n# The base model\n")
    return folder


def table_row(card: str, first_cell: str) -> list[str]:
    line = next(line for line in card.splitlines() if line.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


# ---------------------------------------------------------------------------------------------------------------
# Metadata


def test_card_round_trips_through_modelcard_and_passes_the_hub_checks(nvfp4_run):
    text = render_model_card(nvfp4_run, repo_id=REPO)
    card = ModelCard(text)
    assert str(card) == text
    assert card.data.to_dict() == {
        "library_name": "vllm", "pipeline_tag": "text-generation",
        "tags": ["nvfp4", "fp4", "modelopt", "sm120", "blackwell", "quantized", "glm4_moe", "moe"]}
    assert validate_card_metadata(text) == ([], [])
    # tiny://glm47 is no Hub model: no base_model, and the card says why instead of inventing one.
    assert "`tiny://glm47` (not a Hub model, so no `base_model` metadata)" in card.text
    assert "the source checkpoint's card declares none" in card.text


def test_base_model_and_license_come_from_the_recipe_and_the_source_card(run, tmp_path):
    source = source_card(tmp_path / "src", "license: other\nlicense_name: glm-4\n"
                                           "license_link: https://example.org/LICENSE\n")
    report = json.loads((run / "report.json").read_text())
    edit_report(run, recipe=report["recipe"] | {"model": "zai-org/GLM-4.7", "source_folder": str(source)})
    card = ModelCard(render_model_card(run, repo_id=REPO))
    assert card.data.base_model == "zai-org/GLM-4.7"
    assert card.data.to_dict()["base_model_relation"] == "quantized"
    assert (card.data.license, card.data.license_name, card.data.license_link) == (
        "other", "glm-4", "https://example.org/LICENSE")
    assert "[zai-org/GLM-4.7](https://huggingface.co/zai-org/GLM-4.7)" in card.text
    assert "declares none" not in card.text
    assert validate_card_metadata(str(card)) == ([], [])


def test_fp8_block_card(exports, tiny_sources, tmp_path):
    # The FP8 run's weight errors are stand-ins: verify.reader mistakes the tiny down_proj's [2, 1] block scale for a
    # per-channel one (reported to the lead).
    run = finished_run(exports["ct-fp8-glm47"], tiny_sources["glm47"], tmp_path / "fp8", "glm47-fp8-block",
                       errors={"model.layers.0.mlp.up_proj": ("fp8_block", 0.0234567)})
    text = render_model_card(run, repo_id="tester/tiny-fp8")
    card = ModelCard(text)
    assert card.data.tags[:4] == ["fp8", "fp8-block", "compressed-tensors", "llm-compressor"]
    assert card.data.base_model == "zai-org/GLM-4.7"
    assert table_row(text, "Routed experts")[:4] == ["Routed experts", "FP8 (128x128 blocks)", "72",
                                                     "down_proj, gate_proj, up_proj"]
    assert "--quantization compressed-tensors" in text
    assert "sglang.launch_server --model-path tester/tiny-fp8 --tp 1 \\\n  --tool-call-parser" in text
    assert "| dense_mlp.up_proj | 1 | 0.0235 | 0.0235 |" in text


# ---------------------------------------------------------------------------------------------------------------
# Contents


def _modules_by_part(folder: Path, config: dict) -> dict[tuple[str, str], int]:
    """Matmul modules per (part, stored dtype), read with the safetensors library and classified independently."""
    mtp = f"model.layers.{config['num_hidden_layers']}."
    out: dict[tuple[str, str], int] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                if not name.endswith((".weight", ".weight_packed")) or len(f.get_slice(name).get_shape()) != 2:
                    continue
                module = name.rsplit(".", 1)[0]
                part = ("MTP layer" if name.startswith(mtp) else "Embeddings" if "embed_tokens" in name
                        else "LM head" if module == "lm_head" else "Router (mlp.gate)" if module.endswith("mlp.gate")
                        else "Routed experts" if ".experts." in name else "Shared experts" if "shared_experts" in name
                        else "Attention" if "self_attn" in name else "Dense MLP")
                dtype = str(f.get_slice(name).get_dtype())
                stored = {"U8": "NVFP4", "F8_E4M3": "FP8 (128x128 blocks)"}.get(dtype, dtype)
                out[(part, stored)] = out.get((part, stored), 0) + 1
    return out


def test_what_is_quantized_matches_the_tensors(nvfp4_run):
    text = render_model_card(nvfp4_run, repo_id=REPO)
    config = json.loads((nvfp4_run / "config.json").read_text())
    expected = _modules_by_part(nvfp4_run, config)
    moe_layers = config["num_hidden_layers"] - config["first_k_dense_replace"]
    # The tiny GLM-4.7: experts, shared experts, attention and the dense MLP in NVFP4; the rest BF16.
    assert expected[("Routed experts", "NVFP4")] == moe_layers * config["n_routed_experts"] * 3
    assert expected[("Attention", "NVFP4")] == config["num_hidden_layers"] * 4
    for (part, stored), count in expected.items():
        row = table_row(text, part)
        assert row[1:3] == [stored, str(count)], part
    assert {part for part, stored in expected if stored not in ("NVFP4", "FP8 (128x128 blocks)")} == {
        "Embeddings", "LM head", "Router (mlp.gate)", "MTP layer"}
    assert "Kept out of quantization by the config (`config.json:quantization_config.ignore`): `lm_head`" in text


def test_without_verify_or_tp_table_the_card_says_not_measured(nvfp4_run):
    text = render_model_card(nvfp4_run, repo_id=REPO)
    assert "cosine, KL, top-1, perplexity): not measured; verify did not run." in text
    assert f"Not measured in this run; `quantize check {REPO} --runtime vllm --tp N`" in text


def test_verify_metrics_and_doctor_verdicts_per_tp(run):
    reports = tp_reports(run)
    edit_report(run, verify=VERIFY, tensor_parallel=reports)
    text = render_model_card(run, repo_id=REPO)
    assert "Quantized vs BF16 model on held-out prompts: **passed**." in text
    # Thresholds are the recipe's verify section.
    assert table_row(text, "cosine") == ["cosine", "0.9877", ">= 0.8000"]
    assert table_row(text, "kl") == ["kl", "0.0123", "<= 0.5000"]
    assert table_row(text, "ppl.quantized") == ["ppl.quantized", "12.7500", ""]
    rows = [r for r in text.splitlines() if re.match(r"\| (vllm|sglang) \| \d \|", r)]
    assert len(rows) == len(reports)
    for r in reports:
        line = next(x for x in rows if x.startswith(f"| {r['runtime']} | {r['tp']} |"))
        assert f"| {r['summary']['errors']} | {r['summary']['warnings']} |" in line
        first_error = next((f for f in r["findings"] if f["level"] == "ERROR"), None)
        assert (f"{first_error['rule']}: {first_error['message']}" if first_error else "| loads |") in line
    # The tiny model's 4 heads / 128-wide experts reject some TP; the plan marks exactly those columns.
    rejected = {r["tp"] for r in reports if r["runtime"] == "vllm" and r["summary"]["errors"]}
    assert rejected, "the tiny model should have a TP the doctor rejects"
    plan = table_row(text, "RTX PRO 6000 Blackwell (Workstation, Max-Q, Server), 96 GB GDDR7 (`rtx-pro-6000`)")
    assert [i for i, cell in enumerate(plan[2:]) if cell == "doctor: ERROR"] == [
        i for i, tp in enumerate((1, 2, 4, 8)) if tp in rejected]


def test_serve_command_is_serve_starts_and_skips_tp_the_doctor_rejects(run):
    rows = tp_reports(run)
    # A synthetic verdict: pretend vLLM rejects TP1, so the command must move to the next TP that loads.
    tp1 = next(r for r in rows if r["runtime"] == "vllm" and r["tp"] == 1)
    tp1["summary"]["errors"] = 1
    edit_report(run, tensor_parallel=rows)
    text = render_model_card(run, repo_id=REPO)
    command, _ = vllm_command(card_inputs(run, REPO))
    argv = list(command.argv[command.argv.index("serve") + 1:])
    assert argv[:2] == [REPO, "--host"]
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    env = [word for k, v in sorted(command.env.items()) for word in ("export", f"{k}={shlex.quote(v)}")]
    assert [w for w in block.split() if w != "\\"] == [*env, "vllm", "serve", *argv]
    assert "| `--tensor-parallel-size 2` | GPUs the weights are split over" in text


def test_sglang_needs_shared_experts_fusion_off_when_they_stay_bf16(nvfp4_run):
    inputs = card_inputs(nvfp4_run, REPO)
    assert "--disable-shared-experts-fusion" not in "\n".join(serve_section(inputs))
    rows = tuple(dataclasses.replace(r, precision="BF16") if r.component == "Shared experts" else r
                 for r in inputs.rows)
    assert any(isinstance(r, ComponentRow) and r.precision == "BF16" and r.component == "Shared experts" for r in rows)
    text = "\n".join(serve_section(dataclasses.replace(inputs, rows=rows)))
    assert "--disable-shared-experts-fusion" in text
    assert "`--disable-shared-experts-fusion` is required" in text


def test_forced_upload_is_stated_at_the_top(nvfp4_run):
    text = render_model_card(nvfp4_run, repo_id=REPO, forced=["verify did not run"])
    assert text.split("\n# tiny-glm47-nvfp4\n\n", 1)[1].startswith(
        "> **Uploaded with `--force` although:** verify did not run.")


# ---------------------------------------------------------------------------------------------------------------
# Every number on the card is accounted for


NUMBER = re.compile(r"(?<![\w.`/-])\d+(?:\.\d+)*(?![\w`]|\.\d)")


def _report_numbers(value) -> set[str]:
    if isinstance(value, bool) or value is None:
        return set()
    if isinstance(value, int):
        return {str(value)}
    if isinstance(value, float):
        return {str(value), f"{value:.4f}", f"{value:.4g}"}
    if isinstance(value, str):
        return set(NUMBER.findall(value))
    items = value.values() if isinstance(value, dict) else value
    out = {str(len(value))}
    for v in items:
        out |= _report_numbers(v)
    return out


def _size_numbers(n: int) -> set[str]:
    return {f"{n / s:.2f}" for s in (2**30, 2**20, 2**10)} | {str(n)}


def assert_numbers_accounted_for(run: Path, text: str) -> None:
    """Every number in the card's prose and tables is one report.json holds, one the safetensors headers give, one
    of the serve profiles' GPU figures, or one of the two format constants the text states in words."""
    report = json.loads((run / "report.json").read_text())
    body = ModelCard(text).text
    # The serve commands are `serve start`'s (checked against it in test_serve_command_*); the rest is checked here.
    prose = re.sub(r"```bash\n.*?```", "", body, flags=re.DOTALL)

    allowed = _report_numbers(report)
    allowed |= _size_numbers(report["checkpoint_bytes"])
    for tp in (1, 2, 4, 8):
        allowed |= _size_numbers(report["checkpoint_bytes"] // tp)
    verify = read_recipe(run).verify
    allowed |= {f"{getattr(verify, k):.4f}" for k in ("min_cosine", "max_kl", "min_top1")}
    for gpu in load_gpus().values():
        allowed |= set(NUMBER.findall(f"{gpu.description} {gpu.measured}"))
        budget = gpu.total_memory_gib * gpu.gpu_memory_utilization
        allowed.add(f"{budget:.2f}")
        allowed |= {f"{budget - report['checkpoint_bytes'] / tp / 2**30:.2f}" for tp in (1, 2, 4, 8)}
    # The tensors: module counts per part, from the headers; bytes per part (checked against the headers in
    # test_part_bytes_*).
    parts = _modules_by_part(run, json.loads((run / "config.json").read_text()))
    allowed |= {str(n) for n in parts.values()}
    allowed |= {n for r in card_inputs(run, REPO).rows for n in _size_numbers(r.bytes)}
    command, _ = vllm_command(card_inputs(run, REPO))
    allowed |= set(NUMBER.findall(" ".join([*command.argv, *command.env.values(), *command.notes])))
    # Format facts stated in words: NVFP4's blocks of 16, FP8's groups of 128 (quantize.formats).
    allowed |= {str(formats.NVFP4_GROUP), str(formats.FP8_BLOCK[1])}

    found = set(NUMBER.findall(prose))
    assert len(found) > 20, "the card should contain the run's numbers"
    assert sorted(found - allowed) == []
    c = report["calibration"]
    assert (f"{c['num_samples']} samples, {c['num_tokens']} tokens in {c['batches']} batches; calibration-set hash "
            f"`{c['hash']}`") in body
    for p in c["passes"]:
        assert table_row(text, p["name"]) == [p["name"], p["source"], str(p["samples"]), str(p["tokens"])]
    assert f"({report['checkpoint_bytes']} bytes), {report['tensors']['count']} tensors" in body
    for layer_type, t in report["weight_error"]["by_type"].items():
        assert table_row(text, layer_type) == [layer_type, str(t["count"]), f"{t['mean']:.4f}", f"{t['max']:.4f}"]
    for package, version in report["versions"].items():
        assert table_row(text, package) == [package, version or "not installed"]


def test_every_number_on_the_card_is_accounted_for(run, tmp_path):
    source = source_card(tmp_path / "src", "license: mit\n")
    report = edit_report(run, verify=VERIFY, tensor_parallel=tp_reports(run))
    edit_report(run, recipe=report["recipe"] | {"model": "zai-org/GLM-4.7", "source_folder": str(source)})
    text = render_model_card(run, repo_id=REPO)
    assert_numbers_accounted_for(run, text)
    assert "Quantizers enabled during calibration: 213 of 331." in text
    assert table_row(text, "code") == ["code", "builtin code", "12", "1617"]


@pytest.mark.slow
def test_card_of_a_real_quantize_run(tmp_path):
    """The whole pipeline on the tiny GLM-4.7 (ModelOpt on CPU, minutes), then its card."""
    from sm120_quant.pipeline import run_recipe

    report = run_recipe(load_recipe("tiny-glm47-nvfp4"), output=tmp_path / "real", device="cpu", progress=False)
    run = Path(report.checkpoint)
    text = render_model_card(run, repo_id=REPO)
    assert str(ModelCard(text)) == text
    assert validate_card_metadata(text) == ([], [])
    assert_numbers_accounted_for(run, text)
    data = json.loads(write_provenance(run).read_text())
    assert {f["path"]: f["sha256"] for f in data["files"]} == {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir()
        if p.is_file() and p.name not in ("README.md", "provenance.json")}


def test_part_bytes_are_the_bytes_of_every_module_with_a_matmul_weight(nvfp4_run):
    by_module: dict[str, int] = {}
    matmul: set[str] = set()
    for shard in sorted(nvfp4_run.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                t = f.get_tensor(name)
                module, _, leaf = name.rpartition(".")
                by_module[module] = by_module.get(module, 0) + t.numel() * t.element_size()
                if leaf in ("weight", "weight_packed") and t.dim() >= 2:
                    matmul.add(module)
    assert sum(r.bytes for r in card_inputs(nvfp4_run, REPO).rows) == sum(by_module[m] for m in matmul)


# ---------------------------------------------------------------------------------------------------------------
# Provenance


def test_provenance_lists_every_file_with_its_sha256(run):
    edit_report(run, verify=VERIFY)
    path = write_provenance(run)
    data = json.loads(path.read_text())
    expected = [{"path": p.name, "size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                for p in sorted(run.iterdir()) if p.is_file() and p.name not in ("README.md", "provenance.json")]
    assert data["files"] == expected
    report = json.loads((run / "report.json").read_text())
    assert data["calibration"] == {k: report["calibration"][k] for k in ("hash", "num_samples", "num_tokens",
                                                                          "passes")}
    assert data["recipe"]["resolved"] == (run / "recipe.yaml").read_text()
    assert data["recipe"]["sha256"] == report["recipe"]["sha256"]
    assert data["versions"] == report["versions"]
    assert (data["check"], data["verify"]) == ({"errors": 0, "warnings": 0}, True)
    assert not (run / "README.md").exists()


def test_provenance_reuses_hashes_of_unchanged_files_only(run):
    write_provenance(run)
    cache_path = run / HASH_CACHE
    cache = json.loads(cache_path.read_text())
    # Plant a wrong hash for an unchanged file: it is trusted while size and mtime match ...
    cache["config.json"]["sha256"] = "0" * 64
    cache_path.write_text(json.dumps(cache))
    entry = next(f for f in json.loads(write_provenance(run).read_text())["files"] if f["path"] == "config.json")
    assert entry["sha256"] == "0" * 64
    # ... and recomputed once the file's mtime moves.
    st = (run / "config.json").stat()
    os.utime(run / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    entry = next(f for f in json.loads(write_provenance(run).read_text())["files"] if f["path"] == "config.json")
    assert entry["sha256"] == hashlib.sha256((run / "config.json").read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_folder_without_report_is_refused(run):
    (run / "report.json").unlink()
    with pytest.raises(UserError, match=r"report\.json: missing; only folders written by `quantize run`"):
        render_model_card(run)


def test_malformed_tensor_parallel_table_is_refused(run):
    edit_report(run, tensor_parallel={"vllm": "fine"})
    with pytest.raises(UserError, match="tensor_parallel must be a list of checkpoint-doctor reports"):
        render_model_card(run)
