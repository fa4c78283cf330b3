"""Method names: reconstruction names spell their configuration; `+qat` adds global QAT."""
from __future__ import annotations

import pytest

from flows.commands import method_config, method_qat, recon_config, split_qat


@pytest.mark.parametrize("name, expect", [
    ("recon", dict(window=2, overlap=1, lookahead=0, rounding="lora", loss="mse+kl", iters=100)),
    ("recon-k2o1-lora-kl", dict(window=2, overlap=1, lookahead=0, rounding="lora", loss="kl")),
    ("recon-k1-la2-i40", dict(window=1, overlap=0, lookahead=2, iters=40)),
    ("recon-k3o1L1-adaround-mse", dict(window=3, overlap=1, lookahead=1, rounding="adaround", loss="mse")),
    ("recon-k2o1-boa-nearest", dict(window=2, overlap=1, init="boa", rounding="nearest", frozen_grid=True)),
    ("recon-k1-rtn", dict(window=1, init="rtn", frozen_grid=False)),
])
def test_recon_names_spell_the_configuration(name, expect):
    cfg = recon_config(name)
    assert {k: getattr(cfg, k) for k in expect} == expect


@pytest.mark.parametrize("name, message", [("recon-k2o2", "overlap must satisfy"), ("recon-fast", "cannot parse 'fast'"),
                                           ("awq", "unknown method")])
def test_bad_names_fail_clearly(name, message):
    with pytest.raises(ValueError, match=message):
        method_config(name)


def test_split_qat():
    assert split_qat("recon-k2o1-kl+qat") == ("recon-k2o1-kl", {})
    assert split_qat("boa+qat128") == ("boa", {"steps": 128})
    assert split_qat("gptq") == ("gptq", None)


def test_method_qat_takes_steps_from_the_name():
    base, cfg = method_qat("boa+qat128", {"lr": 1e-3})
    assert base == "boa" and cfg.steps == 128 and cfg.lr == 1e-3
    assert method_qat("boa+qat", {"steps": 7})[1].steps == 7
    assert method_qat("gptq", {"steps": 7}) == ("gptq", None)
    with pytest.raises(ValueError, match="drop one"):
        method_qat("boa+qat128", {"steps": 64})
