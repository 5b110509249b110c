"""Blend straight into a file: every output module is written as soon as it is made (`st_io.StreamWriter`), so
the working memory is one module's factors, not the whole result (an exact concat of two FLUX rank-64 LoRAs is
itself 1.2 GB). The file appears atomically when the blend finishes; on any error nothing is left behind."""
from __future__ import annotations

import os

from ..heap import trim_heap
from ..model import ensure_model
from ..st_io import StreamWriter
from .engine import blend

TRIM_EVERY = 64 << 20   # bytes written between two returns of freed heap memory to the system (heap.py)


def blend_to_file(loras: list, weights: list[float], path: str, **options):
    """`blend(loras, weights, **options)` written to `path` module by module. Returns (shape-only LoRAModel,
    report); report["output"]["file"] is the absolute path. Never overwrites an input file."""
    models = [ensure_model(x) for x in loras]
    forbid = tuple(m.source for m in models if m.source)
    pending = [0]
    with StreamWriter(path, forbid=forbid) as w:
        def write(m):
            for role, key in m.keys.items():
                t = m.tensors[role]
                w.add(key, t.detach().to("cpu"))
                pending[0] += t.numel() * t.element_size()
            if pending[0] >= TRIM_EVERY:
                trim_heap()
                pending[0] = 0

        result, report = blend(models, weights, sink=write, **options)
        target = w.close(result.metadata)
    report["output"]["file"] = os.path.abspath(target)
    return result, report
