"""Useful tensor-product FLOPs of a molkern convolution (counted analytically) and this machine's matmul peak.

Useful FLOPs per edge, for each path (l1 x l2 -> l3) of the convolution's product, counting a multiply-add as
2 FLOPs and only the non-zero Clebsch-Gordan coefficients (nnz of e3nn's wigner_3j):
    channel-wise ("uvu", per-edge path weights; ChannelwiseProduct or e3nn "uvu"): mul1 * mul2 * (2 nnz + d3)
    fully connected ("uvw", shared weights): 2 nnz mul1 mul2 + 2 mul1 mul2 mul_out d3 (CG first, then weights)
    depthwise (DepthwiseProduct): heads * 2 nnz to build the kernel matrices, plus 2 mul d1 d3 per connected
    (input, output) irrep pair to apply them to the mul channels
plus one add per output component for the scatter-sum (E * irreps_out.dim). The kernel's MLP / radial network,
the gather and the node-side linears are not counted: this is the product a dense d_out x d_in kernel would do.
"""

import time
from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def cg_nnz(l1: int, l2: int, l3: int) -> int:
    from e3nn import o3

    return int((o3.wigner_3j(l1, l2, l3, dtype=torch.float64).abs() > 1e-12).sum())


def product_flops_per_edge(tp) -> float:
    """Useful FLOPs per edge of a ChannelwiseProduct or an e3nn TensorProduct (see the module docstring)."""
    if hasattr(tp, "kernel_matrices"):  # DepthwiseProduct: (i_in, i_out, irrep of the coefficients) per path
        build = sum(2 * cg_nnz(tp.irreps_in[i].ir.l, ir.l, tp.irreps_out[o].ir.l) for i, o, ir in tp.paths)
        blocks = {(i, o) for i, o, _ in tp.paths}
        apply = sum(2 * tp.irreps_in[i].mul * tp.irreps_in[i].ir.dim * tp.irreps_out[o].ir.dim for i, o in blocks)
        return tp.heads * build + apply
    total = 0.0
    for ins in tp.instructions:
        if hasattr(ins, "connection_mode"):  # e3nn Instruction
            m1, m2 = tp.irreps_in1[ins.i_in1], tp.irreps_in2[ins.i_in2]
            mo = tp.irreps_out[ins.i_out]
            nnz, d3 = cg_nnz(m1.ir.l, m2.ir.l, mo.ir.l), mo.ir.dim
            if ins.connection_mode == "uvu":
                total += m1.mul * m2.mul * (2 * nnz + (d3 if ins.has_weight else 0))
            elif ins.connection_mode == "uvw":
                total += 2 * nnz * m1.mul * m2.mul + 2 * m1.mul * m2.mul * mo.mul * d3
            else:
                raise ValueError(f"no FLOP count for connection mode {ins.connection_mode!r}")
        else:  # ChannelwiseProduct: (i_in, j_angular, i_out, coefficient), "uvu" with per-edge path weights
            i, j, i_out = ins[0], ins[1], ins[2]
            m1, m2, mo = tp.irreps_in[i], tp.irreps_angular[j], tp.irreps_out[i_out]
            total += m1.mul * m2.mul * (2 * cg_nnz(m1.ir.l, m2.ir.l, mo.ir.l) + mo.ir.dim)
    return total


def conv_flops(conv, num_edges: int) -> float:
    """Useful FLOPs of one SteerableConv call on ``num_edges`` edges (product + scatter-sum)."""
    return num_edges * (product_flops_per_edge(conv.kernel.tp) + conv.irreps_out.dim)


def matmul_peak(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of an fp32 (n x n) @ (n x n) torch.mm with ``threads`` threads (2 n^3 FLOPs a call)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        torch.mm(a, b, out=out)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - t0)
        return 2 * n**3 / best / 1e9
    finally:
        torch.set_num_threads(before)
