"""EnergyModule's training loss: masked (traceable) form equals the labelled-subset means; compiled equals eager."""

import copy
import functools

import ase.io
import lightning as L
import pytest
import torch
from torch_geometric.loader import DataLoader

from molkern.data.atoms import AtomsDataset
from molkern.train import CompiledLoss
from molkern.train.energy import EnergyModule, energy_forces_stress
from test_energy_train import MODEL, emt_frames


@pytest.fixture(scope="module")
def mixed_loader(tmp_path_factory):
    """Batches mixing periodic Cu cells (forces, stress) and clusters (forces only; one without forces)."""
    frames = emt_frames(num_bulk=6, num_cluster=3, seed=3)
    del frames[-1].calc.results["forces"]  # a structure with an energy label only
    path = tmp_path_factory.mktemp("emt") / "mixed.extxyz"
    ase.io.write(path, frames, format="extxyz")
    ds = AtomsDataset(path, elements=["Cu"], cutoff=4.0, require_forces=False)
    order = [0, 6, 8, 1, 2, 7, 3, 4, 5]  # batches of 3: each mixes cells and clusters but the last (cells only)
    return DataLoader([ds[i] for i in order], batch_size=3)


def fitted_module(loader, **kw):
    torch.manual_seed(0)
    # one block: the compiled graphs (double backward) are large, and one block exercises every operation
    module = EnergyModule(["Cu"], model={**MODEL, "num_layers": 1, "avg_num_neighbors": 30.0}, stress_weight=0.5, **kw)
    module.fit_statistics(loader)
    module.initialize(next(iter(loader)))
    return module


def reference_loss(module, batch):
    """The loss written with boolean indexing: means over the labelled structures and components only."""
    out = energy_forces_stress(module, batch, forces=True, stress=True, create_graph=True)
    scale, natoms = module.energy_scale, torch.bincount(batch.batch).double()
    loss = (((out["energy"] - batch.energy.double()) / natoms / scale) ** 2).mean()
    mask = batch.has_forces[batch.batch]
    loss = loss + (((out["forces"] - batch.forces)[mask].double() / scale) ** 2).mean()
    s = batch.has_stress
    volume = torch.linalg.det(batch.cell[s].double()).abs()
    virial = (out["stress"] - batch.stress)[s].double() * (volume / natoms[s])[:, None, None]
    return loss + 0.5 * ((virial / scale) ** 2).mean()


def test_masked_loss_equals_labelled_subset_means(mixed_loader):
    module = fitted_module(mixed_loader)
    batch = next(iter(mixed_loader))
    assert bool(batch.has_stress.any()) and not bool(batch.has_stress.all())
    assert not bool(batch.has_forces.all())
    loss, metrics = module.loss_and_metrics(batch, train=True)
    torch.testing.assert_close(loss, reference_loss(module, batch), rtol=1e-10, atol=0)
    torch.testing.assert_close(module.loss(batch, stress=True), loss, rtol=1e-12, atol=0)
    labelled_atoms = int(batch.has_forces[batch.batch].sum())
    assert metrics["forces_mae"][1] == 3 * labelled_atoms and metrics["stress_mae"][1] == 9 * int(batch.has_stress.sum())
    assert torch.isfinite(loss)


@pytest.mark.slow  # two Inductor compilations of a force-trained model (~2 min of CPU)
def test_compiled_force_and_stress_loss_equals_eager(mixed_loader):
    eager = fitted_module(mixed_loader)
    compiled = copy.deepcopy(eager)
    steps = {s: CompiledLoss(compiled, functools.partial(EnergyModule.loss, stress=s)) for s in (False, True)}
    for batch in mixed_loader:
        for stress in (False, True):
            eager.zero_grad(set_to_none=True)
            compiled.zero_grad(set_to_none=True)
            expected = eager.loss(batch, stress=stress)
            expected.backward()
            loss = steps[stress](batch)
            loss.backward()
            torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-8)
            for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
                assert (p.grad is None) == (q.grad is None), name
                if p.grad is not None:  # float32 rounding of second derivatives: relative to the largest entry
                    atol = 1e-4 * float(p.grad.abs().max()) + 1e-9
                    torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=atol, msg=name)
    assert all(len(step.graphs) == 1 for step in steps.values())  # one graph per loss for every batch


@pytest.mark.slow
def test_compiled_fit_follows_eager(mixed_loader, tmp_path):
    losses = {}
    for compile in (False, True):
        module = fitted_module(mixed_loader, compile=compile, lr=1e-3, scheduler="none")
        trainer = L.Trainer(max_epochs=2, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, accelerator="cpu",
                            limit_val_batches=0)
        trainer.fit(module, train_dataloaders=mixed_loader)
        losses[compile] = float(trainer.callback_metrics["train_loss"])
        assert module._compiled_losses == {}
    assert losses[True] == pytest.approx(losses[False], rel=1e-3), losses
