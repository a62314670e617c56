"""The fused channel-wise product is e3nn's uvu TensorProduct: same values and gradients, any irreps."""

import pytest
import torch
from e3nn import o3

from molkern.nn import ChannelwiseProduct, EdgeEmbedding, SteerableConv, StandardKernel, channelwise_tensor_product

CASES = [
    ("8x0e+8x1o+8x2e", "0e+1o+2e+3o+4e", "8x0e+8x1o+8x2e"),  # lmax 2 features, the implicit band
    ("3x0e+2x0o+3x1o+2x1e+2x2o+1x3o", "0e+1o+1e+2e+2o+3o", "0e+0o+1o+1e+2e+2o"),  # every parity, l = 3 input
    ("5x0e", "0e+1o+2e", "0e+1o"),  # scalars only: every path has l1 = 0
]


@pytest.mark.parametrize("irreps_in, irreps_angular, irreps_out", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_product_equals_e3nn(irreps_in, irreps_angular, irreps_out, dtype):
    torch.manual_seed(0)
    irreps = [o3.Irreps(irreps_in), o3.Irreps(irreps_angular), o3.Irreps(irreps_out)]
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # both build their Clebsch-Gordan constants in the default dtype
    try:
        reference, fused = channelwise_tensor_product(*irreps), ChannelwiseProduct(*irreps)
    finally:
        torch.set_default_dtype(default)
    assert fused.irreps_out == reference.irreps_out and fused.weight_numel == reference.weight_numel
    num_edges = 37
    x = o3.Irreps(irreps_in).randn(num_edges, -1, dtype=dtype).requires_grad_(True)
    a = o3.Irreps(irreps_angular).randn(num_edges, -1, dtype=dtype).requires_grad_(True)
    w = torch.randn(num_edges, reference.weight_numel, dtype=dtype).requires_grad_(True)
    w_fused = torch.empty_like(w).index_copy(1, fused.e3nn_weight_order, w)  # the same weights in our order
    out_ref = reference(x, a, w)
    out = fused.arrange(fused(x, a, w_fused))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (out - out_ref).abs().max() < tol * out_ref.abs().max()
    probe = torch.randn_like(out_ref)
    grads_ref = torch.autograd.grad((out_ref * probe).sum(), (x, a, w))
    grads = torch.autograd.grad((out * probe).sum(), (x, a, w))
    for g, g_ref in zip(grads, grads_ref):
        assert (g - g_ref).abs().max() < tol * g_ref.abs().max()


def test_conv_with_fused_standard_kernel_equals_e3nn_kernel():
    """Arranging node sums (fused) == summing arranged messages (e3nn) in a whole convolution."""
    torch.manual_seed(1)
    irreps = o3.Irreps("4x0e+4x1o+4x2e")
    torch.set_default_dtype(torch.float64)
    try:
        emb = EdgeEmbedding(5.0, lmax=2, kernel_input=False)
        fused = StandardKernel(irreps, irreps, emb.irreps_sh, num_radial=8, fused=True)
        plain = StandardKernel(irreps, irreps, emb.irreps_sh, num_radial=8, fused=False)
    finally:
        torch.set_default_dtype(torch.float32)
    plain.radial_mlp.load_state_dict(fused.radial_mlp.state_dict())
    # the radial MLP's last layer emits the weights: reorder its columns from e3nn's order to ours
    last = list(fused.radial_mlp.parameters())[-1]
    with torch.no_grad():
        last.copy_(list(plain.radial_mlp.parameters())[-1][:, fused.tp.e3nn_weight_order.argsort()])
    pos = torch.randn(7, 3, dtype=torch.float64) * 2
    edge_index = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 2], [1, 2, 3, 4, 5, 6, 0, 3, 0]])
    edges = emb(pos[edge_index[0]] - pos[edge_index[1]])
    x = irreps.randn(7, -1, dtype=torch.float64)
    out_fused = SteerableConv(fused, 2.0)(x, edges, edge_index)
    out_plain = SteerableConv(plain, 2.0)(x, edges, edge_index)
    assert (out_fused - out_plain).abs().max() < 1e-12 * out_plain.abs().max()


def test_rejects_angular_multiplicity():
    with pytest.raises(ValueError, match="multiplicity 1"):
        ChannelwiseProduct("2x0e", "2x1o", "2x1o")
