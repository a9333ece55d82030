"""Tests of the batched augmentations and normalisation in ensemble.augment."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ensemble.augment import (AUGMENTATIONS, crop, cutout, flip, hole_pixels, make_augment, normalize, shift_pixels,
                              translate)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def batch(n: int = 64, c: int = 3, h: int = 10, w: int = 12, device: str = "cpu", low: int = 1) -> torch.Tensor:
    """Random uint8 images with no zero pixels (so zero-filled areas are recognisable)."""
    g = torch.Generator().manual_seed(123)
    return torch.randint(low, 256, (n, c, h, w), generator=g, dtype=torch.uint8).to(device)


def gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_same_seed_same_batch_and_shape_dtype_kept(name, device):
    x = batch(device=device)
    a, b = AUGMENTATIONS[name](x, gen(0, device)), AUGMENTATIONS[name](x, gen(0, device))
    other = AUGMENTATIONS[name](x, gen(1, device))
    assert torch.equal(a, b) and not torch.equal(a, other)
    assert a.shape == x.shape and a.dtype == x.dtype and a.device == x.device


def test_flip_flips_about_half_of_the_images():
    x = batch(n=1000)
    out = flip(x, gen(0))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert torch.all(flipped ^ kept)  # every image is either flipped or untouched
    assert 400 < int(flipped.sum()) < 600


@pytest.mark.parametrize("mode, torch_mode", [("reflect", "reflect"), ("zeros", "constant")])
def test_crop_is_a_shifted_window_of_the_padded_image(mode, torch_mode):
    x, pad = batch(n=40, h=9, w=11), 4
    out = crop(x, gen(0), pad=pad, mode=mode)
    padded = F.pad(x.float(), (pad,) * 4, mode=torch_mode).to(torch.uint8)
    offsets = []
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                if torch.equal(padded[i, :, dy : dy + 9, dx : dx + 11], out[i])]
        assert hits, f"image {i} is not a window of its padded image"
        offsets.append(hits[0])
    assert len(set(offsets)) > 10  # each image has its own offset


def test_translate_fills_with_zeros_and_crop_keeps_float_and_channels_last():
    x = batch(n=200)
    moved = translate(x, gen(0))
    assert (moved == 0).flatten(1).any(1).float().mean() > 0.5  # most images were shifted in from a zero border
    xf = x.float().contiguous(memory_format=torch.channels_last)
    out = crop(xf, gen(0))
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, crop(x, gen(0)).float())


def test_cutout_zeroes_one_square_per_image():
    x = batch(n=100, h=16, w=16)
    out = cutout(x, gen(0), size=8)
    zeroed = (out == 0).all(1)  # (N, H, W): every channel zeroed together
    assert torch.equal(out[~zeroed.unsqueeze(1).expand_as(out)], x[~zeroed.unsqueeze(1).expand_as(x)])
    area = zeroed.flatten(1).sum(1)
    assert int(area.min()) >= 16 and int(area.max()) == 64


@pytest.mark.parametrize("h, w, shift, hole", [(32, 32, 4, 8), (16, 16, 2, 4), (224, 200, 25, 50), (7, 9, 1, 1)])
def test_shift_and_hole_scale_with_the_image_size(h, w, shift, hole):
    x = batch(n=50, h=h, w=w)
    assert (shift_pixels(x), hole_pixels(x)) == (shift, hole)
    assert torch.equal(crop(x, gen(0)), crop(x, gen(0), pad=shift))
    assert torch.equal(translate(x, gen(0)), crop(x, gen(0), pad=shift, mode="zeros"))
    assert torch.equal(cutout(x, gen(0)), cutout(x, gen(0), size=hole))
    assert not torch.equal(crop(x, gen(0)), crop(x, gen(0), pad=shift + 1))


def test_make_augment_composes_in_order_and_rejects_unknown_names():
    x = batch()
    composed = make_augment(["flip", "crop"])(x, gen(5))
    g = gen(5)
    assert torch.equal(composed, crop(flip(x, g), g))
    assert make_augment([])(x, gen(0)) is x
    with pytest.raises(ValueError, match="unknown augmentation.*'mixup'.*valid ones: crop, cutout, flip"):
        make_augment(["flip", "mixup"])


@pytest.mark.parametrize("bad, message", [
    (dict(mode="wrap"), "padding mode must be 'reflect' or 'zeros'"),
    (dict(pad=10), "reflect padding of 10 pixels"),
])
def test_crop_rejects_bad_arguments(bad, message):
    with pytest.raises(ValueError, match=message):
        crop(batch(), gen(0), **bad)


def test_normalize_values_dtype_and_memory_format():
    x = batch(n=8, low=0)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    out = normalize(x, mean, std)
    expected = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(-1, 1, 1)) / torch.tensor(
        std, dtype=torch.float64).view(-1, 1, 1)
    assert out.dtype == torch.float32 and torch.allclose(out.double(), expected, atol=1e-5)
    cl = normalize(x.contiguous(memory_format=torch.channels_last), mean, std, dtype=torch.bfloat16)
    assert cl.dtype == torch.bfloat16 and cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(cl.double(), expected, atol=0.02)
    with pytest.raises(ValueError, match="one mean and std per channel"):
        normalize(x, (0.5,), (0.2,))
