"""Lossless float coding by byte grouping + zstd (the ZipNN idea), chunked for parallel decoding.

A stream holds elements of one size e (1, 2, 4 or 8 bytes). Its bytes are split into e planes (plane j =
byte j of every element, little-endian): for fp16/bf16 plane 1 holds sign + exponent (+ the top mantissa
bits), which is highly compressible, plane 0 the low mantissa bits, which are close to random. Each
plane is cut into chunks of CHUNK_BYTES and every chunk is stored zstd-compressed (with the frame's own
content checksum) or raw when zstd does not make it smaller.
"""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zstandard

from ..errors import LensError
from .container import check_stream as check_record, inflate
from .spec import CHUNK_BYTES, CODEC_RAW, CODEC_ZSTD, ELEM_SIZES, MAX_CHUNK_BYTES

_POOL = ThreadPoolExecutor(max_workers=4)
LITTLE = sys.byteorder == "little"
RAW_IF_ABOVE = 0.985  # a chunk that zstd shrinks by less than 1.5 % is stored raw (decodes faster)


def split_planes(data: np.ndarray, e: int) -> list[np.ndarray]:
    if e == 1:
        return [data]
    m = data.reshape(-1, e)
    return [np.ascontiguousarray(m[:, j]) for j in range(e)]


def _compress(chunk: bytes, level: int) -> tuple[bytes, str]:
    c = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True).compress(chunk)
    if len(c) < RAW_IF_ABOVE * len(chunk):
        return c, CODEC_ZSTD
    return chunk, CODEC_RAW


def encode_stream(writer, data: np.ndarray, e: int, level: int) -> dict:
    """Write one stream (uint8 array of n·e bytes); return its descriptor {e, n, planes}."""
    if e not in ELEM_SIZES or data.size % e:
        raise LensError(f"Internal error: stream of {data.size} bytes is not made of {e}-byte elements.")
    planes = split_planes(data, e)
    jobs = []
    for p in planes:
        buf = p.tobytes()
        jobs.append([(_POOL.submit(_compress, buf[i:i + CHUNK_BYTES], level), min(CHUNK_BYTES, len(buf) - i))
                     for i in range(0, len(buf), CHUNK_BYTES)])
    out = []
    for plane_jobs in jobs:
        chunks = []
        for fut, raw_len in plane_jobs:
            blob, codec = fut.result()
            chunks.append(writer.put(blob, codec) + [raw_len, codec])
        out.append(chunks)
    return writer.register_stream({"e": e, "n": int(data.size // e), "planes": out})


def check_stream(desc, what: str) -> tuple[int, int]:
    """(e, n) of a well-formed stream record (container.check_stream), else one sentence."""
    e, n, _ = check_record(desc, what)
    return e, n


def decode_stream(reader, desc, what: str) -> np.ndarray:
    """Read and decode a whole stream back to its interleaved bytes (uint8 array of n·e)."""
    e, n = check_stream(desc, what)
    # read all chunks first (bounds-checked), then inflate in parallel
    base = desc.get("base", 0)
    raw_chunks = [[(reader.read(base + c[0], c[1], what), c) for c in plane] for plane in desc["planes"]]

    def dec(item):
        data, c = item
        if c[3] == CODEC_RAW:
            if c[1] != c[2]:
                raise LensError(f"{reader.name}: {what} is corrupt (raw chunk size mismatch).")
            return data
        return inflate(data, c[2], MAX_CHUNK_BYTES, f"{reader.name}: {what}")

    out = np.empty((n, e), dtype=np.uint8)
    bounds = [[c[2] for c in plane] for plane in desc["planes"]]
    if e == 2 and LITTLE and len(bounds) == 2 and bounds[0] == bounds[1]:
        # the usual fp16/bf16 case: decode both planes of a chunk and combine them in one pass
        o16 = out.reshape(-1).view(np.uint16)
        jobs, pos = [], 0
        for lo_item, hi_item in zip(*raw_chunks):
            jobs.append((lo_item, hi_item, pos))
            pos += lo_item[1][2]

        def pair(job):
            lo_item, hi_item, pos = job
            lo = np.frombuffer(dec(lo_item), dtype=np.uint8)
            hi = np.frombuffer(dec(hi_item), dtype=np.uint8)
            dst = o16[pos:pos + lo.size]
            np.left_shift(hi, 8, out=dst, dtype=np.uint16)
            np.bitwise_or(dst, lo, out=dst)

        for _ in _POOL.map(pair, jobs):
            pass
        return out.reshape(-1)
    jobs = []
    for j, plane in enumerate(raw_chunks):
        pos = 0
        for item in plane:
            jobs.append((item, j, pos))
            pos += item[1][2]

    def place(job):  # decode one chunk and scatter it into its plane (numpy copies release the GIL)
        item, j, pos = job
        buf = dec(item)
        out[pos:pos + len(buf), j] = np.frombuffer(buf, dtype=np.uint8)

    for _ in _POOL.map(place, jobs):
        pass
    return out.reshape(-1)
