"""Triton kernels against the plain-torch reference over shapes x group layouts x bits x dtypes.

Without CUDA the kernels run in Triton's interpreter: `triton.jit` reads TRITON_INTERPRET when a
kernel is decorated, i.e. when quantlib.kernels.gptq_triton is imported, so the `kt` fixture sets
it first (and re-imports the module if something imported it compiled). With CUDA the same tests
run compiled on the GPU. bf16 runs with fp32 tl.dot under the interpreter (its bf16 tl.dot is wrong).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from interpreted import interpreted  # noqa: E402
from quantlib.kernels import check_gptq_args, gptq_matmul, gptq_matmul_reference  # noqa: E402
from quantlib.packing import pack_codes  # noqa: E402
from quantlib.qlinear import QuantLinear  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def kt():
    """quantlib.kernels.gptq_triton, interpreted when there is no GPU."""
    yield from interpreted("quantlib.kernels.gptq_triton")


def _packed(k, n, bits, layout, seed=0, group=32):
    """Random packed GPTQ buffers (K=k in, N=n out) and the kernels' group_size argument.

    layout: "g" consecutive groups of `group`; "pc" per channel; "act" groups of `group` scattered
    over the columns (act-order g_idx, group_size 0 = read g_idx)."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if layout == "pc" else k // group
    q = torch.randint(0, 2**bits, (n, k), generator=g)
    z = torch.randint(0, 2**bits, (n, groups), generator=g)
    s = torch.rand(groups, n, generator=g) * 0.02 + 1e-3
    g_idx = torch.arange(k) // (k // groups)
    if layout == "act":
        g_idx = g_idx[torch.randperm(k, generator=g)]
    group_size = 0 if layout == "act" else k // groups
    tensors = (pack_codes(q, bits).t().contiguous(), pack_codes(z.t(), bits), s.half(), g_idx.to(torch.int32))
    return tuple(t.to(DEVICE) for t in tensors), group_size


def _assert_close(y, ref):
    """Same dequantized W, fp32 accumulation: only summation order and output rounding differ."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    eps = torch.finfo(ref.dtype).eps
    torch.testing.assert_close(y.float(), ref.float(), rtol=2 * eps, atol=2 * eps * ref.float().abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["g", "pc", "act"])
@pytest.mark.parametrize("bits", [4, 3, 2, 8])
def test_kernel_matches_reference(bits, layout, dtype):
    (qw, qz, s, gi), group_size = _packed(96, 80, bits, layout, seed=bits)
    g = torch.Generator().manual_seed(1)
    for m in (1, 5, 40):  # GEMV path (M <= 16) and tiled GEMM path
        x = torch.randn(m, 96, generator=g).to(DEVICE, dtype)
        _assert_close(gptq_matmul(x, qw, qz, s, gi, bits, group_size), gptq_matmul_reference(x, qw, qz, s, gi, bits))


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("k,n", [(72, 40), (160, 33)])
def test_kernel_odd_shapes(bits, k, n):
    """K and N not multiples of the tiles (and, for 3 bits, K not a multiple of 32 codes)."""
    g = torch.Generator().manual_seed(k)
    qw = pack_codes(torch.randint(0, 2**bits, (n, k), generator=g), bits).t().contiguous()
    qz = pack_codes(torch.randint(0, 2**bits, (1, n), generator=g), bits)
    s = (torch.rand(1, n, generator=g) * 0.02 + 1e-3).half()
    gi = torch.zeros(k, dtype=torch.int32)
    args = tuple(t.to(DEVICE) for t in (qw, qz, s, gi))
    for m in (3, 17):
        x = torch.randn(m, k, generator=g).to(DEVICE, torch.float16)
        _assert_close(gptq_matmul(x, *args, bits, k), gptq_matmul_reference(x, *args, bits))


@pytest.mark.parametrize("bits", [4, 3])
def test_kernel_groups_smaller_than_a_k_tile(bits):
    """Several groups inside one K tile: scales and zeros gathered per row of the tile."""
    (qw, qz, s, gi), gs = _packed(128, 48, bits, "g", group=16)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(0)).to(DEVICE, torch.float16)
    _assert_close(gptq_matmul(x, qw, qz, s, gi, bits, gs), gptq_matmul_reference(x, qw, qz, s, gi, bits))


def test_kernel_fp32_activations():
    (qw, qz, s, gi), gs = _packed(64, 48, 4, "g")
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    y = gptq_matmul(x, qw, qz, s, gi, 4, gs)
    torch.testing.assert_close(y, gptq_matmul_reference(x, qw, qz, s, gi, 4), rtol=1e-5, atol=1e-5)


def test_quantlinear_triton_backend_matches_reference_backend():
    (qw, qz, s, gi), gs = _packed(64, 48, 4, "g")
    bias = torch.randn(48)
    tensors = {"qweight": qw.cpu(), "qzeros": qz.cpu(), "scales": s.cpu(), "g_idx": gi.cpu()}
    ref = QuantLinear.from_packed(tensors, 4, bias, backend="reference").to(DEVICE)
    tri = QuantLinear.from_packed(tensors, 4, bias, backend="triton").to(DEVICE)
    assert tri.group_size == gs
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0)).to(DEVICE, torch.float16)
    _assert_close(tri(x), ref(x))


def test_wrapper_checks_shapes_and_dtypes():
    (qw, qz, s, gi), gs = _packed(64, 48, 4, "g")
    x = torch.randn(2, 64).to(DEVICE, torch.float16)
    check_gptq_args(x, qw, qz, s, gi, 4, gs)
    with pytest.raises(ValueError, match="qweight must have shape"):
        gptq_matmul(x, qw[:-1], qz, s, gi, 4, gs)
    with pytest.raises(TypeError, match="int32"):
        gptq_matmul(x, qw, qz.long(), s, gi, 4, gs)
    with pytest.raises(TypeError, match="2-D"):
        gptq_matmul(x.to(torch.int32), qw, qz, s, gi, 4, gs)
    with pytest.raises(ValueError, match="group_size"):
        gptq_matmul(x, qw, qz, s, gi, 4, 16)
    with pytest.raises(ValueError, match="bits"):
        gptq_matmul(x, qw, qz, s, gi, 5, gs)


def test_custom_op_fake_impl_and_registration():
    (qw, qz, s, gi), gs = _packed(64, 48, 4, "g")
    x = torch.randn(3, 64).to(DEVICE, torch.float16)
    torch.library.opcheck(torch.ops.quantlib.gptq_matmul, (x, qw, qz, s, gi, 4, gs),
                          test_utils=("test_schema", "test_faketensor"))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        y = torch.ops.quantlib.gptq_matmul(fx, *(mode.from_tensor(t) for t in (qw, qz, s, gi)), 4, gs)
    assert y.shape == (3, 48) and y.dtype == torch.float16


def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """The kernel bodies (GPTQ, and the W8A8 int8 one: its int8 tl.dot and scaled epilogue) go through
    Triton's compiler down to an sm_90 cubin (ptxas), which the interpreter never does: catches type
    errors in the compiled path on machines without a GPU. One process for both (start-up dominates)."""
    script = f"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from quantlib.kernels import gptq_triton as kt
fn = kt._gptq_matmul_kernel
base = {{"x_ptr": "*fp16", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*fp16", "gidx_ptr": "*i32",
        "y_ptr": "*fp16", **{{a: "i32" for a in ("M", "N", "K", "NW", "stride_xm", "stride_ym", "M_BUCKET")}}}}
cases = [  # (bits, group, split, x dtype, fp32 dot)
    (4, 128, 1, "*fp16", False), (4, 128, 4, "*bf16", False), (3, 0, 1, "*fp16", False),
    (2, 32, 2, "*fp32", True), (8, 4096, 1, "*bf16", False)]
for bits, group, split, xt, f32 in cases:
    const = dict(BITS=bits, GROUP_SIZE=group, DOT_FP32=f32, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, SPLIT_K=split, GROUP_M=8)
    sig = dict(base, x_ptr=xt, y_ptr="*fp32" if split > 1 else xt, **{{k: "constexpr" for k in const}})
    src = ASTSource(fn=fn, signature=sig, constexprs={{(fn.arg_names.index(k),): v for k, v in const.items()}})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={{"num_warps": 4, "num_stages": 3}})
    assert len(compiled.asm["cubin"]) > 0
from quantlib.kernels import int8_triton as k8
fn = k8._int8_mm_kernel
base = {{"a_ptr": "*i8", "b_ptr": "*i8", "sa_ptr": "*fp32", "sb_ptr": "*fp32", "bias_ptr": "*fp32",
        **{{a: "i32" for a in ("M", "N", "K", "stride_am", "stride_bn", "stride_ym", "M_BUCKET")}}}}
int8_cases = [("*fp16", True, (128, 128, 64)), ("*bf16", False, (16, 64, 128))]
for yt, bias, (bm, bn, bk) in int8_cases:
    const = dict(HAS_BIAS=bias, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
    sig = dict(base, y_ptr=yt, **{{k: "constexpr" for k in const}})
    src = ASTSource(fn=fn, signature=sig, constexprs={{(fn.arg_names.index(k),): v for k, v in const.items()}})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={{"num_warps": 4, "num_stages": 3}})
    assert len(compiled.asm["cubin"]) > 0
print("compiled", len(cases) + len(int8_cases))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "compiled 7" in r.stdout, r.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 16, 64, 512])
def test_kernel_llama_shapes_on_gpu(m):
    """Autotuned configs on a real layer shape (W4 g128, 4096 x 11008)."""
    (qw, qz, s, gi), gs = _packed(4096, 11008, 4, "g", group=128)
    x = torch.randn(m, 4096, device=DEVICE, dtype=torch.float16)
    _assert_close(gptq_matmul(x, qw, qz, s, gi, 4, gs), gptq_matmul_reference(x, qw, qz, s, gi, 4))
