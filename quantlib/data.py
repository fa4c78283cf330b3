"""The benchmark protocol's token-id arithmetic: split, calibration sampling, evaluation windows.

Pure torch on 1-D int64 id tensors: no I/O, no device choice, arguments never modified. The exact
recipe (see docs/protocol.md) is what makes perplexities comparable across runs:
  half = len(ids) // 2; pool = ids[:half]; eval = ids[half:]
  g = torch.Generator().manual_seed(seed); starts = torch.randint(0, len(pool) - seqlen + 1, (n,), generator=g)
  calibration[i] = pool[starts[i] : starts[i] + seqlen]
  windows = the first n non-overlapping `window`-token slices of the evaluation half
"""
from __future__ import annotations

import hashlib

import torch

__all__ = ["split_halves", "calibration_starts", "sample_calibration", "eval_windows", "ids_digest", "ids_set_digest"]


def _check_ids(ids: torch.Tensor, what: str) -> None:
    if not isinstance(ids, torch.Tensor) or ids.ndim != 1:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{what} must be a 1-D tensor of token ids, got {shape}")
    if ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"{what} must hold integer token ids, got dtype {ids.dtype}")


def _check_positive(**values: int | None) -> None:
    for name, v in values.items():
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def split_halves(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) -> (pool (N//2,), eval (N - N//2,)): calibration pool first, evaluation half second.

    Returns views of `ids` (no copy); callers must not write into them.
    """
    _check_ids(ids, "ids")
    if len(ids) < 2:
        raise ValueError(f"split_halves needs at least 2 tokens, got {len(ids)}")
    half = len(ids) // 2
    return ids[:half], ids[half:]


def calibration_starts(pool_len: int, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """(n,) int64 start offsets of the calibration sequences, exactly as the protocol draws them."""
    _check_positive(n=n, seqlen=seqlen)
    if pool_len < seqlen:
        raise ValueError(
            f"calibration needs a pool of at least seqlen={seqlen} tokens, but it has {pool_len}; "
            f"use a longer text or a shorter seqlen"
        )
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, pool_len - seqlen + 1, (n,), generator=g)


def sample_calibration(pool: torch.Tensor, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """(P,) pool -> (n, seqlen) int64 calibration sequences pool[s : s + seqlen] (a new tensor)."""
    _check_ids(pool, "pool")
    starts = calibration_starts(len(pool), n, seqlen, seed)  # (n,)
    index = starts[:, None] + torch.arange(seqlen)  # (n, seqlen) positions into the pool
    return pool[index].long()


def eval_windows(
    ids: torch.Tensor, window: int, n_windows: int | None, stride: int | None = None
) -> torch.Tensor:
    """(N,) -> (W, window) int64: the first `n_windows` windows starting at 0, stride, 2*stride, ...

    stride defaults to `window` (non-overlapping); n_windows None takes every full window. A tail
    shorter than `window` is dropped. Returns a new tensor.
    """
    _check_ids(ids, "ids")
    _check_positive(window=window, n_windows=n_windows, stride=stride)
    stride = window if stride is None else stride
    available = 0 if len(ids) < window else (len(ids) - window) // stride + 1
    if n_windows is None:
        if available == 0:
            raise ValueError(f"eval_windows needs at least window={window} tokens, got {len(ids)}")
        n_windows = available
    if n_windows > available:
        needed = (n_windows - 1) * stride + window
        raise ValueError(
            f"{n_windows} windows of {window} tokens (stride {stride}) need {needed} tokens, "
            f"but only {len(ids)} are present; lower n_windows or window, or use a longer text"
        )
    # unfold: (available, window) view with row i = ids[i*stride : i*stride + window]
    return ids.unfold(0, window, stride)[:n_windows].clone().long()


def ids_digest(ids: torch.Tensor) -> str:
    """First 16 hex digits of the sha256 of token ids (as int64, row-major): names a calibration or
    evaluation draw, so two tools can show they saw the same tokens."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def ids_set_digest(ids: torch.Tensor) -> str:
    """ids_digest of the (n, T) rows in lexicographic order: names which sequences a calibration
    used, whatever order a tool fed them in (Hessians and range statistics do not depend on it)."""
    return ids_digest(torch.tensor(sorted(ids.to(torch.int64).tolist()), dtype=torch.int64).reshape(ids.shape))
