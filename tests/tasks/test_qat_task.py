"""The qat stage's task: a run that dies after a checkpoint resumes from it and ends in the same
integers + scales + zeros as an uninterrupted run."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "quantlib"))

from tiny import tiny_ids, tiny_model  # noqa: E402

import tasks.qat as Q  # noqa: E402
from quantlib.adapters import get_adapter  # noqa: E402
from quantlib.engine import quantize_model  # noqa: E402
from quantlib.qat import QATConfig  # noqa: E402
from quantlib.rtn import RTNConfig  # noqa: E402
from quantlib.spec import QuantSpec  # noqa: E402
from tasks.io import atomic_save_safetensors  # noqa: E402
from tasks.textdata import write_token_ids  # noqa: E402

CFG = QATConfig(loss="ce", steps=6, eval_every=2, batch_size=2, heldout=0.25)


@pytest.fixture
def inputs(tmp_path):
    model = tiny_model()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    results, _ = quantize_model(get_adapter(model), None, QuantSpec(2, 32), RTNConfig())
    tensors = {k: v for n, qw in results.items() for k, v in qw.state_dict(n).items()}
    qsha = atomic_save_safetensors(tmp_path / "q.safetensors", tensors)
    csha = write_token_ids(tmp_path / "calib.safetensors", {"calib": tiny_ids(8, 32)})
    return dict(model_dir=str(model_dir), model_sha="m", quantized_path=str(tmp_path / "q.safetensors"),
                quantized_sha=qsha, names=sorted(results), calib_path=str(tmp_path / "calib.safetensors"),
                calib_sha=csha, teacher=None, cfg=CFG, checkpoint_every=2)


@pytest.mark.reliability(
    fault='a crash right after a QAT checkpoint hit the disk',
    sees='the rerun resumes at that step',
    kept='bit-identical refined codes and loss curve')
def test_qat_task_resumes_from_its_last_checkpoint(inputs, tmp_path, monkeypatch):
    whole = Q.qat_train_task.fn(**inputs, cache_dir=str(tmp_path / "a"))
    assert whole["resumed_at"] is None

    real, calls = Q._save_checkpoint, []

    def dies_after_second(path, state):
        real(path, state)
        calls.append(state["state"]["step"])
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # a crash right after the step-4 checkpoint hit the disk

    monkeypatch.setattr(Q, "_save_checkpoint", dies_after_second)
    with pytest.raises(KeyboardInterrupt):
        Q.qat_train_task.fn(**inputs, cache_dir=str(tmp_path / "b"))
    monkeypatch.setattr(Q, "_save_checkpoint", real)
    resumed = Q.qat_train_task.fn(**inputs, cache_dir=str(tmp_path / "b"))
    assert calls == [2, 4] and resumed["resumed_at"] == 4
    assert resumed["sha"] == whole["sha"]  # same bytes: bit-exact continuation
    assert resumed["stats"]["curve"] == whole["stats"]["curve"]


@pytest.mark.reliability(
    fault='a torn QAT checkpoint (truncated, or its checksum sidecar missing)',
    sees='`qat: checkpoint <path> does not match its checksum ...; not resuming from it`',
    kept='training restarts from the quantized state')
def test_torn_checkpoint_is_reported_and_not_used(tmp_path, caplog):
    path = tmp_path / "checkpoint.pt"
    Q._save_checkpoint(path, {"x": 1})
    assert Q._load_checkpoint(path) == {"x": 1} and not caplog.records
    path.write_bytes(path.read_bytes()[:-3])
    with caplog.at_level("WARNING", logger="ptq"):
        assert Q._load_checkpoint(path) is None
    assert f"checkpoint {path} does not match its checksum" in caplog.text
    path.with_name(path.name + ".sha256").unlink()  # a crash between the two writes: no sidecar
    caplog.clear()
    with caplog.at_level("WARNING", logger="ptq"):
        assert Q._load_checkpoint(path) is None
    assert "not resuming from it" in caplog.text


@pytest.mark.reliability(
    fault='a QAT checkpoint written by other code (another code fingerprint or torch version)',
    sees="training starts from step 0 (the checkpoint's name does not match)",
    kept="the other code's checkpoint, untouched")
def test_a_checkpoint_written_by_other_code_is_not_resumed(inputs, tmp_path, monkeypatch):
    """The same inputs under another code fingerprint (or torch version) name another checkpoint."""
    from tasks import codeid

    cache = tmp_path / "c"
    real = Q._save_checkpoint
    monkeypatch.setattr(Q, "_save_checkpoint", lambda path, state: (real(path, state), _raise()))
    with pytest.raises(KeyboardInterrupt):  # dies right after its first checkpoint
        Q.qat_train_task.fn(**inputs, cache_dir=str(cache))
    monkeypatch.setattr(Q, "_save_checkpoint", real)
    monkeypatch.setattr(Q, "code_fingerprint", lambda: codeid.code_fingerprint() + "-edited")
    assert Q.qat_train_task.fn(**inputs, cache_dir=str(cache))["resumed_at"] is None
    monkeypatch.setattr(Q, "code_fingerprint", codeid.code_fingerprint)
    assert Q.qat_train_task.fn(**inputs, cache_dir=str(cache))["resumed_at"] == 2  # the same code resumes


def _raise():
    raise KeyboardInterrupt("killed")


def test_apply_quantized_puts_dequantized_weights_in_place(inputs):
    from tasks.sources import load_model

    model = load_model(inputs["model_dir"])
    results = Q.load_quantized(inputs["quantized_path"], inputs["quantized_sha"], inputs["names"])
    Q.apply_quantized(model, results)
    name = inputs["names"][0]
    assert (model.get_submodule(name).weight == results[name].dequantize()).all()


def test_qat_runs_in_bfloat16_with_float32_trainables(inputs, tmp_path, monkeypatch):
    """fetch_model.dtype reaches QAT: the model is loaded in bf16 (the forward runs in bf16), the
    trained scales stay float32, and the result differs from the float32 run's (another dtype, another
    key and file)."""
    seen = []
    real = Q.train_qat

    def spy(model, results, *a, **kw):
        seen.append(next(model.parameters()).dtype)
        return real(model, results, *a, **kw)

    monkeypatch.setattr(Q, "train_qat", spy)
    fp32 = Q.qat_train_task.fn(**inputs, cache_dir=str(tmp_path / "c"))
    bf16 = Q.qat_train_task.fn(**inputs, cache_dir=str(tmp_path / "c"), dtype="bfloat16")
    assert seen == [torch.float32, torch.bfloat16]
    assert bf16["path"] != fp32["path"] and bf16["sha"] != fp32["sha"]
    trained = Q.load_quantized(bf16["path"], bf16["sha"], inputs["names"])
    assert all(qw.scale.dtype == torch.float32 and torch.isfinite(qw.scale).all() for qw in trained.values())


def test_qat_with_activations_trains_on_the_quantized_inputs(inputs, tmp_path, monkeypatch):
    """quantize.activations reaches QAT: the model it trains quantizes every quantized Linear's inputs
    (the release's forward), and the result is another key, file and loss curve than weight-only."""
    from quantlib.actquant import attached, input_scales

    seen, scales = [], []
    real = Q.train_qat

    def spy(model, results, *a, **kw):
        seen.append(attached(model))
        scales.append(input_scales(model))
        return real(model, results, *a, **kw)

    monkeypatch.setattr(Q, "train_qat", spy)
    plain = Q.qat_train_task.fn(**inputs, cache_dir=str(tmp_path / "c"))
    a4 = Q.qat_train_task.fn(**inputs, cache_dir=str(tmp_path / "c"), activations="a4")
    assert seen[0] == {} and seen[1] == dict.fromkeys(inputs["names"], "a4")
    assert a4["path"] != plain["path"] and a4["sha"] != plain["sha"]
    assert a4["stats"]["heldout_curve"] != plain["stats"]["heldout_curve"]
    # static: calibrated on the quantized model before training (a positive scale per module)
    a4s = Q.qat_train_task.fn(**inputs, cache_dir=str(tmp_path / "c"), activations="a4s")
    assert seen[2] == dict.fromkeys(inputs["names"], "a4s") and sorted(scales[2]) == sorted(inputs["names"])
    assert all(float(v) > 0 for v in scales[2].values()) and a4s["sha"] not in (a4["sha"], plain["sha"])
