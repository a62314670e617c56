"""QM9 splits as a LightningDataModule: one-time processing, literature splits, subsets, saved split indices."""

import io
from pathlib import Path
from typing import Dict, Optional

import lightning as L
import numpy as np
import torch
from torch_geometric.loader import DataLoader

from ..data.qm9 import QM9
from ..io import atomic_write


class QM9DataModule(L.LightningDataModule):
    """Train / val / test views of :class:`molkern.data.QM9` for one named split.

    Args:
        root: cache directory of the processed dataset (default ``data/qm9``).
        source, raw_path, graph, cutoff, max_molecules: as in :class:`molkern.data.QM9`
            (``source="qm9pack"`` needs no download).
        split: ``"cormorant"`` (100,000 / 17,748 / 13,083, seed 0) or ``"dimenet"`` (110,000 / 10,000 / 10,831, seed 42).
        train_subset, val_subset, test_subset: keep only the first N molecules of a part (CPU budgets);
            None keeps the whole part. The parts are fixed permutations, so a prefix is a random subset.
        batch_size: training molecules per batch (per process under DDP); eval_batch_size: for val/test
            (default 4 x batch_size).
        num_workers: DataLoader workers; processing_workers: processes for the one-time processing.
        shuffle: reshuffle the training part every epoch (False: fixed order, e.g. to compare 1 and 2 processes).

    The split indices actually used (molecule ``idx`` in the 130,831 ordering) are written to
    ``<log dir>/splits.npz`` when a Trainer with a log directory is attached.
    """

    def __init__(
        self,
        root: str = "data/qm9",
        source: str = "qm9pack",
        raw_path: Optional[str] = None,
        graph: str = "bonds",
        cutoff: Optional[float] = None,
        max_molecules: Optional[int] = None,
        split: str = "cormorant",
        train_subset: Optional[int] = None,
        val_subset: Optional[int] = None,
        test_subset: Optional[int] = None,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        processing_workers: Optional[int] = None,
        shuffle: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.dataset: Optional[QM9] = None
        self.parts: Dict[str, QM9] = {}

    def _load(self) -> QM9:
        hp = self.hparams
        return QM9(
            hp.root, source=hp.source, raw_path=hp.raw_path, graph=hp.graph, cutoff=hp.cutoff,
            max_molecules=hp.max_molecules, num_workers=hp.processing_workers,
        )

    def prepare_data(self):
        self._load()  # processes once and caches (rank 0 only under DDP)

    def split_indices(self) -> Dict[str, np.ndarray]:
        """{"train", "val", "test"} -> molecule indices used, after the subsets."""
        hp = self.hparams
        n = hp.max_molecules or QM9.num_molecules
        parts = QM9.split_indices(hp.split, num_molecules=n)
        for part, size in (("train", hp.train_subset), ("val", hp.val_subset), ("test", hp.test_subset)):
            if size is not None:
                if not 0 < int(size) <= len(parts[part]):
                    raise ValueError(f"{part}_subset must be in 1..{len(parts[part])}, got {size}")
                parts[part] = parts[part][: int(size)]
        return parts

    def setup(self, stage: Optional[str] = None):
        if self.dataset is None:
            self.dataset = self._load()
            self.parts = {part: self.dataset.subset(ind) for part, ind in self.split_indices().items()}
        log_dir = self.trainer.log_dir if self.trainer is not None else None  # a collective under DDP: all ranks
        if log_dir and self.trainer.is_global_zero:
            self.save_splits(Path(log_dir) / "splits.npz")

    def save_splits(self, path) -> Path:
        """Write the indices used as ``splits.npz`` (train_idx, val_idx, test_idx, name), atomically."""
        parts = {part: view.mol_idx for part, view in self.parts.items()}
        buf = io.BytesIO()
        np.savez(buf, train_idx=parts["train"], val_idx=parts["val"], test_idx=parts["test"],
                 name=np.array(self.hparams.split))
        return atomic_write(path, buf.getvalue())

    def target_stats(self, targets, extensive) -> Dict[str, torch.Tensor]:
        """Normalisation of the chosen targets from the training part only.

        Intensive targets: y_norm = (y - mean) / std. Extensive ones (sum over atoms): mean per atom
        m = mean(y / N) and y_norm = (y - N m) / std(y - N m).

        Returns:
            {"mean": (T,), "std": (T,)} float64, in the targets' units (mean per atom for extensive targets).
        """
        train = self.parts["train"]
        cols = [QM9.target_index(t) for t in targets]
        y = train.targets()[:, cols]  # (M, T) float64
        n = torch.as_tensor(train.num_atoms(), dtype=torch.float64)[:, None]  # (M, 1)
        ext = torch.as_tensor(extensive, dtype=torch.bool)
        mean = torch.where(ext, (y / n).mean(0), y.mean(0))
        resid = y - torch.where(ext, n * mean, mean)
        std = resid.std(0, unbiased=False).clamp(min=1e-12)
        return {"mean": mean, "std": std}

    def _loader(self, part: str, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(self.parts[part], batch_size=batch_size, shuffle=shuffle,
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self):
        return self._loader("train", self.hparams.shuffle, self.hparams.batch_size)

    def val_dataloader(self):
        return self._loader("val", False, self.hparams.eval_batch_size or 4 * self.hparams.batch_size)

    def test_dataloader(self):
        return self._loader("test", False, self.hparams.eval_batch_size or 4 * self.hparams.batch_size)

    def predict_dataloader(self):
        return self.test_dataloader()
