"""GeoModel: a shared backbone over the four views, a fusion of their embeddings (`src.heads`), and a
classification, regression or hybrid head; plus the freeze-then-unfreeze fine-tuning callback.

Classification turns class probabilities into a point by a prediction rule over the class centroids
(EPSG:3766 metres; mean, median or mode, `src.heads`); hybrid does the same over the centroids moved by
offsets it regresses inside each cell; regression predicts min-max scaled EPSG:3766 x/y. Distances are
always great-circle km.
"""

import math
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from src.model.backbones import Backbone, create_backbone
from src.core.geo import haversine_km, haversine_km_torch, snap_to_land, unproject, unproject_torch
from src.core.choices import CENTROID_KINDS, REFINE_METHODS
from src.inference.retrieval import refine
from src.model.config import APPROACHES, ClassTable, ModelConfig, OptimConfig, model_hparams
from src.model.heads import HybridHead, create_fusion, haversine_smoothing_loss, hybrid_loss, hybrid_points, point_by_rule
from src.core.choices import PREDICT_RULES
from src.data.images import N_VIEWS
from src.evaluation.calibration import Calibration, Labelled, centroid_samples, fit_calibration



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


def xy_to_km(xy: torch.Tensor, lat: torch.Tensor, lng: torch.Tensor) -> torch.Tensor:
    """Great-circle km between predicted EPSG:3766 points [B, 2] and true lat/lng [B], computed in float64 on
    the tensors' device with no host transfer (the metric of the training and validation steps; evaluation
    moves points onto land first, `src.core.geo.snap_to_land`)."""
    pred_lat, pred_lng = unproject_torch(xy[:, 0], xy[:, 1])
    return haversine_km_torch(pred_lat, pred_lng, lat.double(), lng.double())


def snapped_km(xy: np.ndarray, lat: np.ndarray, lng: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(points moved onto land as predict moves them, their great-circle km to the truth), on the host."""
    snapped = np.column_stack(snap_to_land(xy[:, 0], xy[:, 1]))
    pred_lat, pred_lng = unproject(snapped[:, 0], snapped[:, 1])
    return snapped, haversine_km(pred_lat, pred_lng, lat, lng)


class GeoModel(pl.LightningModule):
    """Quadruplet geolocation model over its three configs; `hparams` are their flat union
    (`src.model.config.model_hparams`), everything predict needs."""

    def __init__(self, model: ModelConfig, optim: OptimConfig, classes: ClassTable, pretrained: bool = False):
        """`pretrained` loads ImageNet weights into the backbone now; it is not saved, so a checkpoint is
        rebuilt without downloads (`src.inference.checkpoints.load_model`) and its state dict loaded.

        `model.image_mean`/`image_std`: the input normalisation (the backbone's, `src.model.backbones`).
        `classes.radius` (hybrid): each class's cell radius in metres, the unit of its offsets from the
        `model.centroids` it was trained with.
        """
        super().__init__()
        if model.approach not in APPROACHES:
            raise ValueError(f"approach must be one of {APPROACHES}")
        if model.centroids not in CENTROID_KINDS:
            raise ValueError(f"centroids must be one of {CENTROID_KINDS}")
        if model.predict_rule not in PREDICT_RULES:
            raise ValueError(f"predict_rule must be one of {PREDICT_RULES}")
        if model.refine not in REFINE_METHODS:
            raise ValueError(f"refine must be one of {REFINE_METHODS}")
        if model.approach == "hybrid" and classes.radius is None:
            raise ValueError("a hybrid model needs classes.radius (src.model.heads.class_radius_m)")
        self.config, self.optim, self.classes = model, optim, classes
        self.gallery = None  # a src.inference.retrieval.Gallery for --refine knn (set after training, or loaded)
        self.save_hyperparameters(model_hparams(model, optim, classes), logger=False)
        self.backbone: Backbone = create_backbone(model.backbone, pretrained)
        if model.channels_last:  # every registered backbone is convolutional
            self.backbone.to(memory_format=torch.channels_last)
        self.fusion = create_fusion(model.fusion, N_VIEWS, self.backbone.out_features)
        self.n_classes = len(classes)
        hidden, dropout = model.hidden, model.dropout
        width = hidden if hidden > 0 else self.fusion.out_dim
        trunk = [nn.Dropout(dropout), nn.Linear(self.fusion.out_dim, hidden), nn.ReLU(inplace=True)] if hidden > 0 else []
        if model.approach == "hybrid":
            last = HybridHead(width, self.n_classes)
            prior_bias = last.logits.bias
        else:
            last = nn.Linear(width, self.n_classes if model.approach == "classification" else 2)
            prior_bias = last.bias
        self.head = nn.Sequential(*trunk, nn.Dropout(dropout), last)
        with torch.no_grad():  # start from the prior: class frequencies / the middle of the train extent
            if model.approach == "regression":
                prior_bias.fill_(0.5)
            else:
                prior_bias.copy_(torch.log(torch.tensor(classes.n_train, dtype=torch.float32).clamp(min=1)))
        class_xy = torch.tensor(classes.centroids[model.centroids], dtype=torch.float64)
        self.register_buffer("class_xy", class_xy, persistent=False)
        class_lat, class_lng = unproject(class_xy[:, 0].numpy(), class_xy[:, 1].numpy())
        self.register_buffer("class_lat", torch.as_tensor(np.atleast_1d(class_lat), dtype=torch.float64), persistent=False)
        self.register_buffer("class_lng", torch.as_tensor(np.atleast_1d(class_lng), dtype=torch.float64), persistent=False)
        radius = classes.radius if classes.radius is not None else [1.0] * self.n_classes
        self.register_buffer("class_radius", torch.tensor(radius, dtype=torch.float64), persistent=False)
        # the calibration of the confidence regions is fitted after every validation and saved with each
        # checkpoint (not a buffer: EMA would average it); until then, uncalibrated
        samples = None
        if model.approach != "regression":
            samples = (np.asarray(classes.samples, np.float64) if classes.samples is not None
                       else centroid_samples(class_xy.numpy()))
        self.calibration = Calibration(class_samples=samples)
        self._val_outputs: list[tuple[torch.Tensor, ...]] = []  # per val batch: xy, true xy, logits, labels

    # ---- forward ------------------------------------------------------------------------------
    def view_features(self, views: torch.Tensor) -> torch.Tensor:
        """[B, 4, 3, H, W] -> [B, 4, D]: the backbone on all B x 4 images in one batched forward."""
        batch, n_views = views.shape[:2]
        images = views.flatten(0, 1)
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.backbone(images).reshape(batch, n_views, -1)

    def head_forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, 4, D] view features -> outputs: class logits [B, C], scaled x/y [B, 2], or for hybrid the
        logits and the flattened cell offsets side by side [B, 3C] (see `split_hybrid`)."""
        return self.head_outputs(self.fusion(features))

    def head_outputs(self, fused: torch.Tensor) -> torch.Tensor:
        """The head on the fused embedding [B, F] (the fusion's output; see `head_forward`)."""
        outputs = self.head(fused)
        if isinstance(outputs, tuple):
            logits, offsets = outputs
            return torch.cat([logits, offsets.flatten(1)], dim=1)
        return outputs

    @staticmethod
    def embedding(fused: torch.Tensor) -> torch.Tensor:
        """The fused embedding [B, F] as the retrieval gallery stores it: float32, L2-normalised."""
        return F.normalize(fused.float(), dim=1)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """[B, 4, 3, H, W] -> the head's outputs (see `head_forward`)."""
        return self.head_forward(self.view_features(views))

    def outputs_and_embedding(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 4, 3, H, W] -> (the head's outputs, the normalised fused embedding [B, F]) in one forward."""
        fused = self.fusion(self.view_features(views))
        return self.head_outputs(fused), self.embedding(fused)

    def split_hybrid(self, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hybrid outputs [B, 3C] -> (logits [B, C], offsets [B, C, 2] in cell radii)."""
        return outputs[:, :self.n_classes], outputs[:, self.n_classes:].reshape(-1, self.n_classes, 2)

    def class_logits(self, outputs: torch.Tensor) -> torch.Tensor:
        """The class logits [B, C] of classification or hybrid outputs."""
        return outputs[:, :self.n_classes]

    def outputs_to_xy(self, outputs: torch.Tensor, fixed_steps: bool = False) -> torch.Tensor:
        """Head outputs -> EPSG:3766 metres [B, 2], by the checkpoint's prediction rule and topk; `fixed_steps`
        runs the median rule's iterations without a convergence test (no host synchronisation)."""
        config = self.config
        if config.approach == "regression":
            return unscale_xy(outputs.double(), self.classes.scaler)
        points = self.class_xy
        if config.approach == "hybrid":
            points = hybrid_points(self.split_hybrid(outputs)[1], self.class_xy, self.class_radius)
        probabilities = self.class_logits(outputs).float().softmax(dim=1)
        return point_by_rule(config.predict_rule, probabilities, points, config.topk, fixed_steps)

    def refined_xy(self, outputs: torch.Tensor, xy: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """`xy` [B, 2] refined by the gallery (`src.inference.retrieval.refine`: numpy, on the host) when the
        model has one and its config says `refine: knn`; else `xy` itself."""
        if self.gallery is None or self.config.refine == "none":
            return xy
        probabilities = (None if self.config.approach == "regression"
                         else self.class_logits(outputs).float().softmax(dim=1).cpu().numpy())
        refined = refine(self, xy.double().cpu().numpy(), embedding.float().cpu().numpy(), probabilities)
        return torch.from_numpy(refined).to(device=xy.device, dtype=xy.dtype)

    def locate(self, views: torch.Tensor) -> torch.Tensor:
        """[B, 4, 3, H, W] -> predicted EPSG:3766 x/y [B, 2] in metres (eval mode, no grad), refined by the
        gallery with `refine: knn`."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                outputs, embedding = self.outputs_and_embedding(views.to(self.device))
                return self.refined_xy(outputs, self.outputs_to_xy(outputs), embedding)
        finally:
            self.train(was_training)

    # ---- steps --------------------------------------------------------------------------------
    def _outputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "features" in batch:
            return self.head_forward(batch["features"])
        return self(batch["views"])

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of `outputs` (float32 whatever the precision; targets stay float64)."""
        config = self.config
        outputs = outputs.float()
        if config.approach == "regression":  # targets are metres scaled to [0, 1]
            return F.mse_loss(outputs, scale_xy(batch["xy"], self.classes.scaler).float())
        logits = self.class_logits(outputs)
        tau = config.label_smoothing_km
        classification = (haversine_smoothing_loss(logits, batch["lat"], batch["lng"], self.class_lat,
                                                   self.class_lng, tau) if tau > 0
                          else F.cross_entropy(logits, batch["label"]))
        if config.approach == "classification":
            return classification
        _, offsets = self.split_hybrid(outputs)
        return hybrid_loss(logits, offsets, batch["label"], batch["xy"], self.class_xy, self.class_radius,
                           config.offset_weight, classification_loss=classification)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss, predicted x/y and outputs of a train or val batch; both log epoch means of the loss, accuracy
        and km, computed on the module's device without any host transfer (test results are returned by test_step,
        for `src.training.callbacks.TestCollector`, not logged as single-point charts)."""
        outputs = self._outputs(batch)
        loss = self.loss(outputs, batch)
        xy = self.outputs_to_xy(outputs.detach(), fixed_steps=True)
        km = xy_to_km(xy, batch["lat"], batch["lng"])
        # epoch metrics averaged over all processes: every rank picks the same best checkpoint
        log = {"batch_size": len(outputs), "on_step": False, "on_epoch": True, "sync_dist": True}
        if self.config.approach != "regression":
            accuracy = (self.class_logits(outputs).argmax(dim=1) == batch["label"]).float().mean()
            self.log(f"{stage}/acc", accuracy, **log)
        self.log(f"{stage}/loss", loss, prog_bar=True, **log)
        self.log(f"{stage}/km_mean", km.mean().float(), prog_bar=stage == "val", **log)
        return loss, xy, outputs

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")[0]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        _, xy, outputs = self._step(batch, "val")
        logits = None if self.config.approach == "regression" else self.class_logits(outputs).detach().float()
        self._val_outputs.append((xy.detach().double(), batch["xy"].double(), logits, batch["label"]))

    # ---- calibration ---------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []

    def on_validation_epoch_end(self) -> None:
        """Fit the calibration on this validation's outputs of every process (`src.evaluation.calibration.
        fit_calibration`: the temperature of the class probabilities or the residuals of regression, and the
        level map of the confidence regions). The checkpoints saved after this validation carry it."""
        stashed, self._val_outputs = self._val_outputs, []
        if self.trainer.sanity_checking or not stashed:
            return
        xy, true_xy, logits, labels = (self._gathered(torch.cat(part)) if part[0] is not None else None
                                       for part in zip(*stashed))
        xy, true_xy = xy.cpu().numpy(), true_xy.cpu().numpy()
        point_xy = np.column_stack(snap_to_land(xy[:, 0], xy[:, 1]))  # where predict puts the point
        self.calibration = fit_calibration(self.calibration,
                                           [Labelled(self.calibration, logits, labels, xy, point_xy, true_xy)])
        if logits is not None:
            self.log("val/temperature", self.calibration.temperature, on_step=False, on_epoch=True, sync_dist=False)

    def _gathered(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` [N, ...] of every process, concatenated (each process holds as many val locations: the
        DistributedSampler evens them out)."""
        if self.trainer.world_size > 1:
            return self.all_gather(tensor).flatten(0, 1)
        return tensor

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["calibration"] = self.calibration.to_checkpoint()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.calibration = Calibration.from_checkpoint(checkpoint.get("calibration"), default=self.calibration)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """[5 + C, B] rows of (split index, predicted x, predicted y, true latitude, true longitude, and for
        classification and hybrid the C class probabilities), float64 on the module's device
        (`src.training.callbacks.TestCollector` moves the points onto land, scores them and measures the
        confidence regions); the points are refined by the gallery with `refine: knn` (a host round trip, at
        test time only)."""
        features = batch["features"] if "features" in batch else self.view_features(batch["views"])
        fused = self.fusion(features)
        outputs = self.head_outputs(fused)
        xy = self.refined_xy(outputs, self.outputs_to_xy(outputs, fixed_steps=True), self.embedding(fused))
        rows = torch.stack([batch["index"].double(), *xy.double().T, batch["lat"].double(), batch["lng"].double()])
        if self.config.approach == "regression":
            return rows
        probabilities = self.class_logits(outputs).float().softmax(dim=1).double()
        return torch.cat([rows, probabilities.T])

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.outputs_to_xy(self._outputs(batch), fixed_steps=True)

    # ---- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """Two parameter groups: the fusion and head at `lr`, the backbone at `lr_finetune`.

        The backbone group is present from the start when the backbone unfreezes at some epoch; while it
        is frozen its parameters have no gradients, so the optimizer leaves them alone (and schedulers see
        a fixed set of groups). A backbone that stays frozen has no group. The backbone's schedule starts
        when it unfreezes: cosine runs its warm-up and decay over the epochs from the unfreeze epoch on, and
        the plateau scheduler's reductions before it are undone then (`FreezeThenUnfreeze`).
        """
        hp = self.optim
        groups = [{"params": [*self.fusion.parameters(), *self.head.parameters()], "lr": hp.lr, "name": "head"}]
        if hp.unfreeze_at_epoch is not None:  # a backbone that never trains gets no group (and no logged lr)
            groups.append({"params": list(self.backbone.parameters()), "lr": hp.lr_finetune, "name": "backbone"})
        optimizer_class = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
        optimizer = optimizer_class(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return optimizer
        if hp.scheduler == "plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=2)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/km_mean", "interval": "epoch"}}
        if hp.scheduler == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=[group["lr"] for group in groups], total_steps=max(1, int(self.trainer.estimated_stepping_batches)))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        max_epochs = max(1, self.trainer.max_epochs or 1)
        factors = [cosine_with_warmup(0, max_epochs, hp.warmup_epochs)]
        if hp.unfreeze_at_epoch is not None:
            start = hp.unfreeze_at_epoch
            factors.append(cosine_with_warmup(start, max_epochs, hp.warmup_epochs))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_train_epoch_end(self) -> None:
        """The plateau scheduler steps here, before the epoch's checkpoints are written. Lightning steps it after
        them, so a checkpoint held its state of the epoch before, and a run resumed from it (or the fine-tuning
        phase, which continues from the frozen phase's last checkpoint) reduced the learning rate an epoch late."""
        metrics = self.trainer.callback_metrics
        for config in self.trainer.lr_scheduler_configs:
            if config.reduce_on_plateau and config.interval == "epoch" and config.monitor in metrics:
                config.scheduler.step(metrics[config.monitor])

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        if metric is None:  # plateau schedulers (stepped with a metric) stepped in on_train_epoch_end
            scheduler.step()


def cosine_with_warmup(start: int, max_epochs: int, warmup_epochs: int):
    """The learning-rate factor per epoch of a schedule that starts at epoch `start` (its value before then is
    its first one): `warmup_epochs` of linear warm-up, then a cosine decay over the epochs left."""
    epochs = max(1, max_epochs - start)
    warmup = max(0, min(warmup_epochs, epochs - 1))

    def factor(epoch: int) -> float:
        epoch = max(0, epoch - start)
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(1, epochs - warmup)))

    return factor
