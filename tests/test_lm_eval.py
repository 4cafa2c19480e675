"""lm-evaluation-harness tasks through `tunelab eval` / `compare` (`--task lm-eval:...`), offline on local task YAMLs
with local data (tests/assets/lm_eval): a log-likelihood multiple-choice task checked against log-likelihoods computed
here, a generate-until task checked against greedy generation, adapters and runs through the harness' `peft=`, and
the harness' `local-chat-completions` client against `tunelab serve`."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import make_adapter

from tunelab.cli import main as cli

TASKS = Path(__file__).parent / "assets" / "lm_eval"
needs_lmeval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                  reason="lm-evaluation-harness is not installed (pip install -e '.[lmeval]')")


@pytest.fixture()
def in_tasks_dir(monkeypatch):
    # the task YAMLs name their data files relative to the directory the command runs in, as lm_eval reads them
    monkeypatch.chdir(TASKS)


def choice_loglikelihoods(model_dir: str, adapter: str | None = None) -> list[list[float]]:
    """Sum of log-probabilities of each choice's tokens after its question, computed here with transformers (the
    harness splits context and continuation the same way: the continuation is what encoding both adds)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    out = []
    for line in (TASKS / "mc.jsonl").read_text().splitlines():
        doc = json.loads(line)
        ctx = f"Question: {doc['question']}\nAnswer:"
        row = []
        for choice in doc["choices"]:
            ctx_ids = tok.encode(ctx)
            ids = tok.encode(ctx + " " + choice)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            row.append(sum(logp[i - 1, ids[i]].item() for i in range(len(ctx_ids), len(ids))))
        out.append(row)
    return out


def test_missing_harness_is_refused_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed: `import lm_eval` raises ImportError
    assert cli(["eval", "--task", "lm-eval:arc_easy", "--task", "gsm8k"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install -e '.[lmeval]'" in err


@needs_lmeval
@pytest.mark.parametrize("argv, message", [
    (["--task", "lm-eval:no/such/task.yaml"], "task file no/such/task.yaml does not exist"),
    (["--task", "lm-eval:"], "name a harness task"),
    (["--task", "lm-eval:mc_task.yaml", "--lm-eval-include", "no-such-dir"], "not a folder"),
    (["--task", "rouge"], "unknown task 'rouge'"),
])
def test_bad_lm_eval_tasks_are_refused_before_loading(argv, message, in_tasks_dir, capsys):
    assert cli(["eval", *argv]) == 2
    assert message in capsys.readouterr().err


@needs_lmeval
def test_registry_task_without_reachable_data_is_refused_in_one_line(capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # as on a machine without network: arc_easy's data is on the Hub
    assert cli(["eval", "--task", "lm-eval:arc_easy"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "arc_easy: could not be loaded" in err and "data_files" in err


@needs_lmeval
def test_task_whose_data_file_is_missing_is_refused(tmp_path, monkeypatch, capsys):
    task = tmp_path / "t.yaml"
    task.write_text((TASKS / "mc_task.yaml").read_text())
    monkeypatch.chdir(tmp_path)  # mc.jsonl is not here
    assert cli(["eval", "--task", f"lm-eval:{task}"]) == 2
    assert "data_files names mc.jsonl, which does not exist" in capsys.readouterr().err


@needs_lmeval
def test_multiple_choice_task_matches_direct_loglikelihoods(tiny_model, in_tasks_dir, tmp_path):
    out = tmp_path / "report"
    assert cli(["eval", "--model", tiny_model, "--task", "lm-eval:mc_task.yaml", "--task", "perplexity", "--n", "4",
                "--batch-size", "4", "--out", str(out)]) == 0
    tasks = json.loads((out / "report.json").read_text())["results"][0]["tasks"]
    assert set(tasks) == {"perplexity", "lm-eval:tunelab_mc"}  # harness and tunelab tasks in one report
    mc = tasks["lm-eval:tunelab_mc"]
    direct = choice_loglikelihoods(tiny_model)
    golds = [json.loads(line)["gold"] for line in (TASKS / "mc.jsonl").read_text().splitlines()]
    assert mc["n"] == 4 and len(mc["examples"]) == 4
    for ex in mc["examples"]:
        i = ex["doc_id"]
        assert ex["loglikelihoods"] == pytest.approx(direct[i], abs=1e-3)
        picked = max(range(len(direct[i])), key=direct[i].__getitem__)
        assert ex["acc"] == float(picked == golds[i])
    # each gold answer is one short word beside sentences: any model finds it likelier, so accuracy is 1
    assert mc["acc"] == 1.0 == sum(ex["acc"] for ex in mc["examples"]) / 4
    assert mc["acc stderr"] == 0.0
    md = (out / "report.md").read_text()
    assert "| lm-eval:tunelab_mc | acc | 1.0000 |" in md and "| perplexity | perplexity |" in md
    assert "## lm-eval:tunelab_mc: examples side by side" in md and "acc 1.0000" in md


@needs_lmeval
def test_generate_until_task_matches_greedy_generation(tiny_model, in_tasks_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.evaluation.main import evaluate

    res = evaluate("lm-eval:gen_task.yaml", model=tiny_model, batch_size=1)
    assert res["n"] == 3 and set(res["metrics"][0]) == {"exact_match", True}
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    docs = [json.loads(line) for line in (TASKS / "gen.jsonl").read_text().splitlines()]
    for ex in res["examples"]:
        doc = docs[ex["doc_id"]]
        ids = tok(f"Q: {doc['question']}\nA:", return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]
        assert ex["output"] == text and ex["reference"] == doc["answer"]
        assert ex["exact_match"] == float(text.strip().lower() == doc["answer"])
    assert res["exact_match"] == pytest.approx(sum(ex["exact_match"] for ex in res["examples"]) / 3)


@needs_lmeval
def test_adapter_goes_through_the_harness_peft_path(tiny_model, in_tasks_dir, tmp_path):
    from tunelab.evaluation.main import evaluate

    adapter = make_adapter(tiny_model, tmp_path / "lora", seed=3)
    res = evaluate("lm-eval:mc_task.yaml", model=tiny_model, adapter=adapter, n=2, batch_size=2)
    with_adapter, base = choice_loglikelihoods(tiny_model, adapter), choice_loglikelihoods(tiny_model)
    for ex in res["examples"]:
        assert ex["loglikelihoods"] == pytest.approx(with_adapter[ex["doc_id"]], abs=1e-3)
        assert ex["loglikelihoods"] != pytest.approx(base[ex["doc_id"]], abs=1e-2)  # the adapter was applied


@needs_lmeval
def test_compare_base_vs_run_on_a_harness_task(tiny_model, in_tasks_dir, tmp_path, capsys):
    run = tmp_path / "runs" / "tiny-lora"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text(f"model:\n  source: {tiny_model}\nadapter:\n  type: lora\n")
    make_adapter(tiny_model, run / "final", seed=4)
    assert cli(["compare", str(run), "--task", "lm-eval:tunelab_mc", "--lm-eval-include", str(TASKS), "--n", "2",
                "--batch-size", "2"]) == 0
    assert "lm-eval:tunelab_mc (its own data)" in capsys.readouterr().out
    base, tuned = json.loads((run / "report.json").read_text())["results"]
    assert base["label"] == "base" and tuned["label"] == "tiny-lora"
    direct = choice_loglikelihoods(tiny_model, str(run / "final"))
    for ex in tuned["tasks"]["lm-eval:tunelab_mc"]["examples"]:
        assert ex["loglikelihoods"] == pytest.approx(direct[ex["doc_id"]], abs=1e-3)
    assert "| lm-eval:tunelab_mc | acc |" in (run / "report.md").read_text()


@needs_lmeval
def test_harness_chat_client_against_tunelab_serve(tiny_model, in_tasks_dir, monkeypatch, tmp_path):
    """The harness' `local-chat-completions` model is a real OpenAI-API client: its answers from `tunelab serve`
    (an adapter, picked by the request's model name) must be the greedy replies of that base + adapter."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from lm_eval import simple_evaluate
    from test_serve import LiveServer

    from tunelab.evaluation import lmeval
    from tunelab.inference.engine import GenParams, chat
    from tunelab.inference.host import Host
    from tunelab.inference.server import create_app
    from tunelab.models import load_for_inference

    adapter = make_adapter(tiny_model, tmp_path / "alpha", seed=1)  # the random base alone answers only newlines
    host = Host.load(tiny_model, adapters=[f"alpha={adapter}"], served_name="tiny")
    monkeypatch.setenv("OPENAI_API_KEY", "k-123")  # the harness sends it as a bearer token
    tasks = lmeval.Tasks(["lm-eval:gen_task.yaml"])
    with LiveServer(create_app(host, api_key="k-123", max_tokens=64)) as server:
        out = simple_evaluate(model="local-chat-completions", tasks=tasks.specs, task_manager=tasks.manager,
                              model_args={"base_url": server.url + "/v1/chat/completions", "model": "alpha",
                                          "num_concurrent": 1, "max_retries": 1},
                              apply_chat_template=True, log_samples=True, bootstrap_iters=0)
    res = lmeval.results(out)["lm-eval:tunelab_gen"]
    assert res["n"] == 3 and res["exact_match"] == 0.0  # a random model's words are no answers
    docs = [json.loads(line) for line in (TASKS / "gen.jsonl").read_text().splitlines()]
    convs = [[{"role": "user", "content": f"Q: {docs[ex['doc_id']]['question']}\nA:"}] for ex in res["examples"]]
    model, tok = load_for_inference(tiny_model, adapter=adapter)
    expected = chat(model, tok, convs, GenParams(max_new_tokens=8, temperature=0.0, stop=["\n"]), batch_size=1)
    assert all(e.strip() for e in expected)  # real words to compare, not empty replies
    assert [ex["output"] for ex in res["examples"]] == expected


@needs_lmeval
def test_4bit_base_with_adapter(tiny_model, in_tasks_dir, tmp_path):
    """transformers 5 dropped the harness' own `load_in_4bit` argument: the base is quantized by tunelab's loader
    (bitsandbytes NF4), the adapter applied over it, and the harness scores that model."""
    pytest.importorskip("bitsandbytes")
    import torch

    from tunelab.evaluation import lmeval
    from tunelab.models import load_for_inference

    adapter = make_adapter(tiny_model, tmp_path / "lora", seed=5)
    tasks = lmeval.Tasks(["lm-eval:mc_task.yaml"])
    lm, model_args = lmeval.hf_model({"model": tiny_model, "adapter": adapter}, batch_size=2, load_in_4bit=True)
    assert model_args is None and any(type(m).__name__ == "Linear4bit" for m in lm.model.modules())
    res = lmeval.evaluate(lm, model_args, tasks, n=2, batch_size=2)["lm-eval:tunelab_mc"]
    # the same 4-bit model scored here directly: the harness' log-likelihoods are its log-likelihoods
    model, tok = load_for_inference(tiny_model, adapter=adapter, load_in_4bit=True)
    for ex in res["examples"]:
        doc = json.loads((TASKS / "mc.jsonl").read_text().splitlines()[ex["doc_id"]])
        ctx = f"Question: {doc['question']}\nAnswer:"
        for choice, ll in zip(doc["choices"], ex["loglikelihoods"]):
            n_ctx, ids = len(tok.encode(ctx)), tok.encode(ctx + " " + choice)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            assert ll == pytest.approx(sum(logp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids))), abs=1e-2)
