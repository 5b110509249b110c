"""What every module kind shares: the role table it claims and the exact ΔW contract.

A kind turns a module's tensors into its weight change ΔW exactly the way ComfyUI's
`comfy/weight_adapter/` applies it (tensors cast to float, multiplied by `scale`, where scale is
alpha / dim with kind-specific dim, or 1 without alpha). Kinds whose change depends on the base
weight (GLoRA, OFT, BOFT) or replaces it (`set_weight`) have no stand-alone ΔW and say so.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import LensError

if TYPE_CHECKING:  # pragma: no cover
    from ..model import LoRAModule


def as_float(t: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """Cast like ComfyUI does before any LoRA maths (int8/fp8 tensors become their integer/float values)."""
    return t.to(device=device, dtype=dtype)


class ModuleKind:
    """One kind of LoRA module. Subclasses set `name`, `label`, `suffixes` (key suffix -> role)."""

    name = "unknown"
    label = "unknown"
    suffixes: dict[str, str] = {}
    needs_base_weight = False

    @classmethod
    def claims(cls, roles: dict[str, torch.Tensor]) -> bool:
        """True when a module with these roles is of this kind."""
        return False

    def validate(self, m: "LoRAModule") -> None:
        """Raise LensError when the tensors cannot form this kind's ΔW (shapes that do not chain)."""

    def rank(self, m: "LoRAModule") -> int | None:
        return None

    def scale(self, m: "LoRAModule") -> float:
        """ComfyUI's multiplier on the raw product: alpha / dim, or 1 without alpha (or without dim)."""
        r = self.rank(m)
        return m.alpha / r if (m.alpha is not None and r) else 1.0

    def weight_shape(self, m: "LoRAModule") -> tuple[int, ...] | None:
        return None

    def lowrank(self, m: "LoRAModule", dtype=torch.float32, device="cpu"):
        """(B, A) with ΔW = scale·B@A (A flattened to 2-D), or None for kinds that are not a product."""
        return None

    def delta(self, m: "LoRAModule", dtype=torch.float32, device="cpu") -> torch.Tensor | None:
        """Dense ΔW (scale applied), or None when the kind has no stand-alone ΔW."""
        return None

    def factor_pair(self, m: "LoRAModule", dtype=torch.float32, device="cpu"):
        """(B, A) with the flattened ΔW = scale·B@A exactly, for kinds that are not a plain product but have an
        exact low-rank form (LoKr, LoHa), or None."""
        return None

    def singular_values(self, m: "LoRAModule", dtype=torch.float32, device="cpu") -> torch.Tensor | None:
        """Exact singular values of the flattened ΔW from the kind's structure, or None (then: dense SVD)."""
        return None

    def is_zero(self, m: "LoRAModule") -> bool:
        """True when the module changes nothing (an untrained module)."""
        d = self.delta(m)
        return d is not None and not bool(d.any())

    def scaled(self, m: "LoRAModule", factor: float) -> dict[str, torch.Tensor]:
        """Tensors whose ΔW is factor·ΔW (kinds are linear in one factor); raise if impossible."""
        raise LensError(f"Module {m.name} ({self.label}) cannot be rescaled exactly.")

    def describe(self, m: "LoRAModule") -> str:
        return self.label


def svdvals_tall(x: torch.Tensor) -> torch.Tensor:
    """σ of a 2-D matrix, decomposed on its tall side (LAPACK is many times slower on the wide one)."""
    return torch.linalg.svdvals(x if x.shape[0] >= x.shape[1] else x.transpose(0, 1))


def chain_error(m: "LoRAModule", what: str) -> LensError:
    return LensError(f"Module {m.name}: {what}; the file is damaged or not a LoRA of this kind.")


def scale_tensor(t: torch.Tensor, factor: float) -> torch.Tensor:
    """Multiply in float32 and return in the tensor's own dtype."""
    work = torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32
    return (t.to(work) * factor).to(t.dtype)
