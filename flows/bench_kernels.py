"""Kernel and decode benchmarks (`ptq bench kernels`, `ptq bench decode`): records appended to
docs/benchmarks/kernels.json, each naming the device it ran on.

- run_kernels: one Linear, fused packed matmul (Triton on CUDA; the plain-torch reference path on
  CPU) vs torch.matmul on the dense weight, at decode/prefill batch sizes, for Llama-7B/8B layer
  shapes at W4 g128; time, bytes moved, achieved bandwidth and its fraction of the device's peak.
  With w8a8: quantlib.int8linear.Int8Linear (per-token int8 inputs, the int8 Triton kernel on CUDA;
  its dense float path on CPU) on the same shapes, the inputs' quantization included in its time.
- run_decode: the default model at W4 g64: release size on disk (GPTQ and compressed-tensors) vs
  the fp16 checkpoint and vs the ideal size, and greedy decode speed of the packed model vs dense.
"""
from __future__ import annotations

import datetime as dt
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

__all__ = ["SHAPES", "BATCHES", "PEAK_BANDWIDTH", "run_kernels", "run_decode", "kernel_bytes", "ideal_release_bytes"]

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096))  # (in K, out N)
BATCHES = (1, 4, 16, 64)
CPU_BATCHES = (1, 16)
DEFAULT_OUT = Path("docs/benchmarks/kernels.json")
# DRAM bandwidth in bytes/s by device-name substring (vendor datasheets); first match wins
PEAK_BANDWIDTH = (("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
                  ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12),
                  ("L40S", 0.864e12), ("L4", 0.3e12), ("RTX 4090", 1.008e12))


def _device() -> tuple[str, str, float | None]:
    """(torch device, its name, peak DRAM bandwidth in bytes/s or None if unknown)."""
    if not torch.cuda.is_available():
        import platform

        return "cpu", f"cpu {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads", None
    name = torch.cuda.get_device_name()
    return "cuda", name, next((bw for key, bw in PEAK_BANDWIDTH if key in name), None)


def _seconds(fn: Callable[[], object], device: str, reps: int) -> float:
    """Median wall time of fn() after one warm-up call (CUDA: synchronized events)."""
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernel_bytes(k: int, n: int, m: int, bits: int, group: int, act_bytes: int = 2) -> int:
    """DRAM bytes a fused packed matmul must move: packed weight + fp16 scales + packed zeros +
    g_idx + activations in + outputs out."""
    groups = k // group
    return k * n * bits // 8 + groups * n * 2 + groups * n * bits // 8 + k * 4 + (m * k + m * n) * act_bytes


def _random_quantlinear(k: int, n: int, bits: int, group: int, device: str, backend: str):
    from quantlib.packing import pack_codes
    from quantlib.qlinear import QuantLinear

    g = torch.Generator().manual_seed(0)
    tensors = {"qweight": pack_codes(torch.randint(0, 2**bits, (n, k), generator=g), bits).t().contiguous(),
               "qzeros": pack_codes(torch.randint(0, 2**bits, (k // group, n), generator=g), bits),
               "scales": (torch.rand(k // group, n, generator=g) * 0.01).half(),
               "g_idx": (torch.arange(k) // group).to(torch.int32)}
    return QuantLinear.from_packed(tensors, bits, backend=backend).to(device)


def _bench_layer(k: int, n: int, m: int, bits: int, group: int, device: str, reps: int) -> dict:
    dtype = torch.float16 if device == "cuda" else torch.float32
    backend = "triton" if device == "cuda" else "reference"
    layer = _random_quantlinear(k, n, bits, group, device, backend)
    w = layer.dequantize(dtype)  # (N, K) dense baseline
    x = torch.randn(m, k, device=device, dtype=dtype)
    with torch.no_grad():
        t_q = _seconds(lambda: layer(x), device, reps)
        t_d = _seconds(lambda: torch.matmul(x, w.t()), device, reps)
    act = torch.finfo(dtype).bits // 8
    q_bytes, d_bytes = kernel_bytes(k, n, m, bits, group, act), k * n * act + (m * k + m * n) * act
    return {"K": k, "N": n, "M": m, "bits": bits, "group_size": group, "dtype": str(dtype).removeprefix("torch."),
            "backend": backend, "quant_ms": t_q * 1e3, "dense_ms": t_d * 1e3, "speedup": t_d / t_q,
            "quant_bytes": q_bytes, "dense_bytes": d_bytes,
            "quant_GBps": q_bytes / t_q / 1e9, "dense_GBps": d_bytes / t_d / 1e9}


def _bench_int8_layer(k: int, n: int, m: int, device: str, reps: int) -> dict:
    from quantlib.int8linear import Int8Linear

    dtype = torch.float16 if device == "cuda" else torch.float32
    backend = "triton" if device == "cuda" else "dense"
    g = torch.Generator().manual_seed(0)
    layer = Int8Linear(k, n, backend=backend)
    layer.weight.copy_(torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8))
    layer.weight_scale.copy_(torch.rand(n, generator=g) * 0.01)
    layer = layer.to(device)
    w = (layer.weight.float() * layer.weight_scale[:, None]).to(dtype)  # (N, K) dense baseline
    x = torch.randn(m, k, device=device, dtype=dtype)
    with torch.no_grad():
        t_q = _seconds(lambda: layer(x), device, reps)
        t_d = _seconds(lambda: torch.matmul(x, w.t()), device, reps)
    act = torch.finfo(dtype).bits // 8
    q_bytes, d_bytes = k * n + n * 4 + (m * k + m * n) * act, k * n * act + (m * k + m * n) * act
    return {"K": k, "N": n, "M": m, "bits": 8, "group_size": None, "activations": "a8",
            "dtype": str(dtype).removeprefix("torch."), "backend": backend, "quant_ms": t_q * 1e3,
            "dense_ms": t_d * 1e3, "speedup": t_d / t_q, "quant_bytes": q_bytes, "dense_bytes": d_bytes,
            "quant_GBps": q_bytes / t_q / 1e9, "dense_GBps": d_bytes / t_d / 1e9}


def _with_peak(row: dict, peak: float | None) -> dict:
    if peak is None:
        return row | {"peak_GBps": None}
    return row | {"peak_GBps": peak / 1e9, "quant_frac_peak": row["quant_GBps"] * 1e9 / peak,
                  "dense_frac_peak": row["dense_GBps"] * 1e9 / peak}


def _append(out_json: Path, records: list[dict]) -> None:
    from tasks.io import atomic_write_json

    out_json = Path(out_json)
    existing = json.loads(out_json.read_text()) if out_json.exists() else []
    out_json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_json, existing + records)


def _stamp(kind: str, device_name: str) -> dict:
    import transformers
    import triton

    return {"bench": kind, "device": device_name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"torch": torch.__version__, "triton": triton.__version__,
                         "transformers": transformers.__version__}}


def run_kernels(out_json: str | Path = DEFAULT_OUT, shapes=SHAPES, batches=None, bits: int = 4, group: int = 128,
                reps: int | None = None, w8a8: bool = False) -> list[dict]:
    """Per-layer packed matmul (w8a8: the W8A8 Int8Linear) vs dense torch.matmul; on CPU batches 1
    and 16 and 2 repetitions so it finishes in minutes. Appends one record per (shape, batch)."""
    device, name, peak = _device()
    batches = batches or (BATCHES if device == "cuda" else CPU_BATCHES)
    reps = reps or (50 if device == "cuda" else 2)
    stamp = _stamp("kernel", name)
    rows = []
    for k, n in shapes:
        for m in batches:
            row = _bench_int8_layer(k, n, m, device, reps) if w8a8 else _bench_layer(k, n, m, bits, group, device, reps)
            rows.append(stamp | _with_peak(row, peak))
            r = rows[-1]
            print(f"{k:>6} x {n:<6} M={m:<3} packed {r['quant_ms']:8.3f} ms ({r['quant_GBps']:8.3f} GB/s)  "
                  f"dense {r['dense_ms']:8.3f} ms  x{r['speedup']:.2f}", flush=True)
    _append(out_json, rows)
    return rows


def ideal_release_bytes(tensors: dict[str, torch.Tensor], qweights: dict) -> dict:
    """Ideal bytes of a release: bits x quantized params + fp16 scales and b-bit zeros per group +
    fp16 for every other stored tensor (embeddings, head when untied, norms, biases)."""
    quantized = sum(qw.qweight.numel() * qw.spec.bits / 8 for qw in qweights.values())
    qparams = sum(qw.scale.numel() * (2 + qw.spec.bits / 8) for qw in qweights.values())
    dense_names = {f"{n}.weight" for n in qweights}
    rest = sum(t.numel() * 2 for k, t in tensors.items() if k not in dense_names and t.is_floating_point())
    return {"weights": int(quantized), "qparams": int(qparams), "fp16_rest": int(rest),
            "total": int(quantized + qparams + rest)}


def _release_sizes(model_dir: Path, qweights: dict, info: dict, tmp: Path) -> dict:
    from safetensors.torch import load_file, save_file

    from tasks.release_formats import write_packed_release

    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, str(tmp / "fp16.safetensors"))
    sizes = {"fp16": (tmp / "fp16.safetensors").stat().st_size, "ideal": ideal_release_bytes(tensors, qweights)}
    for fmt in ("gptq", "compressed-tensors"):
        write_packed_release(tmp / fmt, model_dir, qweights, info, fmt)
        sizes[fmt] = (tmp / fmt / "model.safetensors").stat().st_size
    return sizes


DECODE_PROMPT = [1, 504, 3458, 314, 260, 1176, 282]  # a short fixed prompt (flows/bench_gguf.py's too)


def _decode_tokens_per_s(model, device: str, new_tokens: int, reps: int) -> float:
    ids = torch.tensor([DECODE_PROMPT], device=device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        return new_tokens / _seconds(lambda: model.generate(ids, **kw), device, reps)


def _int4_cpu_kernel(qw, reps: int = 50) -> dict:
    """QuantLinear's int4 CPU kernel (quantlib/kernels/cpu.py) on one layer's codes at batch 1, fp32 and
    bf16 activations, against F.linear on the dense weight: ms per call and the largest difference."""
    from quantlib.qlinear import QuantLinear

    layer = QuantLinear.from_quantized(qw, backend="int4")
    dense = layer.dequantize(torch.float32)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, qw.shape[1], generator=torch.Generator().manual_seed(0)).to(dtype)
        err = float((layer(x).float() - x.float() @ dense.t()).abs().max())
        w = dense.to(dtype)
        out[str(dtype).removeprefix("torch.")] = {
            "int4": 1e3 * _seconds(lambda: layer(x), "cpu", reps),
            "dense": 1e3 * _seconds(lambda: torch.nn.functional.linear(x, w), "cpu", reps), "max_abs_err": err}
    return out | {"shape": list(qw.shape)}


def run_decode(out_json: str | Path = DEFAULT_OUT, model: str = "smollm2-135m", scheme: str = "w4g64",
               new_tokens: int | None = None) -> list[dict]:
    """Release sizes of `model` at `scheme` (RTN codes: the size does not depend on the method) and
    greedy batch-1 decode speed of the packed (QuantLinear) vs the dense model. Appends one record."""
    from quantlib.adapters import get_adapter
    from quantlib.rtn import rtn_quantize
    from quantlib.spec import parse_scheme
    from tasks.release_formats import load_packed_release
    from tasks.sources import load_model

    from .commands import cached_model

    device, name, _ = _device()
    dtype = torch.float16 if device == "cuda" else torch.float32
    new_tokens = new_tokens or (128 if device == "cuda" else 32)
    model_dir, spec = cached_model(model), parse_scheme(scheme)
    dense = load_model(model_dir)
    adapter = get_adapter(dense)
    qweights = {f"{adapter.family.layers}.{i}.{n}": rtn_quantize(adapter.get_weight(m).detach(), spec)
                for i, block in enumerate(adapter.blocks) for n, m in adapter.linears(block).items()}
    with tempfile.TemporaryDirectory() as tmp:
        sizes = _release_sizes(model_dir, qweights, {"scheme": spec.name}, Path(tmp))
        packed = load_packed_release(Path(tmp) / "gptq", verify=False, dtype=dtype).to(device)
        cached = load_packed_release(Path(tmp) / "gptq", verify=False, dtype=dtype, backend="dense").to(device)
        dense = dense.to(device, dtype)
        reps = 3 if device == "cuda" else 1
        row = _stamp("decode", name) | {
            "model": model, "scheme": spec.name, "dtype": str(dtype).removeprefix("torch."), "new_tokens": new_tokens,
            "sizes_bytes": sizes, "gptq_vs_fp16": sizes["gptq"] / sizes["fp16"],
            "gptq_vs_ideal": sizes["gptq"] / sizes["ideal"]["total"],
            "packed_tokens_per_s": _decode_tokens_per_s(packed, device, new_tokens, reps),
            "packed_dense_backend_tokens_per_s": _decode_tokens_per_s(cached, device, new_tokens, reps),
            "dense_tokens_per_s": _decode_tokens_per_s(dense, device, new_tokens, reps)}
        if device == "cpu":  # bf16: the packed model takes torch's int4 CPU kernel (QuantLinear auto)
            int4 = load_packed_release(Path(tmp) / "gptq", verify=False, dtype=torch.bfloat16)
            row["packed_int4_bf16_tokens_per_s"] = _decode_tokens_per_s(int4, device, new_tokens, reps)
            row["dense_bf16_tokens_per_s"] = _decode_tokens_per_s(dense.to(torch.bfloat16), device, new_tokens, reps)
            row["int4_cpu_kernel_ms"] = _int4_cpu_kernel(max(qweights.values(), key=lambda q: q.qweight.numel()))
    print(json.dumps({k: row.get(k) for k in ("sizes_bytes", "gptq_vs_fp16", "gptq_vs_ideal", "packed_tokens_per_s",
                                              "packed_dense_backend_tokens_per_s", "dense_tokens_per_s",
                                              "packed_int4_bf16_tokens_per_s", "dense_bf16_tokens_per_s",
                                              "int4_cpu_kernel_ms")}, indent=1), flush=True)
    _append(out_json, [row])
    return [row]
