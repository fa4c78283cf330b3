"""Numerical faults: a NaN/Inf loss or gradient during reconstruction or QAT skips that step (the
learnables stay at their last good state), a non-comparable window result keeps the init, and no
QuantizedWeight (so no release) can hold a NaN or Inf scale or zero."""
from __future__ import annotations

import pytest
import torch

from quantlib import qat as Q
from quantlib import windows as W
from quantlib.activations import ActivationStore
from quantlib.adapters import get_adapter
from quantlib.capture import capture_block_inputs
from quantlib.engine import EngineConfig, quantize_model
from quantlib.qweight import QuantizedWeight
from quantlib.recon import ReconConfig
from quantlib.rtn import RTNConfig
from quantlib.spec import QuantSpec

from tiny import tiny_ids, tiny_model

SPEC = QuantSpec(2, 32)
ENGINE = EngineConfig(batch_size=4)
IDS = tiny_ids(16, 32)


def _window(cfg: ReconConfig):
    """Block 0 of a tiny Llama, initialized: (adapter, inputs, FP targets, calls, state, learnables)."""
    a = get_adapter(tiny_model())
    batches, calls = capture_block_inputs(a, tiny_ids(8, 32), 4)
    x = ActivationStore.from_batches(batches)
    bounds = W.fp_boundaries(a, x, calls, torch.device("cpu"))
    state = W.ReconState()
    W.init_block(a, 0, x, calls[0], SPEC, cfg, ENGINE, state)
    return a, x, bounds[1], calls, state, state.learnables[0]


def _poisoned(fn, steps: set[int]):
    """fn, returning NaN on the given (0-based) training calls (grad enabled; evaluations run without
    grad and are not counted): a blow-up on some batches."""
    count = [0]

    def wrapped(*args, **kw):
        out = fn(*args, **kw)
        if not torch.is_grad_enabled():
            return out
        count[0] += 1
        return out * float("nan") if count[0] - 1 in steps else out

    return wrapped


def _finite(mods) -> bool:
    return all(torch.isfinite(p).all() for m in mods.values() for p in m.parameters())


@pytest.mark.reliability(
    fault='a NaN loss at two steps of a reconstruction window',
    sees="the window's stats list the skipped steps; the pipeline logs a warning and the MLflow metric recon_skipped_steps",
    kept='the learnables at their last good state; training goes on and still improves the window')
def test_a_nan_loss_skips_its_step_and_training_goes_on(monkeypatch):
    cfg = ReconConfig(window=1, overlap=0, rounding="nearest", learn_clip=True, init="rtn", clip_lr=0.1, loss="mse",
                      iters=40)
    a, x, target, calls, state, mods = _window(cfg)
    monkeypatch.setattr(W, "recon_loss", _poisoned(W.recon_loss, {3, 7}))  # training steps 3 and 7
    st = W.train_window(a, 0, 1, 1, x, target, calls, cfg, state, torch.device("cpu"))
    assert st.skipped_steps == [3, 7] and len(st.curve) == 38
    assert _finite(mods) and st.loss_final < st.loss_init and not st.kept_init  # it still learned


@pytest.mark.reliability(
    fault='a reconstruction window whose trained result measures NaN',
    sees="kept_init in the window's stats",
    kept="the window's initialization (GPTQ/RTN codes), bit for bit")
def test_a_window_whose_result_is_nan_keeps_its_init(monkeypatch):
    cfg = ReconConfig(window=1, overlap=0, rounding="nearest", init="rtn", loss="mse", iters=4)
    a, x, target, calls, state, mods = _window(cfg)
    init = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in mods.items()}
    evals = [0]
    real = W._eval_pass

    def nan_after_training(*args, **kw):  # the first pass measures the init, the second the result
        evals[0] += 1
        return real(*args, **kw) if evals[0] == 1 else (float("nan"), None)

    monkeypatch.setattr(W, "_eval_pass", nan_after_training)
    st = W.train_window(a, 0, 1, 1, x, target, calls, cfg, state, torch.device("cpu"))
    assert st.kept_init and st.loss_final == st.loss_init
    assert all(torch.equal(v, init[n][k]) for n, m in mods.items() for k, v in m.state_dict().items())


@pytest.mark.reliability(
    fault='a NaN loss at one QAT step',
    sees='the step listed in skipped_steps (None in the loss curve); the pipeline logs a warning and qat_skipped_steps',
    kept='the parameters at their last good state; the refined codes are finite')
def test_a_nan_qat_step_is_skipped_and_the_result_is_finite(monkeypatch):
    model = tiny_model()
    results, _ = quantize_model(get_adapter(model), IDS, SPEC, RTNConfig(), ENGINE)
    monkeypatch.setattr(Q._Run, "loss", _poisoned(Q._Run.loss, {2}))
    cfg = Q.QATConfig(loss="kl", heldout=0.25, steps=6, warmup_steps=0, eval_every=2, patience=0,
                      batch_size=12, lr=3e-2)
    teacher = Q.teacher_targets(tiny_model(), IDS, topk=16, batch_size=4)
    new, stats = Q.train_qat(model, results, IDS, cfg, teacher)
    assert stats.skipped_steps == [2] and stats.curve[2] is None and all(c is not None for c in stats.curve[3:])
    assert all(torch.isfinite(qw.scale).all() and torch.isfinite(qw.zero).all() for qw in new.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not stats.kept_init  # the good steps still trained


@pytest.mark.reliability(
    fault='a NaN or Inf scale/zero produced by a solver ({case})',
    sees='ValueError: scale/zero hold NaN or Inf ...',
    kept='nothing: no QuantizedWeight, so no release, can carry it')
@pytest.mark.parametrize("field, bad", [("scale", float("nan")), ("scale", float("inf")), ("zero", float("nan"))])
def test_a_quantized_weight_cannot_hold_a_non_finite_scale_or_zero(field, bad):
    qw = _rtn(torch.randn(8, 64))
    parts = dict(qweight=qw.qweight, scale=qw.scale.clone(), zero=qw.zero.clone(), g_idx=qw.g_idx, spec=qw.spec)
    parts[field][0, 0] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        QuantizedWeight(**parts)


def _rtn(w: torch.Tensor) -> QuantizedWeight:
    from quantlib.rtn import rtn_quantize

    return rtn_quantize(w, SPEC)
