"""quantlib.optim: the schedule reconstruction and QAT share (warm-up, then cosine / linear / constant)."""
from __future__ import annotations

import math

import pytest
import torch

from quantlib.optim import SCHEDULES, adamw_with_schedule, schedule_factor


def test_schedule_factors():
    # warm-up of 3: 1/4, 2/4, 3/4, then the shape over the remaining 8 steps
    assert [schedule_factor(i, 11, "cosine", 3) for i in range(3)] == [0.25, 0.5, 0.75]
    assert schedule_factor(3, 11, "cosine", 3) == 1.0 and schedule_factor(7, 11, "cosine", 3) == pytest.approx(0.5)
    assert schedule_factor(11, 11, "cosine", 3) == pytest.approx(0.0, abs=1e-12)
    assert schedule_factor(50, 11, "linear", 3) == 0.0  # clipped past the end
    assert schedule_factor(5, 10, "linear") == 0.5 and schedule_factor(9, 10, "constant") == 1.0
    assert schedule_factor(2, 8, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_optimizer_groups_take_their_rates_and_follow_the_schedule():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    opt, sched = adamw_with_schedule([([a], 0.1), ([], 0.5), ([b], 0.01)], steps=4, schedule="linear")
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]  # the empty group left out
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)
    for _ in range(2):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.005])
    with pytest.raises(ValueError, match="schedule"):
        adamw_with_schedule([([a], 0.1)], 4, "step")


def test_the_pipeline_params_offer_exactly_these_schedules():
    from flows.params import SCHEDULES as OFFERED

    assert OFFERED == SCHEDULES
