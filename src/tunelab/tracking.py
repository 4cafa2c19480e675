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

A run that is stopped or killed and resumed (the same `tunelab train` again) continues its tracker history as one run:

- tensorboard: the resumed part writes a new event file whose writer purges every step after the checkpoint it
  resumes from (`SummaryWriter(purge_step=)`), so steps logged between that checkpoint and the kill are hidden from
  the earlier files and each step is shown once. The writer is handed to transformers' TensorBoardCallback
  (`tb_writer=`), which is why `report_to_argument` leaves tensorboard out of TrainingArguments.report_to.
- mlflow: RUN/trackers.json records the MLflow run id (and its store) once the run has started; a resumed
  part sets MLFLOW_RUN_ID from it, which transformers' MLflowCallback continues. A recorded run that is gone (store
  deleted, another MLFLOW_TRACKING_URI or experiment) starts a new one. MLflow cannot drop logged values: steps
  between the checkpoint and a kill are in its history twice (a Ctrl-C stop saves a checkpoint where it stops, so it
  leaves none).
- wandb: each run directory gets one run id, kept in RUN/trackers.json; WANDB_RUN_ID is set to it and WANDB_RESUME to
  `allow`, so an online resumed part continues the same W&B run (steps between the checkpoint and a kill logged
  twice, as for MLflow). Offline, wandb (0.31) does not resume: each part writes its own RUN/wandb/offline-run-*-ID
  directory under that same id, its history starting afresh (run.resumed is False). `wandb sync --id ID DIR...`
  uploads such parts in order of start time, but the server has been seen to keep only the last part's history
  (wandb/wandb#3841): for one W&B history across a resume, train with WANDB_MODE=online.

WANDB_RUN_ID, WANDB_RESUME and MLFLOW_RUN_ID the user has set win here too; --overwrite starts new tracker runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import string
import sys
from contextlib import contextmanager
from pathlib import Path

from tunelab.errors import UserError, suggest
from tunelab.rundir import read_json, write_json_atomic

# backend -> (module that must be importable, pip extra that provides it)
BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
IDS_FILE = "trackers.json"  # in the run directory: the tracker runs a resumed run continues


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


def report_to_argument(report_to: list[str]) -> list[str] | str:
    """TrainingArguments.report_to: the trackers transformers sets up itself. TensorBoard is left out: `callbacks`
    gives the Trainer its TensorBoardCallback, with a writer that purges what a resumed run logs again."""
    return [r for r in report_to or [] if r not in ("none", "tensorboard")] or "none"


def run_ids(report_to: list[str], run_dir: Path, same_run: bool) -> dict[str, str]:
    """WANDB_RUN_ID / WANDB_RESUME / MLFLOW_RUN_ID for one run directory: the tracker runs recorded in
    RUN/trackers.json when `same_run` (a re-run of the directory), else new ones. MLflow's run must exist already
    (the id is recorded once it has started), so a new one has no id here; wandb's is chosen here."""
    ids = read_json(Path(run_dir) / IDS_FILE, {}) if same_run else {}
    ids = ids if isinstance(ids, dict) else {}
    env: dict[str, str] = {}
    if "wandb" in report_to:
        wandb_id = (ids.get("wandb") or {}).get("run_id")
        env.update(WANDB_RUN_ID=wandb_id or _new_wandb_id(), WANDB_RESUME="allow")
    if "mlflow" in report_to and "MLFLOW_RUN_ID" not in os.environ:  # the user's wins: no need to look ours up
        mlflow_id = _existing_mlflow_run(ids.get("mlflow") or {})
        if mlflow_id:
            env["MLFLOW_RUN_ID"] = mlflow_id
    return env


def callbacks(report_to: list[str], run_dir: Path, resume_from: Path | None = None, main: bool = True) -> list:
    """The Trainer callbacks besides those `report_to_argument` leaves to transformers: TensorBoard's, and the one
    that records the tracker run ids. `resume_from`: the checkpoint training starts from (None: from scratch).
    `main`: whether this process is the one that writes (rank 0); the others open no event file.

    Build them inside `environment()`, after the run directory is written (the TensorBoard writer opens its file)."""
    report_to = [r for r in report_to or [] if r != "none"]
    out: list = []
    if "tensorboard" in report_to:
        from transformers.integrations import TensorBoardCallback

        writer = None
        logdir = Path(os.environ.get("TENSORBOARD_LOGGING_DIR") or Path(run_dir) / "tensorboard")
        if main and any(logdir.glob("events.out.tfevents.*")):
            from torch.utils.tensorboard import SummaryWriter

            # earlier parts' events after the resume point are hidden: this part logs those steps again
            start = read_json(Path(resume_from) / "trainer_state.json", {}).get("global_step", 0) if resume_from else 0
            writer = SummaryWriter(log_dir=str(logdir), purge_step=start + 1)
        out.append(TensorBoardCallback(tb_writer=writer))
    if "wandb" in report_to or "mlflow" in report_to:
        from transformers import TrainerCallback

        class RecordRunIds(TrainerCallback):
            # added after the Trainer's own MLflowCallback and WandbCallback: their on_train_begin, which runs
            # first, has started the tracker runs whose ids this one records
            def on_train_begin(self, args, state, control, **kwargs):
                if state.is_world_process_zero:
                    _record_ids(Path(run_dir))

        out.append(RecordRunIds())
    return out


def _new_wandb_id() -> str:
    # the shape of wandb's own ids (wandb.util.generate_id), without importing wandb for it
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _existing_mlflow_run(recorded: dict) -> str | None:
    """The recorded MLflow run id, if that run can be continued: the same store and experiment as now, not deleted.
    MLflow refuses to resume a run in another experiment than the active one, and a missing run fails the Trainer."""
    run_id = recorded.get("run_id")
    if not run_id:
        return None
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = mlflow.get_tracking_uri()  # the store MLflowCallback will log to: the environment's, or one set in code
    if recorded.get("tracking_uri") != uri:
        return None
    try:
        client = MlflowClient(tracking_uri=uri)
        run = client.get_run(run_id)
        experiment = client.get_experiment(run.info.experiment_id)
    except Exception:  # the store is gone or cannot be read: a new run, as for a run that never recorded one
        return None
    wanted = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if run.info.lifecycle_stage != "active" or (wanted and experiment.name != wanted):
        return None
    return run_id


def _record_ids(run_dir: Path) -> None:
    """Write the wandb and MLflow runs this process has open into RUN/trackers.json (what a resume continues)."""
    path = Path(run_dir) / IDS_FILE
    ids = read_json(path, {})
    ids = ids if isinstance(ids, dict) else {}
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        ids["wandb"] = {"run_id": wandb.run.id}
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and mlflow.active_run() is not None:
        run = mlflow.active_run()
        ids["mlflow"] = {"run_id": run.info.run_id, "tracking_uri": mlflow.get_tracking_uri()}
    if ids:
        write_json_atomic(path, ids)


@contextmanager
def environment(cfg, run_dir: Path | None = None, experiment: str | None = None, mlflow_dir: Path | None = None,
                same_run: bool | None = None):
    """Configure the trackers in `cfg.training.report_to` for one run; restore the environment afterwards.

    Wrap the Trainer's construction and training in it (the TensorBoard callback reads its directory when the Trainer
    is built; wandb and MLflow when training begins). A tracker run still open at the end (training raised) is closed,
    so the next run in this process, e.g. the next sweep trial, does not log into it.

    same_run: True when the run directory is run again (resumed, or restarted without --overwrite): continue the
    tracker runs it recorded; False: new tracker runs (--overwrite). None leaves the run ids to a nested
    environment() that knows (run_training's own; a sweep wraps it without knowing whether a trial resumes).
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
    # this process (another store) at this run's experiment, and mlflow.start_run() removes MLFLOW_RUN_ID: these and
    # the run ids are put back as well.
    saved = {k: os.environ.get(k) for k in [*env, "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "WANDB_RUN_ID",
                                             "WANDB_RESUME"]}
    os.environ.update(env)
    if same_run is not None:  # after the store's variables: the recorded MLflow run is looked up in that store
        ids = {k: v for k, v in run_ids(report_to, run_dir, same_run).items() if k not in os.environ}
        os.environ.update(ids)
        env.update(ids)
    failed = False
    try:
        yield env
    except BaseException:
        failed = True
        raise
    finally:
        _close_open_runs(failed, report_to)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _close_open_runs(failed: bool, report_to: list[str]) -> None:
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)
    if wandb is not None and "wandb" in report_to:
        # wandb reads its settings (WANDB_DIR, ...) once per process, when it is first set up: without a teardown
        # the next run of this process (a sweep's next trial, a resumed part) would write into this run's directory
        wandb.teardown()
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and mlflow.active_run() is not None:
        mlflow.end_run(status="FAILED" if failed else "FINISHED")
