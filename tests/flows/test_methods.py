"""flows.methods: method names parse into typed configs (reconstruction names spell their
configuration; `+qat` adds global QAT), bad names fail naming the bad part, and the device choice."""
from __future__ import annotations

import re

import pytest
import torch

from flows.methods import METHOD_FORMS, MethodChoice, method_config, parse_method, resolve_device
from quantlib.boa import BoAConfig
from quantlib.gptq import GPTQConfig
from quantlib.qat import QATConfig
from quantlib.recon import ReconConfig
from quantlib.rtn import RTNConfig


@pytest.mark.parametrize("name, expect", [
    ("recon", dict(window=2, overlap=1, lookahead=0, rounding="lora", loss="mse+kl", iters=100)),
    ("recon-k2o1-lora-kl", dict(window=2, overlap=1, lookahead=0, rounding="lora", loss="kl")),
    ("recon-k1-la2-i40", dict(window=1, overlap=0, lookahead=2, iters=40)),
    ("recon-k3o1L1-adaround-mse", dict(window=3, overlap=1, lookahead=1, rounding="adaround", loss="mse")),
    ("recon-k2o1-boa-nearest", dict(window=2, overlap=1, init="boa", rounding="nearest", frozen_grid=True)),
    ("recon-k1-rtn", dict(window=1, init="rtn", frozen_grid=False)),
    ("recon-k2o1-gptq-i40-cfp", dict(window=2, overlap=1, init="gptq", iters=40, cfp=True, cfp_weights=True)),
    ("recon-k2o1-cfpa", dict(window=2, overlap=1, cfp=True, cfp_weights=False)),
    ("recon-k2o1-i40-bf16", dict(window=2, iters=40, amp="bf16")),
    ("recon-k2o1", dict(amp="auto")),
    ("recon-k1-rtn-signed-sign-i200", dict(rounding="signed", optimizer="sign", schedule="linear", lr=1 / 200)),
    ("recon-sign", dict(optimizer="sign", lr=1 / 100)),  # ReconConfig's 100 iterations
    ("recon-k1-signed", dict(rounding="signed", optimizer="adam", schedule="cosine", lr=1e-3)),
])
def test_recon_names_spell_the_configuration(name, expect):
    cfg = parse_method(name).base
    assert isinstance(cfg, ReconConfig)
    assert {k: getattr(cfg, k) for k in expect} == expect


def test_overrides_apply_over_the_name():
    cfg = parse_method("recon-k2o1-i40", recon={"iters": 3, "rank": 2}).base
    assert (cfg.window, cfg.overlap, cfg.iters, cfg.rank) == (2, 1, 3, 2)


def test_sign_optimizer_rate_from_the_name_yields_to_an_explicit_one():
    cfg = parse_method("recon-sign-i50", recon={"lr": 0.02, "schedule": "cosine"}).base
    assert (cfg.optimizer, cfg.lr, cfg.schedule) == ("sign", 0.02, "cosine")


def test_solver_settings_reach_the_configs():
    kw = dict(act_order=False, damp=0.05, block_size=64, clip_search=True)
    assert parse_method("rtn", **kw).base == RTNConfig(clip_search=True)
    assert parse_method("gptq", **kw).base == GPTQConfig(block_size=64, damp=0.05, act_order=False, clip_search=True)
    assert parse_method("boa", **kw).base == BoAConfig(block_size=64, damp=0.05, act_order=False)
    assert parse_method("gptq", recon={"iters": 3}).base == GPTQConfig()  # recon settings only reach recon


def test_gptq_and_boa_take_a_damping_part():
    assert parse_method("gptq-d0.1").base == GPTQConfig(damp=0.1)
    choice = parse_method("boa-d.05+qat", damp=0.3)  # the name's part wins over the setting
    assert choice.base == BoAConfig(damp=0.05) and choice.base_label == "boa-d.05" and choice.qat is not None
    for bad in ("gptq-d", "boa-d0.1-d0.2", "rtn-d0.1"):
        with pytest.raises(ValueError, match="cannot parse"):
            parse_method(bad)
    with pytest.raises(ValueError, match="damp must be in"):
        parse_method("gptq-d1.5")


@pytest.mark.parametrize("name, message", [
    ("recon-k2o2", "overlap must satisfy"),
    ("recon-fast", "cannot parse 'fast'"),
    ("awq", "unknown method 'awq'"),
    ("gptq+foo", "cannot parse '+foo'"),
    ("gptq+qat-fp16", "cannot parse '+qat-fp16'"),
    ("gptq-i40", "cannot parse 'i40'"),
    ("recon-cfp-cfpa", "cfp (both halves) and cfpa (the activation half) exclude each other"),
])
def test_bad_names_fail_clearly(name, message):
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        parse_method(name)
    assert name in str(e.value)
    if "overlap" not in message and "exclude" not in message:  # a parse error lists the accepted forms
        assert METHOD_FORMS in str(e.value)


def test_qat_suffix():
    m = parse_method("recon-k2o1-kl+qat")
    assert isinstance(m.base, ReconConfig) and (m.base.window, m.base.overlap, m.base.loss) == (2, 1, "kl")
    assert m.qat == QATConfig() and (m.label, m.base_label) == ("recon-k2o1-kl+qat", "recon-k2o1-kl")
    m = parse_method("boa+qat128")
    assert isinstance(m.base, BoAConfig) and m.qat.steps == 128 and m.base_label == "boa"
    m = parse_method("gptq")
    assert isinstance(m.base, GPTQConfig) and m.qat is None and m.label == m.base_label == "gptq"
    assert parse_method("recon-mse+kl+qat").base.loss == "mse+kl"  # `+` inside a loss name is not the suffix
    m = parse_method("boa+qat96-bf16", qat={"lr": 1e-3})
    assert (m.qat.steps, m.qat.amp, m.qat.lr, m.label) == (96, "bf16", 1e-3, "boa+qat96-bf16")
    assert parse_method("gptq+qat-bf16").qat.amp == "bf16" and parse_method("gptq+qat").qat.amp == "auto"


def test_qat_takes_steps_from_the_name():
    m = parse_method("boa+qat128", qat={"lr": 1e-3})
    assert isinstance(m.base, BoAConfig) and m.qat.steps == 128 and m.qat.lr == 1e-3
    assert parse_method("boa+qat", qat={"steps": 7}).qat.steps == 7
    assert parse_method("gptq", qat={"steps": 7}).qat is None
    with pytest.raises(ValueError, match="drop one"):
        parse_method("boa+qat128", qat={"steps": 64})
    with pytest.raises(ValueError, match="heldout"):
        parse_method("rtn+qat", qat={"heldout": 1.5})


def test_method_config_is_the_block_wise_config():
    kw = dict(act_order=False, damp=0.05, block_size=64, clip_search=True, recon={"iters": 3})
    for name in ("rtn", "gptq", "boa", "recon", "recon-k1-rtn"):
        assert method_config(name, **kw) == parse_method(name, **kw).base
    with pytest.raises(ValueError, match=r"\+qat is not accepted"):
        method_config("gptq+qat")


def test_method_choice_is_typed():
    with pytest.raises(TypeError, match="base must be"):
        MethodChoice("gptq")
    with pytest.raises(TypeError, match="qat must be"):
        MethodChoice(GPTQConfig(), qat={"steps": 3})
    m = MethodChoice(GPTQConfig(), QATConfig())
    assert (m.label, m.base_label) == ("gptq+qat", "gptq")  # default labels from the config types


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_cli_qat_and_window_flags_reach_the_configs():
    """--qat-* flags become QATConfig fields (a flag missing from QAT_FLAGS would be parsed and
    silently dropped), recon flags ReconConfig fields."""
    from flows.cli import _parser
    from flows.cli_impl import method_choice

    args = _parser().parse_args(["bench", "quality", "--methods", "recon-k1+qat", "--qat-patience", "0",
                                 "--qat-lr", "0.01", "--qat-heldout", "0.25", "--patience", "2", "--eval-every", "5",
                                 "--heldout", "0.5"])
    m = method_choice(args, "recon-k1+qat")
    assert (m.qat.patience, m.qat.lr, m.qat.heldout) == (0, 0.01, 0.25)
    assert (m.base.patience, m.base.eval_every, m.base.heldout) == (2, 5, 0.5)
    assert parse_method("recon-k1+qat").qat.patience == 3  # the default it overrides
