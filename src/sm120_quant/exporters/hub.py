"""Upload a finished checkpoint folder to the Hugging Face Hub, with the generated model card and provenance.json.

Order: refuse what should not be uploaded (no report.json; the doctor found errors, verify did not run or failed,
the files changed since the run -- unless `force`), check the token, hash every file, render the card and the
provenance, then create the repo (and branch) and send everything as one commit, so the repo never shows half a
checkpoint. huggingface_hub does the transfer: Xet when hf_xet is installed, otherwise git-LFS (multipart for large
files). Both are resumable by content: re-running after an interruption sends only what the Hub does not hold yet,
and the hashes of unchanged files come from a cache instead of being read again.

The token comes from huggingface_hub's usual sources (HF_TOKEN, `hf auth login`); this module never reads, prints or
stores it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sm120_quant.errors import CheckFailed, UserError
from sm120_quant.exporters.model_card import (
    CARD,
    PROVENANCE,
    VERIFY_THRESHOLDS,
    CardInputs,
    FileEntry,
    card_inputs,
    checkpoint_files,
    hash_files,
    render_card,
    render_provenance,
    require_hub,
    verify_metrics,
    write_text_atomic,
)
from sm120_quant.recipes.schema import UploadSpec

DEFAULT_REVISION = "main"


@dataclass(frozen=True)
class UploadResult:
    repo_id: str
    revision: str
    private: bool
    dry_run: bool
    files: tuple[FileEntry, ...]  # the whole commit, README.md and provenance.json included
    card: str
    blockers: tuple[str, ...]  # why the upload is refused without `force`
    forced: bool
    repo_url: str | None = None
    commit_url: str | None = None
    commit_oid: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


# ---------------------------------------------------------------------------------------------------------------
# What must hold before anything is sent


def verify_blockers(report: Mapping[str, Any], inputs: CardInputs) -> list[str]:
    recipe = inputs.recipe
    if recipe is not None and not recipe.verify.enabled:
        return ["verify is disabled in the recipe (verify.enabled: false), so nothing compared it with BF16"]
    metrics = verify_metrics(report)
    if metrics is None:
        return ["verify did not run (report.json has no verify section)"]
    passed = report["verify"].get("passed")
    if passed is True:
        return []
    if passed is False:
        failures = report["verify"].get("failures") or []
        return ["verify failed" + (": " + "; ".join(map(str, failures)) if failures else "")]
    if recipe is None:
        return ["verify recorded no verdict and there is no recipe.yaml to judge its metrics against"]
    failed, judged = [], 0
    for key, value in metrics:
        bound = VERIFY_THRESHOLDS.get(key)
        if bound is None or not isinstance(value, (int, float)):
            continue
        judged += 1
        limit = getattr(recipe.verify, bound[0])
        if not (value >= limit if bound[1] == ">=" else value <= limit):
            failed.append(f"{key} {value:.4f} (needs {bound[1]} {limit})")
    if not judged:
        return ["verify recorded none of " + ", ".join(VERIFY_THRESHOLDS) + ", so it has no verdict"]
    return [f"verify failed: {', '.join(failed)}"] if failed else []


def upload_blockers(inputs: CardInputs) -> list[str]:
    """Why this folder should not be uploaded as it is; empty when the doctor and verify passed."""
    report = inputs.report
    blockers = []
    summary = report["check"]["summary"]
    if summary["errors"]:
        first = next((f for f in report["check"]["findings"] if f["level"] == "ERROR"), None)
        blockers.append(f"the checkpoint doctor found {summary['errors']} ERROR(s)"
                        + (f", first: {first['rule']} at {first['key']}" if first else ""))
    by_dtype: dict[str, int] = {}
    for ref in inputs.ckpt.tensors.values():
        by_dtype[ref.info.dtype] = by_dtype.get(ref.info.dtype, 0) + 1
    recorded = report["tensors"]
    if len(inputs.ckpt.tensors) != recorded["count"] or dict(sorted(by_dtype.items())) != recorded["by_dtype"]:
        blockers.append(f"the safetensors files changed since the run ({len(inputs.ckpt.tensors)} tensors now, "
                        f"{recorded['count']} in report.json); re-run `quantize run`")
    return blockers + verify_blockers(report, inputs)


# ---------------------------------------------------------------------------------------------------------------
# The upload


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UserError(f"--repo-id {repo_id!r}: {str(e).splitlines()[0]}; use ORG/NAME") from None
    if "/" not in repo_id:
        raise UserError(f"--repo-id {repo_id!r}: no namespace; use ORG/NAME (your user name or an organization)")


def _check_token(api) -> None:
    """Fail before hashing hundreds of GB when the token is missing, rejected or read-only."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HfHubHTTPError

    if get_token() is None:
        raise UserError("no Hugging Face token found; run `hf auth login` or set HF_TOKEN to a token with write "
                        "access")
    try:
        info = api.whoami()
    except HfHubHTTPError as e:
        raise UserError(f"the Hugging Face token was rejected ({_status(e)}); run `hf auth login` again or set "
                        "HF_TOKEN to a valid write token") from None
    role = (info.get("auth") or {}).get("accessToken", {}).get("role")
    if role == "read":
        raise UserError("the Hugging Face token is read-only; create a write (or fine-grained) token and run "
                        "`hf auth login` with it")


def _status(e) -> str:
    response = getattr(e, "response", None)
    return f"HTTP {response.status_code}" if response is not None else type(e).__name__


def _hub_error(step: str, repo_id: str, e: Exception) -> UserError:
    response = getattr(e, "response", None)
    code = response.status_code if response is not None else None
    if code == 401:
        fix = "the token was rejected; run `hf auth login` again or set HF_TOKEN"
    elif code == 403:
        fix = f"the token cannot write to {repo_id.split('/')[0]}; use a write token for it or another --repo-id"
    else:
        fix = "re-run the same command to resume; what the Hub already holds is not sent again"
    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    return UserError(f"{repo_id}: {step} failed ({detail}); {fix}")


@contextmanager
def _hub_progress(enabled: bool):
    """huggingface_hub's own transfer bars follow `progress`, and its global switch is put back afterwards."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    if not enabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if was_disabled != are_progress_bars_disabled():
            (disable_progress_bars if was_disabled else enable_progress_bars)()


def _say(progress: bool, message: str) -> None:
    if progress:
        from sm120_quant.cli.common import err

        err.print(message, markup=False)


def upload_checkpoint(folder: Path, repo_id: str, *, private: bool = True, revision: str | None = None,
                      dry_run: bool = False, force: bool = False, progress: bool = False) -> UploadResult:
    """Upload a `quantize run` output folder with its model card and provenance as one commit.

    `dry_run` contacts nobody and writes no card: the result lists the files with sizes and hashes, the rendered card
    and the blockers. Without `force`, blockers raise CheckFailed; with it, the card states them.
    """
    folder = Path(folder)
    require_hub()
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder; pass the checkpoint folder `quantize run` wrote")
    _check_repo_id(repo_id)
    revision = revision or DEFAULT_REVISION
    inputs = card_inputs(folder, repo_id)
    blockers = tuple(upload_blockers(inputs))
    if blockers and not force and not dry_run:
        raise CheckFailed(f"upload of {folder} to {repo_id} refused: {'; '.join(blockers)}. Fix that and re-run, "
                          "or pass --force to upload anyway (the model card will say why)")
    forced = bool(blockers) and force

    from huggingface_hub import HfApi

    api = HfApi()
    if not dry_run:
        _check_token(api)

    entries = hash_files(folder, checkpoint_files(folder), progress)
    card = render_card(replace(inputs, forced=blockers if forced else ()))
    provenance = render_provenance(folder, entries)
    generated = [FileEntry(name, len(text.encode()), hashlib.sha256(text.encode()).hexdigest())
                 for name, text in ((CARD, card), (PROVENANCE, provenance))]
    files = tuple(sorted([*entries, *generated], key=lambda f: f.path))
    result = UploadResult(repo_id, revision, private, dry_run, files, card, blockers, forced)
    if dry_run:
        return result

    write_text_atomic(folder / CARD, card)
    write_text_atomic(folder / PROVENANCE, provenance)
    recipe = inputs.report["recipe"]
    message = f"Upload {recipe['scheme']} checkpoint from recipe {recipe['name']} (sm120-quant)"
    return _send(api, folder, result, message, progress)


def _send(api, folder: Path, result: UploadResult, message: str, progress: bool) -> UploadResult:
    import httpx
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    network = (HfHubHTTPError, httpx.TransportError)
    repo_id, revision = result.repo_id, result.revision
    step = "creating the repo"
    try:
        with _hub_progress(progress):
            repo_url = api.create_repo(repo_id, private=result.private, exist_ok=True)
            if revision != DEFAULT_REVISION:
                step = f"creating branch {revision}"
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            operations = []
            for f in result.files:
                op = CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(folder / f.path))
                op.upload_info.sha256 = bytes.fromhex(f.sha256)  # hashed once above; the client would read it again
                operations.append(op)
            step = "uploading"
            _say(progress, f"uploading {len(operations)} files ({result.total_bytes} bytes) to {repo_id}@{revision}")
            info = api.create_commit(
                repo_id, operations, revision=revision,
                commit_message=message,
                commit_description="Generated by sm120-quant: model card and provenance.json from report.json.")
    except network as e:
        raise _hub_error(step, repo_id, e) from None
    except RuntimeError as e:  # huggingface_hub wraps a failed LFS transfer in RuntimeError
        if isinstance(e.__cause__, network):
            raise _hub_error(step, repo_id, e.__cause__) from None
        raise
    _say(progress, f"committed {info.oid} to {repo_id}@{revision}")
    return UploadResult(repo_id, revision, result.private, False, result.files, result.card, result.blockers,
                        result.forced, str(repo_url), info.commit_url, info.oid)


def describe(result: UploadResult) -> str:
    """The dry-run listing: files with sizes and hashes, what would be created, the blockers, then the card."""
    width = max(len(f.path) for f in result.files)
    lines = [f"{f.path:<{width}}  {f.size:>14}  {f.sha256}" for f in result.files]
    branch = (f", and branch {result.revision} from main unless it exists"
              if result.revision != DEFAULT_REVISION else "")
    lines += [
        "",
        f"would create {result.repo_id} ({'private' if result.private else 'public'}) unless it exists{branch}",
        (f"would commit {len(result.files)} files, {result.total_bytes} bytes, to {result.repo_id}@{result.revision}"
         f" ({CARD} and {PROVENANCE} generated)"),
    ]
    if result.blockers:
        verb = "uploads anyway with --force; the card says" if result.forced else "refused without --force"
        lines.append(f"{verb}: " + "; ".join(result.blockers))
    lines += ["", f"----- {CARD} -----", result.card.rstrip("\n"), f"----- end of {CARD} -----"]
    return "\n".join(lines) + "\n"


def upload_after_run(folder: Path, spec: UploadSpec, *, force: bool = False,
                     progress: bool = True) -> UploadResult | None:
    """The recipe's `upload:` step at the end of `quantize run`; None when the recipe names no repo."""
    if spec.repo_id is None:
        return None
    return upload_checkpoint(folder, spec.repo_id, private=spec.private, revision=spec.revision, force=force,
                             progress=progress)
