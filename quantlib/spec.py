"""Frozen, validated description of a weight quantization scheme."""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Union

__all__ = ["QuantSpec", "SpecMap", "parse_scheme", "spec_for"]


@dataclass(frozen=True)
class QuantSpec:
    """Uniform affine weight quantization: q = clamp(round(w / s) + z, 0, 2^bits - 1).

    group_size None means one (scale, zero) per output channel; otherwise one per group of
    `group_size` consecutive input columns.
    """

    bits: int = 4
    group_size: int | None = None
    sym: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in 2..8, got {self.bits!r}")
        if self.group_size is not None:
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size <= 0:
                raise ValueError(
                    f"group_size must be a positive integer (or None for per-channel), got {self.group_size!r}"
                )

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        """Number of quantization groups along the input dimension; checks divisibility."""
        if self.group_size is None:
            return 1
        if in_features % self.group_size:
            raise ValueError(
                f"group_size {self.group_size} does not divide in_features {in_features}; "
                f"use a divisor of {in_features} or per-channel quantization"
            )
        return in_features // self.group_size

    def group_width(self, in_features: int) -> int:
        return in_features if self.group_size is None else self.group_size

    def stored_bits(self, in_features: int, scale_bits: int = 16) -> float:
        """Stored bits per weight of an (out, in_features) Linear on this scheme: its code, plus one
        scale of `scale_bits` (and, asymmetric, one `bits`-bit zero) per group, as the GPTQ and
        compressed-tensors formats store them. W3 g64 asymmetric: 3 + (16 + 3) / 64 = 3.30."""
        return self.bits + (scale_bits + (0 if self.sym else self.bits)) / self.group_width(in_features)

    @property
    def name(self) -> str:
        """Short scheme name: w4pc, w3g64, w4g128s (s = symmetric)."""
        g = "pc" if self.group_size is None else f"g{self.group_size}"
        return f"w{self.bits}{g}{'s' if self.sym else ''}"


_SCHEME = re.compile(r"^w(\d+)(pc|g(\d+))(s?)$")


def parse_scheme(name: str) -> QuantSpec:
    """Parse a scheme name such as `w4pc`, `w3g64` or `w4g128s` into a QuantSpec."""
    m = _SCHEME.match(name.strip().lower())
    if not m:
        raise ValueError(f"unknown scheme {name!r}; expected names like w4pc, w3g64, w2g64 or w4g128s")
    group = None if m.group(2) == "pc" else int(m.group(3))
    return QuantSpec(bits=int(m.group(1)), group_size=group, sym=bool(m.group(4)))


@dataclass(frozen=True)
class SpecMap:
    """Mixed precision: one QuantSpec per Linear. `layers` holds (full module path, spec) pairs sorted
    by path (model.layers.3.mlp.down_proj); a Linear not listed gets `default`. Frozen and ordered,
    so it hashes and keys a cache like a QuantSpec does."""

    default: QuantSpec
    layers: tuple[tuple[str, QuantSpec], ...] = ()

    def __post_init__(self) -> None:
        paths = [p for p, _ in self.layers]
        if paths != sorted(set(paths)):
            raise ValueError("SpecMap.layers must be sorted by path with each path once")
        if not all(isinstance(s, QuantSpec) for _, s in self.layers) or not isinstance(self.default, QuantSpec):
            raise ValueError("SpecMap holds QuantSpecs only")

    def __getitem__(self, path: str) -> QuantSpec:
        return self._index.get(path, self.default)

    @cached_property
    def _index(self) -> dict[str, QuantSpec]:  # built once: lookups stay O(1) on models of thousands of Linears
        return dict(self.layers)


Spec = Union[QuantSpec, SpecMap]


def spec_for(spec: Spec, path: str) -> QuantSpec:
    """The scheme of the Linear at `path` (a QuantSpec applies to every Linear)."""
    return spec[path] if isinstance(spec, SpecMap) else spec
