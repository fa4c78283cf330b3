"""Packed-weight matmul kernels: Triton kernels (gptq_triton, int8_triton), the checked custom ops
(ops) and the plain-torch references (reference). Importing this package does not import Triton."""
from .ops import check_gptq_args, check_int8_args, gptq_matmul, int8_scaled_mm, triton_available
from .reference import dequantize_gptq, gptq_matmul_reference, int8_scaled_mm_reference

__all__ = ["check_gptq_args", "check_int8_args", "gptq_matmul", "int8_scaled_mm", "triton_available",
           "dequantize_gptq", "gptq_matmul_reference", "int8_scaled_mm_reference"]
