"""quantlib.optim: the schedule reconstruction and QAT share (warm-up, then cosine / linear / constant)."""
from __future__ import annotations

import math

import pytest
import torch

from quantlib.optim import SCHEDULES, SignSGD, adamw_with_schedule, optimizer_with_schedule, schedule_factor


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


# --------------------------------------------------------------------------- training arithmetic


def test_amp_modes_resolve_per_device(monkeypatch):
    import quantlib.optim as O

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native in (True, False):
        monkeypatch.setattr(O, "cpu_has_native_bf16", lambda native=native: native)
        assert O.uses_bf16(cpu, "auto") is native and O.uses_bf16(cuda, "auto")
        assert O.uses_bf16(cpu, "bf16") and not O.uses_bf16(cuda, "fp32") and not O.uses_bf16(cpu, "fp32")
    with pytest.raises(ValueError, match="amp must be one of"):
        O.uses_bf16(cpu, "fp16")


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    from quantlib.optim import cpu_has_native_bf16

    read = cpu_has_native_bf16.__wrapped__  # uncached: each file once
    for flags, native in (("fpu avx512f amx_bf16 amx_tile", True), ("fpu avx512f avx512_bf16", True),
                          ("fpu avx2 avx512f avx512bw", False)):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert read(str(tmp_path / "cpuinfo")) is native
    assert read(str(tmp_path / "absent")) is False  # no /proc: fp32, never an emulated bf16


def test_training_autocast_runs_matmuls_in_bf16_only_when_asked():
    from quantlib.optim import training_autocast

    lin, x = torch.nn.Linear(8, 4), torch.randn(2, 8)
    with training_autocast(torch.device("cpu"), "bf16"):
        y = lin(x)
    assert y.dtype == torch.bfloat16 and lin.weight.dtype == torch.float32  # the parameter stays fp32
    y.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32
    with training_autocast(torch.device("cpu"), "fp32"):
        assert lin(x).dtype == torch.float32


def test_sign_sgd_moves_every_parameter_by_lr_times_the_sign_of_its_gradient():
    """SignRound's step: the move is lr sign(grad) whatever the gradient's scale (a zero gradient
    does not move); Adam's first step would move it by about lr too, but not its later ones."""
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    opt, sched = optimizer_with_schedule("sign", [([p], 0.1)], steps=2, schedule="linear")
    assert isinstance(opt, SignSGD)
    for step, grad in enumerate([torch.tensor([1e-6, -5.0, 0.0, 3e3]), torch.tensor([-1.0, -1.0, 1.0, 0.0])]):
        before = p.detach().clone()
        p.grad = grad
        opt.step()
        sched.step()
        lr = 0.1 * (1 - step / 2)  # linear: 0.1 then 0.05
        torch.testing.assert_close(p.detach(), before - lr * torch.sign(grad))
    with pytest.raises(ValueError, match="optimizer must be one of"):
        optimizer_with_schedule("lion", [([p], 0.1)], 2, "linear")
    adam, _ = optimizer_with_schedule("adam", [([p], 0.1)], 2, "linear")
    assert isinstance(adam, torch.optim.AdamW)
