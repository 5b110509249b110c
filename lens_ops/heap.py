"""Hand freed heap memory back to the system between big steps.

glibc's mmap threshold grows after large frees, so later temporaries come from the (fragmenting) heap and
their freed space stays counted against the process: measured +470 MiB resident on a streamed FLUX concat
blend that holds nothing, and growth from LoRA to LoRA when coding a lossy .loradb. `malloc_trim(0)` returns
it; elsewhere (no glibc) this is a no-op.
"""
from __future__ import annotations

import ctypes


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def trim_heap() -> None:
    if _TRIM is not None:
        _TRIM(0)
