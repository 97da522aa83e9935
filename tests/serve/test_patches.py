"""`serve patch` against the real files of vLLM releases from PyPI (wheels cached in ~/.cache/sm120-quant/vllm-wheels).

Each boundary release (see conftest.boundary_releases) is unpacked into a bare venv, checked, patched (byte-compiled by
that venv's interpreter), re-patched (no-op) and reverted (byte-identical). vLLM 0.15.1's patched tool parser and
Anthropic stream converter then run on GLM-4.7 outputs in the vLLM venv.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from serve_support import boundary_releases, make_install

from sm120_quant.errors import UserError
from sm120_quant.serve import patches as patches_mod
from sm120_quant.serve.patches import (
    BACKUP_SUFFIX,
    MANIFEST_NAME,
    Status,
    apply_patches,
    assess,
    check_patches,
    load_patch_set,
    revert_patches,
)
from sm120_quant.serve.vllm_env import VllmInstall, probe_vllm

PATCH_SET = load_patch_set()
TARGETS = sorted({p.target for p in PATCH_SET.patches})
HERE = Path(__file__).parent

# Pinned by hand from reading each release (the data must not drift from what was checked).
EXPECTED = {
    "0.15.1": {
        "glm4-moe-kv-scale-guard": Status.PENDING,
        "anthropic-tool-calls": Status.PENDING,
        "glm47-tool-parser": Status.PENDING,
        "mla-kv-b-proj-weight-guard": Status.NOT_AFFECTED,
        "glm4-moe-lite-name-none": Status.PENDING,
        "triton-mla-fp8-kv": Status.PENDING,
    },
    "0.17.1": {
        "glm4-moe-kv-scale-guard": Status.PENDING,
        "anthropic-tool-calls": Status.FIXED_UPSTREAM,
        "glm47-tool-parser": Status.PENDING,
        "mla-kv-b-proj-weight-guard": Status.PENDING,
        "glm4-moe-lite-name-none": Status.PENDING,
        "triton-mla-fp8-kv": Status.PENDING,
    },
    "0.29.0": {p.id: Status.FIXED_UPSTREAM for p in PATCH_SET.patches},
}


def expected_status(patch, release: str) -> Status:
    if release in EXPECTED:
        return EXPECTED[release][patch.id]
    if patch.edits_for(release) is not None:
        return Status.PENDING
    return Status.FIXED_UPSTREAM if patch.fixed_upstream_by(release) else Status.NOT_AFFECTED


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wheel_bytes(wheel: Path, member: str) -> bytes | None:
    with zipfile.ZipFile(wheel) as z:
        return z.read(member) if member in z.namelist() else None


@pytest.fixture(scope="module")
def installs(vllm_wheels, tmp_path_factory) -> dict[str, VllmInstall]:
    """One bare venv per boundary release holding its vllm/__init__.py, the patch targets and METADATA."""
    root = tmp_path_factory.mktemp("releases")

    def build(item):
        release, wheel = item
        python = make_install(wheel, root / release, TARGETS)
        return release, probe_vllm(python)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(build, vllm_wheels.items()))


@pytest.fixture
def fresh_0151(vllm_wheels, tmp_path) -> VllmInstall:
    return probe_vllm(make_install(vllm_wheels["0.15.1"], tmp_path / "v", TARGETS))


# -- the patch data ---------------------------------------------------------------------------------------------------


def test_patch_set_lists_six_patches_in_apply_order():
    assert [p.id for p in PATCH_SET.patches] == [
        "glm4-moe-kv-scale-guard",
        "anthropic-tool-calls",
        "glm47-tool-parser",
        "mla-kv-b-proj-weight-guard",
        "glm4-moe-lite-name-none",
        "triton-mla-fp8-kv",
    ]
    assert PATCH_SET.checked_versions[0] == "0.15.0" and PATCH_SET.checked_versions[-1] == "0.33.0"


def _copy_patch_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "patches"
    shutil.copytree(Path(patches_mod.__file__).parent / "patches", folder)
    return folder


def test_invalid_patch_files_are_all_reported(tmp_path):
    folder = _copy_patch_dir(tmp_path)
    parser = yaml.safe_load((folder / "glm47-tool-parser.yaml").read_text())
    parser["variants"][0]["edits"][0]["replacement"] = (
        parser["variants"][0]["edits"][0]["anchor"] + "# sm120-quant patch x\n"
    )
    (folder / "glm47-tool-parser.yaml").write_text(yaml.safe_dump(parser))
    lite = yaml.safe_load((folder / "glm4-moe-lite-name-none.yaml").read_text())
    lite["variants"][0]["affected"].append("0.99.0")
    (folder / "glm4-moe-lite-name-none.yaml").write_text(yaml.safe_dump(lite))
    with pytest.raises(UserError) as e:
        load_patch_set(folder)
    assert "glm47-tool-parser.yaml" in str(e.value) and "must not contain each other" in str(e.value)
    assert "glm4-moe-lite-name-none.yaml" in str(e.value) and "0.99.0" in str(e.value)


# -- every boundary release: check, apply, re-apply, revert ---------------------------------------------------------------


@pytest.mark.parametrize("release", boundary_releases())
def test_release_check_apply_reapply_revert(release, installs, vllm_wheels):
    install = installs[release]
    assert install.release == release
    before = check_patches(install, PATCH_SET)
    assert {s.patch.id: s.status for s in before.states} == {
        p.id: expected_status(p, release) for p in PATCH_SET.patches
    }

    pending_targets = sorted({s.patch.target for s in before.pending})
    originals = {t: sha(install.package_dir.parent / t) for t in TARGETS if (install.package_dir.parent / t).exists()}
    applied = apply_patches(install, PATCH_SET)
    assert sorted(applied.files_written) == pending_targets
    for state in applied.states:
        want = (
            Status.APPLIED
            if expected_status(state.patch, release) is Status.PENDING
            else expected_status(state.patch, release)
        )
        assert state.status is want, state
    for target in pending_targets:
        text = (install.package_dir.parent / target).read_text()
        for patch in PATCH_SET.patches:
            if patch.target == target:
                # A probe matching our own edit would make a patched file look fixed upstream.
                assert not any(p in text for p in patch.fixed_upstream_if), patch.id
        backup = (install.package_dir.parent / target).with_name(Path(target).name + BACKUP_SUFFIX)
        assert sha(backup) == originals[target]

    again = apply_patches(install, PATCH_SET)
    assert again.action == ("nothing to do") and again.files_written == ()

    reverted = revert_patches(install, PATCH_SET)
    assert sorted(reverted.files_written) == pending_targets
    for target in TARGETS:
        path = install.package_dir.parent / target
        if path.exists():
            assert path.read_bytes() == wheel_bytes(vllm_wheels[release], target), target
            assert not path.with_name(path.name + BACKUP_SUFFIX).exists()
    assert not (install.package_dir / MANIFEST_NAME).exists()
    assert [s.status for s in check_patches(install, PATCH_SET).states] == [s.status for s in before.states]


# -- refusals -----------------------------------------------------------------------------------------------------------------


def test_drifted_anchor_refuses_and_writes_nothing(fresh_0151):
    lite = fresh_0151.package_dir / "model_executor/models/glm4_moe_lite.py"
    lite.write_text(
        lite.read_text().replace(
            "                loaded_params.add(name)\n", "                loaded_params.add( name)\n"
        )
    )
    before = {
        t: sha(fresh_0151.package_dir.parent / t) for t in TARGETS if (fresh_0151.package_dir.parent / t).exists()
    }
    with pytest.raises(UserError) as e:
        apply_patches(fresh_0151, PATCH_SET)
    assert "glm4-moe-lite-name-none: refused: anchor drifted" in str(e.value)
    assert "edit 1: anchor found 0 times" in str(e.value)
    assert {t: sha(fresh_0151.package_dir.parent / t) for t in before} == before
    assert not list(fresh_0151.package_dir.rglob("*" + BACKUP_SUFFIX))


def test_unknown_version_is_refused_and_assume_version_vouches(fresh_0151):
    dev = VllmInstall(fresh_0151.python, "0.16.1rc1.dev34+g628302114", fresh_0151.package_dir, "vllm")
    with pytest.raises(
        UserError, match=r"vLLM 0.16.1rc1.dev34\+g628302114 .* not a release these patches were checked"
    ):
        check_patches(dev, PATCH_SET)
    newer = VllmInstall(fresh_0151.python, "0.34.0", fresh_0151.package_dir, "vllm")
    with pytest.raises(UserError, match="--assume-version"):
        apply_patches(newer, PATCH_SET)
    with pytest.raises(UserError, match="--assume-version 0.99.0: not a checked release"):
        check_patches(dev, PATCH_SET, assume_version="0.99.0")
    # A dev build vouched for as the release whose code it carries patches like that release.
    report = apply_patches(dev, PATCH_SET, assume_version="0.15.1")
    assert report.release == "0.15.1" and len(report.files_written) == 5


def test_failed_write_rolls_back_every_file(fresh_0151, monkeypatch):
    real_write = patches_mod._write_atomic
    calls = []

    def flaky(path, data):
        calls.append(path.name)
        if len(calls) == 5:  # after two targets and their backups
            raise OSError("disk full")
        real_write(path, data)

    monkeypatch.setattr(patches_mod, "_write_atomic", flaky)
    before = {
        t: sha(fresh_0151.package_dir.parent / t) for t in TARGETS if (fresh_0151.package_dir.parent / t).exists()
    }
    with pytest.raises(OSError, match="disk full"):
        apply_patches(fresh_0151, PATCH_SET)
    monkeypatch.setattr(patches_mod, "_write_atomic", real_write)
    assert {t: sha(fresh_0151.package_dir.parent / t) for t in before} == before
    assert not list(fresh_0151.package_dir.rglob("*" + BACKUP_SUFFIX))
    assert not (fresh_0151.package_dir / MANIFEST_NAME).exists()


def test_revert_refuses_a_file_changed_after_patching(fresh_0151):
    apply_patches(fresh_0151, PATCH_SET)
    parser = fresh_0151.package_dir / "tool_parsers/glm47_moe_tool_parser.py"
    parser.write_text(parser.read_text() + "# local edit\n")
    with pytest.raises(UserError, match="glm47_moe_tool_parser.py changed since it was patched"):
        revert_patches(fresh_0151, PATCH_SET)
    assert parser.read_text().endswith("# local edit\n")


def test_partly_applied_patch_is_refused(fresh_0151):
    serving = fresh_0151.package_dir / "entrypoints/anthropic/serving.py"
    patch = next(p for p in PATCH_SET.patches if p.id == "anthropic-tool-calls")
    first = patch.edits_for("0.15.1")[0]
    serving.write_text(serving.read_text().replace(first.old, first.new, 1))
    state = assess(patch, "0.15.1", serving.read_text())
    assert state.status is Status.PARTIAL and "only edit(s) 1 of 4" in state.detail
    with pytest.raises(UserError, match="anthropic-tool-calls: refused: partly applied"):
        apply_patches(fresh_0151, PATCH_SET)


def test_patched_file_that_does_not_compile_is_refused(fresh_0151, tmp_path):
    folder = _copy_patch_dir(tmp_path)
    parser = yaml.safe_load((folder / "glm47-tool-parser.yaml").read_text())
    parser["variants"][0]["edits"][0]["replacement"] = "# sm120-quant patch broken\nself.func_detail_regex = (\n"
    (folder / "glm47-tool-parser.yaml").write_text(yaml.safe_dump(parser))
    with pytest.raises(UserError, match="does not compile with"):
        apply_patches(fresh_0151, load_patch_set(folder))
    assert not list(fresh_0151.package_dir.rglob("*" + BACKUP_SUFFIX))


# -- the patched 0.15.1 code, run ---------------------------------------------------------------------------------------------


def _run_old_release(vllm_python: Path, extras: Path, package_root: Path, tokenizer_dir: Path) -> dict:
    env = dict(
        os.environ, PYTHONPATH=f"{package_root}{os.pathsep}{extras}", VLLM_LOGGING_LEVEL="WARNING", HF_HUB_OFFLINE="1"
    )
    proc = subprocess.run(
        [str(vllm_python), str(HERE / "old_release_runtime.py"), str(tokenizer_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["vllm_file"] == str(package_root / "vllm" / "__init__.py")
    return result


@pytest.mark.vllm
def test_patched_0151_parser_and_anthropic_stream_on_glm47_outputs(
    vllm_python, old_release_extras, vllm_0151_tree, tiny_glm47, tmp_path
):
    patched_root = tmp_path / "patched"
    shutil.copytree(vllm_0151_tree, patched_root)  # copy2 keeps mtimes, so the cached bytecode stays valid
    install = VllmInstall(vllm_python, "0.15.1", patched_root / "vllm", "vllm")
    report = apply_patches(install, PATCH_SET)
    assert len(report.files_written) == 5

    with ThreadPoolExecutor(max_workers=2) as pool:
        plain, patched = pool.map(
            lambda root: _run_old_release(vllm_python, old_release_extras, root, tiny_glm47),
            [vllm_0151_tree, patched_root],
        )

    # Unpatched 0.15.1: the newline form yields a tool named "get_weather\n", and the stream loses the call entirely.
    assert plain["parser"]["glm45_newline"]["calls"] == [["get_weather\n", {"city": "Paris"}]]
    assert not any(e.get("content_block", {}).get("type") == "tool_use" for e in plain["stream"])

    calls = {k: v["calls"] for k, v in patched["parser"].items()}
    assert calls == {
        "glm47_no_newline": [["get_weather", {"city": "Paris", "days": 3}]],
        "glm45_newline": [["get_weather", {"city": "Paris"}]],
        "zero_args": [["list_files", {}]],
        "text_then_call": [["get_weather", {"city": "Oslo"}]],
    }
    assert patched["parser"]["text_then_call"]["content"] == "Let me check."
    kinds = [(e["type"], (e.get("content_block") or e.get("delta") or {}).get("type")) for e in patched["stream"]]
    assert kinds == [
        ("message_start", None),
        ("content_block_start", "tool_use"),
        ("content_block_delta", "input_json_delta"),
        ("content_block_stop", None),
        ("message_delta", None),
        ("message_stop", None),
    ]
    start = patched["stream"][1]["content_block"]
    assert (start["id"], start["name"]) == ("call_1", "get_weather")
    assert json.loads(patched["stream"][2]["delta"]["partial_json"]) == {"city": "Paris"}
    assert patched["stream"][4]["delta"]["stop_reason"] == "tool_use"
