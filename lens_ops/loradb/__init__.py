"""`.loradb` collections: many LoRAs in one small, safe, random-access file (docs/loradb.md).

    pack(out, [files or (name, model)], name=..., creator=..., tags=[...], recipe=None, int8=False,
         shared_basis="off"|"on"|"auto")      -> report
    open_collection(path) -> Collection (.collection, .entries, .extract_bytes/.extract_model/.extract_to)
    append(path, files) / remove(path, names)  -> report (in place, crash-safe)
    convert(old, new)                           -> report (app v1.0 files or ours, rewritten compactly)
"""
from .db import (Collection, append, convert, open_collection, pack, remove, report_of,  # noqa: F401
                 safe_file_name)
