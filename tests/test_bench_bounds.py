"""The rate–distortion bounds that bench/loradb.py --bound prints (bench/_rd.py), against closed forms and an
actual entropy-coded quantiser."""
import importlib.util
import math
import os

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "_rd.py")
_spec = importlib.util.spec_from_file_location("bench_rd", _PATH)
rd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rd)


def test_one_direction_matches_the_closed_form():
    n, m, s, budget = 640, 2048, 3.0, 1e-3
    vws = [rd.coef_vars([s], n, m)]
    theta = rd.water_level(vws, budget)
    assert theta == pytest.approx(budget / (n + m), rel=1e-6)      # both coefficient sets are above the water
    want = n / 2 * math.log2(s * s / n / theta) + m / 2 * math.log2(s * s / m / theta)
    assert rd.bits(vws, theta) == pytest.approx(want, rel=1e-6)
    assert rd.independent_bits([vws], [budget], rd.ECSQ_GAP) == pytest.approx(want + (n + m) * rd.ECSQ_GAP, rel=1e-6)


def test_a_weak_direction_is_dropped_not_coded():
    vws = [rd.coef_vars([1.0, 1e-4], 100, 100)]
    budget = 2 * (1e-4) ** 2 + 1e-6          # the weak direction's whole energy fits in the budget
    theta = rd.water_level(vws, budget)
    assert theta < 1.0 / 100 and theta > 1e-8 / 100
    assert rd.distortion(vws, theta) == pytest.approx(budget, rel=1e-6)


def test_ecsq_gap_matches_a_real_entropy_coded_quantiser():
    g = np.random.default_rng(3)
    x = g.standard_normal(2_000_000)
    step = 0.05                                   # high rate: error ≈ step²/12
    q = np.rint(x / step).astype(np.int64)
    _, counts = np.unique(q, return_counts=True)
    p = counts / counts.sum()
    entropy = float(-(p * np.log2(p)).sum())
    shannon = 0.5 * math.log2(1.0 / float(((x - q * step) ** 2).mean()))
    assert entropy - shannon == pytest.approx(rd.ECSQ_GAP, abs=0.01)


def test_sharing_a_common_part_costs_about_one_copy():
    g = np.random.default_rng(5)
    spec = [rd.coef_vars(np.exp(-np.arange(16) / 4) * g.uniform(0.5, 2), 320, 640) for _ in range(6)]
    budgets = [1e-4] * 10
    alone = rd.independent_bits([spec] * 10, budgets)
    shared = rd.shared_bits(spec, [[rd.coef_vars([], 320, 640)]] * 10, budgets)
    assert alone / 10 < shared < alone / 10 * 1.5
