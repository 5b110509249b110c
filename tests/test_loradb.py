""".loradb collections: lossless round trips (bit-exact), dedup, append/remove, metadata, the app's v1.0
files, CLI contracts and hostile files."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from lens_ops import LensError, LoRAModel
from lens_ops.cli import main
from lens_ops.loradb import append, convert, open_collection, pack, remove, safe_file_name
from lens_ops.st_io import save_file
from lens_ops.synth import make_lora
from lora_factory import KINDS, kind_tensors, gen


def _write(path, sd, meta=None):
    save_file(sd, str(path), meta if meta is not None else getattr(sd, "metadata", None))
    return str(path)


@pytest.fixture
def loras(tmp_path):
    """Three small realistic LoRAs: two checkpoints of one run (shared down factors) + an unrelated one."""
    a = make_lora("sdxl_kohya", rank=8, seed=1, max_modules=12)
    b = {k: (v.float() * 1.1 + 1e-4 * torch.randn(v.shape, generator=gen(2))).to(v.dtype)
         if "lora_up" in k else v.clone() for k, v in a.items()}
    c = make_lora("sd15_kohya_locon", rank=4, seed=3, max_modules=10, dtype=torch.float32)
    meta_b = dict(a.metadata, ss_output_name="char_step2", modelspec_trigger="x")
    return [_write(tmp_path / "char_step1.safetensors", a), _write(tmp_path / "char_step2.safetensors", b, meta_b),
            _write(tmp_path / "style one.safetensors", c, {"note": "unicode ✓ metadata"})]


def _sha(p):
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def test_lossless_round_trip_bit_exact(tmp_path, loras):
    db = str(tmp_path / "c.loradb")
    rep = pack(db, loras, name="Pack", creator="me", description="d", tags=["a", "b"])
    assert rep["loradb_bytes"] < rep["original_bytes"]
    out = tmp_path / "x"
    with open_collection(db) as c:
        assert c.collection["name"] == "Pack" and c.collection["tags"] == ["a", "b"]
        assert [e["file_name"] for e in c.entries] == [os.path.basename(p) for p in loras]
        res = c.extract_to(str(out))
        assert not res["damaged"]
        e2 = c.entries[1]
        assert e2["metadata"]["ss_output_name"] == "char_step2"
        assert e2["lossless"] and e2["architecture"] == LoRAModel.load(loras[1]).architecture.label and e2["rank"] == 8 and e2["dtype"] == "fp16"
        assert e2["dedup_bytes"] > 0  # shared down factors stored once
        assert c.entries[2]["metadata"] == {"note": "unicode ✓ metadata"}
        m = c.extract_model(c.entries[0])
        assert isinstance(m, LoRAModel) and len(m.modules) == 12
    for p in loras:
        assert _sha(out / os.path.basename(p)) == _sha(p)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_and_dtype_bit_exact(tmp_path, kind):
    files = []
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        t, _ = kind_tensors(kind, gen(5), dt)
        files.append(_write(tmp_path / f"{kind}_{str(dt)[6:]}.safetensors", {"lora_unet_m" + k: v for k, v in t.items()}))
    db = str(tmp_path / "k.loradb")
    pack(db, files, dedup=False)
    with open_collection(db) as c:
        for e, p in zip(c.entries, files):
            assert bytes(c.extract_bytes(e)) == open(p, "rb").read()


def test_gaps_int8_and_empty_tensors_exact(tmp_path):
    """A hand-made file (another writer's JSON spacing and padding) with an int8 and a zero-size tensor."""
    header = {"__metadata__": {"k": "v"},
              "lora_unet_a.lora_up.weight": {"dtype": "F16", "shape": [40, 3], "data_offsets": [0, 240]},
              "lora_unet_a.lora_down.weight": {"dtype": "F16", "shape": [3, 4], "data_offsets": [240, 264]},
              "b": {"dtype": "I8", "shape": [7], "data_offsets": [264, 271]},
              "c": {"dtype": "F32", "shape": [0], "data_offsets": [271, 271]}}
    raw = json.dumps(header, indent=1).encode()
    raw += b"\t" * (-len(raw) % 8)
    body = os.urandom(271)
    p = tmp_path / "odd.safetensors"
    p.write_bytes(len(raw).to_bytes(8, "little") + raw + body)
    db = str(tmp_path / "o.loradb")
    pack(db, [str(p)])
    with open_collection(db) as c:
        assert bytes(c.extract_bytes(c.entries[0])) == p.read_bytes()


def test_graph_models_and_duplicate_names(tmp_path, loras):
    m = LoRAModel.load(loras[0])
    db = str(tmp_path / "g.loradb")
    pack(db, [("my lora", m), ("my lora", m.state_dict()), loras[0]])
    with open_collection(db) as c:
        names = [e["name"] for e in c.entries]
        assert names[0] == "my lora" and names[1] == "my lora (2)" and len(set(names)) == 3
        assert len({e["file_name"] for e in c.entries}) == 3
        got = c.extract_model(c.entries[1])
        assert all(torch.equal(got.state_dict()[k], v) for k, v in m.state_dict().items())
        # identical entries are stored once: the third entry costs only its table
        assert c.entries[2]["stored_bytes"] < 0.2 * c.entries[0]["stored_bytes"]


def test_append_and_remove_in_place(tmp_path, loras):
    db = str(tmp_path / "a.loradb")
    pack(db, loras[:1], name="A")
    size1 = os.path.getsize(db)
    head = open(db, "rb").read()[144:size1 - 200]
    append(db, loras[1:])
    assert open(db, "rb").read()[144:size1 - 200] == head  # nothing before the old end is rewritten
    with open_collection(db) as c:
        assert len(c.entries) == 3 and c.collection["name"] == "A"
        assert c.entries[1]["dedup_bytes"] > 0  # dedup reaches entries packed earlier
    remove(db, [os.path.splitext(os.path.basename(loras[0]))[0]])
    out = tmp_path / "x"
    with open_collection(db) as c:
        assert [e["file_name"] for e in c.entries] == [os.path.basename(p) for p in loras[1:]]
        assert not c.extract_to(str(out))["damaged"]   # entry 2 used entry 1's tensors: still fine
    for p in loras[1:]:
        assert _sha(out / os.path.basename(p)) == _sha(p)
    with pytest.raises(LensError, match="no entry named"):
        remove(db, ["nope"])
    # compaction: convert drops the removed entry's bytes
    db2 = str(tmp_path / "b.loradb")
    convert(db, db2)
    assert os.path.getsize(db2) < os.path.getsize(db)
    with open_collection(db2) as c:
        assert all(e["lossless"] for e in c.entries)


def test_interrupted_commit_keeps_previous_collection(tmp_path, loras):
    db = str(tmp_path / "a.loradb")
    pack(db, loras[:1])
    append(db, loras[1:2])
    data = bytearray(open(db, "rb").read())
    # a torn write of the newest slot (generation 2 lives in slot B at 80..144)
    data[90] ^= 0xFF
    open(db, "wb").write(bytes(data))
    with open_collection(db) as c:
        assert len(c.entries) == 1
    # truncating the newest header: falls back to the previous one, with a warning
    data[90] ^= 0xFF
    open(db, "wb").write(bytes(data[:-10]))
    with open_collection(db) as c:
        assert len(c.entries) == 1 and c.warnings


def test_entry_names_are_sanitised():
    for bad in ["../../etc/passwd", "..\\..\\x.safetensors", "CON", "a/b/c.safetensors", "\x00..", "", ".", "..",
                ".hidden.safetensors", "nul.safetensors", "x" * 1000]:
        s = safe_file_name(bad)
        assert "/" not in s and "\\" not in s and ".." not in s[:-12] and s.endswith(".safetensors")
        assert not s.startswith(".") and s.split(".")[0].upper() not in {"CON", "NUL"} and len(s) < 260


def test_cli_pack_list_extract_convert(tmp_path, loras, capsys):
    db = str(tmp_path / "cli.loradb")
    assert main(["pack", "-o", db, *loras, "--name", "N", "--creator", "C", "--description", "D",
                 "--tag", "t1", "--tag", "t2"]) == 0
    assert "smaller" in capsys.readouterr().out
    assert main(["list", db]) == 0
    out = capsys.readouterr().out
    assert "Collection: N by C" in out and "char_step2.safetensors" in out and "t1, t2" in out
    d = tmp_path / "out"
    assert main(["extract", db, "char_step2", "-o", str(d)]) == 0
    assert os.listdir(d) == ["char_step2.safetensors"] and _sha(d / "char_step2.safetensors") == _sha(loras[1])
    assert main(["extract", db, "-o", str(tmp_path / "all")]) == 0
    assert sorted(os.listdir(tmp_path / "all")) == sorted(os.path.basename(p) for p in loras)
    assert main(["convert", db, str(tmp_path / "conv.loradb")]) == 0
    assert main(["pack", "-o", db, *loras]) == 2  # exists: refuses
    assert main(["pack", "-o", db, "--append", loras[0]]) == 0
    capsys.readouterr()
    assert main(["list", db, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["entries"]) == 4


def test_cli_list_and_lossless_extract_never_import_torch(tmp_path, loras):
    """Listing and lossless extraction only move bytes: a new process must not pay torch's import
    (about a second here), which is what keeps `lora-lens extract` of one LoRA near 0.3 s."""
    import subprocess
    import sys
    db = str(tmp_path / "t.loradb")
    pack(db, loras)
    code = ("import sys; from lens_ops.cli import main; "
            f"rc = main(['list', {db!r}]) + main(['extract', {db!r}, 'char_step2', '-o', {str(tmp_path / 'o')!r}]); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("NO-TORCH 0"), out
    assert _sha(tmp_path / "o" / "char_step2.safetensors") == _sha(loras[1])


def _first_chunk(db, index):
    from lens_ops.loradb.db import _table
    with open_collection(db) as c:
        t = _table(c.reader, c.entries[index])
    st = t["streams"][t["segments"][0][2]]
    return st.get("base", 0) + st["planes"][-1][0][0]


def test_cli_damaged_entry_named_others_extracted(tmp_path, loras, capsys):
    db = str(tmp_path / "d.loradb")
    pack(db, loras, dedup=False)
    victim = _first_chunk(db, 2) + 10
    data = bytearray(open(db, "rb").read())
    data[victim] ^= 0x5A
    open(db, "wb").write(bytes(data))
    d = tmp_path / "out"
    rc = main(["extract", db, "-o", str(d)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "style one" in err and err.count("\n") == 0
    assert sorted(os.listdir(d)) == ["char_step1.safetensors", "char_step2.safetensors"]


def test_truncated_file_lists_all_and_extracts_surviving(tmp_path, loras, capsys):
    db = str(tmp_path / "t.loradb")
    pack(db, loras, dedup=False)
    cut = _first_chunk(db, 1) + 5     # entry 0's payloads survive, entries 1 and 2 lose theirs
    data = open(db, "rb").read()
    open(db, "wb").write(data[:cut])
    assert main(["list", db]) == 0
    assert "style one" in capsys.readouterr().out   # the header (at the front) still lists every entry
    d = tmp_path / "out"
    rc = main(["extract", db, "-o", str(d)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "char_step2" in err and "style one" in err and err.count("\n") == 0
    assert os.listdir(d) == ["char_step1.safetensors"] and _sha(d / "char_step1.safetensors") == _sha(loras[0])


@pytest.mark.parametrize("content", [b"", b"\x89LORADB\n", b"\x89LORADB\n" + b"\0" * 200, b"hello world" * 30,
                                     b"\x89LORADB\n\x09\0\0\0" + b"\0" * 300])
def test_hostile_headers(tmp_path, content):
    p = tmp_path / "h.loradb"
    p.write_bytes(content)
    with pytest.raises(LensError):
        open_collection(str(p))


def test_huge_declared_sizes_refused(tmp_path, loras):
    """A header slot claiming a 1 TB header, and an entry claiming a 1 TB output: refused before allocating."""
    from lens_ops.loradb.container import _slot_bytes
    db = str(tmp_path / "s.loradb")
    pack(db, loras[:1])
    data = bytearray(open(db, "rb").read())
    data[16:80] = _slot_bytes(5, 144, 1 << 40, 1 << 40, 1, b"\0" * 32)
    open(str(tmp_path / "big.loradb"), "wb").write(bytes(data))
    with pytest.raises(LensError, match="limit|outside|checksum"):
        open_collection(str(tmp_path / "big.loradb"))
    with open_collection(db) as c:
        e = dict(c.entries[0], output_bytes=1 << 40)
        with pytest.raises(LensError, match="impossible size"):
            c.extract_bytes(e)


def test_zstd_bomb_chunk_refused(tmp_path):
    import zstandard
    from lens_ops.loradb.container import inflate
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 << 20))
    with pytest.raises(LensError):
        inflate(bomb, 1024, 16 << 20, "chunk")
    with pytest.raises(LensError):
        inflate(bomb, 64 << 20, 16 << 20, "chunk")


# ------------------------------------------------------------------ the LoRA Lens app's v1.0 files
def _app_v1(tmp_path, loras_sd, base_idx=0):
    """Write a v1.0 collection exactly as the app lays it out (base_*, lora{i}_diff_/full_/u_s_v_/new_*)."""
    base = loras_sd[base_idx]
    db = {f"base_{k}": v for k, v in base.items()}
    for i, sd in enumerate(loras_sd):
        if i == base_idx:
            continue
        for k, t in sd.items():
            if k not in base:
                if t.ndim == 2 and min(t.shape) > 64:
                    u, s, v = torch.svd(t.float())
                    db[f"lora{i}_new_u_{k}"], db[f"lora{i}_new_s_{k}"], db[f"lora{i}_new_v_{k}"] = u.half(), s.half(), v.half()
                else:
                    db[f"lora{i}_full_{k}"] = t.half()
                continue
            diff = t.float() - base[k].float()
            if diff.abs().max() < 1e-7:
                continue
            if diff.ndim == 2 and min(diff.shape) > 64:
                u, s, v = torch.svd(diff)
                db[f"lora{i}_u_{k}"], db[f"lora{i}_s_{k}"], db[f"lora{i}_v_{k}"] = u.half(), s.half(), v.half()
            else:
                db[f"lora{i}_diff_{k}"] = diff.half()
    meta = {"loradb_version": "1.0", "edition": "Community", "base_index": str(base_idx), "base_name": "a.safetensors",
            "lora_names": json.dumps([f"{n}.safetensors" for n in "abc"[:len(loras_sd)]]),
            "lora_count": str(len(loras_sd)), "description": "app pack"}
    p = tmp_path / "app.loradb"
    save_file(db, str(p), meta)
    return str(p)


def test_reads_app_v1_files(tmp_path):
    a = make_lora("sdxl_kohya", rank=8, seed=1, max_modules=6, dtype=torch.float32)
    b = {k: (v * 1.05 + 1e-3 * torch.randn(v.shape, generator=gen(1))) if "lora_up" in k else v.clone()
         for k, v in a.items()}
    extra = torch.randn(100, 80, generator=gen(3)) * 0.01
    b["lora_unet_extra.lora_up.weight"] = extra
    c = make_lora("sdxl_kohya", rank=8, seed=2, max_modules=6, dtype=torch.float32)
    p = _app_v1(tmp_path, [a, b, c])
    with open_collection(p) as col:
        assert col.legacy and [e["file_name"] for e in col.entries] == ["a.safetensors", "b.safetensors", "c.safetensors"]
        got = [LoRAModel.from_state_dict(col.legacy.state_dict(e)).state_dict() for e in col.entries]
    assert all(torch.equal(got[0][k], a[k]) for k in a)
    for want, have in ((b, got[1]), (c, got[2])):
        assert set(have) == set(want)   # alpha (same as base, delta skipped by the app) is restored
        for k in want:
            err = (have[k].double() - want[k].double()).norm() / want[k].double().norm().clamp_min(1e-30)
            assert err < 2e-3, k
    out = tmp_path / "x"
    assert main(["extract", p, "-o", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["a.safetensors", "b.safetensors", "c.safetensors"]
    new = str(tmp_path / "new.loradb")
    assert main(["convert", p, new]) == 0
    with open_collection(new) as col:
        assert not col.legacy and len(col.entries) == 3 and not col.entries[1]["lossless"]
        assert "lossy source" in " ".join(col.entries[1]["layers"])
        assert bytes(col.extract_bytes(col.entries[1])) == open(out / "b.safetensors", "rb").read()


def test_app_v1_damaged_entry(tmp_path):
    a = make_lora("sdxl_kohya", rank=4, seed=1, max_modules=3, dtype=torch.float32)
    b = {k: v * 2 for k, v in a.items()}
    p = _app_v1(tmp_path, [a, b])
    from safetensors.torch import load_file as lf
    sd = {k: v.clone() for k, v in lf(p).items()}  # no views into the file we rewrite
    from safetensors import safe_open
    with safe_open(p, "pt") as f:
        meta = f.metadata()
    key = next(k for k in sd if k.startswith("lora1_diff_") and sd[k].ndim == 2)
    sd[key] = sd[key][:-1]
    os.unlink(p)
    save_file(sd, p, meta)
    out = tmp_path / "x"
    assert main(["extract", p, "-o", str(out)]) == 2
    assert os.listdir(out) == ["a.safetensors"]
