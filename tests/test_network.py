"""Whole-network checks: equivariance under G (and its failure outside G), batching, permutations, init scale."""

import copy
import functools

import pytest
import torch
from ase.build import molecule

import molkern.groups as groups
from molkern.models import MolkernNet, average_num_neighbors, normalize_activations
from molkern.testing import POSITIONS, assert_equivariant, equivariance_error

from conftest import ALL_PARITIES, GROUP_CASES, make_group, random_graph

NODE_ATTRS, EDGE_ATTRS = "2x0e+" + ALL_PARITIES, "1x0e+1x1o"


@functools.lru_cache(maxsize=None)
def build(name, kernel):
    """A small float64 network with every parity in its node attributes and hidden features."""
    group, _ = make_group(name)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        net = MolkernNet(
            irreps_node_attr=NODE_ATTRS, irreps_edge_attr="" if kernel == "standard" else EDGE_ATTRS,
            irreps_out="1x0e+1x1o", pooling=None,
            group=group, kernel=kernel, num_channels=2, lmax=2, parity="both", num_layers=2, cutoff=5.0,
            kernel_mlp_width=4, avg_num_neighbors=4.0,
        )
    finally:
        torch.set_default_dtype(default)
    return net.eval()


def inputs(dtype, seed=0):
    pos, edge_index = random_graph(6, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed)
    node_attrs = torch.randn(6, 8 + 18, generator=g, dtype=torch.float64).to(dtype)[:, : 2 + 18]
    edge_attrs = torch.randn(edge_index.shape[1], 4, generator=g, dtype=torch.float64).to(dtype)
    return pos, node_attrs, edge_index, edge_attrs


CASES = [(name, "factorised") for name in GROUP_CASES] + [("o3", "full"), ("so2", "full"), ("cn", "full"), ("o3", "standard")]


@pytest.mark.parametrize("name, kernel", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_network_equivariant_in_group_broken_outside(name, kernel):
    net64 = build(name, kernel)
    group, R_out = make_group(name)
    for dtype in (torch.float64, torch.float32):
        net = net64 if dtype == torch.float64 else copy.deepcopy(net64).float()
        pos, node_attrs, edge_index, edge_attrs = inputs(dtype)
        if kernel == "standard":
            func, args, specs = (lambda p, a: net(p, a, edge_index)), [pos, node_attrs], [POSITIONS, NODE_ATTRS]
        else:
            func = lambda p, a, e: net(p, a, edge_index, e)  # noqa: E731
            args, specs = [pos, node_attrs, edge_attrs], [POSITIONS, NODE_ATTRS, EDGE_ATTRS]
        assert_equivariant(func, group, args, specs, net.irreps_out, generator=torch.Generator().manual_seed(2))
        if R_out is not None and dtype == torch.float64:
            broken = equivariance_error(func, R_out[None], args, specs, net.irreps_out)
            assert broken.min() > 1e-5, f"{group!r} network should not be equivariant to {R_out.tolist()}: {broken}"


def test_batched_equals_one_graph_at_a_time_and_permutation_invariance():
    net = build("so2", "factorised")
    a, b = inputs(torch.float64, seed=1), inputs(torch.float64, seed=2)
    pos = torch.cat([a[0], b[0]])
    node_attrs = torch.cat([a[1], b[1]])
    edge_index = torch.cat([a[2], b[2] + 6], dim=1)
    edge_attrs = torch.cat([a[3], b[3]])
    together = net(pos, node_attrs, edge_index, edge_attrs, batch=torch.tensor([0] * 6 + [1] * 6))
    alone = torch.cat([net(*a[:3], a[3]), net(*b[:3], b[3])])
    assert torch.allclose(together, alone, atol=1e-12)

    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    inv = torch.argsort(perm)
    permuted = net(pos[perm], node_attrs[perm], inv[edge_index], edge_attrs, batch=torch.tensor([0] * 6 + [1] * 6)[perm])
    assert torch.allclose(permuted, together[perm], atol=1e-12)
    # reordering the edges changes nothing either
    eperm = torch.randperm(edge_index.shape[1], generator=torch.Generator().manual_seed(1))
    assert torch.allclose(net(pos, node_attrs, edge_index[:, eperm], edge_attrs[eperm]).sum(0),
                          net(pos, node_attrs, edge_index, edge_attrs).sum(0), atol=1e-12)


TYPES = {1: 0, 6: 1, 7: 2, 8: 3, 9: 4}


def molecule_graph(name, cutoff=5.0):
    atoms = molecule(name)
    pos = torch.tensor(atoms.positions, dtype=torch.get_default_dtype())
    attrs = torch.nn.functional.one_hot(torch.tensor([TYPES[z] for z in atoms.numbers]), 5).to(pos.dtype)
    d = torch.cdist(pos, pos)
    src, dst = torch.nonzero((d < cutoff) & (d > 0), as_tuple=True)
    return pos, attrs, torch.stack([src, dst])


MOLECULES = ["CH4", "H2O", "NH3", "C6H6", "CH3CH2OH", "CH3COOH", "HCOOH", "CF4"]


@pytest.mark.parametrize("group, kernel, self_connection", [
    ("o3", "depthwise", "attributes"), ("o3", "depthwise", "linear"), ("o3", "factorised", "attributes"),
    ("so2", "factorised", "attributes"), ("o3", "full", "attributes"), ("o3", "standard", "attributes")])
def test_fresh_network_outputs_are_of_order_one_on_real_molecules(group, kernel, self_connection):
    graphs = [molecule_graph(m) for m in MOLECULES]
    avg = average_num_neighbors([g[2] for g in graphs], [g[0].shape[0] for g in graphs])
    torch.manual_seed(0)
    net = MolkernNet(group=group, kernel=kernel, lmax=2, num_channels=16, avg_num_neighbors=avg, pooling="mean",
                     self_connection=self_connection)
    pos, attrs = (torch.cat([g[k] for g in graphs]) for k in (0, 1))
    edge_index, offset = [], 0
    for g in graphs:
        edge_index.append(g[2] + offset)
        offset += g[0].shape[0]
    batch = torch.repeat_interleave(torch.arange(len(graphs)), torch.tensor([g[0].shape[0] for g in graphs]))
    args = (pos, attrs, torch.cat(edge_index, dim=1), None, batch)
    with torch.no_grad():
        # data-free initialisation: order one within a factor of ~10, in eval and in train mode
        for mode in (net.eval, net.train):
            mode()
            out = net(*args)  # (num_molecules, 1), per-atom mean
            rms = out.pow(2).mean().sqrt()
            assert torch.isfinite(out).all() and 0.01 < rms < 100, (mode.__name__, out.flatten())
            assert out.std() > 1e-4  # different molecules give different outputs
        # data-dependent initialisation: each block's gate input at the target rms
        normalize_activations(net, *args, target_rms=0.5)
        after = normalize_activations(net, *args, target_rms=0.5)
        assert all(0.3 < r < 1.2 for r in after), after
        if kernel != "standard":  # and the invariant kernel trunk's pre-activations at unit rms, so that the
            # convolutions' outputs are not vanishingly small (linear_2 would otherwise be scaled up ~1000x)
            trunk = [m for m in net.edge_embedding.trunk if isinstance(m, torch.nn.Linear)]
            rms = {}
            hooks = [m.register_forward_hook(lambda mod, a, out, m=m: rms.__setitem__(m, out.pow(2).mean().sqrt()))
                     for m in trunk + [block.conv for block in net.blocks]]
            net(*args)
            for h in hooks:
                h.remove()
            for m in trunk:
                torch.testing.assert_close(rms[m], torch.tensor(1.0), rtol=1e-3, atol=0)
            assert all(rms[block.conv] > 0.01 for block in net.blocks), [rms[b.conv] for b in net.blocks]


def test_output_kinds_vectors_and_logits():
    pos, attrs, edge_index = molecule_graph("CH3CH2OH")
    torch.manual_seed(0)
    vectors = MolkernNet(irreps_out="1x1o", pooling=None, lmax=1, num_channels=4, num_layers=2).eval()
    assert vectors(pos, attrs, edge_index).shape == (pos.shape[0], 3)
    assert_equivariant(lambda p: vectors(p, attrs, edge_index), groups.get("o3"), [pos], [POSITIONS], "1x1o")
    logits = MolkernNet(irreps_out="7x0e", pooling="mean", lmax=1, num_channels=4, num_layers=2).eval()
    assert logits(pos, attrs, edge_index).shape == (1, 7)


def test_bad_configuration_and_input_errors():
    with pytest.raises(ValueError, match="kernel must be one of"):
        MolkernNet(kernel="dense")
    with pytest.raises(ValueError, match="standard kernel"):
        MolkernNet(kernel="standard", group="so2")
    with pytest.raises(ValueError, match="unknown|valid"):
        MolkernNet(group="so4")
    net = MolkernNet(lmax=1, num_channels=2, num_layers=1)
    pos, attrs, edge_index = molecule_graph("H2O")
    with pytest.raises(ValueError, match="node_attrs"):
        net(pos, attrs[:, :3], edge_index)


def test_build_model_from_config():
    from molkern.models import build_model

    model = build_model({"group": {"name": "cn", "n": 4}, "lmax": 1, "num_channels": 4, "num_layers": 1})
    assert model.group.name == "cn" and model.group.params["n"] == 4
    assert model.config["num_channels"] == 4
    with pytest.raises(ValueError, match="unknown model config key.*num_chanels"):
        build_model({"num_chanels": 4})
    with pytest.raises(ValueError, match="needs a 'name'"):
        build_model({"group": {"n": 4}})


def test_building_a_model_leaves_e3nn_defaults_unchanged():
    """Models are built without TorchScript, and e3nn's global settings are the caller's afterwards (setting
    jit_script_fx alone would also flip jit_mode to "script", scripting later e3nn modules of the caller)."""
    import e3nn

    before = dict(e3nn.get_optimization_defaults())
    MolkernNet("5x0e", num_channels=4, lmax=1, num_layers=1)
    assert dict(e3nn.get_optimization_defaults()) == before
