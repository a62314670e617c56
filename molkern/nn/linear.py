"""e3nn's `o3.Linear` (same parameters, initialisation, state_dict and outputs) in fewer ops for small batches."""

from typing import Dict, Optional, Tuple

import torch
from e3nn import o3

from .block_linear import BlockMatrix, block_matmul, block_matrix
from .constants import cached, parameters_constant
from .fused import extension


def dense_rows_limit(dim_in: int, dim_out: int) -> int:
    """Rows up to which the dense matmul beat e3nn's forward+backward in our measurements (1 thread).

    Gathering and scattering the dense matrix costs ~dim_in dim_out per call, and the matmul dim_in dim_out
    per row against e3nn's ~10-30 ops per path. Measured: dim_in dim_out <= ~7k was faster at 20 to 10,000
    rows (2-3x at 20-352 rows, 1.2-2x at 600-10,000); ~25k was faster or even at 20 rows, even or slower at
    600; >= 83k (32x0e+32x1o+32x2e) was slower at all row counts.
    """
    size = dim_in * dim_out
    if size <= 8192:
        return 1 << 62
    if size <= 32768:
        return 128
    return 0


class Linear(o3.Linear):
    """`o3.Linear` whose forward, for few rows, is one matmul with a dense (irreps_in.dim, irreps_out.dim) matrix.

    e3nn's forward issues a narrow, reshape, einsum and scaling per path and a cat (about 10 + 6 per path
    ATen ops forward and as many backward). The dense matrix has the blocks kron(alpha W_path, I_d) and zeros
    elsewhere; it is gathered from `weight` (and `bias`) with one index_select, so the forward is
    index_select, scale, matmul (plus a cat for biases) and the backward about as many. It costs
    irreps_in.dim x irreps_out.dim multiply-adds per row instead of sum(mul_in mul_out d), so above
    `max_dense_rows` rows (default: `dense_rows_limit`), or whenever the dense path does not apply (weights
    passed to forward, f_in/f_out, shared_weights=False, repeated paths), it runs e3nn's own forward.
    Within `molkern.nn.constant_parameters` the matrix is cached as its dense blocks (`constant_matrix`), so the
    forward is one C++ pass with e3nn's multiply-adds, at any row count; without the C++ extension it is one
    dense matmul, up to `max_constant_rows` rows (2^24 / (irreps_in.dim x irreps_out.dim): ~200 rows at lmax 2
    and 32 channels).

    A subclass of `o3.Linear`: isinstance checks, parameters, buffers and state_dict keys are e3nn's.

    Args: as `o3.Linear`, plus
        max_dense_rows: rows (product of the batch dimensions) up to which the dense matmul is used
            (None: `dense_rows_limit(irreps_in.dim, irreps_out.dim)`; 0: never).

    Shapes:
        features: (..., irreps_in.dim) -> (..., irreps_out.dim)
    """

    def __init__(self, irreps_in, irreps_out, *, max_dense_rows: Optional[int] = None, **kwargs):
        super().__init__(irreps_in, irreps_out, **kwargs)
        dim_in, dim_out = self.irreps_in.dim, self.irreps_out.dim
        paths = [ins for ins in self.instructions if ins.i_in != -1 and 0 not in ins.path_shape]
        pairs = [(ins.i_in, ins.i_out) for ins in paths]
        self._dense_ok = (
            kwargs.get("f_in") is None
            and kwargs.get("f_out") is None
            and self.internal_weights
            and self.shared_weights
            and len(set(pairs)) == len(pairs)
            and self.weight_numel > 0
            and dim_out > 0
        )
        if max_dense_rows is None:  # measured (1 thread): see dense_rows_limit
            max_dense_rows = dense_rows_limit(dim_in, dim_out)
        self.max_dense_rows = int(max_dense_rows)
        # with the matrix cached (constant_parameters) only the matmul is left; measured (1 thread, forward and
        # input gradient): faster than e3nn up to ~500 rows at 288 x 288, ~300 at 288 x 352, ~50 at 576 x 576
        self.max_constant_rows = (1 << 24) // max(dim_in * dim_out, 1)
        if not self._dense_ok:
            return
        # flat parameter vector p = cat([weight, bias]); dense matrix (dim_in + 1, dim_out) = p[index] * scale,
        # its last row the bias row (added by addmm)
        num_w, num_b = self.weight_numel, self.bias_numel
        index = torch.zeros(dim_in + 1, dim_out, dtype=torch.long)  # entries outside the blocks: any, scale 0
        scale = torch.zeros(dim_in + 1, dim_out, dtype=torch.float64)
        slices_in, slices_out = self.irreps_in.slices(), self.irreps_out.slices()
        offset = 0
        for ins in self.instructions:
            if ins.i_in == -1:
                continue
            mul_in, mul_out = ins.path_shape
            d = self.irreps_in[ins.i_in].ir.dim
            w = offset + torch.arange(mul_in * mul_out).view(mul_in, mul_out)  # (u, w) -> weight entry
            offset += mul_in * mul_out
            if 0 in ins.path_shape:
                continue
            rows = slices_in[ins.i_in].start + torch.arange(mul_in).view(mul_in, 1, 1) * d + torch.arange(d).view(1, 1, d)
            cols = slices_out[ins.i_out].start + torch.arange(mul_out).view(1, mul_out, 1) * d + torch.arange(d).view(1, 1, d)
            rows, cols = torch.broadcast_tensors(rows, cols)  # (u, w, i): row u*d+i, column w*d+i
            index[rows, cols] = w.unsqueeze(-1).expand(mul_in, mul_out, d)
            scale[rows, cols] = ins.path_weight
        offset_b = num_w
        for ins in self.instructions:
            if ins.i_in != -1:
                continue
            sl = slices_out[ins.i_out]
            index[dim_in, sl] = offset_b + torch.arange(sl.stop - sl.start)
            scale[dim_in, sl] = ins.path_weight
            offset_b += sl.stop - sl.start
        self._has_bias = num_b > 0
        rows = dim_in + 1 if self._has_bias else dim_in
        self._index = index[:rows].flatten()  # (rows * dim_out,)
        self._scale64 = scale[:rows]
        self._constants: Dict[Tuple[torch.dtype, torch.device], Tuple[torch.Tensor, torch.Tensor]] = {}

    def _get(self, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        key = (like.dtype, like.device)
        if key not in self._constants:
            self._constants[key] = (self._index.to(like.device), self._scale64.to(like.device, like.dtype))
        return self._constants[key]

    def dense_matrix(self) -> torch.Tensor:
        """(irreps_in.dim [+ 1 bias row], irreps_out.dim) matrix M: forward = features @ M[:dim_in] (+ M[dim_in])."""
        index, scale = self._get(self.weight)
        params = torch.cat([self.weight, self.bias]) if self._has_bias else self.weight
        return params.index_select(0, index).view(scale.shape) * scale

    def forward(self, features, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None):
        rows = features.numel() // max(self.irreps_in.dim, 1)
        if not self._dense_ok or weight is not None or bias is not None:
            return super().forward(features, weight, bias)
        batch = features.shape[:-1]
        if features.dim() != 2:  # (rows, irreps_in.dim): no view operations (each one a node in the backward)
            features = features.reshape(-1, self.irreps_in.dim)
        if parameters_constant() and self.constant_rows_ok(rows):
            matrix = cached(self, "dense_matrix", (self.weight, self.bias), self.constant_matrix)
            out = block_matmul(features, matrix)
        elif rows > self.max_dense_rows:
            out = super().forward(features, weight, bias)
        else:
            out = apply_dense(features, self.dense_matrix())
        return out if len(batch) == 1 else out.view(*batch, self.irreps_out.dim)

    def constant_rows_ok(self, rows: int) -> bool:
        """Whether the cached `constant_matrix` is the faster forward for this many rows (constant parameters):
        always with the C++ extension (its blocks cost e3nn's multiply-adds), else up to `max_constant_rows`."""
        return self._dense_ok and (extension() is not None or rows <= self.max_constant_rows)

    def constant_matrix(self, matrix: Optional[torch.Tensor] = None) -> BlockMatrix:
        """`dense_matrix()` (or matrix, laid out as it) as a `BlockMatrix` for `block_matmul`."""
        matrix = self.dense_matrix() if matrix is None else matrix
        dim_in = matrix.shape[0] - 1 if self._has_bias else matrix.shape[0]
        return block_matrix(matrix[:dim_in], matrix[dim_in] if self._has_bias else None)


def apply_dense(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """x @ matrix, or x @ matrix[:-1] + matrix[-1] when matrix has one row more than x has columns (a bias row,
    as `Linear.dense_matrix` gives). Shapes: x (R, D_in), matrix (D_in [+ 1], D_out) -> (R, D_out)"""
    if matrix.shape[0] == x.shape[1]:
        return x @ matrix
    return torch.addmm(matrix[-1], x, matrix[:-1])
