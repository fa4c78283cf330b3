"""Triton kernel: BoA's row sweep down one column of every head in one launch.

BoA quantizes a head's (rows, n) block under a Kronecker Hessian H_row (x) H_col: columns are swept
as in GPTQ and, inside each column, the rows are swept with the row factor U_row (quantlib.boa
`_row_sweep`, the torch reference). In torch that is about five small ops per row per column
(64 rows x 576 columns per matrix for a 135M model), which a GPU spends on kernel launches. Here
one program per head keeps the column in registers and runs the whole row loop, so a column costs
one launch:

    for r in 0..rows-1:                      # per head h, col/s/z/inv: (rows,)
        t   = clamp(round(col[r] / s[r]), -z[r], maxq - z[r])     # the code minus its zero
        e   = (col[r] - s[r] * t) * inv[r]                          # inv = 1 / diag(U_row)
        col[r+1:] -= e * U_row[h, r, r+1:]
    codes = clamp(round(col / s) + z, 0, maxq);  d = (col - s * (codes - z)) * inv

Rounding is half to even (torch.round) through the 1.5 * 2^23 trick and division is correctly
rounded (div_rn), so under TRITON_INTERPRET=1 the kernel reproduces the torch reference to the bit
(tested); compiled, the GPU may contract a * b + c into one fma and differ in the last bit. Only
core builtins and this module's own jit helpers are used (see gptq_triton's docstring), so it
interprets correctly when this module is imported with TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRET", "row_sweep"]

INTERPRET: bool = bool(triton.knobs.runtime.interpret)
_RNE = 12582912.0  # 1.5 * 2^23: (x + c) - c rounds |x| < 2^22 to the nearest even integer in fp32


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _pick(v, offs, r):
    """v[r] of a register vector, as a scalar (a masked sum: exact, one term is non-zero)."""
    return tl.reduce(tl.where(offs == r, v, 0.0), 0, _add)


@triton.jit
def _row_sweep_kernel(col_ptr, s_ptr, z_ptr, inv_ptr, u_ptr, codes_ptr, d_ptr, rows, maxq,
                      ROWS: tl.constexpr):
    h = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, ROWS)
    mask = offs < rows
    base = h * rows
    col = tl.load(col_ptr + base + offs, mask=mask, other=0.0)  # (ROWS,) fp32
    s = tl.load(s_ptr + base + offs, mask=mask, other=1.0)
    z = tl.load(z_ptr + base + offs, mask=mask, other=0.0)
    inv = tl.load(inv_ptr + base + offs, mask=mask, other=0.0)
    u_base = u_ptr + h * rows * rows
    for r in range(0, rows):
        x, sr, zr, ir = _pick(col, offs, r), _pick(s, offs, r), _pick(z, offs, r), _pick(inv, offs, r)
        t = (tl.math.div_rn(x, sr) + _RNE) - _RNE
        t = tl.minimum(tl.maximum(t, -zr), maxq - zr)
        e = (x - sr * t) * ir
        u = tl.load(u_base + r * rows + offs, mask=mask & (offs > r), other=0.0)  # U_row[h, r, :], zero up to r
        col = col - e * u
    q = (tl.math.div_rn(col, s) + _RNE) - _RNE
    codes = tl.minimum(tl.maximum(q + z, 0.0), maxq)
    d = (col - s * (codes - z)) * inv
    tl.store(codes_ptr + base + offs, codes, mask=mask)
    tl.store(d_ptr + base + offs, d, mask=mask)
    tl.store(col_ptr + base + offs, col, mask=mask)


def row_sweep(col: torch.Tensor, s: torch.Tensor, z: torch.Tensor, u_row: torch.Tensor,
              maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quantlib.boa._row_sweep in one launch. col, s, z: (heads, rows) float32, col updated in place;
    u_row: (heads, rows, rows) upper-triangular row factor. Returns (codes, d), each (heads, rows)."""
    heads, rows = col.shape
    if not (col.dtype == s.dtype == z.dtype == u_row.dtype == torch.float32):
        raise TypeError(f"row_sweep computes in float32, got {col.dtype}, {s.dtype}, {z.dtype}, {u_row.dtype}")
    if s.shape != col.shape or z.shape != col.shape or u_row.shape != (heads, rows, rows):
        raise ValueError(f"row_sweep: col {tuple(col.shape)}, s {tuple(s.shape)}, z {tuple(z.shape)}, "
                         f"u_row {tuple(u_row.shape)} do not describe (heads, rows) columns")
    if not col.is_contiguous():
        raise ValueError("row_sweep updates col in place: pass a contiguous tensor")
    s, z, u_row = s.contiguous(), z.contiguous(), u_row.contiguous()
    inv = (1 / u_row.diagonal(dim1=-2, dim2=-1)).contiguous()
    codes, d = torch.empty_like(col), torch.empty_like(col)
    _row_sweep_kernel[(heads,)](col, s, z, inv, u_row, codes, d, rows, float(maxq),
                                ROWS=triton.next_power_of_2(rows))
    return codes, d
