"""Packing, listing, extracting, appending to and removing from .loradb collections."""
from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
import time
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterable

from .. import __version__
from ..errors import LensError
from .container import Reader, Writer, clean_text, loads_json, make_folder, new_file_mode
from .entry import DedupIndex, decode_file, encode_file
from .spec import (DEFAULT_LEVEL, FORMAT_MAJOR, FORMAT_MINOR, MAGIC, MAX_ENTRY_OUTPUT, MAX_NAME_BYTES,
                   MAX_NAME_CHARS, MAX_TABLE_BYTES, WINDOWS_RESERVED)

if TYPE_CHECKING:  # the model (and torch) is imported only where an entry becomes a model: listing and
    import numpy as np  # lossless extraction stay torch-free and start fast (numpy: see entry.decode_file)

    from ..model import LoRAModel

Progress = Callable[[int, int], None] | None
SUFFIX = ".safetensors"
CODEC_NAME = "bytegroup-zstd"


# ------------------------------------------------------------------ names
_UNSAFE_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Zl", "Zp"}   # controls (C0 and C1), bidi/format, surrogates,
                                                            # private use, line/paragraph separators


def _unsafe_to(s: str, repl: str) -> str:
    return "".join(repl if unicodedata.category(c) in _UNSAFE_CATEGORIES else c for c in s)


def safe_file_name(name, fallback: str = "entry") -> str:
    """A file name that cannot escape a folder: no separators, no '..', no control, format (bidi override)
    or reserved characters, no leading dot, no reserved device names, at most MAX_NAME_CHARS characters and
    MAX_NAME_BYTES UTF-8 bytes before the suffix (file systems cap names at 255 bytes); ends in .safetensors."""
    s = str(name) if isinstance(name, str) else ""
    s = s.replace("\\", "/").split("/")[-1]
    s = _unsafe_to(re.sub(r"[<>:\"|?*]", "_", s), "_").strip().strip(".").strip()
    stem = s[: -len(SUFFIX)] if s.lower().endswith(SUFFIX) else s
    stem = stem.strip().strip(".")
    if not stem or stem in (".", "..") or stem.split(".")[0].strip().upper() in WINDOWS_RESERVED:
        stem = (fallback + "_" + stem) if stem else fallback
    stem = stem.replace("..", "_")[:MAX_NAME_CHARS]
    stem = stem.encode("utf-8")[:MAX_NAME_BYTES].decode("utf-8", "ignore").rstrip(" .") or fallback
    return stem + SUFFIX


def entry_name(name) -> str:
    s = str(name) if isinstance(name, str) else ""
    s = _unsafe_to(s, "").strip()[:MAX_NAME_CHARS]
    return s


# ------------------------------------------------------------------ describing an entry
def describe_model(model: LoRAModel) -> dict:
    from ..model import DTYPE_NAMES
    from ..training_meta import trigger_words
    ranks = Counter(r for m in model.modules if (r := m.rank()) is not None)
    dtypes = Counter()
    for m in model.modules:
        for role, t in m.tensors.items():
            if role != "alpha":
                dtypes[DTYPE_NAMES.get(t.dtype, str(t.dtype).replace("torch.", ""))] += t.numel()
    arch = model.architecture
    return {"architecture": arch.label, "format": model.convention,
            "rank": ranks.most_common(1)[0][0] if ranks else None,
            "ranks": sorted(ranks), "dtype": dtypes.most_common(1)[0][0] if dtypes else "none",
            "modules": len(model.modules), "trigger_words": trigger_words(model.metadata)}


def _new_header(name="", creator="", description="", tags=()) -> dict:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"format": "loradb", "version": [FORMAT_MAJOR, FORMAT_MINOR],
            "collection": {"name": str(name or ""), "creator": str(creator or ""),
                           "description": str(description or ""), "tags": [str(t) for t in tags or []],
                           "created": now, "modified": now, "tool": f"LoRA Lens {__version__}"},
            "entries": []}


# ------------------------------------------------------------------ sources
class FileInTheWay(LensError):
    """An entry is fine but its output file already exists (not a damaged entry)."""


class CannotWrite(LensError):
    """An entry is fine but its file could not be written (the folder, the disk; not a damaged entry)."""


class Source:
    """One LoRA to pack: a file on disk, or a model from the graph (written to a temp file)."""

    def __init__(self, item, name: str | None = None):
        self.tmp = None
        if isinstance(item, (str, os.PathLike)):
            self.path = os.fspath(item)
            if not os.path.isfile(self.path):
                raise LensError(f"{self.path} does not exist or is not a file.")
            self.file_name = os.path.basename(self.path)
            self._model = None
        else:
            from ..model import ensure_model
            from ..st_io import save_file
            model = ensure_model(item)
            fd, self.tmp = tempfile.mkstemp(prefix=".lens-src-", suffix=SUFFIX)
            os.close(fd)
            save_file(model.state_dict(), self.tmp, model.metadata or None)
            self.path = self.tmp
            self.file_name = safe_file_name(name or "lora")
            self._model = model
        self.name = entry_name(name) if name else self.file_name[: -len(SUFFIX)] \
            if self.file_name.lower().endswith(SUFFIX) else self.file_name

    def model(self, mapped: bool = False) -> LoRAModel:
        """The LoRA (memory-mapped when `mapped`: its pages can be handed back, see LoRAModel.release)."""
        if self._model is None:
            from ..model import LoRAModel
            try:
                self._model = LoRAModel.load(self.path, mapped=mapped)
            except LensError as e:   # among many files, say which one
                msg = str(e)
                if self.file_name in msg or os.path.basename(self.path) in msg:
                    raise
                raise LensError(f"{self.file_name}: {msg[:1].lower() + msg[1:]}") from None
        return self._model

    def cleanup(self):
        if self.tmp and os.path.exists(self.tmp):
            os.unlink(self.tmp)


def _unique(name: str, taken: set) -> str:
    base, n = name, 2
    while name in taken:
        name = f"{base} ({n})"
        n += 1
    taken.add(name)
    return name


# ------------------------------------------------------------------ writing entries
def _write_entries(writer: Writer, header: dict, sources: list[Source], dedup: DedupIndex | None,
                   level: int, outputs: dict | None, progress: Progress) -> list[dict]:
    """Encode each source (or its lossy output file from `outputs`) and append entry records."""
    taken = {e.get("name") for e in header["entries"]}
    taken_files = {e.get("file_name") for e in header["entries"]}
    new = []
    for i, src in enumerate(sources):
        out = (outputs or {}).get(i)
        model = src.model()
        before = writer.written
        table, stats = encode_file(writer, out["path"] if out else src.path, dedup, level,
                                   out.get("computed") if out else None)
        tdesc = writer.put_table(table)
        file_name = safe_file_name(src.file_name)
        if file_name in taken_files:
            stem = file_name[: -len(SUFFIX)]
            n = 2
            while f"{stem} ({n}){SUFFIX}" in taken_files:
                n += 1
            file_name = f"{stem} ({n}){SUFFIX}"
        taken_files.add(file_name)
        orig_size = os.path.getsize(src.path)
        orig_sha = stats["sha256"] if not out else _sha_file(src.path)
        rec = {"name": _unique(src.name or file_name[:-len(SUFFIX)], taken), "file_name": file_name,
               "original_bytes": orig_size, "original_sha256": orig_sha, **describe_model(model),
               "metadata": dict(model.metadata), "codec": CODEC_NAME,
               "layers": ["dedup", "bytegroup-zstd"] if dedup is not None else ["bytegroup-zstd"],
               "lossless": out is None, "output_bytes": stats["size"], "output_sha256": stats["sha256"],
               "stored_bytes": writer.written - before, "dedup_bytes": stats["dedup_bytes"],
               "table": tdesc, "error": None, "added": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        rec["metadata"], rec["trigger_words"] = clean_text(rec["metadata"]), clean_text(rec["trigger_words"])
        if out:
            rec["layers"] = out["layers"] + rec["layers"]
            rec["error"] = out["error"]
            rec["settings"] = out.get("settings", {})
            rec["stored_bytes"] += out.get("extra_bytes", 0)
        header["entries"].append(rec)
        new.append(rec)
        if progress:
            progress(i + 1, len(sources))
    return new


def _dumps(obj) -> bytes:
    from .container import dumps_json
    return dumps_json(obj)


_HASH_POOL = ThreadPoolExecutor(max_workers=1)
WRITES_AHEAD = 2   # pieces handed to the writer thread and not yet written (each holds its buffer)


_FALLOCATE = None


def _preallocate(fd: int, size: int) -> None:
    """Reserve the blocks of a file about to be written (Linux fallocate(2), best effort): ext4 then writes
    into allocated extents instead of reserving delayed-allocation blocks page by page (measured: writing
    218 MiB in 8 MiB pieces took 23 ms of CPU instead of 37). fallocate(2), not posix_fallocate, which
    would write zeros on a file system without it; any failure is ignored (writing reports real errors)."""
    global _FALLOCATE
    if _FALLOCATE is None:
        _FALLOCATE = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes
                fn = ctypes.CDLL(None, use_errno=True).fallocate
                fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
                fn.restype = ctypes.c_int
                _FALLOCATE = fn
            except (OSError, AttributeError):
                pass
    if _FALLOCATE and isinstance(size, int) and size > 0:
        _FALLOCATE(fd, 0, 0, size)


def _write_all(f, view: memoryview):
    view = view.cast("B") if view.format != "B" else view
    while len(view):
        n = f.write(view)
        view = view[n:]


def _sha_of(data: np.ndarray) -> str:
    return hashlib.sha256(memoryview(data)).hexdigest()


def _sha_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _sources(items) -> list[Source]:
    out = []
    try:
        for it in items:
            if isinstance(it, Source):
                out.append(it)
            elif isinstance(it, tuple):
                out.append(Source(it[1], it[0]))
            else:
                out.append(Source(it))
    except BaseException:
        for s in out:
            s.cleanup()
        raise
    return out


def pack(out_path: str, items: Iterable, name: str = "", creator: str = "", description: str = "",
         tags: Iterable[str] = (), recipe: str | None = None, int8: bool = False, shared_basis: str = "off",
         dedup: bool = True, level: int = DEFAULT_LEVEL, snr_db: float = 35.0, device="cpu",
         progress: Progress = None, int8_folded: bool = False) -> dict:
    """Write a new .loradb (temp file + rename). Lossless unless recipe/int8/int8_folded/shared_basis ask otherwise.
    int8: the quantised-coefficient coder (smallest; entries extract as fp16 at the SNR budget); int8_folded: each
    entry stored as QuantizeInt8's file (int8 factors, scales folded into alpha; extracts as exactly that file).

    `items`: paths of .safetensors files, or (name, LoRAModel | LORA_MODEL dict) pairs.
    Returns a report (see report_of)."""
    items = list(items)
    if not items:
        raise LensError("Nothing to pack: give at least one LoRA.")
    if shared_basis not in ("off", "on", "auto"):
        raise LensError(f"shared basis must be off, on or auto, not {shared_basis!r}.")
    if int8_folded and (int8 or shared_basis != "off"):
        raise LensError("int8 with folded alpha (QuantizeInt8 files) cannot be combined with the coded int8 or the "
                        "shared basis: choose one.")
    srcs = [s for s in _sources(items)]
    for s in srcs:
        if os.path.exists(out_path) and os.path.samefile(s.path, out_path):
            raise LensError(f"Refusing to overwrite the input file {s.path}; choose another output name.")
    header = _new_header(name or os.path.splitext(os.path.basename(out_path))[0], creator, description, tags)
    writer = Writer(out_path, level=level)
    lossy = None
    try:
        if recipe or int8 or int8_folded or shared_basis != "off":
            from .lossy import prepare_coded, prepare_pruned
            if int8 or shared_basis != "off":
                lossy = prepare_coded(srcs, writer, recipe=recipe, int8=int8, shared_basis=shared_basis,
                                      snr_db=snr_db, level=level, device=device, progress=progress)
            else:
                lossy = prepare_pruned(srcs, recipe, snr_db=snr_db, device=device, fold_int8=int8_folded)
        _write_entries(writer, header, srcs, DedupIndex() if dedup else None, level,
                       lossy.outputs if lossy else None, progress)
        if lossy:
            header["collection"]["lossy"] = lossy.summary
        path = writer.commit(header)
    except BaseException:
        writer.abort()
        raise
    finally:
        for s in srcs:
            s.cleanup()
        if lossy:
            lossy.cleanup()
    return report_of(path, header)


def _check_ours(db_path: str) -> None:
    """Appending and removing work in place on our own format only: an app v1.0 file is converted first."""
    if os.path.isfile(db_path):
        with open(db_path, "rb") as f:
            if f.read(8) != MAGIC:
                try:
                    from .legacy import LegacyCollection
                    LegacyCollection(db_path)
                except LensError:
                    return   # not a collection at all: the reader's own sentence follows
                raise LensError(f"{os.path.basename(db_path)} is a LoRA Lens app v1.0 collection; rewrite it in "
                                "this format first (lora-lens convert OLD.loradb NEW.loradb), then add or remove.")


def append(db_path: str, items: Iterable, level: int = DEFAULT_LEVEL, progress: Progress = None) -> dict:
    """Add entries (lossless) to an existing collection in place: new payloads go after the current end,
    then a new header is committed through the older slot; the rest is not rewritten."""
    _check_ours(db_path)
    srcs = _sources(list(items))
    writer = Writer(db_path, append=True, level=level)
    try:
        with Reader(db_path) as r:
            header = r.header
            dedup = DedupIndex()
            for e in header["entries"]:
                try:
                    dedup.add_table(_table(r, e))
                except LensError:
                    pass
        _write_entries(writer, header, srcs, dedup, level, None, progress)
        header["collection"]["modified"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        writer.commit(header)
    except BaseException:
        writer.abort()
        raise
    finally:
        for s in srcs:
            s.cleanup()
    return report_of(db_path, header)


def remove(db_path: str, names: Iterable[str]) -> dict:
    """Drop entries from the header only (their bytes stay until `lora-lens convert` rewrites the file)."""
    names = list(names)
    _check_ours(db_path)
    writer = Writer(db_path, append=True)
    try:
        with Reader(db_path) as r:
            header = r.header
        found = {e.get("name") for e in header["entries"]}
        missing = [n for n in names if n not in found]
        if missing:
            raise LensError(f"The collection has no entry named {missing[0]!r}.")
        header["entries"] = [e for e in header["entries"] if e.get("name") not in set(names)]
        header["collection"]["modified"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        writer.commit(header)
    except BaseException:
        writer.abort()
        raise
    return report_of(db_path, header)


# ------------------------------------------------------------------ reading
def _table(reader: Reader, entry: dict) -> dict:
    what = f"entry {entry.get('name')!r}"
    return loads_json(reader.blob(entry.get("table"), MAX_TABLE_BYTES, f"the table of {what}"),
                      f"{reader.name}: the table of {what}")


class Collection:
    """An open .loradb (ours, or the LoRA Lens app's v1.0 safetensors collections)."""

    def __init__(self, path: str):
        self.path = path
        self.name = os.path.basename(path)
        with open(path, "rb") if os.path.isfile(path) else _missing(path) as f:
            head = f.read(8)
        if head == MAGIC:
            self.legacy = None
            self.reader = Reader(path)
            self.header = self.reader.header
            self.warnings = list(self.reader.warnings)
        else:
            from .legacy import LegacyCollection
            self.reader = None
            self.legacy = LegacyCollection(path)
            self.header = self.legacy.header
            self.warnings = list(self.legacy.warnings)
        self.entries = [e for e in self.header["entries"] if isinstance(e, dict)]

    def close(self):
        if self.reader:
            self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def collection(self) -> dict:
        return self.header.get("collection", {})

    def find(self, names: Iterable[str] | None) -> list[dict]:
        if not names:
            return list(self.entries)
        out = []
        for n in names:   # an exact entry name wins over a file name, which wins over a sanitised one
            hit = next((e for test in (lambda e: e.get("name") == n, lambda e: e.get("file_name") == n,
                                       lambda e: e.get("file_name") == safe_file_name(n))
                        for e in self.entries if test(e)), None)
            if hit is None:
                raise LensError(f"{self.name} has no entry named {n!r}; run `lora-lens list` to see the names.")
            if not any(hit is o for o in out):   # an entry named twice is extracted once
                out.append(hit)
        return out

    def extract_bytes(self, entry: dict, verify: bool = True, sink=None) -> np.ndarray | None:
        """The entry's file bytes (a numpy uint8 array), verified against the recorded sha256 (raises
        LensError naming it). `sink(view)` receives the bytes in order while they are rebuilt; then verifying
        is the caller's job, and a lossless entry's bytes are not kept whole (returns None)."""
        what = f"{self.name}: entry {entry.get('name')!r}"
        if self.legacy:
            data = self.legacy.extract_bytes(entry)
            if sink is not None:
                sink(data)
            return data
        size = entry.get("output_bytes")
        cap = min(MAX_ENTRY_OUTPUT, 256 * self.reader.size + 64 * 2**20)
        if not isinstance(size, int) or size < 8 or size > cap:
            raise LensError(f"{what} declares an impossible size ({size} bytes).")
        try:
            data = decode_file(self.reader, _table(self.reader, entry), what, size, sink)
        except LensError as e:
            msg = str(e)
            msg = msg.replace(f"{self.name}: {self.name}: ", f"{self.name}: ")   # (the reader names the file too)
            raise LensError(msg if f"entry {entry.get('name')!r}" in msg
                            else f"{what} is damaged: {msg}") from None
        if data is not None and (data.size != size or (verify and _sha_of(data) != entry.get("output_sha256"))):
            raise LensError(f"{what} is damaged: its rebuilt bytes fail the recorded sha256 checksum.")
        return data

    def extract_model(self, entry: dict) -> LoRAModel:
        from ..model import LoRAModel
        data = self.extract_bytes(entry)
        fd, tmp = tempfile.mkstemp(prefix=".lens-x-", suffix=SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(memoryview(data))
            model = LoRAModel.load(tmp)
            model.source = None
            return model
        finally:
            os.unlink(tmp)

    def extract_to(self, folder: str, names: Iterable[str] | None = None, progress: Progress = None,
                   overwrite: bool = False) -> dict:
        """Write entries as their original file names into `folder`; undamaged entries are written even
        when others are damaged (those are listed in 'damaged'; nothing partial is left behind)."""
        entries = self.find(names)
        make_folder(folder)
        written, damaged, used = [], [], set()
        for i, e in enumerate(entries):
            fname = safe_file_name(e.get("file_name") or e.get("name"), fallback=f"entry_{i}")
            stem, n = fname[: -len(SUFFIX)], 2
            while fname.lower() in used:   # two entries with one file name (the app's files, hostile ones):
                fname = f"{stem} ({n}){SUFFIX}"   # the later one gets a number, never the earlier's file
                n += 1
            used.add(fname.lower())
            target = os.path.join(folder, fname)
            try:
                if os.path.exists(target) and not overwrite:
                    raise FileInTheWay(f"{target} already exists; remove it or choose another folder.")
                try:
                    fd, tmp = tempfile.mkstemp(prefix=".lens-", suffix=".tmp", dir=folder)
                except OSError as err:
                    raise CannotWrite(f"cannot write into {folder} ({err.strerror or err}).") from None
                try:
                    h = hashlib.sha256()
                    nbytes = 0
                    with os.fdopen(fd, "wb", buffering=0) as f:
                        writes = []

                        def sink(view):   # hash here, write on another thread, while the rest decodes
                            nonlocal nbytes
                            if not nbytes:   # (the entry's records are checked by now)
                                _preallocate(f.fileno(), e.get("output_bytes"))
                            view = memoryview(view)
                            writes.append(_HASH_POOL.submit(_write_all, f, view))
                            h.update(view)
                            if len(writes) > WRITES_AHEAD:   # the writer keeps up: finished writes free
                                writes.pop(0).result()      # their buffers (fresh memory is slow here)
                            nbytes += view.nbytes

                        try:
                            self.extract_bytes(e, verify=False, sink=sink)
                        finally:
                            for w in writes:
                                w.result()
                    if nbytes != e.get("output_bytes") or h.hexdigest() != e.get("output_sha256"):
                        # (the size too: the file was pre-allocated to the declared size, so fewer rebuilt
                        # bytes would leave a zero tail that the checksum of the rebuilt bytes cannot see)
                        raise LensError(f"{self.name}: entry {e.get('name')!r} is damaged: its rebuilt bytes "
                                        "fail the recorded sha256 checksum.")
                    try:
                        os.chmod(tmp, new_file_mode())
                        os.replace(tmp, target)
                    except OSError as err:
                        raise CannotWrite(f"{target} could not be written ({err.strerror or err}).") from None
                except BaseException:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
                    raise
                written.append({"name": e.get("name"), "path": target, "bytes": nbytes,
                                "lossless": bool(e.get("lossless")), "sha256": e.get("output_sha256")})
            except LensError as err:
                damaged.append({"name": e.get("name"), "error": str(err), "exists": isinstance(err, FileInTheWay),
                                "write": isinstance(err, CannotWrite)})
            if progress:
                progress(i + 1, len(entries))
        return {"written": written, "damaged": damaged}


class _missing:
    def __init__(self, path):
        raise LensError(f"{path} does not exist or is not a file.")


def open_collection(path: str) -> Collection:
    return Collection(path)


def report_of(path: str, header: dict) -> dict:
    total_in = sum(int(e.get("original_bytes") or 0) for e in header["entries"])
    size = os.path.getsize(path)
    rows = []
    for e in header["entries"]:
        rows.append({"name": e.get("name"), "file_name": e.get("file_name"),
                     "original_bytes": e.get("original_bytes"), "stored_bytes": e.get("stored_bytes"),
                     "ratio": (e.get("stored_bytes") or 0) / max(e.get("original_bytes") or 1, 1),
                     "lossless": e.get("lossless"), "layers": e.get("layers"), "error": e.get("error")})
    return {"path": os.path.abspath(path), "entries": rows, "original_bytes": total_in, "loradb_bytes": size,
            "ratio": size / max(total_in, 1), "reduction_percent": 100.0 * (1 - size / max(total_in, 1)),
            "collection": header.get("collection", {})}


def convert(old: str, new: str, progress: Progress = None, level: int = DEFAULT_LEVEL) -> dict:
    """Rewrite any readable .loradb (the app's v1.0, or ours: compacting removed entries) in our format."""
    if os.path.exists(new) and os.path.samefile(old, new):
        raise LensError("Refusing to overwrite the input file; choose another output name.")
    with Collection(old) as c:
        coll = c.collection if isinstance(c.collection, dict) else {}
        text = lambda v: v if isinstance(v, str) else ""  # noqa: E731  (a stranger's header: keep only text)
        tags = coll.get("tags")
        header = _new_header(text(coll.get("name")) or os.path.splitext(c.name)[0], text(coll.get("creator")),
                             text(coll.get("description")),
                             [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else [])
        for k in ("created", "edition", "source_format"):
            if coll.get(k) and isinstance(coll[k], str):
                header["collection"][k] = coll[k]
        writer = Writer(new, level=level)
        dedup = DedupIndex()
        tmpdir = tempfile.mkdtemp(prefix=".lens-conv-")
        try:
            for i, e in enumerate(c.entries):
                data = c.extract_bytes(e)
                p = os.path.join(tmpdir, "x" + SUFFIX)
                with open(p, "wb") as f:
                    f.write(memoryview(data))
                src = Source(p)
                src.file_name = safe_file_name(e.get("file_name") or e.get("name"), fallback=f"entry_{i}")
                src.name = entry_name(e.get("name")) or src.file_name[:-len(SUFFIX)]
                rec = _write_entries(writer, header, [src], dedup, level, None, None)[0]
                for k, kind in (("original_bytes", int), ("original_sha256", str), ("error", dict),
                                ("settings", dict)):
                    if isinstance(e.get(k), kind) and not isinstance(e.get(k), bool):
                        rec[k] = e[k]
                lossless = bool(e.get("lossless")) and e.get("output_sha256") == e.get("original_sha256")
                rec["lossless"] = lossless
                if not lossless:
                    layers = [x for x in e.get("layers") if isinstance(x, str)] \
                        if isinstance(e.get("layers"), list) else []
                    rec["layers"] = (layers or ["lossy source"]) + rec["layers"]
                    rec["layers"] = list(dict.fromkeys(rec["layers"]))
                if c.legacy:
                    rec["source_note"] = "lossy source: converted from a LoRA Lens app v1.0 .loradb"
                os.unlink(p)
                if progress:
                    progress(i + 1, len(c.entries))
            path = writer.commit(header)
        except BaseException:
            writer.abort()
            raise
        finally:
            for f in os.listdir(tmpdir):
                os.unlink(os.path.join(tmpdir, f))
            os.rmdir(tmpdir)
    return report_of(path, header)
