"""Argument checks shared by the benchmarks' parsers: one-line usage errors (exit 2), never a traceback.

Each check runs right after ``parse_args`` and before any benchmark work, and reports through
``parser.error`` (``usage: ...`` then ``prog: error: message``), as ``fit`` and ``predict`` do.
"""

from __future__ import annotations

import argparse


def check_at_least(parser: argparse.ArgumentParser, args: argparse.Namespace, bounds: dict[str, int]) -> None:
    """``parser.error`` for the first option ``dest`` in ``bounds`` whose value is below its bound."""
    for dest, low in bounds.items():
        value = getattr(args, dest)
        if value < low:
            parser.error(f"--{dest.replace('_', '-')} must be >= {low}, got {value}")


def check_backbone(parser: argparse.ArgumentParser, name: str, option: str = "--backbone") -> None:
    """``parser.error`` naming ``option`` when ``name`` is no timm/torchvision model (with close matches).

    Lists the library's models, which imports it: call it after the cheap checks.
    """
    from ensemble import backbones

    try:
        backbones.check_name(name)
    except backbones.BackboneError as exc:
        parser.error(f"{option} {exc}")


def check_device(parser: argparse.ArgumentParser, name: str, option: str = "--device"):
    """The torch device ``name`` asks for (``auto`` | ``cpu`` | ``cuda[:N]``); ``parser.error`` when there is none."""
    from ensemble.train import resolve_device

    try:
        return resolve_device(name)
    except (ValueError, RuntimeError) as exc:
        parser.error(f"{option} {name!r}: {exc}")


def check_model_runs(parser: argparse.ArgumentParser, name: str, *, classes: int, channels: int, image_size: int,
                     batch_size: int, train: bool, stem: str = "default", option: str = "--backbone") -> None:
    """``parser.error`` when backbone ``name`` cannot take a batch of ``image_size`` images (a ViT built
    for 224 given 32x32) or, with ``train``, cannot train on batches of ``batch_size`` (1 under batch norm).

    One zero batch of ``min(2, batch_size)`` images forward (and backward when ``train``), as
    ``fit.check_backbones`` checks a recipe's backbones, so that the benchmark fails now in one line
    instead of as a traceback from inside a timed loop.
    """
    from ensemble import backbones

    try:
        net = backbones.create(name, num_classes=classes, in_chans=channels, stem=stem)
        backbones.try_step(net, min(2, batch_size) if train else 1, channels, image_size, classes, train)
    except Exception as exc:  # noqa: BLE001 - whatever the library raises, the options caused it
        what = f"train on {image_size}x{image_size} images in batches of {batch_size}" if train \
            else f"run on {image_size}x{image_size} images"
        parser.error(f"{option} {name} cannot {what}: {backbones.failure_reason(exc)}")
