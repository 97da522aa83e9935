"""The builder: reproducible hash, chat-template rendering, length policies, packing, padding and their errors."""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch
from calib_support import PARAGRAPHS, spec_of, write_jsonl

from sm120_quant.calib_data.build import build_calibration_set
from sm120_quant.errors import UserError

THREE_PASSES = """
seed: 3
max_seq_len: 1024
batch_size: 2
passes:
  - {name: coding, source: builtin, builtin: agentic, samples: 3}
  - {name: broad, source: jsonl, path: chats.jsonl, format: messages, samples: 3}
  - {name: deep, source: builtin, builtin: long_context, target_tokens: 900, samples: 1}
"""

CHATS = [
    {"messages": [{"role": "user", "content": f"Question {i}: {p}"}, {"role": "assistant", "content": f"Answer {i}."}]}
    for i, p in enumerate(PARAGRAPHS)
]


@pytest.fixture()
def three_pass_dir(tmp_path):
    write_jsonl(tmp_path / "chats.jsonl", CHATS)
    return tmp_path


def test_same_recipe_and_seed_give_the_same_hash_and_bytes(three_pass_dir, tokenizer):
    a = build_calibration_set(spec_of(THREE_PASSES, three_pass_dir), tokenizer, progress=False)
    b = build_calibration_set(spec_of(THREE_PASSES, three_pass_dir), tokenizer, progress=False)
    assert a.content_hash == b.content_hash
    assert [s.numpy().tobytes() for s in a.sequences] == [s.numpy().tobytes() for s in b.sequences]
    assert [(p.name, p.samples) for p in a.passes] == [("coding", 3), ("broad", 3), ("deep", 1)]
    assert a.num_tokens == sum(p.tokens for p in a.passes)


def test_changing_one_source_or_the_seed_changes_the_hash(three_pass_dir, tokenizer):
    base = build_calibration_set(spec_of(THREE_PASSES, three_pass_dir), tokenizer, progress=False).content_hash
    edited = CHATS[:-1] + [{"messages": [{"role": "user", "content": "A different last question?"},
                                         {"role": "assistant", "content": "A different answer."}]}]
    write_jsonl(three_pass_dir / "chats.jsonl", edited)
    changed_file = build_calibration_set(spec_of(THREE_PASSES, three_pass_dir), tokenizer, progress=False)
    write_jsonl(three_pass_dir / "chats.jsonl", CHATS)
    reseeded = build_calibration_set(spec_of(THREE_PASSES.replace("seed: 3", "seed: 4"), three_pass_dir), tokenizer,
                                     progress=False)
    assert len({base, changed_file.content_hash, reseeded.content_hash}) == 3


def test_hash_is_the_documented_byte_layout(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "alpha beta"}, {"text": "gamma"}])
    s = spec_of("batch_size: 2\npadding_side: right\npasses: [{name: a, source: jsonl, path: a.jsonl, samples: 2}]",
                tmp_path)
    calib = build_calibration_set(s, tokenizer, progress=False)
    h = hashlib.sha256(b"sm120-calib/1\n" + struct.pack("<III", 2, tokenizer.pad_token_id, 1) + b"right\n")
    h.update(struct.pack("<I", 1) + b"a" + struct.pack("<I", 2))
    for row in calib.sequences:
        h.update(struct.pack("<I", len(row)) + struct.pack(f"<{len(row)}i", *row.tolist()))
    assert calib.content_hash == h.hexdigest()


def test_tool_call_conversation_renders_through_the_glm_template(tmp_path, tokenizer):
    tools = [{"type": "function", "function": {
        "name": "read_file", "description": "Read a file.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}]
    messages = [
        {"role": "system", "content": "You are a coding agent."},
        {"role": "user", "content": "Open setup.cfg"},
        {"role": "assistant", "content": "", "reasoning_content": "Read it first.",
         "tool_calls": [{"type": "function", "function": {"name": "read_file",
                                                          "arguments": '{"path": "setup.cfg", "lines": 20}'}}]},
        {"role": "tool", "content": "[metadata]\nname = demo"},
        {"role": "assistant", "content": "The package is called demo."},
    ]
    write_jsonl(tmp_path / "t.jsonl", [{"messages": messages, "tools": tools}])
    spec = "passes: [{name: t, source: jsonl, path: t.jsonl, format: messages, tools_column: tools, samples: 1}]"
    on = build_calibration_set(spec_of(spec, tmp_path), tokenizer, progress=False)
    text = tokenizer.decode(on.sequences[0])
    assert text == (
        "[gMASK]<sop><|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "read_file", "description": "Read a file.", "parameters": '
        '{"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}\n</tools>\n\n'
        "For each function call, output the function name and arguments within the following XML format:\n"
        "<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value><arg_key>"
        "{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>...</tool_call>"
        "<|system|>You are a coding agent.<|user|>Open setup.cfg"
        "<|assistant|><think>Read it first.</think>"
        "<tool_call>read_file<arg_key>path</arg_key><arg_value>setup.cfg</arg_value>"
        "<arg_key>lines</arg_key><arg_value>20</arg_value></tool_call>"
        "<|observation|><tool_response>[metadata]\nname = demo</tool_response>"
        "<|assistant|></think>The package is called demo."
    )
    # The tokens are exactly the tokenizer's encoding of its own template output (OpenAI string arguments parsed).
    parsed = [dict(m) for m in messages]
    parsed[2] = dict(messages[2], tool_calls=[{"type": "function", "function": {
        "name": "read_file", "arguments": {"path": "setup.cfg", "lines": 20}}}])
    rendered = tokenizer.apply_chat_template(parsed, tools=tools, tokenize=False)
    assert on.sequences[0].tolist() == tokenizer(rendered, add_special_tokens=False)["input_ids"]

    off = build_calibration_set(spec_of("thinking: false\n" + spec, tmp_path), tokenizer, progress=False)
    off_text = tokenizer.decode(off.sequences[0])
    assert "Read it first." not in off_text
    assert "<|assistant|></think><tool_call>read_file" in off_text
    assert off.content_hash != on.content_hash


def test_dedupe_across_passes(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [{"text": p} for p in PARAGRAPHS[:3]])
    write_jsonl(tmp_path / "b.jsonl", [{"text": p} for p in PARAGRAPHS[:4]])
    text = """passes: [{name: a, source: jsonl, path: a.jsonl, samples: 3},
                       {name: b, source: jsonl, path: b.jsonl, samples: 1}]"""
    calib = build_calibration_set(spec_of(text, tmp_path), tokenizer, progress=False)
    assert tokenizer.decode(calib.sequences[-1]) == PARAGRAPHS[3]
    with pytest.raises(UserError, match=r"gave 1 of 2 rows .* 3 duplicates"):
        build_calibration_set(spec_of(text.replace("samples: 1", "samples: 2"), tmp_path), tokenizer, progress=False)
    kept = build_calibration_set(spec_of("dedupe: false\n" + text.replace("samples: 1", "samples: 4"), tmp_path),
                                 tokenizer, progress=False)
    assert kept.num_samples == 7


def test_length_range_and_truncation_policies(tmp_path, tokenizer):
    long = " ".join(PARAGRAPHS)
    short = "Only the top-k experts run."
    write_jsonl(tmp_path / "a.jsonl", [{"text": long}, {"text": "tiny"}, {"text": short}])
    n_long = len(tokenizer(long)["input_ids"])
    base = "passes: [{name: a, source: jsonl, path: a.jsonl, samples: 2, min_tokens: 3, max_tokens: 16}]"
    truncated = build_calibration_set(spec_of(base, tmp_path), tokenizer, progress=False)
    assert sorted(len(s) for s in truncated.sequences) == sorted([16, len(tokenizer(short)["input_ids"])])
    assert any(s.tolist() == tokenizer(long)["input_ids"][:16] for s in truncated.sequences)
    with pytest.raises(UserError, match=r"gave 1 of 2 rows \(3 samples read: 1 under min_tokens 3, 1 over max_tokens"):
        build_calibration_set(spec_of("truncation: drop\n" + base, tmp_path), tokenizer, progress=False)
    with pytest.raises(UserError, match=rf"a\.jsonl:1: sample has {n_long} tokens, more than pass a's max_tokens 16; "
                                        "shorten it, or set calibration.truncation"):
        build_calibration_set(spec_of("truncation: error\n" + base, tmp_path), tokenizer, progress=False)


def test_sample_longer_than_the_model_max_length(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [{"text": " ".join(PARAGRAPHS * 3)}])
    spec = spec_of("max_seq_len: 64\ntruncation: error\npasses: [{name: a, source: jsonl, path: a.jsonl, samples: 1}]",
                   tmp_path)
    with pytest.raises(UserError, match=r"a\.jsonl:1: sample has \d+ tokens, more than pass a's max_tokens 64 and the "
                                        r"model's max length 64"):
        build_calibration_set(spec, tokenizer, max_model_len=64, progress=False)
    with pytest.raises(UserError, match=r"calibration\.max_seq_len 64 exceeds the model's max length 32; lower"):
        build_calibration_set(spec, tokenizer, max_model_len=32, progress=False)


def test_packing_fills_rows_exactly(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [{"text": p} for p in PARAGRAPHS])
    calib = build_calibration_set(spec_of(
        "packing: pack\nbatch_size: 2\npasses: [{name: a, source: jsonl, path: a.jsonl, samples: 3, max_tokens: 20}]",
        tmp_path), tokenizer, progress=False)
    assert [len(s) for s in calib.sequences] == [20, 20, 20]
    assert all(int(b.attention_mask.sum()) == b.attention_mask.numel() for b in calib.batches)
    stream = torch.cat(calib.sequences).tolist()
    assert tokenizer.eos_token_id in stream


def test_left_and_right_padding(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [{"text": PARAGRAPHS[0]}, {"text": "short"}])
    text = "batch_size: 2\nseed: 1\npasses: [{name: a, source: jsonl, path: a.jsonl, samples: 2}]"
    left = build_calibration_set(spec_of(text, tmp_path), tokenizer, progress=False)
    (batch,) = left.batches
    lengths = [len(s) for s in left.sequences]
    width = max(lengths)
    assert batch.input_ids.shape == (2, width)
    for row, n in enumerate(lengths):
        assert batch.attention_mask[row].tolist() == [0] * (width - n) + [1] * n
        assert batch.input_ids[row, width - n:].tolist() == left.sequences[row].tolist()
        assert set(batch.input_ids[row, :width - n].tolist()) <= {tokenizer.pad_token_id}
    right = build_calibration_set(spec_of("padding_side: right\n" + text, tmp_path), tokenizer, progress=False)
    assert right.batches[0].attention_mask[lengths.index(min(lengths))].tolist()[0] == 1
    assert right.content_hash != left.content_hash
    assert list(left) == [batch.as_kwargs()]
    ds = left.to_hf_dataset()
    assert ds["input_ids"] == [s.tolist() for s in left.sequences]


def test_conversations_need_a_chat_template(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    write_jsonl(tmp_path / "c.jsonl", CHATS[:1])
    spec = spec_of("passes: [{name: c, source: jsonl, path: c.jsonl, format: messages, samples: 1}]", tmp_path)
    with pytest.raises(UserError, match=r"c\.jsonl:1: the tokenizer has no chat template"):
        build_calibration_set(spec, plain, progress=False)
