"""Our codes as llama.cpp's K-quant types (ggml-common.h), fitted: each row is super-blocks of 256
weights under one fp16 `d` (and `dmin`), split in sub-blocks with small integer scales (and mins):

  type  sub  codes c    weight w[j]             sub-block integers   bytes/256
  Q2_K  16   0..3       d*sc*c - dmin*m         sc, m in 0..15       84
  Q3_K  16   -4..3      d*sc*c                  sc in -32..31        110
  Q4_K  32   0..15      d*sc*c - dmin*m         sc, m in 0..63       144
  Q5_K  32   0..31      d*sc*c - dmin*m         sc, m in 0..63       176
  Q6_K  16   -32..31    d*sc*c                  sc in -128..127      210

The target of the fit is always our dequantized weight w = s*(q - z) (GPTQ's error-compensated or
QAT-refined values), never the FP weight. Where a sub-block's codes fit the type (affine types: our
b <= the type's bits; signed types: q - z inside its range) it starts from our (s, s*z) exactly, else
from its own range (as llama.cpp does without an importance matrix, with a small scale search). Then:
sc, m rounded under d = max/top; each nudged by -1/0/+1 where that lowers the sub-block's error; the
codes re-rounded to the nearest value of w; d, dmin refitted by least squares over the super-block and
kept where the error drops. Sub-block scales that are integer multiples of an fp16 d reproduce w exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .gguf import gguf_blocks, gguf_weight
from .packing import trivial_g_idx
from .qweight import QuantizedWeight

__all__ = ["GGUF_TYPES", "K_TYPES", "KType", "KFit", "SUPER", "gguf_export", "k_fit", "k_blocks", "k_weight"]

SUPER = 256  # weights per super-block (QK_K)


@dataclass(frozen=True)
class KType:
    """One K-quant type: sub-block size, code range [lo, hi], affine (has mins) or signed, the
    largest sub-block integer `top` (affine: sc, m in [0, top]; signed: sc in [-top-1, top])."""

    sub: int
    lo: int
    hi: int
    affine: bool
    top: int
    nbytes: int

    @property
    def nsub(self) -> int:
        return SUPER // self.sub


K_TYPES = {"Q2_K": KType(16, 0, 3, True, 15, 84), "Q3_K": KType(16, -4, 3, False, 31, 110),
           "Q4_K": KType(32, 0, 15, True, 63, 144), "Q5_K": KType(32, 0, 31, True, 63, 176),
           "Q6_K": KType(16, -32, 31, False, 127, 210)}


@dataclass(frozen=True)
class KFit:
    """Integers and fp16 scales of a fitted (out, n) weight; N = out * n / 256 super-blocks.

    codes (N, 256) int32 in [lo, hi]; sc, m (N, nsub) int32 (m all 0 for signed types);
    d, dmin (N,) float32 holding fp16 values (dmin all 0 for signed types)."""

    kind: str
    shape: tuple[int, int]
    codes: torch.Tensor
    sc: torch.Tensor
    m: torch.Tensor
    d: torch.Tensor
    dmin: torch.Tensor


def _fp16(x: torch.Tensor) -> torch.Tensor:
    h = x.to(torch.float16)
    if not torch.isfinite(h).all():
        raise ValueError("a super-block scale overflows fp16; GGUF cannot store this weight")
    return h.float()


def _dequant(t: KType, codes, sc, m, d, dmin) -> torch.Tensor:
    """(N, nsub, sub) weights in the readers' order of operations: (d*sc) * c - (dmin*m)."""
    w = (d[:, None] * sc.float())[..., None] * codes.float()
    return w - (dmin[:, None] * m.float())[..., None] if t.affine else w


def _round_codes(t: KType, w, step, offset) -> torch.Tensor:
    """(N, nsub, sub) nearest codes of w for sub-block steps d*sc (N, nsub) and offsets dmin*m."""
    safe = torch.where(step == 0, torch.ones_like(step), step)
    c = ((w + offset[..., None]) / safe[..., None]).round().clamp(t.lo, t.hi)
    return torch.where((step == 0)[..., None], torch.zeros_like(c) + max(t.lo, 0), c).to(torch.int32)


def _sse(t: KType, w, sc, m, d, dmin) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (N, nsub, sub), error (N, nsub)): the best codes for these integers and their squared error."""
    codes = _round_codes(t, w, d[:, None] * sc.float(), dmin[:, None] * m.float())
    return codes, (_dequant(t, codes, sc, m, d, dmin) - w).square().sum(-1)


def _from_range(t: KType, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous (a, b) per sub-block from its values alone, best of a few step sizes: w ~ a*c - b."""
    if t.affine:
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1)
        a, b = (hi - lo) / (t.hi - t.lo), -lo
    else:  # the value of largest magnitude lands on the most negative code, as llama.cpp does
        a, b = w.gather(-1, w.abs().argmax(-1, keepdim=True))[..., 0] / t.lo, torch.zeros_like(w[..., 0])
    best, err = a, torch.full_like(a, float("inf"))
    for f in (0.8, 0.85, 0.9, 0.95, 1.0, 1.05):
        step = a * f
        c = _round_codes(t, w, step, b)
        e = (step[..., None] * c - b[..., None] - w).square().sum(-1)
        best, err = torch.where(e < err, step, best), torch.minimum(e, err)
    return best, b


def _from_codes(t: KType, qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(a, b, fits) per sub-block (out, n/sub) from our groups: a = s, b = s*z where the codes fit."""
    out, n = qw.shape
    groups = qw.scale.shape[1]
    if not trivial_g_idx(qw.g_idx, groups) or (n // groups) % t.sub:
        return None
    rep = n // groups // t.sub
    s, z = qw.scale.float().repeat_interleave(rep, 1), qw.zero.float().repeat_interleave(rep, 1)
    if t.affine:
        fits = torch.full_like(s, qw.spec.maxq <= t.hi - t.lo, dtype=torch.bool)
    else:
        fits = (z <= -t.lo) & (qw.spec.maxq - z <= t.hi)
    return s, s * z, fits


def _start(t: KType, qw: QuantizedWeight, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous (a, b) (N, nsub): our scale and zero where they fit, the sub-block's range elsewhere."""
    a, b = _from_range(t, w)
    ours = _from_codes(t, qw)
    if ours is None:
        return a, b
    s, sz, fits = (x.reshape(a.shape) for x in ours)
    return torch.where(fits, s, a), torch.where(fits, sz, b)


def _quantize_scales(t: KType, a: torch.Tensor, b: torch.Tensor):
    """Integers (sc, m) (N, nsub) and fp16 (d, dmin) (N,) for continuous (a, b)."""
    if t.affine:
        d, dmin = _fp16(a.amax(-1) / t.top), _fp16(b.amax(-1) / t.top)
        lo = 0
    else:  # the largest |a| on -top-1: signed scales use their extra negative value
        d = _fp16(-a.gather(-1, a.abs().argmax(-1, keepdim=True))[:, 0] / (t.top + 1))
        dmin, lo = torch.zeros_like(d), -t.top - 1

    def ints(x, scale):
        q = (x / torch.where(scale == 0, torch.ones_like(scale), scale)[:, None]).round().clamp(lo, t.top)
        return torch.where((scale == 0)[:, None], torch.zeros_like(q), q).to(torch.int32)

    return ints(a, d), ints(b, dmin) if t.affine else torch.zeros_like(a, dtype=torch.int32), d, dmin


def _nudge(t: KType, w, sc, m, d, dmin):
    """Each sub-block's (sc, m) moved by -1/0/+1 where that lowers its error (codes re-rounded)."""
    lo = 0 if t.affine else -t.top - 1
    best_sc, best_m = sc, m
    _, best = _sse(t, w, sc, m, d, dmin)
    for ds in (-1, 0, 1):
        for dm in ((-1, 0, 1) if t.affine else (0,)):
            if ds == dm == 0:
                continue
            s2, m2 = (sc + ds).clamp(lo, t.top), (m + dm).clamp(0, t.top) if t.affine else m
            _, e = _sse(t, w, s2, m2, d, dmin)
            better = e < best
            best_sc, best_m, best = torch.where(better, s2, best_sc), torch.where(better, m2, best_m), torch.minimum(e, best)
    return best_sc, best_m


def _refit(t: KType, w, codes, sc, m, d, dmin):
    """Least-squares (d, dmin) per super-block for fixed integers, rounded to fp16."""
    x1 = (sc[..., None] * codes).float().flatten(1)  # (N, 256): w ~ d*x1 + dmin*x2
    y = w.flatten(1)
    if not t.affine:
        den = x1.square().sum(-1)
        return _fp16(torch.where(den > 0, (x1 * y).sum(-1) / den.clamp_min(1e-30), d)), dmin
    x2 = (-m[..., None]).expand_as(codes).float().flatten(1)
    a11, a12, a22 = x1.square().sum(-1), (x1 * x2).sum(-1), x2.square().sum(-1)
    r1, r2 = (x1 * y).sum(-1), (x2 * y).sum(-1)
    det = a11 * a22 - a12 * a12
    ok = det.abs() > 1e-12 * (a11 * a22).clamp_min(1e-30)
    safe = torch.where(ok, det, torch.ones_like(det))
    return (_fp16(torch.where(ok, (r1 * a22 - r2 * a12) / safe, d)),
            _fp16(torch.where(ok, (a11 * r2 - a12 * r1) / safe, dmin)))


def k_fit(qw: QuantizedWeight, kind: str, refine: bool = True) -> KFit:
    """Fit `qw` (its dequantized weight) into K-quant `kind`; the row length must be a multiple of 256.
    refine=False stops after rounding the integers (no nudge, no least-squares d): for comparison."""
    t = K_TYPES[kind]
    out, n = qw.shape
    if n % SUPER:
        raise ValueError(f"{kind}: a row must be whole super-blocks of {SUPER} weights; this layer has {n} inputs")
    w = qw.dequantize().reshape(-1, t.nsub, t.sub)  # (N, nsub, sub), super-blocks in row order
    sc, m, d, dmin = _quantize_scales(t, *_start(t, qw, w))
    if refine:
        sc, m = _nudge(t, w, sc, m, d, dmin)
        for _ in range(2):
            codes, err = _sse(t, w, sc, m, d, dmin)
            d2, dmin2 = _refit(t, w, codes, sc, m, d, dmin)
            _, err2 = _sse(t, w, sc, m, d2, dmin2)
            keep = err2.sum(-1) < err.sum(-1)
            d, dmin = torch.where(keep, d2, d), torch.where(keep, dmin2, dmin)
    codes, _ = _sse(t, w, sc, m, d, dmin)
    return KFit(kind, (out, n), codes.flatten(1), sc, m, d, dmin)


def k_weight(fit: KFit) -> torch.Tensor:
    """(out, n) fp32: what a GGUF reader dequantizes the fitted blocks to."""
    t = K_TYPES[fit.kind]
    w = _dequant(t, fit.codes.reshape(-1, t.nsub, t.sub), fit.sc, fit.m, fit.d, fit.dmin)
    return w.reshape(fit.shape)


# --------------------------------------------------------------------------------- byte layouts


def _u8(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.uint8)


def _half(x: torch.Tensor) -> torch.Tensor:
    """(N,) fp16-valued -> (N, 2) uint8 little-endian."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _crumbs(v: torch.Tensor, width: int, bits: int) -> torch.Tensor:
    """(N, k*width) small ints -> (N, width) uint8: byte b holds v[i*width + b] << (bits*i)."""
    parts = v.reshape(v.shape[0], -1, width).to(torch.int32)
    shifts = torch.arange(parts.shape[1], dtype=torch.int32)[None, :, None] * bits
    return _u8((parts << shifts).sum(1))


def _by_half(v: torch.Tensor, per_half: int, width: int, bits: int) -> torch.Tensor:
    """Each 128-weight half of a super-block packed by _crumbs into `per_half` bytes, halves concatenated."""
    return torch.cat([_crumbs(v[:, h * 128:(h + 1) * 128], width, bits) for h in range(2)], dim=1)


def _scales_k4(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: eight 6-bit (sc, m) pairs in 12 bytes (ggml's get_scale_min_k4 layout)."""
    lo_sc, hi_sc, lo_m, hi_m = sc[:, :4], sc[:, 4:], m[:, :4], m[:, 4:]
    return torch.cat([_u8(lo_sc | ((hi_sc >> 4) << 6)), _u8(lo_m | ((hi_m >> 4) << 6)),
                      _u8((hi_sc & 0xF) | ((hi_m & 0xF) << 4))], dim=1)


def _scales_q3(sc: torch.Tensor) -> torch.Tensor:
    """Q3_K: sixteen 6-bit scales + 32 in 12 bytes: low nibbles of j and j+8, then 2 high bits x 4."""
    v = sc + 32
    low = _u8((v[:, :8] & 0xF) | ((v[:, 8:] & 0xF) << 4))
    return torch.cat([low, _crumbs(v >> 4, 4, 2)], dim=1)


def _pack(fit: KFit) -> torch.Tensor:
    """(N, nbytes) uint8 super-blocks of `fit`, in ggml's field order."""
    c, sc, m = fit.codes, fit.sc, fit.m
    if fit.kind == "Q2_K":
        return torch.cat([_u8(sc | (m << 4)), _by_half(c, 32, 32, 2), _half(fit.d), _half(fit.dmin)], dim=1)
    if fit.kind == "Q3_K":
        u = c + 4  # 0..7: low two bits in qs, bit 2 in hmask
        return torch.cat([_crumbs(u >> 2, 32, 1), _by_half(u & 3, 32, 32, 2), _scales_q3(sc), _half(fit.d)], dim=1)
    if fit.kind == "Q4_K":
        return torch.cat([_half(fit.d), _half(fit.dmin), _scales_k4(sc, m), _q4_nibbles(c)], dim=1)
    if fit.kind == "Q5_K":
        return torch.cat([_half(fit.d), _half(fit.dmin), _scales_k4(sc, m), _crumbs(c >> 4, 32, 1),
                          _q4_nibbles(c & 0xF)], dim=1)
    u = c + 32  # Q6_K: 0..63, low nibbles by 64-weight pairs, high 2 bits by 32-weight quads
    return torch.cat([_by_half(u & 0xF, 64, 64, 4), _by_half(u >> 4, 32, 32, 2), _u8(sc.to(torch.int8).view(torch.uint8)),
                      _half(fit.d)], dim=1)


def _q4_nibbles(c: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K low nibbles: byte 32*i + b holds weight 64*i + b and, high nibble, 64*i + 32 + b."""
    parts = c.reshape(c.shape[0], 4, 2, 32).to(torch.int32)
    return _u8(parts[:, :, 0] | (parts[:, :, 1] << 4)).flatten(1)


def k_blocks(fit: KFit) -> torch.Tensor:
    """(out, n/256 * nbytes) uint8: the rows of `fit` as GGUF K-quant blocks."""
    rows = _pack(fit)
    if rows.shape[1] != K_TYPES[fit.kind].nbytes:
        raise AssertionError(f"{fit.kind}: {rows.shape[1]} bytes per super-block")
    return rows.reshape(fit.shape[0], -1)


GGUF_TYPES = ("exact", *K_TYPES)  # what `pack.gguf_type` may name


def gguf_export(qw: QuantizedWeight, kind: str = "exact") -> tuple[str, torch.Tensor, torch.Tensor]:
    """(GGUF type, (out, bytes) uint8 rows, (out, n) fp32 weight a reader gets back) for `qw`.

    "exact": the legacy type holding our codes (quantlib.gguf). A K type: fitted (k_fit) where the
    row is whole super-blocks; a row of another length keeps the exact legacy type, as llama.cpp's
    quantizer falls back for such tensors (SmolLM2's 576-wide inputs, for example)."""
    if kind not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {kind!r}; choose one of {', '.join(GGUF_TYPES)}")
    if kind == "exact" or qw.shape[1] % SUPER:
        legacy, rows = gguf_blocks(qw)
        return legacy, rows, gguf_weight(qw)
    fit = k_fit(qw, kind)
    return kind, k_blocks(fit), k_weight(fit)
