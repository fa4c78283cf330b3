"""`python -m flows.bench_profile` on the tiny Llama: both profiles are recorded, every marked region
was entered (a renamed or no longer called library function would show as 0 s), and the page renders."""
from __future__ import annotations

import json

from flows.bench_profile import main


def test_profile_records_every_region_of_a_window_and_of_qat(tiny_source, tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert main(["--model", str(tiny_source), "--n-samples", "8", "--seqlen", "32", "--iters", "3",
                 "--qat-steps", "2", "--amp", "bf16", "--out", str(out)]) == 0
    recon, qat = json.loads(out.read_text())
    assert recon["bf16"] and qat["bf16"] and recon["what"].endswith("bf16 autocast")
    assert recon["steps"] == 3 and qat["steps"] == 2 and recon["n"] == 8 and recon["seqlen"] == 32
    for r in (recon, qat):
        assert all(v > 0 for v in r["regions_s"].values()), r["regions_s"]
        assert r["backward_s"] > 0 and r["categories_s"]["matmul"] > 0 and r["top_ops"]
        assert sum(r["categories_s"].values()) <= r["wall_s"]  # self times of the ops fit in the wall time
    assert set(recon["regions_s"]) >= {"init (GPTQ)", "training loop", "fake-quant", "loss (mse+kl)"}
    assert set(qat["regions_s"]) >= {"forward + loss", "fake-quant", "held-out evaluation"}
    md = out.with_suffix(".md").read_text()
    assert "## one recon-k2o1 window" in md and "## QAT steps" in md and "| fake-quant |" in md
