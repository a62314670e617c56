"""CompiledLoss: one compiled graph for a training step's forward and backward gives eager's loss, gradients
and BatchNorm statistics, on batches of any size."""

import copy

import pytest
import torch
from torch_geometric.data import Batch, Data

from molkern.models import MolkernNet
from molkern.train import CompiledLoss


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = MolkernNet("3x0e", num_channels=8, lmax=1, num_layers=2, kernel_mlp_width=4, cutoff=3.0,
                              avg_num_neighbors=4.0)  # kernel_batch_norm: BatchNorm statistics in the graph
        self.unused = torch.nn.Parameter(torch.ones(3))


def l1_loss(module, batch):
    out = module.net(batch.pos, batch.node_attr, batch.edge_index, None, batch.batch, batch.num_graphs)  # (B, 1)
    return (out[:, 0] - batch.y).abs().mean()


def molecules(sizes, seed):
    gen = torch.Generator().manual_seed(seed)
    graphs = []
    for n in sizes:
        pos = 1.2 * torch.randn(n, 3, generator=gen)
        src, dst = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        keep = (src != dst) & ((pos[src] - pos[dst]).norm(dim=-1) < 3.0)
        node_attr = torch.nn.functional.one_hot(torch.randint(3, (n,), generator=gen), 3).float()
        graphs.append(Data(pos=pos, node_attr=node_attr, edge_index=torch.stack([src[keep], dst[keep]]),
                           y=torch.randn(1, generator=gen)))
    return Batch.from_data_list(graphs)


def gradients(module):
    return [None if p.grad is None else p.grad.clone() for p in module.parameters()]


@pytest.mark.slow  # one Inductor compilation of a two-block model (~30 s of CPU)
def test_compiled_loss_equals_eager_on_batches_of_any_size():
    torch.manual_seed(0)
    eager, compiled = Toy(), None
    compiled = copy.deepcopy(eager)
    step = CompiledLoss(compiled, l1_loss)
    for k, sizes in enumerate([(5, 7, 6), (4, 9), (8, 3, 5, 6, 7), (6,)]):  # 3, 2, 5 and 1 (eager) molecules
        batch = molecules(sizes, seed=k)
        eager.zero_grad(set_to_none=True)
        compiled.zero_grad(set_to_none=True)
        expected = l1_loss(eager, batch)
        expected.backward()
        loss = step(batch)
        loss.backward()
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
        for (name, p), want, got in zip(eager.named_parameters(), gradients(eager), gradients(compiled)):
            assert (want is None) == (got is None), name  # the unused parameter has no gradient in either
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
        for (name, want), got in zip(eager.named_buffers(), compiled.buffers()):  # running statistics
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    assert len(step.graphs) == 1  # one graph served every batch size
    assert eager.unused.grad is None

    batch = molecules((5, 6), seed=9)  # backward scales and accumulates like eager's
    compiled.zero_grad(set_to_none=True)
    (0.5 * step(batch)).backward()
    half = gradients(compiled)
    step(batch).backward()
    for h, total in zip(half, gradients(compiled)):
        if h is not None:
            torch.testing.assert_close(total, 3 * h, rtol=1e-5, atol=1e-7)


def test_batch_without_edges_runs_eagerly():
    torch.manual_seed(0)
    module = Toy()
    step = CompiledLoss(module, l1_loss)
    batch = molecules((1, 1), seed=0)  # two lone atoms: no edges
    step(batch).backward()
    assert not step.graphs
    assert module.net.readout is not None and any(p.grad is not None for p in module.parameters())
