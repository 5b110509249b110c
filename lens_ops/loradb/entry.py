"""One entry = one safetensors file: its header bytes verbatim plus every tensor's bytes, coded losslessly.

Encoding splits the file's data section into segments (tensors in offset order, and any filler bytes
between them), de-duplicates segments seen before (sha256 of their bytes + shape, across all entries of
the collection), stores tall matrices transposed (columns of an `up` factor have their own scales, so
their exponents compress better together), groups the rest by element size and writes each group as a
byte-grouped stream (codec.py). Decoding rebuilds the exact file bytes; the caller checks the sha256.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from ..errors import LensError
from ..st_io import read_header
from .codec import _POOL, decode_stream, encode_stream
from .spec import MAX_ENTRY_OUTPUT, ST_DTYPES

DEDUP_MIN_BYTES = 64
TORCH_DT = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
            "I8": torch.int8, "U8": torch.uint8}


def _rows_cols(shape) -> tuple[int, int]:
    """(rows, cols) when a tensor is stored transposed (tall 2-D view), else (0, 0)."""
    if len(shape) < 2:
        return 0, 0
    rows, cols = shape[0], math.prod(shape[1:])
    return (rows, cols) if rows > cols > 1 else (0, 0)


class DedupIndex:
    """sha256(bytes)+shape of stored tensors → where they live (a stream descriptor and element range)."""

    def __init__(self):
        self.map: dict[tuple, tuple] = {}

    def add_table(self, table: dict):
        streams = table.get("streams", [])
        for seg in table.get("segments", []):
            if len(seg) >= 7 and isinstance(seg[6], str):
                self.map.setdefault((seg[6], seg[1], seg[4], seg[5]), (streams[seg[2]], seg[3]))


def encode_file(writer, path: str, dedup: DedupIndex | None, level: int) -> tuple[dict, dict]:
    """Encode the safetensors file at `path`; returns (entry table, stats)."""
    tensors, _meta, data_start = read_header(path)
    with open(path, "rb") as f:
        raw = f.read()
    header_text = raw[8:data_start].decode("utf-8")
    data = np.frombuffer(raw, dtype=np.uint8, offset=data_start)
    spans = []
    pos = 0
    for key, t in tensors.items():
        o0, o1 = t["data_offsets"]
        if o0 > pos:
            spans.append((pos, o0, None, 1, []))
        if o1 > o0:
            spans.append((o0, o1, key, ST_DTYPES[t["dtype"]], t["shape"]))
        pos = max(pos, o1)
    if pos < len(data):
        spans.append((pos, len(data), None, 1, []))
    streams: list = []
    stream_ids: dict[int, int] = {}
    segments: list = []
    groups: dict[int, list] = {}
    pending: list = []
    dup_bytes = 0
    for o0, o1, key, e, shape in spans:
        b = data[o0:o1]
        rows, cols = _rows_cols(shape) if key is not None else (0, 0)
        digest = None
        if dedup is not None and o1 - o0 >= DEDUP_MIN_BYTES:
            digest = hashlib.sha256(b).hexdigest()
            hit = dedup.map.get((digest, o1 - o0, rows, cols))
            if hit is not None:
                desc, start = hit
                sid = stream_ids.setdefault(id(desc), len(streams))
                if sid == len(streams):
                    streams.append(desc)
                segments.append([o0, o1 - o0, sid, start, rows, cols, digest])
                dup_bytes += o1 - o0
                continue
        if rows:
            b = b.reshape(rows, cols, e).transpose(1, 0, 2).reshape(-1)
        g = groups.setdefault(e, [])
        start = sum(len(x) for x in g) // e
        g.append(b)
        seg = [o0, o1 - o0, None, start, rows, cols] + ([digest] if digest else [])
        segments.append(seg)
        pending.append((seg, e))
    group_sid = {}
    for e, parts in groups.items():
        desc = encode_stream(writer, np.concatenate(parts) if len(parts) > 1 else parts[0], e, level)
        group_sid[e] = len(streams)
        stream_ids[id(desc)] = len(streams)
        streams.append(desc)
    for seg, e in pending:
        seg[2] = group_sid[e]
    table = {"v": 1, "header": header_text, "data_start": data_start, "size": len(raw),
             "streams": streams, "segments": segments}
    if dedup is not None:
        dedup.add_table(table)
    return table, {"dedup_bytes": dup_bytes, "sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}


_VIEW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _move(job):
    dst, src, rows, cols, e = job
    if not rows:
        dst[...] = src
    elif dst.ctypes.data % e == 0 and src.ctypes.data % e == 0:
        dst.view(_VIEW[e]).reshape(rows, cols)[...] = src.view(_VIEW[e]).reshape(cols, rows).T
    else:
        dst.reshape(rows, cols, e)[...] = src.reshape(cols, rows, e).transpose(1, 0, 2)


def _int(x, lo=0, hi=None) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= lo and (hi is None or x <= hi)


def decode_file(reader, table: dict, what: str, cap: int) -> np.ndarray:
    """Rebuild the exact file bytes of an entry table (bounds checked; caller verifies the checksum)."""
    if not isinstance(table, dict):
        raise LensError(f"{what}: malformed entry table.")
    header, data_start, size = table.get("header"), table.get("data_start"), table.get("size")
    streams, segments = table.get("streams"), table.get("segments")
    if (not isinstance(header, str) or not _int(data_start, 8) or not _int(size, 8, min(cap, MAX_ENTRY_OUTPUT))
            or data_start > size or not isinstance(streams, list) or not isinstance(segments, list)):
        raise LensError(f"{what}: malformed entry table (or it declares more than the size limit).")
    hb = header.encode("utf-8")
    if len(hb) != data_start - 8:
        raise LensError(f"{what}: the stored safetensors header has the wrong length.")
    out = np.empty(size, dtype=np.uint8)
    out[:8] = np.frombuffer((data_start - 8).to_bytes(8, "little"), dtype=np.uint8)
    out[8:data_start] = np.frombuffer(hb, dtype=np.uint8)
    data = out[data_start:]
    decoded: dict[int, np.ndarray] = {}
    budget = [16 * size + 2**30]
    moves = []
    pos = 0
    for seg in segments:
        if (not isinstance(seg, list) or len(seg) < 6 or not _int(seg[0]) or not _int(seg[1]) or seg[0] != pos
                or not _int(seg[2], 0, len(streams) - 1) or not _int(seg[3]) or not _int(seg[4]) or not _int(seg[5])):
            raise LensError(f"{what}: malformed or out-of-order segment record.")
        o0, n, sid, start, rows, cols = seg[:6]
        if o0 + n > len(data):
            raise LensError(f"{what}: a tensor runs past the end of the entry.")
        arr = decoded.get(sid)
        if arr is None:
            desc = streams[sid]
            e, cnt = (desc.get("e"), desc.get("n")) if isinstance(desc, dict) else (None, None)
            if not _int(e, 1, 8) or not _int(cnt):
                raise LensError(f"{what}: malformed stream record.")
            budget[0] -= e * cnt
            if budget[0] < 0:
                raise LensError(f"{what}: its streams declare far more data than the entry holds.")
            arr = decoded[sid] = decode_stream(reader, desc, what)
        e = streams[sid]["e"]
        if n % e or (start + n // e) * e > arr.size:
            raise LensError(f"{what}: a tensor's stored range lies outside its stream.")
        src = arr[start * e:start * e + n]
        if rows:
            if rows * cols * e != n:
                raise LensError(f"{what}: a transposed tensor's shape does not match its size.")
            moves.append((data[o0:o0 + n], src, rows, cols, e))
        else:
            moves.append((data[o0:o0 + n], src, 0, 0, e))
        pos = o0 + n
    if pos != len(data):
        raise LensError(f"{what}: its tensors do not cover the whole file.")
    for _ in _POOL.map(_move, moves):
        pass
    return out
