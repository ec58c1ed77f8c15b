"""The safetensors file format, read zero-copy and written as a stream.

A safetensors file is: 8 bytes little-endian ``N``, then ``N`` bytes of JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data
section, where each tensor's bytes lie at ``[begin, end)`` (relative to the data section's start).

Reading parses the header ourselves and maps the file (``mmap``), so tensors are views of the file's
pages: nothing is read until used, and nothing is copied. Writing a whole file at once goes through
``safetensors.torch.save_file``; :func:`write_streaming` writes one whose tensors are produced one
chunk at a time (the header first, from known shapes), for files larger than memory.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as it claims to be; the message names the file, the tensor,
    what was expected and what was found."""


# safetensors dtype name → torch dtype (only those a gpt-oss checkpoint may hold, plus a few neighbours
# so that a wrong dtype is reported as wrong rather than unknown).
DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

_HEADER_LEN_BYTES = 8  # little-endian u64
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    nbytes: int


class SafetensorsFile:
    """One safetensors file: header parsed and checked against the file size; tensors memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors, self.metadata = read_header(self.path)
        self._mmap: mmap.mmap | None = None

    def __len__(self) -> int:
        return len(self.tensors)

    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            with open(self.path, "rb") as f:
                # ACCESS_COPY: a private mapping, so the buffer is writable (torch wants one) while
                # the file itself can never be changed through it; pages are shared until written.
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mmap

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as a view of the mapped file (zero-copy)."""
        info = self.tensors[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        flat = torch.frombuffer(self._map(), dtype=info.dtype, count=math.prod(info.shape), offset=info.begin)
        return flat.view(info.shape)

    def mapped_range(self) -> tuple[int, int]:
        """Address range [start, end) of the mapping (for tests that check tensors are views of it)."""
        import ctypes

        m = self._map()
        start = ctypes.addressof(ctypes.c_char.from_buffer(m))
        return start, start + len(m)


def _is_count(x: object) -> bool:
    """A non-negative JSON integer (``True``/``1.0`` are not)."""
    return type(x) is int and x >= 0


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header: every entry an object with a known dtype, a shape of
    non-negative integers and data_offsets ``[begin, end]`` of non-negative integers spanning
    numel × itemsize bytes, inside the file (a truncated file is reported, naming the first tensor cut
    off) and overlapping no other tensor's; ``__metadata__`` (optional) an object of strings.

    Errors name the file by the path given (so ``original/model.safetensors`` and a root
    ``model.safetensors`` are told apart)."""
    name = str(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(_HEADER_LEN_BYTES)
            if len(head) < _HEADER_LEN_BYTES:
                raise CheckpointError(f"{name}: expected a safetensors file (8-byte header length first), "
                                      f"found a file of {size} bytes")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER_BYTES or _HEADER_LEN_BYTES + n > size:
                raise CheckpointError(f"{name}: expected a JSON header of {n} bytes after the 8-byte length, "
                                      f"found a file of only {size} bytes (truncated or not safetensors)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read ({e})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{name}: expected a JSON header, found bytes that are not JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: expected a JSON object as header, found {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # absent or null: none (as safetensors reads it)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        found = type(metadata).__name__ if not isinstance(metadata, dict) else repr(metadata)
        raise CheckpointError(f"{name}: __metadata__: expected an object of strings, found {found}")
    data_start = _HEADER_LEN_BYTES + n
    data_size = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for tname, entry in header.items():
        where = f"{name}: tensor {tname!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise CheckpointError(f"{where}: expected a header entry with dtype, shape and data_offsets, "
                                  f"found {entry!r}")
        dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise CheckpointError(f"{where}: expected a dtype among {', '.join(DTYPES)}, found {dtype_name!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{where}: expected a shape of non-negative integers, found {shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise CheckpointError(f"{where}: expected data_offsets [begin, end] of non-negative integers, "
                                  f"found {offsets!r}")
        shape, (begin, end) = tuple(shape), offsets
        dtype = DTYPES[dtype_name]
        nbytes = math.prod(shape) * dtype.itemsize
        if begin > end or end - begin != nbytes:
            raise CheckpointError(f"{where}: expected data_offsets spanning {nbytes} bytes ({dtype_name} "
                                  f"{list(shape)}), found {[begin, end]}")
        if end > data_size:
            raise CheckpointError(f"{where}: expected its data at bytes [{begin}, {end}) of the data section, "
                                  f"found the data section only {data_size} bytes long (file truncated: "
                                  f"{size} bytes, needs at least {data_start + end})")
        tensors[tname] = TensorInfo(tname, dtype, shape, data_start + begin, nbytes)
    spans = sorted((t.begin, t.begin + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise CheckpointError(f"{name}: tensor {b!r}: expected its data_offsets to overlap no other tensor's, "
                                  f"found them overlapping those of {a!r}")
    return tensors, metadata


# ---- writing -----------------------------------------------------------------------------------------

def save_file(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a whole file with safetensors' own writer (metadata ``{"format": "pt"}``, as torch saves)."""
    from safetensors.torch import save_file as _save

    _save({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def write_streaming(path: str | Path, entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                    produce: Callable[[str], Iterator[torch.Tensor]],
                    on_bytes: Callable[[int], None] | None = None) -> None:
    """Write a safetensors file whose tensors are produced chunk by chunk, in the order of ``entries``.

    ``produce(name)`` yields contiguous chunks (split along dim 0) whose bytes, concatenated, are the
    tensor; only one chunk is held at a time. The header is written first, from the declared shapes.
    ``on_bytes(n)`` (progress) is told of each chunk's bytes once written.
    """
    entries = list(entries)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"{path}: tensor {name!r}: declared dtype {dtype}, expected one of "
                             f"{', '.join(str(d) for d in DTYPE_NAMES)}")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data section starts 8-byte aligned, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in entries:
            expected, written = math.prod(shape) * dtype.itemsize, 0
            for chunk in produce(name):
                if chunk.dtype != dtype:
                    raise ValueError(f"{path}: tensor {name!r}: produced {chunk.dtype}, declared {dtype}")
                data = chunk.contiguous().view(torch.uint8).numpy()
                f.write(memoryview(data))
                written += data.nbytes
                if on_bytes is not None:
                    on_bytes(data.nbytes)
            if written != expected:
                raise ValueError(f"{path}: tensor {name!r}: produced {written} bytes, declared {expected} "
                                 f"({list(shape)})")
        f.flush()
        os.fsync(f.fileno())
