"""Tests of ensemble.train's learning-rate schedule."""

from __future__ import annotations

import dataclasses

import pytest

from ensemble.recipe import TrainConfig
from ensemble.train import lr_factor


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_warm_up_takes_its_share_of_the_steps_then_decays_to_zero(schedule):
    cfg = dataclasses.replace(TrainConfig(), schedule=schedule, warmup=0.29, snapshots=0)
    f = lr_factor(cfg, 100)  # 0.29 * 100 is 28.999... in floating point: still 29 warm-up steps
    assert [f(s) for s in (0, 27, 28)] == pytest.approx([1 / 29, 28 / 29, 1.0])
    assert f(29) == pytest.approx(1.0) and f(99) < 0.05
    assert all(f(s) >= f(s + 1) for s in range(29, 99))


def test_snapshot_cycles_restart_at_the_full_rate():
    f = lr_factor(dataclasses.replace(TrainConfig(), snapshots=4), 40)
    assert [f(s) for s in (0, 10, 20, 30)] == pytest.approx([1.0] * 4) and f(9) < 0.05
