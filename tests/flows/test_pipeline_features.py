"""Pipeline options no other test runs, end to end on the tiny Llama in a fresh clone:
`pack.format: compressed-tensors`, `quantize.spill_to_disk: true`, `evaluate.lm_eval_tasks`
(the offline `ptq_cloze` task) and the off-domain `python-docs` evaluation text. Against the reference project (`clean_project`, same model and
scheme): spilling activations to disk gives the same codes, the compressed-tensors release scores
the perplexity of the GPTQ-format one, lm-eval's scores reach metrics.json and MLflow, and
`ptq lineage` verifies the compressed-tensors release. Its runs start their own temporary Prefect
server, as `ptq run` does by default.
"""
from __future__ import annotations

import json

import pytest

EXTRA = {
    "quantize": {"spill_to_disk": True},
    "pack": {"format": "compressed-tensors"},
    "evaluate": {"lm_eval_tasks": ["ptq_cloze"], "lm_eval_limit": 8},
    "prepare_data": {"eval_sources": ["wikitext2", "python-docs"]},
}


def _rerun(features, tmp_path_factory, name: str, *overrides: str):
    """The features project copied to a fresh folder, then `ptq run -S OVERRIDE ...` in it."""
    import shutil

    from pipeline_projects import Project

    root = tmp_path_factory.mktemp(name) / "project"
    shutil.copytree(features.root, root, symlinks=True)
    project = Project(root, features.env)
    project.run_ok("run", *[a for o in overrides for a in ("-S", o)])
    return project


@pytest.fixture(scope="module")
def features(make_project):
    project = make_project("features", EXTRA, server=False)  # the default: a temporary Prefect server
    project.run_ok()
    return project


def _json(project, rel: str) -> dict:
    return json.loads((project.root / rel).read_text())


def test_spilled_activations_give_the_same_codes(features, clean_project):
    ours, ref = (_json(p, "data/quantized/quantize.json") for p in (features, clean_project))
    assert ours["quantized_sha256"] == ref["quantized_sha256"]


def test_compressed_tensors_release_scores_like_the_gptq_release(features, clean_project):
    config = _json(features, "data/release/config.json")
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert "quantization_config" in _json(clean_project, "data/release/config.json")
    ours, ref = (_json(p, "metrics/metrics.json") for p in (features, clean_project))
    assert {k: ours["fp32_ppl"][k] for k in ref["fp32_ppl"]} == ref["fp32_ppl"]  # ours also scores python-docs
    for name, ppl in ref["ppl"].items():  # the same codes, packed otherwise: the same weights
        assert ours["ppl"][name] == pytest.approx(ppl, rel=1e-5)
    done = features.ptq("lineage", "data/release")
    assert done.returncode == 0 and done.stdout.rstrip().endswith("lineage OK"), done.stdout + done.stderr[-3000:]


def test_python_docs_is_scored_beside_wikitext2(features):
    metrics, tokens = _json(features, "metrics/metrics.json"), _json(features, "data/tokens/tokens.json")
    assert set(metrics["ppl"]) == set(metrics["fp32_ppl"]) == {"wikitext2", "python-docs"}
    assert metrics["primary"] == "wikitext2"  # the first of eval_sources, though JSON sorts python-docs first
    assert metrics["ppl"]["python-docs"] != metrics["ppl"]["wikitext2"]
    assert tokens["eval"]["python-docs"]["windows"][1] == tokens["eval"]["wikitext2"]["windows"][1]
    evaluate = _evaluate_run(features)
    assert evaluate.data.metrics["ppl.python-docs"] == metrics["ppl"]["python-docs"]
    assert evaluate.data.metrics["fp32_ppl.python-docs"] == metrics["fp32_ppl"]["python-docs"]


def _evaluate_run(project):
    """The MLflow run of the evaluate stage that computed (not the cached reruns)."""
    from tasks.mlflow_runs import quiet_mlflow

    quiet_mlflow()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project.root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ptq-pipeline")
    [evaluate] = [r for r in client.search_runs([exp.experiment_id])
                  if r.data.tags.get("ptq.stage") == "evaluate" and r.data.tags.get("ptq.stage_status") == "run"]
    return evaluate


def test_lm_eval_scores_reach_metrics_and_mlflow(features):
    lm = _json(features, "metrics/metrics.json")["lm_eval"]
    acc = {k: v for k, v in lm.items() if k.startswith("ptq_cloze/acc")}
    assert acc and all(0.0 <= v <= 1.0 for k, v in acc.items() if not k.endswith("_stderr"))
    assert lm["ptq_cloze/sample_len"] == EXTRA["evaluate"]["lm_eval_limit"]
    assert {k for k in lm if not k.endswith("sample_len")} <= set(_evaluate_run(features).data.metrics)


@pytest.fixture(scope="module")
def gguf(features, tmp_path_factory):
    """The features project, copied, then `ptq run -S pack.format=gguf`: only pack onwards reruns."""
    import shutil

    from pipeline_projects import Project

    root = tmp_path_factory.mktemp("gguf") / "project"
    shutil.copytree(features.root, root, symlinks=True)
    project = Project(root, features.env)
    return project, project.run_ok("run", "-S", "pack.format=gguf")


def test_gguf_release_holds_the_same_codes_and_scores_like_the_others(gguf, features):
    import gguf as gguf_package

    project, done = gguf
    import re

    assert re.search(r"^quantize\s+up to date", done.stdout, re.M) and re.search(r"^pack\s+ran", done.stdout, re.M), \
        done.stdout
    release = project.root / "data" / "release"
    assert sorted(p.name for p in release.iterdir()) == ["MANIFEST.json", "README.md", "config.json", "model.gguf",
                                                         "quantization.json"]
    types = {t.name: t.tensor_type.name for t in gguf_package.GGUFReader(str(release / "model.gguf")).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_1" and types["token_embd.weight"] == "F16"
    assert "| GGUF type | `exact` |" in (release / "README.md").read_text()
    ours, ref = (_json(p, "metrics/metrics.json") for p in (project, features))
    for name, ppl in ref["ppl"].items():  # Q4_1's min is -s*z rounded to fp16 once: nearly the same weights
        assert ours["ppl"][name] == pytest.approx(ppl, rel=1e-3)
    done = project.ptq("lineage", "data/release")
    assert done.returncode == 0 and done.stdout.rstrip().endswith("lineage OK"), done.stdout + done.stderr[-3000:]


@pytest.fixture(scope="module")
def activations(features, tmp_path_factory):
    """The features project, copied, then `ptq run -S quantize.activations=a4s`: static inputs, the
    path with the most stages involved (the pack stage calibrates the scales); the dynamic scheme's
    release config and loading are tested in tests/tasks/test_release_formats.py."""
    return _rerun(features, tmp_path_factory, "act", "quantize.activations=a4s")


def test_activation_quantization_keeps_the_codes_and_scores_the_release_with_it(activations, features):
    """The weights are solved as before (block tasks from the cache: the same codes); the release
    declares 4-bit static per-tensor inputs and the evaluate stage scores it with them (on the same
    codes, not the weight-only score)."""
    ours, ref = (_json(p, "data/quantized/quantize.json") for p in (activations, features))
    assert ours["quantized_sha256"] == ref["quantized_sha256"]
    inputs = _json(activations, "data/release/config.json")["quantization_config"]["config_groups"]["group_0"][
        "input_activations"]
    assert (inputs["num_bits"], inputs["dynamic"], inputs["strategy"]) == (4, False, "tensor")
    assert _json(activations, "data/release/quantization.json")["activations"] == "a4s"
    ppl, base = (_json(p, "metrics/metrics.json")["ppl"] for p in (activations, features))
    # scored with quantized inputs: another perplexity on every text (this random tiny model is near
    # uniform, so which way it moves is noise: the static a4 inputs happened to score 0.5% better)
    assert all(ppl[name] != base[name] for name in base), (ppl, base)


def test_static_activations_are_calibrated_by_the_pack_stage(activations):
    """a4s: the release carries one input_scale per quantized module, the values quantization.json
    records (a scale the pack stage did not calibrate would fail the release's write)."""
    from safetensors.torch import load_file

    info = _json(activations, "data/release/quantization.json")
    tensors = load_file(str(activations.root / "data" / "release" / "model.safetensors"))
    assert sorted(info["input_scales"]) == sorted(info["modules"])
    for name in info["modules"]:
        assert info["input_scales"][name] > 0
        assert float(tensors[f"{name}.input_scale"]) == pytest.approx(info["input_scales"][name], rel=1e-3)


@pytest.fixture(scope="module")
def rotated(features, tmp_path_factory):
    """The features project, copied, then `ptq run -S fetch_model.rotate=residual -S
    quantize.activations=a4`: every stage reruns on the rotated model, and the release quantizes its
    Linears' inputs per token (the use rotation exists for)."""
    return _rerun(features, tmp_path_factory, "rot", "fetch_model.rotate=residual", "quantize.activations=a4")


def test_rotated_model_is_what_every_stage_quantizes_and_the_release_holds(rotated, features):
    """data/model is the rotated model, recorded against the fetched one; it scores what the fetched
    model scores (FP-exact) while its codes differ; the release holds its other tensors (norms folded
    to 1, the head untied), says so in its card, and its lineage verifies."""
    from safetensors.torch import load_file

    from tasks.inputs import manifest_sha

    rotation = _json(rotated, "data/model/source.json")["rotation"]
    assert (rotation["mode"], rotation["seed"]) == ("residual", 0)
    assert rotation["base_model"] == manifest_sha(features.root / "data" / "model")
    ours, ref = (_json(p, "metrics/metrics.json") for p in (rotated, features))
    for name, ppl in ref["fp32_ppl"].items():
        assert ours["fp32_ppl"][name] == pytest.approx(ppl, rel=1e-4)
    codes = (_json(p, "data/quantized/quantize.json")["quantized_sha256"] for p in (rotated, features))
    assert len(set(codes)) == 2
    release = rotated.root / "data" / "release"
    assert json.loads((release / "config.json").read_text())["tie_word_embeddings"] is False
    norms = {k: v for k, v in load_file(str(release / "model.safetensors")).items() if "norm" in k}
    assert norms and all(bool((v == 1).all()) for v in norms.values())
    assert "`residual` rotation" in (release / "README.md").read_text()
    done = rotated.ptq("lineage", "data/release")
    assert done.returncode == 0 and done.stdout.rstrip().endswith("lineage OK"), done.stdout + done.stderr[-3000:]
    assert "rotated (residual, seed 0)" in done.stdout


@pytest.fixture(scope="module")
def mixed(features, tmp_path_factory):
    """The features project, copied, then `ptq run -S quantize.mixed_from=[w3g32,w8g32]`: a plan at
    the size of the uniform w4g32 the project otherwise makes, in its compressed-tensors release."""
    return _rerun(features, tmp_path_factory, "mixed", "quantize.mixed_from=[w3g32,w8g32]")


def test_mixed_precision_plan_is_an_artifact_the_codes_and_release_follow(mixed, features):
    """data/quantized/mixed_plan.json holds each Linear's scheme and the costs it was chosen from;
    the stored codes follow it, within the uniform scheme's size; the release declares a config group
    per scheme and scores close to the uniform one; its card names the plan and lineage verifies."""
    from safetensors.torch import load_file

    from quantlib.qweight import QuantizedWeight, bits_per_weight

    plan = _json(mixed, "data/quantized/mixed_plan.json")
    info = _json(mixed, "data/quantized/quantize.json")
    assert set(plan["layers"].values()) == {"w3g32", "w8g32"} and plan["candidates"] == ["w3g32", "w8g32"]
    assert info["scheme"] == "mix(w3g32+w8g32)@w4g32" and info["mixed"]["target_bpw"] == plan["target_bpw"]
    assert all(len(u["costs"]) == 2 and u["costs"][0] > u["costs"][1] > 0 for u in plan["units"])
    tensors = load_file(str(mixed.root / "data" / "quantized" / "quantized.safetensors"))
    stored = {n: QuantizedWeight.from_state_dict(tensors, n) for n in info["modules"]}
    assert {n: qw.spec.name for n, qw in stored.items()} == plan["layers"]
    assert bits_per_weight(stored) <= 4 + 20 / 32
    qconfig = _json(mixed, "data/release/config.json")["quantization_config"]
    assert len(qconfig["config_groups"]) == 2
    ours, ref = (_json(p, "metrics/metrics.json") for p in (mixed, features))
    assert ours["ppl"]["wikitext2"] == pytest.approx(ref["ppl"]["wikitext2"], rel=0.05)
    assert ours["ppl"]["wikitext2"] != ref["ppl"]["wikitext2"]
    assert "mixed precision" in (mixed.root / "data" / "release" / "README.md").read_text()
    done = mixed.ptq("lineage", "data/release")
    assert done.returncode == 0 and done.stdout.rstrip().endswith("lineage OK"), done.stdout + done.stderr[-3000:]
