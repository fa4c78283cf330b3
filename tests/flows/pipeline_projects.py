"""Helpers for the end-to-end pipeline tests: project folders, `ptq` subprocesses, release contents.

A project is what a user gets from `git clone`: a copy of this checkout's files (tracked, plus
untracked ones git does not ignore: the code under test), committed in a new git repository, with a
params.yaml pointing at the tiny model. Commits use a fixed identity and date, so equal trees give
equal commits and every project records the same code identity. Every `ptq` call is a real
subprocess (`python -m flows.cli ...`) in the project, the way a user or DVC runs it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["MIRROR", "N_BLOCKS", "REPO", "SETTINGS", "WIKITEXT", "Project", "build_tiny_source", "clone_checkout",
           "git", "git_commit_all", "have_git", "ptq_many", "release_files", "run_and_kill", "write_params"]

REPO = Path(__file__).resolve().parents[2]
MIRROR = Path(os.environ.get("PTQ_DATA_MIRROR") or REPO.parent / "shared" / "data")
WIKITEXT = MIRROR / "wikitext-2-raw" / "wiki.test.raw"
N_BLOCKS = 4
RUN_TIMEOUT_S = 600

# One set of pipeline settings for every project, so that their releases must be identical.
# Calibration and evaluation read WikiText-2 from the data mirror (the default text source).
SETTINGS: dict[str, dict] = {
    "prepare_data": {"n_samples": 16, "seqlen": 64, "eval_window": 128, "eval_windows": 2},
    "quantize": {"bits": 4, "group_size": 32, "device": "cpu"},
}

_GIT_IDENTITY = {"GIT_AUTHOR_NAME": "ptq-tests", "GIT_AUTHOR_EMAIL": "ptq-tests@example.invalid",
                 "GIT_COMMITTER_NAME": "ptq-tests", "GIT_COMMITTER_EMAIL": "ptq-tests@example.invalid",
                 "GIT_AUTHOR_DATE": "2026-01-01T00:00:00+00:00", "GIT_COMMITTER_DATE": "2026-01-01T00:00:00+00:00"}


@dataclass(frozen=True)
class Project:
    """A project folder (params.yaml, data/, .cache/ptq, mlflow.db) and the env its runs get."""

    root: Path
    env: Mapping[str, str]

    @property
    def blocks_dir(self) -> Path:
        return self.root / ".cache" / "ptq" / "blocks"

    @property
    def release(self) -> Path:
        return self.root / "data" / "release"

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "flows.cli", *args]

    def ptq(self, *args: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), cwd=self.root, env=dict(self.env), capture_output=True,
                              text=True, timeout=timeout)

    def run_ok(self, *args: str) -> subprocess.CompletedProcess:
        """`ptq run` (or `ptq ARGS`) to completion; fails the test with the run's output otherwise."""
        args = args or ("run",)
        done = self.ptq(*args)
        assert done.returncode == 0, f"ptq {' '.join(args)} failed:\n{done.stdout}\n{done.stderr[-6000:]}"
        return done

    def tool(self, name: str, *args: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
        """`dvc ARGS` (or another tool of this Python's environment) in the project."""
        return subprocess.run([str(Path(sys.executable).with_name(name)), *args], cwd=self.root, env=dict(self.env),
                              capture_output=True, text=True, timeout=timeout)

    def dvc_ok(self, *args: str) -> str:
        done = self.tool("dvc", *args)
        assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        return done.stdout + done.stderr


def run_and_kill(project: Project, ready: Callable[[str], Any], timeout: float = RUN_TIMEOUT_S) -> tuple[int, str, Any]:
    """Start `ptq run` and SIGKILL its process group (the run and its Prefect server: a crash, not a
    shutdown) as soon as ready(stderr so far) returns something other than None; returns (exit
    code, stderr, what ready returned). Fails if the run ends first."""
    proc = subprocess.Popen(project.command("run"), cwd=project.root, env=dict(project.env), text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    deadline, seen = time.monotonic() + timeout, None
    try:
        while time.monotonic() < deadline and proc.poll() is None and seen is None:
            seen = ready("".join(chunks))
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(timeout=10)
    log = "".join(chunks)
    assert seen is not None, f"run ended (rc {proc.returncode}) before it was ready to be killed:\n{log[-4000:]}"
    return proc.returncode, log, seen


def ptq_many(jobs: Sequence[tuple[Project, Sequence[str]]],
             timeout: float = RUN_TIMEOUT_S) -> list[subprocess.CompletedProcess]:
    """Run short `ptq` commands concurrently (each pays about 4 s of imports); results in job order."""
    procs = [subprocess.Popen(p.command(*args), cwd=p.root, env=dict(p.env), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for p, args in jobs]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def release_files(release: Path) -> dict[str, bytes]:
    """Every file of a release (MANIFEST.json included) by relative path: whole-file comparisons."""
    return {p.relative_to(release).as_posix(): p.read_bytes() for p in sorted(release.rglob("*")) if p.is_file()}


def clone_checkout(dest: Path) -> Path:
    """A fresh-clone copy of this checkout (tracked files and untracked ones git does not ignore) at
    dest; no data, no caches, no dvc.lock unless committed."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file() and not rel.startswith(("metrics/", "dvc.lock")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def write_params(path: Path, source: Path, extra: Mapping[str, Mapping] | None = None) -> None:
    """The repo's params.yaml with SETTINGS, fetch_model.source and `extra` written in."""
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["fetch_model"]["source"] = str(source)
    for section, body in [*SETTINGS.items(), *(extra or {}).items()]:
        params[section].update(body)
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def git(root: Path, env: Mapping[str, str], *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, env={**env, **_GIT_IDENTITY}, check=True,
                          capture_output=True, text=True).stdout


def git_commit_all(root: Path, env: Mapping[str, str], message: str = "init") -> str:
    """`git init` (once) and commit everything in root (fixed identity and date); returns the commit."""
    if not (root / ".git").exists():
        git(root, env, "init", "-q", "-b", "main")
    git(root, env, "add", "-A")
    git(root, env, "commit", "-q", "--allow-empty", "-m", message)
    return git(root, env, "rev-parse", "HEAD").strip()


def _train_tokenizer(text: str):
    """Byte-level BPE with a 1000-token vocabulary trained on `text` (about a second, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def build_tiny_source(folder: Path) -> Path:
    """A local HF folder: random LlamaForCausalLM (hidden 64, N_BLOCKS layers, 4 heads / 2 kv
    heads, seed 0) and a BPE tokenizer trained on the first 200 KB of WikiText-2 test."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _train_tokenizer(WIKITEXT.read_text(encoding="utf-8")[:200_000])
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=N_BLOCKS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def have_git() -> bool:
    return shutil.which("git") is not None


def char_llama_source(tmp_path: Path):
    """(model, text): a tiny random Llama with a character tokenizer saved as the local model folder
    tmp_path/src (with its MANIFEST), and tmp_path/t.txt, a text long enough for `ptq quantize`'s
    calibration draw and the protocol's 16 x 1024 evaluation windows."""
    from tasks.io import write_manifest

    from tests.quantlib.tiny import tiny_model
    from tests.tasks.test_gguf_release import _char_tokenizer

    model, tok = tiny_model("llama"), _char_tokenizer(128)
    model.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    write_manifest(tmp_path / "src")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 1000)
    return model, text
