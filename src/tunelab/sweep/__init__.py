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
      objective: eval_loss            # last_epoch_train_loss | train_loss | a metric the evaluation reports
      pruning: {pruner: median}       # stop hopeless trials at their evaluations

Optuna does the searching for all three strategies (GridSampler, RandomSampler, TPESampler) and keeps the study in a
database: SQLite at sweeps/<name>/study.db by default, or any database URL or an Optuna journal file (`storage:` or
`--storage`: postgresql://..., journal:PATH), so several machines can work on one study, each running the same
command. Re-running the command continues the study: finished trials are not run again; a trial that was stopped
(Ctrl-C; a killed process of this machine, found at once; another machine that died, once its heartbeat goes
stale) is queued again with the same parameters and resumes from its run's last checkpoint, because it trains into
the same run directory. Runs are resumed and skipped by train.py
itself (`run_training` continues an unfinished run of the same config and skips a complete one).

Outputs in sweeps/<name>/: results.csv and results.md (trial, params, objective, time, status), plots/ (average
training loss per epoch, one line per value of a searched key, one figure per key), best.yaml (the best trial's config,
ready for `tunelab train`), and logs/<trial>.log (each trial's output).

The package, in the order a sweep goes through it:
    spec.py    the sweep file's schema and checks; `load_sweep` -> `Sweep` (builds each trial's run config)
    study.py   Optuna glue: storage, study, sampler, pruner, suggested values, re-queued trials
    runner.py  `run_sweep`: one run per trial through train.py, the objective, the pruning callback
    report.py  results.csv / results.md, plots, best.yaml
"""

from __future__ import annotations

from tunelab.sweep.report import describe, plot_sweep, result_rows, results_markdown, write_best_config, write_outputs
from tunelab.sweep.spec import OBJECTIVES, Pruning, Range, Search, Sweep, SweepSpec, load_sweep, sample_points
from tunelab.sweep.study import grid_run_names, safe_url

__all__ = ["OBJECTIVES", "Pruning", "Range", "ReportToTrial", "Search", "Sweep", "SweepInterrupted", "SweepSpec",
           "TrialFailed", "load_sweep", "main", "objective_value", "plot_sweep", "result_rows", "results_markdown",
           "run_sweep", "write_best_config", "write_outputs"]


# runner.py imports transformers (seconds): its names load on first use, so checking a sweep file (a refusal,
# --dry-run) imports no training library
RUNNER = ("ReportToTrial", "SweepInterrupted", "TrialFailed", "objective_value", "run_sweep")


def __getattr__(name: str):
    if name in RUNNER:
        from tunelab.sweep import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(args) -> int:
    """The CLI: check the sweep file; with --dry-run list what would run, else run (or continue) it."""
    from tunelab.train import quiet_libraries

    sweep = load_sweep(args.sweep, trials=args.trials, storage=args.storage)
    if args.dry_run:
        print(f"sweep {sweep.name}: {sweep.search.strategy}, {sweep.trials} trials, objective {sweep.objective} "
              f"({sweep.direction}), trials in {sweep.dir}/, study {safe_url(sweep.storage)}")
        if sweep.search.strategy == "grid":
            # each point with the run directory it trains in; Optuna's grid sampler picks only the order
            points = grid_run_names(sweep)
            if sweep.trials < len(points):
                print(f"  the budget runs {sweep.trials} of these {len(points)} points, picked by Optuna's sampler")
            for name, p in points:
                print(f"  {name}  {describe(p)}")
        else:  # random / optuna draw their points as they go: show the space instead
            for k, dom in sweep.search.space.items():
                print(f"  {k}: {dom if isinstance(dom, list) else dom.model_dump()}")
        print("configuration checked; nothing trained")
        return 0
    from tunelab.sweep.runner import run_sweep

    quiet_libraries()
    out = run_sweep(sweep, overwrite=args.overwrite)
    # exit 1 when nothing completed (every trial failed or was pruned); a stopped sweep is not a failure
    return 0 if out["best"] or out["interrupted"] else 1
