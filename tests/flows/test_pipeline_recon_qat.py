"""Reconstruction windows and global QAT in the pipeline, end to end on the tiny Llama.

Proven here: a run SIGKILLed after window 1 resumes at window 2 (windows 0-1 and the FP targets
come from the cache), a run SIGKILLed after QAT's first checkpoint resumes QAT at that step, and
both release the same bytes as an uninterrupted run; the quantize stage
records per-window loss curves and per-block errors before/after; the qat stage trains, records
its curves and is labelled `+qat`; training improves at least one window over its init; QAT trains and
the release carries its result exactly when it beat the block-wise state on held-out data; MLflow
holds the loss curves. The run quantizes its Linears' inputs to int8 per token, so all of this
holds with the windows and QAT training through the activation quantizers.
"""
from __future__ import annotations

import json
import signal
import subprocess

import pytest
from pipeline_projects import N_BLOCKS, RUN_TIMEOUT_S, release_files, run_and_kill

from tasks.faults import ENV

EXTRA = {  # with a8 inputs, which the windows and QAT train through (quantized_inputs) and the release declares
    "quantize": {"method": "recon", "bits": 3, "activations": "a8", "quantized_inputs": True},
    "recon": {"window": 2, "overlap": 1, "iters": 8, "batch_size": 4},
    "qat": {"enabled": True, "steps": 6, "eval_every": 2, "checkpoint_every": 2, "batch_size": 4},
}
WINDOWS = [(0, 2), (1, 3), (2, 4)]  # k=2, o=1 over N_BLOCKS=4


def _label(w: int) -> str:
    start, end = WINDOWS[w]
    return f"window {w} blocks [{start}, {end})"


@pytest.fixture(scope="module")
def runs(make_project):
    clean = make_project("recon-clean", EXTRA)
    clean.run_ok()
    killed = make_project("recon-killed", EXTRA)
    line = f"{_label(1)}: computed"
    rc, killed_log, _ = run_and_kill(killed, lambda log: True if line in log else None)
    # the resumed run dies in turn right after QAT's first checkpoint (step 2); the last one finishes
    in_qat = subprocess.run(killed.command("run"), cwd=killed.root, env={**killed.env, ENV: "qat.checkpointed"},
                            capture_output=True, text=True, timeout=RUN_TIMEOUT_S, start_new_session=True)
    final = killed.run_ok()
    return {"clean": clean, "killed": killed, "rc": rc, "killed_log": killed_log, "in_qat": in_qat,
            "log": in_qat.stderr, "final": final}


def test_killed_reconstruction_resumes_at_the_window_it_was_in(runs):
    assert runs["rc"] == -signal.SIGKILL
    assert f"{_label(2)}: computed" not in runs["killed_log"]
    log = runs["log"]
    for label in ("fp_targets", _label(0), _label(1)):
        assert f"{label}: cached" in log
    assert f"{_label(2)}: computed" in log
    assert release_files(runs["killed"].release) == release_files(runs["clean"].release)


def test_qat_killed_after_a_checkpoint_resumes_there_and_releases_the_same_bytes(runs):
    assert runs["in_qat"].returncode == -signal.SIGKILL and "failpoint qat.checkpointed" in runs["in_qat"].stderr
    qat = json.loads((runs["killed"].root / "metrics" / "stages" / "qat.json").read_text())
    assert qat["resumed_at_step"] == EXTRA["qat"]["checkpoint_every"]  # not from step 0
    assert release_files(runs["killed"].release) == release_files(runs["clean"].release)


def test_quantize_stage_records_window_curves_and_block_errors_before_after(runs):
    root = runs["clean"].root
    info = json.loads((root / "data" / "quantized" / "quantize.json").read_text())
    assert [(w["start"], w["end"]) for w in info["windows"]] == WINDOWS
    for w in info["windows"]:
        assert len(w["curve"]) == EXTRA["recon"]["iters"]
        # the guard's rule: the init is kept exactly when training did not beat it
        assert w["kept_init"] == (w["loss_final"] == w["loss_init"]) and w["loss_final"] <= w["loss_init"]
    assert not all(w["kept_init"] for w in info["windows"])  # training improved at least one window
    errors = json.loads((root / "metrics" / "block_errors.json").read_text())
    assert [e["block"] for e in errors] == list(range(N_BLOCKS))
    assert all(e["before"] > 0 and e["after"] > 0 for e in errors)
    assert any(e["after"] != e["before"] for e in errors)  # training changed what the blocks output
    assert len(info["modules"]) == 7 * N_BLOCKS  # every Linear of every block, once


def test_qat_stage_trains_and_labels_the_release(runs):
    root = runs["clean"].root
    info = json.loads((root / "data" / "qat" / "quantize.json").read_text())
    qat = info["qat"]
    assert qat["steps"] >= 1 and len(qat["curve"]) == qat["steps"]
    # QAT trained (the held-out loss moved at every evaluation: the parameters changed) ...
    held = [h for _, h in qat["heldout_curve"]]
    assert len(held) == 1 + EXTRA["qat"]["steps"] // EXTRA["qat"]["eval_every"] and len(set(held)) == len(held)
    # ... and the stage ships what its guard decided: the trained state only when it beat the init
    quantized = json.loads((root / "data" / "quantized" / "quantize.json").read_text())
    same = info["quantized_sha256"] == quantized["quantized_sha256"]
    assert qat["kept_init"] == same == (qat["best_heldout"] == qat["init_heldout"] == qat["final_heldout"])
    assert qat["kept_init"] or qat["best_heldout"] < qat["init_heldout"]
    metrics = json.loads((root / "metrics" / "metrics.json").read_text())
    assert (metrics["method"], metrics["scheme"]) == ("recon+qat", "w3g32")
    assert info["job"]["engine"]["act_inputs"] == "a8"  # the windows were solved and trained on a8 inputs


def test_mlflow_holds_window_and_qat_loss_curves(runs):
    from mlflow.tracking import MlflowClient

    root = runs["clean"].root
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ptq-pipeline")
    by_stage = {r.data.tags.get("ptq.stage"): r for r in client.search_runs([exp.experiment_id])
                if r.data.tags.get("ptq.stage_status") == "run"}
    quantize, qat = by_stage["quantize"].info.run_id, by_stage["qat"].info.run_id
    curve = client.get_metric_history(quantize, "recon_loss_window_000")
    assert len(curve) == EXTRA["recon"]["iters"]
    assert len(client.get_metric_history(quantize, "recon_loss_final")) == len(WINDOWS)
    assert len(client.get_metric_history(qat, "qat_loss")) >= 1
