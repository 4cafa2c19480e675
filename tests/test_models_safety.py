"""Unsafe model directories are refused in one line (exit 2, nothing written, nothing run); a harmless pickle-only
model loads with a note that safetensors is preferred."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tunelab import cli


class RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def model_dirs(tiny_model, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("unsafe")
    state = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    dirs = {}
    for name in ("pickle", "evil", "remote"):
        d = dirs[name] = root / name
        shutil.copytree(tiny_model, d)
    for name in ("pickle", "evil"):
        (dirs[name] / "model.safetensors").unlink()
    torch.save(state, dirs["pickle"] / "pytorch_model.bin")
    torch.save({**state, "model.embed_tokens.weight": RunsCode(str(root / "PWNED"))}, dirs["evil"] / "pytorch_model.bin")
    cfg = json.loads((dirs["remote"] / "config.json").read_text())
    cfg.update(model_type="house_special", auto_map={"AutoConfig": "configuration.HouseConfig",
                                                     "AutoModelForCausalLM": "modeling.HouseModel"})
    (dirs["remote"] / "config.json").write_text(json.dumps(cfg))
    dirs["marker"] = root / "PWNED"
    return dirs


def train_config(tmp_path, model, data, name) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"source": str(model)}, "data": {"train": data, "max_length": 64},
        "training": {"max_steps": 1, "batch_size": 2, "precision": "fp32"},
        "output": {"dir": str(tmp_path / "runs"), "name": name}}))
    return path


@pytest.mark.parametrize("kind, message", [
    ("evil", "refused to load model '.*': its pickle weights hold code, not only tensors"),
    ("remote", "needs its own Python code to load .* set model.trust_remote_code=true"),
])
def test_unsafe_models_are_refused_in_one_line(tmp_path, model_dirs, tiny_chat_data, capsys, kind, message):
    import re

    code = cli.main(["train", str(train_config(tmp_path, model_dirs[kind], tiny_chat_data, kind))])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "runs").exists()
    assert not model_dirs["marker"].exists()  # the pickle's code never ran


def test_pickle_only_model_loads_with_a_note(tmp_path, model_dirs, tiny_chat_data, capsys):
    code = cli.main(["train", str(train_config(tmp_path, model_dirs["pickle"], tiny_chat_data, "pickle"))])
    assert code == 0
    err = capsys.readouterr().err
    assert err.count("has pickle weights only") == 1 and "safetensors is preferred" in err
