"""Lossless .loradb extraction, batch by batch (lens_ops/loradb/entry.py `_plain_plan` / `_decode_plain`):
bit-exact bytes whichever way chunks, batches and transposed tensors fall, the sha256 check, damaged
chunks (nothing left behind, no hang), and a start that does not wait for numpy."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from lens_ops import LensError
from lens_ops.loradb import codec, entry, open_collection, pack
from lens_ops.loradb.db import _table
from lens_ops.st_io import save_file
from lens_ops.synth import make_lora


def _sha(p):
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def _odd_file(path):
    """Another writer's header spacing and padding, an odd data start (unaligned 2- and 4-byte elements),
    an int8 and an empty tensor, tall fp16 and fp32 matrices (stored transposed)."""
    header = {"__metadata__": {"k": "v"},
              "lora_unet_a.lora_up.weight": {"dtype": "F16", "shape": [300, 3], "data_offsets": [0, 1800]},
              "lora_unet_a.lora_down.weight": {"dtype": "F16", "shape": [3, 40], "data_offsets": [1800, 2040]},
              "b": {"dtype": "I8", "shape": [7], "data_offsets": [2040, 2047]},
              "c": {"dtype": "F32", "shape": [0], "data_offsets": [2047, 2047]},
              "d": {"dtype": "F32", "shape": [500, 2], "data_offsets": [2047, 6047]}}
    raw = json.dumps(header, indent=1).encode()
    raw += b" " * (-len(raw) % 8) + b"\t"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + os.urandom(6047))
    return str(path)


@pytest.fixture(params=["bytes", "into"])
def small_chunks(monkeypatch, request):
    """Chunks of 1 KiB per plane and batches of 4 KiB: tensors cross chunk and batch boundaries; chunks are
    inflated to new bytes objects, or (as 4 MiB chunks are) into numpy buffers once numpy is imported."""
    monkeypatch.setattr(codec, "CHUNK_BYTES", 1024)
    monkeypatch.setattr(entry, "MOVE_BATCH", 4096)
    monkeypatch.setattr(entry, "INFLATE_AHEAD", 2048)
    monkeypatch.setattr(entry, "INFLATE_INTO_MIN", 1 << 40 if request.param == "bytes" else 0)


@pytest.fixture
def files(tmp_path):
    out = []
    for i, (layout, dt) in enumerate([("sdxl_kohya", torch.float16), ("sd15_kohya", torch.bfloat16),
                                      ("sd15_kohya_locon", torch.float32)]):
        sd = make_lora(layout, rank=4, seed=10 + i, max_modules=6, dtype=dt)
        p = str(tmp_path / f"l{i}.safetensors")
        save_file(sd, p, sd.metadata)
        out.append(p)
    out.append(_odd_file(tmp_path / "odd.safetensors"))
    return out


def _spans_chunks(table) -> bool:
    """Whether some transposed tensor's stored range crosses a chunk boundary of its stream."""
    for seg in table["segments"]:
        if len(seg) >= 6 and isinstance(seg[2], int) and seg[4]:
            st = table["streams"][seg[2]]
            bounds, pos = [c[2] for c in st["planes"][0]], 0
            first, last = seg[3], seg[3] + seg[1] // st["e"] - 1
            for b in bounds:
                if pos <= first < pos + b:
                    if last >= pos + b:
                        return True
                    break
                pos += b
    return False


@pytest.mark.parametrize("ahead", [0, 1, 4])
def test_batches_rebuild_every_file_bit_exact(tmp_path, files, small_chunks, monkeypatch, ahead):
    monkeypatch.setattr(entry, "BATCHES_AHEAD", ahead)
    db = str(tmp_path / "c.loradb")
    pack(db, files, dedup=False)

    def no_general(*a, **k):
        raise AssertionError("a lossless entry went through the general (whole-stream) decoder")

    general_decoder = entry._decode_general

    with open_collection(db) as c:
        assert any(_spans_chunks(_table(c.reader, e)) for e in c.entries)
        for e, p in zip(c.entries, files):
            want = open(p, "rb").read()
            t = _table(c.reader, e)
            general = entry._decode_general(c.reader, t["streams"], t["segments"], t["header"].encode(),
                                            t["data_start"], t["size"], "x")
            assert bytes(general) == want
            monkeypatch.setattr(entry, "_decode_general", no_general)
            assert bytes(c.extract_bytes(e)) == want
            pieces = []
            assert c.extract_bytes(e, verify=False, sink=lambda v: pieces.append(bytes(v))) is None
            assert b"".join(pieces) == want and (len(pieces) > 1 or len(want) < 3 * 4096)
            monkeypatch.setattr(entry, "_decode_general", general_decoder)
        res = c.extract_to(str(tmp_path / "x"))
    assert not res["damaged"]
    for p in files:
        assert _sha(tmp_path / "x" / os.path.basename(p)) == _sha(p)


def test_dedup_entries_read_other_entries_chunks(tmp_path, files, small_chunks):
    """With de-duplication an entry reads chunks of streams stored by earlier entries (only those it needs)."""
    sd = make_lora("sdxl_kohya", rank=4, seed=10, max_modules=6, dtype=torch.float16)
    twin = {k: (v * 2 if "lora_up" in k else v) for k, v in sd.items()}
    p = str(tmp_path / "twin.safetensors")
    save_file(twin, p, sd.metadata)
    db = str(tmp_path / "d.loradb")
    pack(db, files + [p])
    with open_collection(db) as c:
        e = c.entries[-1]
        assert e["dedup_bytes"] > 0 and len({s[2] for s in _table(c.reader, e)["segments"]}) > 1
        assert bytes(c.extract_bytes(e)) == open(p, "rb").read()


def _corrupt_middle_chunk(db, index):
    with open_collection(db) as c:
        t = _table(c.reader, c.entries[index])
    st = t["streams"][0]
    zchunks = [c for p in st["planes"] for c in p if c[3] == "zstd"]
    victim = zchunks[len(zchunks) // 2]
    data = bytearray(open(db, "rb").read())
    data[st.get("base", 0) + victim[0] + victim[1] // 2] ^= 0x5A
    open(db, "wb").write(bytes(data))


@pytest.mark.parametrize("ahead", [0, 4])
def test_damaged_chunk_mid_entry_leaves_nothing_and_does_not_hang(tmp_path, files, small_chunks, monkeypatch, ahead):
    monkeypatch.setattr(entry, "BATCHES_AHEAD", ahead)
    db = str(tmp_path / "m.loradb")
    pack(db, files, dedup=False)
    _corrupt_middle_chunk(db, 0)
    out = tmp_path / "out"
    result = {}

    def run():
        with open_collection(db) as c:
            result["res"] = c.extract_to(str(out))

    th = threading.Thread(target=run)
    th.start()
    th.join(60)
    assert not th.is_alive(), "extraction hung on a damaged chunk"
    res = result["res"]
    assert [d["name"] for d in res["damaged"]] == ["l0"] and "l0" in res["damaged"][0]["error"]
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in files[1:])   # no temp file left
    with open_collection(db) as c, pytest.raises(LensError, match="l0"):
        c.extract_bytes(c.entries[0])


def test_flipped_raw_byte_fails_the_checksum(tmp_path, files):
    """Mantissa planes are usually stored raw (no zstd frame checksum): the sha256 must catch a flipped bit."""
    db = str(tmp_path / "r.loradb")
    pack(db, files[:1], dedup=False)
    with open_collection(db) as c:
        t = _table(c.reader, c.entries[0])
    raw = [(s.get("base", 0), ch) for s in t["streams"] for p in s["planes"] for ch in p if ch[3] == "raw"]
    assert raw
    base, ch = raw[0]
    data = bytearray(open(db, "rb").read())
    data[base + ch[0] + ch[1] // 3] ^= 0x01
    open(db, "wb").write(bytes(data))
    out = tmp_path / "out"
    with open_collection(db) as c:
        res = c.extract_to(str(out))
    assert res["damaged"] and "sha256" in res["damaged"][0]["error"] and os.listdir(out) == []


def test_inflate_into_checks_like_inflate():
    import zstandard
    import numpy as np
    from lens_ops.loradb.container import inflate, inflate_into
    raw = bytes(range(256)) * 64
    z = zstandard.ZstdCompressor(level=3, write_checksum=True, write_content_size=True).compress(raw)
    buf = np.empty(len(raw), np.uint8)
    inflate_into(z, len(raw), 1 << 20, "x", buf)
    assert buf.tobytes() == raw == inflate(z, len(raw), 1 << 20, "x")
    for bad, match in [(z[:-1] + bytes([z[-1] ^ 1]), "does not decode"), (z[:-9], "decodes to|does not decode"),
                       (z + b"junk", "does not decode"), (b"not zstd at all", "not a zstd frame")]:
        with pytest.raises(LensError, match=match):
            inflate_into(bad, len(raw), 1 << 20, "x", np.empty(len(raw), np.uint8))
        with pytest.raises(LensError, match=match):   # both decoders refuse the same inputs
            inflate(bad, len(raw), 1 << 20, "x")
    with pytest.raises(LensError, match="frame holds"):
        inflate_into(z, len(raw) - 1, 1 << 20, "x", np.empty(len(raw) - 1, np.uint8))
    with pytest.raises(LensError, match="limit"):
        inflate_into(z, len(raw), 100, "x", buf)
    unknown = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    with pytest.raises(LensError, match="more than"):
        inflate_into(unknown, len(raw) - 10, 1 << 20, "x", np.empty(len(raw) - 10, np.uint8))


def test_buffers_are_reused_only_when_no_view_is_left():
    import gc

    import numpy as np
    pool = entry._Buffers()
    a = pool.take(np, 5 << 20)
    assert a.size == 5 << 20 and a.__array_interface__["data"][0] % entry.HUGE == 0
    a[:] = 1
    held = memoryview(a[10:20])          # a slice of it (or a slice of a slice) keeps it out of the pool
    held2 = np.frombuffer(a, np.uint8)[100:200][1:5]
    del a
    gc.collect()
    b = pool.take(np, 5 << 20)
    assert not np.shares_memory(np.frombuffer(held, np.uint8), b) and bytes(held) == b"\x01" * 10
    assert not np.shares_memory(held2, b)
    base_b = b.base
    del b
    gc.collect()
    c = pool.take(np, 3 << 20)           # the smallest free buffer that fits: b's
    assert np.shares_memory(c, base_b)


def test_planes_cut_differently_use_the_general_decoder():
    desc = {"e": 2, "n": 10, "planes": [[[200, 4, 4, "raw"], [204, 6, 6, "raw"]], [[210, 10, 10, "raw"]]]}
    assert entry._chunk_bounds(desc, "x") is None
    assert entry._chunk_bounds(dict(desc, planes=[desc["planes"][0]] * 2), "x") == (2, 10, [4, 6])
    with pytest.raises(LensError, match="chunks hold"):
        entry._chunk_bounds(dict(desc, n=11), "x")


def test_loradb_import_does_not_import_numpy():
    """Extraction starts inflating chunks before numpy is imported (its ~30 ms overlap the first chunks):
    the collection modules and the extract command must not import it themselves."""
    code = ("import sys; import lens_ops.loradb, lens_ops.cli.extract, lens_ops.cli.list; "
            "print('NUMPY' if 'numpy' in sys.modules else 'NO-NUMPY')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "NO-NUMPY"


def test_cli_extract_lossless_bit_exact_in_a_new_process(tmp_path, files):
    db = str(tmp_path / "p.loradb")
    pack(db, files)
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    code = ("import os, sys; from lens_ops.cli import main; "
            f"rc = main(['extract', {db!r}, '-o', {str(tmp_path / 'o')!r}]); "
            "print(rc, 'TORCH' if 'torch' in sys.modules else 'NO-TORCH', os.environ.get('OPENBLAS_NUM_THREADS'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip().splitlines()[-1] == "0 NO-TORCH 1"
    for p in files:
        assert _sha(tmp_path / "o" / os.path.basename(p)) == _sha(p)
