"""flows.context: a stage reads only the params and paths flows/stages.py declares for it."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from flows import stages as S
from flows.context import ParamsView, StageContext, UndeclaredInputError
from flows.params import PipelineParams, params_from_dict
from flows.pipeline import STAGE_FUNCTIONS


def _ctx(stage: S.Stage, root: Path, params: PipelineParams | None = None) -> StageContext:
    params = params or PipelineParams()
    return StageContext(stage=stage, root=root, params=ParamsView(params, stage), cache=root / ".cache/ptq")


def test_declared_keys_read_and_undeclared_keys_fail_naming_them(tmp_path):
    qat = S.get_stage("qat")
    view = _ctx(qat, tmp_path).params
    assert view.quantize.bits == 4 and view.qat.steps == "auto"
    assert view.qat.active(4) is False  # a method of a wholly declared section
    with pytest.raises(UndeclaredInputError, match="stage qat reads quantize.group_size, which flows/stages.py"):
        view.quantize.group_size
    with pytest.raises(UndeclaredInputError, match=r"quantize.resolved_method \(reads the whole section\)"):
        view.quantize.resolved_method  # a property may read any key of its section
    with pytest.raises(UndeclaredInputError, match="stage qat reads pack.format"):
        view.pack.format


def test_declared_gives_only_the_declared_keys_as_plain_data():
    params = params_from_dict({"quantize": {"bits": 3}, "prepare_data": {"eval_sources": ["wikitext2"]}})
    view = ParamsView(params, S.get_stage("evaluate"))
    declared = view.declared()
    assert declared["prepare_data"] == {"eval_sources": ["wikitext2"], "mirror": None}
    assert set(declared) == {"evaluate", "prepare_data", "fetch_model"}
    assert declared["fetch_model"] == {"dtype": "float32", "trust_remote_code": False}
    json.dumps(declared)  # plain JSON data


def test_paths_must_be_declared(tmp_path):
    ctx = _ctx(S.get_stage("pack"), tmp_path)
    assert ctx.path(S.QAT) == tmp_path / S.QAT and ctx.path(S.RELEASE) == tmp_path / S.RELEASE
    assert ctx.path("metrics/stages/pack.json") == tmp_path / "metrics/stages/pack.json"
    with pytest.raises(UndeclaredInputError, match=f"stage pack uses {S.QUANTIZED}"):
        ctx.path(S.QUANTIZED)


def test_a_real_stage_reading_an_undeclared_param_fails_before_any_work(tmp_path):
    # the qat stage decides by the number of bits: without `quantize.bits` declared it must fail
    # before it reads or writes a file
    stage = dataclasses.replace(S.get_stage("qat"), params=("qat",))
    with pytest.raises(UndeclaredInputError, match="stage qat reads quantize.bits"):
        STAGE_FUNCTIONS["qat"](_ctx(stage, tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_a_real_stage_using_an_undeclared_path_fails(tmp_path):
    # the inputs stage without its output declared cannot write it
    stage = dataclasses.replace(S.get_stage("inputs"), outs=())
    with pytest.raises(UndeclaredInputError, match=f"stage inputs uses {S.INPUTS}"):
        STAGE_FUNCTIONS["inputs"](_ctx(stage, tmp_path))
    assert not (tmp_path / S.INPUTS).exists()
