"""Triton kernels: fused unpack + dequantize + matmul on PackFormat.GPTQ buffers.

y (M, N) = x (M, K) @ W^T with W[n, k] = scales[g(k), n] * (q[k, n] - z[g(k), n]) read from the
packed int32 words tile by tile; W is never materialized.

Two launch shapes of one kernel body:
- GEMM (prefill, M > 16): (BLOCK_M x BLOCK_N) output tiles, grouped launch order for L2 reuse.
- GEMV (decode, M <= 16): BLOCK_M = 16 (the smallest tl.dot tile), few output columns per program
  and split-K (SPLIT_K programs per column tile add fp32 partials atomically) so that the many SMs
  share the weight stream, which is what bounds a decode step.

Whether a kernel is compiled or interpreted is fixed when it is decorated: `triton.jit` reads
TRITON_INTERPRET then, i.e. when this module is imported (`quantlib.kernels.ops` imports it lazily,
at the first launch). Triton's own library functions (tl.zeros, tl.cdiv, tl.sum, ...) are @jit too
and were decorated when triton itself was imported, possibly before TRITON_INTERPRET was set; the
kernels therefore use only core builtins (tl.full, plain integer arithmetic), so that they interpret
correctly whenever this module was imported with TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRET", "launch_gemm", "launch_gemv", "GEMV_MAX_M"]

INTERPRET: bool = bool(triton.knobs.runtime.interpret)  # decided at import, see the module docstring
GEMV_MAX_M = 16


def _gemm_configs() -> list[triton.Config]:
    if INTERPRET:  # the interpreter runs one config (autotuning more fails there)
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1, "GROUP_M": 8})]
    shapes = [(64, 64, 64, 4, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3),
              (128, 256, 64, 8, 3), (64, 256, 32, 4, 4), (128, 128, 128, 8, 2), (32, 64, 128, 4, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": 1, "GROUP_M": 8},
                          num_warps=w, num_stages=s) for m, n, k, w, s in shapes]


def _gemv_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2, "GROUP_M": 1})]
    out = []
    for n, k, split, w in [(32, 128, 4, 4), (64, 128, 4, 4), (64, 256, 2, 4), (128, 128, 2, 4),
                           (64, 64, 8, 4), (32, 256, 8, 4), (128, 256, 1, 8), (64, 128, 1, 4),
                           (32, 128, 16, 4), (128, 64, 4, 4)]:
        for s in (2, 4):
            out.append(triton.Config({"BLOCK_M": 16, "BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": split, "GROUP_M": 1},
                                     num_warps=w, num_stages=s))
    return out


@triton.jit
def _bits_at(ptrs, next_word, off, mask, BITS: tl.constexpr):
    """BITS-bit codes starting at bit `off` of the int32 words at `ptrs`; a 3-bit code whose
    bits run past bit 31 continues in the low bits of the word `next_word` elements further."""
    lo = tl.load(ptrs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    v = lo >> off  # logical shift: unsigned
    if BITS == 3:  # only 3-bit codes straddle words (off 30 and 31)
        spill = off > 29
        hi = tl.load(ptrs + next_word, mask=mask & spill, other=0).to(tl.uint32, bitcast=True)
        v = v | (hi << tl.where(spill, 32 - off, 0))  # hi is 0 where nothing spills
    return (v & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _dequant_tile(qw_ptr, qz_ptr, s_ptr, gidx_ptr, k0, offs_k, offs_n, mask_k, mask_n, N, NW,
                  BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_K, BLOCK_N) fp32 dequantized tile of W^T for rows offs_k and columns offs_n."""
    kbit = (offs_k * BITS).to(tl.uint32)  # (BK,) bit position in each column's stream
    mask = mask_k[:, None] & mask_n[None, :]
    q = _bits_at(qw_ptr + (kbit // 32)[:, None] * N + offs_n[None, :], N, (kbit % 32)[:, None], mask, BITS)
    nbit = (offs_n * BITS).to(tl.uint32)  # (BN,) bit position in each group's zero stream
    zword, zoff = nbit // 32, nbit % 32
    if GROUP_SIZE > 0 and GROUP_SIZE % BLOCK_K == 0:
        g = k0 // GROUP_SIZE  # one group per K step: one row of scales and zeros
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        z = _bits_at(qz_ptr + g * NW + zword, 1, zoff, mask_n, BITS)[None, :]
    else:
        if GROUP_SIZE > 0:
            g = offs_k // GROUP_SIZE
        else:  # arbitrary g_idx (act-order without static groups)
            g = tl.load(gidx_ptr + offs_k, mask=mask_k, other=0)
        s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        z = _bits_at(qz_ptr + g[:, None] * NW + zword[None, :], 1, zoff[None, :], mask, BITS)
    return (q - z).to(tl.float32) * s


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program in grouped order: GROUP_M row tiles sweep the column
    tiles together, so a column tile of W is reused from L2 by GROUP_M row tiles."""
    pid = tl.program_id(0)
    tiles_m, tiles_n = (M + BLOCK_M - 1) // BLOCK_M, (N + BLOCK_N - 1) // BLOCK_N
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    size_m = min(tiles_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m


@triton.jit
def _gptq_matmul_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, gidx_ptr, y_ptr,
    M, N, K, NW, stride_xm, stride_ym, M_BUCKET,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BM, BK)
        w = _dequant_tile(qw_ptr, qz_ptr, s_ptr, gidx_ptr, k0, offs_k, offs_n, mask_k, mask_n, N, NW,
                          BITS, GROUP_SIZE, BLOCK_K)  # (BK, BN) fp32
        # W is rounded once to the activation dtype, as in the reference
        if DOT_FP32:  # fp32 activations, or bf16 under the interpreter (its bf16 tl.dot is wrong)
            acc += tl.dot(x.to(tl.float32), w.to(x.dtype).to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:  # y is an fp32 buffer of zeros
        tl.atomic_add(y_ptrs, acc, mask=mask)


_KEY = ["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE"]
_gemm = triton.autotune(configs=_gemm_configs(), key=_KEY)(_gptq_matmul_kernel)
_gemv = triton.autotune(configs=_gemv_configs(), key=_KEY, reset_to_zero=["y_ptr"])(_gptq_matmul_kernel)


def _dot_fp32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


def _launch(kernel, y: torch.Tensor, x, qweight, qzeros, scales, g_idx, bits: int, group_size: int) -> None:
    (m, k), n = x.shape, scales.shape[1]

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    kernel[grid](x, qweight, qzeros, scales, g_idx, y, m, n, k, qzeros.shape[1], x.stride(0), y.stride(0),
                 triton.next_power_of_2(m), BITS=bits, GROUP_SIZE=group_size, DOT_FP32=_dot_fp32(x.dtype))


def launch_gemm(x, qweight, qzeros, scales, g_idx, bits: int, group_size: int) -> torch.Tensor:
    """Tiled path; arguments already checked by `quantlib.kernels.ops`."""
    y = torch.empty(x.shape[0], scales.shape[1], dtype=x.dtype, device=x.device)
    _launch(_gemm, y, x, qweight, qzeros, scales, g_idx, bits, group_size)
    return y


def launch_gemv(x, qweight, qzeros, scales, g_idx, bits: int, group_size: int) -> torch.Tensor:
    """Split-K path for M <= GEMV_MAX_M; partials are added in an fp32 buffer, then cast."""
    y = torch.zeros(x.shape[0], scales.shape[1], dtype=torch.float32, device=x.device)
    _launch(_gemv, y, x, qweight, qzeros, scales, g_idx, bits, group_size)
    return y.to(x.dtype)
