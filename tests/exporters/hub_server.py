"""A stand-in for the part of the Hugging Face Hub HTTP API that huggingface_hub 1.x calls to create a repo, a branch
and a commit, so the upload tests run the real client against a real (local) server.

Routes (read from huggingface_hub 1.33: hf_api.py, _commit_api.py, lfs.py):

    GET  /api/agent-harnesses                             the client's daily user-agent registry fetch
    GET  /api/whoami-v2                                   HfApi.whoami
    POST /api/repos/create                                HfApi.create_repo (409 when it exists, 403 outside the
                                                          user's namespaces)
    POST /api/validate-yaml                               create_commit, before anything is hashed or sent
    GET  /api/models/{repo}[/revision/{rev}]              HfApi.repo_info (create_commit's no-op path)
    POST /api/models/{repo}/branch/{branch}               HfApi.create_branch (409 when it exists)
    POST /api/models/{repo}/preupload/{rev}               upload mode per file, and the oid of the file on {rev}
    POST /{repo}.git/info/lfs/objects/batch               git-lfs batch: no actions for an object already stored
    PUT  /lfs/{oid}                                       basic transfer (one PUT, no auth header, like S3)
    PUT  /lfs/{oid}/part/{n}, POST /lfs/{oid}/complete    multipart transfer (objects over LFS_CHUNK bytes)
    POST /lfs/{oid}/verify                                git-lfs verify
    POST /api/models/{repo}/commit/{rev}                  NDJSON commit: header, file (base64), lfsFile, deletedFile

Anything else is answered 404 and recorded in `HubState.unhandled`, so a test sees the client call something new.
Uploaded objects are stored only after their sha256 and size check out, as the Hub's storage does. `hold` stops an
upload of one object mid-request until the test releases it, so a test can kill the client at a known point.

Loopback only, ephemeral port, request bodies capped at MAX_BODY, every socket read bounded by SOCKET_TIMEOUT.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import threading
import traceback
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import unquote, urlsplit

import yaml

LFS_CHUNK = 1 << 20  # multipart above this, so the tiny shards exercise the path real 5 GB shards take
REGULAR_MAX = 10 << 20  # the Hub stores larger files in LFS whatever their name
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".gguf")
MAX_BODY = 64 << 20
SOCKET_TIMEOUT = 30.0
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    summary: str
    description: str
    files: dict[str, bytes]
    lfs_paths: frozenset[str]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def head(self, branch: str) -> Commit | None:
        oid = self.branches.get(branch)
        return self.commits[oid] if oid else None


@dataclass
class Hold:
    oid: str
    reached: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


@dataclass
class HubState:
    token: str
    user: str = "tester"
    namespaces: frozenset[str] = frozenset({"tester", "tester-org"})  # where the token may create repos
    repos: dict[str, Repo] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)
    parts: dict[str, dict[int, bytes]] = field(default_factory=dict)
    stored: Counter = field(default_factory=Counter)  # oid -> times a complete, verified object arrived
    verified: Counter = field(default_factory=Counter)
    requests: list[tuple[str, str]] = field(default_factory=list)
    unhandled: list[tuple[str, str]] = field(default_factory=list)
    validated_cards: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # handler exceptions (broken connections)
    hold: Hold | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        head = self.repos[repo_id].head(branch)
        return dict(head.files) if head else {}

    def uploads_of(self, oid: str) -> int:
        """How many PUT requests carried (some of) this object's bytes."""
        return sum(1 for method, path in self.requests if method == "PUT" and path.startswith(f"/lfs/{oid}"))


class _Reject(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:
        pass  # requests are recorded in HubState.requests instead of on stderr

    # -- plumbing
    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(SOCKET_TIMEOUT)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                if len(out) + size > MAX_BODY:
                    raise _Reject(413, "request body too large")
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise _Reject(413, "request body too large")
        data = self.rfile.read(length)
        if len(data) != length:
            raise ConnectionError(f"client sent {len(data)} of {length} bytes")
        return data

    def _json(self) -> dict:
        try:
            return json.loads(self._body())
        except ValueError:
            raise _Reject(400, "body is not JSON") from None

    def _send(self, status: int, payload: dict | None = None, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        body = json.dumps(payload).encode() if payload is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _auth(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {self.server.state.token}":
            raise _Reject(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str) -> Repo:
        repo = self.server.state.repos.get(repo_id)
        if repo is None:
            raise _Reject(404, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _branch(repo: Repo, rev: str) -> str:
        rev = unquote(rev)
        if rev not in repo.branches:
            raise _Reject(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return rev

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        state = self.server.state
        with state.lock:
            state.requests.append((method, path))
        for route_method, pattern, handler in ROUTES:
            m = pattern.fullmatch(path)
            if route_method == method and m:
                try:
                    handler(self, **m.groupdict())
                except _Reject as e:
                    self._send(e.status, {"error": e.message, **e.extra},
                               {"X-Error-Code": e.code} if e.code else None)
                return
        with state.lock:
            state.unhandled.append((method, path))
        self._send(404, {"error": f"stand-in Hub has no route for {method} {path}"})

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -- API
    def agent_harnesses(self) -> None:
        """huggingface_hub 1.3x fetches this registry once a day to fill its user-agent header."""
        self._send(200, {"standardEnvVars": [], "harnesses": {}})

    def whoami(self) -> None:
        self._auth()
        self._send(200, {"type": "user", "name": self.server.state.user, "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"role": "write"}}})

    def create_repo(self) -> None:
        self._auth()
        body = self._json()
        if body.get("type", "model") != "model":
            raise _Reject(400, "the stand-in Hub only holds model repos")
        state = self.server.state
        namespace = body.get("organization") or state.user
        if namespace not in state.namespaces:
            raise _Reject(403, f"You don't have the rights to create a model under the namespace \"{namespace}\"")
        repo_id = f"{namespace}/{body['name']}"
        url = f"{self.server.url}/{repo_id}"
        with state.lock:
            if repo_id in state.repos:
                raise _Reject(409, "You already created this model repo", url=url)
            repo = Repo(repo_id, private=body.get("visibility") == "private")
            _add_commit(repo, "main", "initial commit", "", {".gitattributes": GITATTRIBUTES}, frozenset())
            state.repos[repo_id] = repo
        self._send(200, {"url": url, "name": repo_id})

    def validate_yaml(self) -> None:
        body = self._json()
        content = body.get("content", "")
        self.server.state.validated_cards.append(content)
        errors, warnings = validate_card_metadata(content)
        self._send(400 if errors else 200, {"errors": [{"message": e} for e in errors],
                                            "warnings": [{"message": w} for w in warnings]})

    def repo_info(self, repo: str, rev: str = "main") -> None:
        self._auth()
        r = self._repo(repo)
        head = r.head(self._branch(r, rev))
        self._send(200, {"id": r.repo_id, "modelId": r.repo_id, "sha": head.oid, "private": r.private,
                         "siblings": [{"rfilename": p} for p in sorted(head.files)]})

    def create_branch(self, repo: str, branch: str) -> None:
        self._auth()
        r = self._repo(repo)
        body = self._json()
        branch = unquote(branch)
        with self.server.state.lock:
            if branch in r.branches:
                raise _Reject(409, f"Reference refs/heads/{branch} already exists")
            r.branches[branch] = r.branches[self._branch(r, body.get("startingPoint", "main"))]
        self._send(200, {})

    def preupload(self, repo: str, rev: str) -> None:
        self._auth()
        r = self._repo(repo)
        head = r.head(self._branch(r, rev))
        answer = []
        for f in self._json()["files"]:
            mode = "lfs" if f["path"].endswith(LFS_SUFFIXES) or f["size"] >= REGULAR_MAX else "regular"
            existing = head.files.get(f["path"])
            oid = None
            if existing is not None:
                oid = (hashlib.sha256(existing).hexdigest() if f["path"] in head.lfs_paths
                       else git_blob_sha1(existing))
            answer.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": answer, "commitOid": head.oid})

    def lfs_batch(self, repo: str) -> None:
        self._auth()
        self._repo(repo)
        body = self._json()
        if body.get("operation") != "upload" or body.get("hash_algo") != "sha256":
            raise _Reject(400, "only sha256 uploads are supported")
        transfers = body.get("transfers", ["basic"])
        base = self.server.url
        objects, chosen = [], "basic"
        for obj in body["objects"]:
            oid, size = obj["oid"], obj["size"]
            entry = {"oid": oid, "size": size}
            if oid not in self.server.state.lfs:
                verify = {"href": f"{base}/lfs/{oid}/verify"}
                if size > LFS_CHUNK and "multipart" in transfers:
                    chosen = "multipart"
                    parts = -(-size // LFS_CHUNK)
                    header = {"chunk_size": str(LFS_CHUNK)} | {
                        str(n): f"{base}/lfs/{oid}/part/{n}" for n in range(1, parts + 1)}
                    entry["actions"] = {"upload": {"href": f"{base}/lfs/{oid}/complete", "header": header},
                                        "verify": verify}
                else:
                    entry["actions"] = {"upload": {"href": f"{base}/lfs/{oid}"}, "verify": verify}
            objects.append(entry)
        self._send(200, {"transfer": chosen, "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _held(self, oid: str) -> None:
        hold = self.server.state.hold
        if hold is not None and hold.oid == oid:
            hold.reached.set()
            hold.release.wait(SOCKET_TIMEOUT)

    def lfs_put(self, oid: str) -> None:
        self._held(oid)
        self._store(oid, self._body())
        self._send(200, {})

    def lfs_part(self, oid: str, n: str) -> None:
        if n == "1":
            self._held(oid)
        data = self._body()
        with self.server.state.lock:
            self.server.state.parts.setdefault(oid, {})[int(n)] = data
        self._send(200, {}, {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    def lfs_complete(self, oid: str) -> None:
        body = self._json()
        parts = self.server.state.parts.pop(oid, {})
        numbers = [p["partNumber"] for p in body["parts"]]
        if body.get("oid") != oid or numbers != list(range(1, len(parts) + 1)):
            raise _Reject(400, "completion does not list every uploaded part in order")
        for p in body["parts"]:
            if p["etag"] != f'"{hashlib.md5(parts[p["partNumber"]]).hexdigest()}"':
                raise _Reject(400, f"part {p['partNumber']}: etag mismatch")
        self._store(oid, b"".join(parts[n] for n in numbers))
        self._send(200, {})

    def _store(self, oid: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != oid:
            raise _Reject(400, "uploaded bytes do not match the oid")
        with self.server.state.lock:
            self.server.state.lfs[oid] = data
            self.server.state.stored[oid] += 1

    def lfs_verify(self, oid: str) -> None:
        self._auth()
        body = self._json()
        data = self.server.state.lfs.get(oid)
        if data is None or body.get("oid") != oid or body.get("size") != len(data):
            raise _Reject(404, "object not found or size mismatch")
        with self.server.state.lock:
            self.server.state.verified[oid] += 1
        self._send(200, {})

    def commit(self, repo: str, rev: str) -> None:
        self._auth()
        r = self._repo(repo)
        branch = self._branch(r, rev)
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _Reject(400, "the first NDJSON line must be the header")
        header = lines[0]["value"]
        state = self.server.state
        with state.lock:
            head = r.head(branch)
            if header.get("parentCommit") not in (None, head.oid):
                raise _Reject(412, "parentCommit is not the head of the branch")
            files, lfs_paths = dict(head.files), set(head.lfs_paths)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise _Reject(400, "file content must be base64")
                    files[value["path"]] = base64.b64decode(value["content"])
                    lfs_paths.discard(value["path"])
                elif key == "lfsFile":
                    data = state.lfs.get(value["oid"])
                    if value.get("algo") != "sha256" or data is None or len(data) != value["size"]:
                        raise _Reject(422, f"{value['path']}: LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = data
                    lfs_paths.add(value["path"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                    lfs_paths.discard(value["path"])
                else:
                    raise _Reject(400, f"the stand-in Hub does not handle {key!r} commit lines")
            commit = _add_commit(r, branch, header["summary"], header.get("description", ""), files,
                                 frozenset(lfs_paths))
        self._send(200, {"commitUrl": f"{self.server.url}/{r.repo_id}/commit/{commit.oid}",
                         "commitOid": commit.oid, "pullRequestUrl": None})


def _add_commit(repo: Repo, branch: str, summary: str, description: str, files: dict[str, bytes],
                lfs_paths: frozenset[str]) -> Commit:
    parent = repo.branches.get(branch)
    digest = hashlib.sha1(json.dumps([parent, summary, sorted((p, hashlib.sha256(d).hexdigest())
                                                              for p, d in files.items())]).encode()).hexdigest()
    commit = Commit(digest, parent, summary, description, files, lfs_paths)
    repo.commits[digest] = commit
    repo.branches[branch] = digest
    return commit


def validate_card_metadata(content: str) -> tuple[list[str], list[str]]:
    """(errors, warnings) for a README.md, the checks the Hub makes that matter here: YAML front matter that parses to
    a mapping, string/list types of the keys the Hub indexes, and base_model_relation only next to a base_model."""
    m = re.match(r"\A---\n(.*?)\n---\n", content, re.DOTALL)
    if not m:
        return [], ["empty or missing yaml metadata in repo card"]
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError as e:
        return [f"YAML does not parse: {e}"], []
    if not isinstance(meta, dict) or not meta:
        return [], ["empty or missing yaml metadata in repo card"]
    errors = []
    for key in ("license", "library_name", "pipeline_tag", "base_model_relation"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f'"{key}" must be a string')
    for key in ("tags", "base_model"):
        value = meta.get(key)
        if value is not None and not (isinstance(value, str) or
                                      (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            errors.append(f'"{key}" must be a string or a list of strings')
    if meta.get("base_model_relation") not in (None, "adapter", "merge", "quantized", "finetune"):
        errors.append('"base_model_relation" must be one of adapter, merge, quantized, finetune')
    if "base_model_relation" in meta and "base_model" not in meta:
        errors.append('"base_model_relation" needs "base_model"')
    return errors, []


ROUTES = (
    ("GET", re.compile(r"/api/agent-harnesses"), _Handler.agent_harnesses),
    ("GET", re.compile(r"/api/whoami-v2"), _Handler.whoami),
    ("POST", re.compile(r"/api/repos/create"), _Handler.create_repo),
    ("POST", re.compile(r"/api/validate-yaml"), _Handler.validate_yaml),
    ("GET", re.compile(rf"/api/models/{_REPO}"), _Handler.repo_info),
    ("GET", re.compile(rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)"), _Handler.repo_info),
    ("POST", re.compile(rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)"), _Handler.create_branch),
    ("POST", re.compile(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)"), _Handler.preupload),
    ("POST", re.compile(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)"), _Handler.commit),
    ("POST", re.compile(rf"/{_REPO}\.git/info/lfs/objects/batch"), _Handler.lfs_batch),
    ("PUT", re.compile(r"/lfs/(?P<oid>[0-9a-f]{64})"), _Handler.lfs_put),
    ("PUT", re.compile(r"/lfs/(?P<oid>[0-9a-f]{64})/part/(?P<n>\d+)"), _Handler.lfs_part),
    ("POST", re.compile(r"/lfs/(?P<oid>[0-9a-f]{64})/complete"), _Handler.lfs_complete),
    ("POST", re.compile(r"/lfs/(?P<oid>[0-9a-f]{64})/verify"), _Handler.lfs_verify),
)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState
    url: str

    def handle_error(self, request, client_address) -> None:
        # A client killed mid-request breaks its connection; record it for the test instead of printing a traceback.
        with self.state.lock:
            self.state.errors.append(traceback.format_exc(limit=1))


class HubServer:
    """`with HubServer(token) as hub:` serves on http://127.0.0.1:<free port> until the block ends."""

    def __init__(self, token: str):
        self.state = HubState(token)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = self.state
        self.url = self._server.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.state.hold is not None:
            self.state.hold.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=SOCKET_TIMEOUT)


# ---------------------------------------------------------------------------------------------------------------
# A finished run's folder, for test_hub.py and test_model_card.py (a test module cannot import the conftest).


@dataclass(frozen=True)
class _Pass:
    name: str
    source: str
    samples: int
    tokens: int


@dataclass(frozen=True)
class _Calibration:
    content_hash: str
    passes: tuple[_Pass, ...]

    @property
    def num_samples(self) -> int:
        return sum(p.samples for p in self.passes)

    @property
    def num_tokens(self) -> int:
        return sum(p.tokens for p in self.passes)

    def __len__(self) -> int:
        return 7


CALIBRATION = _Calibration("c0ffee" * 10 + "abcd", (_Pass("agentic", "builtin agentic", 8, 2039),
                                                      _Pass("code", "builtin code", 12, 1617)))


def finished_run(export: Path, source: Path, dst: Path, recipe: str = "tiny-glm47-nvfp4",
                 errors: dict[str, tuple[str, float]] | None = None) -> Path:
    """A copy of a correct export with the report.json and recipe.yaml that `quantize run` writes, made by the report
    stage's own functions: the doctor's verdict and (unless `errors` is given) the weight errors are real, computed on
    these files; the calibration, engine and timing numbers are distinctive stand-ins."""
    from types import SimpleNamespace

    from sm120_quant.exporters.check import check_checkpoint
    from sm120_quant.exporters.checkpoint import Checkpoint
    from sm120_quant.quantize.model import QuantizedModel
    from sm120_quant.recipes.load import load_recipe
    from sm120_quant.report import RunStats, build_report, write_report
    from sm120_quant.verify.reader import weight_errors

    shutil.copytree(export, dst)
    loaded = load_recipe(recipe)
    quantized = QuantizedModel(
        model=None, tokenizer=None, source=None, engine=loaded.recipe.engine, scheme=loaded.recipe.scheme,
        expanded_modules=["model.layers.1.mlp.experts", "model.layers.2.mlp.experts"], quantizers_enabled=213,
        quantizers_total=331, coverage={"experts_seen": 23, "experts_total": 24},
        timings={"calibrate": 12.5}, notes=["a note from the engine"])
    stats = RunStats(seconds={"load": 1.25, "quantize": 33.75}, peak_rss={"load": 123_456_789})
    report = build_report(loaded, SimpleNamespace(folder=source), CALIBRATION, quantized,
                          Checkpoint(dst, "modelopt"), check_checkpoint(dst, deep=True),
                          weight_errors(source, dst) if errors is None else errors, stats)
    write_report(report, dst, loaded)
    return dst


def edit_report(folder: Path, **changes) -> dict:
    """Set top-level keys of report.json (None deletes one); returns the new report."""
    path = folder / "report.json"
    report = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            report.pop(key, None)
        else:
            report[key] = value
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report
