"""Giving the memory of a prefill's activations back to the system (CPU, glibc).

torch's CPU tensors come from the C library's malloc. glibc serves a freed block of more
than its mmap threshold from its heap the next time (the threshold rises to the largest block
freed, up to 32 MiB), and a heap keeps its pages once touched unless the free memory sits at
its very top. A prefill chunk of a large lane allocates tens of megabytes of short-lived
activations (hidden states, queries, gathered keys, masks), so after a burst of prefills the
process holds them as free heap pages: on a small model with 64 rows of 500-token prompts,
about as much again as the keys and values the prompts cached. `malloc_trim` hands those
pages back (free memory inside the heap too, not only its top).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def trim_heap() -> bool:
    """Return the C heap's free pages to the system; False where that is not possible."""
    return _TRIM is not None and bool(_TRIM(0))
