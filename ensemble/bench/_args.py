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
