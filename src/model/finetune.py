"""Fine-tuning the backbone in phases: frozen (eval mode, features match the feature cache) up to the unfreeze
epoch, then trainable, whole or its last stages, with BatchNorm on batch or running statistics.

The two phases are two fits of one run, in the same processes: the frozen phase's fit stops at the unfreeze
epoch, and the fine-tuning phase's fit continues from its last checkpoint (weights, optimizer and scheduler
states, loop counters, callbacks, random states: as `--resume` does) with the chosen stages trainable from the
start. DDP synchronises only the parameters that are trainable when it wraps the model (Lightning issue
#20340), so stages unfrozen inside a fit would train apart on each process; in a fit of their own they are
trainable before the strategy wraps the model.
"""

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BaseFinetuning
from torch import nn

from src.model.geomodel import GeoModel

FROZEN, FINE_TUNING = "frozen", "fine-tuning"  # the phases, as checkpoints name them (`PHASE_KEY`)
PHASE_KEY = "phase"  # the checkpoint entry naming the phase it was written in


def phase_of(unfreeze_at_epoch: int | None, epoch: int) -> str:
    """The phase `epoch` belongs to: fine-tuning from the unfreeze epoch on (None: never), frozen before it."""
    return FINE_TUNING if unfreeze_at_epoch is not None and epoch >= unfreeze_at_epoch else FROZEN


def phase_starts(unfreeze_at_epoch: int | None, epochs: int, first_epoch: int = 0) -> list[int]:
    """The epochs at which a run of `epochs` epochs that starts at `first_epoch` (a resumed run's) starts a fit:
    its first epoch, and the unfreeze epoch when the backbone unfreezes after it and within the run."""
    if unfreeze_at_epoch is not None and first_epoch < unfreeze_at_epoch < epochs:
        return [first_epoch, unfreeze_at_epoch]
    return [first_epoch]


class FreezeThenUnfreeze(BaseFinetuning):
    """The backbone in the phase of a fit that starts at `first_epoch` (`phase_of`).

    Frozen phase: the whole backbone is frozen and in eval mode (fixed BatchNorm statistics, so features match
    the feature cache); the fit stops after the epoch before `unfreeze_at_epoch`, where the fine-tuning phase's fit
    takes over. Fine-tuning phase: the last `blocks` stages (0: all) are trainable from the fit's start, before the
    strategy wraps the model; they train with BatchNorm in train mode (batch statistics) unless `freeze_bn` keeps
    every BatchNorm on its running statistics (for small batches). Their learning rate is the backbone parameter
    group's (`lr_finetune`, see configure_optimizers); `restart_lr` is that group's rate at the unfreeze epoch (for
    a scheduler, like ReduceLROnPlateau, that may have reduced it while the backbone was frozen).

    Every checkpoint written during the fit names its phase (`PHASE_KEY`)."""

    def __init__(self, unfreeze_at_epoch: int | None, blocks: int = 0, freeze_bn: bool = False,
                 restart_lr: float | None = None, first_epoch: int = 0):
        super().__init__()
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.blocks = blocks
        self.freeze_bn = freeze_bn
        self.restart_lr = restart_lr
        self.phase = phase_of(unfreeze_at_epoch, first_epoch)

    def freeze_before_training(self, pl_module: GeoModel) -> None:
        self.freeze(pl_module.backbone, train_bn=False)
        if self.phase == FINE_TUNING:  # trainable before DDP wraps the model, so DDP synchronises them
            self.make_trainable(pl_module.backbone.last_stages(self.blocks))

    def finetune_function(self, pl_module: GeoModel, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if self.phase == FINE_TUNING and epoch == self.unfreeze_at_epoch and self.restart_lr is not None:
            for group in optimizer.param_groups:
                if group.get("name") == "backbone":
                    group["lr"] = self.restart_lr

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: GeoModel) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        set_backbone_modes(pl_module, self.freeze_bn)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: GeoModel) -> None:
        if phase_of(self.unfreeze_at_epoch, trainer.current_epoch + 1) != self.phase:
            trainer.should_stop = True  # the next epoch is the next phase's: its own fit

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: GeoModel, checkpoint: dict) -> None:
        checkpoint[PHASE_KEY] = self.phase


def set_backbone_modes(model: GeoModel, freeze_bn: bool = False) -> None:
    """Frozen backbone parts in eval mode (BatchNorm on its running statistics, dropout off), trainable
    ones in train mode; with `freeze_bn` every BatchNorm stays in eval mode. Lightning restores the
    modules' own modes at each epoch, so this runs at every epoch start (resumed runs included)."""
    for module in model.backbone.modules():  # parents before children: mixed parents are left to their children
        trainable = [p.requires_grad for p in module.parameters()]
        if trainable and all(trainable):
            module.train()
        elif trainable and not any(trainable):
            module.eval()
    if freeze_bn:
        for module in model.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
