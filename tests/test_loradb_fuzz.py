"""Fuzzing the .loradb reader: thousands of mutated files (bit flips, byte runs, truncation, spliced
headers with hostile JSON), bounded to about a minute in total. Every outcome must be a clean extraction
or a LensError; never another exception, never a hang, never a file left behind in the output folder."""
from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lens_ops import LensError
from lens_ops.loradb import open_collection, pack
from lens_ops.loradb.container import _slot_bytes
from lens_ops.st_io import save_file
from lens_ops.synth import make_lora

BUDGET_S = 42.0
_START = [time.monotonic()]   # reset when the suite's first test starts (not at collection)
CHECKED = [0]


@pytest.fixture(scope="module")
def seed_db(tmp_path_factory):
    _START[0] = time.monotonic()
    d = tmp_path_factory.mktemp("fuzz")
    files = []
    for i in range(3):
        sd = make_lora("sd15_kohya", rank=2, seed=i, max_modules=3)
        p = d / f"l{i}.safetensors"
        save_file(sd, str(p), sd.metadata)
        files.append(str(p))
    db = d / "seed.loradb"
    pack(str(db), files, name="fuzz", tags=["t"])
    return db.read_bytes(), {os.path.basename(f): open(f, "rb").read() for f in files}


def _check(data: bytes, tmp: str, originals: dict):
    CHECKED[0] += 1
    p = os.path.join(tmp, "m.loradb")
    with open(p, "wb") as f:
        f.write(data)
    out = os.path.join(tmp, "out")
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(out):
        os.unlink(os.path.join(out, f))
    t = time.monotonic()
    try:
        with open_collection(p) as c:
            res = c.extract_to(out, overwrite=True)
        for w in res["written"]:
            # anything written passed its checksum: it is one of the packed files, byte for byte
            body = open(w["path"], "rb").read()
            assert hashlib.sha256(body).hexdigest() == w["sha256"]
        listed = set(os.listdir(out))
        assert listed == {os.path.basename(w["path"]) for w in res["written"]}, "stray file left behind"
    except LensError:
        assert not [f for f in os.listdir(out) if f.startswith(".lens-")], "temp file left behind"
    assert time.monotonic() - t < 10, "reader took too long (hang?)"


def _remaining():
    return BUDGET_S - (time.monotonic() - _START[0])


mutation = st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255), st.integers(1, 16)), min_size=1, max_size=6)


@settings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(muts=mutation, cut=st.one_of(st.none(), st.integers(0, 2**31)))
def test_mutated_files(seed_db, tmp_path_factory, muts, cut):
    if _remaining() < 28:
        return
    data, originals = seed_db
    b = bytearray(data)
    for pos, val, run in muts:
        pos %= len(b)
        b[pos:pos + run] = bytes([val]) * min(run, len(b) - pos)
    if cut is not None:
        b = b[: cut % (len(b) + 1)]
    _check(bytes(b), str(tmp_path_factory.getbasetemp()), originals)


def _with_header(data: bytes, header_obj) -> bytes:
    """A file whose newest slot points at a fresh, valid-checksum header holding `header_obj`."""
    raw = json.dumps(header_obj).encode()
    stored = zstandard.ZstdCompressor().compress(raw)
    off = len(data)
    slot = _slot_bytes(99, off, len(stored), len(raw), 1, hashlib.sha256(stored).digest())
    b = bytearray(data) + stored
    b[16:80] = slot
    return bytes(b)


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                      st.text(max_size=20))
json_val = st.recursive(json_leaf, lambda ch: st.one_of(st.lists(ch, max_size=5),
                                                         st.dictionaries(st.text(max_size=8), ch, max_size=5)),
                        max_leaves=20)


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(field=st.sampled_from(["table", "output_bytes", "output_sha256", "file_name", "name", "entries"]),
       value=json_val, table_part=st.integers(0, 5), tvalue=json_val)
def test_hostile_header_json(seed_db, tmp_path_factory, field, value, table_part, tvalue):
    """Valid checksums, hostile content: entry records and table locations replaced by arbitrary JSON."""
    if _remaining() < 14:
        return
    data, originals = seed_db
    with open_collection_bytes(data, tmp_path_factory) as c:
        header = json.loads(json.dumps(c.header))
    e = header["entries"][0]
    if field == "entries":
        header["entries"] = value
    elif field == "table" and isinstance(e["table"], list):
        t = list(e["table"])
        t[table_part % len(t)] = tvalue
        e["table"] = t
    else:
        e[field] = value
    _check(_with_header(data, header), str(tmp_path_factory.getbasetemp()), originals)


def test_hostile_names_never_escape(seed_db, tmp_path):
    data, originals = seed_db
    with open_collection_bytes(data, None, tmp_path) as c:
        header = json.loads(json.dumps(c.header))
    for i, bad in enumerate(["../../evil.safetensors", "/etc/passwd", "..", "CON", "a\\..\\b"]):
        header["entries"][i % 3]["file_name"] = bad
        header["entries"][i % 3]["name"] = bad
        out = tmp_path / f"o{i}"
        p = tmp_path / f"h{i}.loradb"
        p.write_bytes(_with_header(data, header))
        with open_collection(str(p)) as c:
            res = c.extract_to(str(out))
        for w in res["written"]:
            assert os.path.dirname(os.path.abspath(w["path"])) == str(out)
    assert not (tmp_path / "evil.safetensors").exists()


@pytest.fixture(scope="module")
def lossy_db(tmp_path_factory):
    """A small collection coded with quantised coefficients and a shared basis (qlr segments)."""
    t0 = time.monotonic()
    d = tmp_path_factory.mktemp("fuzzq")
    base = make_lora("sd15_kohya", rank=4, seed=5, max_modules=2, dtype=torch.float32)
    files = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        sd = {k: ((v + 0.05 * v.std() * torch.randn(v.shape, generator=g)) if "lora_up" in k else v).half()
              for k, v in base.items()}
        p = d / f"q{i}.safetensors"
        save_file(sd, str(p), base.metadata)
        files.append(str(p))
    db = d / "q.loradb"
    pack(str(db), files, int8=True, shared_basis="on")
    data = db.read_bytes()
    with open_collection(str(db)) as c:
        header = json.loads(json.dumps(c.header))
        from lens_ops.loradb.db import _table
        table = _table(c.reader, c.entries[0])
    assert any(seg[2] == "qlr" for seg in table["segments"] if isinstance(seg, list) and len(seg) == 8)
    _START[0] += time.monotonic() - t0   # building the seed is not fuzzing time
    return _Seed(data, header, table)


class _Seed(tuple):
    def __new__(cls, *items):
        return super().__new__(cls, items)

    def __repr__(self):
        return "<lossy seed collection>"


def _paths(obj, prefix=()):
    """Every position inside the qlr segments of a table (to replace one with hostile JSON)."""
    if isinstance(obj, list):
        for i, x in enumerate(obj):
            yield prefix + (i,)
            yield from _paths(x, prefix + (i,))


@settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(pick=st.integers(0, 2**31), value=json_val)
def test_hostile_quantised_records(lossy_db, tmp_path_factory, pick, value):
    """Valid checksums, hostile content inside the quantised-tensor (qlr) records of an entry table."""
    if _remaining() < 3:
        return
    data, header, table = lossy_db
    t = json.loads(json.dumps(table))
    segs = [i for i, sg in enumerate(t["segments"]) if isinstance(sg, list) and len(sg) == 8 and sg[2] == "qlr"]
    seg = t["segments"][segs[pick % len(segs)]]
    paths = list(_paths(seg))
    path = paths[(pick // 7) % len(paths)]
    obj = seg
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value
    raw = json.dumps(t).encode()
    stored = zstandard.ZstdCompressor().compress(raw)
    h = json.loads(json.dumps(header))
    h["entries"][0]["table"] = [len(data), len(stored), len(raw), "zstd", hashlib.sha256(raw).hexdigest()]
    _check(_with_header(data + stored, h), str(tmp_path_factory.getbasetemp()), {})


class open_collection_bytes:
    def __init__(self, data, factory, tmp=None):
        base = str(tmp) if tmp else str(factory.getbasetemp())
        self.p = os.path.join(base, "orig.loradb")
        with open(self.p, "wb") as f:
            f.write(data)

    def __enter__(self):
        self.c = open_collection(self.p)
        return self.c

    def __exit__(self, *a):
        self.c.close()


def test_fuzz_budget_respected():
    """Bounded (about a minute) and substantial: thousands of mutated files were read."""
    print(f"fuzzed {CHECKED[0]} files in {time.monotonic() - _START[0]:.1f} s")
    assert time.monotonic() - _START[0] < 75   # a minute, plus slack for a shared, overloaded machine
    assert CHECKED[0] >= 1000
