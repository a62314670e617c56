"""AdamW with a learning-rate schedule, shared by the training modules."""

import math

import lightning as L
import torch

SCHEDULERS = ("cosine", "step", "plateau", "none")


def configure_adamw(module: L.LightningModule, lr: float, weight_decay: float, scheduler: str = "cosine",
                    warmup_epochs: float = 0.0, min_lr_ratio: float = 0.01, step_size: int = 25, gamma: float = 0.5,
                    monitor: str = "val_loss"):
    """The return value of ``configure_optimizers``.

    Schedules:
        "cosine": linear warm-up over ``warmup_epochs`` then cosine decay to ``min_lr_ratio * lr`` at the end
            of training (``trainer.max_epochs``/``max_steps``), stepped every optimizer step.
        "step": multiply by ``gamma`` every ``step_size`` epochs (the paper's QM9 schedule: 0.5 every 25).
        "plateau": halve the learning rate when ``monitor`` has not improved for 5 validations (floor min_lr_ratio * lr).
        "none": constant.
    Every scheduler state is plain numbers, so checkpoints load with ``weights_only=True``.
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    if scheduler == "none":
        return opt
    if scheduler == "step":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: gamma ** (epoch // step_size))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
    if scheduler == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=5, min_lr=lr * min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": monitor}}
    total = max(int(module.trainer.estimated_stepping_batches), 1)
    batches_per_epoch = total / max(module.trainer.max_epochs or 1, 1)
    warmup = int(warmup_epochs * batches_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min((step - warmup) / max(total - warmup, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
