"""An adapter loaded over a base model it was not trained on is one line naming the base it was trained on (exit 2),
not PEFT's page of size mismatches: eval, chat, serve and export load adapters through models.load_adapter."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_model
from tunelab import cli


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(path)
    return str(path)


def wider(tmp_path):
    """A Llama with other layer sizes than the tiny one (hidden 32)."""
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(tmp_path / "wide")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(hidden_size=32, intermediate_size=64)
    (path / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    from transformers import AutoConfig

    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).save_pretrained(path)
    return path


@pytest.mark.parametrize("base, why", [(wider, "its layers have other sizes"),
                                       (lambda p: build_tiny_model(p / "gpt2", arch="gpt2"),
                                        "it targets layers this model lacks")])
def test_adapter_over_another_base_is_one_line(tmp_path, tiny_model, adapter, capsys, base, why):
    other = base(tmp_path)
    capsys.readouterr()  # the test's own model writing
    code = cli.main(["eval", "--model", str(other), "--adapter", adapter, "--task", "perplexity", "--n", "1",
                     "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"does not fit {other}" in err and why in err and f"trained on {tiny_model}" in err, err
    assert not (tmp_path / "r.json").exists()
