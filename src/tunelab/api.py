"""The Python API: what the CLI does, as functions.

    from tunelab import evaluate, export_run, finetune, load_config

    cfg = load_config("configs/quickstart.yaml", ["training.max_steps=20", "output.name=try"])
    summary = finetune(cfg)                                # the run directory's summary.json, as a dict
    scores = evaluate("gsm8k", run=summary["run"], n=20)   # metrics and examples
    path = export_run(summary["run"], to="merged")         # a merged model, checked against the adapter

(`finetune` and `export_run` rather than train/export: those names are the modules tunelab.train and tunelab.export.)

Each function is a thin call into the code behind its command (`tunelab train`, `eval`, `export`), so a script and a
terminal get the same checks, errors (tunelab.errors.UserError: one line, what and how to fix) and run directories.
`load_config` is config.read_config plus checks.check_config (the method and data names a config holds).
"""

from __future__ import annotations

from pathlib import Path

from tunelab.checks import check_config
from tunelab.config import RunConfig, read_config


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A run config from a YAML file (or None: the defaults) and dotted overrides (`training.learning_rate=1e-4`),
    fully checked. Unknown keys are errors naming the nearest valid key. One override may be given as a string."""
    return check_config(read_config(path, [overrides] if isinstance(overrides, str) else overrides))


def finetune(cfg: RunConfig | str | Path, overrides: list[str] | None = None, overwrite: bool = False, callbacks=(),
          echo=print, show_progress: bool = True) -> dict:
    """Train a config (a RunConfig, or a YAML path with overrides) into its run directory; returns the summary.
    A finished run is not trained again (overwrite=True starts it over); an interrupted one resumes."""
    from tunelab.train import run_training

    if not isinstance(cfg, RunConfig):
        cfg = load_config(cfg, overrides)
    return run_training(cfg, overwrite=overwrite, callbacks=callbacks, echo=echo, show_progress=show_progress)


def evaluate(task: str, model: str | None = None, adapter: str | None = None, run: str | Path | None = None,
             **settings) -> dict:
    """Score a model, a model + adapter, or a run on a task (gsm8k | summarization | perplexity | prompts).
    Settings as the CLI flags: data, format, n, k_shot, temperature, top_p, seed, max_new_tokens, batch_size."""
    from tunelab.evaluation.main import evaluate as run_evaluation

    return run_evaluation(task, model, adapter, str(run) if run is not None else None, **settings)


def export_run(run: str | Path, to: str = "merged", **options):
    """Export a finished run: to = merged | gguf | ollama | hub; options as the CLI flags (out, qtype, dtype,
    overwrite, repo, dry_run, private). Returns the output path (None for the hub)."""
    import inspect

    from tunelab.errors import UserError, suggest
    from tunelab.export import export as run_export

    known = [p for p in inspect.signature(run_export).parameters if p not in ("run", "to")]
    for name in options:  # as evaluate() does: a misspelt option is a UserError naming the valid ones
        if name not in known:
            raise UserError(f"export_run: unknown option '{name}'{suggest(name, known)}; options: {', '.join(known)}")
    return run_export(str(run), to, **options)
