"""BoA (Kim et al. 2024, "Attention-aware post-training quantization without backpropagation").

GPTQ with attention-aware Hessians for W_Q, W_K and W_V; W_O and the MLP keep plain GPTQ.
Math is kept apart from the driver: `rope_weighted_sum` and `kron_gptq` are pure functions of
tensors; `AttentionStats` accumulates calibration statistics; `solve_attention` is the engine's
group hook (one forward pass over the block's inputs, then the solves).

Derivation (one head; x_t (d,) the attention input at position t, i.e. after the input norm;
W (d_h, d) the head's rows of a projection, D = W_hat - W its error; M[t, s] = 1 where query t
attends key s: causal, sliding window, whatever mask the model passes).

RoPE. HF rotates q = c_t * p + s_t * rotate_half(p) with p = W x_t, i.e. p -> R_t p with
R_t = diag(c_t) + diag(s_t) J (J the rotate_half matrix) for any cos/sin table (scaled variants
included). The rotation acts *after* the projection, so the weight rows live in the unrotated frame.

W_Q (query head h of kv head g = h // r, r = heads per kv head): the logits change by
    dz[t, s] = (R_t D x_t)^T k_s,   k_s the post-RoPE key of kv head g, so
    sum_{t,s} M[t,s] dz[t,s]^2 = sum_t x_t^T D^T B_t D x_t,   B_t = R_t^T (sum_s M[t,s] k_s k_s^T) R_t
                               = vec(D)^T [sum_t B_t (x) x_t x_t^T] vec(D)      (vec row-major).
  BoA's Kronecker relaxation takes B_t independent of x_t: sum_t B_t (x) x_t x_t^T
  ~ mean_t(B_t) (x) sum_t x_t x_t^T, so
    H_row = sum_{t,s} M[t,s] R_t^T k_s k_s^T R_t / #pairs,   H_col = 2 X X^T / N.
  Each key is conjugated by the rotation of the *query* that reads it (R_t^T k_s = R_{s-t} k~_s for
  standard RoPE: the key as seen from the query's frame). The plain post-RoPE key covariance would
  be H_row in the wrong coordinates; the reference implementation averages R_t^T Cov(k) R_t over t,
  which is this formula with the mask dropped. Every query head of a kv group gets its kv head's H_row.
W_K (kv head g): its rows move the logits of all r query heads of the group:
    dz_h[t, s] = q_{h,t}^T R_s D x_s  ->  H_row = sum_{h in g} sum_{t,s} M[t,s] R_s^T q_{h,t} q_{h,t}^T R_s,
  the query covariance summed over the group (the mean of the paper differs by the factor r, to which
  every step below is invariant), conjugated by the key's own rotation.
W_V (kv head g): head outputs are o_h = A_h X W^T (A_h the causal attention probabilities), so
    sum_{h in g} ||A_h X D^T||^2 = tr(D [sum_{h in g} (A_h X)^T (A_h X)] D^T):
    H_col = 2/N X^T (sum_{h in g} A_h^T A_h) X per kv head, H_row = I (W_O not folded in).
  The softmax Jacobian is dropped for Q/K (a relaxation), and Q/K/V statistics come from the FP
  attention of this block on the quantized prefix's inputs.

Q/K norms (Qwen3, Gemma3: a per-head RMSNorm between projection and RoPE). q_t = R_t N(p_t) with
N(p) = g o p / rho(p), rho(p) = sqrt(mean(p^2) + eps), g the gain. Linearized at the FP point,
dN = (g / rho_t) o (I - p^ p^^T) dp with p^ = p / |p|; the projector only removes the radial
direction (one of d_h; a norm is blind to it), which is dropped, so dq_t = R_t G D (x_t / rho_t),
G = diag(g). The gain goes into the rows, H_row = G H_row G (the moments are of the model's
normalized q and k), and the per-token, per-head 1/rho_t into the columns:
H_col = 2/N sum_t x_t x_t^T / rho_{h,t}^2, one per head, since rho belongs to the token
(a token with a huge x also has a huge rho, and the norm cancels both).
Partial rotary (cos, sin narrower than d_h): R_t acts on the first d_r dimensions and is the
identity on the rest, i.e. cos padded with 1, sin with 0, J the rotate_half of d_r (zero elsewhere).
Fused projections (Phi-3 qkv_proj, GPT-2 c_attn): one Linear whose output rows are [Q | K | V]; each
part is solved with its own Hessians and the codes are concatenated back.

Fast RoPE sums: with R_a = C_a + S_a J and G symmetric,
    R_a^T G R_a = G o c c^T + (G o c s^T) J + [(G o c s^T) J]^T + J^T (G o s s^T) J,
so sum_{a,b} w[a,b] R_a^T G_b R_a needs only the per-position second moments G_b and the tables
P_b = sum_a w[a,b] u_a v_a^T for (u, v) in (c, c), (c, s), (s, s): no T x T loop per head.

Solver (`kron_gptq`). With H = H_row (x) H_col and elements ordered column-major (column j, then
row i), H^-1 = H_col^-1 (x) H_row^-1 has upper Cholesky factor U = U_col (x) U_row, so GPTQ on the
full (d_h d)^2 Hessian factorizes: in column j the rows are swept with U_row (error of row i,
d_i = (w - q) / U_row[i,i], moves rows k > i by d_i U_row[i,k]), then the column's error
f = U_row^T d / U_col[j,j] moves every later column l by f U_col[j,l], exactly GPTQ's column update
(and its lazy block batching) with f in place of the rounding error. All heads run in parallel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .adapters import AttentionGeometry, ModelAdapter, UnsupportedModelError
from .capture import BlockCall, run_with_hooks
from .gptq import GPTQConfig, accumulate_hessian, block_end, damped_inverse_cholesky
from .primitives import qparams_from_range
from .qweight import QuantizedWeight
from .spec import QuantSpec

__all__ = [
    "BoAConfig",
    "AttentionLayout",
    "AttentionHessians",
    "AttentionStats",
    "HeadNorm",
    "attention_layout",
    "rotate_half_matrix",
    "rope_weighted_sum",
    "kron_gptq",
    "kron_error",
    "collect_attention_stats",
    "solve_attention",
]


@dataclass(frozen=True)
class BoAConfig:
    """block_size, damp, act_order, max_damp_tries: as GPTQConfig, for both Kronecker factors
    (damp is relative to each factor's mean diagonal); act_order_rows: also sweep each head's rows
    of W_Q/W_K by decreasing diag(H_row); clip_search: per (row, group) clipping ratio from a grid
    of clip_grid ratios in [1 - clip_max_shrink, 1] minimizing the H_col-weighted error
    d^T H_col[g, g] d; gptq_clip_search: GPTQConfig.clip_search for W_O and the MLP."""

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    act_order_rows: bool = True
    clip_search: bool = True
    clip_grid: int = 100
    clip_max_shrink: float = 0.8
    gptq_clip_search: bool = False
    max_damp_tries: int = 6

    def __post_init__(self) -> None:
        self.gptq()  # block_size and damp are validated by the GPTQ config they feed
        if self.clip_grid <= 0:
            raise ValueError(f"clip_grid must be positive, got {self.clip_grid}")
        if not 0 <= self.clip_max_shrink < 1:
            raise ValueError(f"clip_max_shrink must be in [0, 1), got {self.clip_max_shrink}")

    def gptq(self) -> GPTQConfig:
        """The plain-GPTQ config used for W_O and the MLP."""
        return GPTQConfig(self.block_size, self.damp, self.act_order, self.gptq_clip_search, self.max_damp_tries)


# ----------------------------------------------------------------------------------------- math


def rotate_half_matrix(d: int, dtype: torch.dtype = torch.float32, device=None, rotary: int | None = None) -> torch.Tensor:
    """J (d, d) with J @ p == rotate_half(p) = cat(-p[d/2:], p[:d/2]); with `rotary` = d_r < d, the
    rotate_half of the first d_r dimensions and zero on the rest (partial rotary)."""
    j = torch.zeros(d, d, dtype=dtype, device=device)
    half = (rotary or d) // 2
    eye = torch.eye(half, dtype=dtype, device=device)
    j[:half, half : 2 * half] = -eye
    j[half : 2 * half, :half] = eye
    return j


def rope_weighted_sum(
    moments: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary: int | None = None
) -> torch.Tensor:
    """sum_{a,b} weight[a, b] R_a^T moments[:, b] R_a with R_a = diag(cos[a]) + diag(sin[a]) J.

    moments: (G, T, d, d) symmetric per-position second moments; weight: (T, T), a indexes the
    rotation's position, b the moment's; cos, sin: (T, d); rotary: J's width d_r (partial rotary,
    cos/sin padded with 1/0 beyond it). Returns (G, d, d)."""
    t, d = cos.shape
    w = weight.to(moments.dtype).t()

    def table(u, v):  # (T, d, d): P_b = sum_a weight[a, b] u_a v_a^T
        return (w @ (u[:, :, None] * v[:, None, :]).reshape(t, d * d)).view(t, d, d)

    def fold(p):  # sum_b moments[:, b] o P_b
        return torch.einsum("gbij,bij->gij", moments, p)

    out = fold(table(cos, cos))
    if bool(sin.any()):
        j = rotate_half_matrix(d, moments.dtype, moments.device, rotary)
        cross = fold(table(cos, sin)) @ j
        out = out + cross + cross.transpose(-1, -2) + j.t() @ fold(table(sin, sin)) @ j
    return out


def _block_diagonal(h: torch.Tensor, g: int) -> torch.Tensor:
    """(H, n, n) -> (H, n/g, g, g) diagonal blocks."""
    n = h.shape[-1]
    return torch.stack([h[:, k : k + g, k : k + g] for k in range(0, n, g)], dim=1)


def _qparams(w: torch.Tensor, h_col: torch.Tensor | None, spec: QuantSpec, cfg: BoAConfig):
    """(scale, zero), each (heads, rows, G), for w (heads, rows, n): min-max, or the clipping ratio
    minimizing d^T H_col[g, g] d per (row, group) when cfg.clip_search and h_col (Hc, n, n) is given."""
    heads, rows, n = w.shape
    g = spec.group_width(n)
    wg = w.reshape(heads, rows, n // g, g)
    lo, hi = wg.amin(-1), wg.amax(-1)
    best_s, best_z = qparams_from_range(lo, hi, spec)
    if not cfg.clip_search or h_col is None:
        return best_s, best_z
    hb = _block_diagonal(h_col, g)  # (Hc, G, g, g)
    best = torch.full_like(lo, float("inf"))
    for i in range(cfg.clip_grid):
        p = 1.0 - cfg.clip_max_shrink * i / cfg.clip_grid
        s, z = qparams_from_range(p * lo, p * hi, spec)
        q = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, spec.maxq)
        d = s[..., None] * (q - z[..., None]) - wg  # (heads, rows, G, g)
        err = (torch.einsum("hrgi,hgij->hrgj", d, hb) * d).sum(-1)
        better = err < best
        best = torch.where(better, err, best)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


def _inverse_cholesky(h: torch.Tensor, cfg: BoAConfig) -> torch.Tensor:
    """(H, m, m) -> upper Cholesky factors of the damped inverses, per head."""
    return torch.stack([damped_inverse_cholesky(x, cfg.damp, cfg.max_damp_tries) for x in h])


def _gather_cols(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (heads, rows, n), idx (Hc, n) with Hc in {1, heads}: x[h, :, idx[h]]."""
    return x.gather(2, idx[:, None, :].expand(x.shape[0], x.shape[1], -1))


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (heads, rows, m), idx (heads, rows): x[h, idx[h], :]."""
    return x.gather(1, idx[:, :, None].expand(-1, -1, x.shape[2]))


def _permute_square(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """h (H, m, m), idx (H, m): h[k][idx[k]][:, idx[k]]."""
    h = h.gather(1, idx[:, :, None].expand(-1, -1, h.shape[2]))
    return h.gather(2, idx[:, None, :].expand(-1, h.shape[1], -1))


def kron_gptq(
    w: torch.Tensor, h_row: torch.Tensor | None, h_col: torch.Tensor, spec: QuantSpec, cfg: BoAConfig = BoAConfig()
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of per-head weight blocks under Kronecker Hessians H_row[h] (x) H_col[h].

    w: (heads, rows, n) one block of rows per head (a head's rows of W_Q, W_K or W_V);
    h_row: (heads, rows, rows), or None for the identity (rows independent, as in GPTQ);
    h_col: (Hc, n, n) with Hc = 1 (shared by all heads) or heads. Groups run along the n input
    columns. Returns codes (heads, rows, n) and scale, zero (heads, rows, G), all in the natural
    order (act-order groups are static). Computes in float32, or float64 if w is float64; no
    argument is modified."""
    dtype = torch.promote_types(w.dtype, torch.float32)
    w = w.to(dtype).clone()
    h_col = h_col.to(dtype).clone()
    heads, rows, n = w.shape
    gw = spec.group_width(n)
    spec.groups(n)
    if h_col.shape[0] not in (1, heads) or h_col.shape[1:] != (n, n):
        raise ValueError(f"h_col must be (1 or {heads}, {n}, {n}), got {tuple(h_col.shape)}")
    if h_row is not None and h_row.shape != (heads, rows, rows):
        raise ValueError(f"h_row must be ({heads}, {rows}, {rows}), got {tuple(h_row.shape)}")
    diag = h_col.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0  # (Hc, n) columns never excited by calibration data
    diag[dead] = 1
    w.masked_fill_(dead[:, None, :], 0)

    static = cfg.act_order or spec.group_size is None
    scale, zero = _qparams(w, h_col, spec, cfg)
    col_perm = (
        torch.argsort(h_col.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True)
        if cfg.act_order else torch.arange(n, device=w.device).expand(h_col.shape[0], n)
    )
    w, h_col = _gather_cols(w, col_perm), _permute_square(h_col, col_perm)
    u_row = row_perm = None
    if h_row is not None:
        h_row = h_row.to(dtype)
        row_perm = (
            torch.argsort(h_row.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True)
            if cfg.act_order_rows else torch.arange(rows, device=w.device).expand(heads, rows)
        )
        w, scale, zero = _gather_rows(w, row_perm), _gather_rows(scale, row_perm), _gather_rows(zero, row_perm)
        u_row = _inverse_cholesky(_permute_square(h_row, row_perm), cfg)
    u_col = _inverse_cholesky(h_col, cfg)
    q = _kron_sweep(w, u_row, u_col, scale, zero, col_perm // gw, h_col, spec, cfg, static)
    q = _gather_cols(q, torch.argsort(col_perm, dim=-1))
    if row_perm is not None:
        inv = torch.argsort(row_perm, dim=-1)
        q, scale, zero = _gather_rows(q, inv), _gather_rows(scale, inv), _gather_rows(zero, inv)
    return q, scale, zero


def _kron_sweep(w, u_row, u_col, scale, zero, groups, h_col, spec, cfg, static):
    """Column sweep in lazy blocks of cfg.block_size, rows swept inside each column with u_row.

    w: (heads, rows, n) permuted weight, updated in place; u_row: (heads, rows, rows) or None;
    u_col: (Hc, n, n); groups: (Hc, n) group of each permuted column; scale, zero: (heads, rows, G),
    filled per group from the updated weight when not static. Returns codes in permuted order."""
    heads, rows, n = w.shape
    gw = spec.group_width(n)
    one = QuantSpec(bits=spec.bits, group_size=None, sym=spec.sym)
    q = torch.zeros_like(w)
    s_cols, z_cols = _gather_cols(scale, groups), _gather_cols(zero, groups)  # (heads, rows, n)
    u_diag = u_col.diagonal(dim1=-2, dim2=-1)  # (Hc, n)
    u_rows = None if u_row is None else [u_row[:, r, r + 1 :] for r in range(rows)]
    i1 = 0
    while i1 < n:
        i2 = block_end(i1, n, cfg.block_size, gw, static)
        w1 = w[..., i1:i2].clone()
        f1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            j = i1 + i
            if not static and j % gw == 0:
                cols = torch.cat([w1[..., i:], w[..., i2:]], dim=-1)[..., :gw]
                sg, zg = _qparams(cols, h_col[:, j : j + gw, j : j + gw], one, cfg)
                scale[..., j // gw], zero[..., j // gw] = sg[..., 0], zg[..., 0]
                s_cols[..., j : j + gw], z_cols[..., j : j + gw] = sg, zg
            s, z = s_cols[..., j], z_cols[..., j]
            if u_row is None:
                col = w1[..., i]
                qc = torch.clamp(torch.round(col / s) + z, 0, spec.maxq)
                f = (col - s * (qc - z)) / u_diag[:, j, None]
            else:
                qc, d = _sweep_rows(w1[..., i].contiguous(), s, z, u_row, u_rows, spec.maxq)
                f = (u_row * d[..., None]).sum(1) / u_diag[:, j, None]  # U_row^T d
            q[..., j] = qc
            w1[..., i + 1 :] -= f[..., None] * u_col[:, None, j, j + 1 : i2]
            f1[..., i] = f
        w[..., i2:] -= f1 @ u_col[:, i1:i2, i2:]
        i1 = i2
    return q


def _row_kernel(col: torch.Tensor) -> bool:
    """The Triton row sweep (quantlib.kernels.boa_triton: one launch per column instead of ~5 per row)
    on CUDA float32; the torch loop elsewhere."""
    return col.is_cuda and col.dtype == torch.float32


def _sweep_rows(col, s, z, u_row, u_rows, maxq):
    if _row_kernel(col):
        from .kernels.boa_triton import row_sweep

        return row_sweep(col, s, z, u_row, maxq)
    return _row_sweep(col, s, z, u_row, u_rows, maxq)


def _row_sweep(col, s, z, u_row, u_rows, maxq):
    """GPTQ down one column across the rows of each head. col, s, z: (heads, rows), col updated in
    place; u_rows[r] = u_row[:, r, r+1:]. Returns codes and d = (w - q) / U_row[i, i] per row.

    Each row's value is final when it is rounded (updates only reach later rows), so the loop
    carries only what the next rows need and the codes are recomputed from `col` afterwards."""
    s_t = s.t().contiguous()  # (rows, heads): row r is one contiguous vector
    lo, hi = (-z).t().contiguous(), (maxq - z).t().contiguous()
    inv_u = (1 / u_row.diagonal(dim1=-2, dim2=-1)).t().contiguous()
    for r, u in enumerate(u_rows):
        x = col[:, r]
        t = torch.clamp(torch.round(x / s_t[r]), lo[r], hi[r])  # q - z, as the recomputation below rounds
        e = (x - s_t[r] * t) * inv_u[r]
        col[:, r + 1 :].addcmul_(e[:, None], u, value=-1)
    codes = torch.clamp(torch.round(col / s) + z, 0, maxq)
    d = (col - s * (codes - z)) * inv_u.t()
    return codes, d


def kron_error(w: torch.Tensor, w_hat: torch.Tensor, h_row: torch.Tensor | None, h_col: torch.Tensor) -> float:
    """sum_h tr(H_row D H_col D^T) / sum_h tr(H_row W H_col W^T), D = W - W_hat, per-head blocks
    (heads, rows, n); what kron_gptq minimizes (h_row None: identity)."""

    def quad(x):
        x = x.to(h_col.dtype)
        inner = (x @ h_col) @ x.transpose(-1, -2)  # (heads, rows, rows)
        return (inner * h_row).sum() if h_row is not None else inner.diagonal(dim1=-2, dim2=-1).sum()

    return float(quad(w - w_hat) / quad(w).clamp_min(1e-30))


# --------------------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class AttentionLayout:
    """Paths inside one block: the attention module, its q/k/v projections and output projection.

    fused: q, k and v name one Linear whose output rows are [Q (heads d_h) | K (kv d_h) | V (kv d_h)]
    (Phi-3 qkv_proj, GPT-2 c_attn); norm_offset: a q_norm/k_norm gain is offset + weight (Gemma)."""

    module: str
    q: str
    k: str
    v: str
    out: str | None
    fused: bool = False
    norm_offset: float = 0.0

    @property
    def names(self) -> tuple[str, ...]:
        """The distinct Linears BoA solves."""
        return (self.q,) if self.fused else (self.q, self.k, self.v)


def attention_layout(adapter: ModelAdapter) -> AttentionLayout:
    """The family's first group: separate q/k/v Linears (in that order) or one fused qkv Linear,
    under one attention module whose output projection is the second group."""
    fam, geo = adapter.family, adapter.geometry
    first = fam.groups[0]
    if len(first) != (1 if geo.fused_qkv else 3):
        raise UnsupportedModelError(
            f"BoA needs the attention's q/k/v projection(s) as the first group of {fam.name}, got {', '.join(first)}"
        )
    q, k, v = first * 3 if geo.fused_qkv else first
    module = q.rpartition(".")[0]
    if not (k.startswith(module + ".") and v.startswith(module + ".")):
        raise UnsupportedModelError(f"BoA: {q}, {k}, {v} do not share one attention module")
    out = fam.groups[1][0] if len(fam.groups) > 1 and fam.groups[1][0].startswith(module + ".") else None
    return AttentionLayout(module, q, k, v, out, geo.fused_qkv, fam.norm_offset)


@dataclass(frozen=True)
class AttentionHessians:
    """col: (d, d) 2XX^T/N; row_q: (heads, d_h, d_h); row_k: (kv_heads, d_h, d_h); col_q: (1 or heads,
    d, d) and col_k: (1 or kv_heads, d, d), the column Hessians of W_Q / W_K rows (col itself without
    a q/k norm, else per head with the tokens weighted by 1/rho^2); col_v: (kv_heads, d, d)
    attention-weighted input Hessian per kv head."""

    col: torch.Tensor
    row_q: torch.Tensor
    row_k: torch.Tensor
    col_v: torch.Tensor
    col_q: torch.Tensor
    col_k: torch.Tensor


def _allowed(mask: torch.Tensor | None, t: int, device) -> torch.Tensor:
    """(T, T) bool, True where query t may attend key s. None means causal (how SDPA models skip it);
    bool masks mark allowed pairs, float masks are additive (0 allowed, -inf or finfo.min masked)."""
    if mask is None:
        return torch.ones(t, t, dtype=torch.bool, device=device).tril()
    if not isinstance(mask, torch.Tensor):
        raise UnsupportedModelError(
            f"BoA reads the attention mask as a tensor (eager/SDPA attention), got {type(mask).__name__}"
        )
    m = mask[..., -t:, -t:]
    m = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    m = m.reshape(-1, t, t)
    if not bool((m == m[:1]).all()):
        raise ValueError("BoA needs one attention mask for every calibration sequence (no padding)")
    return m[0]


def _rotate(p: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary: int) -> torch.Tensor:
    """HF RoPE on the first `rotary` dims of p (b, heads, T, d_h); cos, sin (T, d_h) padded with 1, 0."""
    half = rotary // 2
    rot = torch.cat([-p[..., half:rotary], p[..., :half], torch.zeros_like(p[..., rotary:])], dim=-1)
    return p * cos + rot * sin


def _scaled_gram(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """x (N, d), c (N, H) -> (H, d, d) sum_n c[n, h]^2 x_n x_n^T, one head at a time (memory N d)."""
    return torch.stack([(x * c[:, h, None]).t() @ (x * c[:, h, None]) for h in range(c.shape[1])])


class AttentionStats:
    """Running sums for one attention layer's BoA Hessians; fed one batch at a time by `observe`.

    Memory: two (kv_heads, T, d_h, d_h) per-position moment sums (the mask and RoPE are folded in
    once, in `hessians`), one (kv_heads, d, d) value Hessian, with q/k norms (heads + kv_heads, d, d)
    column sums, and per batch one kv group's (b, r, T, T) attention probabilities at a time.
    gain_q, gain_k: (d_h,) gains of per-head q/k norms, (heads, d_h) / (kv, d_h) of full-width ones
    (OLMoE), or None without one."""

    def __init__(self, geometry: AttentionGeometry, gain_q: torch.Tensor | None = None,
                 gain_k: torch.Tensor | None = None) -> None:
        self.geo = geometry
        self.gain_q, self.gain_k = gain_q, gain_k
        self.h_col: torch.Tensor | None = None
        self.count = 0
        self.key_moments: torch.Tensor | float = 0.0  # (kv, T, d_h, d_h) sum over sequences of k_s k_s^T
        self.query_moments: torch.Tensor | float = 0.0  # (kv, T, d_h, d_h) same for q_t, summed over the group
        self.value_sum: torch.Tensor | float = 0.0  # (kv, d, d) sum of X^T (sum_h A_h^T A_h) X
        self.col_q: torch.Tensor | float = 0.0  # (heads, d, d) sum of x x^T / rho_q^2, with a q norm
        self.col_k: torch.Tensor | float = 0.0  # (kv, d, d) same for the keys
        self.sequences = 0
        self.allowed: torch.Tensor | None = None
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None
        self.rotary = geometry.head_dim

    def observe(self, x, q, k, v, cos, sin, allowed, scaling: float, softcap: float | None,
                inv_q: torch.Tensor | None = None, inv_k: torch.Tensor | None = None) -> torch.Tensor:
        """x (b, T, d) attention input; q (b, T, heads d_h), k, v (b, T, kv d_h) projections (with
        bias and q/k norm, before RoPE); cos, sin (T, d_r), d_r <= d_h, or None (no RoPE); allowed
        (T, T); inv_q (b, T, heads), inv_k (b, T, kv) the norms' 1/rho per token, or None. Returns
        the attention output this reconstruction implies, (b, T, heads d_h), for a consistency check."""
        geo = self.geo
        b, t, d = x.shape
        kv, hd = geo.num_kv_heads, geo.head_dim
        r = geo.num_heads // kv
        x = x.float()
        q = q.float().view(b, t, geo.num_heads, hd).transpose(1, 2)  # (b, heads, T, d_h)
        k = k.float().view(b, t, kv, hd).transpose(1, 2)  # (b, kv, T, d_h)
        v = v.float().view(b, t, kv, hd).transpose(1, 2)
        rotary = hd if cos is None else cos.shape[-1]
        pad = lambda table, fill: torch.cat([table.float(), table.new_full((t, hd - rotary), fill)], -1)  # noqa: E731
        cos, sin = (torch.ones(t, hd, device=x.device), torch.zeros(t, hd, device=x.device)) if cos is None \
            else (pad(cos, 1.0), pad(sin, 0.0))
        q, k = _rotate(q, cos, sin, rotary), _rotate(k, cos, sin, rotary)
        if self.allowed is None:
            self.allowed, self.cos, self.sin, self.rotary = allowed, cos, sin, rotary
        self.h_col, self.count = accumulate_hessian(self.h_col, self.count, x)
        flat = x.reshape(b * t, d)
        if inv_q is not None:
            self.col_q = self.col_q + _scaled_gram(flat, inv_q.float().reshape(b * t, -1))
        if inv_k is not None:
            self.col_k = self.col_k + _scaled_gram(flat, inv_k.float().reshape(b * t, -1))
        qg = q.view(b, kv, r, t, hd)
        self.key_moments = self.key_moments + torch.einsum("bgsi,bgsj->gsij", k, k)
        self.query_moments = self.query_moments + torch.einsum("bgrti,bgrtj->gtij", qg, qg)
        out = torch.empty(b, kv, r, t, hd, dtype=x.dtype, device=x.device)
        value = torch.empty(kv, d, d, dtype=x.dtype, device=x.device)
        for g in range(kv):  # one kv group at a time bounds memory at (b, r, T, T)
            logits = (qg[:, g] @ k[:, g, None].transpose(-1, -2)) * scaling
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            a = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)  # (b, r, T, T)
            out[:, g] = a @ v[:, g, None]
            ata = (a.transpose(-1, -2) @ a).sum(1)  # (b, T, T): sum_h A_h^T A_h, cheaper than A_h X when T < d
            value[g] = flat.t() @ (ata @ x).reshape(b * t, d)
        self.value_sum = self.value_sum + value
        self.sequences += b
        return out.view(b, geo.num_heads, t, hd).transpose(1, 2).reshape(b, t, geo.num_heads * hd)

    def hessians(self) -> AttentionHessians:
        if self.h_col is None:
            raise RuntimeError("no calibration batch reached the attention layer")
        m = self.allowed.float()
        pairs = float(m.sum()) * self.sequences
        r = self.geo.num_heads // self.geo.num_kv_heads
        # Q rows: rotation of the query position a = t, moments of the keys b = s: weight M[t, s]
        row_q = rope_weighted_sum(self.key_moments, m, self.cos, self.sin, self.rotary) / pairs
        # K rows: rotation of the key position a = s, moments of the queries b = t: weight M[t, s]^T
        row_k = rope_weighted_sum(self.query_moments, m.t(), self.cos, self.sin, self.rotary) / pairs
        col = lambda acc: self.h_col[None] if isinstance(acc, float) else _sym(2 * acc / self.count)  # noqa: E731
        return AttentionHessians(
            col=self.h_col,
            row_q=_sym(_gained(row_q.repeat_interleave(r, dim=0), self.gain_q)),
            row_k=_sym(_gained(row_k, self.gain_k)),
            col_v=_sym(2 * self.value_sum / self.count),
            col_q=col(self.col_q),
            col_k=col(self.col_k),
        )


def _sym(h: torch.Tensor) -> torch.Tensor:
    return 0.5 * (h + h.transpose(-1, -2))


def _gained(h: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    """G h G with G = diag(gain): a row Hessian of normalized q or k moved to the projection's rows.
    h (n, d_h, d_h); gain (d_h,) shared by the heads, or (n, d_h) per head (a full-width norm)."""
    if gain is None:
        return h
    gain = gain if gain.dim() == 2 else gain[None]
    return gain[:, :, None] * h * gain[:, None, :]


@dataclass(frozen=True, eq=False)
class HeadNorm:
    """An RMSNorm on q or k: module(p) = gain o p / rho(p), rho(p) = sqrt(mean(p^2) + eps) over each
    head's d_h values (Qwen3/Gemma3 q_norm, k_norm; gain (d_h,)) or, full-width, over all heads d_h
    values of the token (OLMoE; gain (heads d_h,), one rho shared by the token's heads)."""

    module: nn.Module
    gain: torch.Tensor
    eps: float

    def __call__(self, p: torch.Tensor, heads: int, hd: int) -> tuple[torch.Tensor, torch.Tensor]:
        """p (b, T, heads d_h) -> (the module's output, same shape; 1/rho (b, T, heads)); fails when
        the module is not the RMSNorm this reconstruction assumes."""
        b, t, _ = p.shape
        if self.gain.numel() == heads * hd != hd:  # full width
            out = self.module(p)
            inv = torch.rsqrt(p.float().pow(2).mean(-1) + self.eps)[..., None].expand(b, t, heads)
        else:
            out = self.module(p.view(b, t, heads, hd))
            inv = torch.rsqrt(p.view(b, t, heads, hd).float().pow(2).mean(-1) + self.eps)
        expected = self.head_gain(heads, hd) * p.float().view(b, t, heads, hd) * inv[..., None]
        _check_close(out.reshape(b, t, heads, hd), expected, f"{type(self.module).__name__} (as gain * p / rms(p))")
        return out.reshape(b, t, heads * hd), inv

    def head_gain(self, heads: int, hd: int) -> torch.Tensor:
        """(d_h,) for a per-head norm, (heads, d_h) for a full-width one."""
        return self.gain.view(heads, hd) if self.gain.numel() == heads * hd != hd else self.gain


def _head_norm(attn: nn.Module, name: str, offset: float) -> HeadNorm | None:
    module = getattr(attn, name, None)
    if not isinstance(module, nn.Module):
        return None
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    weight = getattr(module, "weight", None)
    if eps is None or not isinstance(weight, torch.Tensor):
        raise UnsupportedModelError(
            f"BoA reads {type(attn).__name__}.{name} as an RMSNorm (weight, eps); "
            f"{type(module).__name__} is not one; quantize this model with GPTQ"
        )
    return HeadNorm(module, offset + weight.detach().float(), float(eps))


def _check_supported(geo: AttentionGeometry) -> None:
    if geo.num_heads % geo.num_kv_heads:
        raise UnsupportedModelError(f"BoA: {geo.num_heads} heads are not a multiple of {geo.num_kv_heads} kv heads")


def _check_close(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """BoA's statistics rebuild the attention from q/k/v, norms, RoPE and the mask; a mismatch with what
    the model computed means an attention variant this reconstruction does not cover."""
    tol = 1e-3 if got.dtype in (torch.float32, torch.float64) else 3e-2
    err = float((got.float() - expected).norm() / expected.norm().clamp_min(1e-30))
    if err > tol:
        raise UnsupportedModelError(
            f"BoA's reconstruction of {name} differs from the model's attention (relative error {err:.2e}); "
            "this attention variant (ALiBi, custom masking, another norm ...) is not supported; use GPTQ"
        )


def _projection(block: nn.Module, layout: AttentionLayout, geo: AttentionGeometry):
    """x (b, T, d) -> (q (b, T, heads d_h), k, v (b, T, kv d_h)): the projections with bias."""
    if not layout.fused:
        mods = [block.get_submodule(n) for n in layout.names]
        return lambda x: tuple(m(x) for m in mods)
    fused = block.get_submodule(layout.q)
    sizes = [geo.num_heads * geo.head_dim] + [geo.num_kv_heads * geo.head_dim] * 2

    def project(x):
        out = fused(x)
        if out.shape[-1] != sum(sizes):
            raise UnsupportedModelError(f"BoA: {layout.q} has {out.shape[-1]} outputs, not q/k/v's {sum(sizes)}")
        return tuple(out.split(sizes, dim=-1))

    return project


def _rotary_tables(kwargs: dict, geo: AttentionGeometry, attn: nn.Module):
    """(cos, sin) each (T, d_r) from the attention's position_embeddings, or (None, None) without RoPE."""
    rope = kwargs.get("position_embeddings")
    if rope is None and geo.rope:
        raise UnsupportedModelError(f"BoA: {type(attn).__name__} received no position_embeddings (cos, sin)")
    if rope is None:
        return None, None
    cos, sin = rope[0][0].float(), rope[1][0].float()
    if cos.shape[-1] > geo.head_dim or cos.shape[-1] % 2:
        raise UnsupportedModelError(f"BoA: rotary width {cos.shape[-1]} does not fit head_dim {geo.head_dim}")
    return cos, sin


@torch.no_grad()
def collect_attention_stats(
    block: nn.Module, layout: AttentionLayout, geo: AttentionGeometry, inputs, call: BlockCall, device
) -> AttentionStats:
    """One forward over all input batches (b, T, d) with the block's current weights; hooks on the
    attention module read its input, rotary tables and mask, and check the rebuilt attention against
    the output projection's input."""
    attn = block.get_submodule(layout.module)
    _check_supported(geo)
    project = _projection(block, layout, geo)
    norm_q, norm_k = (_head_norm(attn, n, layout.norm_offset) for n in ("q_norm", "k_norm"))
    stats = AttentionStats(geo, *(None if n is None else n.head_gain(h, geo.head_dim).to(device)
                                  for n, h in ((norm_q, geo.num_heads), (norm_k, geo.num_kv_heads))))
    pending: list[torch.Tensor] = []
    softcap = getattr(attn, "attn_logit_softcapping", None)
    scaling = getattr(attn, "scaling", geo.head_dim**-0.5)

    def observe(_m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        cos, sin = _rotary_tables(kwargs, geo, attn)
        allowed = _allowed(kwargs.get("attention_mask"), x.shape[1], x.device)
        q, k, v = project(x)
        inv_q = inv_k = None
        if norm_q is not None:
            q, inv_q = norm_q(q, geo.num_heads, geo.head_dim)
        if norm_k is not None:
            k, inv_k = norm_k(k, geo.num_kv_heads, geo.head_dim)
        rebuilt = stats.observe(x, q, k, v, cos, sin, allowed, scaling, softcap, inv_q, inv_k)
        if layout.out is not None:
            pending.append(rebuilt)

    def check(_m, args):
        _check_close(args[0], pending.pop(), layout.module)

    handles = [attn.register_forward_pre_hook(observe, with_kwargs=True)]
    if layout.out is not None:
        handles.append(block.get_submodule(layout.out).register_forward_pre_hook(check))
    run_with_hooks(block, inputs, call, device, handles)
    return stats


def _quantized(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Per-head blocks (heads, rows, n) -> one QuantizedWeight (heads rows, n) with natural g_idx."""
    heads, rows, n = codes.shape
    g_idx = torch.arange(n, dtype=torch.int32) // spec.group_width(n)
    flat = lambda t: t.reshape(heads * rows, -1).cpu()  # noqa: E731
    return QuantizedWeight(flat(codes).to(torch.uint8), flat(scale).float(), flat(zero).float(), g_idx, spec)


def _stacked(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Row-wise concatenation [Q; K; V] of per-part results: a fused projection's QuantizedWeight."""
    cat = lambda f: torch.cat([getattr(p, f) for p in parts])  # noqa: E731
    return QuantizedWeight(cat("qweight"), cat("scale"), cat("zero"), parts[0].g_idx, parts[0].spec)


def _head_weights(adapter: ModelAdapter, block: nn.Module, layout: AttentionLayout, geo: AttentionGeometry):
    """(W_Q (heads, d_h, d), W_K (kv, d_h, d), W_V (kv, d_h, d)) in (out, in) layout, float32."""
    heads, kv, hd = geo.num_heads, geo.num_kv_heads, geo.head_dim
    w = [adapter.get_weight(block.get_submodule(n)).float() for n in layout.names]
    if layout.fused:
        w = list(w[0].split([heads * hd, kv * hd, kv * hd]))
    if [t.shape[0] for t in w] != [heads * hd, kv * hd, kv * hd]:
        raise UnsupportedModelError(f"BoA: projection shapes do not match {heads} heads / {kv} kv heads of {hd}")
    return w[0].view(heads, hd, -1), w[1].view(kv, hd, -1), w[2].view(kv, hd, -1)


@torch.no_grad()
def solve_attention(
    adapter: ModelAdapter, block: nn.Module, group: list[str], inputs, call: BlockCall,
    spec_of: Callable[[str], QuantSpec], cfg: BoAConfig, device,
) -> dict[str, tuple[QuantizedWeight, float]]:
    """The engine's group hook: {name: (QuantizedWeight, relative Kronecker-weighted error)} for
    the attention's q/k/v when `group` contains them, else {} (a fused projection: one entry, the
    mean of its three errors). One forward pass collects every Hessian; W_Q and W_K heads are swept
    as one batch (sharing H_col unless q/k norms give each head its own), so they need one scheme
    (spec_of: a Linear's scheme); W_V takes its own."""
    layout = attention_layout(adapter)
    if not set(layout.names) <= set(group):
        return {}
    spec, spec_v = spec_of(layout.q), spec_of(layout.v)
    if spec_of(layout.k) != spec:
        raise ValueError(f"BoA sweeps {layout.q} and {layout.k} jointly; give them one scheme, got "
                         f"{spec.name} and {spec_of(layout.k).name}")
    if layout.fused and spec_v != spec:
        raise ValueError(f"{layout.q} is one fused q/k/v projection: one scheme, got {spec.name} and {spec_v.name}")
    geo = adapter.geometry
    hs = collect_attention_stats(block, layout, geo, inputs, call, device).hessians()
    heads, kv = geo.num_heads, geo.num_kv_heads
    wq, wk, wv = _head_weights(adapter, block, layout, geo)
    d = wq.shape[-1]
    shared = hs.col_q.shape[0] == 1 and hs.col_k.shape[0] == 1
    col_qk = hs.col_q if shared else torch.cat([hs.col_q.expand(heads, d, d), hs.col_k.expand(kv, d, d)])
    codes, scale, zero = kron_gptq(torch.cat([wq, wk]), torch.cat([hs.row_q, hs.row_k]), col_qk, spec, cfg)
    w_hat = _quantized(codes, scale, zero, spec).dequantize().to(hs.col.device).view(heads + kv, *wq.shape[1:])
    err_q = kron_error(wq, w_hat[:heads], hs.row_q, hs.col_q)
    err_k = kron_error(wk, w_hat[heads:], hs.row_k, hs.col_k)
    q_w = _quantized(codes[:heads], scale[:heads], zero[:heads], spec)
    k_w = _quantized(codes[heads:], scale[heads:], zero[heads:], spec)
    codes, scale, zero = kron_gptq(wv, None, hs.col_v, spec_v, cfg)
    v_w = _quantized(codes, scale, zero, spec_v)
    err_v = kron_error(wv, v_w.dequantize().to(hs.col.device).view(wv.shape), None, hs.col_v)
    if layout.fused:
        return {layout.q: (_stacked([q_w, k_w, v_w]), (err_q + err_k + err_v) / 3)}
    return {layout.q: (q_w, err_q), layout.k: (k_w, err_k), layout.v: (v_w, err_v)}
