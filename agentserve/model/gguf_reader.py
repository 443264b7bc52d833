"""A GGUF file's metadata and tensor table, read without decoding its vocabulary.

The gguf library's GGUFReader turns every value of every metadata array into numpy views when it
opens a file: a 49k-token vocabulary with its merges is ~100k strings and ~2.5M numpy calls, 2-6 s
on a CPU core before a single weight is read (three times that for a 128k Llama 3 vocabulary). The
loader needs a few dozen scalars and the tensor table, so this reader walks the same layout with
`struct` and keeps string arrays as (offset, count) until someone asks for their contents.

Layout (llama.cpp's gguf.md, versions 2 and 3): "GGUF", version u32, tensor count u64, key/value
count u64; then each key (u64 length + UTF-8) with its value type (u32) and value (a scalar, a
string, or an array: item type u32, count u64, items); then each tensor's name, dimension count
(u32), dimensions (u64 each, innermost first), ggml type (u32) and data offset (u64); then the data,
from the next multiple of `general.alignment` (32 unless given). Tensors are numpy views of the
memory-mapped file, typed as GGUFReader types them, so gguf.quants.dequantize reads them alike.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS: ggml tensors have at most four dimensions
_STRING, _ARRAY = 8, 9
# GGUFValueType -> struct format of its scalars.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
# ggml types GGUFReader exposes as typed arrays of their elements (every other type as raw bytes).
_ELEMENT_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                   "I32": np.int32, "I64": np.int64}


@dataclass(frozen=True)
class StringArray:
    """A metadata array of strings, decoded only when its value is asked for."""

    offset: int  # of the first item's length
    count: int


@dataclass(frozen=True)
class NumberArray:
    """A metadata array of numbers (token scores, token types, ...), decoded only when asked for."""

    offset: int
    count: int
    item_format: str  # struct's


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml's order: the innermost dimension first
    tensor_type: Any  # gguf.GGMLQuantizationType
    data: np.ndarray  # elements (F32, F16, ...) or the raw blocks of a quantized type, in C order


class GGUFFile:
    """One .gguf file: `value(key)` for its metadata, `tensors` for its tensor table. Raises
    ValueError when the file is not GGUF, is a version this cannot read, or ends early."""

    def __init__(self, path: Union[str, Path]) -> None:
        with open(path, "rb") as f:  # (the mapping outlives the descriptor)
            self._data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._order: Literal["<", ">"] = "<"
        self._fields: dict[str, Any] = {}
        try:
            self._parse()
        except (struct.error, OverflowError) as e:  # a length or count running past the end of the file
            raise ValueError(f"the file ends inside its header or metadata ({e})") from None

    def _parse(self) -> None:
        if self._data[:4] != GGUF_MAGIC:
            raise ValueError("not a GGUF file (no GGUF magic)")
        (version,) = struct.unpack_from("<I", self._data, 4)
        # A file written on a big-endian machine reads as version << 16 or more here (GGUFReader's test).
        self._order = "<" if version & 0xFFFF else ">"
        if self._order == ">":
            (version,) = struct.unpack_from(">I", self._data, 4)
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(f"GGUF version {version} is not supported (only {SUPPORTED_VERSIONS})")
        tensor_count, kv_count = self._unpack("QQ", 8)
        offset = 24
        for _ in range(kv_count):
            key, offset = self._string(offset)
            (value_type,) = self._unpack("I", offset)
            if key in self._fields:
                raise ValueError(f"metadata key {key!r} appears twice")
            self._fields[key], offset = self._value(value_type, offset + 4)
        infos = []
        for _ in range(tensor_count):
            name, offset = self._string(offset)
            (n_dims,) = self._unpack("I", offset)
            if n_dims > MAX_DIMS:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions (ggml allows at most {MAX_DIMS})")
            dims = self._unpack("Q" * n_dims, offset + 4)
            offset += 4 + 8 * n_dims
            ggml_type, data_offset = self._unpack("IQ", offset)
            offset += 12
            infos.append((name, tuple(int(d) for d in dims), ggml_type, data_offset))
        alignment = self._fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment {alignment!r} is not a power of two")
        start = -(-offset // alignment) * alignment
        self.tensors = self._tensors(infos, start)

    def _unpack(self, fmt: str, offset: int) -> tuple[Any, ...]:
        if offset > len(self._data):  # (an offset past the end came from a corrupted length or count)
            raise ValueError("the file ends inside its header or metadata")
        return struct.unpack_from(self._order + fmt, self._data, offset)

    def _string(self, offset: int) -> tuple[str, int]:
        (length,) = self._unpack("Q", offset)
        end = offset + 8 + length
        if length > len(self._data) - offset - 8:
            raise ValueError("the file ends inside a string")
        return self._data[offset + 8:end].decode("utf-8", errors="replace"), end

    def _value(self, value_type: int, offset: int) -> tuple[Any, int]:
        fmt = _SCALAR_FORMATS.get(value_type)
        if fmt is not None:
            return self._unpack(fmt, offset)[0], offset + struct.calcsize("<" + fmt)
        if value_type == _STRING:
            return self._string(offset)
        if value_type != _ARRAY:
            raise ValueError(f"unknown metadata value type {value_type}")
        item_type, count = self._unpack("IQ", offset)
        offset += 12
        item_fmt = _SCALAR_FORMATS.get(item_type)
        if item_fmt is not None:  # numbers: one unpack for the whole array
            size = struct.calcsize("<" + item_fmt)
            if count > (len(self._data) - offset) // size:
                raise ValueError("the file ends inside a metadata array")
            return NumberArray(offset, count, item_fmt), offset + size * count
        if item_type == _STRING:  # skip over the strings, reading only their lengths
            first = offset
            for _ in range(count):
                offset += 8 + self._unpack("Q", offset)[0]
            if offset > len(self._data):
                raise ValueError("the file ends inside a string array")
            return StringArray(first, count), offset
        items = []  # arrays of arrays: rare, their items listed
        for _ in range(count):
            item, offset = self._value(item_type, offset)
            items.append(item)
        return items, offset

    def _tensors(self, infos: list[tuple[str, tuple[int, ...], int, int]], start: int) -> list[GGUFTensor]:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        tensors, names = [], set()
        for name, dims, raw_type, data_offset in infos:
            if name in names:
                raise ValueError(f"tensor {name!r} appears twice")
            names.add(name)
            try:
                ggml_type = GGMLQuantizationType(raw_type)
            except ValueError:
                raise ValueError(f"tensor {name!r} has unknown ggml type {raw_type}") from None
            block_size, type_size = GGML_QUANT_SIZES[ggml_type]
            elements = math.prod(dims)  # (exact: corrupted dimensions must not wrap around)
            np_shape = tuple(reversed(dims))
            dtype = _ELEMENT_DTYPES.get(ggml_type.name)
            if dtype is None:
                dtype, np_shape = np.uint8, quant_shape_to_byte_shape(np_shape, ggml_type)
                nbytes = elements * type_size // block_size
            else:
                nbytes = elements * np.dtype(dtype).itemsize
            begin = start + data_offset
            if begin + nbytes > len(self._data):
                raise ValueError(f"tensor {name!r} runs past the end of the file")
            element = np.dtype(dtype).newbyteorder(self._order)
            data = np.frombuffer(self._data, dtype=element, count=nbytes // element.itemsize, offset=begin)
            tensors.append(GGUFTensor(name, dims, ggml_type, data.reshape(np_shape)))
        return tensors

    def keys(self) -> list[str]:
        return list(self._fields)

    def has(self, key: str) -> bool:
        return key in self._fields

    def value(self, key: str, default: Any = None) -> Any:
        """The value of a metadata key (an array comes back as a list)."""
        return self._contents(self._fields.get(key, default))

    def _contents(self, value: Any) -> Any:
        if isinstance(value, StringArray):
            items, offset = [], value.offset
            for _ in range(value.count):
                item, offset = self._string(offset)
                items.append(item)
            return items
        if isinstance(value, NumberArray):
            return list(self._unpack(f"{value.count}{value.item_format}", value.offset))
        if isinstance(value, list):  # an array of arrays
            return [self._contents(item) for item in value]
        return value
