"""`python -m flows.bench_window` on the tiny Llama: a row per recipe with each window's losses, and bad
configurations refused before any model is loaded."""
from __future__ import annotations

import json

import pytest
from pipeline_projects import MIRROR

from flows.bench_window import main, parse_config


def test_rows_keep_each_windows_losses_per_recipe(tiny_source, tmp_path, capsys):
    out = tmp_path / "window.json"
    configs = ['recon-k1-rtn-adaround-mse-i8 {"grid": "learned", "lr": 0.01}',
               'recon-k1-rtn-signed-sign-mse-i8 {"grid": "learned", "clip_lr": 0.3}']
    argv = ["--model", str(tiny_source), "--blocks", "2", "--scheme", "w2g32", "--mirror", str(MIRROR),
            "--n-samples", "16", "--seqlen", "32", "--out", str(out)]
    assert main(argv + [a for c in configs for a in ("--config", c)]) == 0
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["recon-k1-rtn-adaround-mse-i8", "recon-k1-rtn-signed-sign-mse-i8"]
    adaround, signed = rows
    assert [(w["start"], w["end"]) for w in signed["windows"]] == [(0, 1), (1, 2)]
    assert signed["method_config"]["optimizer"] == "sign" and signed["method_config"]["lr"] == 1 / 8
    assert signed["method_config"]["clip_lr"] == 0.3 and adaround["method_config"]["rounding"] == "adaround"
    # block 0 sees the same FP input and the same RTN start under both recipes: equal initial losses
    assert adaround["windows"][0]["loss_init"] == signed["windows"][0]["loss_init"]
    assert all(w["loss_final"] <= w["loss_init"] for r in rows for w in r["windows"])
    assert signed["windows"][0]["loss_final"] < signed["windows"][0]["loss_init"]
    md = out.with_suffix(".md").read_text()
    w = signed["windows"][1]
    assert f"| w2g32 | 16x32 | 1-1 | {w['loss_init']:.4g} -> {w['loss_final']:.4g} |" in md
    assert md.count("| recon-k1-rtn-signed-sign-mse-i8 |") == 2
    assert main(argv + ["--config", configs[0]]) == 0  # appends
    assert len(json.loads(out.read_text())) == 3


@pytest.mark.parametrize("config, message", [
    ('recon-k1 {"lr": ', "must be a JSON object"),
    ("recon-k1 [1, 2]", "must be a JSON object"),
    ("gptq", "not a reconstruction method"),
    ('recon-k1 {"optimizer": "lion"}', "optimizer must be one of"),
])
def test_bad_configs_fail_before_any_work(config, message):
    with pytest.raises(ValueError, match=message):
        parse_config(config)
