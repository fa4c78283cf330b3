"""flows.bench_kernels: records appended with the device name; byte accounting of the ideal sizes."""
from __future__ import annotations

import json

import torch

from flows.bench_kernels import ideal_release_bytes, kernel_bytes, run_kernels
from quantlib.rtn import rtn_quantize
from quantlib.spec import QuantSpec


def test_run_kernels_appends_records(tmp_path):
    out = tmp_path / "kernels.json"
    out.write_text(json.dumps([{"bench": "earlier"}]))
    rows = run_kernels(out, shapes=((128, 64),), batches=(1, 4), reps=1)
    records = json.loads(out.read_text())
    assert records[0] == {"bench": "earlier"} and records[1:] == rows and len(rows) == 2
    r = rows[0]
    assert r["device"] and r["K"] == 128 and r["N"] == 64 and r["M"] == 1 and r["bits"] == 4
    assert r["quant_ms"] > 0 and r["dense_ms"] > 0 and r["quant_bytes"] == kernel_bytes(128, 64, 1, 4, 128, 4)


def test_run_kernels_w8a8_times_the_int8_linear(tmp_path):
    rows = run_kernels(tmp_path / "k.json", shapes=((128, 64),), batches=(3,), reps=1, w8a8=True)
    r = rows[0]
    assert (r["bits"], r["activations"], r["M"]) == (8, "a8", 3) and r["quant_ms"] > 0
    assert r["quant_bytes"] == 128 * 64 + 64 * 4 + (3 * 128 + 3 * 64) * 4  # int8 codes, fp32 scales, fp32 x and y


def test_kernel_bytes_counts_packed_weight_qparams_and_activations():
    # 4096 x 4096 W4 g128: 8 MiB of codes, 32 x 4096 fp16 scales and 4-bit zeros, g_idx, x and y in fp16
    assert kernel_bytes(4096, 4096, 1, 4, 128) == 4096 * 4096 // 2 + 32 * 4096 * 2 + 32 * 4096 // 2 + 4096 * 4 + 2 * 4096 * 2


def test_ideal_release_bytes():
    w = torch.randn(32, 128)
    qw = rtn_quantize(w, QuantSpec(4, 64))
    tensors = {"a.weight": w, "emb.weight": torch.randn(10, 8), "ids": torch.zeros(3, dtype=torch.int64)}
    ideal = ideal_release_bytes(tensors, {"a": qw})
    assert ideal == {"weights": 32 * 128 // 2, "qparams": 32 * 2 * 2 + 32 * 2 // 2, "fp16_rest": 80 * 2,
                     "total": 2048 + 160 + 160}
