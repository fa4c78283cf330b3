"""AutoRound itself, the peer of the weight-only 2- and 3-bit rows: run by an interpreter that has
`auto_round` (its own environment: `make autoround-env`), never imported by the project.

    PYTHONPATH=REPO PYTHON flows/autoround_tool.py JOB.json OUT.json

JOB.json = {"model_dir": str, "data": DATA.pt, "quantization": {"bits", "group_size", "sym", "iters",
"batch_size", "seed"}, "threads": T} (flows/bench_peer.peer_quantization makes "quantization").
DATA.pt (written by flows/bench_peer.py) holds the protocol's calibration ids (n, seqlen), the wiki
windows and the off-domain windows, the same tensors our rows use. The calibration ids are handed
to AutoRound as its dataloader, batch_size sequences per batch, in the protocol's order (no text
and no re-tokenization on its side). AutoRound (sign-gradient rounding and clipping per block,
`iters` steps, its own defaults otherwise) leaves every quantized Linear's weight quantize-
dequantized in place, in bf16 on a CPU (it casts the model to its amp dtype); the model is cast back
to fp32 and scored in memory right after, through quantlib.perplexity (torch only), as our rows are.
OUT.json: flows/peer_report.py's report, plus "levels": the most distinct values one weight group of
layer 0's down_proj holds (at most 2^bits when the weights really are on a b-bit grid), and
"tuned_dtype": the dtype AutoRound left the model in.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from auto_round import AutoRound
from transformers import AutoModelForCausalLM, AutoTokenizer

from flows.peer_report import watch_calibration, write_report


def main(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["threads"])
    data, q = torch.load(job["data"]), job["quantization"]
    calib = data["calib"]  # (n, seqlen) int64
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    probe = model.model.layers[0].mlp.down_proj  # a Linear AutoRound quantizes (lm_head it does not)
    seen = watch_calibration(model)  # every batch of ids AutoRound's calibration embeds
    t0 = time.perf_counter()
    ar = AutoRound(model, tokenizer, bits=q["bits"], group_size=q["group_size"], sym=q["sym"], iters=q["iters"],
                   nsamples=calib.shape[0], seqlen=calib.shape[1], batch_size=q["batch_size"], seed=q["seed"],
                   dataset=list(calib.split(q["batch_size"])), device_map="cpu")
    ar.quantize()
    seconds, tuned = time.perf_counter() - t0, str(model.dtype)
    model.float()  # AutoRound tunes (and leaves) a CPU model in bf16; our rows are scored in fp32
    write_report(out_path, model, data, seen, calib.shape[0], seconds, ("auto-round", "torch", "transformers"),
                 levels=_levels(probe.weight.detach(), q["group_size"]), tuned_dtype=tuned)


def _levels(w: torch.Tensor, group_size: int) -> int:
    """Most distinct values in one group of `group_size` input weights of w (out, in); -1: per channel."""
    groups = w.reshape(w.shape[0], -1, w.shape[1] if group_size == -1 else group_size).flatten(0, 1)
    return max(len(torch.unique(g)) for g in groups)


if __name__ == "__main__":
    main(*sys.argv[1:3])
