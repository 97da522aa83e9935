"""A small HTTP client for the vLLM server (stdlib only): JSON requests and server-sent-event streams, all bounded."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Response:
    status: int
    body: Any  # parsed JSON, or the raw text when the body is not JSON
    elapsed_s: float


@dataclass(frozen=True)
class SseEvent:
    event: str | None
    data: Any  # parsed JSON, or the raw string ("[DONE]")
    at_s: float  # seconds since the request was sent


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 120.0):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
            self.headers["x-api-key"] = api_key

    def _open(self, method: str, path: str, body: dict | None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=self.headers)
        return urllib.request.urlopen(req, timeout=self.timeout_s)

    def request(self, method: str, path: str, body: dict | None = None) -> Response:
        import time

        t0 = time.perf_counter()
        try:
            with self._open(method, path, body) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        text = raw.decode("utf-8", "replace")
        try:
            parsed: Any = json.loads(text)
        except json.JSONDecodeError:
            parsed = text
        return Response(status, parsed, time.perf_counter() - t0)

    def stream(self, path: str, body: dict) -> tuple[int, list[SseEvent], Any]:
        """POST and read an SSE stream to its end: (status, events, error body if the status is not 200)."""
        import time

        t0 = time.perf_counter()
        try:
            resp = self._open("POST", path, body)
        except urllib.error.HTTPError as e:
            raw = e.read().decode("utf-8", "replace")
            try:
                return e.code, [], json.loads(raw)
            except json.JSONDecodeError:
                return e.code, [], raw
        events: list[SseEvent] = []
        event_name: str | None = None
        with resp:
            for raw_line in resp:
                line = raw_line.decode("utf-8", "replace").rstrip("\r\n")
                if line.startswith("event:"):
                    event_name = line[len("event:") :].strip()
                elif line.startswith("data:"):
                    payload = line[len("data:") :].strip()
                    try:
                        data: Any = json.loads(payload)
                    except json.JSONDecodeError:
                        data = payload
                    events.append(SseEvent(event_name, data, time.perf_counter() - t0))
                    event_name = None
        return resp.status, events, None
