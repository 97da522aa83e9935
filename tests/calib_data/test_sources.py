"""Every source kind loads real files (or the real datasets loader on a local folder) and fails clearly on bad input."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from calib_support import PARAGRAPHS, spec_of, write_jsonl

from sm120_quant.calib_data.build import build_calibration_set
from sm120_quant.calib_data.builtin import TABLES, render_table
from sm120_quant.calib_data.sources import ChatSample, TextSample, open_pass
from sm120_quant.errors import UserError


def _texts(calib, tokenizer) -> list[str]:
    return [tokenizer.decode(s) for s in calib.sequences]


def test_jsonl_text_rows_are_tokenized_without_a_template(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t, "id": i} for i, t in enumerate(PARAGRAPHS)])
    s = spec_of("passes: [{name: a, source: jsonl, path: a.jsonl, samples: 6}]", tmp_path)
    calib = build_calibration_set(s, tokenizer, progress=False)
    assert sorted(_texts(calib, tokenizer)) == sorted(PARAGRAPHS)
    assert calib.sequences[0].tolist() == tokenizer(_texts(calib, tokenizer)[0])["input_ids"]
    assert not any("[gMASK]" in t for t in _texts(calib, tokenizer))


def test_parquet_messages_with_tools_column(tmp_path, tokenizer):
    tools = [{"type": "function", "function": {"name": "get_time", "description": "Current time.",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = [{"role": "user", "content": "What time is it?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
                {"role": "tool", "content": "12:00"},
                {"role": "assistant", "content": "It is noon."}]
    # The conversation is a nested list<struct> column; the tool schemas a JSON string, as many exports store them.
    pq.write_table(pa.table({"conv": [messages], "tools": [json.dumps(tools)]}), tmp_path / "c.parquet")
    s = spec_of("passes: [{name: c, source: parquet, path: c.parquet, format: messages, column: conv, "
                "tools_column: tools, samples: 1}]", tmp_path)
    text = tokenizer.decode(build_calibration_set(s, tokenizer, progress=False).sequences[0])
    assert text.startswith("[gMASK]<sop><|system|>\n# Tools")
    assert '"name": "get_time"' in text
    assert "<tool_call>get_time</tool_call><|observation|><tool_response>12:00</tool_response>" in text
    assert text.endswith("<|assistant|></think>It is noon.")


def test_text_file_in_paragraph_units(tmp_path, tokenizer):
    (tmp_path / "notes.txt").write_text("\n\n".join(PARAGRAPHS) + "\n", encoding="utf-8")
    s = spec_of("passes: [{name: t, source: text, path: notes.txt, unit: paragraph, samples: 6}]", tmp_path)
    assert sorted(_texts(build_calibration_set(s, tokenizer, progress=False), tokenizer)) == sorted(PARAGRAPHS)


def test_text_file_in_line_units_and_whole_file(tmp_path):
    (tmp_path / "n.txt").write_text("one\n\ntwo\nthree\n", encoding="utf-8")
    lines = spec_of("passes: [{name: t, source: text, path: n.txt, unit: line, samples: 1}]", tmp_path)
    assert sorted(s.text for s in open_pass(lines.passes[0], 0, len)) == ["one", "three", "two"]
    whole = spec_of("passes: [{name: t, source: text, path: n.txt, samples: 1}]", tmp_path)
    assert [s.text for s in open_pass(whole.passes[0], 0, len)] == ["one\n\ntwo\nthree\n"]


def test_folder_reads_text_jsonl_and_parquet_files(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.md").write_text("alpha", encoding="utf-8")
    (docs / "sub" / "b.md").write_text("beta", encoding="utf-8")
    write_jsonl(docs / "c.jsonl", [{"text": "gamma"}, {"text": "delta"}])
    pq.write_table(pa.table({"text": ["epsilon"]}), docs / "d.parquet")
    (docs / "skip.bin").write_bytes(b"\xff\xfe")
    s = spec_of("passes: [{name: f, source: folder, path: docs, pattern: '**/*.*[dtl]', samples: 1}]", tmp_path)
    samples = list(open_pass(s.passes[0], 0, len))
    assert sorted(x.text for x in samples) == ["alpha", "beta", "delta", "epsilon", "gamma"]
    origins = " ".join(x.origin for x in samples)
    assert all(f"docs/{name}" in origins for name in ("a.md", "sub/b.md", "c.jsonl:1", "c.jsonl:2", "d.parquet"))
    assert "skip.bin" not in origins


def test_seeded_shuffle_is_stable_and_seed_dependent(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"row {i}"} for i in range(50)])
    p = spec_of("passes: [{name: a, source: jsonl, path: a.jsonl, samples: 1}]", tmp_path).passes[0]
    first = [s.text for s in open_pass(p, 0, len)]
    assert first == [s.text for s in open_pass(p, 0, len)]
    assert first != [s.text for s in open_pass(p, 1, len)]
    assert sorted(first) == sorted(f"row {i}" for i in range(50))


def test_hf_dataset_uses_the_datasets_loader(tmp_path, tokenizer, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    (tmp_path / "ds").mkdir()
    write_jsonl(tmp_path / "ds" / "train.jsonl", [{"prompt": t} for t in PARAGRAPHS])
    s = spec_of(f"passes: [{{name: h, source: hf_dataset, path: {tmp_path / 'ds'}, column: prompt, samples: 4}}]")
    calib = build_calibration_set(s, tokenizer, progress=False)
    assert len(calib.sequences) == 4 and set(_texts(calib, tokenizer)) <= set(PARAGRAPHS)


def test_hf_dataset_offline_fails_with_a_clear_message(monkeypatch, tokenizer):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    s = spec_of("passes: [{name: broad, source: hf_dataset, path: someorg/not-downloaded, samples: 4}]")
    with pytest.raises(UserError, match=r"calibration pass broad: cannot load dataset 'someorg/not-downloaded' "
                                        r"\(config None, split 'train'\): ConnectionError: .*OfflineModeIsEnabled.*"
                                        r"use a local jsonl/parquet or builtin pass"):
        build_calibration_set(s, tokenizer, progress=False)


def test_hf_dataset_unknown_column(tmp_path, tokenizer, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    (tmp_path / "ds").mkdir()
    write_jsonl(tmp_path / "ds" / "train.jsonl", [{"prompt": "x"}])
    s = spec_of(f"passes: [{{name: h, source: hf_dataset, path: {tmp_path / 'ds'}, samples: 1}}]")
    with pytest.raises(UserError, match=r"no column 'text' \(columns: prompt\); set `column`"):
        build_calibration_set(s, tokenizer, progress=False)


# ---- bad inputs ---------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path, tokenizer):
    s = spec_of("passes: [{name: a, source: jsonl, path: nope.jsonl, samples: 1}]", tmp_path)
    with pytest.raises(UserError, match=rf"calibration pass a: {re.escape(str(tmp_path))}/nope.jsonl does not exist"):
        build_calibration_set(s, tokenizer, progress=False)


@pytest.mark.parametrize(("kind", "suffix"), [("jsonl", "jsonl"), ("parquet", "parquet"), ("text", "txt")])
def test_empty_dataset(tmp_path, tokenizer, kind, suffix):
    path = tmp_path / f"empty.{suffix}"
    if kind == "parquet":
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    else:
        path.write_text("\n  \n", encoding="utf-8")
    s = spec_of(f"passes: [{{name: e, source: {kind}, path: {path.name}, samples: 1}}]", tmp_path)
    with pytest.raises(UserError, match=r"calibration pass e: .*empty\.\w+ has no samples"):
        build_calibration_set(s, tokenizer, progress=False)


def test_unknown_column_names_the_columns(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "hi", "answer": "yo"}])
    s = spec_of("passes: [{name: a, source: jsonl, path: a.jsonl, samples: 1}]", tmp_path)
    with pytest.raises(UserError, match=r"a\.jsonl:1: no column 'text' \(columns: prompt, answer\); set `column`"):
        build_calibration_set(s, tokenizer, progress=False)
    pq.write_table(pa.table({"prompt": ["hi"]}), tmp_path / "b.parquet")
    s = spec_of("passes: [{name: b, source: parquet, path: b.parquet, format: messages, samples: 1}]", tmp_path)
    with pytest.raises(UserError, match=r"b\.parquet: no column 'messages' \(columns: prompt\)"):
        build_calibration_set(s, tokenizer, progress=False)


def test_bad_json_line_and_bad_conversation(tmp_path, tokenizer):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    s = spec_of("passes: [{name: a, source: jsonl, path: a.jsonl, samples: 1}]", tmp_path)
    with pytest.raises(UserError, match=r"a\.jsonl:2: not valid JSON"):
        build_calibration_set(s, tokenizer, progress=False)
    write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "wizard", "content": "hi"}]}])
    s = spec_of("passes: [{name: m, source: jsonl, path: m.jsonl, format: messages, samples: 1}]", tmp_path)
    with pytest.raises(UserError, match=r"m\.jsonl:1: message 0 needs a role in system, user, assistant, tool"):
        build_calibration_set(s, tokenizer, progress=False)


def test_folder_with_no_matching_file(tmp_path, tokenizer):
    (tmp_path / "docs").mkdir()
    s = spec_of("passes: [{name: f, source: folder, path: docs, pattern: '*.md', samples: 1}]", tmp_path)
    with pytest.raises(UserError, match=r"no file under .*docs matches '\*\.md'; fix `pattern`"):
        build_calibration_set(s, tokenizer, progress=False)


def test_not_enough_unique_samples(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "same"}] * 3 + [{"text": "other"}])
    s = spec_of("passes: [{name: a, source: jsonl, path: a.jsonl, samples: 3}]", tmp_path)
    with pytest.raises(UserError, match=r"calibration pass a: jsonl .*a\.jsonl gave 2 of 3 rows \(4 samples read: "
                                        r"0 under min_tokens 1, 0 over max_tokens 2048, 2 duplicates\)"):
        build_calibration_set(s, tokenizer, progress=False)


# ---- builtins ------------------------------------------------------------------------------------------------------


def _first(builtin: str, n: int, **extra):
    s = spec_of(yaml.safe_dump({"passes": [dict(name="b", source="builtin", builtin=builtin, samples=1, **extra)]}))
    it = open_pass(s.passes[0], 0, len)
    return [next(it) for _ in range(n)]


def test_builtin_code_quotes_real_stdlib_source():
    import sysconfig
    from pathlib import Path

    for s in _first("code", 5):
        assert isinstance(s, TextSample)
        name = s.text.splitlines()[0].removeprefix("# ")
        source = (Path(sysconfig.get_path("stdlib")) / name).read_text(encoding="utf-8")
        body = "\n".join(s.text.splitlines()[1:])
        assert body in source + "\n"


def test_builtin_agentic_has_tools_calls_and_results():
    for s in _first("agentic", 4):
        assert isinstance(s, ChatSample)
        assert {t["function"]["name"] for t in s.tools} >= {"search_code", "read_file", "apply_patch", "run_tests"}
        calls = [tc["function"] for m in s.messages for tc in m.get("tool_calls", [])]
        assert [c["name"] for c in calls[:2]] == ["search_code", "read_file"]
        assert sum(m["role"] == "tool" for m in s.messages) == len(calls)
        assert s.messages[0]["role"] == "system" and s.messages[-1]["role"] == "assistant"


def test_builtin_structured_answers_are_exact_conversions():
    checked = 0
    for s in _first("structured", 12):
        answer, question = s.messages[-1]["content"], s.messages[-2]["content"]
        if not answer.startswith("```json\n"):
            continue
        rows = json.loads(answer.removeprefix("```json\n").removesuffix("\n```"))
        table = next(t for t, columns in TABLES.items() if list(columns) == list(rows[0]))
        source_format = question.split("```", 1)[1].split("\n", 1)[0]
        assert f"```{source_format}\n{render_table(source_format, table, rows)}\n```" in question
        checked += 1
    assert checked >= 1

def test_builtin_chat_is_multi_turn_and_bilingual_system_has_chinese():
    for s in _first("chat", 3):
        assert sum(m["role"] == "user" for m in s.messages) >= 2
    systems = [s.messages[0]["content"] for s in _first("bilingual_system", 20)]
    assert any(re.search(r"[\u4e00-\u9fff]", t) for t in systems)
    assert any(re.fullmatch(r"[ -~]+", t) for t in systems)


def test_builtin_long_context_hits_its_token_target(tokenizer):
    target = 1536
    s = spec_of(f"max_seq_len: 2048\npasses: [{{name: deep, source: builtin, builtin: long_context, "
                f"target_tokens: {target}, samples: 2}}]")
    calib = build_calibration_set(s, tokenizer, progress=False)
    lengths = [len(x) for x in calib.sequences]
    assert all(abs(n - target) <= 0.05 * target for n in lengths), lengths
    for row in calib.sequences:
        text = tokenizer.decode(row)
        asked = re.search(r"Which of these files defines `([\w.]+)`", text)
        if asked:  # the function asked about is quoted, not cut away
            assert f"def {asked.group(1).rsplit('.', 1)[-1]}(" in text
        else:
            assert "Which files did I send?<|assistant|></think>You sent " in text
