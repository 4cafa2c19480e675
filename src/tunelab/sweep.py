"""`tunelab sweep SWEEP.yaml`: search over any config key; every trial is an ordinary run in sweeps/<name>/<trial>/.

A sweep file is a base config, the keys to search and how:

    base: ../quickstart.yaml          # a run config (path relative to this file); `config:` adds or replaces keys inline
    overrides: {training.save_steps: 6}     # dotted keys applied to every trial (and to the best config)
    subset: 1000                      # data.subset for the trials only: fast trials on a slice of the data
    search:
      strategy: grid                  # grid | random | optuna (TPE)
      space:
        training.learning_rate: [1.0e-4, 3.0e-4]      # a list: these values
        training.weight_decay: {low: 0.0, high: 0.1}  # a range (random / optuna): float, int when both ends are int
      trials: 8                       # the budget (grid: at most the grid's size)
      objective: eval_loss            # eval_loss | last_epoch_train_loss | train_loss | eval_gsm8k_accuracy | ...
      pruning: {pruner: median}       # stop hopeless trials at their evaluations

Optuna does the searching for all three strategies (GridSampler, RandomSampler, TPESampler) and keeps the study in a
database: SQLite at sweeps/<name>/study.db by default, or any database URL (`storage:`), so several machines can work
on one study. Re-running the command continues the study: finished trials are not run again; a trial that was stopped
(Ctrl-C, or a machine that died: its heartbeat goes stale) is queued again with the same parameters and resumes from
its run's last checkpoint, because it trains into the same run directory. Runs are resumed and skipped by train.py
itself (`run_training` continues an unfinished run of the same config and skips a complete one).

Outputs in sweeps/<name>/: results.csv and results.md (trial, params, objective, time, status), plots/ (average
training loss per epoch, one line per value of a searched key, one figure per key), best.yaml (the best trial's config,
ready for `tunelab train`), and logs/<trial>.log (each trial's output).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from transformers import TrainerCallback

from tunelab.config import RunConfig, deep_merge
from tunelab.errors import UserError, suggest

# objective -> default direction. eval_* task metrics (eval_gsm8k_accuracy) are maximized.
OBJECTIVES = {"eval_loss": "min", "last_epoch_train_loss": "min", "train_loss": "min",
              "eval_gsm8k_accuracy": "max", "eval_gsm8k_format_rate": "max"}
EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
MAX_LINES_PER_VALUE = 8  # more distinct values than this (a continuous range) -> one line per trial, colored by value


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Range(_Spec):
    """A range to sample from (random / optuna): floats, or integers when low and high are both integers."""

    low: float | int
    high: float | int
    log: bool = Field(False, description="sample on a log scale (learning rates)")
    step: float | int | None = Field(None, description="discretization step")

    @property
    def is_int(self) -> bool:
        return all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high)) and \
            (self.step is None or isinstance(self.step, int))


class Pruning(_Spec):
    """Stop a trial early when its intermediate objective (at each evaluation, or each epoch for train losses) is
    worse than other trials' at the same point (Optuna pruners)."""

    pruner: Literal["none", "median", "percentile", "hyperband", "threshold"] = Field(
        "none", description="median: worse than the median of earlier trials; percentile: worse than `percentile`; "
        "hyperband: successive halving brackets; threshold: worse than `threshold`")
    startup_trials: int = Field(2, ge=0, description="median/percentile: trials that finish before any is pruned")
    min_samples: int = Field(0, ge=0, description="no trial is pruned before it has trained on this many samples")
    percentile: float = Field(25.0, gt=0, lt=100, description="percentile pruner: keep the best N percent")
    threshold: float | None = Field(None, description="threshold pruner: prune when the objective is worse than this")


class Search(_Spec):
    strategy: Literal["grid", "random", "optuna"] = Field("grid", description="optuna = TPE (Bayesian)")
    space: dict[str, list | Range] = Field(..., description="dotted config key -> list of values or {low, high, log}")
    trials: int | None = Field(None, gt=0, description="trial budget (finished trials); grid: default the whole grid")
    objective: str = Field("auto", description="auto: eval_loss when the config evaluates, else last_epoch_train_loss")
    direction: Literal["auto", "min", "max"] = Field("auto", description="auto: minimize losses, maximize the rest")
    seed: int = Field(0, description="sampler seed")
    storage: str | None = Field(None, description="Optuna storage URL (default sqlite:///sweeps/<name>/study.db)")
    study: str | None = Field(None, description="study name in the storage (default: the sweep's name)")
    pruning: Pruning = Field(default_factory=Pruning)

    @field_validator("space", mode="before")
    @classmethod
    def _yaml_floats(cls, v):
        # YAML 1.1 reads 1e-4 (no dot) as a string; in a list of learning rates it means the number
        if isinstance(v, dict):
            return {k: [float(x) if isinstance(x, str) and EXP_FLOAT.fullmatch(x) else x for x in dom]
                    if isinstance(dom, list) else dom for k, dom in v.items()}
        return v

    @field_validator("space")
    @classmethod
    def _not_empty(cls, v):
        if not v:
            raise ValueError("the search space is empty: give at least one key, e.g. training.learning_rate: [1e-4]")
        for key, dom in v.items():
            if isinstance(dom, list) and not dom:
                raise ValueError(f"'{key}' has no values")
            if isinstance(dom, Range) and dom.low > dom.high:
                raise ValueError(f"'{key}': low ({dom.low}) is above high ({dom.high})")
            if isinstance(dom, Range) and dom.log and dom.low <= 0:
                raise ValueError(f"'{key}': a log range needs low > 0")
        return v


class SweepSpec(_Spec):
    name: str | None = Field(None, description="sweep name (default: the file's name); trials go to OUT_DIR/NAME/")
    base: str | None = Field(None, description="base run config, relative to this file")
    config: dict[str, Any] = Field(default_factory=dict, description="inline config sections, merged over base")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted keys set in every trial")
    subset: int | None = Field(None, gt=0, description="data.subset for the trials (not for best.yaml)")
    out_dir: str = Field("sweeps", description="parent directory of sweeps")
    search: Search


@dataclass
class Sweep:
    """A validated sweep: every trial config is `raw` + the trial's parameters + its output location."""

    spec: SweepSpec
    path: Path
    name: str
    dir: Path
    raw: dict  # base + config + overrides (what best.yaml starts from)
    objective: str
    direction: str  # "min" | "max"
    trials: int
    notes: list[str] = field(default_factory=list)

    @property
    def search(self) -> Search:
        return self.spec.search

    @property
    def storage(self) -> str:
        return self.search.storage or f"sqlite:///{(self.dir / 'study.db').resolve()}"

    @property
    def study_name(self) -> str:
        return self.search.study or self.name

    def trial_raw(self, params: dict, run_name: str, subset: bool = True) -> dict:
        raw = json.loads(json.dumps(self.raw))  # deep copy
        if subset and self.spec.subset:
            _set(raw, "data.subset", self.spec.subset)
        for key, value in params.items():
            _set(raw, key, value)
        raw["output"] = {**raw.get("output", {}), "dir": str(self.dir), "name": run_name}
        return raw

    def trial_config(self, params: dict, run_name: str) -> RunConfig:
        return _validate(self.trial_raw(params, run_name), f"{self.path}: trial {params}")


# ---------------------------------------------------------------------------------------------------------- loading


def _set(raw: dict, dotted: str, value) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[leaf] = value


def config_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the run config (for suggestions)."""
    out = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel) and name != "method":
            out += config_keys(ann, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out + (["method.name"] if not prefix else [])


def _check_key(key: str, where: str) -> None:
    if key.split(".")[0] == "output":
        raise UserError(f"{where}: '{key}': the sweep sets output.* itself (trials go to out_dir/name/trial-N)")
    if key.startswith("method.") and key.count(".") == 1:
        return  # a method's own option, checked against the method's Config when the trial config is built
    keys = config_keys()
    if key not in keys:
        raise UserError(f"{where}: '{key}' is not a config key{suggest(key, keys)}")


def _validate(raw: dict, where: str) -> RunConfig:
    from tunelab.config import explain_validation_error  # the run config's own one-line error messages

    try:
        cfg = RunConfig(**raw)
    except ValidationError as e:
        raise UserError(f"{where}: {explain_validation_error(e)}") from None
    try:
        cfg.method_options()
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return cfg


def _read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML "
                        f"({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping")
    return raw


def _sample_points(space: dict[str, list | Range], strategy: str) -> list[dict]:
    """Parameter sets to check before anything trains: the whole grid, else every value and range end once."""
    if strategy == "grid":
        return [dict(zip(space, combo)) for combo in itertools.product(*space.values())]
    first = {k: (v[0] if isinstance(v, list) else v.low) for k, v in space.items()}
    points = [first]
    for k, dom in space.items():
        for v in (dom[1:] if isinstance(dom, list) else [dom.high]):
            points.append({**first, k: int(v) if isinstance(dom, Range) and dom.is_int else v})
    return points


def load_sweep(path: str | Path, trials: int | None = None) -> Sweep:
    """Read and check a sweep file: its own keys, the search space's keys and values against the run config, and the
    objective against the evaluation settings of every trial config it can build in advance. Errors are UserErrors."""
    from tunelab.config import explain_validation_error

    path = Path(path)
    data = _read_yaml(path, "sweep file")
    try:
        spec = SweepSpec(**data)
    except ValidationError as e:
        message = explain_validation_error(e, model=SweepSpec).replace("config key", "sweep key")
        raise UserError(f"{path}: {message}") from None
    s = spec.search
    if spec.base is None and not spec.config:
        raise UserError(f"{path}: give a base config (base: ../quickstart.yaml) or an inline `config:`")
    raw = _read_yaml((path.parent / spec.base), "base config") if spec.base else {}
    raw = deep_merge(raw, spec.config)
    for key, value in spec.overrides.items():
        _check_key(key, f"{path}: overrides")
        _set(raw, key, value)
    for key, dom in s.space.items():
        _check_key(key, f"{path}: search.space")
        if s.strategy == "grid" and isinstance(dom, Range):
            raise UserError(f"{path}: search.space.{key}: a grid needs a list of values, not a range; list them "
                            "(e.g. [1.0e-4, 3.0e-4]) or use strategy: random / optuna")
    name = spec.name or path.stem
    sweep_dir = Path(spec.out_dir) / name
    probe = Sweep(spec, path, name, sweep_dir, raw, "", "min", 0)
    points = _sample_points(s.space, s.strategy)
    cfgs = [probe.trial_config(p, "probe") for p in points]
    grid_size = len(points) if s.strategy == "grid" else None

    # the objective, and what producing it needs
    has_eval = all(bool((c.data.validation or c.data.val_split) and c.training.eval_steps) for c in cfgs)
    objective = s.objective if s.objective != "auto" else ("eval_loss" if has_eval else "last_epoch_train_loss")
    if objective not in OBJECTIVES:
        raise UserError(f"{path}: search.objective '{objective}' is unknown{suggest(objective, OBJECTIVES)}; "
                        f"known: {', '.join(OBJECTIVES)}")
    if objective.startswith("eval_") and not has_eval:
        raise UserError(f"{path}: objective {objective} needs evaluation during training: set data.val_split "
                        "(e.g. 0.1) and training.eval_steps in the config or overrides, or use objective: "
                        "last_epoch_train_loss")
    if objective.startswith("eval_gsm8k") and not all(c.eval.task == "gsm8k" for c in cfgs):
        raise UserError(f"{path}: objective {objective} needs eval.task: gsm8k")
    from tunelab import tracking
    from tunelab.train import evaluation_settings

    for c in cfgs:
        try:
            evaluation_settings(c)
            tracking.check(c.training.report_to)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
    direction = s.direction if s.direction != "auto" else OBJECTIVES[objective]
    if s.strategy != "grid" and trials is None and s.trials is None:
        raise UserError(f"{path}: search.trials: how many trials may the {s.strategy} search run (e.g. trials: 20)?")
    budget = trials or s.trials or grid_size
    if grid_size is not None:
        budget = min(budget, grid_size)
    sweep = Sweep(spec, path, name, sweep_dir, raw, objective, direction, budget)
    if s.pruning.pruner == "threshold" and s.pruning.threshold is None:
        raise UserError(f"{path}: search.pruning.threshold: the threshold pruner needs a value")
    return sweep


# ---------------------------------------------------------------------------------------------------------- objective


def _epoch_rows(run_dir: Path) -> list[dict]:
    from tunelab.evaluation.report import load_epoch_table

    return [r for r in load_epoch_table(run_dir) if r.get("train_loss") is not None]


def objective_value(run_dir: Path, summary: dict, objective: str) -> float | None:
    """The trial's result: a restored best checkpoint's metric, else the last logged value (or epoch average)."""
    from tunelab import runs

    if objective == "train_loss":
        # the mean of every logged loss: the Trainer's own train_loss covers only the last session of a resumed run
        losses = [r["loss"] for r in runs.read_metrics(run_dir) if "loss" in r]
        return sum(losses) / len(losses) if losses else None
    if objective == "last_epoch_train_loss":
        rows = _epoch_rows(run_dir)
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


class TrialFailed(RuntimeError):
    """A trial that broke (not a user mistake, not an interruption): recorded as failed; the sweep goes on."""


class SweepInterrupted(Exception):
    """Ctrl-C during a trial: its checkpoint is saved; the sweep stops and a re-run resumes that trial."""


# ---------------------------------------------------------------------------------------------------------- running


def _optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("tunelab sweep needs Optuna: pip install 'tunelab[sweep]'") from None
    # each trial gets one line from us instead (a failed trial's traceback goes to its log file)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna


def _label(value):
    """Optuna's categorical choices must be None/bool/int/float/str: other values (lists) travel as JSON text."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def _suggest(trial, key: str, dom) -> Any:
    if isinstance(dom, Range):
        if dom.is_int:
            return trial.suggest_int(key, int(dom.low), int(dom.high), step=int(dom.step or 1), log=dom.log)
        return trial.suggest_float(key, float(dom.low), float(dom.high), step=dom.step, log=dom.log)
    labels = [_label(v) for v in dom]
    return dom[labels.index(trial.suggest_categorical(key, labels))]


def _sampler(sweep: Sweep, optuna, n_existing: int):
    s = sweep.search
    # A re-run continues the study in a new process; seeding with the number of trials already there keeps it
    # reproducible without drawing the first session's points again.
    seed = s.seed + n_existing
    if s.strategy == "grid":
        return optuna.samplers.GridSampler({k: [_label(v) for v in dom] for k, dom in s.space.items()}, seed=s.seed)
    if s.strategy == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(sweep: Sweep, optuna):
    p = sweep.search.pruning
    P = optuna.pruners
    if p.pruner == "median":
        return P.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.min_samples)
    if p.pruner == "percentile":
        # Optuna reads the study's direction: percentile=25 keeps trials in the best 25% at each step
        return P.PercentilePruner(p.percentile, n_startup_trials=p.startup_trials, n_warmup_steps=p.min_samples)
    if p.pruner == "hyperband":
        return P.HyperbandPruner(min_resource=max(1, p.min_samples))
    if p.pruner == "threshold":
        bound = {"upper": p.threshold} if sweep.direction == "min" else {"lower": p.threshold}
        return P.ThresholdPruner(**bound, n_warmup_steps=p.min_samples)
    return P.NopPruner()


def _storage(sweep: Sweep, optuna):
    import warnings

    if sweep.search.storage is None:
        sweep.dir.mkdir(parents=True, exist_ok=True)
    try:
        # The heartbeat marks trials of a process that died (kill -9, a lost machine) as failed after grace_period;
        # RetryHeartbeatStaleTrialCallback then queues them again with the same parameters, hence the same run
        # directory. Optuna flags the heartbeat as experimental; it is the documented way to recover such trials.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(sweep.storage, heartbeat_interval=30, grace_period=120,
                                              heartbeat_stale_trial_callback=_retry(optuna, max_retry=3))
    except Exception as e:  # a bad URL, a missing database driver, an unreachable server
        raise UserError(f"search.storage {sweep.storage!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def _retry(optuna, max_retry: int | None):
    """Optuna's own re-queueing of a trial (same parameters, `run` user attribute copied, retry history kept)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)


def _finished(study, optuna) -> list:
    S = optuna.trial.TrialState
    return [t for t in study.get_trials(deepcopy=False)
            if t.state in (S.COMPLETE, S.PRUNED) or (t.state == S.FAIL and "error" in t.user_attrs)]


def _in_space(sweep: Sweep, params: dict) -> bool:
    space = sweep.search.space
    if set(params) != set(space):
        return False
    for k, v in params.items():
        dom = space[k]
        if isinstance(dom, Range) and not dom.low <= v <= dom.high:
            return False
        if isinstance(dom, list) and v not in [_label(x) for x in dom]:
            return False
    return True


def _requeue_unfinished(study, sweep: Sweep, optuna) -> list[str]:
    """Queue again the trials that were stopped before finishing (FAIL without an error of their own)."""
    S = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    queued = []
    for t in trials:
        run = t.user_attrs.get("run")
        if t.state != S.FAIL or "error" in t.user_attrs or not run or not _in_space(sweep, t.params):
            continue
        if any(u.number > t.number and u.user_attrs.get("run") == run for u in trials):
            continue  # already queued again (by an earlier re-run, or by the stale-heartbeat callback)
        _retry(optuna, None)(study, t)
        queued.append(run)
    return queued


def _run_name(study, trial, optuna) -> str:
    """The run directory of a trial: a re-queued trial keeps its run; parameters identical to a complete trial's
    reuse that run (run_training skips it: the value is read back, nothing trains); else trial-<number>."""
    if trial.user_attrs.get("run"):
        return trial.user_attrs["run"]
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.params == trial.params and t.user_attrs.get("run"):
            return t.user_attrs["run"]
    return f"trial-{trial.number:03d}"


def _describe(params: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in params.items())


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def run_sweep(sweep: Sweep, callbacks=(), echo=print, show_progress: bool = True, overwrite: bool = False) -> dict:
    """Run (or continue) the sweep until its trial budget is spent; write results, plots and best.yaml.
    Returns {"results": rows, "best": row or None, "dir": path}."""
    from tunelab import tracking
    from tunelab.train import run_training

    optuna = _optuna()
    if overwrite:
        shutil.rmtree(sweep.dir, ignore_errors=True)
        if sweep.search.storage is not None:
            try:
                optuna.delete_study(study_name=sweep.study_name, storage=_storage(sweep, optuna))
            except KeyError:
                pass
    storage = _storage(sweep, optuna)
    study = _open_study(sweep, storage, optuna)
    queued = _requeue_unfinished(study, sweep, optuna)
    study.sampler = _sampler(sweep, optuna, len(study.trials))
    done = len(_finished(study, optuna))
    todo = max(0, sweep.trials - done)
    echo(f"sweep {sweep.name}: {sweep.search.strategy} search, objective {sweep.objective} ({sweep.direction}), "
         f"{done}/{sweep.trials} trials finished, {todo} to run" + (f"; continuing {', '.join(queued)}" if queued
                                                                      else "") + f"; study in {_safe_url(sweep.storage)}")
    logs = sweep.dir / "logs"
    first = [True]

    def objective(trial):
        params = {k: _suggest(trial, k, dom) for k, dom in sweep.search.space.items()}
        run_name = _run_name(study, trial, optuna)
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

            echo(f"[{run_name}] {_describe(params)}")
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
                import traceback

                traceback.print_exc(file=log)
                raise TrialFailed(msg) from e
            finally:
                first[0] = False
        if summary.get("status") == "interrupted":
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
        # the budget counts trials finished by every worker on this study, not only this process's
        if len(_finished(study, optuna)) >= sweep.trials:
            study.stop()

    interrupted = None
    try:
        if todo:
            study.optimize(objective, n_trials=todo, catch=(TrialFailed,), callbacks=[stop_when_spent])
    except SweepInterrupted as e:
        interrupted = str(e)
    finally:
        out = write_outputs(sweep, study, optuna)
    if interrupted:
        echo(f"sweep stopped during {interrupted} (its checkpoint is saved); re-run the same command to continue")
    else:
        best = out["best"]
        echo(f"results: {sweep.dir / 'results.md'}" + (
            f"; best {best['trial']} ({sweep.objective} {best['objective']:.4f}) -> {sweep.dir / 'best.yaml'}"
            if best else ""))
    out["interrupted"] = interrupted
    return out


def _safe_url(url: str) -> str:
    """A storage URL without its password, for printing."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _open_study(sweep: Sweep, storage, optuna):
    direction = "minimize" if sweep.direction == "min" else "maximize"
    study = optuna.create_study(study_name=sweep.study_name, storage=storage, direction=direction,
                                pruner=_pruner(sweep, optuna), load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise UserError(f"study '{sweep.study_name}' in {_safe_url(sweep.storage)} was created to "
                        f"{study.direction.name.lower()}; this sweep would {direction}: set search.study to a new "
                        "name or pass --overwrite")
    known = study.user_attrs.get("objective")
    if known and known != sweep.objective:
        raise UserError(f"study '{sweep.study_name}' optimizes {known}, this sweep {sweep.objective}: set "
                        "search.study to a new name or pass --overwrite")
    study.set_user_attr("objective", sweep.objective)
    return study


# ---------------------------------------------------------------------------------------------------------- outputs


def result_rows(sweep: Sweep, study, optuna) -> list[dict]:
    """One row per trial run (the latest Optuna trial of each run directory), in trial order."""
    from tunelab import runs

    S = optuna.trial.TrialState
    latest: dict[str, Any] = {}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("run"):
            latest[t.user_attrs["run"]] = t
    rows = []
    for run, t in sorted(latest.items()):
        status = {S.COMPLETE: "complete", S.PRUNED: "pruned", S.RUNNING: "running", S.WAITING: "queued"}.get(t.state)
        if t.state == S.FAIL:
            status = "failed" if "error" in t.user_attrs else "interrupted"
        value = t.value if t.state == S.COMPLETE else (
            t.intermediate_values[t.last_step] if t.state == S.PRUNED and t.last_step is not None else None)
        metrics = runs.read_metrics(sweep.dir / run)
        elapsed = max((m.get("elapsed", 0) for m in metrics), default=None)
        rows.append({"trial": run, **{k: t.params.get(k) for k in sweep.search.space}, "objective": value,
                     "status": status, "time_s": round(elapsed, 1) if elapsed is not None else None,
                     "steps": t.user_attrs.get("steps"), "error": t.user_attrs.get("error", ""),
                     "number": t.number})
    return rows


def _best(sweep: Sweep, rows: list[dict]) -> dict | None:
    done = [r for r in rows if r["status"] == "complete" and r["objective"] is not None]
    if not done:
        return None
    pick = min if sweep.direction == "min" else max
    return pick(done, key=lambda r: r["objective"])


def write_outputs(sweep: Sweep, study, optuna) -> dict:
    sweep.dir.mkdir(parents=True, exist_ok=True)
    rows = result_rows(sweep, study, optuna)
    best = _best(sweep, rows)
    _write_csv(sweep.dir / "results.csv", rows)
    (sweep.dir / "results.md").write_text(results_markdown(sweep, rows, best))
    plots = plot_sweep(sweep, rows)
    if best:
        write_best_config(sweep, {k: best[k] for k in sweep.search.space}, best)
    return {"results": rows, "best": best, "plots": plots, "dir": sweep.dir}


def _write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    tmp.replace(path)


def results_markdown(sweep: Sweep, rows: list[dict], best: dict | None) -> str:
    keys = list(sweep.search.space)
    lines = [f"# sweep {sweep.name}", "",
             f"{sweep.search.strategy} search over {', '.join(f'`{k}`' for k in keys)}; objective "
             f"`{sweep.objective}` ({'lower' if sweep.direction == 'min' else 'higher'} is better); "
             f"{sum(r['status'] in ('complete', 'pruned') for r in rows)}/{sweep.trials} trials finished"
             + (f"; trials on a {sweep.spec.subset}-row subset" if sweep.spec.subset else "") + ".", ""]
    if best:
        lines += [f"**Best: {best['trial']}** ({sweep.objective} {best['objective']:.4f}): "
                  f"{_describe({k: best[k] for k in keys})}. Train it: `tunelab train {sweep.dir / 'best.yaml'}`", ""]
    header = ["trial", *keys, sweep.objective, "time (s)", "status"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        obj = "" if r["objective"] is None else f"{r['objective']:.4f}"
        mark = " ★" if best and r["trial"] == best["trial"] else ""
        status = r["status"] + (f": {r['error']}" if r["error"] else "")
        cells = [r["trial"] + mark, *(_fmt(r[k]) for k in keys), obj,
                 "" if r["time_s"] is None else f"{r['time_s']:.0f}", status]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(sweep: Sweep, rows: list[dict]) -> list[Path]:
    """plots/epoch_loss_<key>.png per searched key: average training loss per epoch, one line per value of the key
    (the mean over the trials that had that value), or one line per trial colored by value for continuous ranges."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for r in rows:
        if r["status"] in ("complete", "pruned", "interrupted"):
            table = _epoch_rows(sweep.dir / r["trial"])
            if table:
                curves[r["trial"]] = ([t["epoch"] for t in table], [t["train_loss"] for t in table],
                                      [t.get("val_loss") for t in table])
    if not curves:
        return []
    out_dir = sweep.dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, dom in sweep.search.space.items():
        by_value: dict[Any, list[str]] = {}
        for r in rows:
            if r["trial"] in curves:
                by_value.setdefault(r[key], []).append(r["trial"])
        fig, ax = plt.subplots(figsize=(7, 4.5))
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in by_value)
        if len(by_value) <= MAX_LINES_PER_VALUE:
            ordered = sorted(by_value, key=lambda v: (v if numeric else str(v)))
            for value in ordered:
                epochs, mean = _mean_curve([curves[t][:2] for t in by_value[value]])
                n = len(by_value[value])
                ax.plot(epochs, mean, marker="o", label=f"{_fmt(value)}" + (f" (mean of {n} trials)" if n > 1 else ""))
            ax.legend(title=key.split(".")[-1], fontsize="small")
        else:  # a continuous range: every trial its own line, colored by its value
            cmap = plt.get_cmap("viridis")
            values = [v for v in by_value if numeric]
            lo, hi = (min(values), max(values)) if values else (0, 1)
            log = isinstance(dom, Range) and dom.log
            norm = (matplotlib.colors.LogNorm if log else matplotlib.colors.Normalize)(vmin=lo, vmax=hi)
            for value, trials in by_value.items():
                for t in trials:
                    ax.plot(*curves[t][:2], marker="o", color=cmap(norm(value)) if numeric else None, alpha=0.8)
            if numeric:
                fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=key.split(".")[-1])
        ax.set_xlabel("epoch")
        ax.set_ylabel("average training loss")
        ax.set_title(f"{sweep.name}: training loss per epoch by {key}")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"epoch_loss_{key.replace('.', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _mean_curve(curves: list[tuple[list, list]]) -> tuple[list, list]:
    """Element-wise mean over trials by epoch (a trial with fewer epochs, e.g. pruned, counts where it has data)."""
    acc: dict[int, list[float]] = {}
    for epochs, losses in curves:
        for e, v in zip(epochs, losses):
            acc.setdefault(e, []).append(v)
    epochs = sorted(acc)
    return epochs, [sum(acc[e]) / len(acc[e]) for e in epochs]


def write_best_config(sweep: Sweep, params: dict, best: dict) -> Path:
    """best.yaml: the base config with the best parameters, the full data (no sweep subset), its own run name."""
    values = {k: _suggest_value(sweep.search.space[k], v) for k, v in params.items()}
    raw = sweep.trial_raw(values, f"{sweep.name}-best", subset=False)
    raw["output"]["dir"] = sweep.raw.get("output", {}).get("dir", "runs")
    _validate(raw, f"{sweep.dir / 'best.yaml'}")
    path = sweep.dir / "best.yaml"
    note = (f" The trials trained on a {sweep.spec.subset}-row subset; this config uses the base config's data."
            if sweep.spec.subset else "")
    header = (f"# tunelab train {path}\n#\n# Best trial of sweep {sweep.name}: {best['trial']} ({sweep.objective} "
              f"{best['objective']:.4f}) with {_describe(values)}.{note}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".best.yaml.tmp")
    tmp.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    tmp.replace(path)
    return path


def _suggest_value(dom, stored):
    """A trial's stored parameter back to the config value (JSON text of a list choice -> the list)."""
    if isinstance(dom, list):
        return dom[[_label(v) for v in dom].index(stored)]
    return stored


# ---------------------------------------------------------------------------------------------------------- CLI


def main(args) -> int:
    from tunelab.train import quiet_libraries

    quiet_libraries()
    sweep = load_sweep(args.sweep, trials=args.trials)
    if args.dry_run:
        pts = _sample_points(sweep.search.space, sweep.search.strategy)
        print(f"sweep {sweep.name}: {sweep.search.strategy}, {sweep.trials} trials, objective {sweep.objective} "
              f"({sweep.direction}), trials in {sweep.dir}/, study {_safe_url(sweep.storage)}")
        if sweep.search.strategy == "grid":
            for i, p in enumerate(pts[: sweep.trials]):
                print(f"  {i:3d}  {_describe(p)}")
        else:
            for k, dom in sweep.search.space.items():
                print(f"  {k}: {dom if isinstance(dom, list) else dom.model_dump()}")
        print("configuration checked; nothing trained")
        return 0
    out = run_sweep(sweep, overwrite=args.overwrite)
    return 0 if out["best"] or out["interrupted"] else 1
