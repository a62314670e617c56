"""Products with a constant matrix that is mostly zeros, as its dense blocks (constant parameters).

An equivariant linear map between irreps of C channels is block diagonal: at lmax 2 and 32 channels, 9 blocks of
32 x 32 in a 288 x 288 matrix (1/9 of its entries), and so it stays when column permutations are folded into it
(molkern.nn.interaction). A dense matmul does 9x the multiply-adds; e3nn's per-irrep form a dozen operations per
irrep, forward and again backward. `BlockMatrix` groups the matrix's columns by the rows they read (the nonzero
pattern) and `block_matmul` runs x @ M as one C++ pass over those blocks (molkern.nn.fused's extension); its
gradient is the same pass with the transposed blocks, so derivatives of any order stay one pass each. Without
the extension (or for a matrix that is mostly nonzero) it is the plain matmul.

Only for constant matrices (`molkern.nn.constants.cached`): no gradient flows to the matrix.
"""

from typing import NamedTuple, Optional

import torch

from .fused import extension


class BlockPlan(NamedTuple):
    """x (N, in_dim) @ M as blocks: block g reads x[:, rows[r0 : r0 + R]] and adds its product with the (R, C)
    row-major matrix weights[w0 : w0 + R C] into out[:, cols[c0 : c0 + C]]; groups (G, 5) int64 rows
    (r0, R, c0, C, w0)."""

    groups: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    weights: torch.Tensor
    in_dim: int
    out_dim: int


def block_plan(matrix: torch.Tensor) -> BlockPlan:
    """The blocks of matrix (D_in, D_out): its columns grouped by their nonzero rows (every nonzero entry is in
    exactly one block; all-zero columns in none)."""
    nonzero = matrix != 0
    patterns, group_of_column = torch.unique(nonzero.t(), dim=0, return_inverse=True)
    groups, rows, cols, weights = [], [], [], []
    r0 = c0 = w0 = 0
    for g, pattern in enumerate(patterns):
        r = pattern.nonzero().flatten()
        if r.numel() == 0:
            continue
        c = (group_of_column == g).nonzero().flatten()
        groups.append([r0, r.numel(), c0, c.numel(), w0])
        rows.append(r)
        cols.append(c)
        weights.append(matrix[r][:, c].flatten())
        r0, c0, w0 = r0 + r.numel(), c0 + c.numel(), w0 + r.numel() * c.numel()
    empty = torch.zeros(0, dtype=torch.long, device=matrix.device)
    return BlockPlan(torch.tensor(groups, dtype=torch.long, device=matrix.device).view(-1, 5),
                     torch.cat(rows) if rows else empty, torch.cat(cols) if cols else empty,
                     torch.cat(weights) if weights else matrix.new_zeros(0), *matrix.shape)


class BlockMatrix(NamedTuple):
    """A constant (D_in, D_out) matrix and optional bias (D_out,) for `block_matmul`: the blocks of the matrix and
    of its transpose (the gradient), or, where the C++ extension is missing or the matrix is mostly nonzero, None
    (then the dense matrix is used). With blocks, no bias is an empty tensor (the C++ pass's argument)."""

    dense: torch.Tensor
    bias: Optional[torch.Tensor]
    plan: Optional[BlockPlan]
    adjoint: Optional[BlockPlan]


def block_matrix(matrix: torch.Tensor, bias: Optional[torch.Tensor] = None, max_density: float = 0.5) -> BlockMatrix:
    """`BlockMatrix` of matrix (D_in, D_out) and bias (D_out,) or None; blocks only where at most max_density of
    the entries are nonzero and the C++ extension is available."""
    matrix = matrix.detach().contiguous()
    bias = None if bias is None else bias.detach().contiguous()
    if extension() is None or (matrix != 0).float().mean() > max_density:
        return BlockMatrix(matrix, bias, None, None)
    return BlockMatrix(matrix, matrix.new_zeros(0) if bias is None else bias, block_plan(matrix),
                       block_plan(matrix.t()))


def block_matmul(x: torch.Tensor, m: BlockMatrix) -> torch.Tensor:
    """x @ m.dense (+ m.bias): x (R, D_in) -> (R, D_out)."""
    if m.plan is None:
        return x @ m.dense if m.bias is None else torch.addmm(m.bias, x, m.dense)
    if x.shape[-1] != m.plan.in_dim:
        raise ValueError(f"x has {x.shape[-1]} columns, the matrix {m.plan.in_dim} rows")
    # a C++ autograd function: its gradient is the same pass with the transposed blocks (m.adjoint)
    return extension().block_linear(x.contiguous(), m.bias, *m.plan[:4], *m.adjoint[:4], m.plan.out_dim)
