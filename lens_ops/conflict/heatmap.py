"""The conflict map: blocks (rows) × metrics (columns) as an RGB image, drawn with numpy.

Cell colour says how worrying a value is (green → yellow → red): conflict score and the overlaps as they are,
cosine as max(0, −cos) (opposed changes), interference as how far it falls below the orthogonal level 1/√2
(cancellation); the norm balance column is informative only (grey → blue). Labels are drawn with Pillow's built-in font when Pillow is installed
(it always is inside ComfyUI); without it the map has no text.
"""
from __future__ import annotations

import numpy as np

from .scan import METRIC_COLUMNS, block_sort_key

HEADERS = {"conflict": "conflict", "cosine": "cosine", "subspace_overlap": "subspace", "energy_overlap": "energy ov.",
           "interference": "interf.", "norm_balance": "balance"}
ORTHO = 2 ** -0.5
CELL_W, CELL_H, LABEL_W, HEAD_H = 72, 16, 84, 20


def badness(metric: str, v):
    if v is None:
        return None
    if metric == "cosine":          # opposed changes are the worry; unrelated or aligned are fine here
        return max(0.0, -v)
    if metric == "interference":    # below the orthogonal level 1/√2 the changes cancel
        return max(0.0, (ORTHO - v) / ORTHO)
    return float(v)


def _ramp(x: float) -> tuple[float, float, float]:
    """green (0) → yellow (0.5) → red (1)."""
    x = min(max(x, 0.0), 1.0)
    if x < 0.5:
        return (0.15 + 1.5 * x, 0.7, 0.2)
    return (0.9, 0.7 - 1.2 * (x - 0.5), 0.2)


def block_matrix(report: dict):
    blocks = sorted(report["blocks"], key=block_sort_key)
    vals = [[report["blocks"][b].get("conflict_score" if c == "conflict" else c) for c in METRIC_COLUMNS]
            for b in blocks]
    return blocks, list(METRIC_COLUMNS), vals


def render(report: dict) -> np.ndarray:
    """H×W×3 float32 image in [0, 1]."""
    blocks, cols, vals = block_matrix(report)
    h = HEAD_H + CELL_H * max(len(blocks), 1)
    w = LABEL_W + CELL_W * len(cols)
    img = np.full((h, w, 3), 0.12, np.float32)
    for i, row in enumerate(vals):
        y = HEAD_H + i * CELL_H
        for j, (c, v) in enumerate(zip(cols, row)):
            x = LABEL_W + j * CELL_W
            if v is None:
                color = (0.25, 0.25, 0.25)
            elif c == "norm_balance":
                color = (0.3, 0.3 + 0.2 * v, 0.4 + 0.5 * v)
            else:
                color = _ramp(badness(c, v))
            img[y + 1:y + CELL_H - 1, x + 1:x + CELL_W - 1] = color
    try:
        from PIL import Image, ImageDraw
    except ImportError:  # pragma: no cover - Pillow is part of ComfyUI
        return img
    pil = Image.fromarray((img * 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    for j, c in enumerate(cols):
        d.text((LABEL_W + j * CELL_W + 4, 4), HEADERS[c], fill=(230, 230, 230))
    for i, (b, row) in enumerate(zip(blocks, vals)):
        y = HEAD_H + i * CELL_H + 2
        d.text((4, y), b[:13], fill=(230, 230, 230))
        for j, v in enumerate(row):
            if v is not None:
                d.text((LABEL_W + j * CELL_W + 6, y), f"{v:+.2f}" if cols[j] == "cosine" else f"{v:.2f}",
                       fill=(15, 15, 15))
    return np.asarray(pil, dtype=np.float32) / 255.0


def view_data(report: dict) -> dict:
    """The numbers the web view draws (blocks, metric names, values, overall line)."""
    blocks, cols, vals = block_matrix(report)
    return {"blocks": blocks, "metrics": cols, "values": vals,
            "badness": [[badness(c, v) if c != "norm_balance" else None for c, v in zip(cols, row)] for row in vals],
            "overall": report["overall"]["conflict_score"], "ratio": report["recommended_ratio"]["text"],
            "stability": report["stability"]["prediction"], "problems": len(report["problem_modules"])}
