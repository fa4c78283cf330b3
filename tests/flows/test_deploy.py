"""prefect.yaml: every deployment points at a Prefect flow of this checkout and its parameters are
ones that flow accepts (what `prefect deploy --all` would refuse, caught without a server)."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _deployments() -> list[dict]:
    return yaml.safe_load((REPO / "prefect.yaml").read_text(encoding="utf-8"))["deployments"]


@pytest.mark.parametrize("deployment", _deployments(), ids=lambda d: d["name"])
def test_each_deployment_names_a_flow_that_accepts_its_parameters(deployment):
    from prefect import Flow

    path, _, name = deployment["entrypoint"].partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    target = getattr(module, name)
    assert isinstance(target, Flow)
    target.validate_parameters(deployment["parameters"])  # raises on an unknown or mistyped parameter
    assert deployment["work_pool"]["name"] == "ptq-process"


def test_a_deployment_parameter_the_flow_does_not_take_is_caught():
    from prefect.exceptions import ParameterTypeError

    from flows.deploy import ptq_pipeline

    with pytest.raises((ParameterTypeError, TypeError)):
        ptq_pipeline.validate_parameters({"project": ".", "overides": ["quantize.bits=3"]})
