"""`quantlib::gptq_matmul` and `quantlib::int8_scaled_mm`: the checked entry points of the Triton
kernels, as torch custom ops.

Each op has a fake (meta) implementation so torch.compile and export can trace through it. Triton is
imported at the first launch, not at import, so this module loads where Triton is absent.
"""
from __future__ import annotations

import torch

from ..packing import SUPPORTED_BITS, packed_words

__all__ = ["gptq_matmul", "check_gptq_args", "int8_scaled_mm", "check_int8_args", "triton_available",
           "INT8_MAX_K"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check_gptq_args(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    g_idx: torch.Tensor, bits: int, group_size: int) -> None:
    """Raise ValueError/TypeError unless the arguments form one valid packed GPTQ matmul.

    x (M, K) fp16/bf16/fp32; qweight int32 (ceil(K*bits/32), N); qzeros int32 (G, ceil(N*bits/32));
    scales floating (G, N); g_idx int32 (K,). group_size > 0 promises g_idx[k] == k // group_size
    (the kernels then ignore g_idx); 0 means read g_idx.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if x.dim() != 2 or x.dtype not in _DTYPES:
        raise TypeError(f"x must be a 2-D fp16/bf16/fp32 tensor, got {x.dtype} {tuple(x.shape)}")
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("g_idx", g_idx)):
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
    if not scales.is_floating_point() or scales.dim() != 2:
        raise TypeError(f"scales must be a 2-D floating tensor, got {scales.dtype} {tuple(scales.shape)}")
    k, (groups, n) = x.shape[1], scales.shape
    expected = {"qweight": (packed_words(k, bits), n), "qzeros": (groups, packed_words(n, bits)), "g_idx": (k,)}
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("g_idx", g_idx)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]} for K={k}, N={n}, {bits} bits; "
                             f"got {tuple(t.shape)}")
    if group_size < 0 or (group_size and (k % group_size or k // group_size != groups)):
        raise ValueError(f"group_size {group_size} does not give {groups} groups of K={k} (0 = read g_idx)")
    devices = {t.device for t in (x, qweight, qzeros, scales, g_idx)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


@torch.library.custom_op("quantlib::gptq_matmul", mutates_args=())
def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """(M, K) @ dequantized W^T -> (M, N) in x.dtype through the Triton kernels (GEMV-shaped for
    M <= 16, tiled GEMM above). CUDA tensors, or CPU tensors with TRITON_INTERPRET=1."""
    check_gptq_args(x, qweight, qzeros, scales, g_idx, bits, group_size)
    from . import gptq_triton as kt

    if x.device.type == "cpu" and not kt.INTERPRET:
        raise RuntimeError("Triton kernels need CUDA tensors; to run them on CPU set TRITON_INTERPRET=1 "
                           "before quantlib.kernels.gptq_triton is first imported")
    args = (x.contiguous(), qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), g_idx.contiguous())
    launch = kt.launch_gemv if x.shape[0] <= kt.GEMV_MAX_M else kt.launch_gemm
    return launch(*args, bits, group_size)


@gptq_matmul.register_fake
def _(x, qweight, qzeros, scales, g_idx, bits, group_size):
    check_gptq_args(x, qweight, qzeros, scales, g_idx, bits, group_size)
    return x.new_empty(x.shape[0], scales.shape[1])


# int32 accumulation is exact while K * 128 * 128 < 2^31
INT8_MAX_K = 2**17 - 1


def check_int8_args(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype) -> None:
    """Raise ValueError/TypeError unless the arguments form one valid W8A8 scaled matmul:
    a int8 (M, K), b int8 (N, K), scale_a fp32 (M,), scale_b fp32 (N,), bias floating (N,) or None."""
    for name, t in (("a", a), ("b", b)):
        if t.dtype != torch.int8 or t.dim() != 2:
            raise TypeError(f"{name} must be a 2-D int8 tensor, got {t.dtype} {tuple(t.shape)}")
    (m, k), n = a.shape, b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must share K (b is (N, K), the weight's layout)")
    if k > INT8_MAX_K:
        raise ValueError(f"K={k} exceeds {INT8_MAX_K}: the int32 accumulator could overflow")
    for name, t, size in (("scale_a", scale_a, m), ("scale_b", scale_b, n)):
        if t.dtype != torch.float32 or tuple(t.shape) != (size,):
            raise TypeError(f"{name} must be fp32 of shape ({size},), got {t.dtype} {tuple(t.shape)}")
    if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (n,)):
        raise TypeError(f"bias must be floating of shape ({n},), got {bias.dtype} {tuple(bias.shape)}")
    if out_dtype not in _DTYPES:
        raise TypeError(f"out_dtype must be fp16, bf16 or fp32, got {out_dtype}")
    devices = {t.device for t in (a, b, scale_a, scale_b, *(() if bias is None else (bias,)))}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


@torch.library.custom_op("quantlib::int8_scaled_mm", mutates_args=())
def int8_scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                   bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """(a (M, K) @ b (N, K)^T) * scale_a[:, None] * scale_b[None, :] + bias -> (M, N) out_dtype, int8
    operands accumulated in int32 by the Triton kernel. CUDA tensors, or CPU with TRITON_INTERPRET=1."""
    check_int8_args(a, b, scale_a, scale_b, bias, out_dtype)
    from . import int8_triton as kt

    if a.device.type == "cpu" and not kt.INTERPRET:
        raise RuntimeError("Triton kernels need CUDA tensors; to run them on CPU set TRITON_INTERPRET=1 "
                           "before quantlib.kernels.int8_triton is first imported")
    return kt.launch_int8_mm(a.contiguous(), b.contiguous(), scale_a.contiguous(), scale_b.contiguous(),
                             None if bias is None else bias.contiguous(), out_dtype)


@int8_scaled_mm.register_fake
def _(a, b, scale_a, scale_b, bias, out_dtype):
    check_int8_args(a, b, scale_a, scale_b, bias, out_dtype)
    return a.new_empty(a.shape[0], b.shape[0], dtype=out_dtype)
