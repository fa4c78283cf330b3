"""Guards on a project: one writer at a time (the project lock, unique temporary names, the sweep of
leftovers) and stages run in order.

The lock holder is always another process (flock is per open file: the same code in this process
would not see its own lock held), and it is killed with SIGKILL to prove the kernel releases it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flows.cli import EXIT_LOCKED
from flows.lock import LOCK_PATH, ProjectLocked, project_lock
from tasks.io import TEMP_GLOB, atomic_write_bytes, swap_dir, sweep_temporaries, temp_dir_beside, write_manifest

REPO = Path(__file__).resolve().parents[2]
HOLD = ("import sys, time\nfrom pathlib import Path\nfrom flows.lock import project_lock\n"
        "with project_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(600)\n")


def _holder(root: Path) -> subprocess.Popen:
    """Another process holding root's lock (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.reliability(
    fault='the project-lock holder killed with -9',
    sees='nothing to clean: the kernel released the lock',
    kept='the lock file (it only names the holder)')
def test_a_second_writer_fails_at_once_naming_the_holder_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    proc = _holder(tmp_path)
    try:
        t = time.monotonic()
        with pytest.raises(ProjectLocked, match=f"pid {proc.pid}"):
            with project_lock(tmp_path, wait=False):
                pytest.fail("entered a lock another process holds")
        assert time.monotonic() - t < 5
    finally:
        _kill(proc)  # SIGKILL: no cleanup code runs in the holder
    with project_lock(tmp_path, wait=False):
        assert f"pid {os.getpid()}" in (tmp_path / LOCK_PATH).read_text()


def test_a_waiting_writer_enters_only_once_the_holder_is_gone(tmp_path, capsys):
    proc = _holder(tmp_path)
    entered = threading.Event()

    def second():
        with project_lock(tmp_path, poll_s=0.05):
            entered.set()

    waiter = threading.Thread(target=second)
    waiter.start()
    try:
        assert not entered.wait(1.5)  # still waiting while the holder lives
    finally:
        _kill(proc)
    assert entered.wait(10)
    waiter.join()
    assert f"held by pid {proc.pid}" in capsys.readouterr().err


def test_temporaries_are_unique_and_swept(tmp_path):
    final = tmp_path / "acts" / "abc"
    a, b = temp_dir_beside(final), temp_dir_beside(final)
    assert a != b and a.is_dir() and b.is_dir() and a.parent == final.parent
    (a / "x.bin").write_bytes(b"1")
    swap_dir(a, final)  # a killed writer's b stays behind
    atomic_write_bytes(tmp_path / "keep.json", b"{}")
    (tmp_path / "user.tmp").write_text("not ours: no leading dot")
    assert sorted(p.name for p in final.parent.glob(TEMP_GLOB)) == [b.name]
    assert sweep_temporaries(tmp_path) == [b]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "acts", "acts/abc", "acts/abc/x.bin", "keep.json", "user.tmp"]


def test_swap_dir_replaces_the_old_folder_through_a_unique_name(tmp_path):
    dst = tmp_path / "out"
    for text in ("old", "new"):
        tmp = temp_dir_beside(dst)
        (tmp / "f").write_text(text)
        swap_dir(tmp, dst)
    assert (dst / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_swap_dir_keeps_an_intact_folder_of_the_same_content_and_replaces_a_damaged_one(tmp_path):
    # parallel sweep configs publish the same model folder: the second must not pull the first's
    # out from under its readers (a window with no folder), unless the first is damaged
    dst = tmp_path / "model"

    def build(text: str) -> Path:
        tmp = temp_dir_beside(dst)
        (tmp / "w.bin").write_text(text)
        write_manifest(tmp)
        return tmp

    swap_dir(build("weights"), dst)
    first = (dst / "w.bin").stat().st_ino
    swap_dir(build("weights"), dst)  # same content: theirs kept, ours dropped
    assert (dst / "w.bin").stat().st_ino == first and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    (dst / "w.bin").write_text("damaged")  # the MANIFEST no longer verifies: replaced
    swap_dir(build("weights"), dst)
    assert (dst / "w.bin").read_text() == "weights" and (dst / "w.bin").stat().st_ino != first
    swap_dir(build("other weights"), dst)  # other content: replaced
    assert (dst / "w.bin").read_text() == "other weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _ptq(project, *args: str) -> subprocess.CompletedProcess:
    """`ptq ARGS` as a user runs it in `project` (this checkout's code)."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=project, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.reliability(
    fault='`ptq run --no-wait -S ...` while another process writes to the project',
    sees='exit 75: `another ptq process is writing to this project (pid N: ...)`',
    kept='params.yaml unchanged (the override is not written), nothing else created')
def test_ptq_run_no_wait_on_a_locked_project_exits_75_and_touches_nothing(tmp_path):
    params = (REPO / "params.yaml").read_bytes()
    (tmp_path / "params.yaml").write_bytes(params)
    proc = _holder(tmp_path)
    try:
        done = _ptq(tmp_path, "run", "--no-wait", "-S", "quantize.bits=3")
    finally:
        _kill(proc)
    assert done.returncode == EXIT_LOCKED, done.stderr
    assert f"pid {proc.pid}" in done.stderr and "--no-wait" in done.stderr
    assert (tmp_path / "params.yaml").read_bytes() == params  # the override was not written
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache", "params.yaml"]  # only the lock's folder


@pytest.mark.reliability(
    fault='`ptq stage quantize` before fetch_model and prepare_data ran',
    sees='"stage quantize needs data/model, data/tokens, made by stage(s) fetch_model, prepare_data; run `ptq stage '
         'fetch_model` first ...", exit 2',
    kept='params.yaml unchanged, no data/')
def test_a_stage_run_before_the_stages_it_needs_names_them(tmp_path):
    """`ptq stage quantize` in a project with no data: a message naming the stage to run first (not a
    raw errno), before params are written or anything is made."""
    (tmp_path / "params.yaml").write_bytes((REPO / "params.yaml").read_bytes())
    done = _ptq(tmp_path, "stage", "quantize", "-S", "quantize.bits=3")
    assert done.returncode == 2, done.stderr
    assert "stage quantize needs data/model, data/tokens" in done.stderr
    assert "run `ptq stage fetch_model` first" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "params.yaml").read_bytes() == (REPO / "params.yaml").read_bytes()
    assert not (tmp_path / "data").exists()


@pytest.mark.reliability(
    fault='an error raised inside torch (a RuntimeError deep in a library)',
    sees="its full traceback, then `ptq <cmd>: error: ...`; the project's own errors stay one line",
    kept='-')
def test_a_library_error_keeps_its_traceback_and_ours_stay_one_line(monkeypatch, capsys):
    import torch

    from flows import cli, cli_impl
    from flows.params import load_params

    def from_torch(args):
        torch.ones(2, 3) @ torch.ones(2, 3)  # RuntimeError raised inside torch

    def from_us(args):
        load_params(Path("no-such-params.yaml"))  # FileNotFoundError under flows/params.py (pathlib's frames skipped)

    for fn, traced in ((from_torch, True), (from_us, False)):
        monkeypatch.setattr(cli_impl, "dispatch", fn)
        assert cli.main(["bench", "kernels"]) == 2
        err = capsys.readouterr().err
        assert err.rstrip().splitlines()[-1].startswith("ptq bench: error: ")
        assert ("Traceback" in err) == traced, err


@pytest.mark.reliability(
    fault="a Hub model source without a revision (hf:ORG/NAME)",
    sees="a warning before any stage: the Hub may serve other files later; pin hf:ORG/NAME@<commit sha>",
    kept="the run goes on (the downloaded files are hashed into data/inputs.json)")
def test_an_unpinned_hub_source_is_warned_about_before_any_stage(capsys):
    from dataclasses import replace

    from flows.cli_pipeline import preflight
    from flows.params import FetchModelParams, PipelineParams

    for spec, warned in (("hf:org/model", True), ("hf:org/model@0123abc", False)):
        preflight(replace(PipelineParams(), fetch_model=FetchModelParams(source=spec)))
        err = capsys.readouterr().err
        assert ("names no revision" in err and f"{spec}@<commit sha>" in err) == warned, err


@pytest.mark.reliability(
    fault='quantize.group_size that does not divide a Linear of a local model (48 for hidden 64 / intermediate 128)',
    sees='`quantize.group_size: 48 does not divide the model\'s hidden_size ... 64; choose a divisor ...` before '
         'any stage (other sources: at the start of quantize, from the shapes alone)',
    kept='params.yaml unchanged, no data/')
def test_a_group_size_that_does_not_divide_a_layer_is_refused_in_preflight(tmp_path):
    import json

    from flows.params import load_params
    from tests.quantlib.tiny import tiny_config

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(tiny_config("llama").to_dict()))
    (tmp_path / "params.yaml").write_bytes((REPO / "params.yaml").read_bytes())
    done = _ptq(tmp_path, "run", "-S", f"fetch_model.source={model}", "-S", "quantize.group_size=48")
    assert done.returncode == 2, done.stderr
    assert "quantize.group_size: 48 does not divide the model's hidden_size (q/k/v, gate/up inputs) 64" in done.stderr
    assert (tmp_path / "params.yaml").read_bytes() == (REPO / "params.yaml").read_bytes()
    assert not (tmp_path / "data").exists()
    from flows.cli_pipeline import preflight
    for ok in (32, 64, None):  # divisors (and per-channel) pass
        preflight(load_params(tmp_path / "params.yaml", [f"fetch_model.source={model}",
                                                         f"quantize.group_size={'null' if ok is None else ok}"]))
    # a mixed-precision candidate's group size is checked the same way, named as the candidate
    with pytest.raises(ValueError, match=r"quantize.mixed_from: w3g48: group size 48 does not divide the model's hidden"):
        preflight(load_params(tmp_path / "params.yaml", [f"fetch_model.source={model}",
                                                         "quantize.mixed_from=[w2g32,w3g48]"]))


@pytest.mark.reliability(
    fault='`pack.format: gguf` for a local model llama.cpp would compute otherwise (Gemma3, a Mistral sliding window)',
    sees='`pack.format gguf supports the [...] families, not \'gemma3_text\'; pick pack.format gptq or compressed-tensors` '
         'before any stage (other sources: the pack stage refuses, the quantized codes stay cached)',
    kept='params.yaml unchanged, no data/')
def test_a_model_gguf_cannot_hold_is_refused_in_preflight(tmp_path):
    import json

    from flows.cli_pipeline import preflight
    from flows.params import load_params
    from tests.quantlib.tiny import tiny_config

    (tmp_path / "params.yaml").write_bytes((REPO / "params.yaml").read_bytes())
    folders = {}
    for family in ("gemma3_text", "mistral", "qwen3"):
        folders[family] = tmp_path / family
        folders[family].mkdir()
        (folders[family] / "config.json").write_text(json.dumps(tiny_config(family).to_dict()))
    done = _ptq(tmp_path, "run", "-S", f"fetch_model.source={folders['gemma3_text']}", "-S", "pack.format=gguf")
    assert done.returncode == 2, done.stderr
    assert "pack.format gguf supports the ['llama', 'mistral', 'qwen2', 'qwen3'] families, not 'gemma3_text'" in done.stderr
    assert not (tmp_path / "data").exists()
    with pytest.raises(ValueError, match="no sliding window"):
        preflight(load_params(tmp_path / "params.yaml", [f"fetch_model.source={folders['mistral']}", "pack.format=gguf"]))
    preflight(load_params(tmp_path / "params.yaml", [f"fetch_model.source={folders['qwen3']}", "pack.format=gguf"]))
