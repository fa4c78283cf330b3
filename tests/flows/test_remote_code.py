"""trust_remote_code is honoured by every load of a run, not only by fetch: a model whose config
and class exist only as code in its folder goes through every stage with
fetch_model.trust_remote_code true, and is refused, naming the param, without it."""
from __future__ import annotations

import json
import shutil

import pytest

from pipeline_projects import release_files

_CONFIG_PY = '''from transformers import LlamaConfig


class PtqRemoteConfig(LlamaConfig):
    model_type = "ptq_remote_llama"
'''
_MODELING_PY = '''from transformers import LlamaForCausalLM

from .configuration_ptq_remote import PtqRemoteConfig


class PtqRemoteForCausalLM(LlamaForCausalLM):
    config_class = PtqRemoteConfig
'''


@pytest.fixture(scope="module")
def remote_source(tiny_source, tmp_path_factory):
    """The tiny Llama as a remote-code model: a model_type transformers does not know, whose config
    and model classes are .py files in the folder (loadable only with trust_remote_code)."""
    folder = tmp_path_factory.mktemp("remote") / "tiny-remote"
    shutil.copytree(tiny_source, folder)
    (folder / "MANIFEST.json").unlink(missing_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="ptq_remote_llama", architectures=["PtqRemoteForCausalLM"],
                  auto_map={"AutoConfig": "configuration_ptq_remote.PtqRemoteConfig",
                            "AutoModelForCausalLM": "modeling_ptq_remote.PtqRemoteForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_ptq_remote.py").write_text(_CONFIG_PY)
    (folder / "modeling_ptq_remote.py").write_text(_MODELING_PY)
    return folder


@pytest.mark.reliability(
    fault='a remote-code model (config and model classes as .py files in its folder)',
    sees='without fetch_model.trust_remote_code: refused at fetch, naming trust_remote_code; with it: every stage '
         '(tokenizer, skeleton, QAT, pack, both perplexities) loads with the remote code',
    kept='the release carries the model\'s .py files, so a reader can load it the same way')
def test_a_remote_code_model_runs_every_stage_only_with_trust_remote_code(make_project, remote_source):
    refused = make_project("remote-refused", {"fetch_model": {"source": str(remote_source)}})
    done = refused.ptq("run")
    assert done.returncode != 0 and "trust_remote_code" in done.stderr, done.stderr[-3000:]
    assert not (refused.root / "data" / "model").exists()
    trusted = make_project("remote-trusted", {"fetch_model": {"source": str(remote_source), "trust_remote_code": True},
                                              "qat": {"enabled": True, "steps": 2, "eval_every": 1}})
    trusted.run_ok()
    files = release_files(trusted.release)
    assert {"configuration_ptq_remote.py", "modeling_ptq_remote.py"} <= set(files)
    assert json.loads(files["config.json"])["model_type"] == "ptq_remote_llama"
    metrics = json.loads((trusted.root / "metrics" / "metrics.json").read_text())
    assert all(v > 1 for v in [*metrics["ppl"].values(), *metrics["fp32_ppl"].values()])
    assert json.loads((trusted.root / "data" / "qat" / "quantize.json").read_text())["qat"] is not None
