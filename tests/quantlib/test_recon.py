import pytest
import torch

from quantlib.adapters import get_adapter
from quantlib.capture import capture_block_inputs, run_block
from quantlib.activations import ActivationStore
from quantlib.cfp import CFPConfig, apply_cfp, truncate_weight_outliers
from quantlib.engine import EngineConfig
from quantlib.primitives import dequantize, round_ste
from quantlib.qweight import QuantizedWeight
from quantlib.recon import LearnableLinear, ReconConfig, recon_loss, window_starts
from quantlib.rtn import rtn_quantize
from quantlib.spec import QuantSpec
from quantlib.windows import (ReconState, _eval_loss, forward_blocks, fp_boundaries, init_block, reconstruct_model,
                              split_batches, train_window)

from tiny import FAMILIES, tiny_ids, tiny_model

SPEC = QuantSpec(2, 32)
ENGINE = EngineConfig(batch_size=4)


def _captured(family="llama"):
    """(adapter, calibration inputs, block calls, FP block boundaries) of a tiny model."""
    a = get_adapter(tiny_model(family))
    batches, calls = capture_block_inputs(a, tiny_ids(8, 32), 4)
    x = ActivationStore.from_batches(batches)
    return a, x, calls, fp_boundaries(a, x, calls, torch.device("cpu"))


def _one_window(cfg: ReconConfig, family="llama"):
    """Block 0 of a tiny model: init, train, return (stats, its LearnableLinears, their init state)."""
    a, x, calls, bounds = _captured(family)
    state = ReconState()
    init_block(a, 0, x, calls[0], SPEC, cfg, ENGINE, state)
    mods = state.learnables[0]
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in mods.items()}
    stats = train_window(a, 0, 1, 1, x, bounds[1], calls, cfg, state, torch.device("cpu"))
    return stats, mods, before


@pytest.mark.parametrize("what, cfg, moved", [
    ("adaround", ReconConfig(window=1, overlap=0, rounding="adaround", learn_clip=False, loss="mse", iters=40), "alpha"),
    ("clip", ReconConfig(window=1, overlap=0, rounding="nearest", learn_clip=True, init="rtn", clip_lr=0.1, loss="mse", iters=40),
     "clip_hi"),
    ("gptq-grid-scale", ReconConfig(window=1, overlap=0, rounding="nearest", init="gptq", loss="mse", iters=40),
     "log_scale"),
    ("scale", ReconConfig(window=1, overlap=0, rounding="nearest", learn_clip=False, learn_scale=True, init="rtn",
                          loss="mse", iters=40), "log_scale"),
    ("weights", ReconConfig(window=1, overlap=0, rounding="nearest", learn_clip=False, learn_weights=True,
                            weight_lr=1e-3, loss="mse", iters=40), "latent"),
    ("lora", ReconConfig(window=1, overlap=0, rounding="lora", learn_clip=False, init="rtn", loss="mse", iters=40), "lora_b"),
    ("signed", ReconConfig(window=1, overlap=0, rounding="signed", optimizer="sign", schedule="linear", lr=0.025,
                           init="rtn", loss="mse", iters=40), "alpha"),
])
def test_each_learnable_moves_and_lowers_the_window_loss(what, cfg, moved):
    stats, mods, before = _one_window(cfg)
    assert stats.loss_final < stats.loss_init, (what, stats.loss_init, stats.loss_final)
    assert not stats.kept_init
    assert any(not torch.equal(m.state_dict()[moved], before[n][moved]) for n, m in mods.items())


def test_frozen_grid_keeps_the_initializers_codes_and_learns_the_scale():
    """GPTQ init (grid auto = init), nearest rounding: only the dequantization scale learns and the codes
    are the initializer's; grid "learned" makes the clipping learnable instead (its codes: next test)."""
    frozen = ReconConfig(window=1, overlap=0, rounding="nearest", init="gptq", loss="mse", iters=30)
    _, mods, before = _one_window(frozen)
    for n, m in mods.items():
        assert m.param_groups()["clip"] == [] and m.param_groups()["scale"] == [m.log_scale]
        qw = m.harden()
        assert torch.equal(qw.zero, m.z0.cpu())
        torch.testing.assert_close(qw.scale, m.s0.cpu() * torch.exp(m.log_scale.detach().cpu()))
    learned = ReconConfig(window=1, overlap=0, rounding="nearest", init="gptq", grid="learned", iters=0)
    _, mods2, _ = _one_window(learned)
    assert all(m.param_groups()["clip"] == [m.clip_hi, m.clip_lo] for m in mods2.values())


@pytest.mark.parametrize("sym", [False, True])
def test_learned_grid_starts_on_the_init_grid_and_rederives_the_codes_when_clipped(sym):
    """recon.py: the learned grid is "the init range shrunk by sigmoid(c)/sigmoid(4) (1 at init)" and
    "re-derives the codes on the learned (s, z)"; the frozen grid keeps the initializer's codes."""
    from quantlib.primitives import expand
    from quantlib.rtn import rtn_quantize

    spec = QuantSpec(2, 32, sym=sym)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    init = rtn_quantize(w, spec)
    learned = LearnableLinear(init, w, None, ReconConfig(rounding="adaround", init="rtn", grid="learned"))
    scale, zero = learned.qparams()
    torch.testing.assert_close(scale, init.scale)  # the range starts as the initializer's
    assert torch.equal(zero, init.zero)
    assert torch.equal(learned.harden().qweight, init.qweight)

    gamma = torch.sigmoid(torch.tensor(0.0)) / torch.sigmoid(torch.tensor(4.0))  # about 0.51
    with torch.no_grad():  # clip both ends of every group's range to gamma of it
        learned.clip_hi.zero_()
        learned.clip_lo.zero_()
    scale, zero = learned.qparams()
    torch.testing.assert_close(scale, init.scale * gamma)
    torch.testing.assert_close(zero, init.zero)
    h = (learned.soft_offsets() >= 0.5).float()
    v = w / expand(scale, 64, init.g_idx) + expand(zero, 64, init.g_idx)
    hard = learned.harden()
    assert torch.equal(hard.qweight.float(), torch.clamp(torch.floor(v) + h, 0, spec.maxq).detach())
    assert not torch.equal(hard.qweight, init.qweight)

    frozen = LearnableLinear(init, w, None, ReconConfig(rounding="adaround", init="rtn", grid="init"))
    with torch.no_grad():  # the same shrink as a dequantization scale: codes stay on (s0, z0)
        frozen.log_scale.fill_(float(torch.log(gamma)))
    hard = frozen.harden()
    assert torch.equal(hard.qweight, init.qweight) and torch.equal(hard.zero, init.zero)
    torch.testing.assert_close(hard.scale, init.scale * gamma)


def test_guard_keeps_the_initialization_when_training_makes_it_worse():
    # a huge learning rate wrecks the clipping: the guard must restore the init and say so
    cfg = ReconConfig(window=1, overlap=0, rounding="nearest", clip_lr=50.0, init="rtn", loss="mse", iters=10)
    stats, mods, before = _one_window(cfg)
    assert stats.kept_init and stats.loss_final == stats.loss_init
    assert all(torch.equal(m.state_dict()["clip_hi"], before[n]["clip_hi"]) for n, m in mods.items())


def _distance_from_binary(mods) -> float:
    """Mean distance of the soft rounding offsets from the nearer of 0 and 1 (0.25 for uniform ones)."""
    h = torch.cat([m.soft_offsets().detach().flatten() for m in mods.values()])
    return float(torch.minimum(h, 1 - h).mean())


def test_lora_rounding_regularizer_drives_soft_offsets_to_binary():
    """reg_weight > 0 pulls the LoRA-Rounding soft offsets toward {0, 1}; at reg_weight 0 the task loss
    alone does not (the offsets start at the fractional parts of W/s + z, about 0.25 from {0, 1}).
    Hardening then takes the learned offsets: codes = clamp(floor(W/s + z) + (h >= 0.5), 0, maxq)."""
    distance = {}
    for reg_weight in (0.0, 10.0):
        cfg = ReconConfig(window=1, overlap=0, rounding="lora", reg_weight=reg_weight, warmup=0.0, lr=0.05,
                          learn_clip=False, init="rtn", loss="mse", iters=30)
        stats, mods, before = _one_window(cfg)
        assert not stats.kept_init  # the guard did not put the init offsets back
        init = {n: LearnableLinear.empty(SPEC, cfg, *m.latent.shape, m.s0.shape[1], m.bias is not None)
                for n, m in mods.items()}
        for n, m in init.items():
            m.load_state_dict(before[n])
        distance["init"], distance[reg_weight] = _distance_from_binary(init), _distance_from_binary(mods)
        for n, m in mods.items():
            codes = torch.clamp(m._floor() + (m.soft_offsets() >= 0.5).float(), 0, SPEC.maxq)
            assert torch.equal(m.harden().qweight.float(), codes.detach())
        assert any(not torch.equal(m.harden().qweight, init[n].harden().qweight) for n, m in mods.items())
    # measured: 0.252 at init, 0.253 without the regularizer, 0.237 with it
    assert distance[10.0] < distance["init"] - 0.01, distance
    assert distance[0.0] > distance["init"] - 0.002, distance


@pytest.mark.parametrize("init", ["gptq", "boa"])
def test_init_reproduces_the_initializers_codes_exactly(init):
    from quantlib.boa import BoAConfig
    from quantlib.engine import quantize_block
    from quantlib.gptq import GPTQConfig

    model = tiny_model()
    a = get_adapter(model)
    batches, calls = capture_block_inputs(a, tiny_ids(8, 32), 4)
    state = ReconState()
    init_block(a, 0, ActivationStore.from_batches(batches), calls[0], SPEC, ReconConfig(init=init), ENGINE, state)
    ra = get_adapter(tiny_model())
    method = GPTQConfig() if init == "gptq" else BoAConfig()
    results, _, _ = quantize_block(ra, 0, ActivationStore.from_batches(batches), calls[0], SPEC, method, ENGINE)
    for name, m in state.learnables[0].items():
        m.eval()
        torch.testing.assert_close(m.weight_hat(hard=True), results[f"model.layers.0.{name}"].dequantize())
        assert torch.equal(m.harden().qweight, results[f"model.layers.0.{name}"].qweight)


def test_carried_block_resumes_exactly_in_a_fresh_model():
    """A window's shared block, saved by carry_block and installed into a fresh copy of the model,
    computes the same outputs and hardens to the same codes (what a resumed pipeline window sees)."""
    from quantlib.windows import carry_block, install_block

    cfg = ReconConfig(window=2, overlap=1, rounding="adaround", iters=5)
    a = get_adapter(tiny_model())
    batches, calls = capture_block_inputs(a, tiny_ids(8, 32), 4)
    x = ActivationStore.from_batches(batches)
    state = ReconState()
    init_block(a, 0, x, calls[0], SPEC, cfg, ENGINE, state)
    bounds = fp_boundaries(get_adapter(tiny_model()), x, calls, torch.device("cpu"))
    train_window(a, 0, 1, 1, x, bounds[1], calls, cfg, state, torch.device("cpu"))
    trained = {n: m.harden() for n, m in state.learnables[0].items()}
    with torch.no_grad():
        y = run_block(a.blocks[0], x[0], calls[0])
    saved = carry_block(a, 0, state)
    assert not any(isinstance(m, LearnableLinear) for m in a.blocks[0].modules())  # FP original back
    fresh, state2 = get_adapter(tiny_model()), ReconState()
    install_block(fresh, 0, saved, SPEC, cfg, state2)
    fresh.blocks[0].eval()
    with torch.no_grad():
        torch.testing.assert_close(run_block(fresh.blocks[0], x[0], calls[0]), y)
    for n, m in state2.learnables[0].items():
        assert torch.equal(m.harden().qweight, trained[n].qweight)


def test_lookahead_target_equals_manual_fp_pass():
    model = tiny_model()
    ids = tiny_ids(8, 32)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    a = get_adapter(model)
    batches, calls = capture_block_inputs(a, ids, 4)
    bounds = fp_boundaries(a, ActivationStore.from_batches(batches), calls, torch.device("cpu"))
    # window [0, 1) with look-ahead 1: the target is the FP output of block 1 = hidden_states[2]
    torch.testing.assert_close(bounds[2].cat(), hidden[2], atol=1e-5, rtol=1e-5)
    manual = forward_blocks(list(a.blocks)[:2], calls[:2], ActivationStore.from_batches(batches), "cpu")
    torch.testing.assert_close(bounds[2].cat(), manual.cat())


def _loss_through(blocks, calls, inputs: ActivationStore, targets: ActivationStore, cfg: ReconConfig) -> float:
    """The batch-size-weighted mean recon_loss of `blocks` run in turn on inputs, against targets."""
    total, n = 0.0, 0
    with torch.no_grad():
        for x, t in zip(inputs, targets):
            y = x
            for block, call in zip(blocks, calls):
                y = run_block(block, y, call)
            total += float(recon_loss(y, t, cfg)) * x.shape[0]
            n += x.shape[0]
    return total / n


def test_lookahead_window_trains_through_frozen_fp_blocks(monkeypatch):
    """With look-ahead 1, window (i, i+1) is trained against the FP output of block i+1 (FP boundary
    i+2) through block i+1 as it is: that block holds no learnable, gets no gradient, is not changed,
    and the window's loss is the loss through it against those targets."""
    import quantlib.windows as W

    _, _, _, fp_bounds = _captured()
    a = get_adapter(tiny_model())
    assert all(p.requires_grad for p in a.blocks[1].parameters())  # so a missed freeze would show
    seen, original = [], W.train_and_propagate

    def spy(adapter, start, end, lookahead_end, inputs, targets, calls, cfg, state, device, **kw):
        ahead = range(end, lookahead_end)
        before = {i: {k: v.clone() for k, v in adapter.blocks[i].state_dict().items()} for i in ahead}
        blocks, bcalls = list(adapter.blocks)[start:lookahead_end], calls[start:lookahead_end]
        for i in range(start, end):
            for m in state.learnables[i].values():
                m.eval()  # the loss is measured with hard offsets
        loss_init = _loss_through(blocks, bcalls, inputs, targets, cfg)
        st, outputs = original(adapter, start, end, lookahead_end, inputs, targets, calls, cfg, state, device, **kw)
        assert st.loss_init == pytest.approx(loss_init, rel=1e-6)
        assert not st.kept_init and st.loss_final < st.loss_init
        for i in ahead:
            block = adapter.blocks[i]
            assert not any(isinstance(m, LearnableLinear) for m in block.modules())
            assert all(p.grad is None for p in block.parameters()), f"look-ahead block {i} got gradients"
            after = block.state_dict()
            assert after.keys() == before[i].keys()
            assert all(torch.equal(after[k], v) for k, v in before[i].items()), f"look-ahead block {i} changed"
        assert st.loss_final == pytest.approx(_loss_through(blocks, bcalls, inputs, targets, cfg), rel=1e-6)
        assert torch.equal(targets.cat(), fp_bounds[lookahead_end].cat())
        seen.append((start, end, lookahead_end))
        return st, outputs

    monkeypatch.setattr(W, "train_and_propagate", spy)
    cfg = ReconConfig(window=1, overlap=0, lookahead=1, rounding="adaround", loss="mse", iters=5)
    _, stats = reconstruct_model(a, tiny_ids(8, 32), SPEC, cfg, ENGINE)
    assert seen == [(0, 1, 2), (1, 2, 3), (2, 3, 3)]  # the last window has nothing to look ahead to
    assert [(st.start, st.end) for st in stats] == [(0, 1), (1, 2), (2, 3)]


@pytest.mark.parametrize("lookahead, asked", [(0, [(0, 2, 2), (1, 3, 3)]), (1, [(0, 2, 3), (1, 3, 3)])])
def test_windows_targets_are_the_pristine_fp_boundaries_with_overlap_lookahead_and_cfp(monkeypatch, lookahead,
                                                                                        asked):
    """reconstruct_model advances one FP store window by window (FPCursor) instead of keeping all
    n + 1 boundaries: with overlap and CFP (which rewrites the blocks it initializes), every window's
    targets are still the untouched FP model's boundary min(end + L, n), bit for bit. Without
    look-ahead the cursor moves from boundary 2 to 3 after window (0, 2) has run CFP on blocks 0-1
    and carried block 1; a boundary behind the cursor is refused."""
    import quantlib.windows as W

    _, _, calls, fp_bounds = _captured()
    a = get_adapter(tiny_model())
    seen, original = [], W.train_and_propagate

    def spy(adapter, start, end, lookahead_end, inputs, targets, *args, **kw):
        assert torch.equal(targets.cat(), fp_bounds[lookahead_end].cat())
        seen.append((start, end, lookahead_end))
        return original(adapter, start, end, lookahead_end, inputs, targets, *args, **kw)

    monkeypatch.setattr(W, "train_and_propagate", spy)
    cfg = ReconConfig(window=2, overlap=1, lookahead=lookahead, rounding="signed", loss="mse", iters=3, cfp=True)
    reconstruct_model(a, tiny_ids(8, 32), SPEC, cfg, ENGINE)
    assert seen == asked
    cursor = W.FPCursor(get_adapter(tiny_model()), fp_bounds[0], calls, torch.device("cpu"))
    cursor.at(2)
    with pytest.raises(ValueError, match="boundary 1 asked after boundary 2"):
        cursor.at(1)


def test_lookahead_block_shapes_what_the_window_learns():
    """The training loss flows through the frozen look-ahead block: scaling one of its weights (after
    the FP targets are taken) changes the first step's loss and the rounding the window learns."""
    cpu = torch.device("cpu")
    cfg = ReconConfig(window=1, overlap=0, lookahead=1, rounding="adaround", loss="mse", iters=10)
    learned, first_loss = [], []
    for factor in (1.0, 1.5):
        a, x, calls, bounds = _captured()
        with torch.no_grad():
            a.blocks[1].get_submodule("mlp.down_proj").weight.mul_(factor)
        state = ReconState()
        init_block(a, 0, x, calls[0], SPEC, cfg, ENGINE, state)
        st = train_window(a, 0, 1, 2, x, bounds[2], calls, cfg, state, cpu)
        assert not st.kept_init
        learned.append({n: m.alpha.detach().clone() for n, m in state.learnables[0].items()})
        first_loss.append(st.curve[0])
    assert first_loss[0] != first_loss[1]
    assert any(not torch.equal(learned[0][n], learned[1][n]) for n in learned[0])


def test_overlap_reoptimizes_the_shared_block():
    model = tiny_model()
    a = get_adapter(model)
    seen = []

    def snapshot(st):
        seen.append((st.start, st.end))

    cfg = ReconConfig(window=2, overlap=1, rounding="adaround", loss="mse", iters=15)
    snaps = {}
    import quantlib.windows as W

    original = W.train_and_propagate

    def spy(adapter, start, end, *args, **kw):
        state = args[5]
        if 1 in state.learnables:
            snaps.setdefault((start, end), {n: m.alpha.detach().clone() for n, m in state.learnables[1].items()})
        r = original(adapter, start, end, *args, **kw)
        snaps[("after", start, end)] = {n: m.alpha.detach().clone() for n, m in state.learnables.get(1, {}).items()}
        return r

    W.train_and_propagate = spy
    try:
        reconstruct_model(a, tiny_ids(8, 32), SPEC, cfg, ENGINE, on_window=snapshot)
    finally:
        W.train_and_propagate = original
    assert seen == [(0, 2), (1, 3)]
    # block 1 enters window (1, 3) with the state window (0, 2) left, and window (1, 3) changes it again
    for n, alpha in snaps[(1, 3)].items():
        torch.testing.assert_close(alpha, snaps[("after", 0, 2)][n])
    assert any(not torch.equal(snaps[(1, 3)][n], snaps[("after", 1, 3)][n]) for n in snaps[(1, 3)])


def test_window_schedule():
    assert window_starts(5, 2, 1) == [(0, 2), (1, 3), (2, 4), (3, 5)]
    assert window_starts(5, 3, 1) == [(0, 3), (2, 5)]
    assert window_starts(4, 1, 0) == [(0, 1), (1, 2), (2, 3), (3, 4)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(window=2, overlap=2), "overlap must satisfy"),
    (dict(rank=0), "rank must be >= 1"),
    (dict(lr=-1e-3), "lr must be positive"),
    (dict(rounding="stochastic"), "rounding must be one of"),
    (dict(learn_weights=True, rounding="lora"), "learn_weights"),
    (dict(heldout=1.0), r"heldout must be in \[0, 1\)"),
    (dict(amp="fp16"), "amp must be one of"),
    (dict(optimizer="sgd"), "optimizer must be one of"),
    (dict(init_damp=0.0), r"init_damp must be in \(0, 1\)"),
    (dict(eval_every=4), "needs held-out batches"),
])
def test_bad_configs_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReconConfig(**kwargs)


def test_window_larger_than_model_fails_before_any_work():
    model = tiny_model()
    with pytest.raises(ValueError, match="window 5 is larger than the model's 3 blocks"):
        reconstruct_model(get_adapter(model), tiny_ids(4, 16), SPEC, ReconConfig(window=5, overlap=0), ENGINE)


def test_bf16_windows_train_under_autocast_and_say_so():
    """amp bf16 runs the window's training forward in bf16 (the learned scales differ from the fp32
    run's: ignoring amp would make them equal) and still lowers the fp32-judged window loss."""
    runs = {amp: _one_window(ReconConfig(window=1, overlap=0, rounding="nearest", init="gptq", loss="mse", iters=40,
                                         amp=amp)) for amp in ("fp32", "bf16")}
    (sf, mf, _), (sb, mb, _) = runs["fp32"], runs["bf16"]
    assert not sf.bf16 and sb.bf16 and sb.loss_final < sb.loss_init
    assert any(not torch.equal(mf[n].log_scale, mb[n].log_scale) for n in mf)


def test_reconstruction_is_deterministic_on_cpu():
    cfg = ReconConfig(window=2, overlap=1, rounding="lora", iters=10)
    r1, _ = reconstruct_model(get_adapter(tiny_model()), tiny_ids(8, 32), SPEC, cfg, ENGINE)
    r2, _ = reconstruct_model(get_adapter(tiny_model()), tiny_ids(8, 32), SPEC, cfg, ENGINE)
    assert all(torch.equal(r1[k].qweight, r2[k].qweight) and torch.equal(r1[k].scale, r2[k].scale) for k in r1)


@pytest.mark.parametrize("family", FAMILIES)
def test_cfp_equivalent_transform_keeps_fp_outputs(family):
    model = tiny_model(family)
    a = get_adapter(model)
    with torch.no_grad():  # plant activation outliers: a few channels of every norm scaled x30
        for block in a.blocks:
            for norm, _ in a.family.norms:
                n = block.get_submodule(norm)
                n.weight[:3] = (a.family.norm_offset + n.weight[:3]) * 30 - a.family.norm_offset
    ids = tiny_ids(4, 16)
    with torch.no_grad():
        ref = model(ids).logits
    batches, calls = capture_block_inputs(a, ids, 2)
    scaled = sum(apply_cfp(a, b, batches, calls[i], CFPConfig(weights=False), "cpu")["scaled_channels"]
                 for i, b in enumerate(a.blocks))
    assert scaled > 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cfp_weights", [True, False])
def test_a_window_applies_cfps_weight_half_only_when_asked(monkeypatch, cfp_weights):
    """recon-...-cfpa (cfp_weights=False) runs CFP's activation half alone: a planted weight outlier
    reaches the init's codes, where cfp truncates it; the option without cfp is refused."""
    import quantlib.windows as W

    a, x, calls, _ = _captured()
    w = a.blocks[0].get_submodule("mlp.down_proj").weight
    with torch.no_grad():
        w[0, :2] = 40 * w.abs().mean()
    big, seen, original = float(w[0, 0]), [], W.apply_cfp
    monkeypatch.setattr(W, "apply_cfp", lambda *args: seen.append(args[4]) or original(*args))
    state = ReconState()
    cfg = ReconConfig(window=1, overlap=0, init="rtn", cfp=True, cfp_weights=cfp_weights)
    init_block(a, 0, x, calls[0], QuantSpec(8, None), cfg, ENGINE, state)
    assert [c.weights for c in seen] == [cfp_weights]
    with torch.no_grad():
        got = float(state.learnables[0]["mlp.down_proj"].weight_hat(hard=True)[0, 0])
    assert (got < 0.5 * big) if cfp_weights else (got == pytest.approx(big, rel=0.01))
    with pytest.raises(ValueError, match=r"cfp_weights=False \(method part cfpa\) selects CFP's activation half"):
        ReconConfig(cfp_weights=False)


def test_cfp_truncates_planted_weight_outliers_to_the_largest_kept_magnitude():
    """Per row, the fine split puts the planted +-40 above every Gaussian value: exactly those 2 x 8
    entries are outliers, each is clipped to the row's largest kept |w| with its sign, every other
    entry is bit-identical, and the input is not modified."""
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    w[:, 0], w[:, 1] = 40.0, -40.0
    w_in = w.clone()
    out, count = truncate_weight_outliers(w, CFPConfig())
    kept = w[:, 2:].abs().amax(1)  # (8,) the threshold each row must get
    assert count == 16
    assert torch.equal(out[:, 0], kept) and torch.equal(out[:, 1], -kept)
    assert torch.equal(out[:, 2:], w[:, 2:])
    assert torch.equal(w, w_in)


@pytest.mark.parametrize("measure", [True, False])
def test_window_block_errors_only_when_the_engine_measures_them(measure):
    from quantlib.windows import run_window

    a = get_adapter(tiny_model())
    batches, calls = capture_block_inputs(a, tiny_ids(8, 32), 4)
    x = ActivationStore.from_batches(batches)
    bounds = fp_boundaries(get_adapter(tiny_model()), x, calls, torch.device("cpu"))
    cfg = ReconConfig(window=2, overlap=1, rounding="adaround", loss="mse", iters=10)
    engine = EngineConfig(batch_size=4, measure_block_error=measure)
    r = run_window(a, calls, x, bounds[2], (0, 2), 1, SPEC, cfg, engine)
    if not measure:
        assert r.stats.block_errors == []
        return
    [e] = r.stats.block_errors  # only the finished block 0
    assert e["block"] == 0 and 0 < e["after"] and 0 < e["before"]


def test_window_block_errors_on_the_first_batches_only():
    """block_errors(batches=k) equals block_errors over a store holding only the first k batches, and
    differs from the all-batch value (a sample that ignored k, or took other batches, fails)."""
    from quantlib.windows import block_errors

    a = get_adapter(tiny_model())
    batches, calls = capture_block_inputs(a, tiny_ids(12, 32), 4)
    x = ActivationStore.from_batches(batches)
    cfg = ReconConfig(window=2, overlap=0, rounding="nearest", init="rtn", loss="mse", iters=1)
    state = ReconState()
    for i in (0, 1):  # both blocks quantized, their FP copies kept in state
        x_i = x if i == 0 else forward_blocks([a.blocks[0]], [calls[0]], x, torch.device("cpu"))
        init_block(a, i, x_i, calls[i], SPEC, cfg, ENGINE, state)
    cpu = torch.device("cpu")
    sample = block_errors(a, [0, 1], x, calls, state, cpu, batches=1)
    assert sample == block_errors(a, [0, 1], ActivationStore.from_batches(batches[:1]), calls, state, cpu)
    full = block_errors(a, [0, 1], x, calls, state, cpu)
    assert all(e > 0 for e in sample + full) and sample != full


@pytest.mark.parametrize("seed", range(4))
def test_cfp_thresholds_of_all_rows_at_once_equal_each_rows_own_split(seed):
    """The batched thresholds (every row's split from one padded sort and prefix sums) equal
    _fine_split run on each row's own sorted candidates, bit for bit, on rows with many, two, one
    and no candidates, and with lam other than 1."""
    from quantlib.cfp import _fine_split, _iqr_upper, _thresholds

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 96, generator=g)
    w[:16, :5] *= torch.linspace(4, 30, 5)  # planted outliers of several sizes
    w[16, 0] = 25.0  # one planted value
    w[17] = 1.0 - 1e-3 * torch.arange(96)  # nearly flat: no candidates
    w[18], w[19] = 1.0, 1.0  # flat rows (IQR 0) with exactly one and exactly two values above them
    w[18, 0], w[19, :2] = 50.0, torch.tensor([50.0, 60.0])
    for cfg in (CFPConfig(), CFPConfig(lam=0.3)):
        u = w.abs() / w.abs().mean(1, keepdim=True)
        cand = u > _iqr_upper(u, cfg.iqr_k)
        lam = cfg.lam * u.var(1, unbiased=False)
        want = [_fine_split(torch.sort(u[r][cand[r]]).values, float(lam[r])) * float(w[r].abs().mean())
                if int(cand[r].sum()) >= 2 else None for r in range(w.shape[0])]
        assert _thresholds(w, cfg) == want
        counts = cand.sum(1).tolist()
        assert counts[17:20] == [0, 1, 2] and want[17] is None and want[18] is None and want[19] is not None
        assert all(t is not None for t in want[:16]) and max(counts) > 2


def _loop_split(values, lam):
    """The fine split by its definition, one candidate split at a time."""
    best, thr = -float("inf"), float(values[-1])
    for i in range(1, len(values)):
        lo, hi = values[:i].double(), values[i:].double()
        score = float(hi.mean() - lo.mean()) - lam * float(lo.var(unbiased=False) + hi.var(unbiased=False))
        if score > best:
            best, thr = score, float(values[i - 1])
    return thr


@pytest.mark.parametrize("seed", range(5))
def test_cfp_fine_split_from_prefix_sums_equals_the_definition(seed):
    from quantlib.cfp import _fine_split

    g = torch.Generator().manual_seed(seed)
    values, _ = torch.sort(torch.cat([torch.rand(20, generator=g), 3 + 5 * torch.rand(4, generator=g)]))
    for lam in (0.0, 0.3, 2.0):
        assert _fine_split(values, lam) == _loop_split(values, lam)


def test_cfp_weight_threshold_is_scale_invariant():
    """thr(c w) = c thr(w): the cut is made in the row's own unit. On raw magnitudes (the score adds
    a distance of means, which scales with c, to variances, which scale with c^2) it moves."""
    from quantlib.cfp import _fine_split, weight_outlier_threshold

    g = torch.Generator().manual_seed(0)
    row = torch.randn(512, generator=g)
    row[:12] *= torch.linspace(4, 30, 12)  # a spread of outliers, so where the cut lands matters
    cfg = CFPConfig()
    thr = weight_outlier_threshold(row, cfg)
    for c in (1e-3, 0.05, 20.0):
        assert weight_outlier_threshold(row * c, cfg) == pytest.approx(c * thr, rel=1e-5)
    a = row.abs()
    q1, q3 = float(torch.quantile(a, 0.25)), float(torch.quantile(a, 0.75))
    cand, _ = torch.sort(a[a > q3 + 1.5 * (q3 - q1)])
    raw = [_fine_split(cand * c, 1.0) / c for c in (1e-3, 20.0)]  # the same split rule on raw values
    assert raw[0] != pytest.approx(raw[1], rel=1e-3)


def _window_with_a_poisoned_batch(cfg: ReconConfig, poison: float = 100.0):
    """Block 0 trained on 2 calibration batches whose second has targets `poison` off: (stats, adapter,
    x, calls, targets). Any step on that batch has a loss far above any step on the first."""
    a, x, calls, bounds = _captured()
    targets = ActivationStore.from_batches([bounds[1][0], bounds[1][1] + poison])
    state = ReconState()
    init_block(a, 0, x, calls[0], SPEC, cfg, ENGINE, state)
    return train_window(a, 0, 1, 1, x, targets, calls, cfg, state, torch.device("cpu")), a, x, calls, targets


def test_heldout_batches_never_train_and_the_guard_judges_on_them():
    base = dict(window=1, overlap=0, rounding="nearest", init="rtn", loss="mse", iters=12)
    judged, *_ = _window_with_a_poisoned_batch(ReconConfig(**base, heldout=0.5))
    assert judged.heldout_batches == 1 and len(judged.curve) == 12
    assert max(judged.curve) < 1.0 < judged.loss_init  # steps saw only batch 0; the guard only batch 1
    mixed, *_ = _window_with_a_poisoned_batch(ReconConfig(**base))  # heldout 0: both batches train
    assert mixed.heldout_batches == 0 and max(mixed.curve) > 1.0


def test_early_stopping_ships_the_best_evaluated_state():
    cfg = ReconConfig(window=1, overlap=0, rounding="nearest", init="rtn", loss="mse", clip_lr=0.05, iters=24,
                      heldout=0.5, eval_every=4, patience=0)
    st, a, x, calls, targets = _window_with_a_poisoned_batch(cfg, poison=0.0)
    losses = [loss for _, loss in st.heldout_curve]
    assert [i for i, _ in st.heldout_curve] == [4, 8, 12, 16, 20, 24] and not st.stopped_early
    assert not st.kept_init and st.loss_final == min(losses) < st.loss_init
    assert st.best_iter == st.heldout_curve[losses.index(min(losses))][0] < 24  # not the last state: restored
    shipped = _eval_loss([a.blocks[0]], [calls[0]], x, targets, cfg, torch.device("cpu"), [1])
    assert shipped == st.loss_final  # the modules hold the best state, not the last one


def test_early_stopping_stops_after_patience_and_keeps_the_init_when_nothing_beat_it():
    # a huge rate wrecks the clipping at once: every evaluation is worse than the init
    cfg = ReconConfig(window=1, overlap=0, rounding="nearest", init="rtn", loss="mse", clip_lr=50.0, iters=40,
                      heldout=0.5, eval_every=2, patience=2)
    st, *_ = _window_with_a_poisoned_batch(cfg, poison=0.0)
    assert st.stopped_early and len(st.heldout_curve) == 2 and len(st.curve) == 4
    assert st.kept_init and st.loss_final == st.loss_init and st.best_iter is None


def test_split_batches_holds_out_the_last_ones_and_refuses_too_few():
    assert split_batches(16, 0.125) == (list(range(14)), [14, 15])
    assert split_batches(3, 0.0) == ([0, 1, 2], [0, 1, 2])
    assert split_batches(2, 0.9) == ([0], [1])  # at least one batch trains
    with pytest.raises(ValueError, match="at least 2 calibration batches"):
        split_batches(1, 0.5)


def test_window_trains_judges_and_propagates_with_quantized_inputs():
    """engine.act_inputs a4: the window's loss is that of its blocks with a4 inputs (iters=0: the
    kept init judged through a4 hooks on the finished block), the activations it passes on are the
    finished block's with a4 inputs, the training forward itself sees them (from one RTN init, the
    first step's loss differs from float inputs'), and no hook stays behind."""
    from quantlib.actquant import ActSpec, attach, attached
    from quantlib.windows import run_window

    def window(act, iters):
        model = tiny_model()
        a = get_adapter(model)
        batches, calls = capture_block_inputs(a, tiny_ids(8, 32), 4)
        x = ActivationStore.from_batches(batches)
        bounds = fp_boundaries(a, x, calls, torch.device("cpu"))
        cfg = ReconConfig(window=1, overlap=0, rounding="nearest", init="rtn", loss="mse", iters=iters)
        r = run_window(a, calls, x, bounds[1], (0, 1), 1, SPEC, cfg, EngineConfig(batch_size=4, act_inputs=act))
        assert attached(model) == {}
        return a, x, calls, bounds, cfg, r

    a, x, calls, bounds, cfg, r = window("a4", 0)
    attach(a.blocks[0], a.linear_names(a.blocks[0]), ActSpec(4))
    expect = _eval_loss([a.blocks[0]], [calls[0]], x, bounds[1], cfg, torch.device("cpu"),
                        split_batches(len(x), cfg.heldout)[1])
    assert r.stats.loss_init == pytest.approx(expect, rel=1e-6)
    with torch.no_grad():
        assert all(torch.equal(got, run_block(a.blocks[0], xb, calls[0])) for got, xb in zip(r.outputs, x))
    first = {act: window(act, 2)[-1].stats.curve[0] for act in ("a4", None)}
    assert first["a4"] != pytest.approx(first[None], rel=1e-4)


def test_overlapping_windows_on_quantized_inputs_leave_no_activation_hook_behind():
    """k2o1 (every block after the first is carried into the next window) with a4 inputs and block
    errors measured: every block's error is reported and the hooks come off every module."""
    from quantlib.actquant import _Hook

    model = tiny_model()
    a = get_adapter(model)
    cfg = ReconConfig(window=2, overlap=1, rounding="lora", loss="mse", iters=2)
    _, stats = reconstruct_model(a, tiny_ids(8, 32), SPEC, cfg,
                                 EngineConfig(batch_size=4, act_inputs="a4", measure_block_error=True))
    assert [e["block"] for s in stats for e in s.block_errors] == list(range(len(a.blocks)))
    left = [n for n, m in model.named_modules() for h in m._forward_pre_hooks.values() if isinstance(h, _Hook)]
    assert left == [] and all(getattr(m, "act_spec", None) is None for m in model.modules())


def test_block_errors_on_quantized_inputs_compare_with_an_fp_block_on_quantized_inputs():
    """The engine's convention: with a4 inputs, F(X) is the FP block with a4 inputs of its own."""
    import copy

    from quantlib.actquant import ActSpec, attach
    from quantlib.windows import block_errors, quantized_inputs

    a, x, calls, _ = _captured()
    state = ReconState()
    init_block(a, 0, x, calls[0], SPEC, ReconConfig(window=1, overlap=0, init="rtn"), ENGINE, state)
    fp = copy.deepcopy(state.fp_blocks[0])
    attach(fp, a.linear_names(fp), ActSpec(4))
    with quantized_inputs(a, [0], "a4"), torch.no_grad():
        got = {act: block_errors(a, [0], x, calls, state, torch.device("cpu"), act_inputs=act)[0] for act in ("a4", None)}
        yq = [run_block(a.blocks[0], xb, calls[0]) for xb in x]
        yf = [run_block(fp, xb, calls[0]) for xb in x]
    expect = sum(float((q - f).pow(2).sum()) for q, f in zip(yq, yf)) / sum(float(f.pow(2).sum()) for f in yf)
    assert got["a4"] == pytest.approx(expect, rel=1e-5) and got[None] != pytest.approx(expect, rel=1e-3)


def _learnable(rounding: str, g_idx: torch.Tensor | None = None, seed: int = 0, grid: str = "init") -> LearnableLinear:
    """A LearnableLinear (frozen grid unless grid "learned") on an RTN init of a random (24, 64) weight,
    groups of 32, its rounding (and range) parameters moved off their init so the offsets are not all
    the initializer's."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 64, generator=gen)
    qw = rtn_quantize(w, SPEC)
    if g_idx is not None:  # the same codes and grid read with another column -> group map
        qw = QuantizedWeight(qw.qweight, qw.scale, qw.zero, g_idx, SPEC)
    cfg = ReconConfig(window=1, overlap=0, rounding=rounding, init="gptq", grid=grid)
    m = LearnableLinear(qw, qw.dequantize() + 0.3 * qw.scale.repeat_interleave(32, 1) * torch.rand(24, 64, generator=gen),
                        None, cfg, generator=gen)
    for ps in m.param_groups().values():  # what train_window trains (the scale: learn_clip on a frozen grid)
        for p in ps:
            p.requires_grad_(True)
    with torch.no_grad():
        m.alpha.add_(torch.randn(m.alpha.shape, generator=gen))
        m.log_scale.add_(0.05 * torch.randn(m.log_scale.shape, generator=gen))
        m.clip_hi.add_(-2 * torch.rand(m.clip_hi.shape, generator=gen))
        m.clip_lo.add_(-2 * torch.rand(m.clip_lo.shape, generator=gen))
        if rounding == "lora":
            m.lora_b.add_(torch.randn(m.lora_b.shape, generator=gen))
    return m


def _general(m: LearnableLinear, hard: bool) -> torch.Tensor:
    scale, zero = m.qparams()
    return dequantize(m._codes(scale, zero, hard), m._expand(scale), m._expand(zero))


@pytest.mark.parametrize("rounding, grid", [("lora", "init"), ("adaround", "init"), ("signed", "init"),
                                           ("signed", "learned")])
@pytest.mark.parametrize("hard", [False, True])
def test_grouped_fake_quant_equals_the_general_path_bit_for_bit(rounding, grid, hard):
    """The (out, G, gs) view path (a frozen grid's offsets, signed rounding on either grid) must give
    the general path's weight and rounding gradients exactly (the range's up to summation order): a
    wrong group layout, a stale floor or a missing straight-through term would differ."""
    m = _learnable(rounding, grid=grid)
    assert m.grouped
    x = torch.randn(5, 64)
    grads = []
    for fast in (True, False):
        m.zero_grad()
        w = m.weight_hat(hard) if fast else _general(m, hard)
        (x @ w.T).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        if fast:
            w_fast = w.detach()
    assert torch.equal(w_fast, _general(m, hard).detach())
    ranges = {"log_scale", "clip_hi", "clip_lo"}
    assert grads[0].keys() == grads[1].keys() and ranges & grads[0].keys()
    for n in grads[0]:  # the range's gradient sums each group in another order (a view, not a scatter)
        if n in ranges:
            torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(grads[0][n], grads[1][n]), n
    assert torch.equal(m.harden().dequantize(), _general(m, True).detach())


def test_grouped_fake_quant_follows_a_loaded_state_and_refuses_shuffled_groups():
    """A resumed module (load_state_dict of another latent) must not reuse the old floor(W / s0 + z0);
    a permuted g_idx (act-order written out of order) must take the general path."""
    m, other = _learnable("lora", seed=0), _learnable("lora", seed=1)
    m.weight_hat()  # fill the cache
    m.load_state_dict(other.state_dict())
    assert torch.equal(m.weight_hat(), other.weight_hat())
    shuffled = _learnable("lora", g_idx=torch.randperm(64, generator=torch.Generator().manual_seed(3)).int() // 32)
    assert not shuffled.grouped
    assert torch.equal(shuffled.weight_hat(), _general(shuffled, False))


@pytest.mark.parametrize("rounding", ["adaround", "lora"])
def test_learned_grid_clipping_learns_through_the_codes_it_moves(rounding):
    """On a learned grid the codes are floor(W / s + z) + h: the clipping's gradient must include the
    straight-through path through W / s (as nearest rounding's ste_codes, OmniQuant's LWC and AutoRound
    have), not only the dequantization s (q - z); a detached floor loses it. Checked against autograd of
    the formula with the floor's gradient taken as 1 and as 0."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=gen)
    qw = rtn_quantize(w, SPEC)
    m = LearnableLinear(qw, w, None, ReconConfig(window=1, overlap=0, rounding=rounding, init="rtn", grid="learned"), gen)
    with torch.no_grad():
        m.clip_hi.fill_(1.0)
        m.clip_lo.fill_(2.0)
    probe = torch.randn(8, 64, generator=gen)
    (m.weight_hat() * probe).sum().backward()
    got = m.clip_hi.grad.clone()

    def formula(straight_through: bool) -> torch.Tensor:
        hi = m.clip_hi.detach().clone().requires_grad_(True)
        g_hi = torch.sigmoid(hi) / torch.sigmoid(torch.tensor(4.0))
        g_lo = torch.sigmoid(m.clip_lo.detach()) / torch.sigmoid(torch.tensor(4.0))
        top, bottom = g_hi * (SPEC.maxq - m.z0) * m.s0, -g_lo * m.z0 * m.s0
        s = ((top - bottom) / SPEC.maxq).clamp_min(1e-10)
        z = torch.clamp(round_ste(-bottom / s), 0, SPEC.maxq)
        v = m.latent.detach() / s.repeat_interleave(32, 1) + z.repeat_interleave(32, 1)
        fl = v + (torch.floor(v) - v).detach() if straight_through else torch.floor(v)
        h = m._offsets(False).detach()
        q = torch.clamp(fl + h, 0, SPEC.maxq)
        (s.repeat_interleave(32, 1) * (q - z.repeat_interleave(32, 1)) * probe).sum().backward()
        return hi.grad

    torch.testing.assert_close(got, formula(True))
    assert not torch.allclose(got, formula(False))


@pytest.mark.parametrize("grid", ["learned", "init"])
def test_signed_rounding_is_round_of_w_over_s_plus_v_with_a_straight_through_gradient(grid):
    """SignRound's codes: q = clamp(round(W / s + v) + z) with v clamped to [-1/2, 1/2]; v = 0 gives the
    initializer's codes (ties included), and dL/dv = dL/dq (the rounding straight-through, zero where v
    is past its clamp); on a learned grid a moved grid re-rounds the same W / s + v."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=gen)
    qw = rtn_quantize(w, SPEC)
    cfg = ReconConfig(window=1, overlap=0, rounding="signed", init="rtn", grid=grid)
    m = LearnableLinear(qw, w, None, cfg, gen)
    assert torch.equal(m.harden().qweight, qw.qweight)
    v = torch.empty(8, 64).uniform_(-0.8, 0.8, generator=gen)
    with torch.no_grad():
        m.alpha.copy_(v)
        if grid == "learned":
            m.clip_hi.fill_(1.0)
    scale, zero = m.qparams()
    s, z = (scale, zero) if grid == "learned" else (m.s0, m.z0)
    s_, z_, scale_ = (t.repeat_interleave(32, 1).detach() for t in (s, z, scale))
    q = torch.clamp(torch.round(w / s_ + v.clamp(-0.5, 0.5)) + z_, 0, SPEC.maxq)
    assert torch.equal(m.harden().qweight.float(), q)
    probe = torch.randn(8, 64, generator=gen)
    (m.weight_hat() * probe).sum().backward()
    inside = (v.abs() < 0.5) & (torch.round(w / s_ + v) + z_ >= 0) & (torch.round(w / s_ + v) + z_ <= SPEC.maxq)
    torch.testing.assert_close(m.alpha.grad[inside], (probe * scale_)[inside])
    assert torch.all(m.alpha.grad[v.abs() > 0.5] == 0)
    assert m.regularizer(2.0) == 0


@pytest.mark.parametrize("cfg, window, nxt, passes", [
    # 2 calibration batches; block-batch forwards without grad: init loss 2, final loss + outputs 2
    (ReconConfig(window=1, overlap=0, init="rtn", rounding="signed", optimizer="sign", schedule="linear", lr=0.05,
                 loss="mse", iters=6), (0, 1), 1, 4),
    # batch 1 judged: init loss 1, final pass 2 (batch 0 only for its outputs)
    (ReconConfig(window=1, overlap=0, init="rtn", rounding="signed", optimizer="sign", schedule="linear", lr=0.05,
                 loss="mse", iters=6, heldout=0.5), (0, 1), 1, 3),
    # GPTQ init: 4 Hessian groups x 2 batches per block, block 0's outputs 2 (block 1 is initialized
    # on them); init loss and final loss 2 x 2 blocks, block 0's outputs kept on the way
    (ReconConfig(window=2, overlap=1, init="gptq", rounding="adaround", loss="mse", iters=6), (0, 2), 1,
     8 + 2 + 8 + 4 + 4),
    (ReconConfig(window=1, overlap=0, init="rtn", rounding="nearest", loss="mse", iters=0), (0, 1), 1, 4),
])
def test_window_passes_on_its_final_loss_pass_outputs_bit_for_bit(monkeypatch, cfg, window, nxt, passes):
    """The activations a window passes on come from its final loss's pass (hardened LearnableLinears,
    the judged batches and the rest), and equal the finalized blocks' forward exactly; no other
    no-grad pass runs (the RTN init of a window's last block, whose outputs nothing reads, runs
    none): a regression back to separate passes fails the count."""
    import quantlib.capture as Cap
    import quantlib.engine as E
    import quantlib.windows as W

    a, x, calls, bounds = _captured()
    seen = []

    def counting(block, xb, call):
        if not torch.is_grad_enabled():
            seen.append(xb.shape[0])
        return Cap.run_block(block, xb, call)

    monkeypatch.setattr(W, "run_block", counting)
    monkeypatch.setattr(E, "run_block", counting)
    r = W.run_window(a, calls, x, bounds[window[1]], window, nxt, SPEC, cfg, ENGINE)
    assert len(x) == 2 and len(seen) == passes
    assert not r.stats.kept_init and r.stats.loss_final <= r.stats.loss_init
    done = [a.blocks[i] for i in range(window[0], nxt)]
    assert not any(isinstance(m, LearnableLinear) for b in done for m in b.modules())
    expect = forward_blocks(done, calls[window[0]:nxt], x, torch.device("cpu"))
    assert len(r.outputs) == len(x)
    assert all(torch.equal(got, want) for got, want in zip(r.outputs, expect))


def test_windows_on_a_bfloat16_model_train_and_pass_on_bfloat16_activations():
    """A bf16 source (fetch_model.dtype: bfloat16): the windows run its bf16 blocks, lower their
    losses, leave bf16 weights holding the hardened codes, and pass on bf16 activations equal to the
    finalized bf16 block's forward; the learned state stays float32."""
    import quantlib.windows as W

    a = get_adapter(tiny_model().to(torch.bfloat16))
    batches, calls = capture_block_inputs(a, tiny_ids(8, 32), 4)
    x = ActivationStore.from_batches(batches)
    bounds = fp_boundaries(a, x, calls, torch.device("cpu"))
    assert x[0].dtype == bounds[1][0].dtype == torch.bfloat16
    cfg = ReconConfig(window=1, overlap=0, init="rtn", rounding="signed", optimizer="sign", schedule="linear",
                      lr=0.05, loss="mse", iters=8)
    r = W.run_window(a, calls, x, bounds[1], (0, 1), 1, SPEC, cfg, ENGINE)
    assert not r.stats.kept_init and r.stats.loss_final < r.stats.loss_init
    assert all(p.dtype == torch.bfloat16 for p in a.blocks[0].parameters())
    for name, m in a.linears(a.blocks[0]).items():
        want = r.results[f"{a.family.layers}.0.{name}"].dequantize().to(torch.bfloat16)
        assert torch.equal(a.get_weight(m), want), name
    expect = forward_blocks([a.blocks[0]], calls[:1], x, torch.device("cpu"))
    assert all(got.dtype == torch.bfloat16 and torch.equal(got, want) for got, want in zip(r.outputs, expect))
