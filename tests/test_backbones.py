"""Tests of ensemble.backbones' CIFAR stem."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ensemble import backbones


@pytest.mark.parametrize("name, pool", [
    ("torchvision:resnet18", "maxpool"),
    ("timm:resnetv2_50", "stem.pool"),
    ("torchvision:densenet121", "features.pool0"),
    ("torchvision:googlenet", "maxpool1"),
])
def test_the_cifar_stem_removes_the_stem_max_pool_wherever_it_sits(name, pool):
    kwargs = {"aux_logits": False, "init_weights": False} if name.endswith("googlenet") else {}
    plain = backbones.create(name, num_classes=10, model_args=kwargs)
    assert isinstance(plain.get_submodule(pool), nn.MaxPool2d)
    net = backbones.create(name, num_classes=10, stem="cifar", model_args=kwargs)
    assert isinstance(net.get_submodule(pool), nn.Identity)
    _, conv = backbones._first_conv(net)
    assert conv.stride == (1, 1) and conv.kernel_size == (3, 3)
    assert net.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_a_stem_without_max_pool_keeps_the_later_ones():
    """EfficientNet-like stems have no max-pool: a pool deep in the network is not the stem's."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3),
                        nn.MaxPool2d(2), nn.Flatten())
    backbones.apply_cifar_stem(net)
    assert isinstance(net[4], nn.MaxPool2d) and net[0].stride == (1, 1)


def test_a_torchvision_model_args_key_the_class_would_swallow_is_refused():
    """ConvNeXt and MobileNetV3 take **kwargs and ignore them: timm's drop_rate would do nothing."""
    with pytest.raises(TypeError, match="unexpected keyword argument 'drop_rate'"):
        backbones.create("torchvision:mobilenet_v3_small", num_classes=10, model_args={"drop_rate": 0.5})
    net = backbones.create("torchvision:mobilenet_v3_small", num_classes=10, model_args={"dropout": 0.5,
                                                                                       "width_mult": 0.5})
    assert net.classifier[2].p == 0.5


def test_the_cifar_stem_keeps_a_standardised_convs_class_and_gain():
    """NFNet's ScaledStdConv2d stem stays one (its weight standardisation and gain), rescaled to 3x3."""
    from timm.layers import ScaledStdConv2d

    conv = ScaledStdConv2d(3, 8, kernel_size=7, stride=2, padding=3)
    net = nn.Sequential(conv, nn.MaxPool2d(2))
    backbones.apply_cifar_stem(net)
    assert type(net[0]) is ScaledStdConv2d and net[0].stride == (1, 1) and net[0].kernel_size == (3, 3)
    assert net[0].scale == pytest.approx(conv.scale * (3 * 49 / (3 * 9)) ** 0.5)
    assert net[0](torch.zeros(1, 3, 32, 32)).shape == (1, 8, 32, 32)
    plain = nn.Sequential(nn.Conv2d(3, 8, 7, stride=2, padding=3))
    torch.manual_seed(0)
    backbones.apply_cifar_stem(plain)
    torch.manual_seed(0)
    assert torch.equal(plain[0].weight, nn.Conv2d(3, 8, 3, stride=1, padding=1).weight)  # as before: same draws
