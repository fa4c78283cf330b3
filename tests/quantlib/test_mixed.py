"""Mixed precision (quantlib.mixed): the Fisher pass, the knapsack allocation, and plans through the
engine. Tiny random models; each test names the bug it catches."""
import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from quantlib.adapters import get_adapter
from quantlib.boa import BoAConfig
from quantlib.engine import EngineConfig, quantize_model
from quantlib.gptq import GPTQConfig
from quantlib.mixed import MixedConfig, Unit, allocate, fisher_diagonal, plan_mixed, uniform_bits
from quantlib.qweight import bits_per_weight
from quantlib.rtn import RTNConfig
from quantlib.spec import QuantSpec, SpecMap, parse_scheme, spec_for

from tiny import tiny_ids, tiny_model

W2, W3, W4 = QuantSpec(2, 32), QuantSpec(3, 32), QuantSpec(4, 32)


@pytest.mark.parametrize("spec", [QuantSpec(3, 32), QuantSpec(4, None), QuantSpec(2, 16, sym=True)])
def test_stored_bits_is_what_the_codes_scales_and_zeros_take(spec):
    """The allocator's sizes (QuantSpec.stored_bits) and what rows report (bits_per_weight) against a
    count of the stored tensors themselves: codes of `bits` bits, an fp16 scale per group and, when
    asymmetric, a `bits`-bit zero per group."""
    model = tiny_model()
    res, _ = quantize_model(get_adapter(model), None, spec, RTNConfig())
    per_group = 16 + (0 if spec.sym else spec.bits)
    counted = sum(qw.qweight.numel() * spec.bits + qw.scale.numel() * per_group for qw in res.values())
    counted /= sum(qw.qweight.numel() for qw in res.values())
    units = [Unit((k,), qw.qweight.numel(), qw.shape[1], ()) for k, qw in res.items()]
    assert uniform_bits(units, spec) == pytest.approx(counted, rel=1e-12) == bits_per_weight(res)


def test_fisher_is_the_mean_squared_per_sequence_gradient():
    """Against autograd one sequence at a time on one Linear; catches a batch gradient squared
    (instead of per-sequence squares), a missing mean, or a transposed layout. Weights and
    requires_grad come back untouched."""
    model, ids = tiny_model(), tiny_ids(3, 16)
    adapter = get_adapter(model)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    fisher = fisher_diagonal(adapter, ids)
    w = model.model.layers[1].mlp.down_proj.weight
    want = torch.zeros_like(w)
    for seq in ids:
        logits = model(seq[None]).logits[0, :-1]
        (g,) = torch.autograd.grad(F.cross_entropy(logits, seq[1:]), w)
        want += g ** 2
    torch.testing.assert_close(fisher["model.layers.1.mlp.down_proj"], want / len(ids), rtol=1e-4, atol=1e-12)
    assert len(fisher) == 3 * 7
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1]
        assert p.grad is None


def _brute(units, candidates, budget_bits):
    best = None
    for picks in itertools.product(range(len(candidates)), repeat=len(units)):
        size = sum(candidates[c].stored_bits(u.in_features) * u.weights for u, c in zip(units, picks))
        if size <= budget_bits:
            cost = sum(u.costs[c] for u, c in zip(units, picks))
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_the_knapsack_optimum(seed):
    """Exhaustive search over 5 units x 3 schemes: the plan fits the budget and costs no more than the
    best plan that fits a budget smaller by the rounding allowance (units x step). A greedy or a
    backtracking slip shows here."""
    rnd = random.Random(seed)
    units = [Unit((f"u{i}",), rnd.choice([64, 128, 256]) * 32, 64,
                  tuple(sorted((rnd.random() * 10 ** rnd.uniform(-2, 1) for _ in range(3)), reverse=True)))
             for i in range(5)]
    total = sum(u.weights for u in units)
    target = rnd.uniform(2.8, 4.2)
    picks = allocate(units, (W2, W3, W4), target, resolution=20000)
    size = sum((W2, W3, W4)[c].stored_bits(u.in_features) * u.weights for u, c in zip(units, picks))
    assert size <= target * total
    cost = sum(u.costs[c] for u, c in zip(units, picks))
    assert cost <= _brute(units, (W2, W3, W4), target * total * (1 - len(units) / 20000)) + 1e-12


def test_allocation_spends_bits_where_they_buy_most():
    """Two equal units, one 100x more sensitive, budget for one upgrade: it goes to the sensitive one."""
    units = [Unit(("a",), 4096, 64, (1.0, 0.5)), Unit(("b",), 4096, 64, (100.0, 50.0))]
    target = (W2.stored_bits(64) + W4.stored_bits(64)) / 2
    assert allocate(units, (W2, W4), target) == [0, 1]  # exactly at the budget: rounding must not lose it
    with pytest.raises(ValueError, match="below the smallest plan"):
        allocate(units, (W3, W4), 2.5)


def test_plan_through_the_engine_keeps_shared_inputs_together_and_fits():
    """A plan at a size between uniform W2 and W4 uses both, gives Linears that share an input one
    scheme, and the engine (GPTQ and BoA, whose q/k solve needs one scheme) quantizes each Linear on
    its planned grid within the budget."""
    model, ids = tiny_model(), tiny_ids(8, 32)
    adapter = get_adapter(model)
    cfg = MixedConfig((W2, W4), bits=3.0, samples=4)
    plan, units, target = plan_mixed(adapter, ids, cfg, default=W3)
    assert target == 3.0 and {s for _, s in plan.layers} == {W2, W4}
    for u in units:
        assert len({plan[p] for p in u.paths}) == 1
    assert any(len(u.paths) == 3 for u in units)  # q/k/v
    for method in (GPTQConfig(), BoAConfig()):
        res, _ = quantize_model(get_adapter(tiny_model()), ids, plan, method, EngineConfig(batch_size=4))
        assert {k: qw.spec for k, qw in res.items()} == dict(plan.layers)
        assert bits_per_weight(res) <= 3.0


def test_boa_takes_a_plan_whatever_its_hessian_groups():
    """Without true-sequential the engine hands BoA a block's seven Linears as one group: a plan that
    differs inside the block must still go through (only q and k share a sweep), v on its own grid."""
    ids = tiny_ids(8, 32)
    plan = SpecMap(W3, (("model.layers.0.mlp.down_proj", W2), ("model.layers.0.self_attn.v_proj", W4)))
    res, _ = quantize_model(get_adapter(tiny_model()), ids, plan, BoAConfig(),
                            EngineConfig(batch_size=4, true_sequential=False))
    assert {k: qw.spec for k, qw in res.items()} == {k: plan[k] for k in res}


def test_reconstruction_windows_train_each_linear_on_its_planned_grid():
    """Overlapping windows (a block re-installed from the previous window's saved state) keep each
    Linear's scheme: a window that rebuilt its LearnableLinears on one scheme would break this."""
    from quantlib.recon import ReconConfig
    from quantlib.windows import reconstruct_model

    ids = tiny_ids(8, 32)
    plan = SpecMap(W3, (("model.layers.1.mlp.down_proj", W2), ("model.layers.1.self_attn.o_proj", W4)))
    cfg = ReconConfig(window=2, overlap=1, iters=2, batch_size=4)
    res, _ = reconstruct_model(get_adapter(tiny_model()), ids, plan, cfg, EngineConfig(batch_size=4))
    assert {k: qw.spec for k, qw in res.items()} == {k: plan[k] for k in res} and len(res) == 3 * 7


def test_equal_size_default_and_label():
    """bits=None sizes the plan as the uniform default scheme."""
    model, ids = tiny_model(), tiny_ids(4, 16)
    cfg = MixedConfig((QuantSpec(2, 64), W3), samples=2)
    plan, units, target = plan_mixed(get_adapter(model), ids, cfg, default=QuantSpec(2, 32))
    assert target == pytest.approx(QuantSpec(2, 32).stored_bits(64))
    res, _ = quantize_model(get_adapter(tiny_model()), None, plan, RTNConfig())
    assert bits_per_weight(res) <= target
    assert cfg.label(QuantSpec(2, 32)) == "mix(w2g64+w3g32)@w2g32"
    assert MixedConfig((W2,), bits=2.4).label(W2) == "mix(w2g32)@2.40"


def test_bad_plans_are_refused_before_work():
    with pytest.raises(ValueError, match="distinct"):
        MixedConfig((W2, W2))
    with pytest.raises(ValueError, match="bits per weight"):
        MixedConfig((W2,), bits=0.5)
    with pytest.raises(ValueError, match="sorted"):
        SpecMap(W3, (("b", W2), ("a", W4)))
    with pytest.raises(ValueError, match="does not divide"):  # 48 does not divide the tiny model's 64
        plan_mixed(get_adapter(tiny_model()), tiny_ids(2, 8), MixedConfig((parse_scheme("w2g48"),)), W3)
    # BoA solves q and k jointly: a hand-made plan that splits them is refused, naming both
    split = SpecMap(W3, (("model.layers.0.self_attn.k_proj", W2), ("model.layers.0.self_attn.q_proj", W4)))
    with pytest.raises(ValueError, match="q_proj.*k_proj|solved jointly"):
        quantize_model(get_adapter(tiny_model()), tiny_ids(4, 16), split, BoAConfig(), EngineConfig(batch_size=4))
    assert spec_for(split, "model.layers.0.self_attn.v_proj") == W3
