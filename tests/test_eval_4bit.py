"""`tunelab eval` / `tunelab compare` with --load-in-4bit: an adapter on the 4-bit (NF4) base beside the merged model."""

import json

import pytest

from tunelab.cli import main as cli


@pytest.fixture(scope="module")
def run_and_merged(tiny_model, tmp_path_factory):
    """A finished run (LoRA adapter in final/ over the tiny base) and the same adapter merged into a full model."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("q4")
    run = root / "tiny-qlora"
    run.mkdir()
    (run / "config.yaml").write_text(f"model:\n  source: {tiny_model}\n")
    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(run / "final")
    merged = root / "merged"
    model.merge_and_unload().save_pretrained(merged)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(merged)
    return run, merged


def perplexities(out_dir) -> dict:
    data = json.loads((out_dir / "report.json").read_text())
    return {r["label"]: r["tasks"]["perplexity"]["perplexity"] for r in data["results"]}


def test_compare_scores_the_adapter_on_a_4bit_base_beside_the_merged_model(run_and_merged, tmp_path, capsys):
    run, merged = run_and_merged
    common = ["--task", "perplexity", "--n", "4", "--batch-size", "2"]
    assert cli(["compare", str(run), str(merged), *common, "--out", str(tmp_path / "full")]) == 0
    full = perplexities(tmp_path / "full")
    assert full["tiny-qlora"] == pytest.approx(full[str(merged)], rel=1e-4)  # merging changes nothing in float32
    capsys.readouterr()
    assert cli(["compare", str(run), str(merged), *common, "--load-in-4bit", str(run),
                "--out", str(tmp_path / "q4")]) == 0
    out = capsys.readouterr().out
    assert "evaluating tiny-qlora: run" in out and "(base in 4 bits)" in out.split("evaluating tiny-qlora")[1]
    assert "(base in 4 bits)" not in out.split("evaluating " + str(merged))[1].splitlines()[0]
    q4 = perplexities(tmp_path / "q4")
    assert q4[str(merged)] == pytest.approx(full[str(merged)], rel=1e-4)  # the merged model as it was
    # NF4 rounds the base: close to, not equal to, the full-precision score
    assert q4["tiny-qlora"] != pytest.approx(full["tiny-qlora"], rel=1e-4)
    assert q4["tiny-qlora"] == pytest.approx(full["tiny-qlora"], rel=0.2)
    settings = json.loads((tmp_path / "q4" / "report.json").read_text()).get("settings", {})
    assert settings.get("load_in_4bit") == [str(run)]


def test_eval_loads_the_base_in_4bit(run_and_merged, tmp_path):
    from tunelab.evaluation.main import load

    run, _ = run_and_merged
    model, _ = load({"label": "x", "model": None, "adapter": None, "run": str(run)}, load_in_4bit=True)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" in kinds and any("lora" in k.lower() for k in kinds)
    out = tmp_path / "ppl.json"
    assert cli(["eval", "--run", str(run), "--task", "perplexity", "--n", "4", "--load-in-4bit", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["settings"]["load_in_4bit"] is True and data["results"][0]["tasks"]["perplexity"]["perplexity"] > 1


def test_compare_refuses_a_4bit_name_it_does_not_compare(run_and_merged, capsys):
    run, merged = run_and_merged
    assert cli(["compare", str(run), str(merged), "--task", "perplexity", "--load-in-4bit", "nope",
                "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--load-in-4bit nope" in err[0]
