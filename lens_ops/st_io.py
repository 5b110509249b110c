"""Safetensors reading and writing with a strict header check and atomic writes.

safetensors itself rejects most damaged files, but with messages users cannot act on; the header is
checked first (st_header.read_header: size, JSON, dtypes, shapes, offsets) so every problem is one clear sentence and no
tensor is read from a file that lies about its layout. Reading goes through `safe_open` (memory-mapped,
one tensor at a time: no whole-file copy); writing goes to a temporary file next to the target and is
renamed into place, so a failure never leaves a half-written file and never touches the input.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import tempfile
from typing import Callable

import torch
from safetensors import safe_open

from .errors import LensError
from .file_mode import new_file_mode
from .st_header import read_header  # noqa: F401  (re-exported: callers read headers through st_io)


def load_file(path: str, keys: list[str] | None = None, device: str | torch.device = "cpu",
              progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read tensors (all, or `keys`) and metadata from a validated safetensors file, in file order."""
    entries, metadata, _ = read_header(path)
    wanted = list(entries) if keys is None else [k for k in entries if k in set(keys)]
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            for i, k in enumerate(wanted):
                tensors[k] = f.get_tensor(k)
                if progress is not None:
                    progress(i + 1, len(wanted))
    except LensError:
        raise
    except Exception as e:  # safetensors' own errors on content we did not predict
        raise LensError(f"{os.path.basename(path)} could not be read: {e}.") from e
    return tensors, metadata


class MappedFile:
    """A validated safetensors file mapped into memory: tensors are zero-copy views, pages come on touch.

    For one pass over a multi-GB LoRA (prune, quantize) copying the whole file first costs time and
    doubles the memory. The mapping is private (copy-on-write), so a tensor written to in place never
    reaches the file. `release(tensors)` hands the pages behind tensors that are done with back to the
    kernel (they stay in the page cache; touching them again re-reads them), so the resident memory of
    a streamed job stays near one module's worth instead of the whole file.
    """

    def __init__(self, path: str, past_end: dict | None = None):
        self.path = path
        self.entries, self.metadata, self.data_start = read_header(path, past_end)
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._anchor = ctypes.c_char.from_buffer(self._mm)  # keeps the buffer exported while views live
        self._base = ctypes.addressof(self._anchor)
        self.size = len(self._mm)

    def tensor(self, key: str) -> torch.Tensor:
        e = self.entries[key]
        dtype = ST_TO_TORCH.get(e["dtype"])
        if dtype is None:
            raise LensError(f"{os.path.basename(self.path)}: tensor {key!r} has dtype {e['dtype']}, which "
                            "this torch cannot represent.")
        a, b = e["data_offsets"]
        shape = tuple(e["shape"])
        if b == a:
            return torch.empty(shape, dtype=dtype)
        start = self.data_start + a
        raw = torch.frombuffer(self._mm, dtype=torch.uint8, count=b - a, offset=start)
        if start % raw.new_empty((), dtype=dtype).element_size():
            raw = raw.clone()  # misaligned for its dtype: an aligned copy
        return raw.view(dtype).reshape(shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: self.tensor(k) for k in self.entries}

    def release(self, tensors) -> None:
        """Give back the resident pages under these tensors (views of this mapping; others are ignored)."""
        page = mmap.PAGESIZE
        spans = []
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or not t.numel():
                continue
            start = t.data_ptr() - self._base
            end = start + t.numel() * t.element_size()
            if 0 <= start and end <= self.size:
                spans.append((start - start % page, min(self.size, end + (-end % page))))
        spans.sort()
        merged = []
        for lo, hi in spans:  # adjacent tensors (the usual file order) become one call
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        for lo, hi in merged:
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            except (AttributeError, OSError, ValueError):
                return  # no madvise here: pages are simply kept


ST_TO_TORCH = {}


TORCH_TO_ST = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e4m3fn: "F8_E4M3",
               torch.float8_e5m2: "F8_E5M2", torch.int16: "I16", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int32: "I32", torch.float32: "F32", torch.int64: "I64", torch.float64: "F64",
               torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64"}


ST_TO_TORCH.update({v: k for k, v in TORCH_TO_ST.items()})


def save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict | None = None) -> None:
    """Write safetensors with the header in the given key and metadata order, tensors streamed in order.

    The safetensors library writes metadata in hash order (different bytes on every save); writing the
    format here keeps a file that was read and written back identical to the byte.
    """
    entries: dict = {}
    offset = 0
    for k, t in tensors.items():
        entries[k] = _entry(k, t, offset)
        offset = entries[k]["data_offsets"][1]
    raw = _header_bytes(entries, metadata)
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            if t.numel():
                f.write(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().data)


def _temp_file(folder: str) -> tuple[int, str]:
    """mkstemp next to the target, with the permissions a new file of the user's gets."""
    fd, tmp = tempfile.mkstemp(prefix=".lens-", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, new_file_mode())
    except (AttributeError, OSError):   # no fchmod (Windows): the file keeps mkstemp's mode
        pass
    return fd, tmp


def atomic_write(path: str, write: Callable[[str], None], forbid: tuple[str, ...] = ()) -> str:
    """`write(temp_path)` next to `path`, then rename into place: readers never see half a file, and nothing
    is left behind on an error; refuses to overwrite any path in `forbid`."""
    target = _writable_target(path, forbid)
    fd, tmp = _temp_file(os.path.dirname(target) or ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def atomic_save(tensors: dict[str, torch.Tensor], path: str, metadata: dict | None = None,
                forbid: tuple[str, ...] = ()) -> str:
    """Write a safetensors file via temp file + rename; refuse to overwrite any path in `forbid`."""
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta or None), forbid)


def _writable_target(path: str, forbid: tuple[str, ...]) -> str:
    """Absolute output path, its folder created; refuses a path that is one of the inputs in `forbid`."""
    target = os.path.abspath(path)
    for p in forbid:
        if p and os.path.exists(p) and os.path.exists(target) and os.path.samefile(p, target):
            raise LensError(f"Refusing to overwrite the input file {p}; choose another output name.")
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    return target


def _entry(key: str, t: torch.Tensor, offset: int) -> dict:
    """A tensor's header entry when its bytes start at `offset`."""
    if t.dtype not in TORCH_TO_ST:
        raise LensError(f"Tensor {key!r} has dtype {t.dtype}, which safetensors cannot store.")
    n = t.numel() * t.element_size()
    return {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}


def _header_bytes(entries: dict, metadata: dict | None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    header.update(entries)
    return json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class StreamWriter:
    """Write a safetensors file one tensor at a time, keeping none of them in memory.

    Big jobs (prune, blend, quantize of a multi-GB LoRA) produce their output module by module; holding
    the whole result until `save` would double the peak memory. Tensors go straight to a temporary file
    next to the target. The header (which safetensors wants first) is written at `close`: into a space
    reserved up front (`header_reserve` bytes, padded with the spaces the format allows) when it fits,
    otherwise by copying the payload behind it in the kernel (`os.copy_file_range`, no user memory).
    `close` renames the result into place; `abort` (or an exception inside `with`) leaves nothing behind.
    """

    def __init__(self, path: str, forbid: tuple[str, ...] = (), header_reserve: int = 0):
        self.target = _writable_target(path, forbid)
        folder = os.path.dirname(self.target) or "."
        fd, self._tmp = _temp_file(folder)
        self._f = os.fdopen(fd, "wb")
        self._reserve = max(0, int(header_reserve)) + (-max(0, int(header_reserve)) % 8)
        self._f.write(b"\0" * (8 + self._reserve))
        self._entries: dict = {}
        self._offset = 0
        self.closed = False

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self._entries:
            raise LensError(f"Tensor {key!r} was written twice.")
        entry = self._entries[key] = _entry(key, tensor, self._offset)
        if tensor.numel():
            self._f.write(tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().data)
        self._offset = entry["data_offsets"][1]

    def keys(self):
        return list(self._entries)

    def close(self, metadata: dict | None = None, max_padding: int | None = None) -> str:
        """Write the header and move the file into place; returns the target path.

        `max_padding`: at most this many spaces of unused reserve may stay in the file (beyond it the
        payload is moved up instead, so a caller promising a size limit can keep it)."""
        try:
            raw = _header_bytes(self._entries, {str(k): str(v) for k, v in (metadata or {}).items()} or None)
            pad = self._reserve - len(raw)
            if pad >= 0 and (max_padding is None or pad <= max_padding):
                raw += b" " * (self._reserve - len(raw))
                self._f.seek(0)
                self._f.write(len(raw).to_bytes(8, "little") + raw)
                self._f.close()
                os.replace(self._tmp, self.target)
            else:
                self._f.close()
                self._relocate(raw)
            self.closed = True
            return self.target
        except BaseException:
            self.abort()
            raise

    def _relocate(self, raw: bytes) -> None:
        raw += b" " * (-len(raw) % 8)
        folder = os.path.dirname(self.target) or "."
        fd, final = _temp_file(folder)
        try:
            with os.fdopen(fd, "wb", buffering=0) as out, open(self._tmp, "rb", buffering=0) as src:
                out.write(len(raw).to_bytes(8, "little") + raw)
                start, left = 8 + self._reserve, self._offset
                src.seek(start)
                while left > 0:
                    try:
                        n = os.copy_file_range(src.fileno(), out.fileno(), min(left, 1 << 30))
                    except (AttributeError, OSError):
                        n = out.write(src.read(min(left, 1 << 26)))
                    if n <= 0:
                        raise LensError("Could not finish writing the output file (disk full?).")
                    left -= n
            os.replace(final, self.target)
        except BaseException:
            if os.path.exists(final):
                os.unlink(final)
            raise
        os.unlink(self._tmp)

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif not self.closed:
            self.close()
        return False


def safe_join(root: str, relative: str) -> str:
    """Join a user-given relative name under `root`, refusing anything that escapes it."""
    root_abs = os.path.realpath(root)
    full = os.path.realpath(os.path.join(root_abs, relative))
    if os.path.commonpath([root_abs, full]) != root_abs:
        raise LensError(f"The path {relative!r} points outside {root}; use a name inside that folder.")
    return full
