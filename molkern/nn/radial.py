"""Radial basis of the edge length and the smooth cutoff envelope."""

import math

import torch
from torch import nn


class PolynomialCutoff(nn.Module):
    """Smooth envelope u(r): 1 at r = 0; u, du/dr and d2u/dr2 vanish at r = cutoff (NequIP, DimeNet).

    u(r) = 1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2) for x = r / cutoff < 1, else 0.

    Shapes:
        r: (E,) in Angstrom -> (E,)
    """

    def __init__(self, cutoff: float, p: int = 6):
        super().__init__()
        if cutoff <= 0:
            raise ValueError(f"cutoff must be positive, got {cutoff}")
        self.cutoff = float(cutoff)
        self.p = int(p)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        p = self.p
        x = r / self.cutoff
        u = (
            1.0
            - 0.5 * (p + 1) * (p + 2) * x.pow(p)
            + p * (p + 2) * x.pow(p + 1)
            - 0.5 * p * (p + 1) * x.pow(p + 2)
        )
        return u * (x < 1.0)

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, p={self.p}"


class BesselBasis(nn.Module):
    """Normalised radial Bessel functions j0(n pi r / c) = sin(n pi r / c) / (n pi r / c), n = 1..num_basis.

    The frequencies n pi are trainable. Each function is bounded by 1 (it is 1 at r = 0), so the kernel's
    input stays of order one whatever the cutoff and the distances (DimeNet's sin(n pi x)/x grows like
    n pi as r -> 0, which made fresh networks blow up on graphs with short edges and a long cutoff).

    Shapes:
        r: (E,) in Angstrom -> (E, num_basis)
    """

    def __init__(self, cutoff: float, num_basis: int = 8, trainable: bool = True):
        super().__init__()
        if num_basis < 1:
            raise ValueError(f"num_basis must be >= 1, got {num_basis}")
        self.cutoff = float(cutoff)
        self.num_basis = int(num_basis)
        freqs = math.pi * torch.arange(1, num_basis + 1, dtype=torch.get_default_dtype())
        self.freqs = nn.Parameter(freqs, requires_grad=trainable)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        # sin(x) / x: torch.sinc is not vectorised on CPU (3x slower forward and backward); r >= 1e-6 cutoff keeps
        # x away from 0 (value 1 - O(1e-11), as sinc's)
        x = self.freqs * (r.clamp_min(1e-6 * self.cutoff) / self.cutoff).unsqueeze(-1)  # (E, num_basis)
        return torch.sin(x) / x

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, num_basis={self.num_basis}"
