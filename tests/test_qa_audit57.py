"""Acceptance audit of issues 5 (QuantizeInt8) and 7 (PackLoRADB / ExtractLoRADB) on inputs the other suites
do not use: LoRA Lens app v1.0 files built here from the issue's own description (every record kind, base in
bf16 and fp32, conv keys, keys new to an entry), truncated app files, the app files' listed sizes, several
LoRAs from the graph into PackLoRADB, and the CLI's quantize/pack/extract contracts on LoCon/LoHa/LoKr/DoRA/
Tucker and text-encoder-only files in bf16/fp32 with odd metadata."""
from __future__ import annotations

import hashlib
import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file as st_save

from lens_ops import LensError, LoRAModel
from lens_ops.cli import main as cli_main
from lens_ops.loradb import open_collection
from lens_ops.st_io import save_file
from lens_ops.synth import make_lora
from lora_factory import gen, kind_tensors

# ----------------------------------------------------------------------------------- app v1.0 files, built here
# Written from the description only (not from lens_ops): base_<key> in the base's own dtype; entry i as
# lora{i}_diff_ (entry = base + diff), full_ (whole tensor), u_/s_/v_ (entry = base + u·diag(s)·vᵀ, torch.svd's
# V, on the 2-D view of a conv tensor), new_u_/new_s_/new_v_ (entry = u·diag(s)·vᵀ, key not in the base); fp16.


def _app_file(path, loras, names, base_idx, base_dtype, svd_min=32):
    db, want = {}, []
    base = {k: v.to(base_dtype) if v.is_floating_point() else v for k, v in loras[base_idx].items()}
    for k, v in base.items():
        db["base_" + k] = v
    for i, sd in enumerate(loras):
        if i == base_idx:
            want.append(dict(base))
            continue
        w = {}
        for j, (k, t) in enumerate(sd.items()):
            if k not in base:
                if t.ndim == 2 and min(t.shape) >= svd_min:
                    u, s, v = (x.half() for x in torch.svd(t.float()))
                    db[f"lora{i}_new_u_{k}"], db[f"lora{i}_new_s_{k}"], db[f"lora{i}_new_v_{k}"] = u, s, v
                    w[k] = ((u.float() * s.float()) @ v.float().T).half()
                else:
                    db[f"lora{i}_full_{k}"] = t.half()
                    w[k] = t.half()
                continue
            b = base[k]
            diff = t.float() - b.float()
            if not diff.abs().max() > 0:     # the app skips a zero delta; the base's tensor is the entry's
                w[k] = b
            elif diff.ndim >= 2 and (j // 3) % 2 == 0:   # every other module's factors as u/s/v
                u, s, v = (x.half() for x in torch.svd(diff.reshape(diff.shape[0], -1)))
                db[f"lora{i}_u_{k}"], db[f"lora{i}_s_{k}"], db[f"lora{i}_v_{k}"] = u, s, v
                w[k] = (b.float() + ((u.float() * s.float()) @ v.float().T).reshape(b.shape)).to(b.dtype)
            elif j % 2:
                db[f"lora{i}_diff_{k}"] = diff.half()
                w[k] = (b.float() + diff.half().float()).to(b.dtype)
            else:
                db[f"lora{i}_full_{k}"] = t.half()
                w[k] = t.half().to(b.dtype)
        want.append(w)
    meta = {"loradb_version": "1.0", "edition": "Pro", "base_index": str(base_idx), "base_name": names[base_idx],
            "lora_names": json.dumps(names), "lora_count": str(len(names)), "description": "an app pack"}
    st_save({k: v.contiguous() for k, v in db.items()}, str(path), meta)
    return want


def _app_loras():
    a = make_lora("sdxl_kohya_locon", rank=32, seed=1, max_modules=40, dtype=torch.float32,
                  name_filter=lambda k: "lora_unet" in k)
    g = gen(2)
    b = {k: (v + 0.05 * v.std() * torch.randn(v.shape, generator=g)) if "lora_up" in k else v.clone()
         for k, v in a.items()}
    c = make_lora("sdxl_kohya_locon", rank=32, seed=3, max_modules=40, dtype=torch.float32,
                  name_filter=lambda k: "lora_unet" in k)
    c["lora_unet_extra_new.lora_up.weight"] = torch.randn(64, 40, generator=g) * 0.01   # keys not in the base
    c["lora_unet_extra_new.lora_down.weight"] = torch.randn(40, 80, generator=g) * 0.01
    c["lora_unet_extra_new.alpha"] = torch.tensor(8.0)
    return [a, b, c]


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32], ids=["bf16-base", "fp32-base"])
def app(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("app")
    loras = _app_loras()
    path = d / "app.loradb"
    want = _app_file(path, loras, ["dir/a.safetensors", "b.safetensors", "c.safetensors"], 1, request.param)
    return str(path), want


def _run(capsys, *argv):
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_app_v1_every_record_kind_extracts_as_the_app_stored_it(app, tmp_path, capsys):
    path, want = app
    keys = list(_st_header(open(path, "rb").read()))
    kinds = {k.split("_", 1)[1].split("_lora_unet")[0] for k in keys if k.startswith("lora")}
    assert {"diff", "full", "u", "s", "v", "new_u", "new_s", "new_v"} <= kinds   # the fixture holds every kind
    assert any(k.startswith("lora") and "_u_" in k and len(_st_header(open(path, "rb").read())[k.replace(
        "_u_", "_v_")]["shape"]) == 2 and k.endswith("lora_down.weight") for k in keys)   # a conv factor's record
    assert any(len(v["shape"]) == 4 for k, v in _st_header(open(path, "rb").read()).items() if k.startswith("base_"))
    code, out, err = _run(capsys, "extract", path, "-o", str(tmp_path / "x"))
    assert code == 0, err
    assert out.count("lossy source") == 3
    assert sorted(os.listdir(tmp_path / "x")) == ["a.safetensors", "b.safetensors", "c.safetensors"]
    for name, w in zip("abc", want):
        with safe_open(str(tmp_path / "x" / f"{name}.safetensors"), "pt") as f:
            got = {k: f.get_tensor(k) for k in f.keys()}
        assert set(got) == set(w), name
        for k in w:
            assert got[k].dtype == w[k].dtype and torch.equal(got[k], w[k]), (name, k)


def test_app_v1_list_shows_each_entrys_stored_bytes(app, capsys):
    """The listing's 'stored' column of an app file counted fp16 bytes of the base entry only (a fp32 base was
    shown at half its size) and 0 for every delta entry; it is the bytes of each entry's own records."""
    path, _ = app
    header = _st_header(open(path, "rb").read())
    size = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}
    want = [sum(v for k, v in size.items() if k.startswith(p)) for p in ("lora0_", "base_", "lora2_")]
    code, out, err = _run(capsys, "list", path, "--json")
    assert code == 0, err
    got = [e["stored_bytes"] for e in json.loads(out)["entries"]]
    assert got == want and all(w > 0 for w in want)


def test_app_v1_truncated_file_extracts_the_intact_entries(app, tmp_path, capsys):
    """Issue 7 Safety: a truncated file names the damaged entry and extracts the undamaged ones; an app v1.0
    file cut inside its last entry's records failed as a whole ('neither a LoRA Lens .loradb nor ...')."""
    path, want = app
    data = open(path, "rb").read()
    cut = tmp_path / "cut.loradb"
    cut.write_bytes(data[: len(data) - 1000])
    out_dir = tmp_path / "out"
    code, out, err = _run(capsys, "list", str(cut))
    assert code == 0 and "truncated" in out and "'c'" in out, (out, err)
    code, out, err = _run(capsys, "extract", str(cut), "-o", str(out_dir))
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and "'c'" in err and "truncated" in err, err
    assert sorted(os.listdir(out_dir)) == ["a.safetensors", "b.safetensors"]   # nothing partial, no temp file
    for name, w in zip("ab", want):
        with safe_open(str(out_dir / f"{name}.safetensors"), "pt") as f:
            assert all(torch.equal(f.get_tensor(k), w[k]) for k in w)
    # cut inside the base: every entry needs it, so each one is named and nothing is written
    code, out, err = _run(capsys, "extract", str(_cut_at(tmp_path, data, "base_")), "-o", str(tmp_path / "o2"))
    assert code != 0 and "'a'" in err and "'b'" in err and "'c'" in err
    assert not os.path.exists(tmp_path / "o2") or os.listdir(tmp_path / "o2") == []


def _st_header(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    return header


def _cut_at(tmp_path, data, prefix):
    n = int.from_bytes(data[:8], "little")
    header = _st_header(data)
    start = min(v["data_offsets"][0] for k, v in header.items() if k.startswith(prefix))
    ends = sorted(v["data_offsets"][1] for k, v in header.items() if k.startswith(prefix))
    p = tmp_path / f"cut_{prefix}.loradb"
    p.write_bytes(data[: 8 + n + (start + ends[-1]) // 2])
    return p


def test_extract_node_gives_the_intact_entries_of_a_truncated_app_file(app, comfy_env):
    pack_mod, paths = comfy_env
    path, want = app
    folder = paths["root"] / "loradb"
    folder.mkdir(exist_ok=True)
    data = open(path, "rb").read()
    (folder / "cut.loradb").write_bytes(data[: len(data) - 1000])
    node = pack_mod.NODE_CLASS_MAPPINGS["ExtractLoRADB"]()
    loras, names, text = node.extract("cut.loradb", "all")["result"]
    assert names == ["a", "b"] and "lossy source" in text and "'c'" in text
    assert all(torch.equal(loras[0][k], want[0][k]) for k in want[0])


def test_app_v1_svd_record_of_the_wrong_size_is_refused_before_its_product(tmp_path, monkeypatch, capsys):
    """A hostile u_/v_ record far bigger than its base tensor is refused from the shapes, before forming a
    (here 2²⁴-element) product that can only be thrown away."""
    base = {"m.lora_up.weight": torch.randn(8, 2).half(), "m.lora_down.weight": torch.randn(2, 8).half()}
    db = {"base_" + k: v for k, v in base.items()}
    db["lora1_u_m.lora_up.weight"] = torch.randn(4096, 1).half()
    db["lora1_s_m.lora_up.weight"] = torch.ones(1).half()
    db["lora1_v_m.lora_up.weight"] = torch.randn(4096, 1).half()
    p = tmp_path / "big.loradb"
    st_save(db, str(p), {"loradb_version": "1.0", "lora_names": json.dumps(["a", "b"]), "base_index": "0"})
    real = torch.Tensor.__matmul__

    def guarded(x, y):
        assert x.shape[0] * (y.shape[-1] if y.ndim > 1 else 1) < 1 << 20, "product formed"
        return real(x, y)
    monkeypatch.setattr(torch.Tensor, "__matmul__", guarded)
    code, out, err = _run(capsys, "extract", str(p), "b", "-o", str(tmp_path / "o"))
    assert code != 0 and "does not match its base tensor" in err and "product formed" not in err


# ----------------------------------------------------------------------------------- PackLoRADB: graph LoRAs
def test_pack_node_takes_several_graph_loras(comfy_env):
    """PackLoRADB had one graph socket: three LoRAs made in the graph (e.g. three QuantizeInt8 outputs) could not
    be packed together without a list-making node, which core ComfyUI does not have. loras_2..4 add them."""
    pack_mod, paths = comfy_env
    nodes = pack_mod.NODE_CLASS_MAPPINGS
    info = nodes["PackLoRADB"].INPUT_TYPES()["optional"]
    assert all(info[f"loras_{i}"][0] == "LORA_MODEL" and info[f"loras_{i}"][1]["tooltip"] for i in (2, 3, 4))
    a, b, c = (make_lora("sd15_kohya", rank=2, seed=s, max_modules=2) for s in (1, 2, 3))
    rep = nodes["PackLoRADB"]().pack(name=["three"], creator=[""], description=[""], tags=[""],
                                     optimisation=["none (lossless)"], recipe=[""], shared_basis=["off"],
                                     snr_db=[35.0], overwrite=[False], loras=[a], loras_2=[b], loras_4=[c],
                                     lora_names=["x, y, z"])["result"]
    x = nodes["ExtractLoRADB"]()
    loras, names, _ = x.extract("three.loradb", "all")["result"]
    assert names == ["x", "y", "z"] and "3 entries" in rep[0][0]
    for got, want in zip(loras, (a, b, c)):
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


# ----------------------------------------------------------------------------------- CLI contracts, fresh inputs
KINDS = ["lora", "lora_noalpha", "locon3x3", "tucker", "dora", "loha", "loha_cp", "lokr", "lokr_full", "lokr_ab"]


def _kinds_file(path, dtype):
    sd, refs = {}, {}
    g = gen(57)
    for i, k in enumerate(KINDS):
        t, ref = kind_tensors(k, g, dtype)
        sd.update({f"lora_unet_blk_{i}_{k}{s}": v for s, v in t.items()})
        refs[f"lora_unet_blk_{i}_{k}"] = ref
    t, ref = kind_tensors("lora", g, dtype)
    sd.update({f"lora_te1_text_model_encoder_layers_0_mlp_fc1{s}": v for s, v in t.items()})
    # valid but odd metadata: empty value, non-JSON JSON-looking text, control and bidi characters
    save_file(sd, str(path), {"odd": "", "json": "{\"a\":[1,2", "ctl": "a\x1b[2Jb\u202e", "ss_network_dim": "x"})
    return sd


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_quantize_cli_report_equals_a_float64_reference_of_the_written_file(dtype, tmp_path, capsys):
    src = tmp_path / "kinds.safetensors"
    _kinds_file(src, dtype)
    out = tmp_path / "q.safetensors"
    code, stdout, err = _run(capsys, "quantize", str(src), "-o", str(out), "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    for f in ("snr_db", "mse", "mae", "max_error", "rel_frobenius"):
        assert f in rep["delta"] and f in rep["stored"]
    orig, q = LoRAModel.load(str(src)), LoRAModel.load(str(out))
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert meta["odd"] == "" and meta["ctl"] == "a\x1b[2Jb\u202e" and meta["json"] == "{\"a\":[1,2"
    per = {m["name"]: m for m in rep["per_module"]}
    sig = err_e = 0.0
    for m in orig.modules:
        mq = q.get(m.name)
        assert any(dtypes[mq.key_for(r)] == "I8" for r in mq.tensors if r not in ("alpha", "dora_scale"))
        a, b = m.delta(torch.float64), mq.delta(torch.float64)
        e, s = float((a - b).pow(2).sum()), float(a.pow(2).sum())
        sig, err_e = sig + s, err_e + e
        d = per[m.name]["delta"]
        assert d["snr_db"] == pytest.approx(10 * math.log10(s / e), abs=0.01), m.name
        assert d["max_error"] == pytest.approx(float((a - b).abs().max()), rel=1e-3)
        assert d["mae"] == pytest.approx(float((a - b).abs().mean()), rel=1e-3)
        assert d["rel_frobenius"] == pytest.approx(math.sqrt(e / s), rel=1e-3)
    assert rep["delta"]["snr_db"] == pytest.approx(10 * math.log10(sig / err_e), abs=0.01)


def test_keep_fp16_gives_a_mixed_file_and_dequantize_round_trips(tmp_path, capsys):
    src = tmp_path / "kinds.safetensors"
    sd = _kinds_file(src, torch.float16)
    out = tmp_path / "mixed.safetensors"
    code, stdout, err = _run(capsys, "quantize", str(src), "-o", str(out), "--min-snr", "42", "--keep-fp16",
                             "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    kept = {k["name"] for k in rep["modules_kept"]}
    assert kept and len(kept) < len(KINDS) + 1 and any("kept" in b for b in rep["below_threshold"])
    with safe_open(str(out), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert {"I8", "F16"} <= dtypes   # a mixed file
        for k in f.keys():
            if any(k.startswith(n + ".") for n in kept) and not k.endswith(".alpha"):
                assert torch.equal(f.get_tensor(k), sd[k]), k   # kept modules are the original fp16 tensors
    for to in ("fp16", "bf16"):
        deq = tmp_path / f"deq_{to}.safetensors"
        code, _, err = _run(capsys, "quantize", str(out), "-o", str(deq), "--dequantize", to)
        assert code == 0, err
        with safe_open(str(deq), "pt") as f:
            assert not any(f.get_slice(k).get_dtype() in ("I8", "F8_E4M3") for k in f.keys())
        q, d = LoRAModel.load(str(out)), LoRAModel.load(str(deq))
        for m in q.modules:
            a, b = m.delta(torch.float64), d.get(m.name).delta(torch.float64)
            assert float((a - b).norm() / a.norm()) < (2e-3 if to == "fp16" else 2e-2), (to, m.name)


def test_quantize_and_ultra_refuse_nan_with_one_sentence_and_no_file(tmp_path, capsys):
    src = tmp_path / "n.safetensors"
    sd = _kinds_file(src, torch.float16)
    k = next(k for k in sd if k.endswith("lora_down.weight"))
    sd[k] = sd[k].clone()
    sd[k][0, 0] = float("nan")
    save_file(sd, str(src), {})
    for cmd in (["quantize"], ["ultra", "--recipe", "rank=2"]):
        out = tmp_path / "o.safetensors"
        code, _, err = _run(capsys, cmd[0], str(src), "-o", str(out), *cmd[1:])
        assert code != 0 and "NaN" in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_pack_list_extract_round_trip_of_fresh_kinds_and_metadata(tmp_path, capsys):
    files = []
    for i, dt in enumerate((torch.bfloat16, torch.float32, torch.float16)):
        p = tmp_path / f"k{i}.safetensors"
        _kinds_file(p, dt)
        files.append(str(p))
    te = make_lora("flux_kohya_te1", rank=4, seed=9, dtype=torch.bfloat16, name_filter=lambda k: "te1" in k,
                   max_modules=6)
    save_file(te, str(tmp_path / "te only.safetensors"), {"modelspec.trigger_phrase": "zq7 girl"})
    files.append(str(tmp_path / "te only.safetensors"))
    db = tmp_path / "c.loradb"
    code, out, err = _run(capsys, "pack", "-o", str(db), *files, "--name", "QA 57", "--creator", "qa",
                          "--description", "two\nlines", "--tag", "x", "--tag", "y z")
    assert code == 0, err
    code, out, err = _run(capsys, "list", str(db), "--json")
    head = json.loads(out)
    c = head["collection"]
    assert (c["name"], c["creator"], c["description"], c["tags"]) == ("QA 57", "qa", "two\nlines", ["x", "y z"])
    assert c["created"]
    for e in head["entries"]:
        for f in ("name", "file_name", "original_bytes", "architecture", "format", "rank", "dtype", "trigger_words",
                  "metadata", "codec", "stored_bytes", "output_sha256"):
            assert f in e, f
    assert head["entries"][3]["trigger_words"] == ["zq7 girl"] and head["entries"][0]["metadata"]["ctl"]
    out_dir = tmp_path / "out"
    code, out, err = _run(capsys, "extract", str(db), "-o", str(out_dir))
    assert code == 0, err
    for f in files:
        got = out_dir / os.path.basename(f)
        assert hashlib.sha256(got.read_bytes()).hexdigest() == hashlib.sha256(open(f, "rb").read()).hexdigest()


# ----------------------------------------------------------------------------------- fp8 files elsewhere
def test_fp8_files_are_read_by_info_pack_and_the_nan_check(tmp_path, capsys):
    """Issue 5: an fp8 (e4m3fn) LoRA is read anywhere in lens_ops. `info`, a lossy `pack` and ApplyLoRA's NaN
    check stopped with "isfinite not implemented for 'Float8_e4m3fn'" (LoRAModule.nonfinite)."""
    src = tmp_path / "k.safetensors"
    _kinds_file(src, torch.float16)
    f8 = tmp_path / "f8.safetensors"
    code, _, err = _run(capsys, "quantize", str(src), "-o", str(f8), "--fp8")
    assert code == 0, err
    code, out, err = _run(capsys, "info", str(f8))
    assert code == 0 and "fp8" in out.lower(), err
    code, out, err = _run(capsys, "pack", "-o", str(tmp_path / "f8.loradb"), str(f8), "--int8")
    assert code == 0, err
    m = next(m for m in LoRAModel.load(str(f8)).modules
             if "down" in m.tensors and m.tensors["down"].dtype == torch.float8_e4m3fn)
    assert m.nonfinite() == 0
    bad = m.tensors["down"].clone()
    bad.view(torch.uint8)[0, 0] = 0x7F   # e4m3fn NaN
    assert m.with_tensors({**m.tensors, "down": bad}).nonfinite() == 1


def test_entries_and_files_may_follow_the_output_option(tmp_path, capsys):
    """`lora-lens extract DB -o DIR ENTRY` and `lora-lens pack A -o OUT.loradb B` failed with argparse's
    "unrecognized arguments" (a list positional after an option); options and positionals now mix freely."""
    files = []
    for i in range(2):
        sd = make_lora("sd15_kohya", rank=2, seed=70 + i, max_modules=3)
        p = tmp_path / f"m{i}.safetensors"
        save_file(sd, str(p), sd.metadata)
        files.append(str(p))
    db = tmp_path / "mix.loradb"
    code, out, err = _run(capsys, "pack", files[0], "-o", str(db), files[1], "--tag", "t")
    assert code == 0, err
    code, out, err = _run(capsys, "extract", str(db), "-o", str(tmp_path / "o"), "m1")
    assert code == 0, err
    assert os.listdir(tmp_path / "o") == ["m1.safetensors"]
    assert (tmp_path / "o" / "m1.safetensors").read_bytes() == open(files[1], "rb").read()
    with pytest.raises(SystemExit):   # a real unknown option is still argparse's error
        cli_main(["extract", str(db), "-o", str(tmp_path / "o2"), "m1", "--bogus"])


def test_app_v1_file_without_base_tensors_names_the_base_entry(tmp_path, capsys):
    """An app v1.0 file with no base_ tensors wrote its base entry as an empty .safetensors (a LoRA with no
    tensors) and exited 0; the entry is damaged: named, not written, the other entry still extracted."""
    p = tmp_path / "nobase.loradb"
    st_save({"lora1_full_m.lora_up.weight": torch.randn(4, 2).half(),
             "lora1_full_m.lora_down.weight": torch.randn(2, 4).half()}, str(p),
            {"loradb_version": "1.0", "lora_names": json.dumps(["a.safetensors", "b.safetensors"]), "base_index": "0"})
    code, out, err = _run(capsys, "extract", str(p), "-o", str(tmp_path / "o"))
    assert code != 0 and "'a'" in err and len(err.strip().splitlines()) == 1, err
    assert os.listdir(tmp_path / "o") == ["b.safetensors"]
