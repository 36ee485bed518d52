"""GeoModel: a shared backbone over the four views, concatenated features, a classification or
regression head; plus the freeze-then-unfreeze fine-tuning callback.

Classification predicts the probability-weighted mean of class centroids (EPSG:3766 metres);
regression predicts min-max scaled EPSG:3766 x/y. Distances are always great-circle km.
"""

import math
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BaseFinetuning
from torch import nn
from torch.nn import functional as F

from src.backbones import Backbone, create_backbone
from src.geo import haversine_km_torch, unproject
from src.grid import CENTROID_KINDS
from src.images import N_VIEWS

APPROACHES = ("classification", "regression")
OPTIMIZERS = ("adam", "adamw")
SCHEDULERS = ("plateau", "onecycle", "cosine", "none")


def scale_xy(xy: torch.Tensor, scaler: dict[str, float]) -> torch.Tensor:
    """EPSG:3766 metres -> [0, 1] over the train extent (min-max per axis)."""
    low = xy.new_tensor([scaler["x_min"], scaler["y_min"]])
    high = xy.new_tensor([scaler["x_max"], scaler["y_max"]])
    return (xy - low) / (high - low)


def unscale_xy(scaled: torch.Tensor, scaler: dict[str, float]) -> torch.Tensor:
    """Inverse of `scale_xy`."""
    low = scaled.new_tensor([scaler["x_min"], scaler["y_min"]])
    high = scaled.new_tensor([scaler["x_max"], scaler["y_max"]])
    return scaled * (high - low) + low


def weighted_centroid_xy(probabilities: torch.Tensor, class_xy: torch.Tensor, topk: int = 0) -> torch.Tensor:
    """Probability-weighted mean [B, 2] of class centroids [C, 2]; with topk > 0 only the k most
    likely classes count (their probabilities renormalised)."""
    probabilities = probabilities.to(class_xy.dtype)
    if 0 < topk < probabilities.shape[1]:
        top = probabilities.topk(topk, dim=1)
        probabilities = torch.zeros_like(probabilities).scatter(1, top.indices, top.values)
    probabilities = probabilities / probabilities.sum(dim=1, keepdim=True)
    return probabilities @ class_xy


def xy_to_km(xy: torch.Tensor, lat: torch.Tensor, lng: torch.Tensor) -> torch.Tensor:
    """Great-circle km between predicted EPSG:3766 points [B, 2] and true lat/lng [B]."""
    xy = xy.detach().double().cpu().numpy()
    pred_lat, pred_lng = unproject(xy[:, 0], xy[:, 1])
    return haversine_km_torch(
        torch.as_tensor(np.atleast_1d(pred_lat)), torch.as_tensor(np.atleast_1d(pred_lng)),
        lat.detach().double().cpu(), lng.detach().double().cpu(),
    )


class GeoModel(pl.LightningModule):
    """Quadruplet geolocation model; `hparams` hold everything predict needs (see src/train.py)."""

    def __init__(
        self,
        approach: str,
        backbone: str,
        image_size: int,
        classes: dict[str, list],
        scaler: dict[str, float],
        centroids: str = "weighted",
        topk: int = 0,
        hidden: int = 512,
        dropout: float = 0.2,
        lr: float = 1e-3,
        lr_finetune: float = 1e-4,
        unfreeze_at_epoch: int | None = None,
        unfreeze_blocks: int = 0,
        optimizer: str = "adamw",
        weight_decay: float = 1e-4,
        scheduler: str = "plateau",
        warmup_epochs: int = 1,
        seed: int = 0,
        spacing: float = 0.5,
        dataset_dirs: list[str] | None = None,
        split_fractions: list[float] | None = None,
        holdout_dirs: list[str] | None = None,
        full_decode: bool = False,
        max_outside_km: float = 10.0,
        mainland_only: bool = False,
        cells: str = "grid",
        n_classes: int = 0,
        split_by: str = "location",
        prior_lat: float = 0.0,
        prior_lng: float = 0.0,
        test_locations: list[list[str]] | None = None,
        backbone_weights: str = "imagenet",
        pretrained: bool = False,
    ):
        """`pretrained` loads ImageNet weights into the backbone now; it is not saved, so
        `load_from_checkpoint` rebuilds the backbone without downloads and loads the state dict.

        The data hparams (seed, spacing, dataset_dirs, split_fractions, holdout_dirs, full_decode,
        max_outside_km, mainland_only, cells, n_classes, split_by; paths absolute; see
        `src.enrich.data_hparams`) are not used here: with them `src.enrich.enrich` rebuilds the run's
        locations, split and cells exactly. None means enrich's default."""
        super().__init__()
        if approach not in APPROACHES:
            raise ValueError(f"approach must be one of {APPROACHES}")
        if centroids not in CENTROID_KINDS:
            raise ValueError(f"centroids must be one of {CENTROID_KINDS}")
        self.save_hyperparameters(ignore=["pretrained"], logger=False)
        self.backbone: Backbone = create_backbone(backbone, pretrained)
        n_outputs = len(classes["cell"]) if approach == "classification" else 2
        in_features = N_VIEWS * self.backbone.out_features
        if hidden > 0:
            self.head = nn.Sequential(
                nn.Dropout(dropout), nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
                nn.Dropout(dropout), nn.Linear(hidden, n_outputs),
            )
        else:
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, n_outputs))
        with torch.no_grad():  # start from the prior: class frequencies / the middle of the train extent
            last = self.head[-1]
            if approach == "classification":
                last.bias.copy_(torch.log(torch.tensor(classes["n_train"], dtype=torch.float32).clamp(min=1)))
            else:
                last.bias.fill_(0.5)
        self.register_buffer("class_xy", torch.tensor(classes[centroids], dtype=torch.float64), persistent=False)
        self._test_km: list[torch.Tensor] = []
        self.test_km = np.empty(0)
        self.channels_last = False  # set by train for convolutional backbones on a GPU (not a hparam)

    # ---- forward ------------------------------------------------------------------------------
    def view_features(self, views: torch.Tensor) -> torch.Tensor:
        """[B, 4, 3, H, W] -> [B, 4, D]: the backbone on all B x 4 images in one batched forward."""
        batch, n_views = views.shape[:2]
        images = views.flatten(0, 1)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.backbone(images).reshape(batch, n_views, -1)

    def head_forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, 4, D] view features -> outputs (class logits or scaled x/y), views concatenated in order."""
        return self.head(features.flatten(1))

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """[B, 4, 3, H, W] -> class logits [B, C] (classification) or scaled x/y [B, 2] (regression)."""
        return self.head_forward(self.view_features(views))

    def outputs_to_xy(self, outputs: torch.Tensor) -> torch.Tensor:
        """Head outputs -> EPSG:3766 metres [B, 2]."""
        if self.hparams.approach == "classification":
            return weighted_centroid_xy(outputs.float().softmax(dim=1), self.class_xy, self.hparams.topk)
        return unscale_xy(outputs.double(), self.hparams.scaler)

    def predict_xy(self, views: torch.Tensor) -> torch.Tensor:
        """[B, 4, 3, H, W] -> predicted EPSG:3766 x/y [B, 2] in metres (eval mode, no grad)."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self.outputs_to_xy(self(views.to(self.device)))
        finally:
            self.train(was_training)

    # ---- steps --------------------------------------------------------------------------------
    def _outputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "features" in batch:
            return self.head_forward(batch["features"])
        return self(batch["views"])

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self._outputs(batch)
        size = len(outputs)
        sync = True  # epoch metrics averaged over all processes: every rank picks the same best checkpoint
        if self.hparams.approach == "classification":
            loss = F.cross_entropy(outputs.float(), batch["label"])
            accuracy = (outputs.argmax(dim=1) == batch["label"]).float().mean()
            self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, batch_size=size, sync_dist=sync)
        else:  # the loss in float32 whatever the precision: targets are metres scaled to [0, 1]
            target = scale_xy(batch["xy"], self.hparams.scaler).float()
            loss = F.mse_loss(outputs.float(), target)
        km = xy_to_km(self.outputs_to_xy(outputs), batch["lat"], batch["lng"])
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=stage != "test", batch_size=size,
                 sync_dist=sync)
        self.log(f"{stage}/km_mean", km.mean().float(), on_step=False, on_epoch=True, prog_bar=stage == "val",
                 batch_size=size, sync_dist=sync)
        return loss, km

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")[0]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def on_test_epoch_start(self) -> None:
        self._test_km = []

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        km = self._step(batch, "test")[1]
        self._test_km.append(torch.stack([batch["index"].double().cpu(), km]))

    def on_test_epoch_end(self) -> None:
        """`test_km`: km per test location in the split's order, gathered from every process; the
        locations DistributedSampler repeats to even out the processes' shares are counted once."""
        local = torch.cat(self._test_km, dim=1) if self._test_km else torch.empty(2, 0, dtype=torch.float64)
        if self.trainer.world_size > 1:
            local = self.all_gather(local.to(self.device)).cpu()  # [world, 2, n]: equal shares
            local = local.permute(1, 0, 2).flatten(1)
        _, first = np.unique(local[0].numpy().astype(np.int64), return_index=True)
        self.test_km = local[1].numpy()[first]
        if len(self.test_km):
            self.log("test/km_median", float(np.median(self.test_km)))  # the same on every rank

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.outputs_to_xy(self._outputs(batch))

    # ---- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """Two parameter groups: the head at `lr`, the backbone at `lr_finetune`.

        The backbone group is present from the start; while the backbone is frozen its parameters
        have no gradients, so the optimizer leaves them alone (and schedulers see a fixed set of groups).
        """
        hp = self.hparams
        groups = [
            {"params": list(self.head.parameters()), "lr": hp.lr, "name": "head"},
            {"params": list(self.backbone.parameters()), "lr": hp.lr_finetune, "name": "backbone"},
        ]
        optimizer_class = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
        optimizer = optimizer_class(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return optimizer
        if hp.scheduler == "plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=2)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/km_mean", "interval": "epoch"}}
        if hp.scheduler == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=[hp.lr, hp.lr_finetune], total_steps=max(1, int(self.trainer.estimated_stepping_batches)))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        max_epochs = max(1, self.trainer.max_epochs or 1)
        warmup = max(0, min(hp.warmup_epochs, max_epochs - 1))

        def cosine_with_warmup(epoch: int) -> float:
            if epoch < warmup:
                return (epoch + 1) / (warmup + 1)
            return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(1, max_epochs - warmup)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def backbone_frozen(model: GeoModel) -> bool:
    """True when no backbone parameter is trainable."""
    return not any(p.requires_grad for p in model.backbone.parameters())


class FreezeThenUnfreeze(BaseFinetuning):
    """The backbone starts frozen (eval mode: fixed BatchNorm statistics, so features match the
    feature cache); at `unfreeze_at_epoch` its last `blocks` stages (0: all) become trainable.
    Their learning rate is the backbone parameter group's (`lr_finetune`, see configure_optimizers).
    Unfrozen stages train with BatchNorm in train mode (batch statistics), unless `freeze_bn`
    keeps every BatchNorm on its running statistics (for small batches)."""

    def __init__(self, unfreeze_at_epoch: int | None, blocks: int = 0, freeze_bn: bool = False):
        super().__init__()
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.blocks = blocks
        self.freeze_bn = freeze_bn

    def freeze_before_training(self, pl_module: GeoModel) -> None:
        self.freeze(pl_module.backbone, train_bn=False)
        if self.unfreeze_at_epoch == 0:  # trainable before DDP wraps the model, so DDP synchronises them
            self.make_trainable(pl_module.backbone.last_stages(self.blocks))

    def finetune_function(self, pl_module: GeoModel, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        # `>=` so that a run resumed after the unfreeze epoch unfreezes again
        if self.unfreeze_at_epoch is not None and epoch >= self.unfreeze_at_epoch and backbone_frozen(pl_module):
            self.make_trainable(pl_module.backbone.last_stages(self.blocks))

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
