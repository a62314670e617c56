"""Equivariant MLP: e3nn Linear layers alternated with gated nonlinearities (optional e3nn BatchNorm)."""

from typing import Iterable, List, Optional, Tuple

import torch
from e3nn import nn as enn
from e3nn import o3
from e3nn.math import normalize2mom
from torch import nn

from .channelwise import permute_columns
from .constants import parameters_constant
from .eager import eager_e3nn
from .fused import extension
from .linear import Linear


class BatchNorm(enn.BatchNorm):
    """e3nn's equivariant BatchNorm that also takes zero rows (the edges of a structure without any pair within
    the cutoff, e.g. a lone atom) and returns them unchanged (e3nn's reshape fails on them).

    Shapes: (R, irreps.dim) -> (R, irreps.dim)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.shape[0] == 0 else super().forward(x)


def irreps_up_to(mul: int, lmax: int, parity: str = "both") -> o3.Irreps:
    """`mul` copies of every irrep with l <= lmax.

    Args:
        parity: "both" (0e, 0o, 1o, 1e, ...) or "natural" (0e, 1o, 2e, ...: parity (-1)^l).
    """
    if parity not in ("both", "natural"):
        raise ValueError(f"parity must be 'both' or 'natural', got {parity!r}")
    out = []
    for l in range(lmax + 1):
        natural = (-1) ** l
        out.append((mul, (l, natural)))
        if parity == "both":
            out.append((mul, (l, -natural)))
    return o3.Irreps(out)


def filter_irreps(irreps: o3.Irreps, keep: Iterable[o3.Irrep]) -> o3.Irreps:
    """The entries of `irreps` whose irrep is in `keep` (order kept)."""
    keep = set(o3.Irrep(ir) for ir in keep)
    return o3.Irreps([(mul, ir) for mul, ir in o3.Irreps(irreps) if ir in keep])


def reachable_irreps(irreps_in: o3.Irreps) -> List[o3.Irrep]:
    """Irrep types an EquivariantMLP fed `irreps_in` can output non-zero: those of its input, and 0e (biases).

    Linear layers and gates never change an irrep's type, so e.g. an O(3) kernel MLP fed only harmonics of
    x (natural parity) has identically zero 1e, 2o, ... outputs: leaving them out is exact, not a restriction.
    """
    return sorted({ir for _, ir in o3.Irreps(irreps_in)} | {o3.Irrep("0e")})


# With constant parameters, a gate on up to this many entries (rows x columns) runs as one C++ autograd node (plain
# loops; molkern/csrc/constant_functions.cpp); beyond, ATen's vectorised exp is faster than its one exp at a time.
GATE_LOOP_ENTRIES = 1 << 15


class Gate(nn.Module):
    """e3nn's gated nonlinearity (same layout, activations and values) in a handful of tensor operations.

    e3nn's `Gate` extracts its three parts with per-block slices and multiplies with an
    ElementwiseTensorProduct; here one optional column permutation, one split, the two activations, one gather
    of each gated column's gate and one product.

    Shapes:
        x: (B, irreps_in.dim) laid out as irreps_in (sorted: scalars and gates first) -> (B, irreps_out.dim)
    """

    def __init__(self, gate: enn.Gate):
        super().__init__()
        self.irreps_in, self.irreps_out = gate.irreps_in, gate.irreps_out
        self.act_scalars, self.act_gates = gate.act_scalars, gate.act_gates  # e3nn's normalised activations
        extract = gate.sc.cut  # Extract: input entries (sorted irreps) of scalars, gates and gated
        slices = extract.irreps_in.slices()
        columns = [c for part in extract.instructions for k in part for c in range(slices[k].start, slices[k].stop)]
        self.register_buffer("_columns", torch.tensor(columns, dtype=torch.long), persistent=False)
        self.register_buffer("_inverse", torch.argsort(self._columns), persistent=False)
        self._permute = columns != list(range(len(columns)))
        self._sizes = [irreps.dim for irreps in extract.irreps_outs]  # scalars, gates, gated
        self._gated = [(mul, ir.dim) for mul, ir in extract.irreps_outs[2]]
        gate_of_column = torch.arange(sum(mul for mul, _ in self._gated)).repeat_interleave(
            torch.tensor([d for mul, d in self._gated for _ in range(mul)], dtype=torch.long))
        self.register_buffer("_gate_of_column", gate_of_column, persistent=False)  # gate of each gated column
        self._scalar_function = _single_function(self.act_scalars)
        self._gate_function = _single_function(self.act_gates)
        # for constant parameters: the activations by name and constant, for the gate as one C++ autograd node
        self._named = _named(self._scalar_function), (_named(self._gate_function) if self._gated else ("tanh", 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._permute:
            x = permute_columns(x, self._columns, self._inverse)
        ext = extension() if (None not in self._named and x.dim() == 2 and x.numel() <= GATE_LOOP_ENTRIES
                              and parameters_constant()) else None
        if ext is not None:
            return ext.gate(x, self._gate_of_column, *self._sizes[:2], *self._named[0], *self._named[1])
        scalars, gates, gated = torch.split(x, self._sizes, dim=-1)
        scalars = _activate(self.act_scalars, self._scalar_function, scalars)
        if not self._gated:
            return scalars
        gates = _activate(self.act_gates, self._gate_function, gates)
        gates = gates.index_select(-1, self._gate_of_column)  # (B, gated dim)
        return torch.cat([scalars, gated * gates], dim=-1)


def _single_function(activation: enn.Activation):
    """(f, c) when e3nn's Activation applies one normalised function c f(x) to all its columns, else None."""
    if len(activation.paths) != 1 or activation.paths[0][2] is None:
        return None
    act = activation.paths[0][2]
    if not isinstance(act, normalize2mom):
        return None
    return act.f, (1.0 if act._is_id else act.cst)


_NAMED = {torch.nn.functional.silu: "silu", torch.sigmoid: "sigmoid", torch.tanh: "tanh"}


def _named(function) -> Optional[Tuple[str, float]]:
    """(name, c) of a `_single_function` (f, c) that the extension's gate computes, else None."""
    if function is None or function[0] not in _NAMED:
        return None
    return _NAMED[function[0]], float(function[1])


def _activate(activation: enn.Activation, function, x: torch.Tensor) -> torch.Tensor:
    """activation(x), called directly as c f(x) when it is one normalised function (two ops, no module calls)."""
    if function is None:
        return activation(x)
    f, c = function
    return f(x) if c == 1.0 else f(x) * c


def make_gate(irreps_out: o3.Irreps) -> Gate:
    """Gate whose output irreps are `irreps_out` (scalars first, in its own order).

    Even scalars use SiLU, odd scalars tanh (odd, so 0o stays 0o); every l > 0 channel is multiplied
    by sigmoid of its own extra 0e gate. Feed the gate tensors laid out as `gate.irreps_in` (e3nn sorts it).
    """
    irreps_out = o3.Irreps(irreps_out).simplify()
    scalars = o3.Irreps([(mul, ir) for mul, ir in irreps_out if ir.l == 0])
    gated = o3.Irreps([(mul, ir) for mul, ir in irreps_out if ir.l > 0])
    acts = [torch.nn.functional.silu if ir.p == 1 else torch.tanh for _, ir in scalars]
    gates = o3.Irreps(f"{gated.num_irreps}x0e") if gated.num_irreps > 0 else o3.Irreps("")
    return Gate(enn.Gate(scalars, acts, gates, [torch.sigmoid] if gated.num_irreps > 0 else [], gated))


class EquivariantMLP(nn.Module):
    """O(3)-equivariant MLP: [Linear -> Gate (-> BatchNorm)] x num_layers -> Linear.

    Fed constant reference tensors among its inputs, it is equivariant to their stabiliser G.
    With irreps_out=None the final Linear is left out (a trunk whose output is the last hidden layer).

    Shapes:
        x: (B, irreps_in.dim) -> (B, irreps_out.dim)
    """

    @eager_e3nn
    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_hidden: o3.Irreps,
        irreps_out: Optional[o3.Irreps],
        num_layers: int = 2,
        batch_norm: bool = False,
    ):
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        layers = []
        irreps = self.irreps_in
        for _ in range(num_layers):
            gate = make_gate(irreps_hidden)
            layers += [Linear(irreps, gate.irreps_in, biases=True), gate]
            if batch_norm:
                layers.append(BatchNorm(gate.irreps_out))
            irreps = gate.irreps_out
        if irreps_out is not None:
            layers.append(Linear(irreps, irreps_out, biases=True))
            irreps = o3.Irreps(irreps_out)
        self.irreps_out = irreps
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class InvariantWeightedLinear(nn.Module):
    """Equivariant layer whose weights are functions of the invariants: out_l = sum_k w_k(s) V_{l,k}.

    The input's 0e block s (invariants) gives, by one affine map, every weight at once: the 0e outputs
    themselves and, for each output irrep of type l, the coefficients of the input vectors V_{l,k} of that
    type. Gated e3nn MLPs compute functions of exactly this class (linear layers and gates never form
    products of non-scalars), so a scalar MLP followed by this layer is an equivariant MLP; it costs one
    matmul plus one small product per irrep type, on whatever many rows.

    Args:
        irreps_in: each irrep type at most once; must contain 0e (the invariants).
        irreps_out: 0e blocks and blocks of types present in irreps_in.

    Attributes (the layout of `weight`'s columns, for layers that share its parameters):
        scalar_index: index of the 0e block in irreps_in.
        blocks: per output block, (input block of its vectors or None for 0e, mul_out, K vectors, irrep dim).
        widths: weight columns per output block (mul_out K), in order.

    Shapes:
        x: (B, irreps_in.dim) -> (B, irreps_out.dim)
    """

    def __init__(self, irreps_in: o3.Irreps, irreps_out: o3.Irreps):
        super().__init__()
        self.irreps_in, self.irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
        types = [ir for _, ir in self.irreps_in]
        if len(set(types)) != len(types) or o3.Irrep("0e") not in types:
            raise ValueError(f"irreps_in must hold each irrep type at most once, 0e included; got {self.irreps_in}")
        scalar = types.index(o3.Irrep("0e"))
        self._in_sizes = [mul_ir.dim for mul_ir in self.irreps_in]
        self.scalar_index, num_scalars = scalar, self.irreps_in[scalar].mul
        vectors = {ir: (i, mul) for i, (mul, ir) in enumerate(self.irreps_in) if ir != o3.Irrep("0e")}
        self.blocks = []  # per output block: (input block or None for 0e, mul_out, K, d)
        for mul, ir in self.irreps_out:
            if ir == o3.Irrep("0e"):
                self.blocks.append((None, mul, 1, 1))
            elif ir in vectors:
                i, k = vectors[ir]
                self.blocks.append((i, mul, k, ir.dim))
            else:
                raise ValueError(f"irreps_out {self.irreps_out} has {ir}, which {self.irreps_in} does not contain")
        self.widths = [mul * k for _, mul, k, _ in self.blocks]
        # e3nn's parametrisation: unit-normal weights, 1 / sqrt(fan-in) in the forward pass (fan-in S K)
        self.weight = nn.Parameter(torch.randn(num_scalars, sum(self.widths)))
        self.bias = nn.Parameter(torch.zeros(sum(self.widths)))
        scale = [(num_scalars * k) ** -0.5 for _, mul, k, _ in self.blocks for _ in range(mul * k)]
        self.register_buffer("_scale", torch.tensor(scale), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self._in_sizes, dim=-1)
        rows = x.shape[0]
        weights = torch.addmm(self.bias, parts[self.scalar_index], self.weight * self._scale)  # (B, sum widths)
        out = []
        for w, (i, mul, k, d) in zip(torch.split(weights, self.widths, dim=-1), self.blocks):
            if i is None:
                out.append(w)
            elif k == 1:  # (B, mul, 1) x (B, 1, d)
                out.append((w.unsqueeze(-1) * parts[i].unsqueeze(1)).reshape(rows, mul * d))
            else:  # (B, mul, K) @ (B, K, d)
                out.append(torch.bmm(w.view(rows, mul, k), parts[i].view(rows, k, d)).view(rows, mul * d))
        return torch.cat(out, dim=-1) if len(out) > 1 else out[0]

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.irreps_out}"
