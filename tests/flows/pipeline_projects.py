"""Helpers for the end-to-end pipeline tests: project folders, `ptq` subprocesses, release contents.

Every `ptq` call is a real subprocess (`python -m flows.cli ...`) in a project folder, the way a
user or DVC runs it; the project root is the folder holding params.yaml.
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

__all__ = ["MIRROR", "N_BLOCKS", "REPO", "SETTINGS", "WIKITEXT", "Project", "build_tiny_source", "git_commit_all",
           "have_git", "ptq_many", "release_files", "run_and_kill", "write_params"]

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
                 "GIT_COMMITTER_NAME": "ptq-tests", "GIT_COMMITTER_EMAIL": "ptq-tests@example.invalid"}


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
    """Every file of a release by relative path; MANIFEST.json (which also records stage timings)
    is replaced by its "files" section."""
    files = {p.relative_to(release).as_posix(): p.read_bytes() for p in sorted(release.rglob("*")) if p.is_file()}
    manifest = json.loads(files.pop("MANIFEST.json"))
    files["MANIFEST.json#files"] = json.dumps(manifest["files"], sort_keys=True).encode()
    return files


def write_params(path: Path, source: Path, extra: Mapping[str, Mapping] | None = None) -> None:
    """The repo's params.yaml with SETTINGS, fetch_model.source and `extra` written in."""
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["fetch_model"]["source"] = str(source)
    for section, body in [*SETTINGS.items(), *(extra or {}).items()]:
        params[section].update(body)
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def git_commit_all(root: Path, env: Mapping[str, str], message: str = "init") -> str:
    """`git init` (once) and commit everything in root; returns the commit."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, env={**env, **_GIT_IDENTITY}, check=True,
                              capture_output=True, text=True).stdout

    if not (root / ".git").exists():
        git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", message)
    return git("rev-parse", "HEAD").strip()


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
