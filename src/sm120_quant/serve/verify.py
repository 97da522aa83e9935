"""`serve verify`: prove that a vLLM server serves a checkpoint correctly, over HTTP only.

Endpoints (/v1/models, chat non-stream and stream, /v1/completions), greedy-output sanity, tool calls through the GLM
parser (OpenAI chat and Anthropic /v1/messages, stream and not, plus the round trip with the tool result), reasoning
routed out of the content, the server log grepped for the known-bad lines and the chosen backends, and throughput.

A model that does not call the tool by itself (a random-weight test model) gets a crafted completion: a named
tool_choice makes the server's grammar start the GLM-4.7 call, and a logit bias on the `<tool_call>` / `</tool_call>`
tokens makes the model spell them as the tokens a trained GLM emits, so the server's tool parser sees a real call.
The report says which way each tool check was exercised.
"""

from __future__ import annotations

import enum
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sm120_quant.errors import CheckFailed
from sm120_quant.serve.http import Client, Response, SseEvent
from sm120_quant.serve.profiles import ServeCommand
from sm120_quant.serve.server import VllmServer

PROBE_TOOL = "sm120_quant_probe"
PROBE_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris"]}},
    "required": ["city"],
}
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "description": "City name"}},
    "required": ["city"],
}
WEATHER_PROMPT = "What is the weather in Paris right now? Use the get_weather tool."
CHAT_PROMPT = "Write one short sentence about the sea."
COMPLETION_PROMPT = "The capital of France is"
NO_THINKING = {"enable_thinking": False}

# Lines vLLM logs when a checkpoint loads but will compute the wrong thing (serving-runtimes.md sections 1, 2 and 7).
BAD_LOG_LINES: tuple[tuple[str, str, str], ...] = (
    (
        "w1_weight_scale_2 must match",
        r"w1_weight_scale_2 must match w3_weight_scale_2",
        "gate/up of an NVFP4 expert have different global scales; vLLM uses the gate's, the up half is mis-scaled",
    ),
    (
        "global scale differs",
        r"global scale for input or weight are different",
        "fused q/k/v or gate/up shards have different NVFP4 global scales; vLLM takes the max without rescaling",
    ),
    (
        "KV scale 1.0",
        r"Using KV cache scaling factor 1\.0",
        "an FP8 KV cache runs with uncalibrated scale 1.0 because the checkpoint's k/v scales did not load",
    ),
    (
        "k/v scale not loaded",
        r"Found (?:k|v|kv|q)_scale in the checkpoint.*not loaded",
        "the checkpoint's KV scales have names the model does not know; they were dropped",
    ),
    (
        "no native FP4",
        r"does not have native support for FP4",
        "this GPU runs NVFP4 as weight-only Marlin, not as native FP4 GEMMs",
    ),
)
BACKEND_LINE = re.compile(
    r"(Using '?\w+'? [\w ]*?(?:MoE )?backend.*|Using \S+ backend\.?$|Selected \w+ for \w+.*|Using \w+(?:Kernel|Experts)\b.*)"
)


class Status(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VerifyOptions:
    max_tokens: int = 32
    tool_max_tokens: int = 96
    request_timeout_s: float = 120.0
    ready_timeout_s: float = 600.0
    concurrency: int = 4
    throughput_tokens: int = 64
    random_weights: bool = False
    api_key: str | None = None


@dataclass(frozen=True)
class VerifyReport:
    url: str
    model: str
    checks: tuple[Check, ...]
    startup_s: float | None = None
    log_path: str | None = None

    @property
    def passed(self) -> bool:
        return all(c.status is not Status.FAIL for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status is Status.FAIL]

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "model": self.model,
            "passed": self.passed,
            "startup_s": self.startup_s,
            "log_path": self.log_path,
            "checks": [
                {"name": c.name, "status": c.status.value, "detail": c.detail, "data": c.data} for c in self.checks
            ],
        }


# -- helpers --------------------------------------------------------------------------------------------------------------


def _message(resp: Response) -> dict[str, Any]:
    return resp.body["choices"][0]["message"]


def _reasoning(msg: dict[str, Any]) -> str:
    # vLLM renamed reasoning_content to reasoning; accept either.
    return msg.get("reasoning") or msg.get("reasoning_content") or ""


def _http_error(resp: Response) -> str:
    body = resp.body if isinstance(resp.body, str) else json.dumps(resp.body)[:300]
    return f"HTTP {resp.status}: {body}"


def _chat_stream_text(events: list[SseEvent]) -> tuple[str, str, list[dict], bool]:
    """(content, reasoning, tool-call deltas, saw [DONE]) from OpenAI chat SSE events."""
    content, reasoning, tools, done = [], [], [], False
    for ev in events:
        if ev.data == "[DONE]":
            done = True
            continue
        if not isinstance(ev.data, dict) or not ev.data.get("choices"):
            continue
        delta = ev.data["choices"][0].get("delta") or {}
        content.append(delta.get("content") or "")
        reasoning.append(delta.get("reasoning") or delta.get("reasoning_content") or "")
        tools.extend(delta.get("tool_calls") or [])
    return "".join(content), "".join(reasoning), tools, done


def repetition_ratio(text: str, n: int = 4) -> float:
    """Share of word n-grams that repeat an earlier one (0 = none); degenerate greedy loops score near 1."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 4:
        return 0.0
    counts = Counter(grams)
    return sum(c - 1 for c in counts.values()) / len(grams)


def grep_log(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(known-bad findings, backend selection lines) in a vLLM server log."""
    findings = []
    for name, pattern, why in BAD_LOG_LINES:
        hits = [line.strip() for line in text.splitlines() if re.search(pattern, line)]
        if hits:
            findings.append({"name": name, "why": why, "count": len(hits), "first": hits[0][-300:]})
    backends: list[str] = []
    for line in text.splitlines():
        m = BACKEND_LINE.search(line)
        if m and m[1].strip() not in backends:
            backends.append(m[1].strip())
    return findings, backends


class Verifier:
    """Runs every check against one server; each check returns a Check and never raises for a bad answer."""

    def __init__(self, client: Client, model: str, opts: VerifyOptions):
        self.client = client
        self.model = model
        self.opts = opts
        self.outputs: dict[str, str] = {}
        self._token_ids: dict[str, int | None] = {}

    # -- plumbing
    def chat(self, messages: list[dict], **extra: Any) -> Response:
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.opts.max_tokens}
        return self.client.request("POST", "/v1/chat/completions", {**body, **extra})

    def chat_stream(self, messages: list[dict], **extra: Any) -> tuple[int, list[SseEvent], Any]:
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.opts.max_tokens}
        return self.client.stream("/v1/chat/completions", {**body, **extra, "stream": True})

    def messages(self, messages: list[dict], **extra: Any) -> Response:
        body = {"model": self.model, "messages": messages, "max_tokens": self.opts.max_tokens, "temperature": 0}
        return self.client.request("POST", "/v1/messages", {**body, **extra})

    def messages_stream(self, messages: list[dict], **extra: Any) -> tuple[int, list[SseEvent], Any]:
        body = {"model": self.model, "messages": messages, "max_tokens": self.opts.max_tokens, "temperature": 0}
        return self.client.stream("/v1/messages", {**body, **extra, "stream": True})

    def single_token(self, text: str) -> int | None:
        """The id of `text` if the tokenizer has it as one token (GLM's <tool_call>), via the server's /tokenize."""
        if text not in self._token_ids:
            resp = self.client.request(
                "POST", "/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False}
            )
            tokens = resp.body.get("tokens") if resp.status == 200 and isinstance(resp.body, dict) else None
            self._token_ids[text] = tokens[0] if tokens and len(tokens) == 1 else None
        return self._token_ids[text]

    def detokenize(self, tokens: list[int]) -> str | None:
        resp = self.client.request("POST", "/detokenize", {"model": self.model, "tokens": tokens})
        return resp.body.get("prompt") if resp.status == 200 and isinstance(resp.body, dict) else None

    def crafted_bias(self) -> dict[str, int]:
        ids = [self.single_token("<tool_call>"), self.single_token("</tool_call>")]
        return {str(i): 100 for i in ids if i is not None}

    # -- endpoint checks
    def check_models(self) -> Check:
        resp = self.client.request("GET", "/v1/models")
        if resp.status != 200:
            return Check("models", Status.FAIL, _http_error(resp))
        ids = [m["id"] for m in resp.body.get("data", [])]
        if self.model not in ids:
            return Check("models", Status.FAIL, f"{self.model!r} is not among the served models {ids}")
        entry = next(m for m in resp.body["data"] if m["id"] == self.model)
        return Check("models", Status.PASS, f"serves {ids}", {"max_model_len": entry.get("max_model_len")})

    def check_chat(self) -> Check:
        resp = self.chat([{"role": "user", "content": CHAT_PROMPT}])
        if resp.status != 200:
            return Check("chat", Status.FAIL, _http_error(resp))
        msg = _message(resp)
        text = (msg.get("content") or "") + _reasoning(msg)
        self.outputs["chat"] = text
        usage = resp.body.get("usage", {})
        if not text.strip():
            return Check("chat", Status.FAIL, "empty output (neither content nor reasoning)", {"usage": usage})
        return Check(
            "chat",
            Status.PASS,
            f"{usage.get('completion_tokens')} tokens in {resp.elapsed_s:.2f} s",
            {"finish_reason": resp.body["choices"][0].get("finish_reason"), "usage": usage},
        )

    def check_chat_stream(self) -> Check:
        status, events, err = self.chat_stream([{"role": "user", "content": CHAT_PROMPT}])
        if status != 200:
            return Check("chat_stream", Status.FAIL, f"HTTP {status}: {err}")
        content, reasoning, _, done = _chat_stream_text(events)
        text = content + reasoning
        self.outputs["chat_stream"] = text
        if not done:
            return Check("chat_stream", Status.FAIL, f"{len(events)} events and no [DONE]")
        first = next((e.at_s for e in events if isinstance(e.data, dict) and e.data.get("choices")), None)
        data = {"events": len(events), "first_event_s": first}
        if "chat" in self.outputs and text != self.outputs["chat"]:
            return Check(
                "chat_stream",
                Status.FAIL,
                "greedy stream differs from the non-stream answer to the same request",
                {**data, "stream": text[:200], "non_stream": self.outputs["chat"][:200]},
            )
        return Check("chat_stream", Status.PASS, f"{len(events)} events, same text as non-stream", data)

    def check_completions(self) -> Check:
        body = {"model": self.model, "prompt": COMPLETION_PROMPT, "max_tokens": self.opts.max_tokens, "temperature": 0}
        resp = self.client.request("POST", "/v1/completions", body)
        if resp.status != 200:
            return Check("completions", Status.FAIL, _http_error(resp))
        text = resp.body["choices"][0]["text"]
        self.outputs["completions"] = text
        if not text.strip():
            return Check("completions", Status.FAIL, "empty completion")
        return Check(
            "completions", Status.PASS, f"{resp.body['usage']['completion_tokens']} tokens", {"text": text[:200]}
        )

    # -- output sanity
    def sanity_checks(self) -> list[Check]:
        texts = {k: v for k, v in self.outputs.items() if k in ("chat", "chat_stream", "completions")}
        joined = "\n".join(texts.values())
        trained_only = "needs a trained model; --random-weights marks this checkpoint as untrained"
        checks = []
        nan = [k for k, v in texts.items() if "!!!!" in v]
        checks.append(
            Check(
                "nan_signature",
                Status.FAIL if nan else Status.PASS,
                f"'!!!!' (NaN logits) in {nan}" if nan else "no '!!!!' run",
                {"outputs": nan},
            )
        )
        empty = [k for k, v in texts.items() if not v.strip()]
        checks.append(
            Check(
                "empty_output",
                Status.FAIL if empty else Status.PASS,
                f"empty: {empty}" if empty else "every greedy output has text",
            )
        )
        fffd = joined.count("\ufffd")
        status = Status.SKIP if self.opts.random_weights else (Status.FAIL if fffd else Status.PASS)
        checks.append(
            Check(
                "replacement_char",
                status,
                (f"{fffd} U+FFFD" if fffd else "no U+FFFD")
                + (f" ({trained_only})" if self.opts.random_weights else ""),
                {"count": fffd},
            )
        )
        ratio = max((repetition_ratio(v) for v in texts.values()), default=0.0)
        status = Status.SKIP if self.opts.random_weights else (Status.FAIL if ratio > 0.5 else Status.PASS)
        checks.append(
            Check(
                "repetition",
                status,
                f"repeated 4-gram share {ratio:.2f}" + (f" ({trained_only})" if self.opts.random_weights else ""),
                {"ratio": round(ratio, 3)},
            )
        )
        if self.opts.random_weights:
            checks.append(Check("known_answer", Status.SKIP, trained_only))
        else:
            text = self.outputs.get("completions", "")
            ok = "paris" in text.lower()
            checks.append(
                Check(
                    "known_answer",
                    Status.PASS if ok else Status.FAIL,
                    f"{COMPLETION_PROMPT!r} -> {text[:60]!r}",
                    {"text": text[:200]},
                )
            )
        return checks

    # -- reasoning
    def check_reasoning(self) -> Check:
        on = self.chat([{"role": "user", "content": CHAT_PROMPT}])
        off = self.chat([{"role": "user", "content": CHAT_PROMPT}], chat_template_kwargs=NO_THINKING)
        a_on = self.messages([{"role": "user", "content": CHAT_PROMPT}])
        a_off = self.messages([{"role": "user", "content": CHAT_PROMPT}], thinking={"type": "disabled"})
        bad = [
            (n, r)
            for n, r in (
                ("chat", on),
                ("chat without thinking", off),
                ("messages", a_on),
                ("messages without thinking", a_off),
            )
            if r.status != 200
        ]
        if bad:
            return Check("reasoning", Status.FAIL, "; ".join(f"{n}: {_http_error(r)}" for n, r in bad))
        problems = []
        m_on, m_off = _message(on), _message(off)
        if not _reasoning(m_on):
            problems.append("chat: no reasoning field with thinking on")
        if "<think>" in (m_on.get("content") or "") or "</think>" in (m_on.get("content") or ""):
            problems.append("chat: think tags leaked into content")
        if not (m_off.get("content") or "").strip() or _reasoning(m_off):
            problems.append("chat without thinking: expected content and no reasoning")
        kinds_on = [b["type"] for b in a_on.body.get("content", [])]
        kinds_off = [b["type"] for b in a_off.body.get("content", [])]
        if "thinking" not in kinds_on:
            problems.append(f"messages: no thinking block (blocks {kinds_on})")
        if "thinking" in kinds_off or "text" not in kinds_off:
            problems.append(f"messages without thinking: blocks {kinds_off}")
        _, events, _ = self.chat_stream([{"role": "user", "content": CHAT_PROMPT}])
        _, s_reasoning, _, _ = _chat_stream_text(events)
        if not s_reasoning:
            problems.append("chat stream: no reasoning deltas")
        data = {
            "chat_reasoning_chars": len(_reasoning(m_on)),
            "messages_blocks": kinds_on,
            "messages_blocks_without_thinking": kinds_off,
        }
        if problems:
            return Check("reasoning", Status.FAIL, "; ".join(problems), data)
        return Check(
            "reasoning",
            Status.PASS,
            "thinking goes to reasoning / thinking blocks, content stays clean; off gives content",
            data,
        )

    # -- tool calls, OpenAI chat
    def _chat_tool_call(self, stream: bool) -> tuple[dict | None, str, dict]:
        """Try the model on its own, then a crafted call: (call {name, arguments}, mode, data)."""
        weather = [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather for a city",
                    "parameters": WEATHER_SCHEMA,
                },
            }
        ]
        msgs = [{"role": "user", "content": WEATHER_PROMPT}]
        attempts = [
            ("model", {"tools": weather, "tool_choice": "auto", "max_tokens": self.opts.tool_max_tokens}),
            (
                "crafted",
                {
                    "tools": [
                        {
                            "type": "function",
                            "function": {"name": PROBE_TOOL, "description": "probe", "parameters": PROBE_SCHEMA},
                        }
                    ],
                    "tool_choice": {"type": "function", "function": {"name": PROBE_TOOL}},
                    "chat_template_kwargs": NO_THINKING,
                    "logit_bias": self.crafted_bias(),
                    "max_tokens": self.opts.tool_max_tokens,
                    "return_token_ids": True,
                },
            ),
        ]
        data: dict[str, Any] = {}
        for mode, extra in attempts:
            if stream:
                status, events, err = self.chat_stream(msgs, **extra)
                if status != 200:
                    data[mode] = f"HTTP {status}: {err}"
                    continue
                _, _, deltas, _ = _chat_stream_text(events)
                named = [d for d in deltas if (d.get("function") or {}).get("name")]
                if named:
                    args = "".join((d.get("function") or {}).get("arguments") or "" for d in deltas)
                    call = {"id": named[0].get("id"), "name": named[0]["function"]["name"], "arguments": args}
                    return call, mode, data
                data[mode] = "no tool_calls delta"
            else:
                resp = self.chat(msgs, **extra)
                if resp.status != 200:
                    data[mode] = _http_error(resp)
                    continue
                calls = _message(resp).get("tool_calls") or []
                if calls:
                    call = {"id": calls[0]["id"], **calls[0]["function"]}
                    ids = resp.body["choices"][0].get("token_ids")
                    if ids:
                        data["raw"] = self.detokenize(ids)
                    return call, mode, data
                data[mode] = "no tool_calls"
        return None, "none", data

    def _judge_call(self, name: str, call: dict | None, mode: str, data: dict) -> Check:
        if call is None:
            return Check(name, Status.FAIL, f"no tool call, not even a crafted one: {data}", data)
        want = "get_weather" if mode == "model" else PROBE_TOOL
        try:
            args = json.loads(call["arguments"] or "{}")
        except json.JSONDecodeError:
            return Check(name, Status.FAIL, f"arguments are not JSON: {call['arguments']!r}", data)
        data = {**data, "mode": mode, "call": {"name": call["name"], "arguments": args}}
        if call["name"] != want or not isinstance(args, dict):
            return Check(name, Status.FAIL, f"expected a call of {want} with an object, got {call}", data)
        if mode == "model":
            return Check(name, Status.PASS, f"the model called {want}({json.dumps(args)})", data)
        raw = data.get("raw")
        if raw is not None and not raw.lstrip().startswith(f"<tool_call>{PROBE_TOOL}"):
            return Check(name, Status.FAIL, f"crafted completion is not GLM-4.7 tool-call text: {raw[:120]!r}", data)
        how = f" from {raw[:80]!r}" if raw else ""
        return Check(
            name,
            Status.PASS,
            f"exercised through the server's tool parser on a crafted completion{how} (the model made no call)",
            data,
        )

    def check_tool_chat(self) -> Check:
        call, mode, data = self._chat_tool_call(stream=False)
        check = self._judge_call("tool_call_chat", call, mode, data)
        if check.status is not Status.PASS:
            return check
        # Round trip: the assistant's call and the tool's result go back; the template must render both.
        tool_msgs = [
            {"role": "user", "content": WEATHER_PROMPT},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call["id"],
                        "type": "function",
                        "function": {"name": call["name"], "arguments": call["arguments"]},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"},
        ]
        resp = self.chat(tool_msgs)
        if resp.status != 200:
            return Check(
                "tool_call_chat", Status.FAIL, f"round trip with the tool result: {_http_error(resp)}", check.data
            )
        rendered = self.client.request("POST", "/tokenize", {"model": self.model, "messages": tool_msgs})
        data = dict(check.data)
        if rendered.status == 200 and isinstance(rendered.body, dict):
            prompt = self.detokenize(rendered.body["tokens"]) or ""
            data["rendered_tail"] = prompt[-200:]
            if "sunny, 21 C" not in prompt:
                return Check("tool_call_chat", Status.FAIL, "the tool result is missing from the rendered prompt", data)
        return Check("tool_call_chat", Status.PASS, check.detail + "; round trip with the tool result answered", data)

    def check_tool_chat_stream(self) -> Check:
        call, mode, data = self._chat_tool_call(stream=True)
        return self._judge_call("tool_call_chat_stream", call, mode, data)

    # -- tool calls, Anthropic /v1/messages
    def _messages_tools(self, crafted: bool) -> dict[str, Any]:
        if crafted:
            return {
                "tools": [{"name": PROBE_TOOL, "description": "probe", "input_schema": PROBE_SCHEMA}],
                "tool_choice": {"type": "tool", "name": PROBE_TOOL},
                "thinking": {"type": "disabled"},
                "max_tokens": self.opts.tool_max_tokens,
            }
        return {
            "tools": [
                {"name": "get_weather", "description": "Current weather for a city", "input_schema": WEATHER_SCHEMA}
            ],
            "tool_choice": {"type": "auto"},
            "max_tokens": self.opts.tool_max_tokens,
        }

    def check_tool_messages(self) -> Check:
        msgs = [{"role": "user", "content": WEATHER_PROMPT}]
        data: dict[str, Any] = {}
        for mode, crafted in (("model", False), ("crafted", True)):
            resp = self.messages(msgs, **self._messages_tools(crafted))
            if resp.status != 200:
                data[mode] = _http_error(resp)
                continue
            uses = [b for b in resp.body.get("content", []) if b["type"] == "tool_use"]
            if not uses:
                data[mode] = f"blocks {[b['type'] for b in resp.body.get('content', [])]}"
                continue
            block = uses[0]
            check = self._judge_call(
                "tool_call_messages",
                {"id": block["id"], "name": block["name"], "arguments": json.dumps(block["input"])},
                mode,
                data,
            )
            if check.status is not Status.PASS:
                return check
            history = msgs + [
                {"role": "assistant", "content": [block]},
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": block["id"], "content": "sunny, 21 C"}],
                },
            ]
            again = self.messages(history)
            if again.status != 200:
                return Check(
                    "tool_call_messages", Status.FAIL, f"round trip with tool_result: {_http_error(again)}", check.data
                )
            return Check(
                "tool_call_messages", Status.PASS, check.detail + "; round trip with tool_result answered", check.data
            )
        return Check("tool_call_messages", Status.FAIL, f"no tool_use block, not even a crafted one: {data}", data)

    def check_tool_messages_stream(self) -> Check:
        msgs = [{"role": "user", "content": WEATHER_PROMPT}]
        data: dict[str, Any] = {}
        for mode, crafted in (("model", False), ("crafted", True)):
            status, events, err = self.messages_stream(msgs, **self._messages_tools(crafted))
            if status != 200:
                data[mode] = f"HTTP {status}: {err}"
                continue
            starts = [
                e.data["content_block"]
                for e in events
                if isinstance(e.data, dict) and e.data.get("type") == "content_block_start"
            ]
            uses = [b for b in starts if b.get("type") == "tool_use"]
            if not uses:
                data[mode] = f"blocks {[b.get('type') for b in starts]}"
                continue
            args = "".join(
                e.data["delta"].get("partial_json", "")
                for e in events
                if isinstance(e.data, dict)
                and e.data.get("type") == "content_block_delta"
                and e.data["delta"].get("type") == "input_json_delta"
            )
            return self._judge_call(
                "tool_call_messages_stream",
                {"id": uses[0]["id"], "name": uses[0]["name"], "arguments": args or "{}"},
                mode,
                data,
            )
        if self.opts.random_weights:
            # /v1/messages has no logit_bias, so nothing makes an untrained model spell <tool_call> as the one token
            # the streaming parser waits for; the non-stream check above covers the parser on this endpoint.
            return Check(
                "tool_call_messages_stream",
                Status.SKIP,
                "not exercised: the untrained model spells <tool_call> in pieces and /v1/messages takes no "
                f"logit_bias to craft it ({data})",
                data,
            )
        return Check("tool_call_messages_stream", Status.FAIL, f"no tool_use block in the stream: {data}", data)

    # -- throughput
    def check_throughput(self) -> Check:
        n, tokens = self.opts.concurrency, self.opts.throughput_tokens
        body = {
            "model": self.model,
            "prompt": COMPLETION_PROMPT,
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
        }

        def one(_: int) -> Response:
            return self.client.request("POST", "/v1/completions", body)

        t0 = time.perf_counter()
        sequential = [one(i) for i in range(n)]
        t_seq = time.perf_counter() - t0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=n) as pool:
            parallel = list(pool.map(one, range(n)))
        t_par = time.perf_counter() - t0
        bad = [r for r in sequential + parallel if r.status != 200]
        if bad:
            return Check("throughput", Status.FAIL, _http_error(bad[0]))
        counts = [r.body["usage"]["completion_tokens"] for r in sequential + parallel]
        data = {
            "requests": n,
            "tokens_per_request": tokens,
            "sequential_tok_s": round(sum(counts[:n]) / t_seq, 1),
            "parallel_tok_s": round(sum(counts[n:]) / t_par, 1),
            "sequential_s": round(t_seq, 2),
            "parallel_s": round(t_par, 2),
        }
        data["speedup"] = round(data["parallel_tok_s"] / data["sequential_tok_s"], 2)
        if any(c != tokens for c in counts):
            return Check(
                "throughput", Status.FAIL, f"expected {tokens} tokens per request (ignore_eos), got {counts}", data
            )
        return Check(
            "throughput",
            Status.PASS,
            f"{data['sequential_tok_s']} tok/s sequential, {data['parallel_tok_s']} tok/s with {n} in parallel "
            f"(x{data['speedup']})",
            data,
        )

    def run(self) -> list[Check]:
        steps: list[Callable[[], Check | list[Check]]] = [
            self.check_models,
            self.check_chat,
            self.check_chat_stream,
            self.check_completions,
            self.sanity_checks,
            self.check_reasoning,
            self.check_tool_chat,
            self.check_tool_chat_stream,
            self.check_tool_messages,
            self.check_tool_messages_stream,
            self.check_throughput,
        ]
        checks: list[Check] = []
        for step in steps:
            try:
                result = step()
            except (OSError, KeyError, IndexError, TypeError, ValueError) as e:
                name = step.__name__.removeprefix("check_")
                result = Check(name, Status.FAIL, f"{type(e).__name__}: {e}")
            checks.extend(result if isinstance(result, list) else [result])
        return checks


def check_log(log_text: str | None) -> list[Check]:
    if log_text is None:
        return [Check("server_log", Status.SKIP, "no server log (pass --log FILE with --url)")]
    findings, backends = grep_log(log_text)
    checks = [
        Check(
            "backends", Status.PASS, "; ".join(backends) or "no backend selection line in the log", {"lines": backends}
        )
    ]
    if findings:
        detail = "; ".join(f"{f['name']} x{f['count']}: {f['why']}" for f in findings)
        checks.insert(0, Check("server_log", Status.FAIL, detail, {"findings": findings}))
    else:
        checks.insert(0, Check("server_log", Status.PASS, f"none of the {len(BAD_LOG_LINES)} known-bad lines"))
    return checks


def served_model(client: Client) -> str:
    try:
        resp = client.request("GET", "/v1/models")
    except OSError as e:
        raise CheckFailed(f"{client.base_url}: no server answers ({e}); start one or check --url") from e
    if resp.status != 200 or not resp.body.get("data"):
        raise CheckFailed(f"{client.base_url}/v1/models: {_http_error(resp)}")
    return resp.body["data"][0]["id"]


def verify_url(
    url: str, opts: VerifyOptions, log_path: Path | None = None, startup_s: float | None = None
) -> VerifyReport:
    """Every check against a running server (and its log, when there is one)."""
    client = Client(url, api_key=opts.api_key, timeout_s=opts.request_timeout_s)
    model = served_model(client)
    checks = Verifier(client, model, opts).run()
    log_text = log_path.read_text(errors="replace") if log_path and log_path.exists() else None
    checks += check_log(log_text)
    return VerifyReport(url, model, tuple(checks), startup_s, str(log_path) if log_path else None)


def verify_checkpoint(command: ServeCommand, url: str, opts: VerifyOptions, log_path: Path) -> VerifyReport:
    """Start vLLM with `command`, wait for it (bounded; its own error on failure), verify, and stop its process group."""
    with VllmServer(command, log_path) as server:
        startup_s = server.wait_ready(Client(url, api_key=opts.api_key, timeout_s=10.0), opts.ready_timeout_s)
        return verify_url(url, opts, log_path, startup_s)
