"""quantlib: pure numerical library for post-training weight quantization (torch + triton)."""
__version__ = "0.1.0"
