"""FastDropout (the CPU dropout in front of LoRA adapters): same statistics and gradients as dropout, seeded."""

from __future__ import annotations

import pytest
import torch

from tunelab.dropout import FastDropout, use_fast_dropout


def test_drops_with_probability_p_and_rescales():
    drop = FastDropout(0.1).train()
    y = drop(torch.ones(2_000_000))
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(0.1, abs=0.002)
    values = torch.unique(y).tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.9, rel=1e-3)
    assert y.mean().item() == pytest.approx(1.0, abs=0.003)  # expectation preserved


def test_gradient_is_the_same_mask_and_scale():
    drop = FastDropout(0.3).train()
    x = torch.randn(64, 33, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    kept = y != 0
    assert torch.equal(x.grad != 0, kept)
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], drop.scale))
    assert torch.allclose(y[kept], x.detach()[kept] * drop.scale)


def test_seeded_like_torch_and_identity_in_eval():
    drop = FastDropout(0.5).train()
    x = torch.ones(1000, dtype=torch.bfloat16)
    torch.manual_seed(3)
    a, b = drop(x), drop(x)
    torch.manual_seed(3)
    assert torch.equal(drop(x), a) and not torch.equal(a, b)  # same seed, same masks; fresh draws each call
    assert a.dtype == torch.bfloat16
    assert drop.eval()(x) is x and FastDropout(0.0).train()(x) is x
    with pytest.raises(ValueError):
        FastDropout(1.0)


def test_replaces_lora_dropout_only(tiny_model):
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"))
    keys = set(peft.get_peft_model_state_dict(model))
    replaced = use_fast_dropout(model)
    assert replaced == 2 * 7  # two layers x seven projections
    assert not any(type(m) is torch.nn.Dropout and m.p > 0 for m in model.modules() if m is not model)
    assert set(peft.get_peft_model_state_dict(model)) == keys  # nothing about the saved adapter changes
    model.train()
    out = model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]]))
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)
