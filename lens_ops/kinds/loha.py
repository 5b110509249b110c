"""LyCORIS LoHa: ΔW = scale · (w1a@w1b) ⊙ (w2a@w2b), CP variant with hada_t1/t2; scale = alpha / w1b.shape[0]."""
from __future__ import annotations

import torch

from .base import ModuleKind, as_float, chain_error, scale_tensor


def _cp(t, b, a):
    return torch.einsum("i j k l, j r, i p -> p r k l", t, b, a)


class LoHaKind(ModuleKind):
    name = "loha"
    label = "LoHa"
    suffixes = {".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b", ".hada_w2_a": "hada_w2_a",
                ".hada_w2_b": "hada_w2_b", ".hada_t1": "hada_t1", ".hada_t2": "hada_t2"}

    @classmethod
    def claims(cls, roles):
        return "hada_w1_a" in roles

    def validate(self, m):
        need = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
        missing = [r for r in need if r not in m.tensors]
        if missing:
            raise chain_error(m, f"LoHa tensors missing: {', '.join(missing)}")
        t = m.tensors
        if "hada_t1" not in t:
            if t["hada_w1_a"].shape[1] != t["hada_w1_b"].shape[0] or t["hada_w2_a"].shape[1] != t["hada_w2_b"].shape[0]:
                raise chain_error(m, "LoHa factors do not chain")
            if (t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1]) != (t["hada_w2_a"].shape[0], t["hada_w2_b"].shape[1]):
                raise chain_error(m, "LoHa products have different shapes")

    def rank(self, m):
        return int(m.tensors["hada_w1_b"].shape[0])

    def _products(self, m, dtype, device):
        t = {k: as_float(v, dtype, device) for k, v in m.tensors.items() if k.startswith("hada_")}
        if "hada_t1" in t:
            return _cp(t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"]), _cp(t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
        return t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]

    def factor_pair(self, m, dtype=torch.float32, device="cpu"):
        """(A1B1)⊙(A2B2) = B@A with B[i,(p,q)] = A1[i,p]·A2[i,q] and A[(p,q),j] = B1[p,j]·B2[q,j] (rank r1·r2)."""
        if "hada_t1" in m.tensors:
            return None
        a1, b1, a2, b2 = (as_float(m.tensors[r], dtype, device) for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        b1, b2 = b1.reshape(b1.shape[0], -1), b2.reshape(b2.shape[0], -1)
        return ((a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1),
                (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1]))

    def weight_shape(self, m):
        t = m.tensors
        if "hada_t1" in t:
            return (t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1]) + tuple(t["hada_t1"].shape[2:])
        return (t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1])

    def delta(self, m, dtype=torch.float32, device="cpu"):
        p1, p2 = self._products(m, dtype, device)
        return self.scale(m) * (p1 * p2)

    def scaled(self, m, factor):
        return {**m.tensors, "hada_w1_a": scale_tensor(m.tensors["hada_w1_a"], factor)}
