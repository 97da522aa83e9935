"""`quantize upload` against a local stand-in for the Hub (hub_server.py): the huggingface_hub client is real, only the
server is not. Xet is off (it needs Hugging Face's storage service), so files travel by git-LFS, multipart for the
shards, as they do on the Hub for clients without hf_xet."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from hub_server import (
    GITATTRIBUTES,
    Hold,
    HubServer,
    edit_report,
    finished_run,
    validate_card_metadata,
)

from sm120_quant.cli.common import run_app
from sm120_quant.cli.upload_cmd import upload
from sm120_quant.errors import CheckFailed, UserError
from sm120_quant.exporters.hub import describe, upload_after_run, upload_checkpoint
from sm120_quant.recipes.schema import UploadSpec

# huggingface_hub 1.33 PUTs LFS parts with httpx's deprecated `data=<file>`; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

TOKEN = "hf_StandInTokenNeverToBeShown0123456789"
REPO = "tester/tiny-glm47-nvfp4"
VERIFY = {"passed": True, "metrics": {"cosine": 0.991, "kl": 0.02, "top1": 0.95}}


@pytest.fixture(scope="module")
def base_run(exports, tiny_sources, tmp_path_factory) -> Path:
    return finished_run(exports["modelopt-glm47"], tiny_sources["glm47"], tmp_path_factory.mktemp("run") / "nvfp4")


@pytest.fixture
def unverified(base_run, tmp_path) -> Path:
    return Path(shutil.copytree(base_run, tmp_path / "unverified"))


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    """A copy whose report says verify passed, so the upload is not refused."""
    folder = Path(shutil.copytree(base_run, tmp_path / "nvfp4"))
    edit_report(folder, verify=VERIFY)
    return folder


def _client_settings(monkeypatch, tmp_path, endpoint: str) -> None:
    """Point the client at `endpoint`, with its caches in tmp_path; huggingface_hub reads these at import time."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-token"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "hf-agent-harnesses.json"))
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with HubServer(TOKEN) as server:
        _client_settings(monkeypatch, tmp_path, server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server
        assert server.state.unhandled == [], "the client called routes the stand-in does not know"


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_upload_arrives_byte_for_byte(hub, run, capsys):
    result = upload_checkpoint(run, REPO, progress=True)
    state = hub.state

    remote = state.files(REPO)
    local = local_files(run)
    assert set(local) >= {"README.md", "provenance.json", "report.json", "recipe.yaml", "config.json"}
    assert remote == {**local, ".gitattributes": GITATTRIBUTES}
    assert remote["README.md"] == result.card.encode()
    assert {f.path: (f.size, f.sha256) for f in result.files} == {p: (len(d), sha(d)) for p, d in local.items()}

    repo = state.repos[REPO]
    head = repo.head("main")
    assert repo.private is True
    assert (result.commit_oid, head.summary) == (head.oid, ("Upload nvfp4 checkpoint from recipe tiny-glm47-nvfp4 "
                                                           "(sm120-quant)"))
    assert result.commit_url == f"{hub.url}/{REPO}/commit/{head.oid}"
    shards = sorted(p for p in local if p.endswith(".safetensors"))
    assert len(shards) == 2 and head.lfs_paths == set(shards)
    for shard in shards:  # multipart, once each, verified
        oid = sha(local[shard])
        assert (state.stored[oid], state.verified[oid]) == (1, 1)
        assert ("PUT", f"/lfs/{oid}/part/2") in state.requests
    # The card went through the Hub's YAML check before anything was hashed, and passed it.
    assert state.validated_cards == [result.card]
    assert validate_card_metadata(result.card) == ([], [])
    assert state.errors == []

    out, err = capsys.readouterr()
    assert f"committed {head.oid} to {REPO}@main" in err
    for text in (out, err, repr(result), *(d.decode(errors="replace") for d in remote.values())):
        assert TOKEN not in text


def test_interrupted_upload_resumes_without_resending(hub, run, tmp_path):
    shards = sorted(run.glob("*.safetensors"))
    first, second = (sha(p.read_bytes()) for p in shards)
    hub.state.hold = Hold(second)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env |= {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    script = ("from sm120_quant.exporters.hub import upload_checkpoint; "
              f"upload_checkpoint({str(run)!r}, {REPO!r})")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        # Kill the client once the first shard is stored and verified and the second is on the wire.
        deadline = time.monotonic() + 60
        while not (hub.state.hold.reached.is_set() and hub.state.verified[first]) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        assert hub.state.hold.reached.is_set() and hub.state.verified[first] == 1
    finally:
        proc.kill()
        proc.wait(timeout=30)
        hub.state.hold.release.set()
    assert second not in hub.state.lfs
    assert hub.state.files(REPO) == {".gitattributes": GITATTRIBUTES}  # nothing committed: no half checkpoint

    hub.state.hold = None
    before = len(hub.state.requests)
    result = upload_checkpoint(run, REPO)
    resumed = hub.state.requests[before:]
    assert not [r for r in resumed if r[0] == "PUT" and r[1].startswith(f"/lfs/{first}")]
    assert [r for r in resumed if r[0] == "PUT" and r[1].startswith(f"/lfs/{second}")]
    assert (hub.state.stored[first], hub.state.stored[second]) == (1, 1)
    assert hub.state.files(REPO) == {**local_files(run), ".gitattributes": GITATTRIBUTES}
    assert result.commit_oid == hub.state.repos[REPO].branches["main"]


def test_second_upload_of_the_same_files_sends_no_bytes(hub, run):
    first = upload_checkpoint(run, REPO)
    before = len(hub.state.requests)
    second = upload_checkpoint(run, REPO)
    again = hub.state.requests[before:]
    assert [r for r in again if r[0] == "PUT" or "/commit/" in r[1]] == []
    assert second.commit_oid == first.commit_oid


def test_revision_goes_to_its_own_branch(hub, run):
    upload_checkpoint(run, REPO, revision="sm120-v1", private=False)
    assert hub.state.files(REPO, "sm120-v1") == {**local_files(run), ".gitattributes": GITATTRIBUTES}
    assert hub.state.files(REPO, "main") == {".gitattributes": GITATTRIBUTES}
    assert hub.state.repos[REPO].private is False


def test_unverified_checkpoint_is_refused_unless_forced(hub, unverified):
    with pytest.raises(CheckFailed, match=r"refused: verify did not run \(report.json has no verify section\)\. "
                                          r"Fix that and re-run, or pass --force"):
        upload_checkpoint(unverified, REPO)
    assert hub.state.requests == []
    assert not (unverified / "README.md").exists()

    result = upload_checkpoint(unverified, REPO, force=True)
    assert result.forced and result.blockers == ("verify did not run (report.json has no verify section)",)
    card = hub.state.files(REPO)["README.md"].decode()
    assert "> **Uploaded with `--force` although:** verify did not run (report.json has no verify section)." in card


@pytest.mark.parametrize(("change", "reason"), [
    ({"verify": {"passed": False, "failures": ["kl 0.91 > 0.5"]}}, "verify failed: kl 0.91 > 0.5"),
    ({"verify": {"metrics": {"cosine": 0.5, "kl": 0.1, "top1": 0.9}}},
     r"verify failed: cosine 0\.5000 \(needs >= 0\.8\)"),
    ({"check": {"summary": {"errors": 2, "warnings": 0}, "layout": "modelopt-nvfp4", "findings": [
        {"level": "ERROR", "rule": "fused-scales", "key": "model.layers.1.mlp.experts.0", "message": "m"}]}},
     "the checkpoint doctor found 2 ERROR\\(s\\), first: fused-scales at model.layers.1.mlp.experts.0"),
    ({"tensors": {"count": 1, "by_dtype": {"BF16": 1}}}, "the safetensors files changed since the run"),
])
def test_what_refuses_an_upload(run, change, reason):
    edit_report(run, **change)
    with pytest.raises(CheckFailed, match=reason):
        upload_checkpoint(run, REPO)


def test_dry_run_lists_files_and_card_and_contacts_nobody(unverified, monkeypatch, tmp_path):
    _client_settings(monkeypatch, tmp_path, "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("HF_TOKEN", raising=False)
    result = upload_checkpoint(unverified, REPO, dry_run=True)
    text = describe(result)
    for name, data in local_files(unverified).items():
        line = next(line for line in text.splitlines() if line.startswith(f"{name} "))
        assert line.split() == [name, str(len(data)), sha(data)]
    card = result.card.encode()
    assert f"README.md {len(card)} {sha(card)}" in " ".join(text.split())
    assert f"would create {REPO} (private) unless it exists" in text
    assert f"would commit {len(result.files)} files, {result.total_bytes} bytes, to {REPO}@main" in text
    assert "refused without --force: verify did not run" in text
    assert result.card in text
    assert not (unverified / "README.md").exists() and not (unverified / "provenance.json").exists()


def test_token_missing_or_rejected(hub, run, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(UserError, match="no Hugging Face token found; run `hf auth login` or set HF_TOKEN"):
        upload_checkpoint(run, REPO)
    wrong = "hf_WrongStandInToken0000000000000000"
    monkeypatch.setenv("HF_TOKEN", wrong)
    with pytest.raises(UserError, match=r"token was rejected \(HTTP 401\)") as e:
        upload_checkpoint(run, REPO)
    assert wrong not in str(e.value)
    assert REPO not in hub.state.repos


def test_namespace_without_write_access(hub, run):
    with pytest.raises(UserError, match="the token cannot write to someone-else; use a write token for it or "
                                        "another --repo-id"):
        upload_checkpoint(run, "someone-else/tiny")
    assert hub.state.lfs == {}


def test_bad_repo_id(run):
    with pytest.raises(UserError, match="no namespace; use ORG/NAME"):
        upload_checkpoint(run, "just-a-name", dry_run=True)


def test_recipe_upload_section(hub, run):
    assert upload_after_run(run, UploadSpec()) is None
    assert hub.state.requests == []
    result = upload_after_run(run, UploadSpec(repo_id=REPO, private=False, revision="v2"), progress=False)
    assert (result.revision, result.private) == ("v2", False)
    assert hub.state.files(REPO, "v2")["README.md"] == result.card.encode()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("upload")(upload)
    return app


def test_cli_exit_codes(hub, run, unverified, capsys):
    def main(*args: str) -> int:
        with pytest.raises(SystemExit) as e:
            run_app(_app(), ["upload", *args])
        return e.value.code

    assert main(str(unverified), "--repo-id", REPO, "--dry-run") == 0
    out, _ = capsys.readouterr()
    assert "refused without --force" in out and "----- README.md -----" in out
    assert main(str(unverified), "--repo-id", REPO) == 1
    assert "upload of" in capsys.readouterr().err
    assert main(str(run), "--repo-id", "bad id") == 2
    assert main(str(run), "--repo-id", REPO, "--public") == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{hub.url}/{REPO}/commit/{hub.state.repos[REPO].branches['main']}"
    assert hub.state.repos[REPO].private is False
    assert TOKEN not in out + err
