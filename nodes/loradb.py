"""PackLoRADB and ExtractLoRADB: .loradb collections in ComfyUI (engine: lens_ops.loradb).

The `loradb` model folder is registered with folder_paths when this module is imported (ComfyUI's
models/loradb, plus any `loradb:` path from extra_model_paths.yaml, which ComfyUI reads first)."""
from __future__ import annotations

import os

from ..lens_ops import LensError
from ..lens_ops.loradb.db import safe_file_name
from ..lens_ops.st_io import safe_join
from .common import CATEGORY, LORA, as_socket, lora_names, lora_path, mtime_of, progress, torch_device

FOLDER = "loradb"
NONE = "(none)"
OPTIMISE = ["none (lossless)", "prune recipe", "prune + int8", "int8", "prune + int8 (folded alpha)",
            "int8 (folded alpha)"]


def _register_folder() -> None:
    try:
        import folder_paths
        default = os.path.join(folder_paths.models_dir, FOLDER)
        known = getattr(folder_paths, "folder_names_and_paths", {})
        if FOLDER not in known:
            folder_paths.add_model_folder_path(FOLDER, default)
        else:
            paths, exts = known[FOLDER]
            if default not in paths:
                paths.append(default)
            if isinstance(exts, set):
                exts.add(".loradb")
    except Exception:  # not inside ComfyUI (tests, CLI): nothing to register
        pass


_register_folder()


def _loradb_names() -> list[str]:
    import folder_paths
    try:
        names = folder_paths.get_filename_list(FOLDER)
    except Exception:
        return []
    return [n for n in names if n.lower().endswith(".loradb")]


def _loradb_dir() -> str:
    import folder_paths
    try:
        paths = folder_paths.get_folder_paths(FOLDER)
    except Exception:
        paths = []
    if not paths:
        paths = [os.path.join(folder_paths.models_dir, FOLDER)]
    os.makedirs(paths[0], exist_ok=True)
    return paths[0]


def _loradb_path(name: str) -> str:
    import folder_paths
    path = None
    try:
        path = folder_paths.get_full_path(FOLDER, name)
    except Exception:
        path = None
    if path is None:
        raise LensError(f"{name!r} is not a .loradb file in ComfyUI's loradb folders; pick one from the list.")
    return path


def _split(text: str) -> list[str]:
    out = []
    for line in str(text or "").replace(",", "\n").splitlines():
        if line.strip():
            out.append(line.strip())
    return out


def _wanted(text: str, c) -> list[str]:
    """Entry names from the widget: one per line, or comma-separated; a line that is itself an entry's
    name (or file name) is taken whole, so names with commas can be picked."""
    known = {str(e.get(k)) for e in c.entries for k in ("name", "file_name")}
    out = []
    for line in str(text or "").splitlines():
        line = line.strip()
        if line in known:
            out.append(line)
        else:
            out += [w.strip() for w in line.split(",") if w.strip()]
    return out


def _first(v, default=None):
    if isinstance(v, list):
        return v[0] if v else default
    return v if v is not None else default


class PackLoRADB:
    DESCRIPTION = ("Packs LoRAs (from the graph and/or picked from the loras folders) into one .loradb collection "
                   "in the loradb model folder: lossless by default (byte-grouped zstd coding + de-duplication, "
                   "every entry extracts bit-identical), optionally pruned, int8 and/or coded on a shared basis "
                   "per module for related LoRAs (each entry's ΔW error is measured and stored). Returns a "
                   "report with sizes before/after per entry, the ratio and the errors.")
    CATEGORY = CATEGORY
    FUNCTION = "pack"
    OUTPUT_NODE = True
    INPUT_IS_LIST = True
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("report", "path")
    OUTPUT_TOOLTIPS = ("Sizes before/after per entry, ratio, errors of lossy entries (also shown in the node).",
                       "Full path of the .loradb written.")

    @classmethod
    def INPUT_TYPES(cls):
        files = [NONE] + lora_names()
        pick = {f"lora_file_{i}": (files, {"default": NONE, "tooltip": f"LoRA file #{i} from the loras folders "
                                                                      "to add to the collection ((none): skip)."})
                for i in range(1, 5)}
        return {
            "required": {
                "name": ("STRING", {"default": "my_collection",
                                    "tooltip": "Collection name; the file is written as <name>.loradb in the "
                                               "loradb model folder."}),
                "creator": ("STRING", {"default": "", "tooltip": "Creator shown to anyone who opens the collection."}),
                "description": ("STRING", {"default": "", "multiline": True,
                                           "tooltip": "What is in the collection."}),
                "tags": ("STRING", {"default": "", "tooltip": "Comma-separated tags (e.g. fantasy, character, SDXL)."}),
                "optimisation": (OPTIMISE, {"default": OPTIMISE[0],
                                            "tooltip": "none: lossless (bit-exact extraction). prune recipe: "
                                                       "PruneRank each LoRA first. int8: every module stored as "
                                                       "quantised coefficient codes (int8/int16, entropy coded), "
                                                       "the error budget water-filled across the whole LoRA; "
                                                       "extraction gives a standard fp16 LoRA. int8 (folded alpha): "
                                                       "each LoRA stored as QuantizeInt8 writes it (int8 factors, "
                                                       "scales in alpha) and extracted as exactly that file. Lossy "
                                                       "entries store their measured ΔW error."}),
                "recipe": ("STRING", {"default": "energy=0.9997",
                                      "tooltip": "PruneRank recipe used by the prune options (e.g. energy=0.9997, "
                                                 "rank=16, sv_fro=0.99)."}),
                "shared_basis": (["off", "auto", "on"], {"default": "off",
                                                         "tooltip": "Code related LoRAs (variants, a style series) on "
                                                                    "one basis per module with a small core each "
                                                                    "(lossy, within the SNR budget). auto: only where "
                                                                    "it saves bytes."}),
                "snr_db": ("FLOAT", {"default": 35.0, "min": 10.0, "max": 120.0, "step": 0.5,
                                     "tooltip": "Error budget of the lossy layers: ΔW SNR in dB of each whole LoRA "
                                                "(every entry is measured against its original)."}),
                "overwrite": ("BOOLEAN", {"default": False,
                                          "tooltip": "Replace an existing <name>.loradb (otherwise a number is added)."}),
            },
            "optional": {
                "loras": (LORA, {"tooltip": "LoRAs from the graph (a list input: connect a list or several "
                                            "runs' outputs). Each becomes one entry."}),
                **{f"loras_{i}": (LORA, {"tooltip": f"More LoRAs from the graph (#{i}; a list input too), packed "
                                                    "after those of the sockets before it."}) for i in range(2, 5)},
                "lora_names": ("STRING", {"default": "", "tooltip": "Names for the graph LoRAs, comma-separated, "
                                                                   "in order (default: lora_1, lora_2, …)."}),
                **pick,
                "more_files": ("STRING", {"default": "", "multiline": True,
                                          "tooltip": "More files from the loras folders, one per line or comma-separated."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, **inputs):
        """Picked files by name and modification time, so a re-queued pack re-reads a file replaced on disk
        (linked LoRAs are tracked by ComfyUI itself)."""
        picked = [_first(inputs.get(f"lora_file_{i}"), NONE) for i in range(1, 5)]
        picked += _split(_first(inputs.get("more_files"), ""))
        stamps = []
        for f in picked:
            if f and f != NONE:
                try:
                    stamps.append(f"{f}:{mtime_of(lora_path(f))}")
                except LensError:
                    stamps.append(str(f))
        return "|".join(stamps)

    def pack(self, name, creator, description, tags, optimisation, recipe, shared_basis, snr_db, overwrite,
             loras=None, lora_names=None, more_files=None, **picked):
        from ..lens_ops.loradb import pack
        from ..lens_ops.cli.pack import format_report
        name, creator, description = _first(name, ""), _first(creator, ""), _first(description, "")
        tags, optimisation, recipe = _first(tags, ""), _first(optimisation, OPTIMISE[0]), _first(recipe, "")
        shared_basis, snr_db, overwrite = _first(shared_basis, "off"), float(_first(snr_db, 35.0)), bool(_first(overwrite, False))
        if optimisation not in OPTIMISE:
            raise LensError(f"Unknown optimisation {optimisation!r}; choose one of: {', '.join(OPTIMISE)}.")
        if not 0.0 < snr_db < float("inf"):   # also refuses NaN
            raise LensError(f"The snr_db value is {snr_db}; use a finite number of dB (e.g. 35).")
        items = []
        graph = [x for x in (loras or []) if x is not None]
        for i in range(2, 5):   # the extra graph sockets, in order (each a list: INPUT_IS_LIST)
            graph += [x for x in (picked.pop(f"loras_{i}", None) or []) if x is not None]
        # one widget string (comma-separated) or a list wired in (e.g. ExtractLoRADB's names): one name per item
        names_in = [x for x in (lora_names if isinstance(lora_names, list) else [lora_names]) if x is not None]
        given = _split(names_in[0]) if len(names_in) == 1 else [str(x).strip() for x in names_in]
        for i, lo in enumerate(graph):
            meta = getattr(lo, "metadata", {}) or {}
            nm = given[i] if i < len(given) else meta.get("ss_output_name") or f"lora_{i + 1}"
            items.append((nm, lo))
        files = [_first(picked.get(f"lora_file_{i}"), NONE) for i in range(1, 5)] + _split(_first(more_files, ""))
        for f in files:
            if f and f != NONE:
                items.append(lora_path(f))
        if not items:
            raise LensError("Nothing to pack: connect LoRAs or pick files from the loras folders.")
        stem = str(name).strip()
        stem = stem[:-len(".loradb")] if stem.lower().endswith(".loradb") else stem
        # the name becomes a file name: no folders, control characters, reserved or over-long names
        stem = safe_file_name(stem, fallback="collection")[:-len(".safetensors")]
        folder = _loradb_dir()
        target = safe_join(folder, stem + ".loradb")
        n = 2
        while os.path.exists(target) and not overwrite:
            target = safe_join(folder, f"{stem}_{n}.loradb")
            n += 1
        # with overwrite the new collection replaces the old one only once it is complete (temp file + rename):
        # a pack that fails leaves the old collection as it was
        use_recipe = recipe if optimisation.startswith("prune") else None
        if optimisation.startswith("prune") and not str(recipe).strip():
            raise LensError("The prune options need a recipe (e.g. energy=0.9997).")
        int8 = optimisation in ("prune + int8", "int8")
        folded = optimisation.endswith("(folded alpha)")
        rep = pack(target, items, name=stem, creator=creator, description=description, tags=_split(tags),
                   recipe=use_recipe, int8=int8, shared_basis=shared_basis, snr_db=snr_db,
                   device=torch_device(), progress=progress(len(items)), int8_folded=folded)
        text = format_report(rep)
        return {"ui": {"text": [text]}, "result": ([text], [rep["path"]])}


class ExtractLoRADB:
    DESCRIPTION = ("Opens a .loradb collection from the loradb model folder (LoRA Lens format, or the LoRA Lens "
                   "app's v1.0 files) and gives back the chosen entries as LORA_MODELs (a list), verified against "
                   "the checksums recorded at pack time; optionally also writes them as .safetensors into the "
                   "loras folder. The node shows the collection's contents.")
    CATEGORY = CATEGORY
    FUNCTION = "extract"
    OUTPUT_NODE = True
    RETURN_TYPES = (LORA, "STRING", "STRING")
    RETURN_NAMES = ("loras", "names", "contents")
    OUTPUT_IS_LIST = (True, True, False)
    OUTPUT_TOOLTIPS = ("The extracted LoRAs, one per entry (a list: downstream nodes run once per LoRA).",
                       "The entries' names, in the same order.",
                       "The collection's contents (also shown in the node).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "loradb": (_loradb_names(), {"tooltip": "A .loradb file from the loradb model folder."}),
                "entries": ("STRING", {"default": "all",
                                       "tooltip": "Entry names (or file names) to extract, comma-separated or one "
                                                  "per line; 'all' for every entry."}),
                "write_to_loras": ("BOOLEAN", {"default": False,
                                               "tooltip": "Also write the entries as .safetensors (their original "
                                                          "file names) into the first loras folder."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, loradb, entries="all", write_to_loras=False):
        try:
            return f"{loradb}:{mtime_of(_loradb_path(loradb))}:{entries}:{write_to_loras}"
        except LensError:
            return loradb

    def extract(self, loradb, entries="all", write_to_loras=False):
        from ..lens_ops.loradb import open_collection
        from ..lens_ops.cli.list import format_listing
        path = _loradb_path(loradb)
        outs, out_names, lines = [], [], []
        with open_collection(path) as c:
            wanted = _wanted(entries, c)
            names = None if not wanted or [w.lower() for w in wanted] == ["all"] else wanted
            contents = format_listing(c)
            chosen = c.find(names)
            bar = progress(len(chosen))
            good, damaged = [], []
            for i, e in enumerate(chosen):
                try:   # a damaged entry is named; the undamaged ones still come out
                    model = c.extract_model(e)
                except LensError as err:
                    damaged.append(str(err))
                else:
                    outs.append(as_socket(model))
                    out_names.append(str(e.get("name")))
                    good.append(e)
                bar(i + 1, len(chosen))
            if damaged and not good:
                more = f" ({len(damaged) - 1} more damaged entr{'y' if len(damaged) == 2 else 'ies'})" \
                    if len(damaged) > 1 else ""
                raise LensError(damaged[0] + more)
            lines += [f"Not extracted (damaged): {d}" for d in damaged]
            if write_to_loras:
                import folder_paths
                root = folder_paths.get_folder_paths("loras")[0]
                res = c.extract_to(root, [e.get("name") for e in good])
                for w in res["written"]:
                    lines.append(f"Wrote {os.path.basename(w['path'])} to the loras folder.")
                for d in res["damaged"]:
                    lines.append(f"Not written: {d['error']}")
        kinds = "lossy source (app v1.0)" if c.legacy else ", ".join(
            sorted({"lossless" if e.get("lossless") else "lossy" for e in good}))
        text = contents + f"\n\nExtracted {len(outs)} entr{'y' if len(outs) == 1 else 'ies'} ({kinds}): " \
            + ", ".join(out_names) + ("\n" + "\n".join(lines) if lines else "")
        return {"ui": {"text": [text]}, "result": (outs, out_names, text)}


NODE_CLASS_MAPPINGS = {"PackLoRADB": PackLoRADB, "ExtractLoRADB": ExtractLoRADB}
NODE_DISPLAY_NAME_MAPPINGS = {"PackLoRADB": "Pack LoRA Collection (.loradb)",
                              "ExtractLoRADB": "Extract LoRA Collection (.loradb)"}
