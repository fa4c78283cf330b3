"""BoA's Triton row sweep (quantlib.kernels.boa_triton) against the torch loop it replaces on CUDA
(quantlib.boa._row_sweep), interpreted without a GPU: codes to the bit, residuals and the updated
column to float rounding; and kron_gptq through the kernel against kron_gptq through the loop."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from interpreted import interpreted  # noqa: E402
from quantlib import boa  # noqa: E402
from quantlib.boa import BoAConfig, kron_gptq  # noqa: E402
from quantlib.spec import QuantSpec  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(scope="module")
def kernel():
    yield from interpreted("quantlib.kernels.boa_triton")


def _u_row(heads: int, rows: int, g: torch.Generator) -> torch.Tensor:
    """The upper inverse-Cholesky factor of a random SPD row Hessian per head, as kron_gptq makes it."""
    x = torch.randn(heads, 4 * rows, rows, generator=g)
    h = x.transpose(1, 2) @ x + 0.1 * torch.eye(rows)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def _close(a, b):
    """The torch loop's addcmul_ may run as one fma on this CPU, the kernel's update as a multiply and a
    subtraction (interpreted) or an fma (compiled): the floats agree to rounding, the codes exactly."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("heads,rows,bits", [(1, 8, 2), (4, 64, 3), (5, 20, 4), (3, 33, 8)])
def test_row_sweep_kernel_is_the_torch_loop(kernel, heads, rows, bits):
    """Rows not a power of two (masked lanes), one and many heads, 2- to 8-bit grids with clamping:
    a wrong lane mask, a half-away-from-zero rounding, or an update reaching rows <= r shows here."""
    g = torch.Generator().manual_seed(rows)
    maxq = 2 ** bits - 1
    s = torch.rand(heads, rows, generator=g) * 0.5 + 0.05
    z = torch.randint(0, maxq + 1, (heads, rows), generator=g).float()
    col = s * (torch.randn(heads, rows, generator=g) * maxq / 2 + maxq / 2 - z)  # about the grid, some beyond
    u = _u_row(heads, rows, g)
    ref_col = col.clone()
    ref = boa._row_sweep(ref_col, s, z, u, [u[:, r, r + 1:] for r in range(rows)], maxq)
    got_col = col.to(DEVICE)
    got = kernel.row_sweep(got_col, s.to(DEVICE), z.to(DEVICE), u.to(DEVICE), maxq)
    assert torch.equal(got[0].cpu(), ref[0])
    _close(got[1].cpu(), ref[1])
    _close(got_col.cpu(), ref_col)
    assert 0 < int((ref[0] == 0).sum() + (ref[0] == maxq).sum()) < ref[0].numel()  # some codes clamp, not all


def test_kron_gptq_through_the_kernel_is_kron_gptq_through_the_loop(kernel, monkeypatch):
    """The whole Kronecker GPTQ (act-order rows, groups, lazy blocks) with the kernel forced in."""
    g = torch.Generator().manual_seed(0)
    heads, rows, n = 2, 8, 64
    w = torch.randn(heads, rows, n, generator=g)
    x = torch.randn(256, n, generator=g)
    h_col = (x.T @ x)[None]
    h_row = torch.stack([a.T @ a for a in torch.randn(heads, 48, rows, generator=g)])
    spec = QuantSpec(3, 32)
    ref = kron_gptq(w, h_row, h_col, spec, BoAConfig(block_size=32))
    monkeypatch.setattr(boa, "_row_kernel", lambda col: True)
    got = kron_gptq(w.to(DEVICE), h_row.to(DEVICE), h_col.to(DEVICE), spec, BoAConfig(block_size=32))
    assert torch.equal(got[0].cpu(), ref[0])  # the codes
    for a, b in zip(got[1:], ref[1:]):  # scale, zero
        assert torch.equal(a.cpu(), b)
