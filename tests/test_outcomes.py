"""Outcome tests: each shipped recipe improves what it claims, on held-out rows it never trained on.

They train the recipe as shipped (only the run directory moved, and for DialogSum the data pointed at a local file)
on the embedded SmolLM2-135M-Instruct and score the base and the result on the same held-out rows, greedy:

- configs/quickstart.yaml: GSM8K "#### N" answer format >= 90% and accuracy not below the base, on 200 GSM8K test
  questions outside the bundled sample;
- configs/gsm8k/grpo-cpu.yaml: format rate and mean reward (the recipe's own rewards and weights) above the base on
  held-out GSM8K questions, asked with the recipe's system prompt;
- configs/dialogsum/lora.yaml: ROUGE-L above the base on DialogSum dialogues outside the rows it trained on.

They read ../shared/data (skipped when it is absent) and take minutes each on CPU, so they are marked `outcome` and
left out of `make test`; `make test-outcomes` runs them. Each prints its before/after figures (pytest -s shows them):
those are the figures of the README's recipe table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import shared_data

pytestmark = [pytest.mark.e2e, pytest.mark.shared, pytest.mark.outcome]

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def report(name: str, before: dict, after: dict, seconds: dict) -> None:
    line = {"recipe": name, "before": before, "after": after, "seconds": seconds}
    print(f"\nOUTCOME {json.dumps(line)}", flush=True)


def heldout_gsm8k(n: int) -> list[dict]:
    """GSM8K test questions that are in neither bundled sample (the quickstart scores the bundled test sample)."""
    from tunelab.data.sources import read_source

    seen = {r.data["question"] for split in ("train", "test") for r in read_source(f"bundled:gsm8k/{split}")}
    rows = [json.loads(line) for line in shared_data("gsm8k/test.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["question"] not in seen][:n]
    assert len(rows) == n
    return rows


def train(config: Path, tmp_path, overrides=()) -> tuple[dict, float]:
    from tunelab import load_config
    from tunelab.train import run_training

    t0 = time.time()
    summary = run_training(load_config(config, [f"output.dir={tmp_path / 'runs'}", *overrides]), show_progress=False)
    assert summary["status"] == "complete"
    return summary, time.time() - t0


def score_gsm8k(rows, run: str | None, max_new_tokens: int, system: str | None = None, weights=None):
    """GSM8K accuracy and format (and the GRPO recipe's weighted mean reward) of the base or a run, greedy."""
    from tunelab.evaluation import gsm8k
    from tunelab.evaluation.common import chat_with_progress
    from tunelab.inference.engine import GenParams
    from tunelab.models import load_for_inference

    model, tok = load_for_inference(run=run) if run else load_for_inference()
    t0 = time.time()
    convs = gsm8k.conversations(rows)
    if system:
        convs = [[{"role": "system", "content": system}, *c] for c in convs]
    outputs = chat_with_progress(model, tok, convs, GenParams(max_new_tokens=max_new_tokens), 32, "gsm8k", False)
    s = gsm8k.score(outputs, [gsm8k._question_gold(r)[1] for r in rows])
    res = {"accuracy": s["accuracy"], "format_rate": s["format_rate"]}
    if weights:
        res["mean_reward"] = sum(weights["gsm8k_correct"] * c + weights["format"] * f
                                 for c, f in zip(s["correct"], s["formatted"])) / len(rows)
    return res, time.time() - t0


def test_quickstart_recipe_learns_the_answer_format_on_heldout_questions(tmp_path):
    rows = heldout_gsm8k(200)
    base, t_base = score_gsm8k(rows, None, 200)
    summary, t_train = train(CONFIGS / "quickstart.yaml", tmp_path)
    tuned, t_tuned = score_gsm8k(rows, summary["run"], 200)
    report("quickstart", base, tuned, {"score_before": t_base, "train": t_train, "score_after": t_tuned})
    assert tuned["format_rate"] >= 0.9
    assert tuned["accuracy"] >= base["accuracy"]


def test_grpo_cpu_recipe_raises_format_and_reward_on_heldout_prompts(tmp_path):
    import yaml

    from tunelab import load_config

    cfg = load_config(CONFIGS / "gsm8k" / "grpo-cpu.yaml")
    raw = yaml.safe_load((CONFIGS / "gsm8k" / "grpo-cpu.yaml").read_text())
    weights = {"gsm8k_correct": 0.0, "format": 0.0}
    for spec in raw["method"]["rewards"]:
        name, w = (spec, 1.0) if isinstance(spec, str) else (spec["name"], spec.get("weight", 1.0))
        weights[name] = w
    rows = heldout_gsm8k(100)
    max_new = raw["method"]["max_completion_length"]
    base, t_base = score_gsm8k(rows, None, max_new, cfg.data.system_prompt, weights)
    summary, t_train = train(CONFIGS / "gsm8k" / "grpo-cpu.yaml", tmp_path)
    tuned, t_tuned = score_gsm8k(rows, summary["run"], max_new, cfg.data.system_prompt, weights)
    report("gsm8k/grpo-cpu", base, tuned, {"score_before": t_base, "train": t_train, "score_after": t_tuned})
    assert tuned["format_rate"] > base["format_rate"]
    assert tuned["mean_reward"] > base["mean_reward"]


DIALOGSUM_TRAIN = 400  # dev rows 0..399 train the recipe (its data.subset of them); rows 400..459 are held out
DIALOGSUM_MAX_NEW = 96  # DialogSum's summaries are one to three sentences


def test_dialogsum_lora_recipe_raises_rouge_l_on_heldout_dialogues(tmp_path):
    from tunelab.evaluation import summarization
    from tunelab.evaluation.common import load_records
    from tunelab.models import load_for_inference

    lines = shared_data("dialogsum/dev.jsonl").read_text().splitlines()
    # DialogSum is CC BY-NC-SA: read from ../shared into the test's temporary directory, never into the project
    train_file, held_file = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    train_file.write_text("\n".join(lines[:DIALOGSUM_TRAIN]) + "\n")
    held_file.write_text("\n".join(lines[DIALOGSUM_TRAIN:DIALOGSUM_TRAIN + 60]) + "\n")
    records = load_records(str(held_file))

    def rouge_l(run):
        model, tok = load_for_inference(run=run) if run else load_for_inference()
        t0 = time.time()
        res = summarization.evaluate(model, tok, records, batch_size=16, max_new_tokens=DIALOGSUM_MAX_NEW,
                                     show_progress=False)
        return {k: res[k] for k in ("rouge1", "rouge2", "rougeL")}, time.time() - t0

    base, t_base = rouge_l(None)
    summary, t_train = train(CONFIGS / "dialogsum" / "lora.yaml", tmp_path, [f"data.train={train_file}"])
    tuned, t_tuned = rouge_l(summary["run"])
    report("dialogsum/lora", base, tuned, {"score_before": t_base, "train": t_train, "score_after": t_tuned})
    assert tuned["rougeL"] > base["rougeL"]
