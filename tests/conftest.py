"""Shared fixtures: paths, the shared CIFAR-10 archive, one decoded-image cache per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10" / "train.tar.gz"

# A 2-backbone digits recipe small enough for end-to-end tests (seconds per fit).
TINY_RECIPE = """
name = "tiny"
seed = 0
[data]
source = "digits"
per_class = 40
test_fraction = 0.25
image_size = 8
[cv]
folds = 3
[train]
epochs = 2
batch_size = 32
lr = 0.05
augment = ["crop"]
[[backbones]]
name = "timm:test_resnet"
[[backbones]]
name = "timm:test_efficientnet"
optimizer = "adamw"
lr = 0.01
[ensemble]
combiners = ["vote", "mean", "weighted", "stacking"]
"""

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
