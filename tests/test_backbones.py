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
