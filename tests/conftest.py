"""Shared fixtures: paths, the shared CIFAR-10 archive, one decoded-image cache per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10" / "train.tar.gz"

sys.path.insert(0, str(Path(__file__).parent))  # tests import run_fixture as a plain module


@pytest.fixture(scope="session")
def cifar_archive() -> Path:
    """The 50,000-image CIFAR-10 archive beside the repo; tests skip where it is absent (a user's machine)."""
    if not CIFAR_ARCHIVE.is_file():
        pytest.skip(f"the shared CIFAR-10 archive is not at {CIFAR_ARCHIVE} (only on development and CI machines)")
    return CIFAR_ARCHIVE


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """A decoded-image cache shared by every test of the session (CIFAR decodes once)."""
    return tmp_path_factory.mktemp("image-cache")
