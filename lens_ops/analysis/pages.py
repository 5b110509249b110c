"""Give back the memory of file pages already analysed (Linux only, best effort, never changes data).

The engine's loader maps the LoRA file into memory; every page read stays in the process' resident set,
so a whole-file pass would peak at the file size on top of Python and torch. After a batch of modules is
analysed, the pages of their tensors that are clean pages of the file mapping are released with
madvise(MADV_DONTNEED): a later access simply reads them again from the file (the page cache). Pages
that are not plain file pages (copy-on-write copies written by someone, swapped or anonymous memory)
are never touched: /proc/self/pagemap says which pages are file pages, and only those are released.
On any other platform, or when anything is unexpected, this does nothing.
"""
from __future__ import annotations

import ctypes
import os
import sys

import torch

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MADV_DONTNEED = 4
_FILE_PAGE = 1 << 61
_SWAPPED = 1 << 62
_PRESENT = 1 << 63


class PageReleaser:
    def __init__(self, path: str | None):
        self.ranges: list[tuple[int, int]] = []
        self.libc = None
        self.released = 0
        if not path or not sys.platform.startswith("linux"):
            return
        try:
            real = os.path.realpath(path)
            with open("/proc/self/maps") as f:
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) == 6 and parts[5].strip() == real and parts[1].startswith("r") and parts[1][3] == "p":
                        a, b = (int(x, 16) for x in parts[0].split("-"))
                        self.ranges.append((a, b))
            if self.ranges:
                self.libc = ctypes.CDLL(None, use_errno=True)
                self.libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                self.pagemap = open("/proc/self/pagemap", "rb", buffering=0)
        except Exception:
            self.ranges, self.libc = [], None

    def __bool__(self):
        return self.libc is not None

    def release(self, tensors) -> None:
        if self.libc is None:
            return
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.numel() == 0:
                continue
            start = t.data_ptr()
            end = start + t.numel() * t.element_size()
            for a, b in self.ranges:
                s, e = max(start, a), min(end, b)
                if s < e:
                    self._release_range((s + PAGE - 1) // PAGE * PAGE, e // PAGE * PAGE)

    def _release_range(self, s: int, e: int) -> None:
        if e <= s:
            return
        try:
            n = (e - s) // PAGE
            self.pagemap.seek((s // PAGE) * 8)
            raw = self.pagemap.read(n * 8)
            if len(raw) != n * 8:
                return
            flags = memoryview(raw).cast("Q")
            run = None
            for i in range(n + 1):
                ok = i < n and (flags[i] & _PRESENT) and (flags[i] & _FILE_PAGE) and not (flags[i] & _SWAPPED)
                if ok and run is None:
                    run = i
                elif not ok and run is not None:
                    if self.libc.madvise(s + run * PAGE, (i - run) * PAGE, MADV_DONTNEED) == 0:
                        self.released += (i - run) * PAGE
                    run = None
        except Exception:
            return

    def close(self):
        if self.libc is not None:
            try:
                self.pagemap.close()
            except Exception:
                pass
