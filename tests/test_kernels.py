"""Lemma 1 (kernel steerability) for every group and both implicit forms; full kernel == slow reference."""

import pytest
import torch

from molkern.nn import EdgeEmbedding, ImplicitKernel, StandardKernel, kernel_matrix
from molkern.testing import full_kernel_reference, kernel_steerability_error
import molkern.groups as groups

from conftest import ALL_PARITIES, GROUP_CASES, make_group

EDGE_ATTRS = "2x0e+1x1o"
NODE_ATTRS = "2x0e+1x1e"


# every parity, split between input and output to keep the tensor products small
IRREPS_IN, IRREPS_OUT = "0e+1e+2o", "0o+1o+2e"


def setup(group, form, irreps_in=IRREPS_IN, irreps_out=IRREPS_OUT, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    emb = EdgeEmbedding(5.0, lmax=4, group=group, irreps_edge_attr=EDGE_ATTRS, irreps_node_attr=NODE_ATTRS).eval()
    kernel = ImplicitKernel(irreps_in, irreps_out, emb.irreps_kernel_in, form=form, mlp_width=4).eval()
    num_nodes, num_edges = 5, 9
    inputs = dict(
        edge_vec=torch.randn(num_edges, 3) * 1.5,
        edge_attrs=torch.randn(num_edges, emb.irreps_edge_attr.dim),
        node_attrs=torch.randn(num_nodes, emb.irreps_node_attr.dim),
        edge_index=torch.randint(0, num_nodes, (2, num_edges)),
    )
    torch.set_default_dtype(default)
    return emb, kernel, inputs


@pytest.mark.parametrize("form", ["depthwise", "factorised", "full"])
@pytest.mark.parametrize("name", list(GROUP_CASES))
def test_lemma1_steerable_in_group_and_broken_outside(name, form):
    """k(g.x, rho_z(g) z) = rho_out(g) k(x, z) rho_in(g)^-1 for g in G (float64 and float32), not outside G."""
    group, R_out = make_group(name)
    emb, kernel, inputs = setup(group, form)
    for dtype, tol in [(torch.float64, 1e-9), (torch.float32, 1e-4)]:
        emb, kernel = emb.to(dtype), kernel.to(dtype)
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        rotations = group.sample(3, generator=torch.Generator().manual_seed(1))
        errors = kernel_steerability_error(kernel, emb, rotations, **inputs)
        assert errors.max() < tol, f"{group!r} {form} {dtype}: {errors}"
        if R_out is not None:
            broken = kernel_steerability_error(kernel, emb, R_out[None], **inputs)
            assert broken.min() > 1e-2, f"{group!r} {form} should break outside the group: {broken}"


@pytest.mark.parametrize("name", list(GROUP_CASES))
def test_lemma1_invariant_trunk_and_head(name):
    """The default kernel MLP (invariant trunk + InvariantWeightedLinear head) is steerable in G, not outside."""
    group, R_out = make_group(name)
    _, _, inputs = setup(group, "depthwise")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    try:
        emb = EdgeEmbedding(5.0, lmax=4, group=group, irreps_edge_attr=EDGE_ATTRS, irreps_node_attr=NODE_ATTRS,
                            trunk_layers=2, trunk_width=16, trunk_type="invariant").eval()
        kernel = ImplicitKernel("2x0e+2x1e+2x2o", "2x0o+2x1o+2x2e", emb.irreps_kernel_in, "depthwise",
                                mlp_layers=0, heads=2, channel_weights=True, invariant_head=True).eval()
        rotations = group.sample(3, generator=torch.Generator().manual_seed(1))
    finally:
        torch.set_default_dtype(torch.float32)
    errors = kernel_steerability_error(kernel, emb, rotations, **inputs)
    assert errors.max() < 1e-12, f"{group!r}: {errors}"
    if R_out is not None:
        broken = kernel_steerability_error(kernel, emb, R_out[None].double(), **inputs)
        assert broken.min() > 1e-2, f"{group!r} should break outside the group: {broken}"


@pytest.mark.parametrize("name", ["o3", "so2", "dn"])
def test_invariant_depthwise_head_equals_invariant_weighted_linear(name):
    """InvariantDepthwiseHead's kernel matrices == DepthwiseProduct.kernel_matrices(InvariantWeightedLinear(...))
    with the same parameters (several vectors per irrep type, 2 heads, channel weights), gradients included."""
    from molkern.nn.depthwise_head import InvariantDepthwiseHead
    from molkern.nn.mlp import InvariantWeightedLinear

    group, _ = make_group(name)
    _, _, inputs = setup(group, "depthwise", dtype=torch.float64)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    try:
        emb = EdgeEmbedding(5.0, lmax=4, group=group, irreps_edge_attr=EDGE_ATTRS, irreps_node_attr=NODE_ATTRS,
                            trunk_layers=1, trunk_width=16, trunk_type="invariant")
        kernel = ImplicitKernel("2x0e+2x1e+2x2o", "2x0o+2x1o+2x2e", emb.irreps_kernel_in, "depthwise",
                                mlp_layers=0, heads=2, channel_weights=True, invariant_head=True)
        head = kernel.mlp
        assert isinstance(head, InvariantDepthwiseHead)
        linear = InvariantWeightedLinear(emb.irreps_kernel_in, head.irreps_out)
        linear.load_state_dict(head.state_dict())
        with torch.no_grad():
            head.bias.normal_()
            linear.bias.copy_(head.bias)
    finally:
        torch.set_default_dtype(torch.float32)
    edges = emb(**inputs)
    assert torch.equal(torch.cat(edges.kernel_in_parts, dim=1), edges.kernel_in)  # the same columns, apart
    kernels, channel_weights = head(edges.kernel_in, edges.envelope)
    from_parts = head(edges.kernel_in, edges.envelope, edges.kernel_in_parts)
    assert torch.equal(from_parts[0], kernels) and torch.equal(from_parts[1], channel_weights)
    out = linear(edges.kernel_in)
    coefficients, expected_weights = torch.split(out, [kernel.irreps_angular.dim, kernel.num_channel_weights], 1)
    expected = kernel.tp.kernel_matrices(coefficients * edges.envelope)
    assert expected.abs().max() > 0.1
    assert (kernels - expected).abs().max() < 1e-12 and (channel_weights - expected_weights).abs().max() < 1e-12
    probe = torch.randn_like(kernels)
    grads = torch.autograd.grad((kernels * probe).sum(), [head.weight, head.bias])
    expected_grads = torch.autograd.grad((expected * probe).sum(), [linear.weight, linear.bias])
    for g, e in zip(grads, expected_grads):
        assert (g - e).abs().max() < 1e-10


def test_invariant_trunk_kernel_input_without_the_split_is_the_same():
    """With only scalar attributes the embedding builds the trunk's input and kernel_in's two parts without
    concatenating and splitting the front: the same kernel_in as the general path."""
    torch.manual_seed(0)
    emb = EdgeEmbedding(5.0, lmax=4, irreps_node_attr="3x0e", trunk_layers=2, trunk_width=8, trunk_type="invariant")
    assert emb._scalars_apart
    vec, attrs = torch.randn(12, 3) * 2, torch.randn(4, 3)
    edge_index = torch.randint(0, 4, (2, 12))
    fast = emb(vec, node_attrs=attrs, edge_index=edge_index)
    emb._scalars_apart = False
    general = emb(vec, node_attrs=attrs, edge_index=edge_index)
    assert fast.kernel_in.shape == (12, emb.irreps_kernel_in.dim)
    torch.testing.assert_close(fast.kernel_in, general.kernel_in, rtol=0, atol=0)
    for a, b in zip(fast.kernel_in_parts, general.kernel_in_parts):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_invariant_weighted_linear_checks_its_irreps():
    from molkern.nn.mlp import InvariantWeightedLinear

    with pytest.raises(ValueError, match="0e included"):
        InvariantWeightedLinear("2x1o", "1x1o")
    with pytest.raises(ValueError, match="does not contain"):
        InvariantWeightedLinear("4x0e+2x1o", "1x2e")
    layer = InvariantWeightedLinear("4x0e+2x1o+1x2e", "3x0e+2x1o+2x2e+1x0e")
    x = torch.randn(7, 4 + 6 + 5)
    assert layer(x).shape == (7, 3 + 6 + 10 + 1)


def test_full_kernel_equals_reference_that_materialises_the_matrix(dtype):
    group, _ = make_group("so2")
    emb, kernel, inputs = setup(group, "full", irreps_in="2x0e+0o+1o+1e+2e", irreps_out="0e+1o+1e+2o", dtype=dtype)
    edges = emb(**inputs)
    K = kernel_matrix(kernel, edges)
    K_ref = full_kernel_reference(kernel, edges)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert K.abs().max() > 0.1
    assert (K - K_ref).abs().max() < tol * K.abs().max()


def test_depthwise_kernel_equals_reference(dtype):
    """Messages of the depthwise form == K[e, head(u)] x[e, u], K built path by path from the MLP output."""
    from e3nn import o3

    group, _ = make_group("so2")
    irreps_in, irreps_out, heads = o3.Irreps("4x0e+4x1o+4x1e+4x2e"), o3.Irreps("4x0o+4x1o+4x2e"), 2
    emb, _, inputs = setup(group, "depthwise", dtype=dtype)
    torch.manual_seed(1)
    kernel = ImplicitKernel(irreps_in, irreps_out, emb.irreps_kernel_in, "depthwise", mlp_width=4, heads=heads)
    kernel = kernel.to(dtype).eval()
    edges = emb(**inputs)
    num_edges = edges.vec.shape[0]
    x = irreps_in.randn(num_edges, -1, dtype=dtype)
    coefficients = kernel.mlp(edges.kernel_in) * edges.envelope  # (E, irreps_coefficients.dim), e3nn layout
    tp = kernel.tp
    count = {ir: sum(1 for _, _, t in tp.paths if t == ir) for _, ir in tp.irreps_coefficients}
    into = {o: sum(1 for _, t, _ in tp.paths if t == o) for o in range(len(irreps_out))}
    coef_slices = dict(zip([ir for _, ir in tp.irreps_coefficients], tp.irreps_coefficients.slices()))
    expected = torch.zeros(num_edges, irreps_out.dim, dtype=dtype)
    seen = {ir: 0 for ir in count}
    for i, o, ir in tp.paths:
        ir1, ir3 = irreps_in[i].ir, irreps_out[o].ir
        C = o3.wigner_3j(ir1.l, ir.l, ir3.l, dtype=dtype) * ((2 * ir3.l + 1) / into[o]) ** 0.5
        c = coefficients[:, coef_slices[ir]].view(num_edges, heads, count[ir], ir.dim)[:, :, seen[ir]]  # (E, H, d2)
        seen[ir] += 1
        x_block = x[:, irreps_in.slices()[i]].view(num_edges, 4, ir1.dim)  # (E, U, d1)
        c_per_channel = c.repeat_interleave(4 // heads, dim=1)  # (E, U, d2): head(u) = u // (U / H)
        out = torch.einsum("ijk,eui,euj->euk", C, x_block, c_per_channel)
        expected[:, irreps_out.slices()[o]] += out.reshape(num_edges, -1)
    got = kernel(x, edges)
    assert expected.abs().max() > 0.1
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (got - expected).abs().max() < tol * expected.abs().max()
    with pytest.raises(ValueError, match="heads must divide"):
        ImplicitKernel(irreps_in, irreps_out, emb.irreps_kernel_in, "depthwise", heads=3)
    with pytest.raises(ValueError, match="same multiplicity"):
        ImplicitKernel("4x0e+2x1o", irreps_out, emb.irreps_kernel_in, "depthwise")


@pytest.mark.parametrize("form", ["depthwise", "factorised", "full"])
def test_band_limit_no_block_identically_zero(form):
    """2e -> 2e kernels need harmonics up to l = 4; the l = 4 part of the kernel must be present."""
    torch.set_default_dtype(torch.float64)
    try:
        emb = EdgeEmbedding(5.0, lmax=4).eval()
        kernel = ImplicitKernel("1x2e", "1x2e", emb.irreps_kernel_in, form=form).eval()
        vec = torch.randn(64, 3)
        K = kernel_matrix(kernel, emb(vec)).reshape(64, -1, 5, 5)  # (E, output copies of 2e, 5, 5)
        # project each kernel on the l = 4 component of 2e (x) 2e via the Clebsch-Gordan coefficients
        from e3nn import o3

        C4 = o3.wigner_3j(2, 2, 4)  # (5, 5, 9)
        l4 = torch.einsum("ecij,ijk->eck", K, C4)
        assert l4.abs().max() > 1e-3 * K.abs().max()
        with pytest.raises(ValueError, match="lmax >= 4"):
            ImplicitKernel("1x2e", "1x2e", EdgeEmbedding(5.0, lmax=2).irreps_kernel_in, form=form)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize(
    "name, params, vec2, differs",
    [
        ("so2", {}, [0.0, 0.0, 1.5], True),
        ("o3", {}, [0.0, 0.0, 1.5], False),
        ("cn", {"n": 4}, [1.5 * 0.5**0.5, 1.5 * 0.5**0.5, 0.0], True),  # 45 degrees apart in the XY plane
        ("cn", {"n": 4}, [0.0, 1.5, 0.0], False),  # 90 degrees apart: a C4 element maps one to the other
    ],
)
def test_subgroup_kernel_scalars_see_direction(name, params, vec2, differs):
    """Design check: invariant (0e -> 0e) kernel channels of a subgroup depend on the direction, not only |x|.

    SO(2) tells (1,0,0) from (0,0,1); C4 tells directions 45 degrees apart even at a low band limit
    (the harmonics reach the references' degree); O(3) kernels see only |x|.
    """
    vec = torch.tensor([[1.5, 0.0, 0.0], vec2])
    torch.manual_seed(0)
    emb = EdgeEmbedding(5.0, lmax=2, group=groups.get(name, **params)).eval()
    kernel = ImplicitKernel("4x0e", "4x0e", emb.irreps_kernel_in).eval()
    out = kernel(torch.ones(2, 4), emb(vec))
    gap = (out[0] - out[1]).abs().max() / out.abs().max()
    assert (gap > 1e-2) if differs else (gap < 1e-5), (name, params, gap)


def test_standard_kernel_is_o3_steerable(dtype):
    emb = EdgeEmbedding(5.0, lmax=2, kernel_input=False)
    kernel = StandardKernel(ALL_PARITIES, ALL_PARITIES, emb.irreps_sh, num_radial=8)
    vec = torch.randn(6, 3) * 2
    errors = kernel_steerability_error(kernel, emb, groups.get("o3").sample(3), vec)
    assert errors.max() < (1e-9 if dtype == torch.float64 else 1e-4)


def test_bad_form_and_attrs():
    emb = EdgeEmbedding(5.0, lmax=2, irreps_edge_attr="4x0e")
    with pytest.raises(ValueError, match="form"):
        ImplicitKernel("1x0e", "1x0e", emb.irreps_kernel_in, form="dense")
    with pytest.raises(ValueError, match="edge_attrs"):
        emb(torch.randn(3, 3), torch.randn(3, 5))


@pytest.mark.parametrize("form", ["depthwise", "factorised", "full"])
def test_parity_blocks_kept_exactly_where_the_group_allows_them(form):
    """1o -> 1o kernels: the 1e (antisymmetric) block needs a pseudovector such as x X a. O(3) kernels of x alone
    have none (it is left out as identically zero); SO(2) kernels must keep it."""
    vec = torch.randn(16, 3, dtype=torch.float64)
    for name, has_1e in [("o3", False), ("so2", True)]:
        torch.set_default_dtype(torch.float64)
        try:
            torch.manual_seed(0)
            emb = EdgeEmbedding(5.0, lmax=2, group=groups.get(name)).eval()
            kernel = ImplicitKernel("1x1o", "1x1o", emb.irreps_kernel_in, form=form).eval()
            K = kernel_matrix(kernel, emb(vec)).reshape(16, -1, 3, 3)  # (E, output copies, 3, 3)
        finally:
            torch.set_default_dtype(torch.float32)
        antisymmetric = (K - K.transpose(-1, -2)).abs().max() / K.abs().max()
        assert (antisymmetric > 1e-2) if has_1e else (antisymmetric < 1e-12), (name, antisymmetric)
