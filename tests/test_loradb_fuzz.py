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
    if _remaining() < 22:
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
    if _remaining() < 5:
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
