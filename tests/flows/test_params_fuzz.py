"""Property-based tests (hypothesis) of params.yaml and `-S` overrides: every invalid value is refused
before any stage runs, with a ParamsError that starts with the offending key; every value the loader
accepts survives the round trip params.yaml writes (`ptq run -S` and `--rebuild` rewrite the file)
and the flattening MLflow records."""
from __future__ import annotations

import json
import re
from dataclasses import fields

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.params import SECTIONS, ParamsError, PipelineParams, dump_params, flatten, load_params, params_to_dict

KEYS = [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in fields(cls)]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**9, 10**9),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["auto", "gptq", "boa", "rtn", "recon", "true", "null", "1e3", "0x10", "yes",
                                     "~", "", " ", "cpu", "cuda:0", "wikitext2", "smollm2-135m"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                        max_size=2), max_leaves=4)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _params_file(tmp_path, body: dict) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def _names_a_key(message: str, key: str) -> bool:
    """A ParamsError names the offending key (or, for a cross-key rule, another key of its section)."""
    section = key.split(".")[0]
    return message.startswith(key) or bool(re.match(rf"{section}(\.\w+)?\b", message))


@pytest.mark.reliability(
    fault='300 random values (any YAML type, NaN, Inf, odd strings) for random keys of params.yaml',
    sees='ParamsError starting with the key and its rule, before any stage',
    kept="accepted values read back unchanged from the params.yaml `ptq run -S` writes and from MLflow's flat params")
@FUZZ
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_any_value_in_params_yaml_is_refused_naming_its_key_or_round_trips(tmp_path, key, value):
    section, name = key.split(".")
    _refused_or_round_trips(tmp_path, key, lambda: load_params(_params_file(tmp_path, {section: {name: value}})))


@pytest.mark.reliability(
    fault='300 random `-S section.key=value` overrides, as YAML and as JSON text',
    sees='ParamsError starting with the key (unparseable text included), exit 2',
    kept='params.yaml untouched when refused; accepted values round-trip')
@FUZZ
@given(key=st.sampled_from(KEYS), value=VALUES, as_json=st.booleans())
def test_any_override_is_refused_naming_its_key_or_round_trips(tmp_path, key, value, as_json):
    # JSON text is YAML too, with every string quoted: -S register.experiment='"1e3"' is the string 1e3
    text = json.dumps(value) if as_json else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix(
        "...").strip()
    _refused_or_round_trips(tmp_path, key, lambda: load_params(_params_file(tmp_path, {}), [f"{key}={text}"]))


@pytest.mark.reliability(
    fault='random unknown keys in each section',
    sees='`section.key: unknown key (allowed: ...)`',
    kept='-')
@FUZZ
@given(section=st.sampled_from(list(SECTIONS)), name=st.from_regex(r"[a-z_]{1,12}", fullmatch=True))
def test_unknown_keys_are_refused_by_name(tmp_path, section, name):
    if name in {f.name for f in fields(SECTIONS[section])}:
        return
    with pytest.raises(ParamsError, match=rf"^{section}\.{name}: unknown key"):
        load_params(_params_file(tmp_path, {section: {name: 1}}))


def _refused_or_round_trips(tmp_path, key: str, load) -> None:
    """load() raises a ParamsError naming `key`, or its params survive both round trips."""
    try:
        params = load()
    except ParamsError as e:
        assert _names_a_key(str(e), key), str(e)
        return
    _round_trips(tmp_path, params)


def _round_trips(tmp_path, params: PipelineParams) -> None:
    again = tmp_path / "again.yaml"
    again.write_text(dump_params(params), encoding="utf-8")
    assert load_params(again) == params  # what `ptq run -S` writes reads back as the same params
    overrides = [f"{key}={text}" for key, text in flatten(params_to_dict(params)).items()]
    assert load_params(_params_file(tmp_path, {}), overrides) == params  # MLflow's flat params parse back
