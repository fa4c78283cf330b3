"""The release's model card: generated from the records that made the release, deterministic."""
from __future__ import annotations

import yaml

from tasks.card import card_with_metrics, render_card

CHAIN = {"source": {}, "model": "a" * 64, "calib": "b" * 64, "eval": {"wikitext2": "c" * 64},
         "quantized": "d" * 64, "qat": "e" * 64}
CODE = {"fingerprint": "f" * 64, "versions": {"torch": "2.13.0"}, "git_commit": "0123abc", "git_dirty": False}
PARAMS = {"fetch_model": {"source": "hf:org/model@main", "dtype": "bfloat16"},
          "prepare_data": {"calib_source": "wikitext2", "calib_split": "first_half", "n_samples": 128, "seqlen": 512,
                           "seed": 0},
          "quantize": {"bits": 3, "group_size": 64, "sym": False, "targets": ["blocks", "lm_head"]}}
SOURCE = {"source": "hf:org/model@main", "architecture": "LlamaForCausalLM", "kind": "hub", "revision": "9f" * 20}
INFO = {"scheme": "w3g64", "method": "BoAConfig", "modules": ["m.0.q", "m.0.k", "lm_head"],
        "blocks": [{"block": 0, "block_error": 0.02}, {"block": 1, "block_error": 0.05}],
        "head": {"module": "lm_head", "error": 0.003},
        "qat": {"steps": 64, "init_heldout": 1.5, "best_heldout": 1.2, "best_step": 48,
                "config": {"loss": "kl", "trainable": "scales"}}}


def _card(**over):
    kw = dict(name="org/model w3g64", source=SOURCE, params=PARAMS, info=INFO, fmt="gptq_v2", chain=CHAIN, code=CODE)
    return render_card(**(kw | over))


def test_card_front_matter_is_model_card_yaml_naming_the_base_model():
    card = _card()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "org/model" and meta["library_name"] == "transformers"
    assert {"ptq-pipeline", "gptq-v2", "w3g64", "boa+qat"} <= set(meta["tags"])
    assert "base_model" not in yaml.safe_load(_card(source=SOURCE | {"source": "smollm2-135m"}).split("---\n")[1])


def test_card_holds_revision_scheme_calibration_hashes_errors_and_the_rebuild_params():
    card = _card()
    for needle in (SOURCE["revision"], CHAIN["model"], CHAIN["calib"], CHAIN["quantized"], CHAIN["qat"],
                   CODE["fingerprint"], CODE["git_commit"], "128 x 512 tokens", "blocks, lm_head", "`gptq_v2`",
                   "mean 0.035", "largest 0.05 (block 1)", "LM head: Hessian-weighted error 0.003",
                   "1.5 before, 1.2 kept (step 48)", "64 steps, loss `kl`"):
        assert needle in card, needle
    rebuild = card.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(rebuild) == PARAMS  # the params to rebuild it, exactly
    assert "uncommitted" not in card and "uncommitted" in _card(code=CODE | {"git_dirty": True})


def test_card_is_a_function_of_its_inputs():
    assert _card() == _card()
    assert _card() != _card(chain=CHAIN | {"calib": "9" * 64})


def test_card_with_metrics_adds_the_release_and_fp_perplexity():
    metrics = {"ppl": {"wikitext2": 31.5, "python-docs": 20.0}, "fp32_ppl": {"wikitext2": 25.0, "python-docs": 12.5}}
    out = card_with_metrics(_card(), metrics)
    assert out.startswith(_card())
    assert "| wikitext2 | 25.0000 | 31.5000 | 1.2600 |" in out and "| python-docs | 12.5000 | 20.0000 | 1.6000 |" in out
    assert card_with_metrics(_card(), {}) == _card()
