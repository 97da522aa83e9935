"""Version-aware, declarative patches to an installed vLLM (`serve patch`).

Each patch is a YAML file in `serve/patches/` (listed in `index.yaml`, in apply order): one target file, the releases it
affects, the first release that has the fix upstream plus a probe that recognises that fix, and edits. An edit is an
anchor that must occur exactly once and its replacement. The code never guesses: a release that was not checked is
refused, an anchor that drifted is refused, and apply writes every file or none.

Apply keeps the original of each file next to it (`<file>.sm120-quant.orig`) and records both checksums in
`<vllm>/.sm120-quant-patches.json`; revert restores the byte-identical original and refuses if the file changed since.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sm120_quant.errors import UserError
from sm120_quant.serve.vllm_env import VllmInstall, release_key

MANIFEST_NAME = ".sm120-quant-patches.json"
BACKUP_SUFFIX = ".sm120-quant.orig"
MARKER = "sm120-quant patch"


class Edit(BaseModel):
    """Replace `anchor` (which must occur exactly once) by `replacement`; both are written dedented by `indent`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    indent: int = Field(ge=0)
    anchor: str
    replacement: str

    @staticmethod
    def _reindent(text: str, indent: int) -> str:
        pad = " " * indent
        return "".join(pad + line if line.strip() else line for line in text.splitlines(keepends=True))

    @property
    def old(self) -> str:
        return self._reindent(self.anchor, self.indent)

    @property
    def new(self) -> str:
        return self._reindent(self.replacement, self.indent)

    @model_validator(mode="after")
    def _replacement_replaces(self) -> Edit:
        # Applied/pending is read from which of the two texts the file holds, so neither may contain the other.
        if self.old in self.new or self.new in self.old:
            raise ValueError("anchor and replacement must not contain each other")
        if MARKER not in self.replacement:
            raise ValueError(f"the replacement must carry a comment with {MARKER!r} so a reader of vLLM sees the edit")
        return self


class Variant(BaseModel):
    """The edits for the releases whose target file has the same anchors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    affected: list[str] = Field(min_length=1)
    edits: list[Edit] = Field(min_length=1)

    @field_validator("affected")
    @classmethod
    def _releases(cls, v: list[str]) -> list[str]:
        for r in v:
            release_key(r)
        return v


class Patch(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    title: str
    source: str
    why: str
    target: str
    fixed_in: str | None
    fixed_upstream_if: list[str]
    variants: list[Variant] = Field(min_length=1)

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        if not v.startswith("vllm/") or ".." in v.split("/"):
            raise ValueError("target is a path inside the vllm package, starting with vllm/")
        return v

    @model_validator(mode="after")
    def _one_variant_per_release(self) -> Patch:
        seen: set[str] = set()
        for variant in self.variants:
            twice = seen & set(variant.affected)
            if twice:
                raise ValueError(f"releases {sorted(twice)} are in more than one variant")
            seen |= set(variant.affected)
        return self

    @property
    def affected(self) -> list[str]:
        return sorted((r for v in self.variants for r in v.affected), key=release_key)

    def edits_for(self, release: str) -> list[Edit] | None:
        """The edits for `release`, or None if the release is not affected."""
        return next((v.edits for v in self.variants if release in v.affected), None)

    def fixed_upstream_by(self, release: str) -> bool:
        return self.fixed_in is not None and release_key(release) >= release_key(self.fixed_in)


class PatchIndex(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    checked_versions: list[str] = Field(min_length=1)
    patches: list[str] = Field(min_length=1)


@dataclass(frozen=True)
class PatchSet:
    checked_versions: tuple[str, ...]
    patches: tuple[Patch, ...]


def load_patch_set(folder: Path | None = None) -> PatchSet:
    """Load `index.yaml` and the patches it lists; every problem in every file is reported at once."""
    base = folder if folder is not None else Path(str(resources.files("sm120_quant.serve") / "patches"))
    problems: list[str] = []
    try:
        index = PatchIndex.model_validate(yaml.safe_load((base / "index.yaml").read_text()))
    except (OSError, ValidationError, yaml.YAMLError) as e:
        raise UserError(f"{base / 'index.yaml'}: {e}") from e
    patches: list[Patch] = []
    for pid in index.patches:
        path = base / f"{pid}.yaml"
        try:
            patch = Patch.model_validate(yaml.safe_load(path.read_text()))
        except (OSError, ValidationError, yaml.YAMLError) as e:
            problems.append(f"{path.name}: {e}")
            continue
        if patch.id != pid:
            problems.append(f"{path.name}: id {patch.id!r} differs from its index entry {pid!r}")
        unchecked = sorted(set(patch.affected) - set(index.checked_versions))
        if unchecked:
            problems.append(f"{path.name}: affected releases {unchecked} are not in index.yaml checked_versions")
        patches.append(patch)
    if problems:
        raise UserError("patch set is invalid: " + "; ".join(problems))
    return PatchSet(tuple(index.checked_versions), tuple(patches))


class Status(enum.Enum):
    """Where one patch stands on one installation."""

    APPLIED = "applied"
    PENDING = "pending"
    FIXED_UPSTREAM = "not needed: fixed upstream"
    NOT_AFFECTED = "not needed: release not affected"
    DRIFTED = "refused: anchor drifted"
    PARTIAL = "refused: partly applied"


@dataclass(frozen=True)
class PatchState:
    patch: Patch
    status: Status
    detail: str


@dataclass(frozen=True)
class PatchReport:
    """What `serve patch` found and did; the CLI prints it and picks the exit code."""

    vllm_version: str
    release: str
    package_dir: Path
    action: str
    states: tuple[PatchState, ...]
    files_written: tuple[str, ...]

    @property
    def pending(self) -> list[PatchState]:
        return [s for s in self.states if s.status is Status.PENDING]

    def to_json(self) -> dict:
        return {
            "vllm_version": self.vllm_version,
            "release": self.release,
            "package_dir": str(self.package_dir),
            "action": self.action,
            "files_written": list(self.files_written),
            "patches": [
                {"id": s.patch.id, "target": s.patch.target, "status": s.status.value, "detail": s.detail}
                for s in self.states
            ],
        }


def resolve_release(install: VllmInstall, patch_set: PatchSet, assume_version: str | None) -> str:
    """The checked release the patch set treats this installation as; anything else is refused."""
    if assume_version is not None:
        if assume_version not in patch_set.checked_versions:
            raise UserError(
                f"--assume-version {assume_version}: not a checked release; use one of {', '.join(patch_set.checked_versions)}"
            )
        return assume_version
    release = install.release
    if release is None or release not in patch_set.checked_versions:
        raise UserError(
            f"vLLM {install.version} at {install.package_dir}: not a release these patches were checked against "
            f"({patch_set.checked_versions[0]} to {patch_set.checked_versions[-1]}); an anchor checked on other code could "
            "land in the wrong place. Install a checked release, or pass --assume-version X.Y.Z for a build of that "
            "release's code (anchors must still match exactly)"
        )
    return release


def _target_path(install: VllmInstall, patch: Patch) -> Path:
    return install.package_dir.parent / patch.target


def assess(patch: Patch, release: str, text: str | None) -> PatchState:
    """The status of one patch for a file's current text (None: the file does not exist)."""
    edits = patch.edits_for(release)
    if text is None:
        if edits is not None:
            return PatchState(patch, Status.DRIFTED, f"{patch.target} is missing in vLLM {release}")
        return PatchState(patch, Status.NOT_AFFECTED, f"{patch.target} does not exist in vLLM {release}")
    if edits is not None:
        applied = [e.new in text and e.old not in text for e in edits]
        if all(applied):
            return PatchState(patch, Status.APPLIED, f"{len(edits)} edit(s) present in {patch.target}")
        if any(applied):
            done = ", ".join(str(i + 1) for i, a in enumerate(applied) if a)
            return PatchState(
                patch, Status.PARTIAL, f"only edit(s) {done} of {len(edits)} are in {patch.target}; revert first"
            )
    probe = next((p for p in patch.fixed_upstream_if if p in text), None)
    if probe is not None:
        return PatchState(
            patch, Status.FIXED_UPSTREAM, f"upstream fix found in {patch.target} (fixed in {patch.fixed_in})"
        )
    if edits is not None:
        counts = [text.count(e.old) for e in edits]
        bad = [f"edit {i + 1}: anchor found {n} times" for i, n in enumerate(counts) if n != 1]
        if bad:
            return PatchState(patch, Status.DRIFTED, f"{patch.target}: {'; '.join(bad)} (expected once)")
        return PatchState(patch, Status.PENDING, f"{len(edits)} edit(s) to apply to {patch.target}")
    if patch.fixed_upstream_by(release):
        return PatchState(
            patch,
            Status.DRIFTED,
            f"vLLM {release} should carry the upstream fix (from {patch.fixed_in}) but the probe did not match",
        )
    first, last = patch.affected[0], patch.affected[-1]
    return PatchState(patch, Status.NOT_AFFECTED, f"the bug is not in vLLM {release} (affected: {first} to {last})")


def _read(path: Path) -> str | None:
    return path.read_bytes().decode("utf-8") if path.exists() else None


def check_patches(install: VllmInstall, patch_set: PatchSet, assume_version: str | None = None) -> PatchReport:
    release = resolve_release(install, patch_set, assume_version)
    states = tuple(assess(p, release, _read(_target_path(install, p))) for p in patch_set.patches)
    return PatchReport(install.version, release, install.package_dir, "check", states, ())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _refuse_bad_states(states: tuple[PatchState, ...]) -> None:
    bad = [s for s in states if s.status in (Status.DRIFTED, Status.PARTIAL)]
    if bad:
        raise UserError("nothing was changed: " + "; ".join(f"{s.patch.id}: {s.status.value}: {s.detail}" for s in bad))


def _byte_compile(python: Path, sources: dict[str, str], timeout_s: float = 120.0) -> None:
    """Compile the patched sources with vLLM's own interpreter before anything is written."""
    with tempfile.TemporaryDirectory(prefix="sm120-quant-patch-") as tmp:
        paths = []
        for i, (rel, text) in enumerate(sources.items()):
            p = Path(tmp) / f"{i}_{Path(rel).name}"
            p.write_text(text, encoding="utf-8")
            paths.append(str(p))
        code = (
            "import py_compile, sys\nfor p in sys.argv[1:]:\n    py_compile.compile(p, cfile=p + 'c', doraise=True)\n"
        )
        proc = subprocess.run(
            [str(python), "-c", code, *paths], capture_output=True, text=True, timeout=timeout_s, check=False
        )
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            raise UserError(f"nothing was changed: a patched file does not compile with {python}: {last}")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".sm120-quant.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o644)
    os.replace(tmp, path)


def _load_manifest(install: VllmInstall) -> dict:
    path = install.package_dir / MANIFEST_NAME
    if not path.exists():
        return {"files": {}}
    return json.loads(path.read_text())


def _save_manifest(install: VllmInstall, manifest: dict) -> None:
    _write_atomic(install.package_dir / MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def apply_patches(install: VllmInstall, patch_set: PatchSet, assume_version: str | None = None) -> PatchReport:
    """Apply every pending patch: all files or none, originals kept, checksums recorded; nothing pending is a no-op."""
    report = check_patches(install, patch_set, assume_version)
    _refuse_bad_states(report.states)
    pending = report.pending
    if not pending:
        return PatchReport(report.vllm_version, report.release, report.package_dir, "nothing to do", report.states, ())

    manifest = _load_manifest(install)
    originals: dict[str, bytes] = {}
    patched: dict[str, str] = {}
    for state in pending:
        rel = state.patch.target
        path = install.package_dir.parent / rel
        if rel not in originals:
            originals[rel] = path.read_bytes()
            backup = path.with_name(path.name + BACKUP_SUFFIX)
            if backup.exists() and rel not in manifest["files"]:
                raise UserError(
                    f"nothing was changed: {backup} exists but {MANIFEST_NAME} does not list it (an interrupted run?); "
                    "compare it with the file, then delete it"
                )
            patched[rel] = originals[rel].decode("utf-8")
        for edit in state.patch.edits_for(report.release) or []:
            patched[rel] = patched[rel].replace(edit.old, edit.new, 1)

    _byte_compile(install.python, patched)

    written: list[str] = []
    created_backups: list[Path] = []
    try:
        for rel, text in patched.items():
            path = install.package_dir.parent / rel
            entry = manifest["files"].get(rel)
            if entry is None:
                backup = path.with_name(path.name + BACKUP_SUFFIX)
                _write_atomic(backup, originals[rel])
                created_backups.append(backup)
                entry = {"backup": backup.name, "original_sha256": _sha256(originals[rel]), "patches": []}
            data = text.encode("utf-8")
            _write_atomic(path, data)
            written.append(rel)
            entry["patched_sha256"] = _sha256(data)
            entry["patches"] = sorted(set(entry["patches"]) | {s.patch.id for s in pending if s.patch.target == rel})
            manifest["files"][rel] = entry
        manifest["vllm_version"] = install.version
        manifest["release"] = report.release
        _save_manifest(install, manifest)
    except BaseException:
        for rel in written:
            _write_atomic(install.package_dir.parent / rel, originals[rel])
        for backup in created_backups:
            backup.unlink(missing_ok=True)
        raise
    after = check_patches(install, patch_set, assume_version)
    return PatchReport(after.vllm_version, after.release, after.package_dir, "applied", after.states, tuple(written))


def revert_patches(install: VllmInstall, patch_set: PatchSet, assume_version: str | None = None) -> PatchReport:
    """Restore every patched file from its backup, byte for byte; refuses if a file changed since it was patched."""
    release = resolve_release(install, patch_set, assume_version)
    manifest = _load_manifest(install)
    if not manifest["files"]:
        states = check_patches(install, patch_set, assume_version).states
        applied = [s.patch.id for s in states if s.status is Status.APPLIED]
        if applied:
            raise UserError(
                f"{', '.join(applied)} are in vLLM's files but {install.package_dir / MANIFEST_NAME} is missing, so there is "
                "no verified original to restore; reinstall vLLM"
            )
        return PatchReport(install.version, release, install.package_dir, "nothing to do", states, ())

    restores: dict[str, bytes] = {}
    currents: dict[str, bytes] = {}
    problems: list[str] = []
    for rel, entry in manifest["files"].items():
        path = install.package_dir.parent / rel
        backup = path.with_name(entry["backup"])
        current = path.read_bytes() if path.exists() else b""
        if _sha256(current) != entry["patched_sha256"]:
            problems.append(f"{rel} changed since it was patched (checksum differs); reinstall vLLM instead")
        if not backup.exists() or _sha256(backup.read_bytes()) != entry["original_sha256"]:
            problems.append(f"{backup.name}: missing or not the recorded original")
            continue
        restores[rel] = backup.read_bytes()
        currents[rel] = current
    if problems:
        raise UserError("nothing was changed: " + "; ".join(problems))

    done: list[str] = []
    try:
        for rel, data in restores.items():
            _write_atomic(install.package_dir.parent / rel, data)
            done.append(rel)
    except BaseException:
        for rel in done:
            _write_atomic(install.package_dir.parent / rel, currents[rel])
        raise
    for rel, entry in manifest["files"].items():
        (install.package_dir.parent / rel).with_name(entry["backup"]).unlink()
    (install.package_dir / MANIFEST_NAME).unlink()
    after = check_patches(install, patch_set, assume_version)
    return PatchReport(install.version, release, install.package_dir, "reverted", after.states, tuple(done))
