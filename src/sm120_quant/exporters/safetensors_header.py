"""A strict, exact reader (and raw writer) for the safetensors container, so the checkpoint doctor can look at every
tensor's name, dtype and shape without loading any tensor data.

Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data buffer. The JSON maps each
tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the buffer start) plus an
optional `"__metadata__"` string-to-string map. Like the reference Rust reader (safetensors/src/tensor.rs) the
offsets must be contiguous, start at 0, agree with dtype x shape and cover the buffer exactly; every failure is its
own `HeaderProblem` and reaches the user as one `UserError` line. Stricter than the reference, duplicate JSON keys and
unknown per-tensor keys are refused: the reference keeps the last duplicate silently, so two readers could disagree.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Self

from sm120_quant.errors import UserError

if TYPE_CHECKING:
    import torch

# The reference reader's limit; a larger "header" is a corrupt length field, not a real checkpoint.
MAX_HEADER_BYTES = 100_000_000
_U64_MAX = 2**64 - 1
_TENSOR_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_METADATA_KEY = "__metadata__"

# Bits per element of every dtype the safetensors 0.8 format defines (the list its parser prints for an unknown one).
DTYPE_BITS: Mapping[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}


class HeaderProblem(Enum):
    """One value per way a safetensors file can be unusable; the value is the human text."""

    TOO_SMALL = "file is shorter than the 8-byte header length"
    TOO_LARGE = "header length field exceeds the 100 MB safetensors limit"
    TRUNCATED_HEADER = "header length field points past the end of the file"
    NOT_UTF8 = "header is not valid UTF-8"
    NOT_JSON = "header is not valid JSON"
    NOT_OBJECT = "header JSON is not an object"
    DUPLICATE_KEY = "header JSON repeats a key"
    BAD_METADATA = "__metadata__ is not a map of strings to strings"
    BAD_ENTRY = "tensor entry is not an object with exactly dtype, shape and data_offsets"
    BAD_DTYPE = "tensor dtype is not a safetensors dtype"
    BAD_SHAPE = "tensor shape is not a list of non-negative integers"
    BAD_OFFSETS = "tensor data_offsets is not [begin, end] with 0 <= begin <= end"
    SIZE_MISMATCH = "tensor data_offsets span does not match dtype x shape"
    SUBBYTE_MISALIGNED = "sub-byte tensor does not end on a byte boundary"
    NOT_CONTIGUOUS = "tensor data_offsets leave a gap or overlap the previous tensor"
    NOT_COVERED = "tensors do not cover the data buffer exactly (truncated file or trailing bytes)"


class HeaderError(UserError):
    """A safetensors file that cannot be trusted; `problem` says which way (tests select on it)."""

    def __init__(self, path: Path, problem: HeaderProblem, detail: str):
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem.value} ({detail}); re-export or re-download this file")


class TensorInfo(NamedTuple):
    """One header entry; `start`/`end` are absolute byte offsets in the file. (A NamedTuple: a GLM-4.7 header
    has 90k-170k entries, and a frozen dataclass costs several times more to build.)"""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    header_bytes: int
    metadata: Mapping[str, str] | None
    tensors: Mapping[str, TensorInfo]
    file_size: int

    @property
    def data_start(self) -> int:
        return 8 + self.header_bytes


def read_header(path: Path) -> SafetensorsHeader:
    """Read and validate the header of one safetensors file; reads no tensor data."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise HeaderError(path, HeaderProblem.TOO_SMALL, f"{file_size} bytes")
            n = int.from_bytes(prefix, "little")
            if n > MAX_HEADER_BYTES:
                raise HeaderError(path, HeaderProblem.TOO_LARGE, f"{n} bytes")
            if 8 + n > file_size:
                raise HeaderError(path, HeaderProblem.TRUNCATED_HEADER, f"header {n} bytes, file {file_size} bytes")
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from e
    return parse_header(path, raw, file_size)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Duplicate(dup)
    return d


class _Duplicate(Exception):
    pass


def _surely_unique(raw: bytes, obj: object) -> bool:
    """True when `raw` provably has no repeated key, without the (slow) per-object duplicate hook.

    In JSON without escapes or whitespace every `":` ends exactly one object member (a string cannot hold an
    unescaped quote), so counting them gives the members as written, at every depth. The top-level dict and the
    dicts one level down hold the members that survived parsing; anything nested deeper only adds to the written
    count. Equal counts therefore mean no key was merged. Real headers are compact and ASCII; any other header takes
    the exact path.
    """
    body = raw.rstrip(b" ")
    if type(obj) is not dict or b"\\" in body or any(c in body for c in (b" ", b"\n", b"\t", b"\r")):
        return False
    members = len(obj) + sum(len(v) for v in obj.values() if type(v) is dict)
    return body.count(b'":') == members


def parse_header(path: Path, raw: bytes, file_size: int) -> SafetensorsHeader:
    """Validate header bytes `raw` (without the 8-byte length) of a file that is `file_size` bytes long."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderError(path, HeaderProblem.NOT_UTF8, f"byte {e.start}") from None
    try:
        obj = json.loads(text)
        if not _surely_unique(raw, obj):
            obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise HeaderError(path, HeaderProblem.DUPLICATE_KEY, repr(e.args[0])) from None
    except (ValueError, RecursionError) as e:
        raise HeaderError(path, HeaderProblem.NOT_JSON, str(e)[:120]) from None
    if not isinstance(obj, dict):
        raise HeaderError(path, HeaderProblem.NOT_OBJECT, type(obj).__name__)

    metadata = obj.pop(_METADATA_KEY, None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise HeaderError(path, HeaderProblem.BAD_METADATA, repr(metadata)[:120])

    data_start = 8 + len(raw)
    entries: list[tuple[int, int, str, str, tuple[int, ...]]] = []
    # The loop runs once per tensor (170k times for GLM-4.7 NVFP4), hence the inlined type checks.
    for name, entry in obj.items():
        if type(entry) is not dict or len(entry) != 3 or entry.keys() != _TENSOR_KEYS:
            raise HeaderError(path, HeaderProblem.BAD_ENTRY, f"tensor {name!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        bits = DTYPE_BITS.get(dtype) if type(dtype) is str else None
        if bits is None:
            raise HeaderError(path, HeaderProblem.BAD_DTYPE, f"tensor {name!r} dtype {dtype!r}")
        if type(shape) is not list:
            raise HeaderError(path, HeaderProblem.BAD_SHAPE, f"tensor {name!r} shape {shape!r}"[:160])
        numel = 1
        for d in shape:
            if type(d) is not int or not 0 <= d <= _U64_MAX:
                raise HeaderError(path, HeaderProblem.BAD_SHAPE, f"tensor {name!r} shape {shape!r}"[:160])
            numel *= d
        if type(offsets) is not list or len(offsets) != 2:
            raise HeaderError(path, HeaderProblem.BAD_OFFSETS, f"tensor {name!r} data_offsets {offsets!r}"[:160])
        begin, end = offsets
        if type(begin) is not int or type(end) is not int or not 0 <= begin <= end <= _U64_MAX:
            raise HeaderError(path, HeaderProblem.BAD_OFFSETS, f"tensor {name!r} data_offsets {offsets!r}"[:160])
        total_bits = numel * bits
        if total_bits > _U64_MAX:
            raise HeaderError(path, HeaderProblem.SIZE_MISMATCH, f"tensor {name!r} shape {shape} overflows u64")
        if total_bits & 7:
            raise HeaderError(path, HeaderProblem.SUBBYTE_MISALIGNED, f"tensor {name!r} {dtype} {shape}")
        if end - begin != total_bits >> 3:
            raise HeaderError(path, HeaderProblem.SIZE_MISMATCH, f"tensor {name!r} {dtype} {shape} needs "
                              f"{total_bits >> 3} bytes, offsets span {end - begin}")
        entries.append((begin, end, name, dtype, tuple(shape)))

    entries.sort()
    expected = 0
    tensors: dict[str, TensorInfo] = {}
    make = tuple.__new__  # TensorInfo's own __new__ is a Python function; this is the same tuple, built faster
    for begin, end, name, dtype, shape in entries:
        if begin != expected:
            raise HeaderError(path, HeaderProblem.NOT_CONTIGUOUS,
                              f"tensor {name!r} begins at {begin}, expected {expected}")
        expected = end
        tensors[name] = make(TensorInfo, (name, dtype, shape, data_start + begin, data_start + end))
    if data_start + expected != file_size:
        raise HeaderError(path, HeaderProblem.NOT_COVERED,
                          f"tensors end at byte {data_start + expected}, file has {file_size}")
    return SafetensorsHeader(path, len(raw), metadata, tensors, file_size)


def read_tensor_bytes(path: Path, info: TensorInfo) -> bytes:
    """The raw bytes of one tensor, read with one positioned read (the rest of the file is never touched)."""
    with open(path, "rb") as f:
        return os.pread(f.fileno(), info.nbytes, info.start)


# safetensors dtype -> torch dtype name; the sub-byte and complex dtypes have no use in a checkpoint check.
_TORCH_DTYPES: Mapping[str, str] = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32",
    "F32": "float32", "F64": "float64", "I64": "int64", "U64": "uint64",
}


_SAFETENSORS_DTYPES: Mapping[str, str] = {v: k for k, v in _TORCH_DTYPES.items()}


def bytes_to_tensor(info: TensorInfo, data: bytes) -> torch.Tensor:
    """A tensor over `data` (the little-endian bytes of `info`)."""
    import torch

    name = _TORCH_DTYPES.get(info.dtype)
    if name is None:
        raise UserError(f"{info.name}: dtype {info.dtype} cannot be read as a torch tensor; this check does not "
                        "support it")
    dtype = getattr(torch, name)
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(info.shape)


def read_tensor(path: Path, info: TensorInfo) -> torch.Tensor:
    """One tensor, read without loading the rest of the file."""
    return bytes_to_tensor(info, read_tensor_bytes(path, info))


class TensorReader:
    """Positioned reads of many tensors from one open file (the check reads thousands of 4-byte scalars)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)

    def read_bytes(self, info: TensorInfo) -> bytes:
        return self.read_span(info.start, info.end, info.name)

    def read_span(self, start: int, end: int, what: str = "a byte range") -> bytes:
        data = os.pread(self._fd, end - start, start)
        if len(data) != end - start:
            raise UserError(f"{self.path}: {what} is cut short ({len(data)} of {end - start} bytes); "
                            "the file changed while it was read")
        return data

    def read(self, info: TensorInfo) -> torch.Tensor:
        return bytes_to_tensor(info, self.read_bytes(info))

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class RawTensor:
    """A tensor to write: its bytes either in memory or as a byte range of an existing file (copied, not loaded)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes | None = None
    source: Path | None = None
    source_info: TensorInfo | None = None

    @classmethod
    def from_file(cls, path: Path, info: TensorInfo) -> RawTensor:
        return cls(info.name, info.dtype, info.shape, source=path, source_info=info)

    @classmethod
    def from_torch(cls, name: str, t: torch.Tensor) -> RawTensor:
        import torch

        dtype = _SAFETENSORS_DTYPES.get(str(t.dtype).removeprefix("torch."))
        if dtype is None:
            raise UserError(f"{name}: torch dtype {t.dtype} has no safetensors dtype")
        data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return cls(name, dtype, tuple(t.shape), data=data)

    @property
    def nbytes(self) -> int:
        return len(self.data) if self.data is not None else self.source_info.nbytes


_COPY_CHUNK = 64 << 20


def write_safetensors(path: Path, tensors: Iterable[RawTensor], metadata: Mapping[str, str] | None) -> None:
    """Write a safetensors file in the given tensor order; file-backed tensors are copied byte for byte.

    The header is padded with spaces to a multiple of 8 bytes, as the reference writer does, so the data buffer
    stays 8-byte aligned.
    """
    tensors = list(tensors)
    header: dict[str, object] = {}
    if metadata is not None:
        header[_METADATA_KEY] = dict(metadata)
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as out:
        out.write(len(raw).to_bytes(8, "little"))
        out.write(raw)
        for t in tensors:
            if t.data is not None:
                out.write(t.data)
                continue
            with open(t.source, "rb") as src:
                remaining, pos = t.source_info.nbytes, t.source_info.start
                while remaining:
                    chunk = os.pread(src.fileno(), min(remaining, _COPY_CHUNK), pos)
                    if not chunk:
                        raise UserError(f"{t.source}: {t.name} is cut short; the file changed while it was copied")
                    out.write(chunk)
                    remaining -= len(chunk)
                    pos += len(chunk)
