"""The strict safetensors header reader and the raw writer: golden bytes, agreement with the safetensors library,
one error per failure, and single-tensor reads that never touch the rest of the file."""

from __future__ import annotations

import json
import struct
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sm120_quant.errors import UserError
from sm120_quant.exporters.safetensors_header import (
    HeaderError,
    HeaderProblem,
    RawTensor,
    TensorReader,
    read_header,
    read_tensor,
    write_safetensors,
)

# Two tensors and metadata, as write_safetensors lays them out: compact JSON, space padding to a multiple of 8.
GOLDEN_HEADER = (b'{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                 b'"b":{"dtype":"U8","shape":[3],"data_offsets":[8,11]}}')
GOLDEN = (struct.pack("<Q", 144) + GOLDEN_HEADER + b" " * (144 - len(GOLDEN_HEADER))
          + struct.pack("<2f", 1.0, -2.5) + b"\x01\x02\x03")


def test_writer_golden_bytes(tmp_path):
    assert len(GOLDEN_HEADER) == 138  # padded with 6 spaces to 144
    write_safetensors(tmp_path / "g.safetensors", [
        RawTensor("a", "F32", (2,), data=struct.pack("<2f", 1.0, -2.5)),
        RawTensor("b", "U8", (3,), data=b"\x01\x02\x03"),
    ], {"format": "pt"})
    assert (tmp_path / "g.safetensors").read_bytes() == GOLDEN


def test_reader_on_golden_bytes(tmp_path):
    (tmp_path / "g.safetensors").write_bytes(GOLDEN)
    header = read_header(tmp_path / "g.safetensors")
    assert header.metadata == {"format": "pt"}
    assert header.header_bytes == 144 and header.data_start == 152
    a, b = header.tensors["a"], header.tensors["b"]
    assert (a.dtype, a.shape, a.start, a.end) == ("F32", (2,), 152, 160)
    assert (b.dtype, b.shape, b.start, b.end) == ("U8", (3,), 160, 163)
    assert read_tensor(tmp_path / "g.safetensors", a).tolist() == [1.0, -2.5]
    with safe_open(tmp_path / "g.safetensors", "pt") as f:  # the reference reader agrees
        assert f.get_tensor("b").tolist() == [1, 2, 3]


def test_agrees_with_safetensors_library(tmp_path):
    tensors = {
        "w": torch.randint(0, 255, (16, 8), dtype=torch.uint8),
        "s": torch.rand(16, 1).to(torch.float8_e4m3fn),
        "g": torch.tensor(0.25),
        "b": torch.randn(5, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 3),
    }
    save_file(tensors, tmp_path / "x.safetensors", metadata={"k": "v"})
    header = read_header(tmp_path / "x.safetensors")
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert header.metadata == f.metadata()
        for name, t in tensors.items():
            info = header.tensors[name]
            assert list(info.shape) == f.get_slice(name).get_shape()
            assert info.dtype == f.get_slice(name).get_dtype()
            got = read_tensor(tmp_path / "x.safetensors", info)
            assert got.dtype == t.dtype
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_copied_tensors_keep_their_bytes(tmp_path):
    save_file({"x": torch.randn(33, 7), "y": torch.arange(10, dtype=torch.int64)}, tmp_path / "in.safetensors")
    src = read_header(tmp_path / "in.safetensors")
    write_safetensors(tmp_path / "out.safetensors",
                      [RawTensor.from_file(tmp_path / "in.safetensors", src.tensors[n]) for n in ("y", "x")]
                      + [RawTensor.from_torch("z", torch.ones(2, dtype=torch.bfloat16))], None)
    out = read_header(tmp_path / "out.safetensors")
    raw_in, raw_out = (tmp_path / "in.safetensors").read_bytes(), (tmp_path / "out.safetensors").read_bytes()
    for n in ("x", "y"):
        i, o = src.tensors[n], out.tensors[n]
        assert raw_in[i.start:i.end] == raw_out[o.start:o.end]
    assert [t.name for t in sorted(out.tensors.values(), key=lambda t: t.start)] == ["y", "x", "z"]
    assert out.metadata is None


def test_reads_one_tensor_of_a_huge_sparse_file(tmp_path):
    # A 64 GiB tensor followed by a small one; the file is sparse, so only reading one tensor can be fast.
    big = 64 << 30
    header = json.dumps({"big": {"dtype": "U8", "shape": [big], "data_offsets": [0, big]},
                         "small": {"dtype": "F32", "shape": [2], "data_offsets": [big, big + 8]}}).encode()
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.seek(8 + len(header) + big)
        f.write(struct.pack("<2f", 3.0, 4.0))
    start = time.perf_counter()
    parsed = read_header(path)
    assert read_tensor(path, parsed.tensors["small"]).tolist() == [3.0, 4.0]
    with TensorReader(path) as reader:
        assert reader.read_bytes(parsed.tensors["small"]) == struct.pack("<2f", 3.0, 4.0)
    assert time.perf_counter() - start < 1.0


def _file(tmp_path, header: bytes | str, data: bytes = b"", length: int | None = None) -> object:
    raw = header.encode() if isinstance(header, str) else header
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


F32_1 = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
CASES = {
    HeaderProblem.TOO_SMALL: (None, b"\x05\x00"),
    HeaderProblem.TOO_LARGE: ("{}", b"", 200_000_000),
    HeaderProblem.TRUNCATED_HEADER: ("{}", b"", 100),
    HeaderProblem.NOT_UTF8: (b'{"\xff":1}', b""),
    HeaderProblem.NOT_JSON: ('{"a":', b""),
    HeaderProblem.NOT_OBJECT: ("[1, 2]", b""),
    HeaderProblem.DUPLICATE_KEY: (f'{{"a":{F32_1},"a":{F32_1}}}', b"\0" * 4),
    HeaderProblem.BAD_METADATA: ('{"__metadata__":{"x":1}}', b""),
    HeaderProblem.BAD_ENTRY: ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":1}}', b"\0" * 4),
    HeaderProblem.BAD_DTYPE: ('{"a":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4),
    HeaderProblem.BAD_SHAPE: ('{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', b"\0" * 4),
    HeaderProblem.BAD_OFFSETS: ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}', b"\0" * 4),
    HeaderProblem.SIZE_MISMATCH: ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', b"\0" * 4),
    HeaderProblem.SUBBYTE_MISALIGNED: ('{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', b"\0" * 2),
    HeaderProblem.NOT_CONTIGUOUS: (f'{{"a":{F32_1},"b":{{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}}}',
                                   b"\0" * 12),
    HeaderProblem.NOT_COVERED: (f'{{"a":{F32_1}}}', b"\0" * 5),
}


@pytest.mark.parametrize("problem", list(HeaderProblem), ids=lambda p: p.name.lower())
def test_each_problem_has_its_error(tmp_path, problem):
    header, data, *length = CASES[problem]
    if header is None:
        path = tmp_path / "t.safetensors"
        path.write_bytes(data)
    else:
        path = _file(tmp_path, header, data, *length)
    with pytest.raises(HeaderError) as info:
        read_header(path)
    assert info.value.problem is problem
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert message.startswith(f"{path}: {problem.value}") and message.endswith("re-export or re-download this file")


@pytest.mark.parametrize("shape", ["[-1]", "[1.0]", '["1"]', "3", "[18446744073709551616]"])
def test_shapes_that_are_not_unsigned_ints(tmp_path, shape):
    path = _file(tmp_path, f'{{"a":{{"dtype":"U8","shape":{shape},"data_offsets":[0,1]}}}}', b"\0")
    with pytest.raises(HeaderError) as info:
        read_header(path)
    assert info.value.problem is HeaderProblem.BAD_SHAPE


def test_shape_product_overflow(tmp_path):
    path = _file(tmp_path, '{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}}', b"\0" * 8)
    with pytest.raises(HeaderError, match="overflows u64"):
        read_header(path)


def test_zero_sized_tensors_and_padding_are_valid(tmp_path):
    path = _file(tmp_path, '{"e":{"dtype":"BF16","shape":[0,4],"data_offsets":[0,0]},'
                           '"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}     ', b"\0" * 4)
    header = read_header(path)
    assert header.tensors["e"].nbytes == 0 and header.tensors["a"].shape == ()
    assert read_tensor(path, header.tensors["e"]).shape == (0, 4)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        read_header(tmp_path / "nope.safetensors")
