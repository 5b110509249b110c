"""Reading the LoRA Lens desktop app's own `.loradb` files (format 1.0, a plain safetensors file).

What those files hold (from the app's published code): metadata `loradb_version`="1.0", `lora_names`
(JSON list, 0-based), `base_index`, `base_name`, `lora_count`, `description`, `edition`; the base LoRA's
tensors as `base_<key>`; every other entry i as `lora{i}_` + one of
    diff_<key>            entry = base + diff
    full_<key>            entry tensor stored whole
    u_/s_/v_<key>         entry = base + u·diag(s)·vᵀ (torch.svd's V, so vᵀ = v.T)
    new_u_/new_s_/new_v_<key>  entry = u·diag(s)·vᵀ (key not in base)
Deltas are fp16 and some were truncated by the app (golden-ratio SVD pruning), so these are lossy sources.
Reconstruction follows the app (float32 sums, cast to the base tensor's dtype, fp16 for new keys), with
one fix: the app skips keys whose delta is zero and then drops them, so an entry lost e.g. an `alpha`
equal to the base's; here a base key without a record is kept when another tensor of the same module has
one. Every shape is checked against the base before any product is formed.
"""
from __future__ import annotations

import json
import os
import re
import tempfile

import numpy as np
import torch

from ..errors import LensError
from ..kinds import split_key
from ..st_io import load_file, read_header, save_file
from .container import clean_text
from .db import entry_name

LORA_RX = re.compile(r"^lora(\d+)_(diff_|full_|u_|s_|v_|new_u_|new_s_|new_v_)(.+)$", re.S)
MAX_KEY_ELEMS = 1 << 28


def _module_of(key: str) -> str:
    s = split_key(key)
    return s[0] if s else key


class LegacyCollection:
    def __init__(self, path: str):
        self.path = path
        self.name = os.path.basename(path)
        if path.lower().endswith((".ckpt", ".pt", ".pth", ".bin", ".pkl")):
            raise LensError(f"{self.name} is not a .loradb file.")
        self.past_end: dict = {}   # tensors of a truncated file that lie past its end (their entries are damaged)
        try:
            tensors, meta, _ = read_header(path, self.past_end)
        except LensError as e:
            raise LensError(f"{self.name} is neither a LoRA Lens .loradb nor a readable app v1.0 collection "
                            f"({str(e).rstrip('.')}).") from None
        self.size = os.path.getsize(path)
        if meta.get("loradb_version") != "1.0":
            raise LensError(f"{self.name} is not a .loradb collection (no LoRA Lens magic and no "
                            "loradb_version 1.0 metadata).")
        try:
            names = json.loads(meta.get("lora_names", "[]"))
            base_index = int(meta.get("base_index", "0"))
        except (ValueError, RecursionError):
            raise LensError(f"{self.name}: its lora_names/base_index metadata is malformed.") from None
        names = clean_text(names)
        if (not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names)
                or not 0 <= base_index < len(names)):
            raise LensError(f"{self.name}: its lora_names/base_index metadata is malformed.")
        tensors = {**tensors, **self.past_end}
        self.meta, self.keys = meta, tensors
        self.base_index = base_index
        self.base = {k[5:]: v for k, v in tensors.items() if k.startswith("base_")}
        self.records: dict[int, dict[str, dict[str, str]]] = {}
        for k in tensors:
            m = LORA_RX.match(k)
            if m:
                i = int(m.group(1))
                self.records.setdefault(i, {}).setdefault(m.group(3), {})[m.group(2)] = k
        entries = []
        taken = set()
        def nbytes(keys):
            return sum(tensors[k]["data_offsets"][1] - tensors[k]["data_offsets"][0] for k in keys)
        for i, n in enumerate(names):
            own = (["base_" + k for k in self.base] if i == base_index
                   else [k for r in self.records.get(i, {}).values() for k in r.values()])
            # the app stored names as the user gave them: folders (either separator) and clashes happen
            name = base = entry_name(os.path.splitext(re.split(r"[\\/]", n)[-1])[0]) or f"entry_{i}"
            k = 2
            while name in taken:
                name = f"{base} ({k})"
                k += 1
            taken.add(name)
            entries.append({"name": name, "file_name": n,
                            "index": i, "original_bytes": None, "lossless": False, "exact_tensors": i == base_index,
                            "layers": ["app v1.0 " + ("base" if i == base_index else "delta") + " (lossy source)"],
                            "architecture": None, "rank": None, "dtype": None, "metadata": {},
                            "stored_bytes": nbytes(own),
                            "trigger_words": []})
        self.warnings = []
        if self.past_end:
            base_lost = any("base_" + k in self.past_end for k in self.base)   # every entry reads the base
            lost = [e["name"] for e in entries if base_lost or any(
                k in self.past_end for r in self.records.get(e["index"], {}).values() for k in r.values())]
            self.warnings.append(f"the file is truncated: {len(self.past_end)} tensor(s) lie past its end; "
                                 f"damaged entr{'y' if len(lost) == 1 else 'ies'}: {', '.join(map(repr, lost))}.")
        self.header = {"format": "loradb-app-1.0", "version": [1, 0],
                       "collection": {"name": os.path.splitext(self.name)[0], "creator": meta.get("creator", ""),
                                      "description": meta.get("description", ""),
                                      "tags": _tags(meta.get("tags")), "edition": meta.get("edition", ""),
                                      "base_name": meta.get("base_name", ""), "source_format": "LoRA Lens app 1.0"},
                       "entries": entries}

    def _load(self, keys: list[str], what: str) -> dict[str, torch.Tensor]:
        lost = [k for k in keys if k in self.past_end]
        if lost:
            raise LensError(f"{what} is damaged: its tensor {lost[0]!r} lies past the end of the file "
                            "(the file is truncated).")
        try:
            if self.past_end:   # a truncated file: safetensors refuses it whole, its intact tensors are read here
                from ..st_io import MappedFile
                f, wanted = MappedFile(self.path, {}), set(keys)
                t = {k: f.tensor(k).clone() for k in f.entries if k in wanted}
                del f
            else:
                t, _ = load_file(self.path, keys=keys)
        except LensError as e:
            raise LensError(f"{what} is damaged: {str(e).rstrip('.')}.") from None
        return t

    def state_dict(self, entry: dict) -> dict[str, torch.Tensor]:
        i = entry.get("index")
        what = f"{self.name}: entry {entry.get('name')!r}"
        base = self._load(["base_" + k for k in self.base], what)
        base = {k[5:]: v for k, v in base.items()}
        if i == self.base_index:
            if not base:   # an empty LoRA is no entry: the file is damaged (or not the app's)
                raise LensError(f"{what} has no stored tensors (the file holds no base_ tensors).")
            return base
        recs = self.records.get(i, {})
        if not recs:
            raise LensError(f"{what} has no stored tensors (the app dropped it).")
        stored = self._load([k for r in recs.values() for k in r.values()], what)
        out: dict[str, torch.Tensor] = {}
        touched = {_module_of(k) for k in recs}
        for key, b in base.items():   # base order first, as the app's files are laid out
            r = recs.get(key)
            if r is None:
                if _module_of(key) in touched:
                    out[key] = b.clone()
                continue
            out[key] = self._rebuild(key, r, stored, b, what)
        for key, r in recs.items():
            if key not in base:
                out[key] = self._rebuild(key, r, stored, None, what)
        return out

    def _rebuild(self, key, r, stored, base, what) -> torch.Tensor:
        def get(kind):
            return stored[r[kind]].float()
        if "full_" in r:
            t = get("full_")
        elif "diff_" in r:
            if base is None or tuple(stored[r["diff_"]].shape) != tuple(base.shape):
                raise LensError(f"{what} is damaged: the delta of {key!r} does not match its base tensor.")
            t = base.float() + get("diff_")
        elif {"u_", "s_", "v_"} <= r.keys() or {"new_u_", "new_s_", "new_v_"} <= r.keys():
            p = "" if "u_" in r else "new_"
            u, s, v = get(p + "u_"), get(p + "s_"), get(p + "v_")
            if u.ndim != 2 or v.ndim != 2 or s.ndim != 1 or u.shape[1] != s.shape[0] or v.shape[1] != s.shape[0]:
                raise LensError(f"{what} is damaged: the factors of {key!r} have inconsistent shapes.")
            if u.shape[0] * v.shape[0] > MAX_KEY_ELEMS:
                raise LensError(f"{what} is damaged: {key!r} would be {u.shape[0]}×{v.shape[0]} (too large).")
            if p == "" and (base is None or base.numel() != u.shape[0] * v.shape[0]):   # before the product
                raise LensError(f"{what} is damaged: the delta of {key!r} does not match its base tensor.")
            d = (u * s) @ v.T
            if p == "":
                t = base.float() + d.reshape(base.shape)
            else:
                t = d
        else:
            raise LensError(f"{what} is damaged: {key!r} has an incomplete record ({', '.join(sorted(r))}).")
        return t.to(base.dtype) if base is not None else t.half()

    def extract_bytes(self, entry: dict) -> np.ndarray:
        sd = self.state_dict(entry)
        meta = {"lora_lens.loradb_source": f"LoRA Lens app v1.0 collection {self.name} (lossy source)"}
        fd, tmp = tempfile.mkstemp(prefix=".lens-v1-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file(sd, tmp, meta)
            with open(tmp, "rb") as f:
                data = np.frombuffer(f.read(), dtype=np.uint8)
        finally:
            os.unlink(tmp)
        import hashlib
        entry["output_sha256"] = hashlib.sha256(memoryview(data)).hexdigest()
        entry["output_bytes"] = int(data.size)
        return data


def _tags(v):
    if not v:
        return []
    try:
        t = json.loads(v)
        if isinstance(t, list):
            return [str(x) for x in t]
    except ValueError:
        pass
    return [s.strip() for s in str(v).split(",") if s.strip()]
