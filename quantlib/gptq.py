"""GPTQ (Frantar et al. 2022): second-order error compensation, column by column.

Math kept apart from the driver (engine.py): `accumulate_hessian` folds calibration inputs into H,
`gptq_quantize` solves one weight given H.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .primitives import expand, minmax_qparams, qparams_from_range, search_qparams
from .qweight import QuantizedWeight
from .spec import QuantSpec

__all__ = ["GPTQConfig", "accumulate_hessian", "block_end", "damped_inverse_cholesky", "gptq_quantize"]

_LAPACK_LOCK = threading.Lock()


@dataclass(frozen=True)
class GPTQConfig:
    """block_size: columns per lazy-update block (cut short so no lazy group straddles two blocks: the
    codes do not depend on it); damp: fraction of mean(diag H) added to the diagonal (x10 on each
    Cholesky failure, up to max_damp_tries); act_order: columns by decreasing
    diag H with static groups (qparams fixed from the unpermuted weight, so g_idx stays j // g);
    clip_search: grid-search clipping ratio per group weighted by diag H."""

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    clip_search: bool = False
    max_damp_tries: int = 6

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")


def accumulate_hessian(
    h: torch.Tensor | None, count: int, x: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Running H = 2/N sum x x^T. x: (..., in) calibration inputs of one Linear; h: (in, in) fp32.

    Returns the updated (H, N); the running mean keeps H's scale independent of N.
    """
    x = x.reshape(-1, x.shape[-1]).float()
    n = x.shape[0]
    if h is None:
        h = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    total = count + n
    h = h * (count / total) + (2.0 / total) * (x.t() @ x)
    return h, total


@contextmanager
def _one_cpu_thread(device: torch.device):
    """Run the enclosed CPU LAPACK calls on one thread. MKL's and OpenBLAS's blocked Cholesky split
    their work by thread, so the factor's last bits (and then GPTQ's codes) would depend on the
    process's torch thread count: a Dask or Ray worker (1 thread) would quantize differently from the
    driver (all cores). The lock keeps two threads of one process from interleaving save/restore."""
    if device.type != "cpu":
        yield
        return
    with _LAPACK_LOCK:
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)


def damped_inverse_cholesky(h: torch.Tensor, damp: float, tries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor of (H + lambda I)^-1, lambda = damp * mean(diag H), escalating lambda
    tenfold until H is numerically positive definite. Does not modify h. Bit-identical whatever
    torch's thread count (factored on one CPU thread)."""
    with _one_cpu_thread(h.device):
        return _damped_inverse_cholesky(h, damp, tries)


def _damped_inverse_cholesky(h: torch.Tensor, damp: float, tries: int) -> torch.Tensor:
    mean_diag = torch.mean(torch.diag(h)).clamp_min(1e-12)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lam = damp
    for _ in range(tries):
        l, info = torch.linalg.cholesky_ex(h + lam * mean_diag * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(l)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return u
        lam *= 10
    raise RuntimeError(f"Hessian is not positive definite even with damping {lam / 10:g} x mean(diag H)")


def _initial_qparams(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, cfg: GPTQConfig):
    if cfg.clip_search:
        return search_qparams(w, spec, weight=torch.diag(h))
    return minmax_qparams(w, spec)


def gptq_quantize(
    w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, cfg: GPTQConfig = GPTQConfig()
) -> QuantizedWeight:
    """w: (out, in) weight; h: (in, in) Hessian of its inputs. Neither argument is modified."""
    w = w.float().clone()
    h = h.float().clone()
    out, n = w.shape
    gw = spec.group_width(n)
    spec.groups(n)
    dead = torch.diag(h) == 0  # columns never excited by calibration data
    h[dead, dead] = 1
    w[:, dead] = 0

    # static qparams from the unpermuted weight (act-order, or per-channel); else lazily per group
    static = cfg.act_order or spec.group_size is None
    scale, zero = _initial_qparams(w, h, spec, cfg)
    perm = torch.argsort(torch.diag(h), descending=True) if cfg.act_order else torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    u = damped_inverse_cholesky(h, cfg.damp, cfg.max_damp_tries)
    groups = (perm // gw).to(w.device)
    q, pre = _sweep(w, u, scale, zero, groups, spec, cfg, static)
    inv = torch.argsort(perm)
    g_idx = torch.arange(n, dtype=torch.int32) // gw
    return QuantizedWeight(q[:, inv].to(torch.uint8).cpu(), scale.cpu(), zero.cpu(), g_idx, spec,
                           latent=pre[:, inv].cpu())


def _sweep(w, u, scale, zero, groups, spec, cfg, static):
    """Column sweep in blocks of cfg.block_size (the GPTQ lazy-batch update).

    w: (out, in) permuted weight, updated in place; u: upper Cholesky of H^-1 (permuted);
    groups[j]: group of permuted column j. Returns codes (out, in) in permuted order. When not
    static, each group's (scale, zero) is computed from the error-updated weight at its first column.
    Also returns each column as it was just before rounding (the error-updated "latent" weights).
    """
    out, n = w.shape
    gw = spec.group_width(n)
    q = torch.zeros_like(w)
    pre = torch.zeros_like(w)
    # per-column qparams (out, in); for lazy groups the columns are filled as each group starts
    s_cols, z_cols = scale[:, groups], zero[:, groups]
    i1 = 0
    while i1 < n:
        i2 = block_end(i1, n, cfg.block_size, gw, static)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if not static and j % gw == 0:
                cols = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :gw]
                sg, zg = _group_qparams(cols, spec, cfg)
                g = j // gw
                scale[:, g], zero[:, g] = sg[:, 0], zg[:, 0]
                s_cols[:, j : j + gw], z_cols[:, j : j + gw] = sg, zg
            col, s, z = w1[:, i], s_cols[:, j], z_cols[:, j]
            qc = torch.clamp(torch.round(col / s) + z, 0, spec.maxq)
            q[:, j] = qc
            pre[:, j] = col
            e = (col - s * (qc - z)) / u1[i, i]
            w1[:, i:].addr_(e, u1[i, i:], alpha=-1)
            err1[:, i] = e
        w[:, i2:].addmm_(err1, u[i1:i2, i2:], alpha=-1)
        i1 = i2
    return q, pre


def block_end(i1: int, n: int, block_size: int, gw: int, static: bool) -> int:
    """End of the lazy block that starts at column i1 (of n); gw: group width.

    With lazy (non-static) groups, a block ends early at the start of a group that begins inside it
    but runs past its end: that group's qparams are taken at its first column, and its columns past
    the block would not yet carry the block's pending update. Cutting there makes every group's
    qparams see fully updated columns, so codes do not depend on block_size."""
    i2 = min(i1 + block_size, n)
    last = (i2 - 1) // gw * gw  # start of the group holding column i2 - 1
    if not static and i1 < last and last + gw > i2:
        return last
    return i2


def _group_qparams(block: torch.Tensor, spec: QuantSpec, cfg: GPTQConfig):
    """(scale, zero) of shape (out, 1) for one group's current columns (out, g)."""
    one = QuantSpec(bits=spec.bits, group_size=None, sym=spec.sym)
    if cfg.clip_search:
        return search_qparams(block, one)
    return qparams_from_range(block.amin(1, keepdim=True), block.amax(1, keepdim=True), one)
