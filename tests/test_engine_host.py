"""Host: one base with named adapters, from adapter dirs and run directories; the user errors around them."""

from __future__ import annotations

import shutil

import pytest
import yaml

from tunelab.errors import UserError
from tunelab.inference.engine import GenParams, generate
from tunelab.inference.host import Host


@pytest.fixture(scope="module")
def lora(tiny_model, tmp_path_factory):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                             peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    path = tmp_path_factory.mktemp("host") / "lora"
    pm.save_pretrained(path)
    return str(path)


def make_run(root, name, base, final_from):
    run = root / name
    shutil.copytree(final_from, run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"source": str(base)}}))
    return str(run)


def test_runs_with_adapters_and_full_models(tiny_model, lora, tmp_path):
    run = make_run(tmp_path, "my-run", tiny_model, lora)
    host = Host.load(runs=[run])  # no --model: the run's config names its base
    assert host.names == [host.base_name, "my-run"] and host.default_name == "my-run"
    prompt = ["Once upon a time"]
    with_adapter = generate(host.model, host.tok, prompt, GenParams(max_new_tokens=6))
    host.activate(host.base_name)
    assert generate(host.model, host.tok, prompt, GenParams(max_new_tokens=6)) != with_adapter
    host.activate("my-run")
    assert generate(host.model, host.tok, prompt, GenParams(max_new_tokens=6)) == with_adapter

    full = make_run(tmp_path, "full-run", tiny_model, tiny_model)
    assert Host.load(runs=[full]).names == ["full-run"]


def test_user_errors(tiny_model, lora, tmp_path):
    other = make_run(tmp_path, "other-base", tmp_path / "elsewhere", lora)
    with pytest.raises(UserError, match="share one base"):
        Host.load(tiny_model, runs=[other])
    with pytest.raises(UserError, match="two adapters are named lora"):
        Host.load(tiny_model, adapters=[lora, lora])
    with pytest.raises(UserError, match="no final model"):
        Host.load(tiny_model, runs=[str(tmp_path / "missing")])
    with pytest.raises(UserError, match="exactly one adapter"):
        Host.load(tiny_model, merge=True)
    with pytest.raises(KeyError):
        Host.load(tiny_model).activate("nope")
