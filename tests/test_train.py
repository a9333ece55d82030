"""Tests of ensemble.train's learning-rate schedule."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from ensemble.recipe import TrainConfig
from ensemble.train import lr_factor, make_optimizer


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


def test_weight_decay_spares_what_no_weight_decay_names_as_a_pattern():
    """timm reads no_weight_decay() entries as patterns: XCiT's 'pos_embed.*' spares pos_embed's weights."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Linear(4, 4)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.head = nn.Linear(4, 2)

        def no_weight_decay(self):
            return {"pos_embed.*", "cls_token"}

    decay, rest = make_optimizer(Net(), dataclasses.replace(TrainConfig(), weight_decay=0.1)).param_groups
    assert [p.shape for p in decay["params"]] == [(2, 4)]  # the head's weight only
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0 and len(rest["params"]) == 4
