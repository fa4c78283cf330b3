"""Failpoints: named places where a run can be made to die as a crash would, to prove that every
stage resumes from any point.

`failpoint(name)` does nothing unless the environment variable PTQ_FAILPOINT names it (one name or
several, comma-separated). Then it SIGKILLs the process: its whole process group when it leads one
(a `ptq run` started in its own session, with the temporary Prefect server it spawned), else
itself. No cleanup code runs, exactly as under `kill -9` or a power cut. The names, in pipeline
order, are FAILPOINTS; tests/flows/test_pipeline.py kills a run at each of them.
"""
from __future__ import annotations

import os
import signal
import sys

__all__ = ["ENV", "FAILPOINTS", "failpoint"]

ENV = "PTQ_FAILPOINT"
FAILPOINTS = (
    "fetch_model.written",  # the model folder written beside data/model, not yet swapped in
    "<stage>.finished",  # a stage's outputs complete, dvc.lock not yet updated (any stage name)
    "qat.checkpointed",  # a QAT checkpoint written (every qat.checkpoint_every steps), training not done
    "pack.written",  # the release and its MANIFEST written beside data/release, not yet swapped in
    "evaluate.scored",  # the release's perplexity computed (and cached), the FP model's not yet
    "register.uploaded",  # release uploaded and the run tagged, no model version yet
    "register.versioned",  # the model version created, the alias not yet moved
)


def failpoint(name: str) -> None:
    """SIGKILL this process (group) here if PTQ_FAILPOINT names `name`."""
    wanted = os.environ.get(ENV)
    if not wanted or name not in {w.strip() for w in wanted.split(",")}:
        return
    print(f"failpoint {name}: SIGKILL", file=sys.stderr, flush=True)
    if os.getpgid(0) == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
