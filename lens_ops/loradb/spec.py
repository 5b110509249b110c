"""The .loradb v2 container: constants and limits (docs/loradb.md is the full specification).

Byte layout (all integers little-endian):

    0    8  magic  b"\\x89LORADB\\n"
    8    4  format major (2)        12   4  format minor (1; 0 = files without quantised tensors)
    16  64  commit slot A           80  64  commit slot B
    144 ..  payloads (zstd frames / raw chunks), entry tables, collection headers, appended in order

A commit slot: u64 generation, u64 header offset, u64 header stored length, u64 header raw length,
u32 header codec (0 raw JSON, 1 zstd JSON), u32 reserved (0), 16 bytes sha256(header stored bytes)[:16],
8 bytes sha256(slot bytes 0..56)[:8]. The valid slot with the highest generation is the current one.
Bytes are never overwritten except the 64 bytes of the older slot, so an interrupted append or remove
leaves the previous collection readable.
"""
from __future__ import annotations

MAGIC = b"\x89LORADB\n"
FORMAT_MAJOR = 2
FORMAT_MINOR = 1
SLOT_SIZE = 64
SLOT_OFFSETS = (16, 80)
DATA_START = 144

CODEC_RAW = "raw"
CODEC_ZSTD = "zstd"
HEADER_CODECS = {0: CODEC_RAW, 1: CODEC_ZSTD}

# ---- limits a reader enforces before it allocates or inflates anything
MAX_HEADER_BYTES = 256 * 2**20          # collection header JSON, decompressed
MAX_TABLE_BYTES = 256 * 2**20           # one entry table JSON, decompressed
MAX_CHUNK_BYTES = 16 * 2**20            # one payload chunk, decompressed
CHUNK_BYTES = 4 * 2**20                 # chunk size the writer uses
MAX_ENTRY_OUTPUT = 64 * 2**30           # one extracted file
MAX_EXPANSION = 4096                    # extracted bytes per stored byte of an entry (computed tensors)
MAX_NAME_CHARS = 200
MAX_JSON_DEPTH = 64

ELEM_SIZES = (1, 2, 4, 8)
DEFAULT_LEVEL = 3                       # zstd level per plane (measured best: see docs/loradb.md)
CODE_LEVEL = 16                         # the lossy coder's narrow integer code streams (lossy.ClassStreams): ~4 %
                                        # smaller than level 3, as small as 19 at twice its speed

ST_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
             "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
                    *(f"{d}{i}" for d in ("COM", "LPT") for i in (*range(1, 10), "\u00b9", "\u00b2", "\u00b3"))}
MAX_NAME_BYTES = 230                    # UTF-8 bytes of a file name's stem: with " (NN)" and .safetensors < 255
