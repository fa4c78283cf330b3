"""flows.params: defaults, overrides, strict validation with key-path messages, export helpers."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from flows.params import (
    METHODS,
    SECTIONS,
    ParamsError,
    PackParams,
    PipelineParams,
    QuantizeParams,
    PrepareDataParams,
    RegisterParams,
    dump_default_params,
    flatten,
    load_params,
    params_from_dict,
    params_to_dict,
    section_keys,
)
from flows.params import _open_interval
from quantlib.windows import _init_method

REPO = Path(__file__).resolve().parents[2]


def _load(tmp_path: Path, text: str = "", overrides: tuple[str, ...] = ()) -> PipelineParams:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return load_params(path, overrides)


def test_defaults_load_from_empty_file(tmp_path: Path) -> None:
    p = _load(tmp_path)
    assert p == PipelineParams()
    assert (p.fetch_model.source, p.fetch_model.trust_remote_code, p.fetch_model.dtype) == (
        "smollm2-135m",
        False,
        "float32",
    )
    d = p.prepare_data
    assert (d.calib_source, d.calib_split, d.n_samples, d.seqlen, d.seed) == ("wikitext2", "first_half", 128, 512, 0)
    assert (d.eval_sources, d.eval_split, d.eval_window, d.eval_windows, d.mirror) == (
        ("wikitext2",),
        "second_half",
        1024,
        16,
        None,
    )
    q = p.quantize
    assert (q.bits, q.group_size, q.sym, q.act_order, q.damp, q.block_size) == (4, 64, False, True, "auto", 128)
    assert (q.true_sequential, q.clip_search, q.batch_size, q.spill_to_disk, q.device) == (True, False, 8, False, "auto")
    assert q.method == "auto" and q.resolved_method == "gptq"
    assert QuantizeParams(bits=3).resolved_method == "recon"
    assert QuantizeParams(bits=2).resolved_method == "recon"
    assert QuantizeParams(bits=3, method="recon").resolved_method == "recon"
    # recon trains on the quantized prefix: FP inputs are refused, naming the auto choice and the fix
    with pytest.raises(ParamsError, match=r"auto is recon at this many bits\): set quantize.inputs: quantized"):
        QuantizeParams(bits=3, inputs="fp")
    assert QuantizeParams(bits=3, inputs="fp", method="boa").resolved_method == "boa"
    # damping auto: 0.1 at 2 and 3 bits, 0.01 above; a number is taken as given at any bits
    assert [QuantizeParams(bits=b).resolved_damp for b in (2, 3, 4, 8)] == [0.1, 0.1, 0.01, 0.01]
    assert QuantizeParams(bits=3, damp=0.05).resolved_damp == QuantizeParams(bits=4, damp=0.05).resolved_damp == 0.05
    assert p.qat.enabled == "auto" and not p.qat.active(4) and p.qat.active(3) and p.qat.active(2)
    # QAT steps and rate auto: 128 at 1e-2 at 2 bits, 64 at 5e-3 above; numbers are taken as given
    assert p.qat.steps == p.qat.lr == "auto"
    assert [(p.qat.resolved_steps(b), p.qat.resolved_lr(b)) for b in (2, 3, 4)] == [(128, 1e-2), (64, 5e-3), (64, 5e-3)]
    given = params_from_dict({"qat": {"steps": 7, "lr": 1e-3}}).qat
    assert (given.resolved_steps(2), given.resolved_lr(2)) == (7, 1e-3)
    from flows.pipeline import qat_config

    assert (qat_config(p.qat, 2).steps, qat_config(p.qat, 2).lr, qat_config(p.qat, 3).steps) == (128, 1e-2, 64)
    # QAT runs every step by default (the best held-out state still ships): patience 3 cut a W3 run
    # whose held-out loss rose before it fell (README); the bench's +qat keeps QATConfig's 3
    assert p.qat.patience == qat_config(p.qat, 3).patience == 0
    assert p.pack.format == "auto" and p.pack.resolved(sym=False) == "gptq_v2" and p.pack.resolved(sym=True) == "gptq"
    assert PackParams(format="gptq").resolved(sym=False) == "gptq"  # an explicit format is kept
    assert q.targets == ("blocks",)
    assert QuantizeParams(targets=["blocks", "lm_head"]).targets == ("blocks", "lm_head")
    assert (p.evaluate.lm_eval_tasks, p.evaluate.lm_eval_limit, p.evaluate.batch_size) == ((), None, 4)
    r = p.register
    assert (r.tracking_uri, r.experiment, r.model_name, r.alias) == (None, "ptq-pipeline", None, "candidate")


def test_missing_keys_and_sections_take_defaults(tmp_path: Path) -> None:
    p = _load(tmp_path, "quantize:\n  bits: 3\nqat:\n")
    assert p.quantize == dataclasses.replace(QuantizeParams(), bits=3)
    assert p.qat == PipelineParams().qat
    assert p.register == RegisterParams()


def test_overrides_parse_as_yaml(tmp_path: Path) -> None:
    p = _load(
        tmp_path,
        "quantize:\n  bits: 4\n",
        (
            "quantize.bits=3",
            "quantize.group_size=null",
            "quantize.damp=1e-3",
            "quantize.sym=true",
            "quantize.device=cuda:1",
            "prepare_data.eval_sources=[wikitext2, c4]",
            "register.tracking_uri=sqlite:///x.db?mode=rw",  # only the first '=' splits
            "evaluate.lm_eval_limit=10",  # section absent from the file
        ),
    )
    assert p.quantize.bits == 3 and type(p.quantize.bits) is int
    assert p.quantize.group_size is None
    assert p.quantize.damp == pytest.approx(1e-3) and type(p.quantize.damp) is float
    assert p.quantize.sym is True
    assert p.quantize.device == "cuda:1"
    assert p.prepare_data.eval_sources == ("wikitext2", "c4")
    assert p.register.tracking_uri == "sqlite:///x.db?mode=rw"
    assert p.evaluate.lm_eval_limit == 10


def test_later_override_wins(tmp_path: Path) -> None:
    assert _load(tmp_path, "", ("quantize.bits=3", "quantize.bits=2")).quantize.bits == 2


def test_float_key_accepts_int() -> None:
    # No int lies in damp's (0, 1), so check the rule itself; `quantize.damp=1` below fails on range, not type.
    value = _open_interval(0, 10)("x.y", 2)
    assert value == 2.0 and type(value) is float


@pytest.mark.parametrize(
    ("text", "overrides", "prefix"),
    [
        ("quantize:\n  grup_size: 64\n", (), "quantize.grup_size: unknown key (allowed: method, bits,"),
        ("", ("quantize.grup_size=64",), "quantize.grup_size: unknown key"),
        ("prepare_dta:\n  seed: 1\n", (), "prepare_dta: unknown section (allowed: fetch_model,"),
        ("", ("prepare_dta.seed=1",), "prepare_dta: unknown section"),
        ("fetch_model:\n  trust_remote_code: 'yes'\n", (), "fetch_model.trust_remote_code: expected bool, got str 'yes'"),
        ("fetch_model:\n  trust_remote_code: yes\n", (), "fetch_model.trust_remote_code: expected bool, got str 'yes'"),
        ("", ("quantize.sym=1",), "quantize.sym: expected bool, got int 1"),
        ("quantize:\n  bits: true\n", (), "quantize.bits: expected int, got bool True"),
        ("quantize:\n  bits: 4.0\n", (), "quantize.bits: expected int, got float 4.0"),
        ("", ("quantize.batch_size=8.5",), "quantize.batch_size: expected int, got float 8.5"),
        ("", ("quantize.bits=9",), "quantize.bits: must be an integer in 2..8, got 9"),
        ("", ("quantize.bits=1",), "quantize.bits: must be an integer in 2..8, got 1"),
        ("", ("quantize.group_size=0",), "quantize.group_size: must be a positive integer or null, got 0"),
        ("", ("quantize.damp=-0.01",), "quantize.damp: must be 'auto' or a number in the open interval (0, 1), got float -0.01"),
        ("", ("quantize.damp=1",), "quantize.damp: must be 'auto' or a number in the open interval (0, 1), got int 1"),
        ("", ("quantize.damp=1.5",), "quantize.damp: must be 'auto' or a number in the open interval (0, 1)"),
        ("", ("quantize.damp=.nan",), "quantize.damp: must be 'auto' or a number in the open interval (0, 1)"),
        ("", ("quantize.damp=high",), "quantize.damp: must be 'auto' or a number in the open interval (0, 1), got str 'high'"),
        ("", ("quantize.method=awq",), "quantize.method: must be one of 'auto', 'rtn', 'gptq', 'boa', 'recon', got str 'awq'"),
        ("", ("quantize.device=gpu",), "quantize.device: must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
        ("", ("fetch_model.dtype=fp8",), "fetch_model.dtype: must be one of"),
        ("", ("fetch_model.source=",), "fetch_model.source: expected str, got null"),
        ("", ("prepare_data.calib_split=second_half",), "prepare_data.calib_split: must be one of"),
        ("", ("prepare_data.eval_window=1",), "prepare_data.eval_window: must be an integer >= 2, got 1"),
        ("", ("prepare_data.eval_windows=0",), "prepare_data.eval_windows: must be a positive integer or null"),
        ("", ("prepare_data.n_samples=-1",), "prepare_data.n_samples: must be a positive integer, got -1"),
        ("", ("prepare_data.eval_sources=wikitext2",), "prepare_data.eval_sources: expected a list of str"),
        ("", ("prepare_data.eval_sources=[a, a]",), "prepare_data.eval_sources: items must be unique"),
        ("", ("evaluate.lm_eval_tasks=[1]",), "evaluate.lm_eval_tasks: item 0 must be a non-empty string"),
        ("", ("pack.format=ggml",), "pack.format: must be one of 'auto', 'gptq', 'gptq_v2', 'compressed-tensors', 'gguf'"),
        ("", ("pack.format=gguf", "quantize.group_size=16"), "pack.format: w4g16: GGUF blocks are 32 weights"),
        ("", ("pack.format=gguf", "quantize.bits=8"), "pack.format: w8g64: asymmetric 8-bit codes have no exact GGUF"),
        ("", ("pack.gguf_type=Q4_K",), "pack.gguf_type: Q4_K is a GGUF type; set pack.format: gguf"),
        ("", ("pack.format=gguf", "pack.gguf_type=Q4_K_M"), "pack.gguf_type: must be one of 'exact', 'Q2_K'"),
        ("", ("quantize.activations=a16",), "quantize.activations: must be a8, a4 (dynamic), a8s, a4s (static) or null"),
        ("", ("quantize.quantized_inputs=true",), "quantize.quantized_inputs: true solves on the inputs"),
        ("", ("fetch_model.rotate=full",), "fetch_model.rotate: full also rotates down_proj's inputs online"),
        ("", ("fetch_model.rotate=spin",), "fetch_model.rotate: must be residual"),
        ("", ("quantize.quantized_inputs=true", "quantize.activations=a8s"),
         "quantize.quantized_inputs: takes dynamic activations"),
        ("", ("quantize.quantized_inputs=true", "quantize.activations=a4", "quantize.method=rtn"),
         "quantize.quantized_inputs: applies to gptq, boa and recon"),
        ("", ("quantize.activations=a8", "pack.format=gptq"), "quantize.activations: a8 needs a release format that "
                                                               "records activation quantization; pack.format gptq cannot"),
        ("", ("quantize.moe_min_tokens=0",), "quantize.moe_min_tokens: must be a positive integer"),
        ("", ("quantize.mixed_from=[w2g64,w3x]",), "quantize.mixed_from: unknown scheme 'w3x'"),
        ("", ("quantize.mixed_from=[w2g64,w2g64]",), "quantize.mixed_from: items must be unique"),
        ("", ("quantize.mixed_bits=2.5",), "quantize.mixed_bits: 2.5 sizes a mixed-precision plan; list its schemes"),
        ("", ("quantize.mixed_from=[w2g64]", "quantize.mixed_bits=0.5"), "quantize.mixed_bits: must be in [1, 16] or null"),
        ("", ("pack.format=gguf", "quantize.sym=true", "quantize.mixed_from=[w2g64s,w8g48s]"),
         "pack.format: w8g48s: GGUF blocks are 32 weights"),
        ("", ("quantize.targets=[blocks,embed]",), "quantize.targets: 'embed' is not a target; allowed: 'blocks', 'lm_head'"),
        ("", ("quantize.targets=[lm_head]",), "quantize.targets: must include 'blocks', got ['lm_head']"),
        ("", ("register.alias=latest",), "register.alias: must be letters"),
        ("", ("register.alias=v3",), "register.alias: must be letters"),
        ("", ("register.model_name=a/b",), "register.model_name: must not contain"),
        ("quantize: 4\n", (), "quantize: expected a mapping of keys, got int 4"),
        ("- quantize\n", (), "params.yaml: expected a mapping of sections"),
        ("quantize: [\n", (), "params.yaml: invalid YAML"),
        ("", ("quantize.bits",), "quantize.bits: malformed override (expected section.key=value)"),
        ("", ("bits=3",), "bits=3: malformed override"),
        ("", ("quantize.=3",), "quantize.=3: malformed override"),
        ("", (".bits=3",), ".bits=3: malformed override"),
        ("", ("quantize.bits.x=3",), "quantize.bits.x=3: malformed override"),
        ("", ("quantize.bits=[",), "quantize.bits: cannot parse override value"),
    ],
)
def test_invalid_params_name_the_key(tmp_path: Path, text: str, overrides: tuple[str, ...], prefix: str) -> None:
    with pytest.raises(ParamsError) as info:
        _load(tmp_path, text, overrides)
    message = str(info.value)
    if prefix.startswith("params.yaml"):
        assert message.startswith(str(tmp_path / "params.yaml") + prefix[len("params.yaml") :])
    else:
        assert message.startswith(prefix), message
    assert isinstance(info.value, ValueError)


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ParamsError, match=r"^quantize\.bits: must be an integer in 2\.\.8, got 9$"):
        QuantizeParams(bits=9)
    with pytest.raises(ParamsError, match=r"^quantize: expected QuantizeParams"):
        PipelineParams(quantize={"bits": 4})  # type: ignore[arg-type]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_accepted(method: str) -> None:
    assert QuantizeParams(method=method).method == method


def test_configs_are_frozen() -> None:
    p = PipelineParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.quantize.bits = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.quantize = QuantizeParams()  # type: ignore[misc]
    assert isinstance(p.prepare_data.eval_sources, tuple)
    hash(p)  # frozen and tuple-valued: hashable


def test_sections_match_pipeline_fields() -> None:
    assert list(SECTIONS) == ["fetch_model", "prepare_data", "quantize", "recon", "qat", "pack", "evaluate", "register",
                             "orchestration"]
    assert all(cls.SECTION == name for name, cls in SECTIONS.items())


def test_committed_params_yaml_is_the_defaults() -> None:
    assert load_params(REPO / "params.yaml") == PipelineParams()


def test_default_dump_round_trips_with_one_comment_per_section() -> None:
    text = dump_default_params()
    assert params_from_dict(yaml.safe_load(text)) == PipelineParams()
    for name in SECTIONS:
        before = text.split(f"\n{name}:\n")[0].rstrip("\n").splitlines()
        assert before[-1].startswith("# "), name


def test_params_to_dict_is_plain_and_round_trips() -> None:
    p = params_from_dict({"quantize": {"bits": 3, "group_size": None}, "evaluate": {"lm_eval_tasks": ["arc"]}})
    d = params_to_dict(p)
    assert d["quantize"]["bits"] == 3 and d["evaluate"]["lm_eval_tasks"] == ["arc"]
    assert params_from_dict(yaml.safe_load(yaml.safe_dump(d))) == p  # safe_dump: no python tags


def test_flatten_gives_overrides_that_round_trip(tmp_path: Path) -> None:
    p = params_from_dict(
        {"quantize": {"group_size": None, "damp": 1e-5}, "prepare_data": {"eval_sources": ["a", "b"]}}
    )
    flat = flatten(params_to_dict(p))
    assert flat["quantize.bits"] == "4"
    assert flat["quantize.group_size"] == "null"
    assert flat["quantize.sym"] == "false"
    assert flat["prepare_data.eval_sources"] == '["a", "b"]'
    assert flatten({"a": {"b": {"c": 1}}}) == {"a.b.c": "1"}
    assert _load(tmp_path, "", tuple(f"{k}={v}" for k, v in flat.items())) == p


def test_section_keys() -> None:
    assert section_keys("qat")[:3] == ["qat.enabled", "qat.trainable", "qat.loss"]
    assert section_keys("recon")[:3] == ["recon.window", "recon.overlap", "recon.lookahead"]
    assert section_keys("quantize")[:3] == ["quantize.method", "quantize.bits", "quantize.group_size"]
    with pytest.raises(ParamsError, match="^nope: unknown section"):
        section_keys("nope")


def test_auto_release_format_follows_every_scheme_of_a_mixed_plan() -> None:
    """GPTQ v1 cannot hold asymmetric zeros of 0, so auto writes it only when every scheme a Linear
    may get is symmetric: one asymmetric candidate makes it gptq_v2."""
    from flows.params import PackParams, QuantizeParams

    assert QuantizeParams(sym=True).all_sym and QuantizeParams(sym=True, mixed_from=("w2g64s", "w4pcs")).all_sym
    mixed = QuantizeParams(sym=True, mixed_from=("w2g64s", "w4g64"))
    assert not mixed.all_sym and PackParams().resolved(mixed.all_sym) == "gptq_v2"


def test_null_resolution() -> None:
    assert PrepareDataParams().resolved_mirror({}) is None
    assert PrepareDataParams().resolved_mirror({"PTQ_DATA_MIRROR": "/m"}) == "/m"
    assert PrepareDataParams(mirror="/x").resolved_mirror({"PTQ_DATA_MIRROR": "/m"}) == "/x"
    root = Path("/proj")
    assert RegisterParams().resolved_tracking_uri(root, {}) == "sqlite:////proj/mlflow.db"
    assert RegisterParams().resolved_tracking_uri(root, {"MLFLOW_TRACKING_URI": "http://h"}) == "http://h"
    assert RegisterParams(tracking_uri="sqlite:///a.db").resolved_tracking_uri(root, {}) == "sqlite:///a.db"


@pytest.mark.parametrize("body, message", [
    ({"recon": {"window": 2, "overlap": 2}}, "recon.overlap: must be smaller than recon.window"),
    ({"recon": {"rank": 0}}, "recon.rank"),
    ({"recon": {"lr": -1e-3}}, "recon.lr"),
    ({"recon": {"learn_weights": True}}, "recon.learn_weights"),
    ({"qat": {"heldout": 1.0}}, "qat.heldout"),
    ({"qat": {"enabled": "yes"}}, "qat.enabled: expected true, false or 'auto'"),
    ({"qat": {"trainable": "everything"}}, "qat.trainable"),
    ({"qat": {"steps": -1}}, "qat.steps: must be 'auto' or an integer >= 0"),
    ({"qat": {"lr": "fast"}}, "qat.lr: must be 'auto' or a positive number"),
    ({"qat": {"amp": "fp16"}}, "qat.amp"),
    ({"recon": {"amp": "half"}}, "recon.amp"),
])
def test_bad_recon_and_qat_settings_name_the_key(body, message) -> None:
    with pytest.raises(ParamsError, match=message.replace(".", r"\.")):
        params_from_dict(body)


def test_recon_and_qat_sections_build_their_quantlib_configs() -> None:
    from flows.pipeline import qat_config, quantize_job

    p = params_from_dict({"quantize": {"method": "recon", "device": "cpu"}, "recon": {"window": 3, "overlap": 1,
                                                                                      "lookahead": 2, "iters": 7,
                                                                                      "amp": "bf16"},
                          "qat": {"enabled": True, "steps": 5, "trainable": "scales+zeros", "amp": "fp32"}})
    cfg = quantize_job(p.quantize, p.recon).method
    assert (cfg.window, cfg.overlap, cfg.lookahead, cfg.iters, cfg.amp) == (3, 1, 2, 7, "bf16")
    assert quantize_job(p.quantize, p.recon).engine.act_inputs is None
    q_in = params_from_dict({"quantize": {"method": "recon", "device": "cpu", "activations": "a4",
                                          "quantized_inputs": True}})
    assert quantize_job(q_in.quantize, q_in.recon).engine.act_inputs == "a4"  # the windows train on a4 inputs
    q = qat_config(p.qat, 4)
    assert (q.steps, q.lr, q.trainable, q.amp) == (5, 5e-3, "scales+zeros", "fp32")
    # the section's defaults are the 2-bit recipe of the README: SignRound's update in single-block windows
    d = quantize_job(QuantizeParams(bits=2, device="cpu"), params_from_dict({}).recon).method
    assert (d.window, d.overlap, d.rounding, d.optimizer, d.schedule, d.loss, d.init, d.frozen_grid) == \
        (1, 0, "signed", "sign", "linear", "mse", "rtn", False)
    assert (d.iters, d.batch_size, d.lr, d.clip_lr) == (100, 4, 1e-2, 0.3)


def test_damp_auto_reaches_every_hessian_solver_by_bits() -> None:
    from flows.pipeline import quantize_job

    from quantlib.head import head_method

    for quantize, damp in [({"bits": 3, "method": "boa"}, 0.1), ({"bits": 4}, 0.01),
                           ({"bits": 3, "method": "gptq"}, 0.1), ({"bits": 4, "method": "boa"}, 0.01),
                           ({"bits": 3, "damp": 0.05, "method": "boa"}, 0.05)]:
        p = params_from_dict({"quantize": quantize})
        assert quantize_job(p.quantize, p.recon).method.damp == damp, quantize
    for init in ("gptq", "boa"):  # recon (auto at 2 and 3 bits) passes it to the solver its windows start from
        p = params_from_dict({"quantize": {"bits": 2}, "recon": {"init": init}})
        cfg = quantize_job(p.quantize, p.recon).method
        assert cfg.init_damp == 0.1 and _init_method(cfg).damp == 0.1
    p = params_from_dict({"quantize": {"bits": 3}})
    cfg = quantize_job(p.quantize, p.recon).method
    assert cfg.init == "rtn" and head_method(cfg).damp == 0.1  # and to the GPTQ solve of an RTN start's head


def test_params_offer_exactly_the_amp_modes_quantlib_runs() -> None:
    from flows.params import AMP_MODES
    from quantlib.optim import AMP_MODES as RUN

    assert AMP_MODES == RUN


def test_params_offer_exactly_the_roundings_and_optimizers_windows_run() -> None:
    from flows.params import RECON_OPTIMIZERS, ROUNDINGS
    from quantlib.optim import OPTIMIZERS
    from quantlib.recon import ROUNDINGS as RUN

    assert ROUNDINGS == RUN and RECON_OPTIMIZERS == OPTIMIZERS


def test_params_offer_exactly_the_gguf_types_quantlib_writes() -> None:
    from flows.params import GGUF_TYPES
    from quantlib.gguf_k import GGUF_TYPES as WRITTEN

    assert GGUF_TYPES == WRITTEN


def test_activations_make_auto_pack_compressed_tensors(tmp_path) -> None:
    """The one release format that records activation quantization is what `auto` writes with it."""
    from flows.params import PipelineParams, load_params

    (tmp_path / "params.yaml").write_text("")
    p = load_params(tmp_path / "params.yaml", ["quantize.activations=a8", "quantize.bits=8", "quantize.sym=true"])
    assert p.pack.resolved(p.quantize.sym, p.quantize.activations) == "compressed-tensors"
    assert PipelineParams().pack.resolved(True) == "gptq"


def test_quantized_inputs_reach_every_block_job(tmp_path) -> None:
    """quantize.quantized_inputs puts the activation scheme into the engine config each block task
    solves with (and that its cache key holds); off, the blocks are solved on float inputs."""
    from flows.params import PipelineParams, load_params
    from flows.pipeline import quantize_job

    (tmp_path / "params.yaml").write_text("")
    p = load_params(tmp_path / "params.yaml", ["quantize.activations=a4", "quantize.quantized_inputs=true"])
    assert quantize_job(p.quantize, p.recon).engine.act_inputs == "a4"
    off = load_params(tmp_path / "params.yaml", ["quantize.activations=a4"])
    assert quantize_job(off.quantize, off.recon).engine.act_inputs is None
    assert quantize_job(PipelineParams().quantize, PipelineParams().recon).engine.act_inputs is None


def test_rotation_of_a_family_that_cannot_rotate_is_refused_with_the_fix(tmp_path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from flows.params import FetchModelParams
    from flows.pipeline import _check_rotatable

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=16)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"cannot be rotated: rotation supports .*set fetch_model.rotate: null"):
        _check_rotatable(str(tmp_path), FetchModelParams(source=str(tmp_path), rotate="residual"))
