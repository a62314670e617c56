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
    """Radial Bessel functions sin(n pi r / c) / (r / c) / sqrt(3/2), n = 1..num_basis, trainable frequencies.

    The factor makes each function's second moment 1 for points uniform in the ball of radius c.

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
        x = r.unsqueeze(-1) / self.cutoff  # (E, 1)
        # sin(f x) / x is smooth at x = 0 (limit f); clamp avoids 0/0 for coincident points
        x_safe = x.clamp_min(1e-9)
        return torch.sin(self.freqs * x_safe) / (x_safe * math.sqrt(1.5))  # (E, num_basis)

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, num_basis={self.num_basis}"
