"""Packed-weight matmul kernels: Triton kernels (gptq_triton), the checked custom op (ops) and the
plain-torch reference (reference). Importing this package does not import Triton."""
from .ops import check_gptq_args, gptq_matmul, triton_available
from .reference import dequantize_gptq, gptq_matmul_reference

__all__ = ["check_gptq_args", "gptq_matmul", "triton_available", "dequantize_gptq", "gptq_matmul_reference"]
