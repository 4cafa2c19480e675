"""Experiment tracking: `training.report_to: [tensorboard, wandb, mlflow]`, working offline by default.

transformers' own integrations (TensorBoardCallback, WandbCallback, MLflowCallback) do the logging; they are chosen by
`TrainingArguments.report_to` and configured through environment variables. `environment()` sets those variables for
one run, so that everything lands in (or beside) the run directory instead of the library defaults:

- tensorboard: event files in RUN/tensorboard (the Trainer's default is under its output_dir, which for tunelab is the
  checkpoint staging area that is emptied on every resume). View: `tensorboard --logdir runs/` (or `sweeps/NAME`).
- wandb: offline unless WANDB_MODE is set, run files in RUN/wandb/offline-run-*; upload later with `wandb sync DIR`.
- mlflow: a file store at RUN/mlruns (for a sweep: sweeps/NAME/mlruns, one run per trial, so `mlflow ui
  --backend-store-uri sweeps/NAME/mlruns` compares them). MLflow 3 keeps its file store in maintenance mode and
  refuses it unless MLFLOW_ALLOW_FILE_STORE is set; a plain directory beside the run is what an offline run needs, so
  it is set here. Set MLFLOW_TRACKING_URI yourself (a server, or sqlite:///mlflow.db) and it is used instead.

Variables the user has set are never replaced. metrics.jsonl and the loss plots are written whatever report_to says.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from tunelab.errors import UserError, suggest

# backend -> (module that must be importable, pip extra that provides it)
BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check(report_to: list[str]) -> None:
    """Refuse an unknown or uninstalled backend before anything loads (transformers would fail at Trainer start)."""
    for name in report_to or []:
        if name == "none":
            continue
        if name not in BACKENDS:
            raise UserError(f"training.report_to: unknown tracker '{name}'{suggest(name, BACKENDS)}; "
                            f"known: {', '.join(BACKENDS)}")
        if importlib.util.find_spec(BACKENDS[name]) is None:
            raise UserError(f"training.report_to: {name} is not installed; pip install 'tunelab[track]' "
                            f"(or pip install {BACKENDS[name]})")


def variables(report_to: list[str], run_dir: Path, run_name: str, experiment: str | None = None,
              mlflow_dir: Path | None = None) -> dict[str, str]:
    """The environment for the chosen backends: experiment = a sweep's name (groups its trials), else the run name."""
    run_dir = Path(run_dir).resolve()
    experiment = experiment or run_name
    env: dict[str, str] = {}
    if "tensorboard" in report_to:
        env["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    if "wandb" in report_to:
        env.update(WANDB_MODE="offline", WANDB_DIR=str(run_dir), WANDB_PROJECT="tunelab", WANDB_NAME=run_name,
                   WANDB_RUN_GROUP=experiment)
    if "mlflow" in report_to:
        store = Path(mlflow_dir).resolve() if mlflow_dir else run_dir / "mlruns"
        env.update(MLFLOW_TRACKING_URI=store.as_uri(), MLFLOW_ALLOW_FILE_STORE="true",
                   MLFLOW_EXPERIMENT_NAME=experiment,
                   # the Trainer starts the MLflow run without a name; the run-name tag is how MLflow names runs
                   MLFLOW_TAGS=json.dumps({"mlflow.runName": run_name, "tunelab.run": str(run_dir)}))
    return env


@contextmanager
def environment(cfg, run_dir: Path | None = None, experiment: str | None = None, mlflow_dir: Path | None = None):
    """Configure the trackers in `cfg.training.report_to` for one run; restore the environment afterwards.

    Wrap the Trainer's construction and training in it (the TensorBoard callback reads its directory when the Trainer
    is built; wandb and MLflow when training begins). A tracker run still open at the end (training raised) is closed,
    so the next run in this process, e.g. the next sweep trial, does not log into it.
    """
    report_to = [r for r in cfg.training.report_to if r != "none"]
    check(report_to)
    if not report_to:
        yield {}
        return
    run_dir = Path(run_dir) if run_dir else Path(cfg.output.dir) / (cfg.output.name or "run")
    env = {k: v for k, v in variables(report_to, run_dir, run_dir.name, experiment, mlflow_dir).items()
           if k not in os.environ}  # what the user set wins (WANDB_MODE=online, a tracking server, ...)
    # mlflow.set_experiment() exports the experiment's id as MLFLOW_EXPERIMENT_ID, which would point the next run of
    # this process (another store) at this run's experiment: it is put back as well.
    saved = {k: os.environ.get(k) for k in [*env, "MLFLOW_EXPERIMENT_ID"]}
    os.environ.update(env)
    failed = False
    try:
        yield env
    except BaseException:
        failed = True
        raise
    finally:
        _close_open_runs(failed)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _close_open_runs(failed: bool) -> None:
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and mlflow.active_run() is not None:
        mlflow.end_run(status="FAILED" if failed else "FINISHED")
