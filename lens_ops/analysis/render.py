"""The report's picture, drawn with numpy only: a spectrum/energy heatmap.

Rows are modules (file order; resampled to at most MAX_ROWS), columns the singular-value index up to the
largest rank. Colour = log10(σᵢ/σ₁) from −4 (dark) to 0 (bright), white dots mark each module's
effective rank at 99 % energy; the strip on the right is the module's share of total ΔW energy (log).
Modules without a spectrum are grey rows. Returns float32 [H, W, 3] in 0..1.
"""
from __future__ import annotations

import numpy as np

MAX_ROWS = 512
WIDTH = 512
STRIP = 24
GAP = 4
FLOOR = -4.0
# viridis anchors
_ANCHORS = np.array([[0.267, 0.005, 0.329], [0.283, 0.141, 0.458], [0.254, 0.265, 0.530], [0.207, 0.372, 0.553],
                     [0.164, 0.471, 0.558], [0.128, 0.567, 0.551], [0.135, 0.659, 0.518], [0.267, 0.749, 0.441],
                     [0.478, 0.821, 0.318], [0.741, 0.873, 0.150], [0.993, 0.906, 0.144]], dtype=np.float32)


def colormap(v: np.ndarray) -> np.ndarray:
    """Viridis-like colours for values in 0..1 (clipped); [..., 3] float32."""
    v = np.clip(np.nan_to_num(v, nan=0.0), 0.0, 1.0) * (len(_ANCHORS) - 1)
    i = np.minimum(v.astype(np.int64), len(_ANCHORS) - 2)
    f = (v - i)[..., None].astype(np.float32)
    return _ANCHORS[i] * (1 - f) + _ANCHORS[i + 1] * f


def render_heatmap(report: dict) -> np.ndarray:
    mods = list(report["modules"].values())
    if not mods:
        return np.zeros((64, WIDTH, 3), dtype=np.float32)
    kmax = max([len(e["singular_values"]) for e in mods if e.get("singular_values")] or [1])
    n = len(mods)
    rows = min(n, MAX_ROWS)
    scale = max(1, MAX_ROWS // max(n, 1)) if n < 128 else 1
    H = max(rows * scale, 64)
    W = WIDTH + GAP + STRIP
    img = np.full((H, W, 3), 0.08, dtype=np.float32)
    total = report["blocks"]["total_energy"] or 1.0
    row_of = np.minimum((np.arange(H) * n) // H, n - 1)
    col_idx = np.minimum((np.arange(WIDTH) * kmax) // WIDTH, kmax - 1)
    for y in range(H):
        e = mods[row_of[y]]
        sv = e.get("singular_values")
        if not sv:
            img[y, :WIDTH] = 0.35
            continue
        s = np.asarray(sv, dtype=np.float64)
        if s[0] <= 0:
            img[y, :WIDTH] = 0.0
            continue
        lv = np.full(kmax, FLOOR)
        with np.errstate(divide="ignore"):
            lv[: len(s)] = np.maximum(np.log10(np.maximum(s / s[0], 1e-30)), FLOOR)
        lv[len(s):] = np.nan
        row = colormap((lv[col_idx] - FLOOR) / -FLOOR)
        row[np.isnan(lv[col_idx])] = 0.08
        img[y, :WIDTH] = row
        k = e.get("effective_rank_99") or 0
        if k:
            x = min(int((k - 0.5) * WIDTH / kmax), WIDTH - 1)
            img[y, max(0, x - 1):x + 2] = 1.0
        share = (e.get("energy") or 0.0) / total
        img[y, WIDTH + GAP:] = colormap(np.array((np.log10(max(share, 1e-6)) + 6) / 6))
    return img
