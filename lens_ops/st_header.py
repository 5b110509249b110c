"""Safetensors header validation without torch: the one strict reader of a file's layout.

Kept apart from st_io (which needs torch for tensors) so that tools that only move bytes, such as
extracting a lossless .loradb entry, can check headers without paying torch's import time.
"""
from __future__ import annotations

import json
import os

from .errors import LensError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


def read_header(path: str, past_end: dict | None = None) -> tuple[dict, dict, int]:
    """Validate a safetensors file's header; return (tensor entries in file order, metadata, data start).

    Raises LensError naming the first problem found. Nothing past the header is read. With a `past_end`
    dict, tensors whose data lies past the end of a truncated file are put there (key → entry) and left
    out of the result instead of failing the whole file (for readers that can use the rest).
    """
    name = os.path.basename(path)
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise LensError(f"{name} is a pickle-based file ({os.path.splitext(path)[1]}); LoRA Lens never "
                        "unpickles files. Convert it to .safetensors with a tool you trust first.")
    if not os.path.isfile(path):
        raise LensError(f"{path} does not exist or is not a file.")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
        if len(head) < 8:
            raise LensError(f"{name} is truncated: it is {size} bytes, shorter than a safetensors header.")
        # a header length may itself start with "PK" or 0x80: only a file whose header is not JSON is a checkpoint
        plausible = head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size
        if (head[:2] == b"PK" or head[:1] == b"\x80") and not plausible:
            raise LensError(f"{name} is a pickle/zip checkpoint, not safetensors; LoRA Lens never unpickles files.")
        n = int.from_bytes(head[:8], "little")
        f.seek(8)
        if n > MAX_HEADER_BYTES:
            raise LensError(f"{name} is not a valid safetensors file: its header claims {n} bytes "
                            f"(limit {MAX_HEADER_BYTES}).")
        if 8 + n > size:
            raise LensError(f"{name} is truncated or corrupt: its header length ({n} bytes) runs past the "
                            f"end of the file ({size} bytes).")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LensError(f"{name} is not a valid safetensors file: its header is not JSON.") from None
    if not isinstance(header, dict):
        raise LensError(f"{name} is not a valid safetensors file: its header is not a JSON object.")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LensError(f"{name} has a malformed __metadata__ block (it must map names to strings).")
    data_len = size - 8 - n
    spans = []
    for key, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise LensError(f"{name}: tensor entry {key!r} is malformed (needs dtype, shape, data_offsets).")
        dtype, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise LensError(f"{name}: tensor {key!r} has an unknown dtype {dtype!r}.")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise LensError(f"{name}: tensor {key!r} has an invalid shape {shape!r}.")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise LensError(f"{name}: tensor {key!r} has invalid data offsets {offs!r}.")
        if offs[1] > data_len:
            if past_end is not None:
                past_end[key] = entry
                continue
            raise LensError(f"{name} is truncated or corrupt: tensor {key!r} runs past the end of the data "
                            f"({offs[1]} > {data_len} bytes).")
        numel = 1
        for d in shape:
            numel *= d
        if offs[1] - offs[0] != numel * DTYPE_BYTES[dtype]:
            raise LensError(f"{name}: tensor {key!r} declares shape {shape} of {dtype} but holds "
                            f"{offs[1] - offs[0]} bytes.")
        spans.append((offs[0], offs[1], key))
    spans.sort()
    for (a0, a1, ka), (b0, b1, kb) in zip(spans, spans[1:]):
        if b0 < a1 and b1 > b0:
            raise LensError(f"{name} is corrupt: tensors {ka!r} and {kb!r} overlap in the file.")
    ordered = dict(sorted(((k, v) for k, v in header.items() if not past_end or k not in past_end),
                          key=lambda kv: kv[1]["data_offsets"][0]))
    return ordered, metadata, 8 + n
