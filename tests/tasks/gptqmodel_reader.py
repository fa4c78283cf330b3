"""Load GPTQ releases with GPTQModel's own loader (torch backend, CPU, fp16) and write what it
reads from each: every quantized Linear's dense weight (its `dequantize_weight()`, (out, in)) and the
logits of the given token ids. Run by tests/tasks/test_release_formats.py in an interpreter that has gptqmodel
(it pins its own torch/transformers, so it usually lives in its own virtual environment); imports
nothing from this project.

    python gptqmodel_reader.py IDS.safetensors RELEASE OUT.safetensors [RELEASE OUT.safetensors ...]
"""
from __future__ import annotations

import sys

import torch
from safetensors.torch import load_file, save_file


def read(release: str, ids: torch.Tensor, out_path: str) -> None:
    from gptqmodel import BACKEND, GPTQModel

    model = GPTQModel.load(release, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    out = {}
    for name, module in model.model.named_modules():
        if hasattr(module, "dequantize_weight") and hasattr(module, "qweight"):
            out[f"weight/{name}"] = module.dequantize_weight().t().contiguous().to(torch.float16)
    with torch.no_grad():
        out["logits"] = model.model(ids).logits.float().contiguous()
    save_file(out, out_path)


if __name__ == "__main__":
    ids = load_file(sys.argv[1])["ids"]
    for release, out_path in zip(sys.argv[2::2], sys.argv[3::2]):
        read(release, ids, out_path)
