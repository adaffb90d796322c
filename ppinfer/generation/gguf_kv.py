"""Fast, metadata-only GGUF reader for the tokenizer.

`gguf.GGUFReader` builds a Python object per array element, which for a 262k-token
vocabulary (gemma-3) takes ~10 s. The tokenizer needs only the key/value section, so this
module walks that section once over an `mmap`: string arrays are decoded in a single
Python loop and numeric arrays become numpy views, bringing a gemma-3 vocabulary load
well under a second. Tensor infos and data are never touched.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Union

import numpy as np

from ppinfer.errors import ModelFileError

GGUF_MAGIC = b"GGUF"

# GGUF value type ids (gguf spec) -> (struct format, numpy dtype) for fixed-size scalars.
_SCALARS: dict[int, tuple[str, np.dtype]] = {
    0: ("<B", np.dtype("<u1")),
    1: ("<b", np.dtype("<i1")),
    2: ("<H", np.dtype("<u2")),
    3: ("<h", np.dtype("<i2")),
    4: ("<I", np.dtype("<u4")),
    5: ("<i", np.dtype("<i4")),
    6: ("<f", np.dtype("<f4")),
    7: ("<?", np.dtype("?")),
    10: ("<Q", np.dtype("<u8")),
    11: ("<q", np.dtype("<i8")),
    12: ("<d", np.dtype("<f8")),
}
_STRING = 8
_ARRAY = 9

MetaValue = Union[int, float, bool, str, list[str], np.ndarray]


class _Cursor:
    """A little-endian reader over the mapped file that names the file in every error."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf = buf
        self.path = path
        self.off = 0

    def unpack(self, fmt: str) -> int | float | bool:
        size = struct.calcsize(fmt)
        if self.off + size > len(self.buf):
            raise ModelFileError(f"{self.path}: truncated GGUF metadata at byte {self.off}")
        (value,) = struct.unpack_from(fmt, self.buf, self.off)
        self.off += size
        return value

    def string(self) -> str:
        n = int(self.unpack("<Q"))
        end = self.off + n
        if end > len(self.buf):
            raise ModelFileError(f"{self.path}: truncated GGUF string at byte {self.off}")
        # surrogateescape keeps token texts that are not valid UTF-8 byte-exact.
        text = self.buf[self.off : end].decode("utf-8", "surrogateescape")
        self.off = end
        return text

    def string_array(self, count: int) -> list[str]:
        # One tight loop: the hot path for 262k-token vocabularies.
        buf, off, out = self.buf, self.off, []
        unpack_q = struct.Struct("<Q").unpack_from
        size = len(buf)
        append = out.append
        for _ in range(count):
            (n,) = unpack_q(buf, off)
            off += 8
            if off + n > size:
                raise ModelFileError(f"{self.path}: truncated GGUF string array at byte {off}")
            append(buf[off : off + n].decode("utf-8", "surrogateescape"))
            off += n
        self.off = off
        return out

    def value(self, vtype: int, key: str) -> MetaValue:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype][0])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type = int(self.unpack("<I"))
            count = int(self.unpack("<Q"))
            if item_type == _STRING:
                return self.string_array(count)
            if item_type in _SCALARS:
                dtype = _SCALARS[item_type][1]
                nbytes = count * dtype.itemsize
                if self.off + nbytes > len(self.buf):
                    raise ModelFileError(f"{self.path}: truncated array for key {key!r}")
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.off).copy()
                self.off += nbytes
                return arr
            raise ModelFileError(f"{self.path}: key {key!r} has an unsupported array item type {item_type}")
        raise ModelFileError(f"{self.path}: key {key!r} has an unknown GGUF value type {vtype}")


def read_gguf_metadata(path: str | Path, prefixes: tuple[str, ...] = ("tokenizer.", "general.")) -> dict[str, MetaValue]:
    """Return the GGUF key/values whose names start with one of `prefixes`.

    Keys outside `prefixes` are parsed (to advance) but not kept. Raises `ModelFileError`
    for a missing, non-GGUF, big-endian or truncated file, naming the path.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelFileError(f"model file not found: {p}")
    with open(p, "rb") as fh:
        try:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:  # mmap of an empty file
            raise ModelFileError(f"{p}: not a GGUF file (empty)") from exc
    try:
        if buf[:4] != GGUF_MAGIC:
            raise ModelFileError(f"{p}: not a GGUF file (magic {bytes(buf[:4])!r})")
        cur = _Cursor(buf, p)
        cur.off = 4
        version = int(cur.unpack("<I"))
        if version not in (2, 3):
            # A big-endian file reads its version byte-swapped (e.g. 0x03000000).
            raise ModelFileError(f"{p}: unsupported GGUF version {version} (only little-endian v2/v3)")
        cur.unpack("<Q")  # tensor count: not needed for the tokenizer
        n_kv = int(cur.unpack("<Q"))
        out: dict[str, MetaValue] = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = int(cur.unpack("<I"))
            value = cur.value(vtype, key)
            if key.startswith(prefixes):
                out[key] = value
        return out
    finally:
        buf.close()
