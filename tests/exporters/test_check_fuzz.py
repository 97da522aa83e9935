"""Corrupted headers and JSON never get a traceback out of the checkpoint doctor: only a report or a UserError."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sm120_quant.errors import UserError
from sm120_quant.exporters.check import check_checkpoint
from sm120_quant.exporters.safetensors_header import DTYPE_BITS, read_header

# FUZZ_EXAMPLES=600 for a longer local run; 80 keeps the suite fast.
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "80")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=16,
)


def checked(folder, **kwargs) -> None:
    """Run the check; a report or a UserError are both fine, anything else fails the test."""
    try:
        report = check_checkpoint(folder, **kwargs)
    except UserError as e:
        assert "\n" not in str(e)
    else:
        assert all(f.key and f.message and f.fix for f in report.findings)


@pytest.fixture(scope="module")
def workdir(exports, tmp_path_factory):
    """A private copy of the ModelOpt export (two shards, index, both config files) that examples corrupt and
    restore."""
    dst = tmp_path_factory.mktemp("fuzz") / "ckpt"
    shutil.copytree(exports["modelopt-glm47"], dst)
    return dst


@FUZZ
@given(raw=st.binary(max_size=400), length=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_random_header_bytes(tmp_path_factory, raw, length):
    path = tmp_path_factory.getbasetemp() / "random.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw)
    with contextlib.suppress(UserError):
        read_header(path)


entries = st.fixed_dictionaries({
    "dtype": st.sampled_from([*DTYPE_BITS, "F33", ""]) | st.integers(),
    "shape": st.lists(st.integers(-2, 2**65), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-2, 80), min_size=0, max_size=3) | json_values,
}, optional={"extra": json_values})


@FUZZ
@given(tensors=st.dictionaries(st.text(max_size=6), entries | json_values, max_size=5),
       metadata=st.none() | json_values, data=st.binary(max_size=80))
def test_structured_header_json(tmp_path_factory, tensors, metadata, data):
    header = dict(tensors)
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path = tmp_path_factory.getbasetemp() / "structured.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    with contextlib.suppress(UserError):
        read_header(path)


@FUZZ
@given(data=st.data())
def test_corrupted_shard_header(workdir, data):
    shard = min(workdir.glob("*.safetensors"))
    original = shard.read_bytes()
    header_end = 8 + struct.unpack("<Q", original[:8])[0]
    positions = data.draw(st.lists(st.integers(0, header_end - 1), min_size=1, max_size=4))
    corrupted = bytearray(original)
    for p in positions:
        corrupted[p] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        corrupted = corrupted[:data.draw(st.integers(0, len(corrupted)))]
    try:
        shard.write_bytes(bytes(corrupted))
        checked(workdir, runtime="sglang==0.5.4", tp=2, deep=True)
    finally:
        shard.write_bytes(original)


CONFIG_KEYS = ["quantization_config", "num_hidden_layers", "num_nextn_predict_layers", "hidden_size", "model_type",
               "moe_intermediate_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "n_shared_experts", "kv_lora_rank"]
QC_KEYS = ["ignore", "quant_method", "quant_algo", "kv_cache_scheme", "config_groups", "format", "group_size",
           "quantized_layers"]
HF_KEYS = ["quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules", "quantized_layers"]


@FUZZ
@given(file=st.sampled_from(["config.json", "hf_quant_config.json", "model.safetensors.index.json"]),
       edits=st.lists(st.tuples(st.sampled_from(CONFIG_KEYS + QC_KEYS + HF_KEYS + ["weight_map", "metadata"]),
                                json_values), min_size=1, max_size=3),
       garbage=st.none() | st.binary(max_size=40))
def test_corrupted_json_files(workdir, file, edits, garbage):
    path = workdir / file
    original = path.read_bytes()
    if garbage is not None:
        corrupted = garbage
    else:
        data = json.loads(original)
        for key, value in edits:
            if key in QC_KEYS and isinstance(data.get("quantization_config"), dict):
                data["quantization_config"][key] = value
            elif key in HF_KEYS and isinstance(data.get("quantization"), dict):
                data["quantization"][key] = value
            else:
                data[key] = value
        corrupted = json.dumps(data).encode()
    try:
        path.write_bytes(corrupted)
        checked(workdir, runtime="vllm==0.15.1", tp=4, deep=True)
    finally:
        path.write_bytes(original)


@pytest.fixture(scope="module")
def ct_workdir(exports, tmp_path_factory):
    dst = tmp_path_factory.mktemp("fuzz-ct") / "ckpt"
    shutil.copytree(exports["ct-nvfp4-glm47"], dst)
    return dst


@FUZZ
@given(ignore=st.lists(st.text(alphabet="re:.*()[]?+\\model.layers0123", max_size=16), max_size=4),
       layout=st.sampled_from(["modelopt", "ct"]))
def test_exclude_patterns(workdir, ct_workdir, ignore, layout):
    folder = workdir if layout == "modelopt" else ct_workdir
    path = folder / "config.json"
    original = path.read_bytes()
    data = json.loads(original)
    data["quantization_config"]["ignore"] = ignore
    try:
        path.write_bytes(json.dumps(data).encode())
        checked(folder)
    finally:
        path.write_bytes(original)
