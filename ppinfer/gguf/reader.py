"""A fast, strict GGUF reader: metadata, tensor index, and per-tensor dequantization.

The file is memory-mapped once; metadata is parsed eagerly (string arrays such as a 262k-token
vocabulary included: ~0.2 s), tensor bytes are touched only when a tensor is loaded, so a stage
that loads a slice of the layers never pages in another stage's weights. Every structural
problem (missing file, wrong magic or version, truncation, an offset past the end of the file,
a tensor not where llama.cpp's layout puts it, a duplicate key or tensor, an unknown type)
raises `ModelFileError` naming the file and, where relevant, the key or tensor.

gguf-py's own `GGUFReader` builds Python objects for every array element and is 10-50x slower
to open on real vocabularies; its dequantization kernels (`gguf.quants`) are used as they are.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from ppinfer.errors import ModelFileError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
_CHUNK_ELEMENTS = 1 << 20  # dequantize at most this many values (4 MB of float32) at once

# GGUF metadata value types -> (struct format, size) for scalars.
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_NUMPY_OF: dict[int, str] = {
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<?",
    10: "<u8", 11: "<i8", 12: "<f8",
}
_STRING, _ARRAY = 8, 9

# Types gguf.quants can turn into float32 (checked against gguf 0.19; see gguf-families.md §1).
_FLOAT_TYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


def _dequantizable(qtype: GGMLQuantizationType) -> bool:
    """True when gguf-py has a float32 dequantizer for `qtype`."""
    if qtype in _FLOAT_TYPES:
        return True
    return qtype in gguf_quants._type_traits


SUPPORTED_TENSOR_TYPES: tuple[str, ...] = tuple(
    t.name for t in GGMLQuantizationType if _dequantizable(t)
)


_INTEGER, _FLOAT = "an integer (or one per layer)", "a floating-point number"
_VALUE_KINDS: dict[str, str] = {
    "context_length": _INTEGER,
    "embedding_length": _INTEGER,
    "block_count": _INTEGER,
    "feed_forward_length": _INTEGER,
    "attention.head_count": _INTEGER,
    "attention.head_count_kv": _INTEGER,
    "attention.key_length": _INTEGER,
    "attention.value_length": _INTEGER,
    "rope.dimension_count": _INTEGER,
    "attention.layer_norm_epsilon": _FLOAT,
    "attention.layer_norm_rms_epsilon": _FLOAT,
    "rope.freq_base": _FLOAT,
    "rope.freq_base_swa": _FLOAT,
    "rope.scaling.factor": _FLOAT,
    "attention.scale": _FLOAT,
    "attn_logit_softcapping": _FLOAT,
    "final_logit_softcapping": _FLOAT,
}
"""`{arch}.` keys whose value kind is fixed (integers of any width: llama.cpp writes uint32
where the spec says uint64)."""


def _is_kind(value: Any, kind: str) -> bool:
    if kind == _FLOAT:
        return type(value) is float
    if isinstance(value, np.ndarray):  # per-layer counts
        return value.dtype.kind in "iu"
    return type(value) is int  # bool, an int subclass, is not a count


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file. `shape` is torch order ([out, in] for a 2-D weight)."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class _Cursor:
    """Bounds-checked little-endian reads over the mapped header."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int, what: str) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise ModelFileError(
                f"{self.path}: truncated or corrupt GGUF header while reading {what} "
                f"(needs bytes {self.pos}..{end}, file has {len(self.buf)})"
            )
        view = memoryview(self.buf)[self.pos:end]
        self.pos = end
        return view

    def scalar(self, fmt: str, size: int, what: str) -> Any:
        return struct.unpack(fmt, self.take(size, what))[0]

    def u32(self, what: str) -> int:
        return self.scalar("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(what)
        raw = self.take(n, what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelFileError(f"{self.path}: {what} is not valid UTF-8") from exc

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALARS:
            return self.scalar(*_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            itype, count = self.u32(what), self.u64(what)
            if itype in _NUMPY_OF:
                dtype = np.dtype(_NUMPY_OF[itype])
                raw = self.take(count * dtype.itemsize, what)
                return np.frombuffer(raw, dtype=dtype).copy()
            if itype == _STRING:
                return [self.string(what) for _ in range(count)]
            return [self.value(itype, what) for _ in range(count)]
        raise ModelFileError(f"{self.path}: unknown GGUF value type {vtype} in {what}")


class GGUFFile:
    """An open GGUF file: `metadata` (key -> value), `tensors` (name -> TensorInfo)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise ModelFileError(f"model file not found: {self.path}")
        if not self.path.is_file():
            raise ModelFileError(f"{self.path}: not a regular file (a directory or a device?)")
        try:
            with open(self.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < 24:
                    raise ModelFileError(f"{self.path}: not a GGUF file ({size} bytes)")
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise ModelFileError(f"model file not readable: {self.path} ({exc.strerror or exc})") from exc
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse()

    def _parse(self) -> None:
        cur = _Cursor(self._map, self.path)
        magic = bytes(cur.take(4, "magic"))
        if magic != GGUF_MAGIC:
            raise ModelFileError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        version = cur.u32("version")
        if version not in SUPPORTED_VERSIONS:
            raise ModelFileError(
                f"{self.path}: unsupported GGUF version {version} (supported: {SUPPORTED_VERSIONS}; "
                "a big-endian file also reads as a huge version)"
            )
        n_tensors, n_kv = cur.u64("tensor count"), cur.u64("metadata count")
        if n_tensors > len(self._map) or n_kv > len(self._map):
            raise ModelFileError(f"{self.path}: corrupt header ({n_tensors} tensors, {n_kv} keys)")
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            if key in self.metadata:
                raise ModelFileError(f"{self.path}: metadata key {key!r} appears twice")
            self.metadata[key] = cur.value(cur.u32(f"type of {key}"), f"metadata {key!r}")
        infos = []
        for i in range(n_tensors):
            name = cur.string(f"tensor name #{i}")
            n_dims = cur.u32(f"dims of tensor {name!r}")
            if n_dims > 4:
                raise ModelFileError(f"{self.path}: tensor {name!r} has {n_dims} dims (max 4)")
            ne = [cur.u64(f"shape of tensor {name!r}") for _ in range(n_dims)]
            raw_type = cur.u32(f"type of tensor {name!r}")
            offset = cur.u64(f"offset of tensor {name!r}")
            infos.append((name, ne, raw_type, offset))
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        # bool is an int subclass; an alignment stored as any other type is a corrupt header.
        if type(align) is not int or align <= 0 or align & (align - 1):
            raise ModelFileError(f"{self.path}: general.alignment={align!r} is not a power of two")
        data_start = -(-cur.pos // align) * align
        # llama.cpp's rule: tensors are stored in the order of their infos, each one padded to
        # the alignment. Checking it turns a corrupt offset, shape or type (each of which
        # changes where a tensor's bytes are) into an error instead of weights read from the
        # wrong place.
        expected = 0
        for name, ne, raw_type, offset in infos:
            if name in self.tensors:
                raise ModelFileError(f"{self.path}: tensor {name!r} appears twice")
            info = self._tensor_info(name, ne, raw_type, data_start + offset)
            if offset != expected:
                raise ModelFileError(
                    f"{self.path}: tensor {name!r} starts at data offset {offset}, expected "
                    f"{expected} (right after the previous tensor, padded to {align} bytes)"
                )
            expected += -(-info.n_bytes // align) * align
            self.tensors[name] = info
        if data_start + expected < len(self._map):
            raise ModelFileError(
                f"{self.path}: {len(self._map) - data_start - expected} bytes follow the last "
                f"tensor's data (corrupt tensor count or tensor info?)"
            )
        self._check_value_kinds()

    def _check_value_kinds(self) -> None:
        """The standard hyperparameter keys must hold the kind of value the GGUF spec gives
        them, as llama.cpp's loader insists: read as another type, the same bytes are a
        different number (an epsilon of 1e-5 stored as float32 reads as 925353388 as uint32)."""
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            return
        for suffix, kind in _VALUE_KINDS.items():
            key = f"{arch}.{suffix}"
            if key in self.metadata and not _is_kind(self.metadata[key], kind):
                raise ModelFileError(
                    f"{self.path}: metadata {key!r} holds {self.metadata[key]!r}, expected {kind}"
                )

    def _tensor_info(self, name: str, ne: list[int], raw_type: int, offset: int) -> TensorInfo:
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ModelFileError(
                f"{self.path}: tensor {name!r} has unknown GGML type id {raw_type}"
            ) from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        if not ne or min(ne) < 1 or ne[0] % block:
            raise ModelFileError(
                f"{self.path}: tensor {name!r} shape {ne} is not a whole number of "
                f"{qtype.name} blocks of {block}"
            )
        # Python ints: a corrupt dimension must not overflow into a small (or negative) size.
        n_bytes = math.prod(ne) // block * type_size
        if offset + n_bytes > len(self._map):
            raise ModelFileError(
                f"{self.path}: tensor {name!r} ends at byte {offset + n_bytes} but the file has "
                f"{len(self._map)} bytes (truncated file?)"
            )
        return TensorInfo(name, tuple(int(d) for d in reversed(ne)), qtype, offset, n_bytes)

    # ---- metadata -------------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise ModelFileError(f"{self.path}: required metadata key {key!r} is missing")
        return self.metadata[key]

    # ---- tensors --------------------------------------------------------------------------

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise ModelFileError(f"{self.path}: required tensor {name!r} is missing")
        return self.tensors[name]

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored bytes as a zero-copy view: `[*shape[:-1], bytes_per_row]` uint8."""
        info = self.info(name)
        flat = np.frombuffer(self._map, dtype=np.uint8, count=info.n_bytes, offset=info.offset)
        return flat.reshape(*info.shape[:-1], -1)

    def load(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Dequantize one tensor to float32 (`[out, in]` for weights), checking its shape.

        Large tensors are dequantized a block of rows at a time into the result, since
        gguf-py's kernels make several full-size temporaries: loading a 113 MB output head
        in one call would briefly cost three times that.
        """
        info = self.check_shape(name, shape)
        if len(info.shape) < 2 or info.n_elements <= _CHUNK_ELEMENTS:
            out = dequantize(self.raw(name), info.qtype, f"{self.path}: tensor {name!r}")
            if out.base is not None and info.qtype == GGMLQuantizationType.F32:
                out = out.copy()  # not a view of the mapping we are about to release
        else:
            out = np.empty(info.shape, dtype=np.float32)
            for start, stop in self.row_blocks(name, _CHUNK_ELEMENTS):
                out[start:stop] = self.load_rows(name, start, stop)
        self.release(name)
        return out

    def check_shape(self, name: str, shape: tuple[int, ...] | None) -> TensorInfo:
        info = self.info(name)
        if shape is not None and tuple(shape) != info.shape:
            raise ModelFileError(
                f"{self.path}: tensor {name!r} has shape {list(info.shape)}, "
                f"expected {list(shape)}"
            )
        return info

    def row_blocks(self, name: str, max_elements: int) -> list[tuple[int, int]]:
        """[start, stop) ranges of first-dimension rows of at most `max_elements` values each."""
        info = self.info(name)
        rows = info.shape[0]
        step = max(1, max_elements // max(1, info.n_elements // rows))
        return [(start, min(start + step, rows)) for start in range(0, rows, step)]

    def load_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor, dequantized to float32 (a new array)."""
        info = self.info(name)
        out = dequantize(self.raw(name)[start:stop], info.qtype, f"{self.path}: tensor {name!r}")
        return out.copy() if out.base is not None and info.qtype == GGMLQuantizationType.F32 else out

    def release(self, name: str) -> None:
        """Drop the stored bytes of a dequantized tensor from this process's resident set
        (they stay in the OS page cache): a stage's peak memory is then its float weights,
        not its weights plus the file pages it read them from."""
        info = self.info(name)
        page = mmap.PAGESIZE
        start = info.offset - info.offset % page
        self._map.madvise(mmap.MADV_DONTNEED, start, info.offset + info.n_bytes - start)

    def check_tensor_types(self) -> None:
        """Raise `ModelFileError` naming the first tensor stored in a type that cannot be
        dequantized. Checking the whole file up front gives every rank the same verdict, not
        only the rank whose layers hold that tensor."""
        for info in self.tensors.values():
            if not _dequantizable(info.qtype):
                raise ModelFileError(
                    f"{self.path}: tensor {info.name!r} is stored as {info.qtype.name}, which "
                    f"cannot be dequantized (supported: {', '.join(SUPPORTED_TENSOR_TYPES)})"
                )

    def close(self) -> None:
        self._map.close()


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, what: str) -> np.ndarray:
    """Raw blocks `[..., bytes_per_row]` -> float32 `[..., row_len]`."""
    if qtype in _FLOAT_TYPES:
        return raw.view(_FLOAT_TYPES[qtype]).astype(np.float32, copy=qtype != GGMLQuantizationType.F32)
    if not _dequantizable(qtype):
        raise ModelFileError(
            f"{what} is stored as {qtype.name}, which cannot be dequantized "
            f"(supported: {', '.join(SUPPORTED_TENSOR_TYPES)})"
        )
    return gguf_quants.dequantize(raw, qtype)
