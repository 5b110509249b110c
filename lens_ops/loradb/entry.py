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
import os
import sys
import threading
import weakref
from bisect import bisect_right
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_all

from ..errors import LensError
from .container import check_stream, inflate, inflate_into
from .spec import CODEC_RAW, MAX_CHUNK_BYTES, MAX_ENTRY_OUTPUT, ST_DTYPES

# numpy (and codec.py, which needs it) is imported inside the functions that use it: lossless extraction
# starts inflating an entry's chunks on worker threads first and imports numpy meanwhile (see decode_file)

DEDUP_MIN_BYTES = 64


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


MM_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "I8": 1}   # operand/product dtypes → element size
QLR_DTYPES = ("F16", "BF16", "F32")
MAX_INNER = 1 << 16


def torch_dtype(name: str):
    """torch dtype of a safetensors dtype name; torch is imported only for computed (lossy) tensors,
    so extracting lossless entries never pays its import time."""
    import torch
    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
            "I8": torch.int8, "U8": torch.uint8}[name]


def operand(stored, scale, transpose: bool):
    """A stored matrix as float64 (× per-column scale), transposed if asked: the one rule pack and
    extract both use, so computed tensors are bit-identical to what was checksummed at pack time."""
    import torch
    x = stored.to(torch.float64)
    if scale is not None:
        x = x * scale.to(torch.float64)[None, :]
    return x.T if transpose else x


def mm_product(x, y, dtype):
    import torch
    return torch.matmul(x, y).to(dtype)


CODE_VIEW = {1: "i1", 2: "<i2"}   # numpy dtype names


def _finite_step(x) -> float:
    try:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(float(x)):
            raise LensError("malformed quantised-tensor step")
    except OverflowError:
        raise LensError("malformed quantised-tensor step") from None
    return float(x)


def qlr_build(rows: int, cols: int, axis: int, parts: list, vec, dtype, what: str):
    """Rebuild a tensor from quantised codes (segment kind "qlr", docs/loradb.md): the one rule pack and
    extract both use, so the result is bit-identical to what was checksummed at pack time.

    axis 1: `parts` are column blocks of the rows×cols tensor; axis 0: row blocks. `vec(ref, count)` returns
    `count` integer codes. A "v" part is one column/row = code·step (float64); a "qc" part (axis 1 only) is
    a rows×c block = step·((Qcodes·w) @ Ccodes), an exact integer product (bounded below 2^53)."""
    import numpy as np
    import torch
    bad = LensError(f"{what}: malformed quantised-tensor record.")
    if axis not in (0, 1) or not isinstance(parts, list):
        raise bad
    L, width = (rows, cols) if axis == 1 else (cols, rows)
    buf = np.empty((width, L), np.float64)   # one row per part's column/row: contiguous writes either way
    pos = 0
    try:
        for p in parts:
            if not isinstance(p, list) or not p:
                raise bad
            if p[0] == "v" and len(p) == 3:
                if pos >= width:
                    raise bad
                np.multiply(np.asarray(vec(p[1], L), dtype=np.float64), _finite_step(p[2]), out=buf[pos])
                pos += 1
            elif p[0] == "qc" and len(p) == 6 and axis == 1:
                _, step, qrefs, w, cref, c = p
                step = _finite_step(step)
                if (not isinstance(qrefs, list) or not isinstance(w, list) or not qrefs or len(w) != len(qrefs)
                        or not _int(c, 1, width - pos) or len(qrefs) > MAX_INNER or L * len(qrefs) > rows * cols
                        or not all(_int(x, 1, 1 << 20) for x in w)):
                    raise bad
                K = len(qrefs)
                q = np.empty((L, K), np.float64)
                for j, r in enumerate(qrefs):
                    q[:, j] = vec(r, L)
                q *= np.asarray(w, dtype=np.float64)
                cm = np.asarray(vec(cref, K * c), dtype=np.float64).reshape(K, c)
                if K * float(np.abs(q).max(initial=0)) * float(np.abs(cm).max(initial=0)) >= 2.0 ** 53:
                    raise LensError(f"{what}: a quantised product exceeds the exact-integer range.")
                # an exact integer product (any order, same bits), on torch's thread pool: numpy's BLAS pool
                # and torch's would spin against each other (10× slower extraction measured)
                prod = (torch.from_numpy(q) @ torch.from_numpy(cm)).numpy()
                buf[pos:pos + c] = (prod * step).T
                pos += c
            else:
                raise bad
    except LensError as e:
        raise LensError(str(e).replace("malformed quantised-tensor step", f"{what}: malformed quantised-tensor "
                                       "record")) from None
    if pos != width:
        raise bad
    # float64 → float32 → dtype, each IEEE round-to-nearest-even (spelled out so any reader gets the same
    # bits). numpy and torch agree bit for bit: numpy lays out and narrows to float32 in one pass, torch's
    # vectorised conversion takes it to 16 bits (numpy's float16 cast is ~70× slower).
    with np.errstate(over="ignore"):
        t = torch.from_numpy(np.ascontiguousarray(buf.T if axis == 1 else buf, dtype=np.float32))
    return t if dtype == torch.float32 else t.to(dtype)


def encode_file(writer, path: str, dedup: DedupIndex | None, level: int,
                computed: dict | None = None) -> tuple[dict, dict]:
    """Encode the safetensors file at `path`; returns (entry table, stats). `computed` maps tensor names
    to products of stored operands ({"x": op, "y": op}, op = ref + "scale" ref|None + "T"): those
    tensors are not stored but recomputed at extraction (shared-basis coding)."""
    import numpy as np

    from ..st_header import read_header
    from .codec import encode_stream
    computed = computed or {}
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
    def sid_of(desc):
        sid = stream_ids.setdefault(id(desc), len(streams))
        if sid == len(streams):
            streams.append(desc)
        return sid

    def op_rec(op):
        sc = op.get("scale")
        return [sid_of(op["desc"]), op["start"], op["shape"][0], op["shape"][1], op["dtype"], bool(op.get("T")),
                sid_of(sc["desc"]) if sc else -1, sc["start"] if sc else 0]

    for o0, o1, key, e, shape in spans:
        b = data[o0:o1]
        if key in computed and "qlr" in computed[key]:
            spec = computed[key]["qlr"]
            dt = tensors[key]["dtype"]
            rows = shape[0] if shape else 1
            parts = []
            ref = lambda r: [sid_of(r["desc"]), r["start"]]  # noqa: E731
            for p in spec["parts"]:
                if p[0] == "v":
                    parts.append(["v", ref(p[1]), p[2]])
                else:
                    parts.append(["qc", p[1], [ref(r) for r in p[2]], p[3], ref(p[4]), p[5]])
            segments.append([o0, o1 - o0, "qlr", dt, rows, (o1 - o0) // e // max(rows, 1), spec["axis"], parts])
            continue
        if key in computed:
            spec = computed[key]
            dt = tensors[key]["dtype"]
            rows = shape[0] if shape else 1
            segments.append([o0, o1 - o0, "mm", dt, rows, (o1 - o0) // e // max(rows, 1),
                             op_rec(spec["x"]), op_rec(spec["y"])])
            continue
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


_VIEW = {1: "u1", 2: "u2", 4: "u4", 8: "u8"}   # native-order unsigned views (numpy dtype names)


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


MOVE_BATCH = 8 << 20


def _move_batch(batch):
    for job in batch:
        _move(job[1:])


def decode_file(reader, table: dict, what: str, cap: int, sink=None):
    """Rebuild the exact file bytes of an entry table (bounds checked; caller verifies the checksum);
    returns them as a numpy uint8 array.

    `sink(view)`, when given, receives the file's bytes in order, piece by piece, as soon as each piece
    is final (so hashing and writing overlap the decoding); then an entry of stored tensors (lossless)
    is never held whole in memory and None is returned."""
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
    plan = _plain_plan(reader, streams, segments, data_start, size, what)
    if plan is not None:
        return _decode_plain(plan, hb, data_start, size, sink)
    return _decode_general(reader, streams, segments, hb, data_start, size, what, sink)


# ------------------------------------------------------------------ lossless entries: batch by batch
INFLATE_AHEAD = 32 << 20      # decompressed bytes the workers may inflate ahead of the batch being built
BATCHES_AHEAD = 4             # batches built ahead of the one `sink` is consuming (their buffers get reused)
INFLATE_INTO_MIN = 4 << 20    # chunks at least this big are inflated into 2 MiB-aligned (huge-page) buffers
LITTLE = sys.byteorder == "little"
_DECODE_POOL = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)),
                                  thread_name_prefix="loradb-decode")


def _chunk_bounds(desc, what: str):
    """(e, n, per-chunk element counts) of a stream whose planes are cut at the same places (what the
    writer always does), None for any other well-formed stream; a malformed record raises (container.check_stream,
    the checks and sentences the general decoder uses)."""
    e, n, planes = check_stream(desc, what)
    bounds = [[c[2] for c in p] for p in planes]
    if any(b != bounds[0] for b in bounds):
        return None
    return e, n, bounds[0]


class _Plan:
    """A lossless entry cut into batches: contiguous ranges of the file (~MOVE_BATCH bytes, whole tensors),
    each built by one task from the stream chunks it needs."""

    def __init__(self, what: str):
        self.what = what                     # how inflate errors name the entry
        self.streams: dict[int, tuple] = {}  # stream id → (e, chunk element prefix sums)
        self.batches: list[dict] = []        # {"start", "end", "ops", "chunks"}
        self.chunks: dict[tuple, list] = {}  # (stream id, chunk) → plane sources (bytes/memoryview, or
                                             # (raw_len, stored) to inflate), then what the batches read
        self.users: dict[tuple, int] = {}    # (stream id, chunk) → batches still to read it
        self.head = b""                      # the file's first bytes: u64 header length + header
        self.np = None                       # numpy, once imported
        self.buffers = _Buffers()


def _plain_plan(reader, streams: list, segments: list, data_start: int, size: int, what: str):
    """Check every segment and stream record of an entry made of stored tensors only, read (bounds
    checked) the chunks it uses and lay out the batches; None when the entry has computed tensors or a
    stream whose planes are cut differently (decode_file's general path handles those)."""
    total = size - data_start
    plan = _Plan(f"{reader.name}: {what}")
    infos: dict[int, tuple] = {}
    budget = 16 * size + 2**30
    ops, used = [], set()
    pos = 0
    start = 0                                   # the first batch also holds the safetensors header

    def close_batch(end):
        nonlocal ops, used, start
        plan.batches.append({"start": start, "end": end, "ops": ops, "chunks": sorted(used)})
        for key in used:
            plan.users[key] = plan.users.get(key, 0) + 1
        ops, used, start = [], set(), end

    for seg in segments:
        if isinstance(seg, list) and len(seg) == 8 and seg[2] in ("qlr", "mm"):
            return None
        if (not isinstance(seg, list) or len(seg) < 6 or not _int(seg[0]) or not _int(seg[1]) or seg[0] != pos
                or not _int(seg[2], 0, len(streams) - 1) or not _int(seg[3]) or not _int(seg[4]) or not _int(seg[5])):
            raise LensError(f"{what}: malformed or out-of-order segment record.")
        o0, n, sid, s0, rows, cols = seg[:6]
        if o0 + n > total:
            raise LensError(f"{what}: a tensor runs past the end of the entry.")
        info = infos.get(sid)
        if info is None:
            info = _chunk_bounds(streams[sid], what)
            if info is None:
                return None
            e, cnt, bounds = info
            budget -= e * cnt
            if budget < 0:
                raise LensError(f"{what}: its streams declare far more data than the entry holds.")
            prefix = [0]
            for b in bounds:
                prefix.append(prefix[-1] + b)
            info = infos[sid] = (e, cnt, prefix)
            plan.streams[sid] = (e, prefix)
        e, cnt, prefix = info
        if n % e or (s0 + n // e) * e > cnt * e:
            raise LensError(f"{what}: a tensor's stored range lies outside its stream.")
        if rows and rows * cols * e != n:
            raise LensError(f"{what}: a transposed tensor's shape does not match its size.")
        pos = o0 + n
        s1 = s0 + n // e
        if s1 > s0:
            dst = data_start + o0 - start
            last = ops[-1] if ops else None
            if not rows and last and last[0] == "d" and last[1] == sid and last[3] == s0 \
                    and last[4] + (last[3] - last[2]) * e == dst:
                ops[-1] = ("d", sid, last[2], s1, last[4])   # consecutive plain tensors: one copy
            else:
                ops.append(("t", sid, s0, s1, dst, rows, cols) if rows else ("d", sid, s0, s1, dst))
            k = bisect_right(prefix, s0) - 1
            while prefix[k] < s1:
                if prefix[k + 1] > prefix[k]:
                    used.add((sid, k))
                k += 1
        if data_start + pos - start >= MOVE_BATCH:
            close_batch(data_start + pos)
    if pos != total:
        raise LensError(f"{what}: its tensors do not cover the whole file.")
    if start < size or not plan.batches:
        close_batch(size)
    # read (bounds checked) the chunks the entry uses; only those are inflated
    for sid, k in plan.users:
        desc = streams[sid]
        base = desc.get("base", 0)
        sources = []
        for p in desc["planes"]:
            c = p[k]
            data = reader.read(base + c[0], c[1], what)
            if c[3] == CODEC_RAW and c[1] != c[2]:
                raise LensError(f"{reader.name}: {what} is corrupt (raw chunk size mismatch).")
            sources.append(data if c[3] == CODEC_RAW else (c[2], data))
        plan.chunks[(sid, k)] = sources
    return plan


def _inflate_into(plan, sources: list, i: int, raw_len: int, data) -> None:
    np = plan.np
    if np is None or raw_len < INFLATE_INTO_MIN:   # (numpy still being imported, or a small chunk)
        sources[i] = inflate(data, raw_len, MAX_CHUNK_BYTES, plan.what)
    else:   # into huge pages: ~2 page faults per 4 MiB chunk instead of ~1000
        buf = plan.buffers.take(np, raw_len)
        inflate_into(data, raw_len, MAX_CHUNK_BYTES, plan.what, buf)
        sources[i] = buf


def _interleave(np, dst, planes: list, a: int, b: int, e: int) -> None:
    """dst (uint8, (b-a)·e bytes) ← elements a..b of a chunk whose byte planes are `planes`."""
    if e == 1:
        dst[...] = planes[0][a:b]
    elif e == 2 and LITTLE:   # fp16/bf16: (high byte << 8) | low byte, one pass each
        d16 = dst.view(np.uint16)
        np.left_shift(planes[1][a:b], 8, out=d16, dtype=np.uint16)
        np.bitwise_or(d16, planes[0][a:b], out=d16)
    else:
        d2 = dst.reshape(b - a, e)
        for j in range(e):
            d2[:, j] = planes[j][a:b]


HUGE = 2 << 20


def _aligned_empty(np, n: int):
    """An uninitialised uint8 array starting on a 2 MiB boundary: numpy asks the kernel for transparent huge
    pages on big arrays, and only whole aligned 2 MiB extents get them; an unaligned 8 MiB batch buffer took
    ~600 page faults instead of 4 (each costs about a microsecond beyond zeroing the memory)."""
    if n < 2 * HUGE:
        return np.empty(n, np.uint8)
    base = np.empty(n + HUGE, np.uint8)
    off = -base.__array_interface__["data"][0] % HUGE
    return base[off:off + n]


class _Buffers:
    """Big output buffers (inflated chunks, batches) handed out 2 MiB-aligned and taken back for reuse when
    the last view of one is gone (a weakref finalizer: whoever drops it last, a builder or the writer).
    Memory a process touches for the first time costs page faults and zeroing (and on a VM whose host
    reclaims free guest memory, much more); reusing keeps an extraction's fresh memory near its live set."""

    def __init__(self):
        self.free: list = []
        self.lock = threading.Lock()

    def take(self, np, n: int):
        with self.lock:   # the smallest free buffer that fits (compared by identity: numpy's == is elementwise)
            fits = [i for i, b in enumerate(self.free) if b.size >= n]
            base = self.free.pop(min(fits, key=lambda i: self.free[i].size)) if fits else None
        if base is None:
            base = _aligned_empty(np, -(-n // HUGE) * HUGE if n >= 2 * HUGE else n)
        # an array over a memoryview owns its views: every slice or buffer of it refers to it (a plain slice
        # `base[:n]` would not: numpy points views of views at the first owner, so the finalizer could run
        # while a slice of the buffer is still in use)
        view = np.frombuffer(memoryview(base)[:n], dtype=np.uint8)
        weakref.finalize(view, self._give, base)
        return view

    def _give(self, base) -> None:
        with self.lock:
            self.free.append(base)


def _build_batch(plan: _Plan, batch: dict, buf, pending: dict, lock, gate):
    """Fill `buf` (the batch's bytes) from its chunks; `gate` (when given) holds the task back until
    the batches before it have been consumed far enough that their buffers can be reused."""
    import numpy as np
    if gate is not None:
        gate()
        buf = plan.buffers.take(np, batch["end"] - batch["start"])
    planes = {}
    for key in batch["chunks"]:
        for f in pending.get(key, ()):
            f.result()                      # its inflating tasks (queued before this one)
        planes[key] = [np.frombuffer(s, dtype=np.uint8) for s in plan.chunks[key]]
    if batch["start"] == 0:
        buf[:len(plan.head)] = np.frombuffer(plan.head, dtype=np.uint8)
    for op in batch["ops"]:
        sid, s0, s1, dst = op[1], op[2], op[3], op[4]
        e, prefix = plan.streams[sid]
        if op[0] == "d":
            target, off = buf, dst
        else:
            target, off = np.empty((s1 - s0) * e, np.uint8), 0   # stored transposed: gather, then place
        k = bisect_right(prefix, s0) - 1
        while prefix[k] < s1:
            a, b = max(s0, prefix[k]), min(s1, prefix[k + 1])
            if b > a:
                m = (b - a) * e
                _interleave(np, target[off:off + m], planes[(sid, k)], a - prefix[k], b - prefix[k], e)
                off += m
            k += 1
        if op[0] == "t":
            rows, cols = op[5], op[6]
            d = buf[dst:dst + rows * cols * e]   # (numpy copies unaligned elements correctly too)
            d.view(_VIEW[e]).reshape(rows, cols)[...] = target.view(_VIEW[e]).reshape(cols, rows).T
    del planes
    with lock:   # the last batch to read a chunk lets its inflated bytes go
        for key in batch["chunks"]:
            plan.users[key] -= 1
            if plan.users[key] == 0:
                del plan.chunks[key]
    return buf


def _decode_plain(plan: _Plan, hb: bytes, data_start: int, size: int, sink):
    """Workers inflate the chunks (zstd releases the GIL) while this thread imports numpy, then build the
    batches; this thread hands each batch to `sink` in file order as soon as it is built. With a sink,
    each batch has its own buffer and at most BATCHES_AHEAD batches are built ahead of the one the sink
    takes (freed buffers are reused, no whole-file buffer is touched; returns None). Without one, the
    batches are built in one array of the whole file, which is returned.
    Inflating runs at most INFLATE_AHEAD bytes ahead of the batches queued (bounded memory). The task
    queue is FIFO and a task waits only for tasks queued before it (or, gated, for earlier batches to be
    consumed by this thread), so the pool cannot deadlock."""
    plan.head = (data_start - 8).to_bytes(8, "little") + hb
    order, seen, need_upto = [], set(), []   # inflating tasks, in the order the batches need their chunks
    for batch in plan.batches:
        for key in batch["chunks"]:
            if key not in seen:
                seen.add(key)
                order += [(key, i, s) for i, s in enumerate(plan.chunks[key]) if isinstance(s, tuple)]
        need_upto.append(len(order))
    cum = [0]
    for _, _, (raw_len, _) in order:
        cum.append(cum[-1] + raw_len)
    pending: dict[tuple, list] = {}
    every: list = []
    nxt = 0
    consumed = [0]
    cond = threading.Condition()

    def submit_inflates(required: int):
        nonlocal nxt
        while nxt < len(order) and (nxt < required or cum[nxt] < cum[required] + INFLATE_AHEAD):
            key, i, (raw_len, data) = order[nxt]
            fut = _DECODE_POOL.submit(_inflate_into, plan, plan.chunks[key], i, raw_len, data)
            pending.setdefault(key, []).append(fut)
            every.append(fut)
            nxt += 1

    def gate_for(b):
        def gate():
            with cond:
                cond.wait_for(lambda: consumed[0] >= b - BATCHES_AHEAD)
        return gate

    try:
        submit_inflates(0)
        import numpy as np   # (while the first chunks inflate)
        plan.np = np
        lock = threading.Lock()
        out = np.empty(size, dtype=np.uint8) if sink is None else None
        built: list = []
        for b, batch in enumerate(plan.batches):
            submit_inflates(need_upto[b])
            built.append(_DECODE_POOL.submit(
                _build_batch, plan, batch, out[batch["start"]:batch["end"]] if out is not None else None,
                pending, lock, gate_for(b) if out is None else None))
        for b in range(len(built)):
            buf = built[b].result()
            built[b] = None
            if sink is not None:
                sink(buf)
                del buf
                with cond:
                    consumed[0] = b + 1
                    cond.notify_all()
        return out
    except BaseException:
        with cond:
            consumed[0] = len(plan.batches)   # gated tasks may go on (and end)
            cond.notify_all()
        every += [f for f in built if f is not None]   # (a built batch's future holds its buffer: not
        for f in every:                                  # kept in `every` while the batches are consumed)
            f.cancel()
        wait_all(every)
        raise


def _decode_general(reader, streams: list, segments: list, hb: bytes, data_start: int, size: int, what: str,
                    sink=None):
    """decode_file for entries with computed (lossy) tensors or unusually cut streams: whole streams are
    decoded first (codec.decode_stream), then tensors are computed or moved into place."""
    import numpy as np

    from .codec import _POOL, decode_stream
    out = np.empty(size, dtype=np.uint8)
    out[:8] = np.frombuffer((data_start - 8).to_bytes(8, "little"), dtype=np.uint8)
    out[8:data_start] = np.frombuffer(hb, dtype=np.uint8)
    data = out[data_start:]
    decoded: dict[int, np.ndarray] = {}
    budget = [16 * size + 2**30]
    moves = []
    pos = 0
    def stream(sid):
        if not _int(sid, 0, len(streams) - 1):
            raise LensError(f"{what}: a tensor refers to a missing stream.")
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
        return arr, streams[sid]["e"]

    def get_op(rec):
        if not isinstance(rec, list) or len(rec) != 8 or not isinstance(rec[4], str) or rec[4] not in MM_DTYPES:
            raise LensError(f"{what}: malformed computed-tensor operand.")
        import torch
        sid, start, r, c, dt, tr, ssid, sstart = rec
        tdt, es = torch_dtype(dt), MM_DTYPES[dt]
        if not (_int(start) and _int(r, 1, 1 << 24) and _int(c, 1, 1 << 24) and isinstance(tr, bool)):
            raise LensError(f"{what}: malformed computed-tensor operand.")
        arr, e = stream(sid)
        if e != es or (start + r * c) * e > arr.size:
            raise LensError(f"{what}: a computed tensor's operand lies outside its stream.")
        raw = arr[start * e:(start + r * c) * e]
        x = torch.from_numpy(raw.copy()).view(tdt).reshape(r, c)
        scale = None
        if ssid != -1:
            sarr, se = stream(ssid)
            if se != 4 or not _int(sstart) or (sstart + c) * 4 > sarr.size:
                raise LensError(f"{what}: a computed tensor's scale lies outside its stream.")
            scale = torch.from_numpy(sarr[sstart * 4:(sstart + c) * 4].copy()).view(torch.float32)
        return operand(x, scale, tr)

    def codes(ref, count):
        if not isinstance(ref, list) or len(ref) != 2 or not _int(ref[1]):
            raise LensError(f"{what}: malformed quantised-tensor record.")
        arr, e = stream(ref[0])
        if e not in CODE_VIEW or (ref[1] + count) * e > arr.size:
            raise LensError(f"{what}: quantised codes lie outside their stream.")
        return arr[ref[1] * e:(ref[1] + count) * e].view(CODE_VIEW[e])

    for seg in segments:
        if isinstance(seg, list) and len(seg) == 8 and seg[2] == "qlr":
            o0, n, _, dt, rows, cols, axis, parts = seg
            if (not _int(o0) or o0 != pos or not _int(n) or o0 + n > len(data) or not isinstance(dt, str)
                    or dt not in QLR_DTYPES
                    or not _int(rows, 1, 1 << 24) or not _int(cols, 1, 1 << 24)
                    or rows * cols * MM_DTYPES[dt] != n):
                raise LensError(f"{what}: malformed quantised-tensor record.")
            t = qlr_build(rows, cols, axis, parts, codes, torch_dtype(dt), what)
            data[o0:o0 + n] = t.contiguous().reshape(-1).view(torch_dtype("U8")).numpy()
            pos = o0 + n
            continue
        if isinstance(seg, list) and len(seg) == 8 and seg[2] == "mm":
            o0, n, _, dt, rows, cols, xr, yr = seg
            if (not _int(o0) or o0 != pos or not _int(n) or o0 + n > len(data) or not isinstance(dt, str)
                    or dt not in MM_DTYPES
                    or not _int(rows, 1) or not _int(cols, 1) or rows * cols * MM_DTYPES[dt] != n):
                raise LensError(f"{what}: malformed computed-tensor record.")
            x, y = get_op(xr), get_op(yr)
            if x.shape[0] != rows or y.shape[1] != cols or x.shape[1] != y.shape[0] or x.shape[1] > MAX_INNER:
                raise LensError(f"{what}: a computed tensor's operands do not fit its shape.")
            t = mm_product(x, y, torch_dtype(dt))
            data[o0:o0 + n] = t.contiguous().reshape(-1).view(torch_dtype("U8")).numpy()
            pos = o0 + n
            continue
        if (not isinstance(seg, list) or len(seg) < 6 or not _int(seg[0]) or not _int(seg[1]) or seg[0] != pos
                or not _int(seg[2], 0, len(streams) - 1) or not _int(seg[3]) or not _int(seg[4]) or not _int(seg[5])):
            raise LensError(f"{what}: malformed or out-of-order segment record.")
        o0, n, sid, start, rows, cols = seg[:6]
        if o0 + n > len(data):
            raise LensError(f"{what}: a tensor runs past the end of the entry.")
        arr, e = stream(sid)
        if n % e or (start + n // e) * e > arr.size:
            raise LensError(f"{what}: a tensor's stored range lies outside its stream.")
        src = arr[start * e:start * e + n]
        if rows:
            if rows * cols * e != n:
                raise LensError(f"{what}: a transposed tensor's shape does not match its size.")
            moves.append((o0, data[o0:o0 + n], src, rows, cols, e))
        else:
            moves.append((o0, data[o0:o0 + n], src, 0, 0, e))
        pos = o0 + n
    if pos != len(data):
        raise LensError(f"{what}: its tensors do not cover the whole file.")
    batches, cur, nb = [], [], 0
    for mv in moves:
        cur.append(mv)
        nb += mv[1].size
        if nb >= MOVE_BATCH:
            batches.append(cur)
            cur, nb = [], 0
    if cur:
        batches.append(cur)
    futs = [_POOL.submit(_move_batch, b) for b in batches]
    done = 0
    for k, f in enumerate(futs):
        f.result()
        end = data_start + batches[k + 1][0][0] if k + 1 < len(batches) else size
        if sink is not None and end > done:
            sink(out[done:end])
            done = end
    if sink is not None and done < size:
        sink(out[done:size])
    return out
