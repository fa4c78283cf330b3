"""Triton kernel: W8A8 integer GEMM with a scaled epilogue, what vLLM's int8 path computes.

y (M, N) = (a (M, K) int8 @ b (N, K)^T int8) * scale_a[m] * scale_b[n] (+ bias[n]), the products
accumulated in int32 (exact: |a b| <= 128^2 and K < 2^17 keep every partial sum in range), the
epilogue in fp32, rounded once to the output dtype. a is the per-token quantized activation
(quantlib.actquant.quantize_tokens), b the per-channel symmetric weight codes.

As in gptq_triton, TRITON_INTERPRET is read when this module is imported, and the kernel uses only
core builtins and gptq_triton's jit helpers (its tile order) so that it interprets correctly (see
gptq_triton's docstring): the two modules must be imported in the same mode.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gptq_triton import _tile_ids

__all__ = ["INTERPRET", "launch_int8_mm"]

INTERPRET: bool = bool(triton.knobs.runtime.interpret)


def _configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8})]
    # int8 tl.dot wants K tiles of >= 32; BLOCK_M 16/32 serve decode-sized M
    shapes = [(16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (64, 64, 64, 4, 4),
              (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
              (256, 128, 64, 8, 3), (128, 128, 128, 8, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


@triton.jit
def _int8_mm_kernel(
    a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, y_ptr,
    M, N, K, stride_am, stride_bn, stride_ym, M_BUCKET,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # int64 offsets: M x N (a long prefill through a large-vocabulary head) or N x K can pass 2^31
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0)  # (BM, BK) int8
        b = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0)  # (BK, BN) int8: W^T's tile
        acc += tl.dot(a, b, out_dtype=tl.int32)
    sa = tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)  # (BM,) fp32
    sb = tl.load(sb_ptr + offs_n, mask=mask_n, other=0.0)  # (BN,) fp32
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


_int8_mm = triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "HAS_BIAS"])(_int8_mm_kernel)


def launch_int8_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                   bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Arguments already checked by `quantlib.kernels.ops.int8_scaled_mm` (contiguous, one device)."""
    (m, k), n = a.shape, b.shape[0]
    # the interpreter truncates fp32 -> bf16 instead of rounding to nearest: store fp32, round in torch
    store = torch.float32 if INTERPRET and out_dtype == torch.bfloat16 else out_dtype
    y = torch.empty(m, n, dtype=store, device=a.device)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _int8_mm[grid](a, b, scale_a, scale_b, scale_b if bias is None else bias, y, m, n, k, a.stride(0), b.stride(0),
                   y.stride(0), triton.next_power_of_2(m), HAS_BIAS=bias is not None)
    return y.to(out_dtype)
