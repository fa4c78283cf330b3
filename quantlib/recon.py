"""Block and cross-block reconstruction (SB-PTQ, MB-PTQ/CBQ windows with overlap, LA-PTQ look-ahead).

A window of k consecutive blocks [i, i+k) has its Linears replaced by `LearnableLinear`s and is
trained so that its output (or, with look-ahead L, the output of the next L frozen FP blocks) matches
the FP target. What is learned, each switchable:
  clipping   per-group sigmoid-bounded shrink of the init range [-z0 s0, (maxq - z0) s0] (OmniQuant LWC)
  scale      per-group log-scale refinement on top of it
  rounding   "nearest" (STE), "adaround" (a full rectified-sigmoid offset per weight), "lora"
             (CBQ LoRA-Rounding: the offset logits are V0 + A1 A2 with rank r, V0 frozen) or "signed"
             (SignRound: q = round(W / s + z + v), v in [-1/2, 1/2] per weight, 0 at init; on a learned
             grid v keeps meaning "this far from nearest" while the grid moves, where a floor offset
             fixed at the init grid's fractional part does not)
  weights    the latent weights themselves (straight-through estimator; needs rounding "nearest")
Codes: q = clamp(floor(W / s + z) + h, 0, 2^b - 1) with h in [0, 1] (hardened to {0, 1} at the end;
signed: q = clamp(round(W / s + v) + z, 0, 2^b - 1)), w_hat = s (q - z). The optimizer is Adam, or
SignRound's sign step ("sign": every parameter moves by lr per step, so lr ~ 1 / iters is a distance).
Grid: "learned" re-derives the codes on the learned (s, z) (OmniQuant LWC: right for an RTN init);
"init" keeps the codes on the initializer's grid (s0, z0) and learns only the dequantization scale
s = s0 exp(log_scale) and the rounding offsets: a GPTQ/BoA solution is error-compensated code by code,
and re-rounding it on a shifted grid undoes that (docs/benchmarks/tuning_notes.md). "auto" = "init"
for GPTQ/BoA, "learned" for RTN.
Initialization from RTN, GPTQ or BoA: with GPTQ the latent W is GPTQ's error-
updated weight, whose rounding reproduces GPTQ's codes exactly; with BoA (no latent) it is the FP
weight clamped to within half a step of BoA's codes (`latent_near_codes`); h starts at the fractional
part of W/s + z (AdaRound), so the soft weight is the latent weight and hardening gives the
initializer's codes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .optim import AMP_MODES, OPTIMIZERS, SCHEDULES
from .primitives import contiguous_groups, dequantize, expand, floor_ste, round_ste, ste_codes
from .qweight import QuantizedWeight
from .spec import QuantSpec

__all__ = ["ReconConfig", "LearnableLinear", "latent_near_codes", "window_starts", "recon_loss", "ZETA", "GAMMA"]

ZETA, GAMMA = 1.1, -0.1  # rectified sigmoid stretch (AdaRound)
ROUNDINGS = ("nearest", "adaround", "lora", "signed")
LOSSES = ("mse", "kl", "mse+kl")
INITS = ("rtn", "gptq", "boa")
GRIDS = ("auto", "init", "learned")
TARGETS = ("fp", "qin")


@dataclass(frozen=True)
class ReconConfig:
    """window k, overlap o (next window starts k - o blocks later), lookahead L; k=1,o=0,L=0 is SB-PTQ.

    target "fp": the FP model's activations (FP inputs); "qin": FP blocks applied to the quantized
    prefix's activations."""

    window: int = 2
    overlap: int = 1
    lookahead: int = 0
    learn_clip: bool = True
    learn_scale: bool = False
    rounding: str = "lora"
    rank: int = 4
    hard_forward: bool = True  # train with hardened offsets (STE): no soft/hard gap at the end
    learn_weights: bool = False
    loss: str = "mse+kl"
    kl_weight: float = 1.0
    target: str = "fp"
    cfp: bool = False  # CBQ coarse-to-fine outlier pre-processing of each block before its init
    cfp_weights: bool = True  # with cfp: also truncate weight outliers (False: its FP-exact activation half only)
    init: str = "gptq"
    init_damp: float = 0.01  # the gptq/boa init's Hessian damping (GPTQConfig.damp)
    grid: str = "auto"
    iters: int = 100
    batch_size: int = 4
    lr: float = 1e-3  # rounding parameters (why not 1e-2: docs/benchmarks/tuning_notes.md)
    clip_lr: float = 1e-2  # clipping (learned grid) / dequantization scale (frozen grid)
    weight_lr: float = 1e-5
    schedule: str = "cosine"
    optimizer: str = "adam"  # "sign": p -= lr sign(grad) (SignRound; pair with schedule linear, lr ~ 1 / iters)
    grad_clip: float = 1.0
    reg_weight: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)  # annealed regularizer exponent, start -> end
    warmup: float = 0.2  # fraction of iterations without the rounding regularizer
    seed: int = 0
    # held out: the last round(heldout x batches) calibration batches never train; the guard (and early
    # stopping) judge on them. eval_every > 0: the held-out loss every that many iterations, the best
    # state kept, stop after `patience` evaluations without improvement (0: never stop early)
    heldout: float = 0.0
    eval_every: int = 0
    patience: int = 0
    amp: str = "auto"  # the training forward's arithmetic: quantlib.optim.training_autocast

    def __post_init__(self) -> None:
        _check(self.window >= 1, f"window must be >= 1, got {self.window}")
        _check(0 <= self.overlap < self.window, f"overlap must satisfy 0 <= overlap < window ({self.window}), got {self.overlap}")
        _check(self.lookahead >= 0, f"lookahead must be >= 0, got {self.lookahead}")
        _check(self.rounding in ROUNDINGS, f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        _check(self.rank >= 1, f"rank must be >= 1, got {self.rank}")
        _check(self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}")
        _check(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _check(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        _check(self.amp in AMP_MODES, f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        _check(self.init in INITS, f"init must be one of {INITS}, got {self.init!r}")
        _check(0 < self.init_damp < 1, f"init_damp must be in (0, 1), got {self.init_damp}")
        _check(self.grid in GRIDS, f"grid must be one of {GRIDS}, got {self.grid!r}")
        _check(self.target in TARGETS, f"target must be one of {TARGETS}, got {self.target!r}")
        _check(self.cfp or self.cfp_weights,
               "cfp_weights=False (method part cfpa) selects CFP's activation half: it needs cfp=True")
        for name in ("lr", "clip_lr", "weight_lr", "kl_weight", "reg_weight", "grad_clip"):
            _check(getattr(self, name) > 0 or (name in ("reg_weight", "kl_weight") and getattr(self, name) == 0),
                   f"{name} must be positive, got {getattr(self, name)}")
        _check(self.iters >= 0 and self.batch_size >= 1, "iters must be >= 0 and batch_size >= 1")
        _check(0 <= self.heldout < 1, f"heldout must be in [0, 1) (0: judge on the training batches), got {self.heldout}")
        _check(self.eval_every >= 0 and self.patience >= 0, "eval_every and patience must be >= 0")
        _check(not self.eval_every or self.heldout > 0,
               "eval_every (early stopping) needs held-out batches: set heldout > 0 (e.g. 0.125)")
        _check(not self.learn_weights or self.rounding == "nearest",
               "learn_weights trains the latent weights through the straight-through rounding: set rounding: nearest")

    @property
    def frozen_grid(self) -> bool:
        """Codes stay on the initializer's grid; only the dequantization scale and offsets learn."""
        return self.grid == "init" or (self.grid == "auto" and self.init != "rtn")

    def windows(self, n_blocks: int) -> list[tuple[int, int]]:
        return window_starts(n_blocks, self.window, self.overlap, self.lookahead)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def window_starts(n_blocks: int, k: int, o: int, lookahead: int = 0) -> list[tuple[int, int]]:
    """[(start, end)] windows of k blocks sliding by k - o, the last one clipped to n_blocks."""
    if k > n_blocks:
        raise ValueError(f"window {k} is larger than the model's {n_blocks} blocks")
    out, start = [], 0
    while True:
        end = min(start + k, n_blocks)
        out.append((start, end))
        if end == n_blocks:
            return out
        start += k - o


class LearnableLinear(nn.Module):
    """Fake-quantized stand-in for one Linear (or Conv1D) during reconstruction.

    latent: (out, in) continuous weight; (s0, z0): (out, G) the initializer's scale and zero (the
    grid a frozen-grid window keeps); h0: (out, in) init rounding offsets in {0, 1}.
    """

    def __init__(self, init: QuantizedWeight, latent: torch.Tensor, bias: torch.Tensor | None, cfg: ReconConfig,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        spec = init.spec
        self.spec, self.cfg = spec, cfg
        self.register_buffer("g_idx", init.g_idx.clone())
        s0, z0 = init.scale.float(), init.zero.float()
        self.register_buffer("s0", s0.clone())  # the initializer's grid
        self.register_buffer("z0", z0.clone())
        self.latent = nn.Parameter(latent.float().clone(), requires_grad=cfg.learn_weights)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        g = s0.shape
        self.clip_hi = nn.Parameter(torch.full(g, 4.0), requires_grad=cfg.learn_clip)
        self.clip_lo = nn.Parameter(torch.full(g, 4.0), requires_grad=cfg.learn_clip)
        self.log_scale = nn.Parameter(torch.zeros(g), requires_grad=cfg.learn_scale)
        scale, zero = self.qparams()
        self._init_rounding(self.latent.detach() / self._expand(scale), self._expand(zero), generator)
        # frozen grid, fixed latent, offset rounding, contiguous groups (column j in group j // gs, as
        # every solver here writes them): floor(W / s0 + z0) never changes, so it is computed once and
        # the codes are dequantized on (out, G, gs) views, without expand's gather and its scatter in
        # backward (docs/benchmarks/profile.md: the recon window's fake-quant)
        # signed rounding (on either grid) with a fixed latent runs on the same views: round(W / s + v)
        self._offsets_only = cfg.frozen_grid and cfg.rounding in ("adaround", "lora") and not cfg.learn_weights
        self._viewable = self._offsets_only or (cfg.rounding == "signed" and not cfg.learn_weights)
        self._contiguous: tuple[tuple, bool] | None = None  # (g_idx's storage and version, contiguous groups?)
        self._base: tuple[tuple, torch.Tensor] | None = None  # (inputs' storage and versions, floor(W / s0 + z0) (out, G, gs))

    @property
    def grouped(self) -> bool:
        """Whether weight_hat runs on (out, G, gs) views (re-checked after a load_state_dict)."""
        if not self._viewable:
            return False
        key = (self.g_idx.data_ptr(), self.g_idx._version)
        if self._contiguous is None or self._contiguous[0] != key:
            self._contiguous = (key, contiguous_groups(self.g_idx, self.s0.shape[1]))
        return self._contiguous[1]

    @classmethod
    def empty(cls, spec: QuantSpec, cfg: ReconConfig, out_features: int, in_features: int, groups: int,
              bias: bool) -> "LearnableLinear":
        """A module of the right shapes to `load_state_dict` a saved one into (resuming a window)."""
        init = QuantizedWeight(torch.zeros(out_features, in_features, dtype=torch.uint8),
                               torch.ones(out_features, groups), torch.zeros(out_features, groups),
                               torch.zeros(in_features, dtype=torch.int32), spec)
        b = torch.zeros(out_features) if bias else None
        return cls(init, torch.zeros(out_features, in_features), b, cfg)

    # -- parameters -> (scale, zero) and codes

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) each (out, G). Frozen grid: (s0 exp(log_scale), z0). Learned grid: the init
        range shrunk by sigmoid(c)/sigmoid(4) (1 at init), then times exp(log_scale)."""
        if self.cfg.frozen_grid:
            return self.s0 * torch.exp(self.log_scale), self.z0
        gamma_hi = torch.sigmoid(self.clip_hi) / torch.sigmoid(torch.tensor(4.0))
        gamma_lo = torch.sigmoid(self.clip_lo) / torch.sigmoid(torch.tensor(4.0))
        maxq = self.spec.maxq
        if self.spec.sym:  # one range factor; the zero stays mid-grid
            return (self.s0 * gamma_hi * torch.exp(self.log_scale)).clamp_min(1e-10), self.z0
        # the init range [lo0, hi0] = [-z0 s0, (maxq - z0) s0] gives exactly (s0, z0)
        hi, lo = gamma_hi * (maxq - self.z0) * self.s0, -gamma_lo * self.z0 * self.s0
        scale = ((hi - lo) / maxq * torch.exp(self.log_scale)).clamp_min(1e-10)
        zero = torch.clamp(round_ste(-lo / scale), 0, maxq)
        return scale, zero

    def _expand(self, p: torch.Tensor) -> torch.Tensor:
        return expand(p, self.latent.shape[1], self.g_idx)

    def _v(self, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """(out, in) W / s + z on the grid the codes are rounded on: the init's when it is frozen."""
        s, z = (self.s0, self.z0) if self.cfg.frozen_grid else (scale, zero)
        return self.latent / self._expand(s) + self._expand(z)

    def _floor(self) -> torch.Tensor:
        return torch.floor(self._v(*self.qparams())).detach()

    def _codes(self, scale: torch.Tensor, zero: torch.Tensor, hard: bool) -> torch.Tensor:
        """(out, in) codes (float, differentiable through the STE) for the learned (scale, zero)."""
        if self.cfg.rounding == "nearest":  # on the init's grid when it is frozen
            s, z = (self.s0, self.z0) if self.cfg.frozen_grid else (scale, zero)
            return ste_codes(self.latent / self._expand(s), self._expand(z), self.spec.maxq)
        if self.cfg.rounding == "signed":  # v = 0 rounds exactly as ste_codes (ties included); v learns
            s, z = (self.s0, self.z0) if self.cfg.frozen_grid else (scale, zero)  # through the STE as a code shift
            v = self.alpha.clamp(-0.5, 0.5)
            return torch.clamp(round_ste(self.latent / self._expand(s) + v) + self._expand(z), 0, self.spec.maxq)
        # straight-through floor: on a learned grid the clipping also learns from the codes it moves
        # (W / s changes with s), as "nearest" (ste_codes), OmniQuant's LWC and AutoRound do; on a
        # frozen grid v is a constant and this is the plain floor
        return torch.clamp(floor_ste(self._v(scale, zero)) + self._offsets(hard), 0, self.spec.maxq)

    def _offsets(self, hard: bool) -> torch.Tensor:
        """(out, in) rounding offsets: hard in {0, 1}, or soft (hard forward, soft gradient with hard_forward)."""
        h = self.soft_offsets()
        if hard:
            return (h >= 0.5).float()
        if self.cfg.hard_forward:  # straight-through
            return h + ((h >= 0.5).float() - h).detach()
        return h

    def _init_rounding(self, w_over_s: torch.Tensor, zero: torch.Tensor, generator) -> None:
        # AdaRound init: the soft offset equals the fractional part of v = W/s + z, so the soft weight
        # is the latent weight itself and hardening (h >= 0.5) gives back the initializer's codes, ties
        # included (a symmetric grid puts each group's most negative weight at v = 0.5): offsets stay
        # 1e-4 off 0.5 on the side quantize / ste_codes take (round(W/s) + z: half to even before
        # the zero is added, as RTN and GPTQ round)
        v = w_over_s + zero
        rest, up = v - torch.floor(v), torch.round(w_over_s) + zero > torch.floor(v)
        rest = torch.where(up, rest.clamp(0.5 + 1e-4, 1 - 1e-4), rest.clamp(1e-4, 0.5 - 1e-4))
        v0 = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
        rounding = self.cfg.rounding
        self.register_buffer("h0", (rest >= 0.5).float())
        if rounding == "signed":  # v = 0: nearest rounding of the latent weight, the initializer's codes
            v0 = torch.zeros_like(v0)
        self.alpha = nn.Parameter(v0, requires_grad=rounding in ("adaround", "signed"))
        if rounding == "lora":
            out, n = rest.shape
            r = self.cfg.rank
            self.lora_a = nn.Parameter(torch.randn(out, r, generator=generator) / math.sqrt(r))
            self.lora_b = nn.Parameter(torch.zeros(r, n))  # A1 A2 = 0 at init: offsets start at V0

    def soft_offsets(self) -> torch.Tensor:
        v = self.alpha
        if self.cfg.rounding == "lora":
            v = v + self.lora_a @ self.lora_b
        return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def weight_hat(self, hard: bool = False) -> torch.Tensor:
        """Fake-quantized (out, in) weight; `hard` uses offsets rounded to {0, 1}."""
        scale, zero = self.qparams()
        if self.grouped:
            if self.cfg.rounding == "signed":
                return self._grouped_signed_weight_hat(scale, zero)
            return self._grouped_weight_hat(scale, hard)
        return dequantize(self._codes(scale, zero, hard), self._expand(scale), self._expand(zero))

    def _grouped_weight_hat(self, scale: torch.Tensor, hard: bool) -> torch.Tensor:
        """weight_hat on (out, G, gs) views: the same elementwise operations on the same values, so it
        equals the general path bit for bit (the scale's gradient up to the order of its group sums)."""
        out, g = self.s0.shape
        version = tuple((t.data_ptr(), t._version) for t in (self.latent, self.s0, self.z0))  # in place or moved
        if self._base is None or self._base[0] != version:
            v = self.latent.detach().view(out, g, -1) / self.s0.unsqueeze(-1) + self.z0.unsqueeze(-1)
            self._base = (version, torch.floor(v))
        q = torch.clamp(self._base[1] + self._offsets(hard).view(out, g, -1), 0, self.spec.maxq)
        return dequantize(q, scale.unsqueeze(-1), self.z0.unsqueeze(-1)).flatten(1)

    def _grouped_signed_weight_hat(self, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Signed rounding's weight_hat on (out, G, gs) views: _codes' operations in _codes' order."""
        out, g = self.s0.shape
        s, z = (self.s0, self.z0) if self.cfg.frozen_grid else (scale, zero)
        v = self.alpha.view(out, g, -1).clamp(-0.5, 0.5)
        q = round_ste(self.latent.view(out, g, -1) / s.unsqueeze(-1) + v) + z.unsqueeze(-1)
        q = torch.clamp(q, 0, self.spec.maxq)
        return dequantize(q, scale.unsqueeze(-1), zero.unsqueeze(-1)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_hat(hard=not self.training).to(x.dtype),
                        None if self.bias is None else self.bias.to(x.dtype))

    def regularizer(self, beta: float) -> torch.Tensor:
        """sum(1 - |2h - 1|^beta): zero only when every offset is exactly 0 or 1."""
        if self.cfg.rounding in ("nearest", "signed"):  # signed: v is bounded, nothing to anneal
            return self.latent.new_zeros(())
        return (1 - (2 * self.soft_offsets() - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def harden(self) -> QuantizedWeight:
        """Integer codes with hard offsets, and the final (scale, zero)."""
        scale, zero = self.qparams()
        q = self._codes(scale, zero, hard=True)
        return QuantizedWeight(q.to(torch.uint8).cpu(), scale.detach().float().cpu(), zero.detach().float().cpu(),
                               self.g_idx.cpu(), self.spec, latent=self.latent.detach().cpu())

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {"rounding": [], "clip": [], "scale": [], "weights": []}
        if self.cfg.rounding in ("adaround", "signed"):
            groups["rounding"].append(self.alpha)
        if self.cfg.rounding == "lora":
            groups["rounding"] += [self.lora_a, self.lora_b]
        frozen = self.cfg.frozen_grid
        if self.cfg.learn_clip and not frozen:
            groups["clip"] += [self.clip_hi, self.clip_lo]
        if self.cfg.learn_scale or (frozen and self.cfg.learn_clip):  # on a frozen grid the range is the scale
            groups["scale"].append(self.log_scale)
        if self.cfg.learn_weights:
            groups["weights"].append(self.latent)
        return groups


def latent_near_codes(qw: QuantizedWeight, w: torch.Tensor) -> torch.Tensor:
    """(out, in) weight as close to w as possible whose nearest rounding on qw's grid gives qw's codes:
    w / s + z clamped to [q - 1/2, q + 1/2) (minus a margin), for initializers without a latent."""
    n = w.shape[1]
    s, z = expand(qw.scale.float(), n, qw.g_idx), expand(qw.zero.float(), n, qw.g_idx)
    q = qw.qweight.float()
    v = torch.clamp(w.float() / s + z, q - 0.499, q + 0.499)
    return s * (v - z)


def recon_loss(y: torch.Tensor, t: torch.Tensor, cfg: ReconConfig) -> torch.Tensor:
    """MSE, KL(softmax(t) || softmax(y)) over the hidden dimension (CBQ), or MSE + w KL."""
    y, t = y.float(), t.float()
    mse = F.mse_loss(y, t)
    if cfg.loss == "mse":
        return mse
    kl = F.kl_div(F.log_softmax(y, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1).mean()
    return kl if cfg.loss == "kl" else mse + cfg.kl_weight * kl
