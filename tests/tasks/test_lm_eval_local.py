"""tasks.lm_eval_local: offline cloze and rolling-perplexity tasks, their YAML, and the lm-eval runner.

The runner tests check lm-eval's numbers against the same quantities computed directly from the
tiny model's logits, so a wrong field mapping in the YAML (gold index, target column) or a
tokenization mismatch fails loudly instead of yielding a plausible-looking accuracy.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tasks.io import sha256_file
from tasks.lm_eval_local import _flatten, make_cloze_jsonl, make_text_jsonl, run_lm_eval, write_task_yaml

WORDS = (
    "river stone tower city king army ship song film game bird tree castle bridge road north south "
    "red blue old new great small built sailed sang won lost found crossed held"
).split()


def wiki_text(seed: int = 0, articles: int = 6, paragraphs: int = 3) -> str:
    """WikiText-shaped prose: ' = Title = ' headings, one paragraph per line, plain sentences."""
    rng = random.Random(seed)
    lines = []
    for a in range(articles):
        lines.append(f" = Article {a} = ")
        for _ in range(paragraphs):
            sentences = []
            for _ in range(rng.randint(3, 6)):
                words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
                sentences.append(" ".join([words[0].capitalize(), *words[1:]]) + ".")
            lines.append(" " + " ".join(sentences) + " ")
    return "\n".join(lines) + "\n"


def tiny_tokenizer(text: str) -> PreTrainedTokenizerFast:
    """Word-level tokenizer trained on `text` (no download); no BOS added on encode."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["[UNK]", "[BOS]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]")


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def article_of(text: str, passage: str) -> int:
    """Index of the article (split at ' = Title = ' lines) whose prose contains `passage`."""
    bodies = re.split(r"^ = Article \d+ = $", text, flags=re.M)[1:]
    hits = [i for i, body in enumerate(bodies) if passage in " ".join(body.split())]
    assert len(hits) == 1, (passage, hits)
    return hits[0]


# ---------------------------------------------------------------------------------- cloze data


def test_cloze_is_deterministic_for_a_seed(tmp_path):
    text = wiki_text()
    a, b, c = (tmp_path / n for n in ("a.jsonl", "b.jsonl", "c.jsonl"))
    digest = make_cloze_jsonl(text, a, n_docs=10, seed=3)
    assert make_cloze_jsonl(text, b, n_docs=10, seed=3) == digest == sha256_file(a)
    assert a.read_bytes() == b.read_bytes()
    assert make_cloze_jsonl(text, c, n_docs=10, seed=4) != digest


def test_cloze_gold_is_the_true_continuation_and_distractors_come_from_other_articles(tmp_path):
    text = wiki_text()
    prose = " ".join(text.split())
    make_cloze_jsonl(text, tmp_path / "c.jsonl", n_docs=12, seed=0, context_words=20, choices=4)
    docs = read_jsonl(tmp_path / "c.jsonl")
    assert len(docs) == 12
    for doc in docs:
        assert set(doc) == {"query", "choices", "gold"}
        choices, gold = doc["choices"], doc["choices"][doc["gold"]]
        assert len(choices) == 4 and len(set(choices)) == 4
        assert 12 <= len(doc["query"].split()) <= 20
        assert doc["query"] + " " + gold in prose  # the context, then the sentence that follows it
        home = article_of(text, doc["query"] + " " + gold)
        for distractor in choices[: doc["gold"]] + choices[doc["gold"] + 1 :]:
            assert distractor != gold and article_of(text, distractor) != home
    assert len({d["gold"] for d in docs}) > 1  # the answer's position is drawn, not fixed


def test_cloze_undoes_wikitext_spacing_and_skips_headings(tmp_path):
    # WikiText's raw form: spaced punctuation, @-@ / @,@ joiners, split possessives, sub-headings
    sentence = " The {0} 's north @-@ east wall , built in 1 @,@ 200 , stood for {1} long years ."
    lines = []
    for name in ("tower", "castle", "bridge"):
        paragraph = "".join(sentence.format(name, n) for n in ("many", "some", "few")) + " "
        lines += [f" = {name.title()} = ", " = = History = = ", paragraph]
    make_cloze_jsonl("\n".join(lines), tmp_path / "c.jsonl", n_docs=3, seed=0, choices=2)
    for doc in read_jsonl(tmp_path / "c.jsonl"):
        flat = doc["query"] + " " + " ".join(doc["choices"])
        assert not any(mark in flat for mark in ("=", "@", " ,", " .", " 's", "History"))
        assert "'s north-east wall, built in 1,200, stood for" in doc["choices"][doc["gold"]]


def test_cloze_rejects_too_little_text(tmp_path):
    with pytest.raises(ValueError, match="fewer than n_docs=500"):
        make_cloze_jsonl(wiki_text(), tmp_path / "c.jsonl", n_docs=500, seed=0)
    with pytest.raises(ValueError, match="choices >= 2"):
        make_cloze_jsonl(wiki_text(), tmp_path / "c.jsonl", n_docs=1, seed=0, choices=1)
    assert not (tmp_path / "c.jsonl").exists()


# -------------------------------------------------------------------------- text docs and YAML


def test_text_jsonl_splits_articles_or_blank_lines(tmp_path):
    text = wiki_text(articles=3)
    make_text_jsonl(text, tmp_path / "t.jsonl")
    docs = [d["text"] for d in read_jsonl(tmp_path / "t.jsonl")]
    assert len(docs) == 3 and all(d.startswith(f"= Article {i} =") for i, d in enumerate(docs))
    assert make_text_jsonl(text, tmp_path / "t2.jsonl", n_docs=2) == sha256_file(tmp_path / "t2.jsonl")
    assert len(read_jsonl(tmp_path / "t2.jsonl")) == 2
    make_text_jsonl("first row\nstill first\n\nsecond row\n\n\n", tmp_path / "t3.jsonl")
    assert read_jsonl(tmp_path / "t3.jsonl") == [{"text": "first row\nstill first"}, {"text": "second row"}]
    with pytest.raises(ValueError, match="n_docs=9"):
        make_text_jsonl(text, tmp_path / "t4.jsonl", n_docs=9)


def test_write_task_yaml_fields(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    make_cloze_jsonl(wiki_text(), jsonl, n_docs=3, seed=0)
    mc = yaml.safe_load(write_task_yaml(tmp_path / "tasks", "my_cloze", jsonl).read_text())
    assert mc["task"] == "my_cloze" and mc["dataset_path"] == "json" and mc["output_type"] == "multiple_choice"
    assert mc["dataset_kwargs"]["data_files"] == {"test": str(jsonl.resolve())} and mc["test_split"] == "test"
    assert (mc["doc_to_text"], mc["doc_to_choice"], mc["doc_to_target"]) == ("{{query}}", "choices", "gold")
    assert [m["metric"] for m in mc["metric_list"]] == ["acc", "acc_norm"]
    rolling = yaml.safe_load(write_task_yaml(tmp_path / "tasks", "my_ppl", jsonl, kind="rolling").read_text())
    assert rolling["output_type"] == "loglikelihood_rolling" and rolling["doc_to_target"] == "text"
    assert "word_perplexity" in [m["metric"] for m in rolling["metric_list"]]
    with pytest.raises(ValueError, match="unknown task kind"):
        write_task_yaml(tmp_path / "tasks", "x", jsonl, kind="generate")
    with pytest.raises(ValueError, match="task name"):
        write_task_yaml(tmp_path / "tasks", "../x", jsonl)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        write_task_yaml(tmp_path / "tasks", "x", tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------ running lm-eval


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory):
    """(model, tokenizer, include_path, cloze docs, text docs) for a tiny random Llama."""
    root = tmp_path_factory.mktemp("lm_eval")
    text = wiki_text(articles=4, paragraphs=2)
    make_cloze_jsonl(text, root / "cloze.jsonl", n_docs=6, seed=0, context_words=24)
    make_text_jsonl(text, root / "text.jsonl")
    write_task_yaml(root / "tasks", "tiny_cloze", root / "cloze.jsonl")
    write_task_yaml(root / "tasks", "tiny_ppl", root / "text.jsonl", kind="rolling")
    tokenizer = tiny_tokenizer(text)
    model = tiny_llama(len(tokenizer))
    return model, tokenizer, root / "tasks", read_jsonl(root / "cloze.jsonl"), read_jsonl(root / "text.jsonl")


@torch.no_grad()
def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    logp = F.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), -1)  # (T, V)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


@torch.no_grad()
def document_nll(model, tokenizer, text: str) -> float:
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    logits = model(torch.tensor([ids])).logits[0, :-1].double()  # (T-1, V): predicts ids[1:]
    return float(F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))


def test_run_lm_eval_local_tasks_match_direct_computation(local_tasks):
    model, tokenizer, include, cloze, texts = local_tasks
    pad_before = tokenizer.pad_token
    metrics = run_lm_eval(model, tokenizer, ["tiny_cloze", "tiny_ppl"], include_path=include, limit=4, batch_size=2)
    assert tokenizer.pad_token == pad_before  # lm-eval sets a pad token on its own copy only
    assert all(math.isfinite(v) for v in metrics.values())

    # multiple choice: argmax of the summed (acc) / per-character (acc_norm) log-likelihood of " " + choice
    acc = acc_norm = 0
    for doc in cloze[:4]:
        lls = [continuation_logprob(model, tokenizer, doc["query"], " " + c) for c in doc["choices"]]
        acc += max(range(len(lls)), key=lambda i: lls[i]) == doc["gold"]
        norm = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
        acc_norm += max(range(len(norm)), key=lambda i: norm[i]) == doc["gold"]
    assert 0.0 <= metrics["tiny_cloze/acc"] <= 1.0 and 0.0 <= metrics["tiny_cloze/acc_norm"] <= 1.0
    assert metrics["tiny_cloze/acc"] == pytest.approx(acc / 4)
    assert metrics["tiny_cloze/acc_norm"] == pytest.approx(acc_norm / 4)
    assert metrics["tiny_cloze/sample_len"] == 4

    # rolling: exp(total NLL of BOS-prefixed documents / total words or bytes)
    docs = [d["text"] for d in texts[:4]]
    nll = sum(document_nll(model, tokenizer, d) for d in docs)
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    assert metrics["tiny_ppl/word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-4)
    assert metrics["tiny_ppl/byte_perplexity"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-4)
    assert metrics["tiny_ppl/bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-4)


def test_run_lm_eval_unknown_task_names_task_and_include_path(local_tasks):
    model, tokenizer, include, _, _ = local_tasks
    with pytest.raises(ValueError, match="no_such_task_xyz") as err:
        run_lm_eval(model, tokenizer, ["tiny_cloze", "no_such_task_xyz"], include_path=include, limit=1)
    assert str(include) in str(err.value) and "tiny_cloze'" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        run_lm_eval(model, tokenizer, ["tiny_cloze"], include_path=include / "missing")
    with pytest.raises(ValueError, match="no tasks"):
        run_lm_eval(model, tokenizer, [], include_path=include)


def test_run_lm_eval_passes_builtin_task_names_to_lm_eval(local_tasks):
    # A built-in name is not rejected here: lm-eval itself loads it, from the Hub (offline: fails there).
    if os.environ.get("HF_DATASETS_OFFLINE") != "1":
        pytest.skip("would download the built-in task's data set")
    model, tokenizer, include, _, _ = local_tasks
    with pytest.raises(ConnectionError, match="EleutherAI/wikitext_document_level"):
        run_lm_eval(model, tokenizer, ["tiny_ppl", "wikitext"], include_path=include, limit=1)


def test_flatten_names_filters_and_drops_non_numbers():
    results = {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A"},
               "cloze": {"acc,none": 1, "acc_stderr,none": 0.1}}
    assert _flatten(results) == {"gsm8k/exact_match.strict-match": 0.25, "cloze/acc": 1.0, "cloze/acc_stderr": 0.1}


# -------------------------------------------------------------------------------- integration


@pytest.mark.integration
def test_smollm2_cloze_on_wikitext_eval_half_is_well_above_chance(smollm2_materialized, tmp_path):
    from quantlib.data import split_halves
    from tasks.sources import load_model, load_tokenizer
    from tasks.textdata import load_text, parse_text_source, tokenize_text

    smollm2_folder, _ = smollm2_materialized
    model, tokenizer = load_model(smollm2_folder), load_tokenizer(smollm2_folder)
    try:
        text = load_text(parse_text_source("wikitext2"))
    except RuntimeError as e:  # no mirror and no Hub
        pytest.skip(f"WikiText-2 not available offline: {e}")
    _, eval_ids = split_halves(tokenize_text(text, tokenizer))
    make_cloze_jsonl(tokenizer.decode(eval_ids), tmp_path / "cloze.jsonl", n_docs=20, seed=0)
    write_task_yaml(tmp_path / "tasks", "wikitext_cloze", tmp_path / "cloze.jsonl")
    metrics = run_lm_eval(model, tokenizer, ["wikitext_cloze"], include_path=tmp_path / "tasks", batch_size=8)
    # chance is 0.25 with 4 choices; measured 0.65 (acc) and 0.75 (acc_norm) on CPU fp32
    assert metrics["wikitext_cloze/sample_len"] == 20
    assert metrics["wikitext_cloze/acc"] > 0.5 and metrics["wikitext_cloze/acc_norm"] > 0.5, metrics
