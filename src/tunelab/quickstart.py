"""`tunelab quickstart`: fine-tune the embedded model on bundled GSM8K and show what changed.

Scores held-out GSM8K questions with the base model, trains configs/quickstart.yaml (LoRA), scores the same questions
with the result, and prints three answers side by side plus format compliance ("#### N") and accuracy before/after.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tunelab.errors import UserError

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def _score(model_source: str | None, run_dir: str | None, rows: list, echo) -> dict:
    from tunelab.evaluation.gsm8k import evaluate
    from tunelab.models import load_for_inference

    model, tok = load_for_inference(model=model_source or "embedded:smollm2-135m-instruct", run=run_dir)
    t0 = time.time()
    res = evaluate(model, tok, rows, batch_size=25, max_new_tokens=200)
    echo(f"  scored {len(rows)} questions in {time.time() - t0:.0f}s: format {res['format_rate']:.0%}, "
         f"accuracy {res['accuracy']:.0%}")
    return res


def main(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from tunelab.api import load_config
    from tunelab.data.sources import read_source
    from tunelab import runs
    from tunelab.train import check_run_config, quiet_libraries, run_training

    quiet_libraries()
    console = Console(soft_wrap=True)

    def echo(msg):  # library messages: printed as they are (their [[brackets]] are not rich markup)
        console.print(msg, markup=False, highlight=False)

    config = args.config or DEFAULT_CONFIG
    if not Path(config).is_file():
        raise UserError(f"quickstart config not found: {config} (run from the repository root or pass --config)")
    cfg = load_config(config, args.overrides)
    # a config mistake, or another config's run under the same name, is said before minutes of scoring
    check_run_config(cfg)
    runs.open_run(cfg, overwrite=args.overwrite)
    rows = [r.data for r in read_source("bundled:gsm8k/test")][: args.eval_n]

    console.print(f"[bold]1/3[/] scoring the base model ({cfg.model.source}) on {len(rows)} held-out GSM8K questions")
    # each phase's wall time (model loading included): what a new user waits for, printed at the end
    phases: dict[str, float] = {}
    t0 = time.time()
    before = _score(cfg.model.source, None, rows, echo)
    phases["1/3 score the base model"] = time.time() - t0
    console.print(f"[bold]2/3[/] fine-tuning ({cfg.adapter.type}) with {config}")
    t0 = time.time()
    summary = run_training(cfg, overwrite=args.overwrite, echo=echo)
    phases["2/3 fine-tune"] = time.time() - t0
    if summary.get("status") == "interrupted":
        return 0
    console.print("[bold]3/3[/] scoring the fine-tuned model on the same questions")
    t0 = time.time()
    after = _score(None, summary["run"], rows, echo)
    phases["3/3 score the fine-tuned model"] = time.time() - t0

    for i, (b, a) in enumerate(zip(before["examples"][:3], after["examples"][:3]), 1):
        t = Table(title=f"held-out question {i}: {b['question'][:300]}", show_lines=True, expand=True)
        t.add_column(f"before (gold {b['gold']})", ratio=1)
        t.add_column("after", ratio=1)
        t.add_row(b["output"].strip()[:700], a["output"].strip()[:700])
        console.print(t)
    t = Table(title=f"GSM8K, {len(rows)} held-out questions (zero-shot, greedy)")
    for col in ("metric", "before", "after"):
        t.add_column(col)
    t.add_row("answer format (#### N)", f"{before['format_rate']:.0%}", f"{after['format_rate']:.0%}")
    t.add_row("accuracy", f"{before['accuracy']:.0%}", f"{after['accuracy']:.0%}")
    t.add_row("training loss (first -> last)", f"{summary.get('first_loss', 0):.3f}", f"{summary.get('last_loss', 0):.3f}")
    console.print(t)
    from tunelab.evaluation.report import format_duration

    echo("time per phase: " + ", ".join(f"{k} {format_duration(v)}" for k, v in phases.items())
         + f" (total {format_duration(sum(phases.values()))})")
    report = {"n": len(rows), "before": before, "after": after, "train": summary,
              "phase_seconds": {k: round(v, 1) for k, v in phases.items()}}
    (Path(summary["run"]) / "quickstart.json").write_text(json.dumps(report, indent=2, default=str))
    echo(f"run directory: {summary['run']} (final adapter in final/, metrics.jsonl, loss.png, quickstart.json)")
    return 0
