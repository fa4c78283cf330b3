"""flows/bench_gguf.py --codes: GGUF rows from the codes a `ptq quantize` run stored."""
from __future__ import annotations

import json

import pytest
import torch
import transformers as T

from flows.bench_gguf import _one_scheme, read_codes, run_gguf
from flows.bench_gguf import main as bench_main
from flows.cli import main
from flows.commands import ProtocolData, eval_ppl
from tasks.io import write_manifest

from pipeline_projects import char_llama_source
from tests.quantlib.tiny import tiny_ids


@pytest.fixture
def quantized(tmp_path):
    """(source folder, `ptq quantize --method gptq --bits 4 --group-size 32` output folder) of a tiny llama."""
    _, text = char_llama_source(tmp_path)
    assert main(["quantize", "--model", str(tmp_path / "src"), "--calib", str(text), "--n-samples", "4",
                 "--seqlen", "32", "--method", "gptq", "--bits", "4", "--group-size", "32",
                 "--out", str(tmp_path / "q")]) == 0
    return tmp_path / "src", tmp_path / "q"


def test_codes_rows_score_the_stored_codes_and_record_how_they_were_made(quantized, tmp_path):
    """The `ours` row scores exactly the weights `ptq quantize` wrote (GPTQ here: the --method given
    to the bench, RTN, would give other codes and another perplexity), its GGUF file reads back through
    transformers within the fp16 rounding of the block scales, and the row carries the codes' method,
    config and checksum."""
    src, q = quantized
    given = read_codes(q, str(src), ("w4g32",))
    windows = tiny_ids(2, 64)
    rows = _one_scheme(src, ProtocolData(calib=tiny_ids(4, 32), windows=windows), "w4g32", "rtn",
                       tmp_path, None, given)
    dense = eval_ppl(T.AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32).eval(), windows)
    assert [r["method"] for r in rows] == ["gptq", "gptq.gguf", "rtn.gguf"]  # ours, ours in GGUF, the reference RTN
    assert rows[0]["ppl"] == pytest.approx(dense, rel=1e-6)
    assert rows[0]["ppl"] != pytest.approx(rows[2]["ppl"], rel=1e-3)
    assert rows[1]["ppl"] == pytest.approx(dense, rel=1e-2) and rows[1]["gguf_type"] == "Q4_1"
    info = json.loads((q / "quantization.json").read_text())
    codes = rows[0]["settings"]["codes"]
    assert codes["quantized_sha256"] == info["quantized_sha256"] and codes["method"] == "gptq"
    assert codes["method_config"] == info["method_config"] and info["method_config"]["act_order"] is True
    assert rows[0]["settings"]["n_samples"] == 4 and rows[0]["seconds"] == pytest.approx(info["quant_seconds"], abs=0.1)


def _write(q, info: dict) -> None:
    """q's quantization.json replaced by `info`, with its MANIFEST (so only the content is wrong)."""
    (q / "quantization.json").write_text(json.dumps(info))
    write_manifest(q)


def test_bad_codes_folders_are_refused_before_any_work(quantized, tmp_path):
    src, q = quantized
    assert read_codes(q, str(src), ("W4G32:Q4_K",))[1]["spec"]["name"] == "w4g32"  # scheme names as parse_scheme
    with pytest.raises(ValueError, match="are w4g32; pass --schemes w4g32"):
        read_codes(q, str(src), ("w4g32:Q4_K", "w2g64"))
    with pytest.raises(ValueError, match="was made from .* not --model"):
        read_codes(q, "smollm2-135m", ("w4g32",))
    with pytest.raises(ValueError, match="no quantization.json"):
        read_codes(src, str(src), ("w4g32",))
    info = json.loads((q / "quantization.json").read_text())
    _write(q, info | {"activations": "a8"})
    with pytest.raises(ValueError, match="made with activations 'a8', which changes more than the quantized"):
        read_codes(q, str(src), ("w4g32",))
    for changes, message in [({"smooth": 0.0}, "smooth 0.0"),  # alpha 0 is a setting, not "off"
                             ({"method_config": info["method_config"] | {"cfp": True}}, "CFP"),
                             ({"method": "recon-k1-cfpa"}, "CFP"),  # a folder from before method_config
                             ({"qat_config": {"train_norms": True}}, "QAT's trainable norms"),
                             ({"spec": info["spec"] | {"name": "w8g32"}}, "no exact GGUF type"),
                             ({"format": "gguf"}, "a release folder")]:
        _write(q, info | changes)
        with pytest.raises(ValueError, match=message):
            read_codes(q, str(src), ("w4g32",))
    _write(q, info)
    assert read_codes(q, str(src), ("w4g32",))[1] == info
    with pytest.raises(SystemExit):  # the codes' own method and calibration: the two flags are refused
        bench_main(["--codes", str(q), "--method", "rtn"])
    with open(q / "quantized.safetensors", "ab") as f:  # a stored file changed after the run
        f.write(b"\0")
    out = tmp_path / "rows.json"
    with pytest.raises(ValueError, match="quantized.safetensors differ from its MANIFEST"):
        run_gguf(str(src), ("w4g32",), "gptq", 4, out, codes=q)
    assert not out.exists()
