"""Layer-level checks: edge sign convention, convolution and interaction block under G, the checker itself."""

import pytest
import torch
from e3nn import o3

import molkern.groups as groups
from molkern.nn import EdgeEmbedding, ImplicitKernel, InteractionBlock, Readout, SteerableConv, scatter_mean
from molkern.testing import POSITIONS, assert_equivariant, equivariance_error

from conftest import ALL_PARITIES, make_group, random_graph


def test_edge_convention_on_two_atoms():
    """edge_index[0] = source j, edge_index[1] = target i, edge_vec = x_j - x_i; messages land on the target."""
    pos = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    from molkern.models import MolkernNet

    net = MolkernNet(irreps_node_attr="", irreps_out="1x1o", pooling=None, lmax=1, num_channels=4, num_layers=1)
    captured = {}
    net.edge_embedding.register_forward_hook(lambda m, args, out: captured.update(vec=out.vec))
    net(pos, None, torch.tensor([[0], [1]]))  # one edge: source atom 0 -> target atom 1
    assert torch.equal(captured["vec"], torch.tensor([[0.0, 0.0, -1.0]]))

    emb = EdgeEmbedding(5.0, lmax=2)
    kernel = ImplicitKernel("1x0e", "1x0e", emb.irreps_kernel_in)
    conv = SteerableConv(kernel, avg_num_neighbors=1.0)
    out = conv(torch.ones(2, 1), emb(captured["vec"]), torch.tensor([[0], [1]]))
    assert out[0].abs().max() == 0 and out[1].abs().max() > 0  # only the target receives a message


def conv_and_block(group, irreps, irreps_node_attr="2x0e"):
    emb = EdgeEmbedding(5.0, lmax=4, group=group, irreps_edge_attr="1x0e+1x1o", trunk_layers=1).eval()
    conv = SteerableConv(ImplicitKernel(irreps, irreps, emb.irreps_kernel_in, mlp_width=4, mlp_layers=0), 3.0)
    block = InteractionBlock(irreps, irreps, irreps_node_attr, conv)
    return emb, conv, block


@pytest.mark.parametrize("name", ["o3", "so2", "cn"])
def test_conv_and_block_equivariant_with_every_parity(name, dtype):
    group, R_out = make_group(name)
    torch.manual_seed(0)
    emb, conv, block = conv_and_block(group, ALL_PARITIES)
    pos, edge_index = random_graph(5, dtype=dtype)
    feats = o3.Irreps(ALL_PARITIES).randn(5, -1)
    attrs = torch.randn(5, 2)
    edge_attrs = torch.randn(edge_index.shape[1], 4)

    def run_conv(p, f, e):
        return conv(f, emb(p[edge_index[0]] - p[edge_index[1]], e), edge_index)

    def run_block(p, f, e):
        return block(f, attrs, emb(p[edge_index[0]] - p[edge_index[1]], e), edge_index)

    specs = [POSITIONS, ALL_PARITIES, "1x0e+1x1o"]
    assert_equivariant(run_conv, group, [pos, feats, edge_attrs], specs, conv.irreps_out)
    assert_equivariant(run_block, group, [pos, feats, edge_attrs], specs, block.irreps_out)
    assert block.resnet  # same irreps in and out: residual connection on
    if R_out is not None:
        broken = equivariance_error(run_conv, R_out[None].to(dtype), [pos, feats, edge_attrs], specs, conv.irreps_out)
        assert broken.min() > 1e-2


def test_linear_self_connection_block_equivariant(dtype):
    """self_connection="linear": one map for all nodes (no attribute product), still equivariant under G."""
    group, _ = make_group("so2")
    torch.manual_seed(0)
    emb, conv, with_attrs = conv_and_block(group, ALL_PARITIES)
    block = InteractionBlock(ALL_PARITIES, ALL_PARITIES, "2x0e", conv, self_connection="linear")
    pos, edge_index = random_graph(5, dtype=dtype)
    feats, attrs = o3.Irreps(ALL_PARITIES).randn(5, -1), torch.randn(5, 2)
    edge_attrs = torch.zeros(edge_index.shape[1], 4)

    def run_block(p, f):
        return block(f, attrs, emb(p[edge_index[0]] - p[edge_index[1]], edge_attrs), edge_index)

    assert_equivariant(run_block, group, [pos, feats], [POSITIONS, ALL_PARITIES], block.irreps_out)
    # the attributes no longer enter the skip path: only the convolution's kernel reads them (here: not at all)
    edges = emb(pos[edge_index[0]] - pos[edge_index[1]], edge_attrs)
    torch.testing.assert_close(block(feats, attrs, edges, edge_index), block(feats, 2 * attrs, edges, edge_index))
    count = lambda m: sum(p.numel() for p in m.self_connection.parameters())  # noqa: E731
    assert count(block) * 2 == count(with_attrs)  # 2 attribute channels: half the weights
    with pytest.raises(ValueError, match="self_connection must be one of"):
        InteractionBlock(ALL_PARITIES, ALL_PARITIES, "2x0e", conv, self_connection="species")


def test_readout_pooling_and_errors():
    readout = Readout("4x0e+2x1o", "3x0e", pooling="mean")
    feats = torch.randn(5, 10)
    batch = torch.tensor([0, 0, 1, 1, 1])
    out = readout(feats, batch, 2)
    assert out.shape == (2, 3)
    per_node = readout.mlp(feats)
    assert torch.allclose(out, scatter_mean(per_node, batch, 2))
    with pytest.raises(ValueError, match="pooling"):
        Readout("4x0e", "1x0e", pooling="max")


def test_checker_rejects_a_non_equivariant_module():
    """A module that treats a vector's components as independent scalars must fail the check."""
    broken = torch.nn.Linear(3, 3)
    x = torch.randn(4, 3)
    with pytest.raises(AssertionError, match="not equivariant"):
        assert_equivariant(broken, groups.get("so2"), [x], ["1x1o"], "1x1o")
    # a rotation about z does commute with a map acting on z alone: the checker must accept it
    only_z = lambda v: torch.stack([v[:, 0], v[:, 1], 2 * v[:, 2]], dim=-1)  # noqa: E731
    assert_equivariant(only_z, groups.get("so2"), [x], ["1x1o"], "1x1o")
    with pytest.raises(AssertionError):
        assert_equivariant(only_z, groups.get("o3"), [x], ["1x1o"], "1x1o")


def test_checker_input_errors():
    with pytest.raises(ValueError, match="does not match irreps"):
        assert_equivariant(lambda v: v, groups.get("o3"), [torch.randn(2, 4)], ["1x1o"], "1x1o")
    with pytest.raises(ValueError, match="irreps_in entries"):
        assert_equivariant(lambda v: v, groups.get("o3"), [torch.randn(2, 3)], [], "1x1o")


@pytest.mark.parametrize("irreps_in, irreps_attr, irreps_out", [
    ("8x0e+8x1o+8x2e", "5x0e", "24x0e+8x1o+8x2e"),
    ("4x0e+2x0o+3x1o+2x1e+2x2o", "3x0e+2x0o", "0e+0o+2x1o+1e+2e+2o+3o"),  # every parity; 3o: an empty block
])
def test_scalar_attribute_self_connection_equals_e3nn(irreps_in, irreps_attr, irreps_out):
    """The lean self-connection is e3nn's FullyConnectedTensorProduct: same weights, values and gradients."""
    from molkern.nn.self_connection import ScalarAttributeTensorProduct

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        reference = o3.FullyConnectedTensorProduct(irreps_in, irreps_attr, irreps_out)
        torch.manual_seed(0)
        lean = ScalarAttributeTensorProduct(irreps_in, irreps_attr, irreps_out)
    finally:
        torch.set_default_dtype(default)
    assert torch.equal(reference.weight, lean.weight)
    x = o3.Irreps(irreps_in).randn(7, -1, dtype=torch.float64, requires_grad=True)
    z = torch.randn(7, o3.Irreps(irreps_attr).dim, dtype=torch.float64)
    out, out_ref = lean(x, z), reference(x, z)
    assert torch.allclose(out, out_ref, rtol=0, atol=1e-12)
    (g,), (g_ref,) = torch.autograd.grad(out.sum(), x), torch.autograd.grad(out_ref.sum(), x)
    assert torch.allclose(g, g_ref, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="scalars"):
        ScalarAttributeTensorProduct(irreps_in, "1x1o", irreps_out)
