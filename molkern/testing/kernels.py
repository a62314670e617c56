"""Kernel checks: Lemma 1 on the materialised kernel, and a slow reference of the full implicit kernel."""

from typing import Optional

import torch
from e3nn import o3

from ..groups import representation
from ..nn.edges import EdgeEmbedding
from ..nn.kernels import ImplicitKernel, kernel_matrix


def full_kernel_reference(kernel: ImplicitKernel, edges) -> torch.Tensor:
    """The paper's construction, written out: vec(k) from the MLP output h by Clebsch-Gordan coefficients.

    k(x)[(w,k), (u,i)] = sum_paths c_path sum_{v,j} W_path[u,v,w] C^{l_u l_v l_w}[i,j,k] h[v,j](x) u(|x|),
    with h the MLP output and u the cutoff envelope.

    Returns:
        (E, d_out, d_in) kernel matrices. Slow and memory hungry: tests on small irreps only.
    """
    if kernel.form != "full":
        raise ValueError("the reference is for the full kernel form")
    tp = kernel.tp
    h = kernel.mlp(edges.kernel_in) * edges.envelope  # (E, irreps_h.dim)
    num_edges = h.shape[0]
    K = h.new_zeros(num_edges, tp.irreps_out.dim, tp.irreps_in1.dim)
    weights = torch.split(tp.weight, [ins.path_shape[0] * ins.path_shape[1] * ins.path_shape[2]
                                      for ins in tp.instructions])
    in_slices, h_slices, out_slices = tp.irreps_in1.slices(), tp.irreps_in2.slices(), tp.irreps_out.slices()
    for ins, w in zip(tp.instructions, weights):
        (mul1, ir1), (mul2, ir2), (mul3, ir3) = tp.irreps_in1[ins.i_in1], tp.irreps_in2[ins.i_in2], tp.irreps_out[ins.i_out]
        C = o3.wigner_3j(ir1.l, ir2.l, ir3.l, dtype=h.dtype)  # (d1, d2, d3)
        w = w.view(mul1, mul2, mul3).to(h.dtype)
        h_block = h[:, h_slices[ins.i_in2]].view(num_edges, mul2, ir2.dim)  # (E, mul2, d2)
        block = ins.path_weight * torch.einsum("uvw,ijk,evj->ewkui", w, C, h_block)  # (E, mul3, d3, mul1, d1)
        K[:, out_slices[ins.i_out], in_slices[ins.i_in1]] += block.reshape(num_edges, mul3 * ir3.dim, mul1 * ir1.dim)
    return K


def kernel_steerability_error(
    kernel,
    edge_embedding: EdgeEmbedding,
    rotations: torch.Tensor,
    edge_vec: torch.Tensor,
    edge_attrs: Optional[torch.Tensor] = None,
    node_attrs: Optional[torch.Tensor] = None,
    edge_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Relative error of Lemma 1, k(g.x, rho_z(g) z) = rho_out(g) k(x, z) rho_in(g)^-1, for each g.

    Modules should be in eval mode (batch norm then uses fixed statistics).

    Shapes:
        rotations: (n, 3, 3), edge_vec: (E, 3), edge_attrs: (E, irreps_edge_attr.dim),
        node_attrs: (N, irreps_node_attr.dim), edge_index: (2, E) -> (n,)
    """

    def rotate(x, irreps, R):
        return None if x is None else x @ representation(irreps, R).to(x.dtype).T

    K = kernel_matrix(kernel, edge_embedding(edge_vec, edge_attrs, node_attrs, edge_index))  # (E, d_out, d_in)
    scale = K.abs().max().clamp_min(1e-12)
    errors = []
    for R in rotations:
        R = R.to(edge_vec.dtype)
        edges_g = edge_embedding(
            edge_vec @ R.T,
            rotate(edge_attrs, edge_embedding.irreps_edge_attr, R),
            rotate(node_attrs, edge_embedding.irreps_node_attr, R),
            edge_index,
        )
        K_g = kernel_matrix(kernel, edges_g)
        D_in = representation(kernel.irreps_in, R).to(edge_vec.dtype)
        D_out = representation(kernel.irreps_out, R).to(edge_vec.dtype)
        errors.append(float((K_g - D_out @ K @ D_in.T).abs().max().detach() / scale.detach()))
    return torch.tensor(errors, dtype=torch.float64)
