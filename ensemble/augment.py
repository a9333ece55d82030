"""Batched image augmentation in the airbench style: whole batches, no per-image loop.

Every augmentation is a function `(x, generator) -> x` on a batch (N, C, H, W) of any
dtype on any device; `generator` is a `torch.Generator` on the batch's device, so the
same seed gives the same augmented batch. `make_augment(["flip", "crop"])` composes
registered augmentations; `normalize` turns uint8 pixels into standardised floats.
"""

from __future__ import annotations

import functools

from collections.abc import Callable, Sequence

import torch

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image of (N, C, H, W) left-right with probability 0.5."""
    mask = _flip_mask(len(x), x.device, generator)
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)


CROP_MODE = "reflect"  # "crop" in a recipe, and the fused flip_crop


def shift_pixels(x: torch.Tensor) -> int:
    """How far crop and translate shift images of (N, C, H, W): an eighth of the shorter side
    (4 px at 32x32, CIFAR's setting; 28 px at 224x224), at least 1 px."""
    side = min(x.shape[-2:])
    return max(1, side // 8) if side > 1 else 0


def hole_pixels(x: torch.Tensor) -> int:
    """The side of cutout's square: a quarter of the shorter side (8 px at 32x32), at least 1 px."""
    return max(1, min(x.shape[-2:]) // 4)


def crop(x: torch.Tensor, generator: torch.Generator, pad: int | None = None, mode: str = CROP_MODE) -> torch.Tensor:
    """Random crop of (N, C, H, W) back to (H, W) from the image padded by `pad` pixels
    (default: :func:`shift_pixels`).

    `mode` is "reflect" (mirror the border, no black edges) or "zeros" (a random
    translation by up to `pad` pixels filled with 0). Each image gets its own offset;
    the padded image is never built: the window's source pixels are gathered for all
    images at once, in one pass.
    """
    return _window(x, generator, shift_pixels(x) if pad is None else pad, mode)


def flip_crop(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``crop(flip(x, g), g)`` in one gather: same random draws, same pixels, one pass fewer.

    `make_augment` uses it wherever "flip" is directly followed by "crop".
    """
    return _window(x, generator, shift_pixels(x), CROP_MODE, _flip_mask(len(x), x.device, generator))


def _flip_mask(n: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, device=device, generator=generator) < 0.5


def _window(
    x: torch.Tensor, generator: torch.Generator, pad: int, mode: str, flipped: torch.Tensor | None = None
) -> torch.Tensor:
    """Crop (see :func:`crop`) of the images, each first mirrored left-right where ``flipped`` (N,) is set."""
    n, c, h, w = x.shape
    if mode not in ("reflect", "zeros"):
        raise ValueError(f"padding mode must be 'reflect' or 'zeros', got {mode!r}")
    if pad <= 0 or n == 0:
        return x if flipped is None else torch.where(flipped.view(-1, 1, 1, 1), x.flip(-1), x)
    if mode == "reflect" and (pad >= h or pad >= w):
        raise ValueError(f"reflect padding of {pad} pixels needs images larger than that; got {h}x{w}")
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    rows = dy.view(n, 1) + torch.arange(-pad, h - pad, device=x.device)  # (N, H) rows of the unpadded image
    cols = dx.view(n, 1) + torch.arange(-pad, w - pad, device=x.device)  # (N, W)
    if mode == "reflect":
        rows, cols = _reflect(rows, h), _reflect(cols, w)
    else:
        inside = ((rows >= 0) & (rows < h)).view(n, 1, h, 1) & ((cols >= 0) & (cols < w)).view(n, 1, 1, w)
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    if flipped is not None:  # column j of a mirrored image is column w - 1 - j of the original
        cols = torch.where(flipped.view(n, 1), w - 1 - cols, cols)
    source = (rows.view(n, h, 1) * w + cols.view(n, 1, w)).view(n, 1, h * w).expand(n, c, h * w)
    out = x.reshape(n, c, h * w).gather(2, source).view(n, c, h, w)
    if mode == "zeros":
        out = torch.where(inside, out, torch.zeros((), dtype=x.dtype, device=x.device))
    return _like(out, x)


def translate(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shift by up to :func:`shift_pixels` each way, filling the uncovered border with 0."""
    return crop(x, generator, mode="zeros")


def cutout(x: torch.Tensor, generator: torch.Generator, size: int | None = None) -> torch.Tensor:
    """Zero one `size` x `size` square per image of (N, C, H, W) (default: :func:`hole_pixels`),
    centred anywhere (clipped at edges)."""
    n, _, h, w = x.shape
    size = hole_pixels(x) if size is None else size
    cy = torch.randint(0, h, (n, 1, 1), device=x.device, generator=generator)
    cx = torch.randint(0, w, (n, 1, 1), device=x.device, generator=generator)
    ry = torch.arange(h, device=x.device).view(1, h, 1) - cy + size // 2
    rx = torch.arange(w, device=x.device).view(1, 1, w) - cx + size // 2
    hole = ((ry >= 0) & (ry < size) & (rx >= 0) & (rx < size)).unsqueeze(1)  # (N, 1, H, W)
    return torch.where(hole, torch.zeros((), dtype=x.dtype, device=x.device), x)


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """Indices in [-size + 1, 2 size - 1) mirrored into [0, size) without repeating the edge."""
    i = i.abs()
    return torch.where(i >= size, 2 * (size - 1) - i, i)


def _like(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Keep channels_last when the input had it (gather returns contiguous NCHW)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous(memory_format=torch.channels_last)
    return out


AUGMENTATIONS: dict[str, Augment] = {
    "flip": flip,
    "crop": crop,
    "translate": translate,
    "cutout": cutout,
}


def make_augment(names: Sequence[str]) -> Augment:
    """Compose the registered augmentations `names`, applied in that order.

    "flip" directly followed by "crop" runs as :func:`flip_crop` (identical output).
    """
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown}; valid ones: {', '.join(sorted(AUGMENTATIONS))}")
    names, steps, i = list(names), [], 0
    while i < len(names):
        if names[i : i + 2] == ["flip", "crop"]:
            steps.append(flip_crop)  # the same result as flip then crop, in one pass
            i += 2
        else:
            steps.append(AUGMENTATIONS[names[i]])
            i += 1

    def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for step in steps:
            x = step(x, generator)
        return x

    return augment


def normalize(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(x / 255 - mean) / std per channel for uint8 (..., C, H, W); keeps the memory format.

    `mean` and `std` are on the 0..1 scale, one value per channel.
    """
    channels = x.shape[-3]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"normalize needs one mean and std per channel ({channels}); got {len(mean)} and {len(std)}")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    scale, shift = _affine(tuple(mean), tuple(std), x.device, work)
    return x.to(work, copy=True).mul_(scale).add_(shift).to(dtype)  # never scales the caller's tensor


@functools.lru_cache(maxsize=32)
def _affine(mean: tuple, std: tuple, device: torch.device, work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of :func:`normalize` on ``device``, built once: no host-to-device copy per batch."""
    std_t = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * std_t)).to(device=device, dtype=work).view(-1, 1, 1)
    shift = (-torch.tensor(mean, dtype=torch.float64) / std_t).to(device=device, dtype=work).view(-1, 1, 1)
    return scale, shift
