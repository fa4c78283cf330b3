import functools

import pytest
import torch

from quantlib.adapters import get_adapter
from quantlib.engine import EngineConfig, quantize_model
from quantlib.gptq import GPTQConfig
from quantlib.qat import (QATConfig, QATLinear, _Checkpointed, attach_qat, detach_qat, qat_loss, teacher_targets,
                          train_qat)
from quantlib.rtn import RTNConfig
from quantlib.spec import QuantSpec

from tiny import tiny_ids, tiny_model

SPEC = QuantSpec(2, 32)
IDS = tiny_ids(16, 32)
MODES = ("scales", "scales+zeros", "weights")
# small, fast runs: 4 held-out sequences, 12 to train on
FAST = dict(heldout=0.25, steps=12, warmup_steps=0, eval_every=4, patience=0)


def _quantized(family="llama", method=RTNConfig()):
    model = tiny_model(family)
    results, _ = quantize_model(get_adapter(model), IDS, SPEC, method, EngineConfig(batch_size=4))
    return model, results


@functools.lru_cache(maxsize=None)
def _teacher(family="llama", topk=16):
    return teacher_targets(tiny_model(family), IDS, topk=topk, batch_size=4)


@torch.no_grad()
def _logits(model, ids=IDS):
    return model(input_ids=ids, use_cache=False).logits


def _same_codes(a, b):
    return all(torch.equal(a[k].qweight, b[k].qweight) and torch.equal(a[k].scale, b[k].scale)
               and torch.equal(a[k].zero, b[k].zero) for k in a) and a.keys() == b.keys()


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("kw, field", [
    (dict(heldout=0.0), "heldout"),
    (dict(heldout=1.0), "heldout"),
    (dict(lr=-1e-3), "lr"),
    (dict(weight_lr=0.0), "weight_lr"),
    (dict(loss="mse"), "loss"),
    (dict(trainable="codes"), "trainable"),
    (dict(schedule="step"), "schedule"),
    (dict(amp="fp16"), "amp"),
    (dict(steps=-1), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(batch_size=0), "batch_size"),
    (dict(topk=-1), "topk"),
])
def test_bad_configs_fail_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        QATConfig(**kw)


def test_kl_without_teacher_and_mismatched_teacher_fail_clearly():
    model, results = _quantized()
    with pytest.raises(ValueError, match="teacher_targets"):
        train_qat(model, results, IDS, QATConfig(loss="kl", **FAST))
    with pytest.raises(ValueError, match="do not match calib"):
        train_qat(model, results, IDS[:8], QATConfig(loss="kl", **FAST), {k: v for k, v in _teacher().items()})
    with pytest.raises(ValueError, match="leaves none to train on"):
        train_qat(model, results, IDS[:1], QATConfig(loss="ce", **FAST))


# --------------------------------------------------------------------------- module and surgery


@pytest.mark.parametrize("trainable", MODES)
def test_forward_at_init_is_the_dequantized_model_and_harden_returns_the_input(trainable):
    model, results = _quantized(method=GPTQConfig())
    ref = _logits(model)
    weights = {k: model.get_submodule(k).weight.clone() for k in results}
    adapter = get_adapter(model)
    mods = attach_qat(adapter, results, trainable)
    assert all(isinstance(model.get_submodule(k), QATLinear) for k in results)
    assert torch.equal(_logits(model), ref)  # bit-exact, not close
    hardened = detach_qat(adapter, mods)
    assert _same_codes(hardened, results)
    assert all(torch.equal(model.get_submodule(k).weight, weights[k]) for k in results)
    assert torch.equal(_logits(model), ref)


def test_gpt2_conv1d_round_trips_through_qat_modules():
    model, results = _quantized("gpt2")
    ref = _logits(model)
    adapter = get_adapter(model)
    mods = attach_qat(adapter, results, "weights")
    torch.testing.assert_close(_logits(model), ref, rtol=1e-5, atol=1e-5)  # F.linear vs Conv1D's addmm
    hardened = detach_qat(adapter, mods)
    assert _same_codes(hardened, results)
    assert type(model.get_submodule(next(iter(results)))).__name__ == "Conv1D"
    assert torch.equal(_logits(model), ref)


@pytest.mark.parametrize("trainable, names", [
    ("scales", ("log_scale",)), ("scales+zeros", ("log_scale", "zero")), ("weights", ("log_scale", "latent")),
])
def test_every_trainable_parameter_gets_a_gradient_through_the_ste(trainable, names):
    model, results = _quantized()
    model.requires_grad_(False)
    mods = attach_qat(get_adapter(model), results, trainable)
    logits = model(input_ids=IDS[:4], use_cache=False).logits
    qat_loss(logits, IDS[:4], None, QATConfig(loss="ce")).backward()
    for name, m in mods.qat.items():
        assert {n for n, p in m.named_parameters()} == set(names)
        for n in names:
            g = getattr(m, n).grad
            assert g is not None and g.abs().max() > 0 and torch.isfinite(g).all(), (name, n)


@pytest.mark.parametrize("trainable", MODES)
def test_harden_reproduces_the_forward_for_any_parameter_values(trainable):
    _, results = _quantized()
    name = "model.layers.1.mlp.down_proj"
    m = QATLinear(results[name], None, trainable)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # far from init: zeros and latents beyond the grid must clamp
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.3 if p is m.log_scale else 3.0))
    qw = m.harden()
    assert int(qw.qweight.max()) <= SPEC.maxq and torch.equal(qw.zero, qw.zero.round().clamp(0, SPEC.maxq))
    w_hat = m.fake_quant()[0].detach()
    assert torch.equal(qw.dequantize(), w_hat)
    x = torch.randn(5, w_hat.shape[1], generator=g)
    assert torch.equal(m(x), x @ w_hat.t())
    if trainable == "weights":
        assert not torch.equal(qw.qweight, results[name].qweight)


def _scales_linear(name="model.layers.1.mlp.down_proj", seed=0):
    """A "scales" QATLinear moved off its init (random log-scales), with a random bias."""
    _, results = _quantized(method=GPTQConfig(act_order=True))  # act order: groups stay contiguous (static)
    g = torch.Generator().manual_seed(seed)
    qw = results[name]
    m = QATLinear(qw, torch.randn(qw.qweight.shape[0], generator=g), "scales")
    with torch.no_grad():
        m.log_scale.add_(0.2 * torch.randn(m.log_scale.shape, generator=g))
    return m, torch.randn(6, qw.qweight.shape[1], generator=g)


def _grads(m, x, fast):
    m.log_scale.grad = None
    y = m(x) if fast else torch.nn.functional.linear(x, m.fake_quant()[0], m.bias)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), m.log_scale.grad.clone()


def test_grouped_scales_path_equals_the_general_fake_quant_in_fp32():
    m, x = _scales_linear()
    assert m.contiguous
    y_fast, g_fast = _grads(m, x, fast=True)
    y_ref, g_ref = _grads(m, x, fast=False)
    assert torch.equal(y_fast, y_ref)  # the same weights bit for bit: q - z exact, one rounding of s (q - z)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-7)  # sums in another order


def test_grouped_scales_path_under_bf16_autocast_stays_close_to_fp32():
    m, x = _scales_linear()
    y_ref, g_ref = _grads(m, x, fast=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, g = _grads(m, x, fast=True)
    assert y.dtype == torch.bfloat16 and m._qz.dtype == torch.bfloat16 and g.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref, rtol=3e-2, atol=3e-2 * float(y_ref.abs().mean()))
    assert float((g - g_ref).norm() / g_ref.norm()) < 0.03
    _, g32 = _grads(m, x, fast=True)  # back in fp32: the cache follows the dtype
    assert m._qz.dtype == torch.float32 and torch.equal(g32, _grads(m, x, fast=True)[1])


def test_only_scales_over_contiguous_groups_take_the_grouped_path():
    _, results = _quantized()
    qw = results["model.layers.1.mlp.down_proj"]
    assert QATLinear(qw, None, "scales").contiguous
    assert not QATLinear(qw, None, "scales+zeros").contiguous and not QATLinear(qw, None, "weights").contiguous
    n = qw.qweight.shape[1]
    shuffled = type(qw)(qw.qweight, qw.scale, qw.zero, qw.g_idx[torch.randperm(n, generator=torch.Generator().manual_seed(0))],
                        qw.spec)
    m = QATLinear(shuffled, None, "scales")
    assert not m.contiguous
    x = torch.randn(3, n)
    assert torch.equal(m(x), x @ m.fake_quant()[0].t())


# --------------------------------------------------------------------------- teacher and loss


def test_teacher_topk_keeps_all_probability_mass_and_kl_vanishes_on_itself():
    t = _teacher()
    assert t["topk_logprobs"].shape == (16, 32, 16) and t["topk_indices"].dtype == torch.int32
    total = torch.cat([t["topk_logprobs"], t["tail_logprob"][..., None]], -1).logsumexp(-1)  # log(sum p) = 0
    torch.testing.assert_close(total, torch.zeros_like(total), atol=1e-5, rtol=0)
    logits = _logits(tiny_model())
    assert float(qat_loss(logits, IDS, t, QATConfig(loss="kl"))) < 1e-6


def test_topk_kl_is_a_lower_bound_of_the_full_kl_and_exact_for_large_k():
    g = torch.Generator().manual_seed(0)
    teacher = 3 * torch.randn(2, 8, 50, generator=g)
    student = teacher + torch.randn(2, 8, 50, generator=g)
    cfg, ids = QATConfig(loss="kl"), torch.zeros(2, 8, dtype=torch.long)
    full_t = {"logprobs": torch.log_softmax(teacher, -1)}
    full = float(qat_loss(student, ids, full_t, cfg))
    ref = float(torch.nn.functional.kl_div(torch.log_softmax(student, -1), full_t["logprobs"], log_target=True,
                                           reduction="sum")) / 16
    assert full == pytest.approx(ref, rel=1e-5)
    topk = {}
    for k in (1, 5, 49):
        values, idx = full_t["logprobs"].topk(k, -1)
        tail = full_t["logprobs"].scatter(-1, idx, float("-inf")).logsumexp(-1)
        topk[k] = float(qat_loss(student, ids, {"topk_logprobs": values, "topk_indices": idx.int(),
                                                "tail_logprob": tail}, cfg))
    assert 0 < topk[1] <= topk[5] <= topk[49] <= full * (1 + 1e-5)
    assert topk[49] == pytest.approx(full, rel=1e-4)  # one token left in the tail: same outcomes


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("trainable", MODES)
def test_training_lowers_the_loss_and_keeps_results_on_the_integer_grid(trainable):
    model, results = _quantized()
    cfg = QATConfig(trainable=trainable, loss="kl", batch_size=12, lr=3e-2, weight_lr=2e-2, **FAST)  # full batch
    new, stats = train_qat(model, results, IDS, cfg, _teacher())
    first, last = sum(stats.curve[:2]) / 2, sum(stats.curve[-2:]) / 2
    assert last < (0.8 if trainable == "weights" else 0.7) * first, stats.curve
    assert not stats.kept_init and stats.best_heldout < stats.init_heldout
    maxq = SPEC.maxq
    for k, qw in new.items():
        assert qw.qweight.dtype == torch.uint8 and int(qw.qweight.max()) <= maxq
        assert torch.equal(qw.zero, qw.zero.round()) and 0 <= qw.zero.min() and qw.zero.max() <= maxq
        assert torch.equal(model.get_submodule(k).weight, qw.dequantize())  # the model ships exactly `new`
        assert type(model.get_submodule(k)).__name__ == "Linear"
        if trainable != "weights":
            assert torch.equal(qw.qweight, results[k].qweight)  # codes are fixed in these modes
        if trainable != "scales+zeros":
            assert torch.equal(qw.zero, results[k].zero)
    assert not any(torch.equal(new[k].scale, results[k].scale) for k in new)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_bf16_training_is_applied_recorded_and_close_to_fp32():
    """amp bf16 trains under bf16 autocast (the scales differ from the fp32 run's: a bug ignoring amp
    would make them equal), is recorded in the stats, and lands near the fp32 run."""
    runs = {}
    for amp in ("fp32", "bf16"):
        model, results = _quantized()
        cfg = QATConfig(loss="kl", batch_size=12, lr=3e-2, amp=amp, **FAST)
        runs[amp] = train_qat(model, results, IDS, cfg, _teacher())
    (fp, sf), (bf, sb) = runs["fp32"], runs["bf16"]
    assert not sf.bf16 and sb.bf16
    assert not all(torch.equal(fp[k].scale, bf[k].scale) for k in fp)
    assert all(torch.allclose(fp[k].scale, bf[k].scale, rtol=0.05) for k in fp)
    assert sb.best_heldout == pytest.approx(sf.best_heldout, rel=0.05) and sb.best_heldout < sb.init_heldout


def test_guard_keeps_the_initial_state_when_training_only_hurts():
    # a relative scale step of e^5 per step wrecks every layer: nothing can beat the init
    model, results = _quantized()
    ref = _logits(model)
    new, stats = train_qat(model, results, IDS, QATConfig(lr=5.0, loss="kl", **FAST), _teacher())
    assert stats.kept_init and stats.best_step == 0
    assert max(h for _, h in stats.heldout_curve[1:]) > 2 * stats.init_heldout  # it did get worse
    assert stats.best_heldout == stats.init_heldout == stats.final_heldout
    assert _same_codes(new, results)
    assert torch.equal(_logits(model), ref)


def test_early_stopping_restores_the_best_state():
    # the lr warms up towards an absurd value: the held-out loss improves, then degrades
    model, results = _quantized()
    cfg = QATConfig(lr=1.0, warmup_steps=40, steps=40, eval_every=1, patience=2, heldout=0.25, loss="kl")
    _, stats = train_qat(model, results, IDS, cfg, _teacher())
    losses = [h for _, h in stats.heldout_curve]
    assert stats.stopped_early and stats.steps < cfg.steps
    assert 0 < stats.best_step < stats.steps and stats.best_heldout == min(losses) < stats.init_heldout
    assert stats.heldout_curve[-1][1] > stats.best_heldout
    assert stats.final_heldout == stats.best_heldout  # re-measured on the hardened plain model


def test_checkpoint_resume_equals_an_uninterrupted_run_bit_exactly(tmp_path):
    cfg = QATConfig(trainable="weights", loss="ce+kl", grad_accum=2, train_norms=True, lr=1e-3, **FAST)
    ref_model, results = _quantized()
    ref, ref_stats = train_qat(ref_model, results, IDS, cfg, _teacher())

    saved = []
    model, results = _quantized()
    again, _ = train_qat(model, results, IDS, cfg, _teacher(), checkpoint_every=5, on_checkpoint=saved.append)
    assert _same_codes(again, ref)  # deterministic for a fixed seed
    assert [c["state"]["step"] for c in saved] == [5, 10]
    torch.save(saved[0], tmp_path / "ckpt.pt")  # plain tensors and values: serializable

    model, results = _quantized()
    resumed, stats = train_qat(model, results, IDS, cfg, _teacher(), resume=torch.load(tmp_path / "ckpt.pt"))
    assert _same_codes(resumed, ref)
    assert all(torch.equal(resumed[k].latent, ref[k].latent) for k in ref)
    assert stats.curve == ref_stats.curve and stats.heldout_curve == ref_stats.heldout_curve
    assert stats.trained_norms and all(torch.equal(model.get_parameter(n), ref_model.get_parameter(n))
                                       for n in stats.trained_norms)
    with pytest.raises(ValueError, match="different QATConfig"):
        train_qat(*_quantized(), IDS, QATConfig(**FAST, loss="ce"), resume=saved[0])


def test_gradient_checkpointing_gives_the_same_training():
    runs = []
    for gc in (False, True):
        model, results = _quantized()
        blocks, wrapped = get_adapter(model).blocks, []
        on_step = lambda *_: wrapped.append(all(isinstance(b, _Checkpointed) for b in blocks))  # noqa: E731
        new, stats = train_qat(model, results, IDS, QATConfig(loss="ce", grad_checkpoint=gc, lr=1e-2, **FAST),
                               on_step=on_step)
        assert wrapped == [gc] * stats.steps  # every block checkpointed during training, and only then
        assert not any(isinstance(b, _Checkpointed) for b in blocks)
        runs.append((new, stats))
    assert runs[0][1].curve == runs[1][1].curve  # the recomputed forward is the same computation
    assert _same_codes(runs[0][0], runs[1][0])


def test_zero_steps_returns_the_input():
    model, results = _quantized()
    new, stats = train_qat(model, results, IDS, QATConfig(steps=0, heldout=0.25, loss="ce"))
    assert stats.steps == 0 and stats.kept_init and stats.curve == []
    assert _same_codes(new, results)
