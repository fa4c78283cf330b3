"""llm-compressor itself, the peer of the weight-and-activation rows: run by an interpreter that has
`llmcompressor` (its own environment: `make llmcompressor-env`), never imported by the project.

    PYTHONPATH=REPO PYTHON flows/llmcompressor_tool.py JOB.json OUT.json

JOB.json = {"model_dir": str, "data": DATA.pt, "quantization": {"scheme": "W8A8"} or {"config_groups": {...}},
"smooth": 0.8 or null, "threads": T} (flows/bench_peer.peer_quantization makes "quantization").
DATA.pt (written by flows/bench_peer.py) holds the protocol's calibration ids (n, seqlen), the wiki
windows and the off-domain windows, the same tensors our rows use. The recipe is llm-compressor's
W8A8 example: SmoothQuantModifier(smoothing_strength) then GPTQModifier(targets Linear, the preset
scheme or the config groups, lm_head ignored). The model is scored in memory right after `oneshot`: compressed-tensors has
replaced every quantized Linear's forward by its own quantize-dequantize of the inputs and weights,
i.e. llm-compressor's own W8A8 arithmetic, through quantlib.perplexity (torch only), as our rows are.
OUT.json: flows/peer_report.py's report; llm-compressor feeds the protocol's sequences in another
order (its Hessians and smoothing maxima do not depend on it), hence calib_seen is taken as a set.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
from transformers import AutoModelForCausalLM

from flows.peer_report import watch_calibration, write_report


def main(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["threads"])
    data = torch.load(job["data"])
    calib = data["calib"]  # (n, seqlen) int64
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    recipe = ([] if job["smooth"] is None else [SmoothQuantModifier(smoothing_strength=job["smooth"])]) + \
        [GPTQModifier(ignore=["lm_head"], **_quantization(job["quantization"]))]
    seen = watch_calibration(model)  # every batch of ids the calibration embeds (each modifier's pass runs it)
    t0 = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=calib.shape[1],
            num_calibration_samples=calib.shape[0], shuffle_calibration_samples=False)
    write_report(out_path, model, data, seen, calib.shape[0], time.perf_counter() - t0,
                 ("llmcompressor", "compressed-tensors", "torch", "transformers"))


def _quantization(q: dict) -> dict:
    """GPTQModifier's scheme arguments: a preset applies to `targets`; config groups name their own."""
    return {"targets": "Linear", "scheme": q["scheme"]} if "scheme" in q else {"config_groups": q["config_groups"]}


if __name__ == "__main__":
    main(*sys.argv[1:3])
