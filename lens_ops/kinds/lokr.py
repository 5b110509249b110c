"""LyCORIS LoKr: ΔW = scale · kron(w1, w2), each side whole or a product (w2 optionally Tucker with t2).

scale = alpha / dim where dim is the inner size of the decomposed side (w2's if decomposed, else w1's),
and 1 when neither side is decomposed: exactly ComfyUI's LoKrAdapter.
"""
from __future__ import annotations

import torch

from .base import ModuleKind, as_float, chain_error, scale_tensor, svdvals_tall

ROLES = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


class LoKrKind(ModuleKind):
    name = "lokr"
    label = "LoKr"
    suffixes = {"." + r: r for r in ROLES}

    @classmethod
    def claims(cls, roles):
        return any(r in roles for r in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a"))

    def validate(self, m):
        t = m.tensors
        if "lokr_w1" not in t and not ("lokr_w1_a" in t and "lokr_w1_b" in t):
            raise chain_error(m, "LoKr needs lokr_w1 or lokr_w1_a + lokr_w1_b")
        if "lokr_w2" not in t and not ("lokr_w2_a" in t and "lokr_w2_b" in t):
            raise chain_error(m, "LoKr needs lokr_w2 or lokr_w2_a + lokr_w2_b")
        if "lokr_w1" not in t and t["lokr_w1_a"].shape[1] != t["lokr_w1_b"].shape[0]:
            raise chain_error(m, "lokr_w1_a and lokr_w1_b do not chain")
        if "lokr_w2" not in t and "lokr_t2" not in t and t["lokr_w2_a"].shape[1] != t["lokr_w2_b"].shape[0]:
            raise chain_error(m, "lokr_w2_a and lokr_w2_b do not chain")

    def rank(self, m):
        t = m.tensors
        if "lokr_w2" not in t:
            return int(t["lokr_w2_b"].shape[0])
        if "lokr_w1" not in t:
            return int(t["lokr_w1_b"].shape[0])
        return None

    def _sides(self, m, dtype, device):
        t = {k: as_float(v, dtype, device) for k, v in m.tensors.items() if k.startswith("lokr_")}
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.ndim == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        return w1, w2

    def delta(self, m, dtype=torch.float32, device="cpu"):
        w1, w2 = self._sides(m, dtype, device)
        return self.scale(m) * torch.kron(w1, w2.contiguous())   # a Tucker W2 comes out of einsum strided

    def is_zero(self, m):
        """kron(W1, W2) is zero exactly when a side is: decided on the small sides, without forming ΔW."""
        if self.scale(m) == 0:
            return True
        w1, w2 = self._sides(m, torch.float32, "cpu")
        return not bool(w1.any()) or not bool(w2.any())

    def factor_pair(self, m, dtype=torch.float32, device="cpu"):
        """kron(L1R1, L2R2) = kron(L1, L2) @ kron(R1, R2): each side as its two factors (a whole side as W·I or
        I·W, whichever is thinner), W2 flattened as ComfyUI's 4-D kron implies."""
        t = {k: as_float(v, dtype, device) for k, v in m.tensors.items() if k.startswith("lokr_")}
        if "lokr_t2" in t or ("lokr_w1" in t and t["lokr_w1"].ndim > 2 and t["lokr_w1"].shape[2:].numel() != 1):
            return None
        sides = []
        for i in ("1", "2"):
            if "lokr_w" + i in t:
                w = t["lokr_w" + i]
                w = w.reshape(w.shape[0], -1)
                eye = torch.eye(min(w.shape), dtype=dtype, device=device)
                sides.append((eye, w) if w.shape[0] <= w.shape[1] else (w, eye))
            else:
                b = t[f"lokr_w{i}_b"]
                sides.append((t[f"lokr_w{i}_a"], b.reshape(b.shape[0], -1)))
        (l1, r1), (l2, r2) = sides
        return torch.kron(l1, l2), torch.kron(r1, r2)

    def kron_sides(self, m, dtype=torch.float32, device="cpu"):
        """(W1, W2) as 2-D matrices with the flattened ΔW = scale·kron(W1, W2) (ComfyUI's 4-D kron is
        kron(W1, W2 as [c, d·kh·kw]) when W1 has no spatial size), or None when W1 has one."""
        w1, w2 = self._sides(m, dtype, device)
        if w1.ndim > 2 and w1.shape[2:].numel() != 1:
            return None
        return w1.reshape(w1.shape[0], -1), w2.reshape(w2.shape[0], -1)

    def singular_values(self, m, dtype=torch.float32, device="cpu"):
        """σ(kron(W1, W2)) = σ(W1)⊗σ(W2) (W2 flattened: ComfyUI's 4-D kron is kron(W1, W2 as [c, d·kh·kw])),
        padded with zeros to min(rows, cols) of ΔW, as a dense SVD would give."""
        sides = self.kron_sides(m, dtype, device)
        if sides is None:
            return None
        w1, w2 = sides
        s = (svdvals_tall(w1)[:, None] * svdvals_tall(w2)[None, :]).flatten() * abs(self.scale(m))
        s = s.sort(descending=True).values
        k = min(w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1])
        return torch.cat([s, s.new_zeros(k - s.numel())]) if s.numel() < k else s[:k]

    def weight_shape(self, m):
        t = m.tensors
        s1 = tuple(t["lokr_w1"].shape) if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
        if "lokr_w2" in t:
            s2 = tuple(t["lokr_w2"].shape)
        elif "lokr_t2" in t:
            s2 = (t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1]) + tuple(t["lokr_t2"].shape[2:])
        else:
            s2 = (t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1])
        s1 = s1 + (1,) * (len(s2) - len(s1))
        return tuple(a * b for a, b in zip(s1, s2))

    def scaled(self, m, factor):
        role = "lokr_w1" if "lokr_w1" in m.tensors else "lokr_w1_a"
        return {**m.tensors, role: scale_tensor(m.tensors[role], factor)}
