"""Failpoints kill like `kill -9`: only when named, and the whole process group when it leads one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.faults import ENV

REPO = Path(__file__).resolve().parents[2]
# spawns a child in its own group, prints the child's pid, then reaches failpoint "a.b"
SCRIPT = ("import subprocess, sys\nfrom tasks.faults import failpoint\n"
          "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
          "print(child.pid, flush=True)\nfailpoint('a.b')\nprint('survived', flush=True)\nchild.kill()\n")


def _run(value: str | None) -> tuple[subprocess.CompletedProcess, int]:
    env = {k: v for k, v in os.environ.items() if k != ENV} | ({ENV: value} if value is not None else {})
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60, start_new_session=True)
    return done, int(done.stdout.split()[0])


def _gone(pid: int) -> bool:
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":  # dead, not yet reaped by init
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("value", ["a.b", "x.y, a.b"])
def test_a_named_failpoint_sigkills_the_process_group(value):
    done, child = _run(value)
    assert done.returncode == -signal.SIGKILL and "survived" not in done.stdout
    assert "failpoint a.b: SIGKILL" in done.stderr
    assert _gone(child)  # the group went with it (a Prefect server would too)


@pytest.mark.parametrize("value", [None, "", "a.bc", "a"])
def test_an_unnamed_failpoint_does_nothing(value):
    done, _ = _run(value)
    assert done.returncode == 0 and "survived" in done.stdout and "failpoint" not in done.stderr
