"""Run vLLM as a child process in its own process group: start, wait for ready (bounded), stop the whole group."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from sm120_quant.errors import CheckFailed
from sm120_quant.serve.http import Client
from sm120_quant.serve.profiles import ServeCommand

# vLLM wraps the root cause in generic errors; these lines say nothing about why it failed.
_GENERIC_ERRORS = ("Engine core initialization failed", "EngineCore failed to start", "See root cause above")
_ERROR_LINE = re.compile(r"\b([A-Z][A-Za-z]*(?:Error|Exception)): (.+)$")
_NOT_AN_ERROR = re.compile(r"\b(?:WARNING|INFO|DEBUG)\b")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def root_error(log_text: str) -> str | None:
    """The first specific `SomeError: message` in a vLLM log (the root cause, not the wrappers around it)."""
    specific = []
    for line in log_text.splitlines():
        m = _ERROR_LINE.search(line)
        # vLLM's WARNING/INFO lines quote error names too ("fd limit errors like `OSError: ...`").
        if m and not _NOT_AN_ERROR.search(line) and not any(g in line for g in _GENERIC_ERRORS):
            specific.append(f"{m[1]}: {m[2].strip()}")
    return specific[0] if specific else None


class VllmServer:
    """One vLLM server process; use as a context manager so the process group always ends."""

    def __init__(self, command: ServeCommand, log_path: Path):
        self.command = command
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        env = {**os.environ, **self.command.env}
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            list(self.command.argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        log.close()

    def wait_ready(self, client: Client, timeout_s: float) -> float:
        """Seconds until /health answered 200; CheckFailed with vLLM's own error if it exits or the time runs out."""
        assert self.proc is not None, "start() first"
        deadline = self.started_at + timeout_s
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
                cause = root_error(text) or "no error line in the log"
                raise CheckFailed(
                    f"vLLM exited with code {rc} before it was ready: {cause}\n--- last lines of {self.log_path} ---\n"
                    + log_tail(self.log_path)
                )
            try:
                if client.request("GET", "/health").status == 200:
                    return time.monotonic() - self.started_at
            except OSError:
                pass
            time.sleep(0.5)
        raise CheckFailed(
            f"vLLM was not ready within {timeout_s:.0f} s\n--- last lines of {self.log_path} ---\n"
            + log_tail(self.log_path)
        )

    def stop(self, grace_s: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=grace_s)
        # Workers vLLM spawned stay in the group after the API server exits; end them too.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> VllmServer:  # noqa: PYI034
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
