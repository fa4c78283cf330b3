import pytest
import torch

from quantlib.adapters import get_adapter
from quantlib.capture import capture_block_inputs, run_block
from quantlib.activations import ActivationStore
from quantlib.cfp import CFPConfig, apply_cfp, truncate_weight_outliers
from quantlib.engine import EngineConfig
from quantlib.recon import LearnableLinear, ReconConfig, window_starts
from quantlib.spec import QuantSpec
from quantlib.windows import ReconState, forward_blocks, fp_boundaries, init_block, reconstruct_model, train_window

from tiny import FAMILIES, tiny_ids, tiny_model

SPEC = QuantSpec(2, 32)
ENGINE = EngineConfig(batch_size=4)


def _one_window(cfg: ReconConfig, family="llama"):
    """Block 0 of a tiny model: init, train, return (stats, its LearnableLinears, their init state)."""
    model = tiny_model(family)
    a = get_adapter(model)
    batches, calls = capture_block_inputs(a, tiny_ids(8, 32), 4)
    x = ActivationStore.from_batches(batches)
    bounds = fp_boundaries(a, x, calls, torch.device("cpu"))
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
])
def test_each_learnable_moves_and_lowers_the_window_loss(what, cfg, moved):
    stats, mods, before = _one_window(cfg)
    assert stats.loss_final < stats.loss_init, (what, stats.loss_init, stats.loss_final)
    assert not stats.kept_init
    assert any(not torch.equal(m.state_dict()[moved], before[n][moved]) for n, m in mods.items())


def test_frozen_grid_keeps_the_initializers_codes_and_learns_the_scale():
    """GPTQ init (grid auto = init), nearest rounding: only the dequantization scale learns, the codes
    are the initializer's, and the learned grid (LWC) re-derives them."""
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


def test_guard_keeps_the_initialization_when_training_makes_it_worse():
    # a huge learning rate wrecks the clipping: the guard must restore the init and say so
    cfg = ReconConfig(window=1, overlap=0, rounding="nearest", clip_lr=50.0, init="rtn", loss="mse", iters=10)
    stats, mods, before = _one_window(cfg)
    assert stats.kept_init and stats.loss_final == stats.loss_init
    assert all(torch.equal(m.state_dict()["clip_hi"], before[n]["clip_hi"]) for n, m in mods.items())


def test_lora_rounding_hardens_to_binary_offsets():
    cfg = ReconConfig(window=1, overlap=0, rounding="lora", hard_forward=False, reg_weight=10.0, beta=(20.0, 2.0),
                      warmup=0.0, init="rtn", loss="mse", iters=60)
    _, mods, _ = _one_window(cfg)
    for m in mods.values():
        h = m.soft_offsets().detach()
        qw = m.harden()
        offsets = qw.qweight.float() - m._floor()
        # codes are the floor plus a hard 0/1 offset (up to clamping at the grid ends)
        inside = (offsets >= 0) & (offsets <= 1)
        assert inside.float().mean() > 0.99
        assert set(offsets[inside].unique().tolist()) <= {0.0, 1.0}
        assert h.numel() == m.latent.numel()


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


def test_lookahead_window_trains_through_frozen_fp_blocks():
    model = tiny_model()
    a = get_adapter(model)
    fp1 = {k: v.clone() for k, v in a.blocks[1].state_dict().items()}
    cfg = ReconConfig(window=1, overlap=0, lookahead=1, rounding="adaround", loss="mse", iters=20)
    _, stats = reconstruct_model(a, tiny_ids(8, 32), SPEC, cfg, ENGINE)
    assert stats[0].start == 0 and stats[0].end == 1
    assert len(stats) == 3


def test_overlap_reoptimizes_the_shared_block():
    model = tiny_model()
    a = get_adapter(model)
    seen = []

    def snapshot(st):
        seen.append((st.start, st.end))

    cfg = ReconConfig(window=2, overlap=1, rounding="adaround", loss="mse", iters=15)
    snaps = {}
    original = train_window

    import quantlib.windows as W

    def spy(adapter, start, end, *args, **kw):
        state = args[5]
        if 1 in state.learnables:
            snaps.setdefault((start, end), {n: m.alpha.detach().clone() for n, m in state.learnables[1].items()})
        st = original(adapter, start, end, *args, **kw)
        snaps[("after", start, end)] = {n: m.alpha.detach().clone() for n, m in state.learnables.get(1, {}).items()}
        return st

    W.train_window = spy
    try:
        reconstruct_model(a, tiny_ids(8, 32), SPEC, cfg, ENGINE, on_window=snapshot)
    finally:
        W.train_window = original
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
])
def test_bad_configs_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReconConfig(**kwargs)


def test_window_larger_than_model_fails_before_any_work():
    model = tiny_model()
    with pytest.raises(ValueError, match="window 5 is larger than the model's 3 blocks"):
        reconstruct_model(get_adapter(model), tiny_ids(4, 16), SPEC, ReconConfig(window=5, overlap=0), ENGINE)


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


def test_cfp_truncates_planted_weight_outliers():
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    w[:, :2] = 40.0
    out, count = truncate_weight_outliers(w, CFPConfig())
    assert count >= 16 and out.abs().max() < 10
    assert torch.equal(out[:, 10:], w[:, 10:]) or (out[:, 10:] - w[:, 10:]).abs().max() < 4


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
