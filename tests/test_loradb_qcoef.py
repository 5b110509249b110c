"""The lossy .loradb coder's inner loop: the rounding error it bisects on must be the exact error of the
codes extraction rebuilds (else the per-LoRA step is chosen on a wrong number)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lens_ops.loradb import qcoef
from lens_ops.loradb.spill import Spill


@pytest.mark.parametrize("chunk", [1 << 22, 5000, 1])
def test_error_at_equals_direct_rounding_error(monkeypatch, chunk):
    monkeypatch.setattr(qcoef, "ERROR_CHUNK", chunk)
    rng = np.random.default_rng(0)
    coder = qcoef.LoraCoder(0, 1.0)
    for j in range(5):
        n, m, r = (int(x) for x in (rng.integers(50, 3000), rng.integers(50, 3000), rng.integers(1, 20)))
        u = rng.standard_normal((n, r)).astype(np.float32)
        vh = rng.standard_normal((r, m)).astype(np.float32)
        coder.add(f"m{j}", n, m, u, np.exp(-np.arange(r) / 3) * 10, vh)
    coder.prepare()
    for delta in (1e-3, 1e-2, 0.1):
        th, ref = delta * delta / 12, 0.0
        for _name, n, m, u, s, vh, _g, _core in coder.items:
            for d in range(len(s)):
                if s[d] ** 2 > qcoef.DROP_TAU * (n + m) * th:
                    x = np.concatenate([u[:, d].astype(np.float64) * s[d], vh[d].astype(np.float64) * s[d]])
                    ref += float(((x - delta * qcoef.quant(x, delta)) ** 2).sum())
                else:
                    ref += float(s[d] ** 2)
        assert coder.error_at(delta) == pytest.approx(ref, rel=1e-12)


def test_spill_round_trips_float32_and_removes_its_file(tmp_path):
    sp = Spill(str(tmp_path))
    a, b = torch.randn(37, 5, dtype=torch.float64), torch.randn(3, 1000)
    ra, rb = sp.put(a), sp.put(b)
    assert np.array_equal(sp.get(ra), a.to(torch.float32).numpy())
    rc = sp.put(torch.ones(2, 2))            # written after the first map: re-mapped on demand
    assert np.array_equal(sp.get(rc), np.ones((2, 2), np.float32))
    with pytest.raises(ValueError):          # views are read-only: nothing can change a parked factor
        sp.get(rb)[0, 0] = 123.0
    assert sp.get(rb)[0, 0] == b[0, 0].item()
    assert sp.get(sp.put(torch.zeros(0, 4))).shape == (0, 4)
    sp.release()                              # pages unmapped from the process: still readable
    assert np.array_equal(sp.get(ra), a.to(torch.float32).numpy())
    sp.close()
    assert not list(tmp_path.iterdir())


def test_code_streams_are_compressed_harder_than_the_float_planes():
    """The lossy coder's narrow integer code classes go through zstd at CODE_LEVEL (smaller than the float planes'
    level 3 on Gaussian codes), and every class still decodes to the same integers."""
    import numpy as np
    import zstandard

    from lens_ops.loradb.lossy import ClassStreams

    class Sink:
        def __init__(self):
            self.blobs, self.written = [], 0

        def put(self, data, codec):
            self.blobs.append(data)
            self.written += len(data)
            return [0, len(data)]

        def register_stream(self, desc):
            return desc

    g = np.random.default_rng(11)
    codes = [np.rint(g.standard_normal(200_000) * s).astype(np.int64) for s in (0.8, 3.0, 20.0)]
    cs = ClassStreams()
    for c in codes:
        cs.add(c)
    sink = Sink()
    cs.flush(sink, 3)
    plain = sum(len(zstandard.ZstdCompressor(level=3).compress(np.clip(c, -127, 127).astype(np.int8).tobytes()))
                for c in codes)
    assert sink.written < 0.95 * plain      # zstd levels 3–12 are within 3 % of each other on these codes
    back = np.concatenate([np.frombuffer(zstandard.ZstdDecompressor().decompress(b), dtype=np.int8) for b in sink.blobs])
    assert sorted(back.tolist()) == sorted(np.concatenate(codes).tolist())
