"""The README's support matrix (tasks/support.py) is the table the code renders, and every cell of it
runs here on a tiny random model of the family: each method quantizes it (and QAT refines the
result), each packed format it says "yes" to writes a release that loads back to the same logits, and
GGUF refuses exactly the families it says "no" to."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quantlib"))
from tiny import MOE_FAMILIES, tiny_config, tiny_ids  # noqa: E402

from quantlib.adapters import get_adapter  # noqa: E402
from quantlib.engine import EngineConfig  # noqa: E402
from quantlib.spec import QuantSpec  # noqa: E402
from tasks.support import METHODS, PACKED_FORMATS, support_matrix_md, support_rows  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ROWS = dict(support_rows())
SPEC = QuantSpec(4, 32)
# each method name as `ptq quantize --method` spells it, cut to a few steps
METHOD_NAMES = {"rtn": "rtn", "gptq": "gptq", "boa": "boa", "recon": "recon-k2o1-i2"}


def test_the_readme_holds_the_matrix_the_code_renders():
    assert support_matrix_md() in (REPO / "README.md").read_text(encoding="utf-8"), \
        "README's support matrix is stale: paste `python -m tasks.support` over it"
    assert set(METHODS) == {*METHOD_NAMES, "+qat"}


def _source(tmp_path: Path, family: str) -> tuple[Path, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    from tests.tasks.test_gguf_release import _char_tokenizer

    config = tiny_config(family)
    if family == "mistral":  # GGUF's "yes (no sliding window)"
        config.sliding_window = None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / "src")
    _char_tokenizer(config.vocab_size).save_pretrained(tmp_path / "src")
    return tmp_path / "src", model


def _quantized(model, method: str):
    from flows.commands import quantize_loaded
    from flows.methods import parse_method

    fake = copy.deepcopy(model)
    results, _, _ = quantize_loaded(fake, tiny_ids(4, 32, vocab=model.config.vocab_size), SPEC,
                                    parse_method(method).base, EngineConfig(batch_size=2))
    return fake, results


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# Qwen3-MoE and OLMoE repeat Mixtral's and Qwen2-MoE's expert layout (their attention runs in the
# quantlib tests): slow, to keep CI's time
@pytest.mark.parametrize("family", [pytest.param(f, marks=[pytest.mark.slow] if f in ("qwen3_moe", "olmoe") else [])
                                    for f in ROWS])
def test_every_cell_of_the_matrix_runs(tmp_path, family):
    from flows.commands import refine_qat
    from quantlib.qat import QATConfig
    from tasks.release import load_release, write_release_files

    cells, (src, model) = ROWS[family], _source(tmp_path, family)
    ids = tiny_ids(2, 24, vocab=model.config.vocab_size)
    n_linears = sum(len(get_adapter(model).linears(b)) for b in get_adapter(model).blocks)
    for column, name in METHOD_NAMES.items():
        assert cells[column] == "yes"
        fake, results = _quantized(model, name)
        assert len(results) == n_linears and torch.isfinite(_logits(fake, ids)).all(), (family, name)
    assert cells["+qat"] == "yes"
    results, stats = refine_qat(fake, tiny_ids(8, 32, vocab=model.config.vocab_size), results,
                                QATConfig(steps=2, eval_every=1, batch_size=2, loss="ce"), None)
    assert stats.steps >= 1 and torch.isfinite(_logits(fake, ids)).all()
    fake, results = _quantized(model, "rtn")
    for fmt in (*PACKED_FORMATS, "gguf"):
        out = tmp_path / fmt
        if cells[fmt] == "no":
            with pytest.raises(ValueError, match="gguf"):
                write_release_files(out, src, results, {"scheme": SPEC.name, "method": "rtn"}, fmt=fmt)
            continue
        write_release_files(out, src, results, {"scheme": SPEC.name, "method": "rtn"}, fmt=fmt)
        a, b = _logits(fake, ids), _logits(load_release(out, verify=False), ids)
        close = (a - b).abs().amax(-1) <= 3e-3 * a.abs().max()  # (batch, T): fp16 scales and tensors
        if family in MOE_FAMILIES:  # fp16 hidden states may flip a near-tied routing: a token, not the model
            assert close.float().mean() >= 0.9, (family, fmt, close)
        else:
            assert close.all(), (family, fmt)
