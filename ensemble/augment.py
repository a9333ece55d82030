"""Batched image augmentation in the airbench style: whole batches, no per-image loop.

Every augmentation is a function `(x, generator) -> x` on a batch (N, C, H, W) of any
dtype on any device; `generator` is a `torch.Generator` on the batch's device, so the
same seed gives the same augmented batch. `make_augment(["flip", "crop"])` composes
registered augmentations; `normalize` turns uint8 pixels into standardised floats.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image of (N, C, H, W) left-right with probability 0.5."""
    mask = torch.rand(len(x), device=x.device, generator=generator) < 0.5
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)


def crop(x: torch.Tensor, generator: torch.Generator, pad: int = 4, mode: str = "reflect") -> torch.Tensor:
    """Random crop of (N, C, H, W) back to (H, W) from the image padded by `pad` pixels.

    `mode` is "reflect" (mirror the border, no black edges) or "zeros" (a random
    translation by up to `pad` pixels filled with 0). Each image gets its own offset;
    the window is gathered for all images at once.
    """
    n, _, h, w = x.shape
    if pad <= 0 or n == 0:
        return x
    if mode == "reflect" and (pad >= h or pad >= w):
        raise ValueError(f"reflect padding of {pad} pixels needs images larger than that; got {h}x{w}")
    padded = _pad(x, pad, mode)  # (N, C, H + 2 pad, W + 2 pad)
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    out = padded.gather(2, rows.expand(-1, padded.shape[1], -1, padded.shape[3]))  # (N, C, H, W + 2 pad)
    out = out.gather(3, cols.expand(-1, out.shape[1], h, -1))  # (N, C, H, W)
    return _like(out, x)


def translate(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shift by up to 4 pixels each way, filling the uncovered border with 0."""
    return crop(x, generator, pad=4, mode="zeros")


def cutout(x: torch.Tensor, generator: torch.Generator, size: int = 8) -> torch.Tensor:
    """Zero one `size` x `size` square per image of (N, C, H, W), centred anywhere (clipped at edges)."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, 1, 1), device=x.device, generator=generator)
    cx = torch.randint(0, w, (n, 1, 1), device=x.device, generator=generator)
    ry = torch.arange(h, device=x.device).view(1, h, 1) - cy + size // 2
    rx = torch.arange(w, device=x.device).view(1, 1, w) - cx + size // 2
    hole = ((ry >= 0) & (ry < size) & (rx >= 0) & (rx < size)).unsqueeze(1)  # (N, 1, H, W)
    return torch.where(hole, torch.zeros((), dtype=x.dtype, device=x.device), x)


def _pad(x: torch.Tensor, pad: int, mode: str) -> torch.Tensor:
    """Pad the last two dims by `pad`; reflect by index so every dtype and device works."""
    h, w = x.shape[-2:]
    if mode == "zeros":
        out = x.new_zeros((*x.shape[:-2], h + 2 * pad, w + 2 * pad))
        out[..., pad : pad + h, pad : pad + w] = x
        return out
    if mode == "reflect":
        return x.index_select(-2, _reflect_index(h, pad, x.device)).index_select(-1, _reflect_index(w, pad, x.device))
    raise ValueError(f"padding mode must be 'reflect' or 'zeros', got {mode!r}")


def _reflect_index(size: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices of range(-pad, size + pad) mirrored into [0, size) without repeating the edge."""
    i = torch.arange(-pad, size + pad, device=device).abs()
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
    """Compose the registered augmentations `names`, applied in that order."""
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown}; valid ones: {', '.join(sorted(AUGMENTATIONS))}")
    steps = [AUGMENTATIONS[n] for n in names]

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
    std_t = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * std_t)).to(device=x.device, dtype=work).view(-1, 1, 1)
    shift = (-torch.tensor(mean, dtype=torch.float64) / std_t).to(device=x.device, dtype=work).view(-1, 1, 1)
    return (x.to(work) * scale + shift).to(dtype)
