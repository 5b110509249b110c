"""Lossy layers of .loradb (prune, int8, shared basis, and their combinations): extraction equals what was
recorded (sha256), and the recorded ΔW error equals a dense float64 reference against the original."""
from __future__ import annotations

import itertools
import math
import os
import re

import pytest
import torch

from lens_ops import LoRAModel
from lens_ops.loradb import open_collection, pack
from lens_ops.st_io import save_file
from lens_ops.synth import make_lora


def _dense(sd: dict) -> dict:
    """ΔW per module straight from the formula (float64): alpha/rank · up @ down."""
    out = {}
    for k in sd:
        if k.endswith(".lora_up.weight"):
            m = k[: -len(".lora_up.weight")]
            up, down = sd[k].double().flatten(1), sd[m + ".lora_down.weight"].double().flatten(1)
            alpha = float(sd[m + ".alpha"].double()) if m + ".alpha" in sd else down.shape[0]
            out[m] = alpha / down.shape[0] * up @ down
    return out


def _variants(tmp_path, n=4, seed=0, modules=5):
    """Checkpoints of one run: identical down (init) factors, up factors drifting inside their span + noise."""
    base = make_lora("sdxl_kohya", rank=8, seed=seed, max_modules=modules, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 100)
    files = []
    for i in range(n):
        sd = {}
        for k, v in base.items():
            if k.endswith("lora_up.weight"):
                mix = torch.eye(v.shape[1]) + 0.15 * torch.randn(v.shape[1], v.shape[1], generator=g)
                sd[k] = (v @ mix + 1e-4 * v.std() * torch.randn(v.shape, generator=g)).to(torch.float16)
            else:
                sd[k] = v.to(torch.float16)
        p = tmp_path / f"step{i}.safetensors"
        save_file(sd, str(p), base.metadata)
        files.append(str(p))
    return files


def _check_recorded_errors(db, files):
    with open_collection(db) as c:
        for e, f in zip(c.entries, files):
            got = c.extract_model(e).state_dict()
            ref = _dense(LoRAModel.load(f).state_dict())
            out = _dense(got)
            sig = sum(float(r.pow(2).sum()) for r in ref.values())
            err = sum(float((out[m].reshape(r.shape) - r).pow(2).sum()) for m, r in ref.items())
            if e["lossless"]:
                assert err == 0
                continue
            rec = e["error"]
            assert math.isclose(rec["rel_error"], math.sqrt(err / sig), rel_tol=1e-3, abs_tol=1e-7)
            yield e, 10 * math.log10(sig / err) if err else math.inf


COMBOS = [dict(recipe=r, int8=q, shared_basis=s) for r, q, s in
          itertools.product([None, "energy=0.9999"], [False, True], ["off", "on"]) if r or q or s != "off"]


@pytest.mark.parametrize("opts", COMBOS, ids=lambda o: f"prune={bool(o['recipe'])},int8={o['int8']},sb={o['shared_basis']}")
def test_every_lossy_combination(tmp_path, opts):
    files = _variants(tmp_path, n=2, modules=3)
    db = str(tmp_path / "c.loradb")
    rep = pack(db, files, snr_db=35.0, **opts)
    layers = set(itertools.chain.from_iterable(e["layers"] for e in rep["entries"]))
    assert ("prune" in layers) == bool(opts["recipe"])
    assert ("quantized" in layers) == (opts["int8"] or opts["shared_basis"] == "on")
    assert ("shared-basis" in layers) == (opts["shared_basis"] == "on")
    for e, snr in _check_recorded_errors(db, files):
        if opts["int8"] or opts["shared_basis"] != "off":   # the coder keeps the per-LoRA budget (prune included)
            assert snr >= 35.0 - 1e-6, (e["name"], snr)


def test_shared_basis_auto_saves_bytes_at_budget(tmp_path):
    files = _variants(tmp_path, n=5, seed=3)
    lossless = pack(str(tmp_path / "a.loradb"), files)
    rep = pack(str(tmp_path / "b.loradb"), files, shared_basis="auto", snr_db=35.0)
    assert rep["collection"]["lossy"]["shared_basis_modules"] > 0
    assert rep["loradb_bytes"] < 0.75 * lossless["loradb_bytes"]
    snrs = [snr for _, snr in _check_recorded_errors(str(tmp_path / "b.loradb"), files)]
    assert snrs and min(snrs) >= 35.0


def test_shared_basis_auto_declines_unrelated(tmp_path):
    """Unrelated LoRAs with flat spectra: no shared basis can meet 35 dB with fewer bytes."""
    files = []
    for i in range(3):
        sd = make_lora("sdxl_kohya", rank=8, seed=10 + i, max_modules=4, eff_rank_median=200.0)
        p = tmp_path / f"u{i}.safetensors"
        save_file(sd, str(p), sd.metadata)
        files.append(str(p))
    rep = pack(str(tmp_path / "u.loradb"), files, shared_basis="auto")
    assert rep["collection"]["lossy"]["shared_basis_modules"] == 0
    assert all(e["lossless"] for e in rep["entries"])   # nothing lossy was applied: stored bit-exact


def test_quantised_coding_unrelated_meets_budget_and_shrinks(tmp_path):
    """Unrelated LoRAs (no sharing possible): per-LoRA water-filled quantised coefficients keep every LoRA
    at ≥ 35 dB against a dense float64 reference and need far fewer bytes than the lossless collection."""
    files = []
    for i in range(2):
        sd = make_lora("sdxl_kohya", rank=16, seed=40 + i, max_modules=4)
        p = tmp_path / f"u{i}.safetensors"
        save_file(sd, str(p), sd.metadata)
        files.append(str(p))
    lossless = pack(str(tmp_path / "a.loradb"), files)
    rep = pack(str(tmp_path / "q.loradb"), files, int8=True, snr_db=35.0)
    assert rep["loradb_bytes"] < 0.5 * lossless["loradb_bytes"]
    snrs = [snr for _, snr in _check_recorded_errors(str(tmp_path / "q.loradb"), files)]
    assert len(snrs) == 2 and min(snrs) >= 35.0 and max(snrs) < 36.5   # the budget is used, not wasted
    with open_collection(str(tmp_path / "q.loradb")) as c:
        for e in c.entries:
            m = c.extract_model(e)
            assert all(t.dtype == torch.float16 for mm in m.modules for r, t in mm.tensors.items() if r != "alpha")


DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.mark.parametrize("name", ["loradb_v2_0_shared.loradb", "loradb_v2_0_int8.loradb"])
def test_reads_files_of_format_2_0(tmp_path, name):
    """Backward compatibility: collections written by the previous release (format 2.0: fp16 shared-basis
    products as "mm" segments, int8 entries) still list and extract, verified by their recorded sha256."""
    from lens_ops.loradb.db import _table
    with open_collection(os.path.join(DATA, name)) as c:
        assert c.header["version"] == [2, 0] and len(c.entries) == 2
        kinds = {seg[2] for e in c.entries for seg in _table(c.reader, e)["segments"] if len(seg) == 8}
        res = c.extract_to(str(tmp_path / "out"))
        assert not res["damaged"] and len(res["written"]) == 2
        for e in c.entries:
            m = c.extract_model(e)
            assert len(m.modules) == 2 and e["error"]["snr_db"] >= 35.0
    if "shared" in name:
        assert "mm" in kinds


def test_lossy_pack_reports_progress_from_the_first_phase(tmp_path):
    """The decomposition of every LoRA comes first and takes minutes on whole files: the bar must move
    during it, never go backwards within the lossy preparation, and reach its end."""
    from lens_ops.loradb.lossy import prepare_coded
    files = _variants(tmp_path, n=3, modules=3)
    calls = []
    from lens_ops.loradb.db import _sources
    from lens_ops.loradb.container import Writer
    srcs = _sources(files)
    w = Writer(str(tmp_path / "p.loradb"))
    try:
        lp = prepare_coded(srcs, w, recipe="energy=0.9999", int8=True, shared_basis="on",
                           progress=lambda d, t: calls.append((d, t)))
        lp.cleanup()
    finally:
        w.abort()
        for s in srcs:
            s.cleanup()
    done = [d for d, t in calls]
    assert all(t == 1000 for _, t in calls) and done == sorted(done) and done[-1] == 1000
    assert any(0 < d <= 250 for d in done)   # moved during the prune + decomposition phase


def test_recipe_that_alone_misses_the_budget_is_refused_clearly(tmp_path):
    """`pack --recipe energy=0.99 --int8`: the recipe alone loses more than the 35 dB budget allows. One sentence
    that says what to change, no file, and a lower budget then packs within it."""
    from lens_ops.errors import LensError
    files = _variants(tmp_path, n=2, modules=4)
    db = str(tmp_path / "c.loradb")
    with pytest.raises(LensError, match=r"alone leaves step0\.safetensors at ([\d.]+) dB ΔW SNR, under the 35 dB "
                                        r"budget") as err:
        pack(db, files, recipe="energy=0.9", int8=True)
    assert not os.path.exists(db) and not [f for f in os.listdir(tmp_path) if f.startswith(".lens-")]
    got = float(re.search(r"at ([\d.]+) dB", str(err.value)).group(1))
    rep = pack(db, files, recipe="energy=0.9", int8=True, snr_db=math.floor(got - 1))
    assert all(e["error"]["snr_db"] >= math.floor(got - 1) for e in rep["entries"])


@pytest.mark.parametrize("recipe", [None, "energy=0.9999"])
def test_int8_folded_entries_extract_as_quantizeint8_files(tmp_path, recipe):
    """--int8-folded (issue 7's "int8 with folded alpha from QuantizeInt8"): each entry is the QuantizeInt8 file of the
    (pruned) LoRA, stored losslessly, so it extracts as int8 factors + folded alpha, tensor for tensor what
    QuantizeInt8 writes, with its exact ΔW error against the original recorded."""
    from lens_ops.prune import prune_model
    from lens_ops.quantize import quantize_model
    files = _variants(tmp_path, n=2, modules=3)
    db = str(tmp_path / "f.loradb")
    rep = pack(db, files, recipe=recipe, int8_folded=True)
    for e in rep["entries"]:
        assert "int8 (folded alpha)" in e["layers"] and ("prune" in e["layers"]) == bool(recipe)
    with open_collection(db) as c:
        for e, f in zip(c.entries, files):
            got = c.extract_model(e).state_dict()
            src = LoRAModel.load(f)
            want = quantize_model(prune_model(src, recipe, "cpu", None)[0] if recipe else src)[0].state_dict()
            assert set(got) == set(want)
            for k, v in want.items():
                assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
            assert any(v.dtype == torch.int8 for v in got.values())
    assert [s for _, s in _check_recorded_errors(db, files)]   # recorded error = dense float64 error


def test_int8_folded_is_not_combined_with_the_coder_and_skips_what_it_cannot_fold(tmp_path):
    files = _variants(tmp_path, n=2, modules=2)
    with pytest.raises(Exception, match="cannot be combined"):
        pack(str(tmp_path / "x.loradb"), files, int8_folded=True, int8=True)
    with pytest.raises(Exception, match="cannot be combined"):
        pack(str(tmp_path / "y.loradb"), files, int8_folded=True, shared_basis="auto")
    # a file whose loader reads no alpha cannot carry folded scales: stored as it is, and the entry says why
    g = torch.Generator().manual_seed(3)
    sd = {"unet:0:up": torch.randn(320, 4, generator=g) * 0.01, "unet:0:down": torch.randn(4, 320, generator=g) * 0.01}
    p = str(tmp_path / "clone.safetensors")
    save_file(sd, p, {})
    rep = pack(str(tmp_path / "z.loradb"), [files[0], p], int8_folded=True)
    skipped = [l for e in rep["entries"] for l in e["layers"] if l.startswith("int8 skipped")]
    assert len(skipped) == 1 and "alpha" in skipped[0]
