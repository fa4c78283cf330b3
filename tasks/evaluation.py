"""Prefect tasks of the evaluate stage: perplexity (cached by model and window hashes) and lm-eval."""
from __future__ import annotations

from pathlib import Path

import torch
from prefect import task

from .cache import key_fn
from .evaluate import evaluate_perplexity
from .lm_eval_local import make_cloze_jsonl, run_lm_eval, write_task_yaml
from .release import load_release
from .sources import load_model, load_tokenizer
from .textdata import read_token_ids

__all__ = ["ppl_task", "lm_eval_task", "LOCAL_TASKS", "prepare_local_tasks"]

LOCAL_TASKS = ("ptq_cloze",)  # generated offline from the evaluation text


def _load(kind: str, folder: str, trust_remote_code: bool = False, dtype: str = "float32"):
    """A release (kind 'release') or the FP source model (kind 'model') in compute dtype `dtype`."""
    if kind == "release":
        return load_release(folder, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    return load_model(folder, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)


def _windows(eval_files: dict[str, list[str]]) -> dict:
    return {name: read_token_ids(path, sha)["windows"] for name, (path, sha) in eval_files.items()}


@task(name="perplexity", cache_key_fn=key_fn("kind", "model_sha", "eval_files_sha", "batch_size", "dtype"),
      persist_result=True)
def ppl_task(kind: str, folder: str, model_sha: str, eval_files: dict, eval_files_sha: str, batch_size: int,
             trust_remote_code: bool = False, dtype: str = "float32") -> dict:
    """{source: perplexity} of a release (kind 'release') or the FP source model (kind 'model'), run
    in `dtype` (fetch_model.dtype; the log-probabilities are taken in float32)."""
    return evaluate_perplexity(_load(kind, folder, trust_remote_code, dtype), _windows(eval_files), batch_size)


def prepare_local_tasks(task_dir: Path, text: str, names: list[str], seed: int = 0, n_docs: int = 200) -> tuple[Path | None, str]:
    """Write the project's offline lm-eval tasks that `names` asks for, from `text` (the evaluation
    text's second half, so no question overlaps the calibration pool). Returns (include path or None,
    sha256 of the generated data, part of the lm-eval cache key)."""
    wanted = [n for n in names if n in LOCAL_TASKS]
    if not wanted:
        return None, ""
    task_dir.mkdir(parents=True, exist_ok=True)
    jsonl = task_dir / "ptq_cloze.jsonl"
    sha = make_cloze_jsonl(text[len(text) // 2 :], jsonl, n_docs=n_docs, seed=seed)
    write_task_yaml(task_dir, "ptq_cloze", jsonl)
    return task_dir, sha


@task(name="lm_eval", cache_key_fn=key_fn("model_sha", "tasks", "limit", "tasks_sha", "dtype"), persist_result=True)
def lm_eval_task(folder: str, model_sha: str, tasks: list[str], include_path: str | None, tasks_sha: str,
                 limit: int | None, batch_size: int, trust_remote_code: bool = False, dtype: str = "float32") -> dict:
    model = _load("release", folder, trust_remote_code, dtype)
    return run_lm_eval(model, load_tokenizer(folder, verify=False, trust_remote_code=trust_remote_code), list(tasks),
                       Path(include_path) if include_path else None, limit, batch_size)
