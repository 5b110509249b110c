"""Training facts from a LoRA's safetensors header (kohya `ss_*`, `modelspec.*`, ai-toolkit fields).

Trigger words come from the trainer's tag frequency (most frequent tags first) or an explicit
trigger field; every value is optional because many files carry no metadata at all.
"""
from __future__ import annotations

import json


def _json(v):
    try:
        return json.loads(v)
    except (TypeError, ValueError):
        return None


def trigger_words(meta: dict, limit: int = 10) -> list[str]:
    for key in ("modelspec.trigger_phrase", "trigger_words", "trigger_word", "ss_trigger_words"):
        if meta.get(key):
            v = _json(meta[key])
            words = v if isinstance(v, list) else str(meta[key]).split(",")
            return [w.strip() for w in words if str(w).strip()][:limit]
    freq = _json(meta.get("ss_tag_frequency", ""))
    if isinstance(freq, dict):
        counts: dict[str, int] = {}
        for tags in freq.values():
            if isinstance(tags, dict):
                for t, n in tags.items():
                    if isinstance(n, (int, float)):
                        counts[t.strip()] = counts.get(t.strip(), 0) + int(n)
        return [t for t, _ in sorted(counts.items(), key=lambda kv: -kv[1])][:limit]
    return []


def training_info(meta: dict) -> dict:
    """The highlights users look for; keys absent from the header are left out."""
    info = {}
    ti = _json(meta.get("training_info", "")) if meta.get("training_info") else None
    software = _json(meta.get("software", "")) if meta.get("software") else None

    def put(name, *keys):
        for k in keys:
            v = meta.get(k)
            if v not in (None, "", "None", "null"):
                info[name] = v
                return

    put("base_model", "ss_base_model_version", "modelspec.architecture", "ss_sd_model_name")
    put("base_model_file", "ss_sd_model_name")
    put("title", "modelspec.title", "ss_output_name", "name")
    put("network_module", "ss_network_module")
    put("network_args", "ss_network_args")
    put("dim", "ss_network_dim")
    put("alpha", "ss_network_alpha")
    put("resolution", "ss_resolution", "modelspec.resolution")
    put("steps", "ss_steps", "ss_max_train_steps")
    put("epochs", "ss_epoch", "ss_num_epochs")
    put("learning_rate", "ss_learning_rate")
    put("optimizer", "ss_optimizer")
    put("images", "ss_num_train_images")
    if isinstance(ti, dict) and "step" in ti and "steps" not in info:
        info["steps"] = str(ti["step"])
    if isinstance(software, dict) and software.get("name"):
        info["trainer"] = f"{software['name']} {software.get('version', '')}".strip()
    elif meta.get("ss_network_module") or meta.get("ss_sd_scripts_commit_hash"):
        info["trainer"] = "kohya sd-scripts" + (" + LyCORIS" if "lycoris" in meta.get("ss_network_module", "") else "")
    elif meta.get("modelspec.implementation_version"):
        info["trainer"] = meta["modelspec.implementation_version"]
    words = trigger_words(meta)
    if words:
        info["trigger_words"] = words
    return info
