"""Fine-tuning the backbone: frozen (eval mode, features match the feature cache) until an epoch, then
trainable, whole or its last stages, with BatchNorm on batch or running statistics."""

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BaseFinetuning
from torch import nn

from src.model.geomodel import GeoModel


def backbone_frozen(model: GeoModel) -> bool:
    """True when no backbone parameter is trainable."""
    return not any(p.requires_grad for p in model.backbone.parameters())


class FreezeThenUnfreeze(BaseFinetuning):
    """The backbone starts frozen (eval mode: fixed BatchNorm statistics, so features match the
    feature cache); at `unfreeze_at_epoch` its last `blocks` stages (0: all) become trainable.
    Their learning rate is the backbone parameter group's (`lr_finetune`, see configure_optimizers).
    Unfrozen stages train with BatchNorm in train mode (batch statistics), unless `freeze_bn`
    keeps every BatchNorm on its running statistics (for small batches). `restart_lr`: the backbone group's
    learning rate at the unfreeze epoch (for a scheduler, like ReduceLROnPlateau, that may have reduced it
    while the backbone was frozen)."""

    def __init__(self, unfreeze_at_epoch: int | None, blocks: int = 0, freeze_bn: bool = False,
                 restart_lr: float | None = None):
        super().__init__()
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.blocks = blocks
        self.freeze_bn = freeze_bn
        self.restart_lr = restart_lr

    def freeze_before_training(self, pl_module: GeoModel) -> None:
        self.freeze(pl_module.backbone, train_bn=False)
        if self.unfreeze_at_epoch == 0:  # trainable before DDP wraps the model, so DDP synchronises them
            self.make_trainable(pl_module.backbone.last_stages(self.blocks))

    def finetune_function(self, pl_module: GeoModel, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        # `>=` so that a run resumed after the unfreeze epoch unfreezes again
        if self.unfreeze_at_epoch is not None and epoch >= self.unfreeze_at_epoch and backbone_frozen(pl_module):
            self.make_trainable(pl_module.backbone.last_stages(self.blocks))
        if epoch == self.unfreeze_at_epoch and self.restart_lr is not None:
            for group in optimizer.param_groups:
                if group.get("name") == "backbone":
                    group["lr"] = self.restart_lr

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: GeoModel) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        set_backbone_modes(pl_module, self.freeze_bn)


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
