"""Running a sweep: each Optuna trial trains one ordinary run through train.py and returns its objective.

A trial's run directory is sweeps/<name>/<trial>/, so train.py's own resume does the recovering: a re-queued trial
continues its run from the last checkpoint, and a trial whose run is already complete is read back without training.
Three endings are told apart: a user mistake (UserError) stops the sweep, Ctrl-C stops it with the trial resumable
(SweepInterrupted), and anything else fails that trial alone (TrialFailed) while the sweep goes on.
"""

from __future__ import annotations

import math
import shutil
import time
import traceback
from pathlib import Path

from transformers import TrainerCallback

from tunelab import runs
from tunelab.errors import UserError
from tunelab.sweep.report import describe, epoch_rows, write_outputs
from tunelab.sweep.spec import Sweep
from tunelab.sweep.study import (claim, fail_dead_local_trials, finished_trials, import_optuna, make_sampler,
                                 open_storage, open_study, requeue_unfinished, run_name_for, running_trials, safe_url,
                                 storage_file, suggest_value)


class TrialFailed(RuntimeError):
    """A trial that broke (not a user mistake, not an interruption): recorded as failed; the sweep goes on."""


class SweepInterrupted(Exception):
    """Ctrl-C during a trial: its checkpoint is saved; the sweep stops and a re-run resumes that trial."""


# ---------------------------------------------------------------------------------------------------------- objective


def objective_value(run_dir: Path, summary: dict, objective: str) -> float | None:
    """The trial's result: a restored best checkpoint's metric, else the last logged value (or epoch average)."""
    if objective == "train_loss":
        # the mean of every logged loss: the Trainer's own train_loss covers only the last session of a resumed run
        losses = [r["loss"] for r in runs.read_metrics(run_dir) if "loss" in r]
        return sum(losses) / len(losses) if losses else None
    if objective == "last_epoch_train_loss":
        rows = epoch_rows(run_dir)
        return rows[-1]["train_loss"] if rows else None
    best = (summary.get("best_metric") or {}).get(objective)
    if best is not None:
        return best
    values = [r[objective] for r in runs.read_metrics(run_dir) if objective in r]
    return values[-1] if values else None


class ReportToTrial(TrainerCallback):
    """Report the objective's intermediate values to the Optuna trial and stop training when the pruner says so.

    Values are reported at each evaluation (eval_* objectives) or at each epoch's end (train-loss objectives), keyed
    by the number of training samples seen: trials with different batch sizes are then compared after the same
    amount of data, which global steps would not do.
    """

    def __init__(self, trial, objective: str):
        self.trial, self.objective = trial, objective
        self.pruned = False

    def _report(self, args, state, control, value) -> None:
        samples = state.global_step * args.train_batch_size * args.gradient_accumulation_steps
        self.trial.report(float(value), samples)
        if self.trial.should_prune():
            self.pruned = True
            control.should_training_stop = True

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        if self.objective.startswith("eval_") and metrics and self.objective in metrics:
            self._report(args, state, control, metrics[self.objective])

    def on_epoch_end(self, args, state, control, **kw):
        if self.objective.endswith("train_loss"):
            from tunelab.evaluation.report import epoch_table

            rows = [r for r in epoch_table([h for h in state.log_history if "epoch" in h]) if r["train_loss"]]
            if rows:
                self._report(args, state, control, rows[-1]["train_loss"])


# ---------------------------------------------------------------------------------------------------------- running


# what a sweep directory holds besides its trials' run directories
SWEEP_ENTRIES = {"study.db", "study.db-journal", "logs", "plots", "mlruns", "results.csv", "results.md", "best.yaml"}


def is_sweep_dir(path: Path, storage: str | None = None) -> bool:
    """Whether --overwrite may delete `path`: a folder holding only what a sweep writes (its study, logs, results and
    the trials' run directories), or nothing. A folder of anything else is not a sweep's. `storage`: the study's
    URL, whose file (a journal or SQLite file kept in the folder, with its lock or journal beside it) is the sweep's
    too."""
    file = storage_file(storage) if storage else None
    own = file.name if file is not None and file.parent == path.resolve() else None

    def ours(p: Path) -> bool:
        if p.name in SWEEP_ENTRIES or (own and (p.name == own or p.name.startswith((own + ".", own + "-")))):
            return True
        return p.is_dir() and (p.name.startswith("trial-") or runs.is_run_dir(p))

    return path.is_dir() and all(ours(p) for p in path.iterdir())


def run_sweep(sweep: Sweep, callbacks=(), echo=print, show_progress: bool = True, overwrite: bool = False) -> dict:
    """Run (or continue) the sweep until its trial budget is spent; write results, plots and best.yaml.
    Returns {"results": rows, "best": row or None, "dir": path}."""
    from tunelab import tracking
    from tunelab.train import run_training

    optuna = import_optuna()
    if overwrite and sweep.dir.exists() and not is_sweep_dir(sweep.dir, sweep.storage):
        raise UserError(f"{sweep.dir} exists and is not a tunelab sweep, so it is left alone (--overwrite too); "
                        "choose another sweep name or out_dir")
    if overwrite:
        shutil.rmtree(sweep.dir, ignore_errors=True)
        if sweep.search.storage is not None:  # the default SQLite file went with the directory
            try:
                optuna.delete_study(study_name=sweep.study_name, storage=open_storage(sweep, optuna))
            except KeyError:
                pass
    storage = open_storage(sweep, optuna)
    study = open_study(sweep, storage, optuna)
    # trials of a worker that died are failed and queued again now, not only when this worker starts its next
    # trial: at once for a process of this machine that is gone, after the heartbeat's grace for other machines
    fail_dead_local_trials(study, storage, optuna)
    optuna.storages.fail_stale_trials(study)
    queued = requeue_unfinished(study, sweep, optuna)
    study.sampler = make_sampler(sweep, optuna, len(study.trials))
    done = len(finished_trials(study, optuna))
    # a trial running in another worker counts against the budget: starting one more in its place would train
    # its parameters twice, and leave its retry queued with no budget left if that worker dies
    elsewhere = [t.user_attrs.get("run", f"trial {t.number}") for t in running_trials(study, optuna)]
    todo = max(0, sweep.trials - done - len(elsewhere))
    continuing = f"; continuing {', '.join(queued)}" if queued else ""
    if elsewhere:
        continuing += (f"; running in another worker: {', '.join(elsewhere)} (a re-run resumes it once its heartbeat "
                       f"is {4 * sweep.search.heartbeat}s old)")
    echo(f"sweep {sweep.name}: {sweep.search.strategy} search, objective {sweep.objective} ({sweep.direction}), "
         f"{done}/{sweep.trials} trials finished, {todo} to run{continuing}; study in {safe_url(sweep.storage)}")
    logs = sweep.dir / "logs"
    first = [True]

    def objective(trial):
        claim(trial)
        params = {k: suggest_value(trial, k, dom) for k, dom in sweep.search.space.items()}
        run_name = run_name_for(study, trial, optuna, sweep, params)
        trial.set_user_attr("run", run_name)
        cfg = sweep.trial_config(params, run_name)
        run_dir = sweep.dir / run_name
        report = ReportToTrial(trial, sweep.objective)
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{run_name}.log", "a") as log:
            def trial_echo(msg):
                print(msg, file=log, flush=True)
                if first[0]:  # the first trial shows its pre-flight; later ones keep theirs in the log
                    echo(msg)

            echo(f"[{run_name}] {describe(params)}")
            t0 = time.time()
            try:
                with tracking.environment(cfg, run_dir, experiment=sweep.name, mlflow_dir=sweep.dir / "mlruns"):
                    summary = run_training(cfg, callbacks=[report, *callbacks], echo=trial_echo,
                                           show_progress=show_progress)
            except (UserError, KeyboardInterrupt):
                raise
            except Exception as e:
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                trial.set_user_attr("error", msg)
                echo(f"[{run_name}] failed: {msg} (details in {logs / (run_name + '.log')})")
                traceback.print_exc(file=log)
                raise TrialFailed(msg) from e
            finally:
                first[0] = False
        if summary.get("status") == "interrupted":  # Ctrl-C: runs.GracefulStop saved a checkpoint
            raise SweepInterrupted(run_name)
        seconds = round(time.time() - t0, 1)
        trial.set_user_attr("seconds", seconds)
        trial.set_user_attr("steps", summary.get("global_step"))
        if report.pruned:
            echo(f"[{run_name}] pruned at step {summary.get('global_step')} ({seconds:.0f}s)")
            raise optuna.TrialPruned()
        value = objective_value(run_dir, summary, sweep.objective)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            msg = f"no {sweep.objective} was logged (does the run evaluate before it ends?)"
            trial.set_user_attr("error", msg)
            echo(f"[{run_name}] failed: {msg}")
            raise TrialFailed(msg)
        echo(f"[{run_name}] {sweep.objective} {value:.4f} ({seconds:.0f}s)")
        return float(value)

    def stop_when_spent(study, trial):
        # the budget counts trials finished or running in every worker on this study, not only this process's
        # (this one's trial has just finished)
        if len(finished_trials(study, optuna)) + len(running_trials(study, optuna)) >= sweep.trials:
            study.stop()

    interrupted = None
    try:
        if todo:
            study.optimize(objective, n_trials=todo, catch=(TrialFailed,), callbacks=[stop_when_spent])
    except SweepInterrupted as e:
        interrupted = str(e)
    finally:
        out = write_outputs(sweep, study, optuna)  # also after Ctrl-C or an error: the table shows where it stopped
    if interrupted:
        echo(f"sweep stopped during {interrupted} (its checkpoint is saved); re-run the same command to continue")
    else:
        best = out["best"]
        echo(f"results: {sweep.dir / 'results.md'}" + (
            f"; best {best['trial']} ({sweep.objective} {best['objective']:.4f}) -> {sweep.dir / 'best.yaml'}"
            if best else ""))
    out["interrupted"] = interrupted
    return out
