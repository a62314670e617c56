"""Demo: train a small MolkernNet on EMT energies of rattled G2 molecules (built locally, offline).

Run as `python -m molkern.demo [--epochs N] [--quick] [--group o3] [--kernel factorised] [--split molecules]`.

Data: every molecule of ASE's G2 collection with >= 2 atoms made of H, C, N, O only; for each, several randomly
rattled conformations labelled with ASE's EMT energy. Nodes carry a one-hot over (H, C, N, O); edges join all
pairs closer than 4 A. The model predicts the energy minus a per-species linear baseline (least squares of E
on element counts, fitted on the training set), in units of the std of the training residuals.
"""

import argparse
import math
import time

import numpy as np
import torch

from . import groups
from .models import KERNELS, MolkernNet, average_num_neighbors

SPECIES = ("H", "C", "N", "O")
CUTOFF = 4.0  # Angstrom


def build_dataset(num_conformations=16, seed=0, dtype=torch.float32):
    """Rattled G2 molecules (H, C, N, O only, >= 2 atoms) labelled with EMT energies.

    Returns a list of dicts: molecule (G2 name), pos (n, 3) Angstrom, attrs (n, 4) one-hot over SPECIES,
    counts (4,) float64 element counts, edge_index (2, E) [source, target] of pairs within CUTOFF, energy (eV).
    """
    from ase.build import molecule
    from ase.calculators.emt import EMT
    from ase.collections import g2

    rng = np.random.default_rng(seed)
    samples = []
    for name in g2.names:
        symbols = g2[name].get_chemical_symbols()
        if len(symbols) < 2 or not set(symbols) <= set(SPECIES):
            continue
        types = torch.tensor([SPECIES.index(s) for s in symbols])
        attrs = torch.nn.functional.one_hot(types, len(SPECIES)).to(dtype)  # (n, 4)
        for _ in range(num_conformations):
            atoms = molecule(name)
            atoms.rattle(stdev=float(rng.uniform(0.05, 0.1)), seed=int(rng.integers(2**31)))
            atoms.calc = EMT()
            energy = float(atoms.get_potential_energy())
            pos = torch.tensor(atoms.get_positions(), dtype=dtype)  # (n, 3)
            close = (torch.cdist(pos, pos) < CUTOFF) & ~torch.eye(len(pos), dtype=torch.bool)  # (n, n) [i, j]
            edge_index = close.nonzero().t().flip(0)  # (2, E): row 0 source j, row 1 target i
            samples.append(dict(molecule=name, pos=pos, attrs=attrs, counts=attrs.sum(0).double(),
                                edge_index=edge_index, energy=energy))
    return samples


def collate(samples):
    """Concatenate molecules into one graph: pos, attrs, edge_index shifted by node offsets, batch (N,)."""
    sizes = [len(s["pos"]) for s in samples]
    offsets = np.cumsum([0] + sizes[:-1])
    return dict(
        pos=torch.cat([s["pos"] for s in samples]),
        attrs=torch.cat([s["attrs"] for s in samples]),
        edge_index=torch.cat([s["edge_index"] + int(o) for s, o in zip(samples, offsets)], dim=1),
        batch=torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(sizes)),
        num_graphs=len(samples),
    )


def split(samples, by, seed):
    """80/20 train/val split of whole molecules (`by="molecules"`) or of conformations (`by="conformations"`)."""
    gen = torch.Generator().manual_seed(seed)
    if by == "molecules":
        names = sorted({s["molecule"] for s in samples})
        perm = torch.randperm(len(names), generator=gen).tolist()
        val_names = {names[i] for i in perm[: round(0.2 * len(names))]}
        return ([s for s in samples if s["molecule"] not in val_names],
                [s for s in samples if s["molecule"] in val_names])
    perm = torch.randperm(len(samples), generator=gen).tolist()
    n_val = round(0.2 * len(samples))
    return [samples[i] for i in perm[n_val:]], [samples[i] for i in perm[:n_val]]


def energies(samples):
    """EMT energies (M,) float64."""
    return torch.tensor([s["energy"] for s in samples], dtype=torch.float64)


def fit_baseline(samples):
    """Per-species reference energies (4,) eV: least squares of E on element counts."""
    counts = torch.stack([s["counts"] for s in samples])  # (M, 4)
    return torch.linalg.lstsq(counts, energies(samples)[:, None], driver="gelsd").solution[:, 0]


def baseline_energy(samples, refs):
    """Baseline energies (M,) float64: element counts @ per-species references."""
    return torch.stack([s["counts"] for s in samples]) @ refs


def mae(pred, samples):
    """(MAE in eV, MAE in meV/atom) of predicted energies pred (M,) float64."""
    natoms = torch.tensor([len(s["pos"]) for s in samples], dtype=torch.float64)
    err = (pred - energies(samples)).abs()
    return err.mean().item(), 1000 * (err / natoms).mean().item()


def forward(model, samples):
    """Model output (M,) for a list of molecules, batched into one graph."""
    b = collate(samples)
    return model(b["pos"], b["attrs"], b["edge_index"], batch=b["batch"], num_graphs=b["num_graphs"])[:, 0]


@torch.no_grad()
def predict(model, samples, refs, scale, batch_size=256):
    """Model energies (M,) float64 eV: baseline + scale * model output (eval mode)."""
    model.eval()
    out = torch.cat([forward(model, samples[i: i + batch_size]) for i in range(0, len(samples), batch_size)])
    return baseline_energy(samples, refs) + scale * out.double()


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m molkern.demo", description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 24; 5 with --quick)")
    p.add_argument("--quick", action="store_true", help="~10 s run on a smaller data set (used by the tests)")
    p.add_argument("--group", default="o3", help=f"a molkern.groups name: {', '.join(groups.available())}")
    p.add_argument("--group-n", type=int, default=2, help="order n for --group cn / dn")
    p.add_argument("--kernel", default="factorised", choices=KERNELS)
    p.add_argument("--split", default="molecules", choices=("molecules", "conformations"),
                   help="80/20 split of whole molecules (val molecules unseen) or of conformations")
    p.add_argument("--conformations", type=int, default=None, help="per molecule (default 16; 3 with --quick)")
    p.add_argument("--batch-size", type=int, default=None, help="molecules per step (default 32; 16 with --quick)")
    p.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate, cosine-decayed to lr/20")
    p.add_argument("--output-scale", type=float, default=0.1,
                   help="factor on the summed model output (keeps the initial predictions ~ the target scale)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads during the run, restored after (0: unchanged); 1 is fastest for these small "
                        "tensors and robust on a busy machine")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bar")
    return p.parse_args(argv)


def main(argv=None):
    """Run the demo with command-line arguments `argv` (None: sys.argv); print the report, return the result dict."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args):
    """Build the data, fit the baseline, train the model; print a report and return it as a dict."""
    from tqdm import tqdm

    epochs = args.epochs if args.epochs is not None else (5 if args.quick else 24)
    n_conf = args.conformations if args.conformations is not None else (3 if args.quick else 16)
    batch_size = args.batch_size if args.batch_size is not None else (16 if args.quick else 32)
    dtype = getattr(torch, args.dtype)
    group = groups.get(args.group, n=args.group_n) if args.group.lower() in ("cn", "dn") else groups.get(args.group)
    torch.manual_seed(args.seed)

    samples = build_dataset(n_conf, seed=args.seed, dtype=dtype)
    train, val = split(samples, args.split, args.seed)
    refs = fit_baseline(train)
    residual = energies(train) - baseline_energy(train, refs)  # (M_train,) eV
    scale = residual.std().item()  # eV per unit of normalised target
    targets = (residual / scale).to(dtype)

    avg_nn = average_num_neighbors([s["edge_index"] for s in train], [len(s["pos"]) for s in train])
    model = MolkernNet(
        irreps_node_attr="4x0e", irreps_out="1x0e", pooling="sum", group=group, kernel=args.kernel,
        lmax=1, num_channels=16, num_layers=2, cutoff=CUTOFF, avg_num_neighbors=avg_nn,
    ).to(dtype)
    num_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=args.lr / 20)

    losses = []  # mean training MSE (normalised units) per epoch
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc="train", unit="epoch", disable=args.no_progress)
    for _ in bar:
        model.train()
        perm = torch.randperm(len(train)).tolist()
        total = 0.0
        for i in range(0, len(perm), batch_size):
            idx = perm[i: i + batch_size]
            pred = args.output_scale * forward(model, [train[j] for j in idx])  # (B,)
            loss = torch.nn.functional.mse_loss(pred, targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        losses.append(total / len(train))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    train_time = time.perf_counter() - start

    base_ev, base_mev = mae(baseline_energy(val, refs), val)
    model_ev, model_mev = mae(predict(model, val, refs, scale * args.output_scale), val)
    beats = math.isfinite(model_ev) and model_ev < base_ev
    result = dict(
        split=args.split, group=args.group, kernel=args.kernel, dtype=args.dtype, epochs=epochs, seed=args.seed,
        num_molecules=len({s["molecule"] for s in samples}), num_conformations=len(samples),
        num_train=len(train), num_val=len(val), num_params=num_params, train_time=train_time,
        baseline_mae_ev=base_ev, baseline_mae_mev_atom=base_mev, model_mae_ev=model_ev, model_mae_mev_atom=model_mev,
        beats_baseline=beats, losses=losses,
    )
    print(f"data: {result['num_molecules']} G2 molecules (H,C,N,O) x {n_conf} rattled conformations = "
          f"{len(samples)} EMT energies; split by {args.split} 80/20 (seed {args.seed}): "
          f"{len(train)} train / {len(val)} val conformations")
    print(f"model: MolkernNet group={args.group} kernel={args.kernel} {args.dtype}, {num_params} parameters, "
          f"avg_num_neighbors {avg_nn:.2f}")
    print(f"training: {epochs} epochs in {train_time:.1f} s, loss (normalised MSE) {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"val MAE  per-species linear baseline: {base_ev:.4f} eV  {base_mev:.2f} meV/atom")
    print(f"val MAE  trained model:               {model_ev:.4f} eV  {model_mev:.2f} meV/atom")
    print(f"sanity: the model {'beats' if beats else 'does NOT beat'} the baseline "
          f"({model_ev:.4f} vs {base_ev:.4f} eV, ratio {model_ev / base_ev:.2f})")
    return result


if __name__ == "__main__":
    main()
