"""Reports and the eval/compare commands: files contain the numbers; base vs run through the real CLI."""

import json
import shutil
from pathlib import Path

import pytest

from tunelab.cli import main as cli
from tunelab.evaluation.report import fmt, write_report

GSM = {"n": 2, "accuracy": 0.5, "format_rate": 1.0, "examples": [
    {"question": "What is 2+2?", "gold": "4", "output": "2+2=4\n#### 4", "pred": "4", "correct": True, "formatted": True},
    {"question": "What is 3*3?", "gold": "9", "output": "#### 6 | <b>", "pred": "6", "correct": False,
     "formatted": True}]}
GSM_BASE = {"n": 2, "accuracy": 0.0, "format_rate": 0.0, "examples": [
    {"question": "What is 2+2?", "gold": "4", "output": "Five.", "pred": None, "correct": False, "formatted": False},
    {"question": "What is 3*3?", "gold": "9", "output": "It is 8", "pred": "8", "correct": False, "formatted": False}]}


def test_report_files_contain_the_numbers(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "epoch": 1.0, "loss": 2.25, "elapsed": 3.0}\n{"step": 1, "epoch": 1.0, "eval_loss": 2.5}\n')
    results = [{"label": "base", "model": "tiny", "tasks": {"gsm8k": GSM_BASE, "perplexity": {"n": 3, "loss": 1.7,
                                                                                               "perplexity": 5.4739}}},
               {"label": "run", "model": "tiny + adapter", "tasks": {"gsm8k": GSM, "perplexity": {
                   "n": 3, "loss": 1.2, "perplexity": 3.3201}}}]
    paths = write_report(tmp_path, results, title="t", settings={"n": 2})
    md, page = paths["md"].read_text(), paths["html"].read_text()
    for text in (md, page):
        assert "0.5000" in text and "1.0000" in text and "5.4739" in text and "3.3201" in text
        assert "+0.5000 ▲" in text  # accuracy up is better
        assert "-2.1538 ▲" in text  # perplexity down is better
        assert "2.2500" in text and "2.5000" in text  # the per-epoch table from metrics.jsonl
        assert "What is 3*3?" in text and "pred 6 ✗" in text and "pred 4 ✓" in text
    assert "| gsm8k | accuracy | 0.0000 | 0.5000 | +0.5000 ▲ |" in md
    assert "<b>" not in page.split("<body>")[1].replace("<b>base</b>", "").replace("<b>run</b>", "")  # escaped
    assert json.loads(paths["json"].read_text())["results"][1]["tasks"]["gsm8k"]["accuracy"] == 0.5


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory):
    """A finished run directory as `tunelab train` leaves it: config.yaml, a LoRA adapter in final/, metrics."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    run = tmp_path_factory.mktemp("runs") / "tiny-sft"
    run.mkdir()
    (run / "config.yaml").write_text(f"model:\n  source: {tiny_model}\n")
    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(run / "final")
    (run / "metrics.jsonl").write_text('{"step": 2, "epoch": 1.0, "loss": 3.5, "elapsed": 1.0}\n'
                                       '{"step": 2, "epoch": 1.0, "eval_loss": 3.75, "elapsed": 1.2}\n')
    return run


def test_compare_base_vs_run_cli(tiny_run, capsys):
    rc = cli(["compare", str(tiny_run), "--task", "gsm8k", "--task", "perplexity", "--n", "2",
              "--max-new-tokens", "4", "--batch-size", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "evaluating base" in out and "evaluating tiny-sft" in out
    data = json.loads((tiny_run / "report.json").read_text())
    base, run = data["results"]
    assert base["label"] == "base" and run["label"] == "tiny-sft"
    md = (tiny_run / "report.md").read_text()
    html = (tiny_run / "report.html").read_text()
    for r in (base, run):
        ppl = fmt(r["tasks"]["perplexity"]["perplexity"])
        assert ppl in md and ppl in html
    assert base["tasks"]["perplexity"]["loss"] != run["tasks"]["perplexity"]["loss"]  # the adapter was applied
    assert "3.5000" in md and "3.7500" in md  # training table of the run


def test_eval_cli_writes_results(tiny_run, tmp_path, capsys):
    shutil.rmtree(tiny_run / "eval", ignore_errors=True)
    assert cli(["eval", "--run", str(tiny_run), "--task", "gsm8k", "--n", "2", "--max-new-tokens", "4",
                "--k-shot", "1"]) == 0
    res = json.loads((tiny_run / "eval" / "gsm8k.json").read_text())
    assert res["results"][0]["tasks"]["gsm8k"]["n"] == 2 and res["settings"]["k_shot"] == 1
    assert "gsm8k: n=2  accuracy=" in capsys.readouterr().out
    first = (tiny_run / "eval" / "gsm8k.json").read_bytes()
    # a second scoring (other settings) is kept beside the first, never over it
    assert cli(["eval", "--run", str(tiny_run), "--task", "gsm8k", "--n", "1", "--max-new-tokens", "4"]) == 0
    assert (tiny_run / "eval" / "gsm8k.json").read_bytes() == first
    second = json.loads((tiny_run / "eval" / "gsm8k-2.json").read_text())
    assert second["results"][0]["tasks"]["gsm8k"]["n"] == 1
    assert f"results: {tiny_run / 'eval' / 'gsm8k-2.json'} (earlier results kept beside it)" in capsys.readouterr().out
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello?\n")
    assert cli(["eval", "--model", str(Path(tiny_run / "config.yaml").read_text().split()[-1]), "--task", "prompts",
                "--data", str(prompts), "--max-new-tokens", "3", "--out", str(tmp_path / "rep")]) == 0
    assert "Hello?" in (tmp_path / "rep" / "report.md").read_text()


@pytest.mark.parametrize("argv,msg", [
    (["eval", "--task", "summarization"], "needs --data"),
    (["eval", "--task", "gsm8k", "--n", "0"], "--n must be at least 1"),
    (["eval", "--task", "gsm8k", "--temperature", "-1", "--data", "bundled:gsm8k/test", "--n", "1"], "temperature"),
    (["eval", "--task", "gsm8k", "--run", "no/such/run"], "not found"),
    (["eval", "--task", "gsm8k", "--data", "missing.jsonl"], "not found"),
    (["compare", "embedded:smollm2-135m-instruct"], "two or more"),
])
def test_cli_errors_are_one_line(argv, msg, capsys):
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


def test_compare_run_defaults_to_its_own_validation_data_and_a_sample(tiny_run, tmp_path, capsys):
    run = tmp_path / "tiny-val"
    shutil.copytree(tiny_run, run)
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant",
                                                                                      "content": a}]}) + "\n"
                           for q, a in [("Hi?", "Hello."), ("2+2?", "4")]))
    (run / "config.yaml").write_text((tiny_run / "config.yaml").read_text() + f"data:\n  validation: {val}\n")
    assert cli(["compare", str(run), "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert f"comparing on perplexity ({val}), first 50 samples (--task perplexity: the run's validation data; " \
           "data: the run's own)" in out
    assert json.loads((run / "report.json").read_text())["results"][1]["tasks"]["perplexity"]["n"] == 2


def test_compare_defaults_follow_the_runs_eval_task():
    from tunelab.evaluation.main import compare_defaults

    cfg = {"eval": {"task": "gsm8k", "task_data": "held.jsonl"}, "data": {"validation": "val.jsonl"}}
    assert compare_defaults(cfg, None, None)[:2] == (["gsm8k"], {"gsm8k": "held.jsonl"})
    assert compare_defaults({}, None, None)[:2] == (["gsm8k"], {"gsm8k": None})  # bundled GSM8K test, 50 of it
    assert compare_defaults(cfg, ["perplexity"], "mine.jsonl") == (["perplexity"], {"perplexity": "mine.jsonl"}, None)


def test_eval_says_where_the_outputs_it_does_not_print_are(tiny_run, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("One?\nTwo?\nThree?\nFour?\nFive?\n")
    out = tmp_path / "res.json"
    assert cli(["eval", "--run", str(tiny_run), "--task", "prompts", "--data", str(prompts), "--max-new-tokens", "2",
                "--out", str(out)]) == 0
    assert f"(2 more outputs not shown: all 5 are in {out})" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["eval", "--run", "RUN", "--task", "perplexity", "--out", "FILE/x.json"],
                                  ["eval", "--run", "RUN", "--task", "perplexity", "--out", "FILE"],
                                  ["compare", "RUN", "--task", "perplexity", "--out", "FILE"],
                                  ["compare", "RUN", "NOWHERE", "--task", "perplexity", "--out", "DIR"],
                                  ["compare", "NOWHERE"]])
def test_eval_and_compare_refuse_before_evaluating(tiny_run, tmp_path, capsys, monkeypatch, argv):
    """An --out that cannot be written or a model that is not there is said before any model loads (the results of
    minutes of evaluation were lost to a traceback at the end)."""
    import tunelab.evaluation.main as evaluation

    (tmp_path / "FILE").write_text("notes")
    names = {"RUN": str(tiny_run), "FILE": str(tmp_path / "FILE"), "DIR": str(tmp_path / "report"),
             "NOWHERE": str(tmp_path / "nowhere")}
    argv = [names.get(a.split("/")[0], a.split("/")[0]) + a[len(a.split("/")[0]):] for a in argv]
    monkeypatch.setattr(evaluation, "run_model", lambda *a, **k: pytest.fail("a model was evaluated"))
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("--out" in err or "nowhere" in err), err
    assert (tmp_path / "FILE").read_text() == "notes" and not (tmp_path / "report").exists()


def test_models_given_under_the_wrong_flag_are_named_before_evaluating(tiny_run, tiny_model, tmp_path, capsys,
                                                                       monkeypatch):
    """An adapter passed as --model, a merged export passed as --run, a run without final/ among compare's models,
    and a task without data are each said in one line with the flag that takes them, before any model is scored."""
    import tunelab.evaluation.main as evaluation

    merged = tiny_run / "export" / "merged"
    shutil.copytree(tiny_model, merged, dirs_exist_ok=True)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((tiny_run / "config.yaml").read_text())
    final = tiny_run / "final"
    monkeypatch.setattr(evaluation, "run_model", lambda *a, **k: pytest.fail("a model was evaluated"))
    cases = [
        (["eval", "--model", str(final), "--task", "perplexity"],
         f"--run {tiny_run}, or --adapter {final} with --model"),
        (["eval", "--run", str(merged), "--task", "perplexity"], f"model directory (a merged export?), not a run (of "
                                                                  f"the run {tiny_run}; "),
        (["eval", "--run", str(final), "--task", "perplexity"], "pass the run itself"),
        (["compare", str(tiny_model), str(unfinished), "--task", "perplexity"], "has no final model yet"),
        (["compare", str(tiny_model), str(final), "--task", "perplexity"], f"pass the run itself: {tiny_run}"),
        (["eval", "--task", "prompts"], "needs --data (a .txt file with one prompt per line"),
    ]
    for argv, msg in cases:
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    shutil.rmtree(tiny_run / "export")


def test_report_settings_record_what_changes_lm_eval_numbers():
    """lm-eval tasks generate with their own lengths and take few-shot and chat-template settings: the report records
    those, not a max_new_tokens they did not use."""
    from types import SimpleNamespace

    from tunelab.evaluation.main import SETTINGS, _settings

    args = SimpleNamespace(**{**SETTINGS, "lm_eval_fewshot": 1, "lm_eval_chat_template": True})
    lm = _settings(args, ["lm-eval:task.yaml"])
    assert (lm["lm_eval_fewshot"], lm["lm_eval_chat_template"], lm["max_new_tokens"]) == (1, True, None)
    own = _settings(args, ["gsm8k"])
    assert (own["lm_eval_fewshot"], own["lm_eval_chat_template"], own["max_new_tokens"]) == (None, None, 256)


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "longest generation per sample (default: 256)" in text and "(default: 16)" in text
    assert "(default: None)" not in text
