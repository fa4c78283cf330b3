"""torch's intra-op thread count, pinned in cluster workers.

Some CPU kernels give other bits with another thread count (LAPACK's blocked Cholesky, which GPTQ
and BoA factor every Hessian with, partitions its work by thread), so a task on a Dask or Ray worker,
which those engines start with OMP_NUM_THREADS=1, would quantize differently from the same task in
the driver. The local clusters of flows/orchestration.py set ENV to the driver's thread count, and
every numerical task calls `pin_threads()` first; set ENV on the workers of an existing cluster to
the thread count of the runs you compare with.
"""
from __future__ import annotations

import os

import torch

__all__ = ["ENV", "pin_threads"]

ENV = "PTQ_TORCH_THREADS"


def pin_threads() -> None:
    """Use $PTQ_TORCH_THREADS intra-op threads when it is set (a no-op otherwise)."""
    n = os.environ.get(ENV)
    if n and torch.get_num_threads() != int(n):
        torch.set_num_threads(int(n))
