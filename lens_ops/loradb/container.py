"""Bounded reading and crash-safe writing of the .loradb container (see spec.py for the byte layout).

Reader: every offset and length is checked against the file size before a byte is read, every
decompressed size is declared up front, capped, passed to zstd as the output limit and verified.
Writer: payloads are only ever appended; a collection header is committed by writing one 64-byte slot
(the older of two), so an interrupted write leaves the previous collection intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading

import zstandard

from ..errors import LensError
from ..file_mode import new_file_mode  # noqa: F401  (db.py imports it from here)
from .spec import (CHUNK_BYTES, CODEC_RAW, CODEC_ZSTD, DATA_START, ELEM_SIZES, FORMAT_MAJOR, FORMAT_MINOR,
                   HEADER_CODECS, MAGIC, MAX_CHUNK_BYTES, MAX_HEADER_BYTES, SLOT_OFFSETS, SLOT_SIZE)

_local = threading.local()


def _dctx() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def _check_frame(data, raw_len: int, cap: int, what: str) -> None:
    if not isinstance(raw_len, int) or raw_len < 0 or raw_len > cap:
        raise LensError(f"{what} declares {raw_len} decompressed bytes (limit {cap}).")
    try:
        params = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError:
        raise LensError(f"{what} is corrupt (not a zstd frame).") from None
    if params.content_size not in (zstandard.CONTENTSIZE_UNKNOWN, raw_len):
        raise LensError(f"{what} is corrupt (its frame holds {params.content_size} bytes, "
                        f"the table says {raw_len}).")


def inflate(data: bytes, raw_len: int, cap: int, what: str) -> bytes:
    """zstd-decompress `data` (one frame, nothing after it) that declares `raw_len` bytes; refuse more than
    `cap` or a size mismatch."""
    _check_frame(data, raw_len, cap, what)
    try:
        out = _dctx().decompress(data, max_output_size=max(raw_len, 1), allow_extra_data=False)
    except zstandard.ZstdError:
        raise LensError(f"{what} is corrupt (its compressed data does not decode).") from None
    if len(out) != raw_len:
        raise LensError(f"{what} is corrupt (it decodes to {len(out)} bytes, expected {raw_len}).")
    return out


def inflate_into(data, raw_len: int, cap: int, what: str, out) -> None:
    """inflate() straight into `out`, a writable buffer of `raw_len` bytes (the caller's memory, e.g. reused
    or huge-page backed): the same checks; the frame must end exactly there (its checksum is verified)."""
    _check_frame(data, raw_len, cap, what)
    view = memoryview(out).cast("B")
    if view.nbytes != raw_len:
        raise ValueError("inflate_into: the output buffer does not match the declared size")
    got, extra = 0, b""
    try:
        with _dctx().stream_reader(data, read_across_frames=False) as r:
            while got < raw_len:
                n = r.readinto(view[got:])
                if not n:
                    break
                got += n
            if got == raw_len:
                extra = r.read(1)   # reads the frame's end (and checks its checksum): nothing may follow
    except zstandard.ZstdError:
        raise LensError(f"{what} is corrupt (its compressed data does not decode).") from None
    if got != raw_len or extra:
        raise LensError(f"{what} is corrupt (it decodes to {'more than ' if extra else ''}{got} bytes, "
                        f"expected {raw_len}).")


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def loads_json(raw: bytes, what: str):
    """JSON text → object; a lone surrogate escape (valid JSON, not valid Unicode: it could not be printed,
    written back or used as a file name) makes the text corrupt too."""
    try:
        obj = json.loads(raw.decode("utf-8") if not isinstance(raw, str) else raw)
        if _SURROGATE_ESCAPE.search(raw if not isinstance(raw, str) else raw.encode("utf-8", "replace")):
            dumps_json(obj)   # raises UnicodeEncodeError on a lone (unpaired) surrogate
        return obj
    except (UnicodeDecodeError, UnicodeEncodeError, ValueError, RecursionError):
        raise LensError(f"{what} is corrupt (not valid JSON text).") from None


def clean_text(obj):
    """Strings (recursively) with lone surrogates replaced, so they can be stored, printed and compared."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
            return obj
        except UnicodeEncodeError:
            return obj.encode("utf-8", "replace").decode("utf-8")
    if isinstance(obj, dict):
        return {clean_text(k): clean_text(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean_text(v) for v in obj]
    return obj


def make_folder(folder: str) -> None:
    """os.makedirs, with one sentence when the place is a file or cannot be created."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise LensError(f"Cannot use {folder} as a folder ({e.strerror or e}).") from None
    if not os.path.isdir(folder):
        raise LensError(f"Cannot use {folder} as a folder (it is a file).")


def dumps_json(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _slot_bytes(gen: int, off: int, stored: int, raw: int, codec: int, digest: bytes) -> bytes:
    body = (gen.to_bytes(8, "little") + off.to_bytes(8, "little") + stored.to_bytes(8, "little")
            + raw.to_bytes(8, "little") + codec.to_bytes(4, "little") + b"\0\0\0\0" + digest[:16])
    return body + hashlib.sha256(body).digest()[:8]


def _parse_slot(b: bytes):
    if len(b) != SLOT_SIZE or hashlib.sha256(b[:56]).digest()[:8] != b[56:64]:
        return None
    gen, off, stored, raw = (int.from_bytes(b[i:i + 8], "little") for i in (0, 8, 16, 24))
    codec = int.from_bytes(b[32:36], "little")
    if gen == 0:
        return None
    return {"generation": gen, "offset": off, "stored": stored, "raw": raw, "codec": codec, "digest": b[40:56]}


class Reader:
    """An open .loradb: the current collection header plus bounded access to its bytes."""

    def __init__(self, path: str):
        self.path = path
        self.name = os.path.basename(path)
        if not os.path.isfile(path):
            raise LensError(f"{path} does not exist or is not a file.")
        self.size = os.path.getsize(path)
        self.f = open(path, "rb")
        self.mm = None
        if self.size >= 1 << 20:
            import mmap
            try:
                self.mm = mmap.mmap(self.f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):
                self.mm = None
        self.warnings: list[str] = []
        try:
            self.header, self.generation = self._read_header()
        except BaseException:
            self.f.close()
            raise

    def close(self):
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:  # a caller still holds a view; the map closes when it is dropped
                pass
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read(self, offset, length, what: str) -> bytes:
        if (not isinstance(offset, int) or not isinstance(length, int) or offset < DATA_START or length < 0
                or offset + length > self.size):
            raise LensError(f"{self.name}: {what} lies outside the file (offset {offset}, length {length}, "
                            f"file {self.size} bytes); the file is truncated or corrupt.")
        if self.mm is not None and length >= 1 << 16:
            return memoryview(self.mm)[offset:offset + length]
        self.f.seek(offset)
        data = self.f.read(length)
        if len(data) != length:
            raise LensError(f"{self.name}: {what} could not be read in full; the file is truncated.")
        return data

    def _read_header(self):
        pre = self.f.read(DATA_START)
        if len(pre) < DATA_START or pre[:8] != MAGIC:
            raise LensError(f"{self.name} is not a LoRA Lens .loradb file (bad magic or too short).")
        major = int.from_bytes(pre[8:12], "little")
        if major != FORMAT_MAJOR:
            raise LensError(f"{self.name} is .loradb format version {major}; this LoRA Lens reads version "
                            f"{FORMAT_MAJOR}.")
        slots = [s for s in (_parse_slot(pre[o:o + SLOT_SIZE]) for o in SLOT_OFFSETS) if s]
        if not slots:
            raise LensError(f"{self.name} is corrupt: it has no valid collection header slot.")
        slots.sort(key=lambda s: -s["generation"])
        first_error = None
        for i, s in enumerate(slots):
            try:
                header = self._load_slot(s)
                if i:
                    self.warnings.append(f"the newest collection header is damaged ({first_error}); "
                                         "showing the previous one")
                return header, s["generation"]
            except LensError as e:
                first_error = first_error or str(e)
        raise LensError(first_error)

    def _load_slot(self, s) -> dict:
        codec = HEADER_CODECS.get(s["codec"])
        if codec is None:
            raise LensError(f"{self.name}: the collection header uses an unknown codec {s['codec']}.")
        if s["raw"] > MAX_HEADER_BYTES or s["stored"] > MAX_HEADER_BYTES:
            raise LensError(f"{self.name}: the collection header claims {max(s['raw'], s['stored'])} bytes "
                            f"(limit {MAX_HEADER_BYTES}).")
        stored = self.read(s["offset"], s["stored"], "the collection header")
        if hashlib.sha256(stored).digest()[:16] != s["digest"]:
            raise LensError(f"{self.name}: the collection header fails its checksum; the file is corrupt.")
        raw = stored if codec == CODEC_RAW else inflate(stored, s["raw"], MAX_HEADER_BYTES,
                                                           f"{self.name}: the collection header")
        header = loads_json(raw, f"{self.name}: the collection header")
        if not isinstance(header, dict) or not isinstance(header.get("entries"), list) \
                or not isinstance(header.get("collection"), dict):
            raise LensError(f"{self.name}: the collection header is malformed (needs collection and entries).")
        return header

    def blob(self, desc, cap: int, what: str) -> bytes:
        """A stored blob [offset, stored, raw, codec] (+ optional sha256 hex) → its raw bytes, verified."""
        if not isinstance(desc, list) or len(desc) < 4:
            raise LensError(f"{self.name}: {what} has a malformed location record.")
        off, stored, raw, codec = desc[:4]
        if not isinstance(raw, int) or raw < 0 or raw > cap:
            raise LensError(f"{self.name}: {what} declares {raw} bytes (limit {cap}).")
        data = self.read(off, stored, what)
        if codec == CODEC_RAW:
            if stored != raw:
                raise LensError(f"{self.name}: {what} is corrupt (raw size mismatch).")
            out = bytes(data)
        elif codec == CODEC_ZSTD:
            out = inflate(data, raw, cap, f"{self.name}: {what}")
        else:
            raise LensError(f"{self.name}: {what} uses an unknown codec {codec!r}.")
        if len(desc) > 4:
            if not isinstance(desc[4], str) or hashlib.sha256(out).hexdigest()[:len(desc[4])] != desc[4] \
                    or len(desc[4]) < 16:
                raise LensError(f"{self.name}: {what} fails its checksum; the file is corrupt.")
        return out


class Writer:
    """Appends payloads to a new (temp → rename) or existing (in place) .loradb and commits a header."""

    def __init__(self, path: str, append: bool = False, level: int = 19):
        self.path = os.path.abspath(path)
        self.level = level
        self.append = append
        self._cctx = {}
        if append:
            self.reader = Reader(path)
            self.generation = self.reader.generation
            self.reader.close()
            self.f = open(self.path, "r+b")
            self.f.seek(0, os.SEEK_END)
            self.tmp = None
            self.start_size = self.f.tell()
        else:
            # a new file: payloads are staged in a temp file (offsets relative to its start); at commit the
            # header and every entry table go to the FRONT of the file and the payloads follow, so a
            # truncated file still lists every entry and extracts those whose bytes survived
            folder = os.path.dirname(self.path) or "."
            make_folder(folder)
            try:
                fd, self.tmp = tempfile.mkstemp(prefix=".lens-", suffix=".loradb.tmp", dir=folder)
            except OSError as e:
                raise LensError(f"Cannot write into {folder} ({e.strerror or e}).") from None
            self.f = os.fdopen(fd, "w+b")
            self.generation = 0
        self.written = 0
        self.streams: list[dict] = []      # stream descriptors whose chunk offsets are relative (new files)
        self.tables: list[tuple] = []      # (table object, descriptor to fill) for new files

    def cctx(self, level: int) -> zstandard.ZstdCompressor:
        c = self._cctx.get(level)
        if c is None:
            c = self._cctx[level] = zstandard.ZstdCompressor(level=level, write_checksum=True,
                                                            write_content_size=True)
        return c

    def put(self, data: bytes, codec: str) -> list:
        """Write already-encoded bytes; return [offset, stored_len]."""
        off = self.f.tell()
        self.f.write(data)
        self.written += len(data)
        return [off, len(data)]

    def register_stream(self, desc: dict) -> dict:
        """Stream descriptors: chunk offsets are relative to desc["base"] (set at commit for new files)."""
        if not self.append:
            desc["base"] = 0
            self.streams.append(desc)
        return desc

    def put_table(self, table: dict, level: int = 9) -> list:
        """Store an entry table: appended now (append mode) or laid out at the front at commit (new file)."""
        if self.append:
            return self.put_blob(dumps_json(table), level=level)
        desc: list = [0, 0, 0, CODEC_ZSTD, ""]
        self.tables.append((table, desc))
        return desc

    def put_blob(self, raw: bytes, level: int | None = None, checksum: bool = True) -> list:
        """Store raw bytes zstd-compressed (or raw when that is not smaller): [off, stored, raw, codec, sha]."""
        comp = zstandard.ZstdCompressor(level=level or self.level, write_content_size=True).compress(raw)
        if len(comp) < len(raw):
            desc = self.put(comp, CODEC_ZSTD) + [len(raw), CODEC_ZSTD]
        else:
            desc = self.put(raw, CODEC_RAW) + [len(raw), CODEC_RAW]
        if checksum:
            desc.append(hashlib.sha256(raw).hexdigest())
        return desc

    def commit(self, header: dict) -> str:
        if not self.append:
            return self._commit_new(header)
        raw = dumps_json(header)
        if len(raw) > MAX_HEADER_BYTES:
            raise LensError(f"The collection header would be {len(raw)} bytes (limit {MAX_HEADER_BYTES}).")
        stored = zstandard.ZstdCompressor(level=9, write_content_size=True).compress(raw)
        off = self.f.tell()
        self.f.write(stored)
        self.f.flush()
        os.fsync(self.f.fileno())
        self._write_slot(self.generation + 1, off, stored, raw)
        self.f.close()
        return self.path

    def _write_slot(self, gen, off, stored, raw, f=None):
        f = f or self.f
        slot = _slot_bytes(gen, off, len(stored), len(raw), 1, hashlib.sha256(stored).digest())
        # the slot that does NOT hold the current generation (A for odd, B for even generations)
        f.seek(SLOT_OFFSETS[(gen - 1) % 2])
        f.write(slot)
        f.flush()
        os.fsync(f.fileno())

    def _commit_new(self, header: dict) -> str:
        cz = zstandard.ZstdCompressor(level=9, write_content_size=True)
        payload_len = self.f.tell()
        guess = DATA_START + 4096
        for _ in range(8):   # layout: preamble | entry tables | header | zero padding | payloads
            for d in self.streams:
                d["base"] = guess
            blobs = []
            pos = DATA_START
            for table, desc in self.tables:
                raw = dumps_json(table)
                comp = cz.compress(raw)
                desc[:] = [pos, len(comp), len(raw), CODEC_ZSTD, hashlib.sha256(raw).hexdigest()]
                pos += len(comp)
                blobs.append(comp)
            hraw = dumps_json(header)
            if len(hraw) > MAX_HEADER_BYTES:
                raise LensError(f"The collection header would be {len(hraw)} bytes (limit {MAX_HEADER_BYTES}).")
            hstored = cz.compress(hraw)
            hoff = pos
            end = pos + len(hstored)
            if end <= guess:
                break
            guess = end + 4096 + end // 64
        else:  # pragma: no cover - converges on the second pass
            raise LensError("Internal error: could not lay out the collection header.")
        folder = os.path.dirname(self.path) or "."
        fd, final_tmp = tempfile.mkstemp(prefix=".lens-", suffix=".loradb.tmp", dir=folder)
        try:
            with os.fdopen(fd, "w+b") as out:
                out.write(MAGIC + FORMAT_MAJOR.to_bytes(4, "little") + FORMAT_MINOR.to_bytes(4, "little")
                          + b"\0" * (2 * SLOT_SIZE))
                for comp in blobs:
                    out.write(comp)
                out.write(hstored)
                out.write(b"\0" * (guess - out.tell()))
                self.f.flush()
                self.f.seek(0)
                shutil.copyfileobj(self.f, out, 1 << 24)
                if out.tell() != guess + payload_len:
                    raise LensError("Internal error: payload copy was incomplete.")
                out.flush()
                os.fsync(out.fileno())
                self._write_slot(1, hoff, hstored, hraw, out)
                os.chmod(final_tmp, new_file_mode())
            self.f.close()
            os.replace(final_tmp, self.path)
            os.unlink(self.tmp)
            self.tmp = None
        except BaseException:
            if os.path.exists(final_tmp):
                os.unlink(final_tmp)
            raise
        return self.path

    def abort(self):
        """Drop everything written: a new file disappears, an append leaves the old bytes only."""
        try:
            if self.append and not self.f.closed:
                self.f.truncate(self.start_size)
            self.f.close()
        except OSError:
            pass
        if self.tmp and os.path.exists(self.tmp):
            os.unlink(self.tmp)
            self.tmp = None


def check_stream(desc, what: str) -> tuple[int, int, list]:
    """(element size e, elements n, planes) of a stream record, or one sentence (LensError) when it is malformed:
    e byte planes, each a list of [offset, stored, raw bytes, codec] chunks whose raw sizes add up to n. Shared by
    the general decoder (codec.py) and the batch-by-batch lossless path (entry.py), which must not import numpy."""
    if not isinstance(desc, dict):
        raise LensError(f"{what}: malformed stream record.")
    e, n, planes, base = desc.get("e"), desc.get("n"), desc.get("planes"), desc.get("base", 0)
    whole = lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0
    if not whole(base) or e not in ELEM_SIZES or not whole(n) or not isinstance(planes, list) or len(planes) != e:
        raise LensError(f"{what}: malformed stream record.")
    for p in planes:
        if not isinstance(p, list):
            raise LensError(f"{what}: malformed stream record.")
        total = 0
        for c in p:
            if (not isinstance(c, list) or len(c) != 4 or not all(isinstance(x, int) for x in c[:3])
                    or c[2] < 0 or c[2] > MAX_CHUNK_BYTES or c[3] not in (CODEC_RAW, CODEC_ZSTD)):
                raise LensError(f"{what}: malformed chunk record.")
            total += c[2]
        if total != n:
            raise LensError(f"{what}: its chunks hold {total} bytes per plane, the stream declares {n}.")
    return e, n, planes
