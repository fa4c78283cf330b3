"""`quantlib::gptq_matmul`: the checked entry point of the Triton kernels, as a torch custom op.

The op has a fake (meta) implementation so torch.compile and export can trace through it. Triton is
imported at the first launch, not at import, so this module loads where Triton is absent.
"""
from __future__ import annotations

import torch

from ..packing import SUPPORTED_BITS, packed_words

__all__ = ["gptq_matmul", "check_gptq_args", "triton_available"]

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
