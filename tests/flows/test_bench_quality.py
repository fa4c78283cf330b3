"""`ptq bench quality` end to end on the tiny Llama: rows for a reconstruction and a +qat method,
appended to the JSON with their settings, and bad method names rejected before any work."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pipeline_projects import MIRROR

from flows.bench import QualityBench, _choice_from_json, _jobs, render_quality_md
from flows.cli import main
from flows.methods import parse_method


def test_bench_appends_recon_and_qat_rows(tiny_source, tmp_path, capsys):
    out = tmp_path / "quality.json"
    rc = main(["bench", "quality", "--model", str(tiny_source), "--methods", "recon-k2o1-i2,rtn+qat",
               "--schemes", "w3g32", "--no-fp32", "--out", str(out), "--qat-steps", "2", "--qat-loss", "ce",
               "--device", "cpu", "--mirror", str(MIRROR), "--n-samples", "16", "--seqlen", "64", "--seed", "1"])
    assert rc == 0, capsys.readouterr().err
    rows = json.loads(out.read_text())
    # a +qat job also reports its block-wise starting point, from the same quantization
    assert [(r["method"], r["scheme"]) for r in rows] == [("recon-k2o1-i2", "w3g32"), ("rtn", "w3g32"),
                                                          ("rtn+qat", "w3g32")]
    assert all(math.isfinite(r["ppl"]) and r["quant_seconds"] >= 0 for r in rows)  # tiny RTN rounds to 0.0 s
    assert all(math.isfinite(r["ppl_pydocs"]) and r["ppl_pydocs"] != r["ppl"] for r in rows)  # off-domain text
    assert rows[0]["quant_seconds"] > 0
    assert rows[2]["quant_seconds"] > rows[1]["quant_seconds"] and "qat" not in rows[1]["settings"]
    recon, qat = rows[0]["settings"], rows[2]["settings"]
    assert (recon["n"], recon["seqlen"], recon["seed"]) == (16, 64, 1)  # the calibration draw is recorded with the row
    assert recon["method_config"]["window"] == 2 and recon["method_config"]["iters"] == 2
    assert qat["qat"]["steps"] <= 2 and qat["qat"]["loss"] == "ce"
    md = out.with_suffix(".md").read_text()
    assert "| rtn+qat | w3g32 |" in md and "| rtn | w3g32 |" in md and "| python-docs |" in md
    assert "| 16x64 seed 1 |" in md
    assert all(r["bpw"] == pytest.approx(3 + 19 / 32, abs=1e-4) for r in rows)  # w3g32 asymmetric, QAT row included
    assert f"| rtn+qat | w3g32 | {3 + 19 / 32:.2f} | {rows[2]['ppl']:.2f} |" in md
    assert f"| {rows[2]['ppl']:.2f} | {rows[2]['ppl_pydocs']:.2f} |" in md


def test_bench_mixed_rows_record_their_plan_and_fit_the_uniform_size(tiny_source, tmp_path, capfd):
    """--mixed-from at the size of uniform w2g32: both rows (before and after QAT, which must keep each
    Linear's own grid) are named by the plan, sized within w2g32's bits per weight, and record which
    scheme each unit took; a plan that cannot fit fails before any row."""
    out = tmp_path / "quality.json"
    common = ["bench", "quality", "--model", str(tiny_source), "--methods", "gptq+qat", "--schemes", "w2g32",
              "--no-fp32", "--out", str(out), "--qat-steps", "2", "--qat-loss", "ce", "--device", "cpu",
              "--mirror", str(MIRROR), "--n-samples", "16", "--seqlen", "64", "--mixed-samples", "4"]
    assert main([*common, "--mixed-from", "w2g64,w4g32"]) == 0, capfd.readouterr().err
    rows = json.loads(out.read_text())
    assert [(r["method"], r["scheme"]) for r in rows] == [("gptq", "mix(w2g64+w4g32)@w2g32"),
                                                          ("gptq+qat", "mix(w2g64+w4g32)@w2g32")]
    plan = rows[0]["settings"]["mixed"]
    assert plan["target_bpw"] == pytest.approx(2 + 18 / 32) and set(plan["linears"]) == {"w2g64", "w4g32"}
    assert len(plan["units"]) == 4 * 4 and plan["samples"] == 4  # tiny source: 4 blocks x (qkv, o, gate/up, down)
    assert all(r["bpw"] <= 2 + 18 / 32 for r in rows) and rows[0]["bpw"] == rows[1]["bpw"]
    md = out.with_suffix(".md").read_text()
    split = ", ".join(f"{n} {s}" for s, n in plan["linears"].items())
    assert f"| gptq+qat | mix(w2g64+w4g32)@w2g32 | {split} | {2 + 18 / 32:.3f} | 4 |" in md
    assert main([*common, "--mixed-from", "w4g32", "--out", str(tmp_path / "no.json")]) != 0
    assert "below the smallest plan" in capfd.readouterr().err and not (tmp_path / "no.json").exists()


@pytest.mark.parametrize("methods, message", [("gptq+foo", "unknown method"), ("recon-k2o3", "overlap must satisfy"),
                                               ("rtn+qat", "heldout"), ("gptq", "give --activations"),
                                               ("rtn", "applies to gptq, boa and recon")])
def test_bad_methods_fail_before_any_work(tiny_source, tmp_path, capsys, methods, message):
    args = ["bench", "quality", "--model", str(tiny_source), "--methods", methods, "--schemes", "w3g32",
            "--out", str(tmp_path / "q.json")]
    if methods == "rtn+qat":
        args += ["--qat-heldout", "1.5"]
    if methods == "gptq":
        args += ["--quantized-inputs"]
    if methods == "rtn":
        args += ["--quantized-inputs", "--activations", "a4"]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "q.json").exists()


@pytest.mark.parametrize("extra, message", [(["--mixed-bits", "2.5"], "--mixed-bits sizes a mixed-precision plan"),
                                            (["--mixed-from", "w2g64,w2g64"], "distinct candidate schemes"),
                                            (["--mixed-from", "w2g64,w9x"], "unknown scheme 'w9x'")])
def test_bad_mixed_precision_options_fail_before_any_work(tiny_source, tmp_path, capsys, extra, message):
    args = ["bench", "quality", "--model", str(tiny_source), "--methods", "gptq", "--schemes", "w3g32",
            "--out", str(tmp_path / "q.json"), *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "q.json").exists()


def test_a_worker_receives_the_parsed_method():
    method = parse_method("recon-k2o1-gptq-i40+qat128", recon={"rank": 2}, qat={"lr": 1e-3})
    bench = QualityBench(model="m", methods=(method,), schemes=("w3g64",), out=Path("q.json"))
    fp32, job = json.loads(json.dumps(_jobs(bench, Path("model"))))  # what the worker process reads
    assert (fp32["label"], fp32["method"]) == ("fp32", None)
    assert job["label"] == "recon-k2o1-gptq-i40+qat128" and job["scheme"] == "w3g64"
    assert _choice_from_json(job["method"]) == method  # the same frozen configs, not a re-parsed name


@pytest.mark.parametrize("kw, message", [(dict(schemes=("w4x",)), "unknown scheme"),
                                         (dict(n_samples=0), "--n-samples must be >= 1"),
                                         (dict(methods=("gptq",)), "MethodChoice"),
                                         (dict(quantized_inputs=True), "set activations")])
def test_quality_bench_validates_its_settings(kw, message):
    base = dict(model="m", methods=(parse_method("gptq"),), schemes=("w4pc",), out=Path("q.json"))
    with pytest.raises((ValueError, TypeError), match=message):
        QualityBench(**(base | kw))


def _row(method: str, seed: int, ppl: float, pydocs: float | None) -> dict:
    return {"method": method, "scheme": "w3g64", "ppl": ppl, "ppl_pydocs": pydocs, "quant_seconds": 1.0,
            "peak_rss_mb": 1.0, "date": "2026-12-03", "command": "ptq bench quality",
            "settings": {"n": 128, "seqlen": 512, "seed": seed}}


def test_rows_at_several_seeds_are_kept_apart_and_averaged():
    rows = [_row("gptq", 0, 30.0, 20.0), _row("gptq", 1, 31.0, 22.0), _row("gptq", 2, 32.0, 24.0),
            _row("gptq", 1, 99.0, None),  # an older run at seed 1: the later one replaces it
            _row("gptq", 1, 31.0, 22.0), _row("rtn", 0, 50.0, 40.0)]  # rtn: one seed, no mean
    md = render_quality_md(rows)
    assert "| 128x512 |" in md and "| 128x512 seed 1 |" in md and "| 128x512 seed 2 |" in md
    seeds = md.split("## Over calibration seeds")[1]
    assert "| smollm2-135m | gptq | w3g64 | 128x512 | 0,1,2 | 31.00 ± 1.00 | 22.00 ± 2.00 |" in seeds
    assert "| rtn |" not in seeds.split("##")[0]


def test_rows_name_the_commit_and_say_when_tracked_files_differ_from_it(tmp_path, monkeypatch):
    """A row made from uncommitted changes must not claim a commit's code: its git field gets -dirty
    (an untracked file, e.g. a results copy, does not count)."""
    import shutil
    import subprocess

    from flows.bench import _versions

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.py").write_text("x = 1\n")
    for cmd in (["init", "-q"], ["add", "a.py"], ["commit", "-qm", "a"]):
        subprocess.run(["git", *cmd], check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "rows.json").write_text("[]")
    assert _versions()["git"] == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert _versions()["git"] == head + "-dirty"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the thread settings that reorder float sums are kept
    assert _versions()["omp_num_threads"] == "1"
