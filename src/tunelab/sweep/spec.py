"""The sweep file: its schema, its checks, and the trial configs it describes.

Everything here runs before anything trains: `load_sweep` reads the file, builds every trial config it can in advance
(the whole grid, or each value and range end once) and validates them as run configs, so a mistake is one line now
instead of a failed trial later. Configs are built with the run config's own pieces (`deep_merge`, `set_key`,
`config_keys`, `explain_validation_error`): a sweep key means exactly what it means in `tunelab train key=value`.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import ValidationError as CoreValidationError

from tunelab.checks import check_config
from tunelab.config import (RunConfig, config_keys, deep_merge, exp_float, explain_validation_error, folder_name,
                            read_yaml, set_key)
from tunelab.errors import UserError, suggest

# objectives every run has; besides them, any metric the trials' evaluation reports (train.reported_metrics: e.g.
# eval_loss, eval_gsm8k_accuracy with eval.task, eval_reward for GRPO/PPO, eval_rewards/accuracies for DPO)
OBJECTIVES = {"last_epoch_train_loss": "min", "train_loss": "min"}


# ---------------------------------------------------------------------------------------------------------- schema


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
    objective: str = Field("auto", description="last_epoch_train_loss, train_loss, or a metric the trials' evaluation "
                           "reports (eval_loss, eval_gsm8k_accuracy, eval_reward, ...); auto: what the method is "
                           "judged by (eval_loss; GRPO/PPO: eval_reward) when the config evaluates, else "
                           "last_epoch_train_loss")
    direction: Literal["auto", "min", "max"] = Field("auto", description="auto: minimize losses; maximize "
                                                     "accuracies, margins, sampled rewards; others need min or max")
    seed: int = Field(0, description="sampler seed")
    storage: str | None = Field(None, description="where the study lives, shared by every worker pointed at it: a "
                                "database URL (postgresql://user:pass@host/db, mysql://..., sqlite:///file.db) or "
                                "journal:PATH (Optuna's journal file, e.g. on a shared disk); default "
                                "sqlite:///sweeps/<name>/study.db")
    heartbeat: int = Field(30, gt=0, description="seconds between a running trial's heartbeats in the storage; a "
                           "trial silent for 4x as long (its worker was killed or its machine lost) is queued again "
                           "and resumed from its checkpoint by a worker")
    study: str | None = Field(None, description="study name in the storage (default: the sweep's name)")
    pruning: Pruning = Field(default_factory=Pruning)

    @field_validator("space", mode="before")
    @classmethod
    def _yaml_floats(cls, v):
        # a sweep file read through config.ConfigLoader has numbers already; a spec built in code may hold '1e-4'
        if isinstance(v, dict):
            return {k: [exp_float(x) for x in dom]
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
            if isinstance(dom, Range) and dom.step is not None:
                if dom.step <= 0:
                    raise ValueError(f"'{key}': step must be above 0 (got {dom.step})")
                # Optuna samples a log range continuously (an integer one with step 1 only) and would refuse it
                # only once the study runs
                if dom.log and not (dom.is_int and dom.step == 1):
                    raise ValueError(f"'{key}': step cannot be combined with log: true; drop one of them")
            if isinstance(dom, list):
                # a value listed twice is the same trial twice (grid), or a choice drawn twice as often (optuna)
                for i, x in enumerate(dom):
                    if any(_same(x, y) for y in dom[:i]):
                        raise ValueError(f"'{key}' lists {x!r} twice; give each value once")
        return v


def _same(a, b) -> bool:
    # 1 == 1.0 is one trial, but True == 1 is not (a flag and a number)
    return a == b and isinstance(a, bool) == isinstance(b, bool)


class SweepSpec(_Spec):
    name: str | None = Field(None, description="sweep name (default: the file's name); trials go to OUT_DIR/NAME/")
    base: str | None = Field(None, description="base run config, relative to this file")
    config: dict[str, Any] = Field(default_factory=dict, description="inline config sections, merged over base")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted keys set in every trial")
    subset: int | None = Field(None, gt=0, description="data.subset for the trials (not for best.yaml)")
    out_dir: str = Field("sweeps", description="parent directory of sweeps")
    search: Search

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v):
        # the sweep's folder is out_dir/name, which --overwrite deletes: it must not be out_dir itself or above it
        return v if v is None else folder_name(v, "a sweep name", "out_dir")


# ---------------------------------------------------------------------------------------------------------- sweep


def with_keys(raw: dict, values: dict[str, Any]) -> dict:
    """A copy of `raw` with dotted keys set through the run config's own set_key, as `tunelab train key=value` sets
    them: a key's value is replaced whole, so a trial's `method: {name: orpo, beta: 0.2}` does not inherit the base
    method's options."""
    out = copy.deepcopy(raw)
    for key, value in values.items():
        set_key(out, key, value)
    return out


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
        raw = self.raw  # with_keys returns copies
        if subset and self.spec.subset:
            raw = with_keys(raw, {"data.subset": self.spec.subset})
        raw = with_keys(raw, params)
        # every trial is an ordinary run in the sweep's directory, named after the trial
        return deep_merge(raw, {"output": {"dir": str(self.dir), "name": run_name}})

    def trial_config(self, params: dict, run_name: str) -> RunConfig:
        return validate(self.trial_raw(params, run_name), f"{self.path}: trial {params}")


# ---------------------------------------------------------------------------------------------------------- checks


def validate(raw: dict, where: str) -> RunConfig:
    """A run config from raw keys, with the run config's own one-line errors prefixed by where they came from."""
    try:
        return check_config(RunConfig(**raw))
    except ValidationError as e:
        raise UserError(f"{where}: {explain_validation_error(e)}") from None
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _check_key(key: str, where: str) -> None:
    if key.split(".")[0] == "output":
        raise UserError(f"{where}: '{key}': the sweep sets output.* itself (trials go to out_dir/name/trial-N)")
    if key.startswith("method.") and key.count(".") == 1:
        return  # a method's own option, checked against the method's Config when the trial configs are built
    # the method section is also a key of its own: its options are free-form, so it can be set whole
    # (method: [{name: sft}, {name: dpo, beta: 0.2}])
    keys = [*config_keys(), "method"]
    if key not in keys:
        raise UserError(f"{where}: '{key}' is not a config key{suggest(key, keys)}")


def sample_points(space: dict[str, list | Range], strategy: str) -> list[dict]:
    """Parameter sets to check before anything trains: the whole grid, else every value and range end once."""
    if strategy == "grid":
        return [dict(zip(space, combo)) for combo in itertools.product(*space.values())]
    first = {k: (v[0] if isinstance(v, list) else v.low) for k, v in space.items()}
    points = [first]
    for k, dom in space.items():
        # a range's step is checked too: 2.5 on an integer key would otherwise first fail as trial {key: 4.5}
        ends = [dom.high, *([dom.low + dom.step] if dom.step and dom.low + dom.step < dom.high else [])] \
            if isinstance(dom, Range) else dom[1:]
        for v in ends:
            points.append({**first, k: int(v) if isinstance(dom, Range) and dom.is_int else v})
    return points


def explain_spec_error(err: ValidationError) -> str:
    """One line for a bad sweep file, through the run config's explain_validation_error, naming the user's typo.

    Pydantic lists every failure, and the first is not always the telling one: a misspelt key (`spaces:`) also
    leaves the key it was meant to be missing, and a range with a bad key fails `list | Range` as a list as well."""
    errors = err.errors()
    # search.space.KEY given as a mapping that failed inside Range: it was meant as a range, not a list
    ranges = {e["loc"][:3] for e in errors if e["loc"][:2] == ("search", "space") and len(e["loc"]) > 4
              and e["loc"][3] == "Range"}
    errors = [e for e in errors if not (e["loc"][:3] in ranges and e["loc"][3] != "Range")]
    errors.sort(key=lambda e: e["type"] != "extra_forbidden")  # the typo first
    first = errors[0]
    if first["loc"][:3] in ranges and first["type"] == "extra_forbidden":
        leaf = str(first["loc"][-1])
        return (f"search.space.{first['loc'][2]}: unknown key '{leaf}'{suggest(leaf, Range.model_fields)}; a range "
                f"takes {', '.join(Range.model_fields)} (e.g. {{low: 1e-5, high: 1e-3, log: true}})")
    # drop the union member's name (Range) from the key; the rest is the run config's own explanation
    errors = [{**e, "loc": tuple(x for i, x in enumerate(e["loc"]) if not (i == 3 and e["loc"][:3] in ranges))}
              for e in errors]
    line_errors = [{k: e[k] for k in ("type", "loc", "input", "ctx") if k in e} for e in errors]
    err = CoreValidationError.from_exception_data(err.title, line_errors)
    return explain_validation_error(err, model=SweepSpec).replace("config key", "sweep key")


def load_sweep(path: str | Path, trials: int | None = None, storage: str | None = None) -> Sweep:
    """Read and check a sweep file: its own keys, the search space's keys and values against the run config, and the
    objective against the evaluation settings of every trial config it can build in advance. Errors are UserErrors.
    `trials` / `storage` replace search.trials / search.storage (the command line's --trials / --storage)."""
    path = Path(path)
    data = read_yaml(path, "sweep file", "expected a mapping")
    if storage and isinstance(data.get("search"), dict):
        data["search"] = {**data["search"], "storage": storage}
    try:
        spec = SweepSpec(**data)
    except ValidationError as e:
        raise UserError(f"{path}: {explain_spec_error(e)}") from None
    s = spec.search
    if spec.base is None and not spec.config:
        raise UserError(f"{path}: give a base config (base: ../quickstart.yaml) or an inline `config:`")
    raw = read_yaml(path.parent / spec.base, "base config", "expected a mapping") if spec.base else {}
    raw = deep_merge(raw, spec.config)
    for key in spec.overrides:
        _check_key(key, f"{path}: overrides")
    raw = with_keys(raw, spec.overrides)
    for key, dom in s.space.items():
        _check_key(key, f"{path}: search.space")
        if s.strategy == "grid" and isinstance(dom, Range):
            raise UserError(f"{path}: search.space.{key}: a grid needs a list of values, not a range; list them "
                            "(e.g. [1.0e-4, 3.0e-4]) or use strategy: random / optuna")
    name = spec.name or path.stem
    sweep_dir = Path(spec.out_dir) / name
    probe = Sweep(spec, path, name, sweep_dir, raw, "", "min", 0)
    points = sample_points(s.space, s.strategy)
    cfgs = []
    for p in points:
        try:
            cfgs.append(probe.trial_config(p, "probe"))
        except UserError as e:
            # a value no one wrote (low + step) needs its origin named
            stepped = [k for k, d in s.space.items() if isinstance(d, Range) and p[k] not in (d.low, d.high)]
            if not stepped:
                raise
            raise UserError(f"{e}; it comes from search.space.{stepped[0]}.step: {s.space[stepped[0]].step}") \
                from None
    grid_size = len(points) if s.strategy == "grid" else None

    # the objective, and what producing it needs (heavy imports from here on: only once the file itself is known
    # to be good)
    from tunelab import tracking
    from tunelab.checks import check_training
    from tunelab.evaluation.selection import NO_SIDE, natural_direction
    from tunelab.train import evaluation_settings, reported_metrics, unreported

    has_eval = all(c.eval_schedule() != "no" for c in cfgs)
    objective = s.objective
    if objective == "auto":  # what the method is judged by when the trials evaluate, else their training loss
        objective = reported_metrics(cfgs[0])[0] if has_eval else "last_epoch_train_loss"
    if objective not in OBJECTIVES:
        if not objective.startswith("eval_"):
            raise UserError(f"{path}: search.objective '{objective}' is unknown{suggest(objective, OBJECTIVES)}; "
                            f"use {', '.join(OBJECTIVES)} or a metric the trials' evaluation reports (eval_loss, ...)")
        for c in cfgs:
            why = unreported(c, objective)
            if why:
                raise UserError(f"{path}: search.objective '{objective}' {why}")
        if not has_eval:
            raise UserError(f"{path}: objective {objective} needs evaluation during training: set data.val_split "
                            "(e.g. 0.1) and training.eval_steps (or training.eval_strategy: epoch) in the config or "
                            "overrides, or use objective: last_epoch_train_loss")
    # train.py's own checks of the evaluation schedule and trackers, run on every probe config now
    for c in cfgs:
        try:
            evaluation_settings(c)
            check_training(c)  # optimizer, schedule, attention: what train refuses before its run directory
            tracking.check(c.training.report_to)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
    direction = s.direction
    if direction == "auto":  # losses minimized; accuracies, margins, sampled rewards maximized, as eval.direction
        direction = OBJECTIVES.get(objective) or natural_direction(objective)
        if direction is None:
            raise UserError(f"{path}: search.objective '{objective}' {NO_SIDE}: set search.direction: min or max")
    if s.strategy != "grid" and trials is None and s.trials is None:
        raise UserError(f"{path}: search.trials: how many trials may the {s.strategy} search run (e.g. trials: 20)?")
    budget = trials or s.trials or grid_size
    if grid_size is not None:
        budget = min(budget, grid_size)
    sweep = Sweep(spec, path, name, sweep_dir, raw, objective, direction, budget)
    if s.pruning.pruner == "threshold" and s.pruning.threshold is None:
        raise UserError(f"{path}: search.pruning.threshold: the threshold pruner needs a value")
    return sweep
