"""flows/bench_peer.py (llm-compressor and AutoRound as measured peers): bad input refused before any
work; each tool itself, where the peer's environment exists (`make llmcompressor-env`, `make
autoround-env`; skipped otherwise)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quantlib"))
from tiny import tiny_ids, tiny_model  # noqa: E402

from flows.bench_peer import PEERS, run_peer  # noqa: E402
from quantlib.data import ids_set_digest  # noqa: E402
from quantlib.perplexity import perplexity  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PEER = REPO / ".venv-llmcompressor" / "bin" / "python"
AR = REPO / ".venv-autoround" / "bin" / "python"
TOOL = PEERS["llm-compressor"].tool


def test_missing_interpreter_and_unknown_scheme_are_refused_before_any_work(tmp_path):
    out = tmp_path / "rows.json"
    with pytest.raises(FileNotFoundError, match="make llmcompressor-env"):
        run_peer(str(tmp_path / "nope" / "python"), "smollm2-135m", "W8A8", 0.8, 4, 1, out)
    for bad, why in (("W2A2", "unknown scheme"), ("w4g64", "dynamic inputs"), ("w4g64-a8s", "dynamic inputs")):
        with pytest.raises(ValueError, match=f"W8A8 .*{why}"):
            run_peer(sys.executable, "smollm2-135m", bad, 0.8, 4, 1, out)
    assert not out.exists()


def test_autoround_bad_input_is_refused_before_any_work(tmp_path):
    out = tmp_path / "rows.json"
    with pytest.raises(FileNotFoundError, match="make autoround-env"):
        run_peer(str(tmp_path / "nope" / "python"), "smollm2-135m", "w3g64", None, 4, 1, out, peer="autoround")
    for bad, kw, why in (("w8pcs-a8", {}, "weight-only scheme"), ("w3g64", {"iters": 0}, "at least 1"),
                         ("w3g64", {"smooth": 0.8}, "AutoRound is weight-only"), ("w3g64", {"peer": "gptqmodel"}, "--peer")):
        with pytest.raises(ValueError, match=why):
            run_peer(sys.executable, "smollm2-135m", bad, kw.pop("smooth", None), 4, 1, out,
                     **{"peer": "autoround", **kw})
    assert not out.exists()


@pytest.mark.parametrize("scheme, expected", [
    ("w3g64", {"bits": 3, "group_size": 64, "sym": False}), ("w2g64", {"bits": 2, "group_size": 64, "sym": False}),
    ("w4pcs", {"bits": 4, "group_size": -1, "sym": True})])
def test_autoround_is_asked_for_our_grid(scheme, expected):
    """AutoRound gets the grid our row of that name uses (asymmetric unless the name ends in s; per
    channel is its group_size -1), with its own defaults for everything else."""
    from flows.bench_peer import peer_quantization

    name, q = peer_quantization(scheme, "autoround", iters=50)
    assert name == scheme and q == expected | {"iters": 50, "batch_size": 8, "seed": 42}


@pytest.mark.parametrize("scheme, spec, act", [("w4g64-a8", (4, 64, False), "a8"), ("w8pcs-a4", (8, None, True), "a4")])
def test_peer_is_asked_for_exactly_the_scheme_our_releases_declare(scheme, spec, act):
    """The peer's config group is the one our compressed-tensors release of that scheme carries
    (weights and input_activations; the storage dtypes are the release's own business)."""
    from flows.bench_peer import peer_quantization
    from quantlib.spec import QuantSpec
    from tasks.release_formats import _ct_config  # what a compressed-tensors release's config.json holds

    name, q = peer_quantization(scheme)
    ours = _ct_config([(QuantSpec(*spec), ["Linear"])], ["lm_head"], torch.float16, act)["config_groups"]["group_0"]
    group = q["config_groups"]["group_0"]
    assert name == scheme and group["targets"] == ["Linear"]
    assert group["input_activations"] == ours["input_activations"]
    assert group["weights"] == {k: v for k, v in ours["weights"].items() if k not in ("scale_dtype", "zp_dtype")}
    assert peer_quantization("W8A8") == ("w8pcs-a8", {"scheme": "W8A8"})


@pytest.mark.skipif(not PEER.exists(), reason="llm-compressor's environment is absent (make llmcompressor-env)")
@pytest.mark.parametrize("scheme", ["W8A8", "w4g32-a8"])
def test_tool_quantizes_and_scores_a_tiny_model(tmp_path, scheme):
    """SmoothQuant + GPTQ by llm-compressor on a tiny llama, with its W8A8 preset and with our config
    group for W4 g32 + a8, scored in memory: a finite perplexity that differs from the FP model's
    (its quantize-dequantize forward is live)."""
    from flows.bench_peer import peer_quantization

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    # llm-compressor wants a tokenizer beside a dataset, even a tokenized one
    words = Tokenizer(WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0").save_pretrained(tmp_path / "model")
    calib, windows = tiny_ids(32, 32), tiny_ids(2, 32, seed=1)  # 32: llm-compressor reorders them
    torch.save({"calib": calib, "windows": windows, "offdomain": None}, tmp_path / "data.pt")
    job = {"model_dir": str(tmp_path / "model"), "data": str(tmp_path / "data.pt"),
           "quantization": peer_quantization(scheme)[1], "smooth": 0.8, "threads": 1}
    (tmp_path / "job.json").write_text(json.dumps(job))
    r = subprocess.run([str(PEER), str(TOOL), str(tmp_path / "job.json"), str(tmp_path / "out.json")],
                       env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    fp = perplexity(model.eval(), windows)
    assert math.isfinite(out["ppl"]) and out["ppl"] != fp and "ppl_pydocs" not in out
    assert out["versions"]["llmcompressor"] == "0.14.0.1" and out["quant_seconds"] > 0
    assert out["calib_seen"] == ids_set_digest(calib)  # llm-compressor calibrated on exactly these sequences


@pytest.mark.skipif(not AR.exists(), reason="AutoRound's environment is absent (make autoround-env)")
def test_autoround_tool_quantizes_and_scores_a_tiny_model(tmp_path):
    """AutoRound on a tiny llama at w3 g32, fed our calibration ids: it embeds exactly those sequences,
    leaves 3-bit groups (at most 8 values) and a finite perplexity that differs from the FP model's."""
    from flows.bench_peer import peer_quantization

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    words = Tokenizer(WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0").save_pretrained(tmp_path / "model")
    calib, windows = tiny_ids(16, 32), tiny_ids(2, 32, seed=1)
    torch.save({"calib": calib, "windows": windows, "offdomain": None}, tmp_path / "data.pt")
    job = {"model_dir": str(tmp_path / "model"), "data": str(tmp_path / "data.pt"),
           "quantization": peer_quantization("w3g32", "autoround", iters=4)[1], "smooth": None, "threads": 1}
    (tmp_path / "job.json").write_text(json.dumps(job))
    r = subprocess.run([str(AR), str(PEERS["autoround"].tool), str(tmp_path / "job.json"), str(tmp_path / "out.json")],
                       env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    fp = perplexity(model.eval(), windows)
    assert math.isfinite(out["ppl"]) and out["ppl"] != fp and "ppl_pydocs" not in out
    assert 2 < out["levels"] <= 8 and out["versions"]["auto-round"] == "0.16.1" and out["quant_seconds"] > 0
    assert out["tuned_dtype"] in ("torch.bfloat16", "torch.float32")  # what AutoRound left; scored in fp32
    assert out["calib_seen"] == ids_set_digest(calib)  # AutoRound calibrated on exactly these sequences
