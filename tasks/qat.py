"""Prefect tasks of the qat stage: the FP teacher's top-k logits (once per model and calibration
set), then global QAT of the quantized model with resumable checkpoints.

Both tasks load what they need from verified files and write content-addressed files under the
project cache; a killed QAT run restarts from its last checkpoint (same key = same run).
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch
from prefect import task

from quantlib.actquant import attach, calibrate_static, parse_activations
from quantlib.adapters import get_adapter
from quantlib.head import head_name, untie_head
from quantlib.qat import QATConfig, QATStats, teacher_targets, train_qat
from quantlib.qweight import QuantizedWeight

from .cache import key_fn, stable_hash
from .codeid import code_fingerprint, library_versions
from .faults import failpoint
from .io import atomic_path, atomic_save_safetensors, atomic_write_bytes, load_safetensors_verified, sha256_file
from .sources import load_model
from .textdata import read_token_ids

__all__ = ["qat_teacher_task", "qat_train_task", "load_quantized", "apply_quantized", "checkpoint_key"]

log = logging.getLogger("ptq")


def load_quantized(path: str | os.PathLike, sha: str, names: list[str]) -> dict[str, QuantizedWeight]:
    tensors = load_safetensors_verified(path, sha)
    return {n: QuantizedWeight.from_state_dict(tensors, n) for n in names}


def apply_quantized(model, results: dict[str, QuantizedWeight]) -> None:
    """Put the dequantized weights of `results` into the model's Linears (in place); a quantized LM
    head gets its own parameter (untied: the input embeddings stay full precision)."""
    adapter = get_adapter(model)
    with torch.no_grad():
        for name, qw in results.items():
            if name == head_name(adapter):
                untie_head(model, qw.dequantize())
            else:
                adapter.set_weight(model.get_submodule(name), qw.dequantize())


def _dtyped(inputs: list, dtype: str) -> list:
    """Hash inputs with the compute dtype, leaving float32 names as they were."""
    return inputs + ([] if dtype == "float32" else [dtype])


@task(name="qat_teacher", cache_key_fn=key_fn("model_sha", "calib_sha", "topk", "dtype"), persist_result=True)
def qat_teacher_task(model_dir: str, model_sha: str, calib_path: str, calib_sha: str, topk: int, cache_dir: str,
                     trust_remote_code: bool = False, dtype: str = "float32") -> dict:
    """The FP model's top-k next-token log-probs on the calibration sequences (safetensors), the
    model run in `dtype` (fetch_model.dtype), the log-probs taken in float32."""
    model = load_model(model_dir, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    teacher = teacher_targets(model, read_token_ids(calib_path, calib_sha)["calib"], topk)
    path = Path(cache_dir) / "qat" / f"teacher-{stable_hash(_dtyped([model_sha, calib_sha, topk], dtype))}.safetensors"
    return {"path": str(path), "sha": atomic_save_safetensors(path, teacher)}


def _save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        digest = sha256_file(tmp)
    atomic_write_bytes(path.with_name(path.name + ".sha256"), (digest + "\n").encode())


def _load_checkpoint(path: Path) -> dict | None:
    """The last checkpoint, if it exists and matches its checksum; a torn or altered one is reported
    and not used (training restarts from the quantized state)."""
    side = path.with_name(path.name + ".sha256")
    if not path.is_file():
        return None
    if not side.is_file() or sha256_file(path) != side.read_text().strip():
        log.warning("qat: checkpoint %s does not match its checksum %s (torn by a crash or altered); "
                    "not resuming from it, training from step 0", path, side.name)
        return None
    return torch.load(path, weights_only=True)  # tensors and plain values only


def _checkpointed(path: Path, state: dict) -> None:
    _save_checkpoint(path, state)
    failpoint("qat.checkpointed")


def checkpoint_key(*inputs) -> str:
    """A checkpoint's name: its inputs plus the code and library versions that wrote it, so that a
    checkpoint written by other code (or other torch) is never resumed."""
    return stable_hash([*inputs, code_fingerprint(), library_versions()])


@task(name="qat_train", cache_key_fn=key_fn("model_sha", "quantized_sha", "calib_sha", "teacher_sha", "cfg", "dtype",
                                            "activations"),
      persist_result=True)
def qat_train_task(model_dir: str, model_sha: str, quantized_path: str, quantized_sha: str, names: list[str],
                   calib_path: str, calib_sha: str, teacher: dict | None, cfg: QATConfig, checkpoint_every: int,
                   cache_dir: str, teacher_sha: str | None = None, trust_remote_code: bool = False,
                   dtype: str = "float32", activations: str | None = None) -> dict:
    """Global QAT from the quantized state; checkpoints every `checkpoint_every` steps and resumes
    from the last one. Writes the refined integers + scales + zeros. `teacher` is the teacher
    task's record ({"path", "sha"}); `teacher_sha` its sha (what the cache key holds). With
    `activations` (a8/a4, or static a8s/a4s calibrated here first) the quantized Linears' inputs are
    fake-quantized in the training forward, as the release computes them (quantlib.actquant)."""
    if teacher is not None and teacher_sha != teacher["sha"]:
        raise ValueError("qat_train_task: teacher_sha must be the teacher record's sha")
    key = stable_hash(_dtyped([model_sha, quantized_sha, calib_sha, teacher_sha, cfg], dtype) +
                      ([activations] if activations else []))
    ckpt = Path(cache_dir) / "qat" / f"checkpoint-{checkpoint_key(key)}.pt"
    # the frozen model in `dtype`; the trainable scales/zeros/latents and the optimizer state stay float32
    model = load_model(model_dir, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    results = load_quantized(quantized_path, quantized_sha, names)
    apply_quantized(model, results)
    calib = read_token_ids(calib_path, calib_sha)["calib"]
    spec = parse_activations(activations)
    if spec is not None:  # static scales: calibrated on the quantized model before training
        scales = calibrate_static(model, sorted(results), calib.split(cfg.batch_size), spec) if spec.static else None
        attach(model, sorted(results), spec, scales)
    targets = None if teacher is None else load_safetensors_verified(teacher["path"], teacher["sha"])
    resume = _load_checkpoint(ckpt)
    new, stats = train_qat(model, results, calib, cfg, targets,
                           resume=resume, checkpoint_every=checkpoint_every,
                           on_checkpoint=functools.partial(_checkpointed, ckpt))
    tensors = {k: v for name, qw in new.items() for k, v in qw.state_dict(name).items()}
    out = Path(cache_dir) / "qat" / f"quantized-{key}.safetensors"
    return {"path": str(out), "sha": atomic_save_safetensors(out, tensors), "names": sorted(new),
            "resumed_at": None if resume is None else _resumed_step(resume), "stats": _stats(stats)}


def _resumed_step(resume: dict) -> int:
    return int(resume["state"]["step"])


def _stats(st: QATStats) -> dict:
    d = asdict(st)
    d["heldout_curve"] = [list(x) for x in d["heldout_curve"]]
    return d
