"""The result of quantizing one Linear: integer codes + per-group scales and zeros + group index."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .primitives import dequantize, expand
from .spec import QuantSpec

__all__ = ["QuantizedWeight", "bits_per_weight"]


@dataclass(frozen=True)
class QuantizedWeight:
    """Dense weight w[o, j] = scale[o, g_idx[j]] * (qweight[o, j] - zero[o, g_idx[j]]).

    qweight: (out, in) uint8 codes in [0, 2^bits - 1]
    scale:   (out, G) float32
    zero:    (out, G) float32, integer-valued
    g_idx:   (in,) int32 group of each input column (j // group_size unless reordered)
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    spec: QuantSpec
    # (out, in) continuous weights the codes were rounded from (GPTQ's error-updated weights), kept
    # in memory for learned rounding to start from; never serialized
    latent: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        out, n = self.qweight.shape
        if self.scale.shape != self.zero.shape or self.scale.shape[0] != out:
            raise ValueError(f"scale {tuple(self.scale.shape)} / zero {tuple(self.zero.shape)} do not match qweight {(out, n)}")
        if self.g_idx.shape != (n,):
            raise ValueError(f"g_idx must have shape ({n},), got {tuple(self.g_idx.shape)}")
        if not (torch.isfinite(self.scale).all() and torch.isfinite(self.zero).all()):
            raise ValueError("scale/zero hold NaN or Inf (non-finite calibration activations or a solver blow-up); "
                             "a release never carries them: check the calibration data and the method's settings")
        if int(self.qweight.max()) > self.spec.maxq:
            raise ValueError(f"codes exceed {self.spec.bits}-bit range")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense (out, in) weight."""
        n = self.qweight.shape[1]
        s = expand(self.scale.float(), n, self.g_idx)
        z = expand(self.zero.float(), n, self.g_idx)
        return dequantize(self.qweight, s, z).to(dtype)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors; the spec travels as tensors too so a file is self-describing."""
        return {
            f"{prefix}.qweight": self.qweight.contiguous(),
            f"{prefix}.scale": self.scale.float().contiguous(),
            f"{prefix}.zero": self.zero.float().contiguous(),
            f"{prefix}.g_idx": self.g_idx.to(torch.int32).contiguous(),
            f"{prefix}.spec": torch.tensor(
                [self.spec.bits, self.spec.group_size or 0, int(self.spec.sym)], dtype=torch.int32
            ),
        }

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], prefix: str) -> "QuantizedWeight":
        bits, group, sym = (int(v) for v in tensors[f"{prefix}.spec"])
        return cls(
            qweight=tensors[f"{prefix}.qweight"],
            scale=tensors[f"{prefix}.scale"],
            zero=tensors[f"{prefix}.zero"],
            g_idx=tensors[f"{prefix}.g_idx"],
            spec=QuantSpec(bits=bits, group_size=group or None, sym=bool(sym)),
        )


def bits_per_weight(results: dict[str, QuantizedWeight], scale_bits: int = 16) -> float:
    """Effective storage bits per quantized weight over all of `results` (QuantSpec.stored_bits of
    each, weighted by its size). Unquantized tensors and g_idx are not counted."""
    if not results:
        raise ValueError("bits_per_weight needs at least one quantized weight")
    weights = sum(qw.qweight.numel() for qw in results.values())
    return sum(qw.spec.stored_bits(qw.shape[1], scale_bits) * qw.qweight.numel() for qw in results.values()) / weights
