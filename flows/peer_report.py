"""What a peer's tool (flows/llmcompressor_tool.py, flows/autoround_tool.py) reports, the same way
for every peer: it runs in the peer's own interpreter, so it needs only torch and quantlib.

    seen = watch_calibration(model)   # before the peer calibrates
    ... the peer quantizes, t seconds ...
    write_report(OUT.json, model, data, seen, n, t, ("llmcompressor", "torch"), levels=...)

OUT.json: {"ppl", "ppl_pydocs" (when data has off-domain windows), "calib_seen", "quant_seconds",
"peak_rss_mb", "versions", **extra}; calib_seen is the digest (quantlib.data.ids_set_digest) of the
first n sequences the peer passed through the embedding, taken as a set (a peer may reorder them),
so the driver can check they are the protocol's.
"""
from __future__ import annotations

import json
import resource
from importlib.metadata import version
from pathlib import Path

import torch

from quantlib.data import ids_set_digest
from quantlib.perplexity import perplexity


def watch_calibration(model) -> list[torch.Tensor]:
    """A list that collects every batch of ids the model embeds from now on."""
    seen: list[torch.Tensor] = []
    model.get_input_embeddings().register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().cpu()))
    return seen


def write_report(out_path: str, model, data: dict, seen: list[torch.Tensor], n: int, seconds: float,
                 packages: tuple[str, ...], **extra) -> None:
    """Score the quantized model in memory on the protocol's windows (perplexity, batch 4, as our
    rows are) and write OUT.json. The scoring passes embed too: calib_seen is taken first."""
    first = torch.cat([ids.reshape(-1, ids.shape[-1]) for ids in seen])[:n]
    calib_seen = ids_set_digest(first)
    scores = {"ppl": perplexity(model, data["windows"], batch_size=4)}
    if data.get("offdomain") is not None:
        scores["ppl_pydocs"] = perplexity(model, data["offdomain"], batch_size=4)
    Path(out_path).write_text(json.dumps(scores | {
        "calib_seen": calib_seen,
        "quant_seconds": round(seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "versions": {k: version(k) for k in packages} | {"threads": torch.get_num_threads()}} | extra))
