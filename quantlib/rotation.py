"""Rotation (QuaRot): orthogonal changes of basis folded into the weights, so activations lose their
outlier channels while the FP function stays the same.

Three rotations, all orthogonal (Q Q^T = I), none of which changes the FP model's outputs:
  residual  the residual stream x -> x Q (d x d). Every RMSNorm's scale is first folded into the
            Linears it feeds (the final norm into the LM head), so the norms become plain
            x / rms(x), which commutes with Q. Then readers of the stream (q/k/v, gate/up, the head)
            get W Q, writers (embeddings E Q; o_proj and down_proj Q^T W, bias Q^T b).
  heads     each attention head's values v_h -> v_h H (d_h x d_h): v_proj's rows of head h get
            H^T W_h, o_proj's columns of head h get W H; attention mixes tokens, not channels, so
            the product is unchanged (with grouped-query attention too).
  online    (mode `full`) down_proj's input x -> x H (intermediate size) at run time, a forward
            pre-hook (`OnlineRotation`), and W_down -> W_down H. Its input is the SiLU(gate) * up
            product, which no offline weight can rotate.

A rotation of size n = p m (p the largest power of two dividing n) is (R ⊗ H_p) with random signs:
H_p the normalized Walsh-Hadamard matrix (applied online in O(n log p) by `fwht`), R a random m x m
orthogonal matrix mixing the m Hadamard blocks (m = 1 for a power of two), the signs a random
diagonal on the input side. `rotate_model` returns the `Rotation` record a release needs to rebuild
the online rotation exactly (its signs and R), without any random generator.

Only RMSNorm decoders whose norms feed nothing but Linears are supported (`ROTATABLE`): LayerNorm's
mean subtraction and Gemma's norms after the sublayers do not commute with a rotation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from .adapters import ModelAdapter, UnsupportedModelError, get_adapter
from .head import untie_head

__all__ = ["ROTATION_MODES", "ROTATABLE", "Rotation", "OnlineRotation", "hadamard", "fwht", "orthogonal", "rotate_model",
           "attach_online", "check_rotatable"]

ROTATION_MODES = ("residual", "full")
ROTATABLE = ("llama", "mistral", "qwen2", "qwen3")


def hadamard(p: int) -> torch.Tensor:
    """(p, p) normalized Walsh-Hadamard matrix (Sylvester), p a power of two; symmetric and orthogonal."""
    if p < 1 or p & (p - 1):
        raise ValueError(f"a Walsh-Hadamard matrix needs a power of two, got {p}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(p)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """x (..., p) @ hadamard(p) without forming the matrix: log2(p) butterfly steps, O(p log p)."""
    p = x.shape[-1]
    if p & (p - 1):
        raise ValueError(f"fwht needs a last dimension that is a power of two, got {p}")
    lead = x.shape[:-1]
    y = x.reshape(-1, p)
    h = 1
    while h < p:
        y = y.view(-1, p // (2 * h), 2, h)  # pairs (a, b) h apart -> (a + b, a - b)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), 2)
        h *= 2
    return (y.reshape(*lead, p) / math.sqrt(p)).to(x.dtype)


def _split(n: int) -> tuple[int, int]:
    """n = m p with p the largest power of two dividing n."""
    p = n & -n
    return n // p, p


@dataclass(frozen=True)
class Rotation:
    """One orthogonal n x n rotation: x -> ((x * signs) viewed (m, p)) mixed by R across the m blocks
    and by H_p within each, i.e. x @ diag(signs) (R ⊗ H_p). signs: n values in {-1, 1}; mix: R, m x m
    (row-major, float64 values as JSON keeps them)."""

    signs: tuple[int, ...]
    mix: tuple[tuple[float, ...], ...]

    @property
    def size(self) -> int:
        return len(self.signs)

    @cached_property
    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(signs (n,), R (m, m)) as float64 tensors, built once: apply runs on every forward."""
        return torch.tensor(self.signs, dtype=torch.float64), torch.tensor(self.mix, dtype=torch.float64)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., n) -> x Q, computed in float32 (float64 stays float64), returned in x's dtype."""
        m, p = _split(self.size)
        work = x.dtype if x.dtype == torch.float64 else torch.float32
        signs, mix = (t.to(device=x.device, dtype=work) for t in self._factors)
        y = fwht((x.to(work) * signs).reshape(*x.shape[:-1], m, p))
        if m > 1:  # (..., m, p): mix the blocks, out block j = sum_i R[i, j] block i
            y = torch.einsum("...ip,ij->...jp", y, mix)
        return y.reshape(x.shape).to(x.dtype)

    def matrix(self) -> torch.Tensor:
        """(n, n) float64 Q with apply(x) == x @ Q."""
        return self.apply(torch.eye(self.size, dtype=torch.float64))

    def to_dict(self) -> dict:
        return {"signs": list(self.signs), "mix": [list(r) for r in self.mix]}

    @classmethod
    def from_dict(cls, d: dict) -> "Rotation":
        signs = tuple(int(s) for s in d["signs"])
        mix = tuple(tuple(float(v) for v in r) for r in d["mix"])
        m, _ = _split(len(signs))
        if set(signs) - {-1, 1} or len(mix) != m or any(len(r) != m for r in mix):
            raise ValueError(f"malformed rotation record: {len(signs)} signs, mix {len(mix)} rows (expected {m} x {m})")
        return cls(signs, mix)


def orthogonal(n: int, generator: torch.Generator) -> Rotation:
    """A random rotation of size n (random signs; R from the QR of a Gaussian, columns sign-fixed)."""
    m, _ = _split(n)
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64) * 2 - 1
    q, r = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None, :]  # a Haar-distributed orthogonal matrix
    return Rotation(tuple(signs.tolist()), tuple(tuple(row) for row in q.tolist()))


class OnlineRotation:
    """Forward pre-hook: the module's input x -> rotation.apply(x). Picklable; stateless."""

    def __init__(self, rotation: Rotation) -> None:
        self.rotation = rotation

    def __call__(self, _module: nn.Module, args: tuple):
        return (self.rotation.apply(args[0]), *args[1:])


def check_rotatable(adapter: ModelAdapter) -> None:
    """Fail before any work on a family whose norms do not commute with a rotation."""
    if adapter.family.name not in ROTATABLE:
        raise UnsupportedModelError(
            f"rotation supports {', '.join(ROTATABLE)} (RMSNorm decoders whose norms feed only Linears); "
            f"{adapter.family.name!r} has LayerNorms, norms after its sublayers or a router on a norm; "
            "quantize it without rotation (SmoothQuant: --smooth) instead")


@torch.no_grad()
def _fold_norm(adapter: ModelAdapter, norm: nn.Module, readers: list[nn.Module]) -> None:
    """RMSNorm scale g into the Linears it feeds (W[:, c] *= off + g_c); the norm's scale becomes 1."""
    off = adapter.family.norm_offset
    g = off + norm.weight.double()
    for m in readers:
        adapter.set_weight(m, adapter.get_weight(m).double() * g[None, :])
    norm.weight.copy_(torch.full_like(norm.weight, 1.0 - off))


def _left(adapter: ModelAdapter, m: nn.Module, q: torch.Tensor) -> None:
    """A residual writer: W -> Q^T W, b -> Q^T b (its output y -> y Q)."""
    adapter.set_weight(m, q.T @ adapter.get_weight(m).double())
    if getattr(m, "bias", None) is not None:
        m.bias.copy_((m.bias.double() @ q).to(m.bias.dtype))


def _right(adapter: ModelAdapter, m: nn.Module, q: torch.Tensor) -> None:
    """A residual reader: W -> W Q (it now expects the input x Q)."""
    adapter.set_weight(m, adapter.get_weight(m).double() @ q)


@torch.no_grad()
def _rotate_heads(adapter: ModelAdapter, attn: nn.Module, h: torch.Tensor) -> None:
    """v_h -> v_h H for every value head: v_proj rows of a head get H^T W_h (bias likewise), o_proj
    columns of every query head get W H (a query head reads its kv head's rotated values)."""
    geo = adapter.geometry
    v, o = attn.v_proj, attn.o_proj
    wv = adapter.get_weight(v).double().view(geo.num_kv_heads, geo.head_dim, -1)  # (kv, d_h, d)
    adapter.set_weight(v, torch.einsum("ab,kbd->kad", h.T, wv).reshape(-1, wv.shape[-1]))
    if v.bias is not None:
        v.bias.copy_((v.bias.double().view(geo.num_kv_heads, geo.head_dim) @ h).reshape(-1).to(v.bias.dtype))
    wo = adapter.get_weight(o).double().view(-1, geo.num_heads, geo.head_dim)  # (d, heads, d_h)
    adapter.set_weight(o, (wo @ h).reshape(wo.shape[0], -1))


@torch.no_grad()
def rotate_model(adapter: ModelAdapter, mode: str = "full", seed: int = 0) -> dict:
    """Rotate adapter.model in place (float64 arithmetic, written back in the weights' dtype); the
    LM head is untied from the embeddings first. Returns the record a release keeps:
    {"mode", "seed", "online": {module suffix: Rotation.to_dict()}} (online is empty for `residual`)."""
    if mode not in ROTATION_MODES:
        raise ValueError(f"unknown rotation mode {mode!r}; expected one of {', '.join(ROTATION_MODES)}")
    check_rotatable(adapter)
    model, fam, geo = adapter.model, adapter.family, adapter.geometry
    gen = torch.Generator().manual_seed(seed)
    q = orthogonal(geo.hidden_size, gen).matrix()
    h = orthogonal(geo.head_dim, gen).matrix()
    online = orthogonal(adapter.blocks[0].mlp.down_proj.in_features, gen) if mode == "full" else None
    online_q = None if online is None else online.matrix()
    untie_head(model, adapter.head.weight.detach().clone())
    _fold_norm(adapter, adapter.norm, [adapter.head])
    _right(adapter, adapter.head, q)
    emb = adapter.embed.weight
    emb.copy_((emb.double() @ q).to(emb.dtype))
    for block in adapter.blocks:
        groups = adapter.groups(block)
        for norm, g in fam.norms:
            _fold_norm(adapter, block.get_submodule(norm), [block.get_submodule(n) for n in groups[g]])
        for g in (0, 2):
            for n in groups[g]:
                _right(adapter, block.get_submodule(n), q)
        _rotate_heads(adapter, block.self_attn, h)
        for n in (*groups[1], *groups[3]):
            _left(adapter, block.get_submodule(n), q)
        if online_q is not None:
            down = block.mlp.down_proj
            adapter.set_weight(down, adapter.get_weight(down).double() @ online_q)
    record = {"mode": mode, "seed": seed, "online": {} if online is None else {"mlp.down_proj": online.to_dict()}}
    _attach(adapter, record)
    return record


def attach_online(model: nn.Module, record: dict | None) -> int:
    """Re-attach a rotated release's online rotations (`rotate_model`'s record) to a loaded model whose
    weights already hold them; returns how many modules got one."""
    if not record or not record.get("online"):
        return 0
    return _attach(get_adapter(model), record)


def _attach(adapter: ModelAdapter, record: dict) -> int:
    count = 0
    for suffix, d in record["online"].items():
        rot = Rotation.from_dict(d)
        for block in adapter.blocks:
            block.get_submodule(suffix).register_forward_pre_hook(OnlineRotation(rot))
            count += 1
    return count

