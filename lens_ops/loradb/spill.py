"""Float32 arrays parked in a temporary file and read back through a private memory map.

Lossy packing needs every module's exact SVD factors of every LoRA at once (a module's shared basis is
chosen across all LoRAs; each LoRA's step is water-filled across all its modules). Held in RAM that is
several times the collection's size (ten SDXL rank-32 LoRAs needed more than 24 GB). Parked here, the
factors live in the page cache: the kernel keeps them while memory is free and drops them when it is
not (clean file pages), so the collection size is bounded by disk, not RAM.
"""
from __future__ import annotations

import mmap
import os
import tempfile

import numpy as np


class Spill:
    """Append-only store: `put(array) -> ref`, `get(ref) -> read-only float32 numpy view` (copy it to
    compute in place). Close removes the file."""

    def __init__(self, folder: str | None = None):
        fd, self.path = tempfile.mkstemp(prefix=".lens-spill-", suffix=".f32", dir=folder)
        self._f = os.fdopen(fd, "w+b")
        self.size = 0
        self._mm = None

    def put(self, x) -> tuple[int, tuple[int, ...]]:
        a = np.ascontiguousarray(x.numpy() if hasattr(x, "numpy") else x, dtype=np.float32)
        off = self.size
        if a.size:
            self._f.write(memoryview(a.reshape(-1)).cast("B"))
        self.size += a.nbytes
        return off, tuple(a.shape)

    def get(self, ref) -> np.ndarray:
        off, shape = ref
        n = int(np.prod(shape, dtype=np.int64))
        if n == 0:
            return np.zeros(shape, np.float32)
        if self._mm is None or off + 4 * n > len(self._mm):
            self._f.flush()   # map everything written so far (earlier maps live on while views use them)
            self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(self._mm, dtype=np.float32, count=n, offset=off).reshape(shape)

    def release(self) -> None:
        """Unmap the pages read so far from this process (they stay in the page cache; views re-read them on
        use), so the parked factors do not count as resident memory while they are not in use."""
        if self._mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED)

    def close(self):
        self._mm = None
        try:
            self._f.close()
        finally:
            try:
                os.unlink(self.path)
            except OSError:   # already gone, or still mapped on Windows: the caller's temp folder cleanup retries
                pass
