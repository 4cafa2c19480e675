"""What a sweep leaves behind in sweeps/<name>/: results.csv and results.md (trial, params, objective, time, status),
plots/ (average training loss per epoch by searched key) and best.yaml (the best trial's config, ready to train).

All of it is rebuilt from the study and the trials' run directories after every session, so the files describe every
worker's trials, not only this process's. Each file is written whole or not at all (temp file, then rename).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import yaml

from tunelab.rundir import read_metrics, write_text_atomic
from tunelab.sweep.spec import Range, Sweep, validate
from tunelab.sweep.study import decode_choice

MAX_LINES_PER_VALUE = 8  # more distinct values than this (a continuous range) -> one line per trial, colored by value


def format_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def describe(params: dict) -> str:
    """'learning_rate=0.0003, scheduler=cosine': a trial's parameters by their last key part."""
    return ", ".join(f"{k.split('.')[-1]}={format_value(v)}" for k, v in params.items())


def epoch_rows(run_dir: Path) -> list[dict]:
    """A run's per-epoch table (average training loss per epoch), epochs without a training loss left out."""
    from tunelab.evaluation.report import load_epoch_table

    return [r for r in load_epoch_table(run_dir) if r.get("train_loss") is not None]


# ---------------------------------------------------------------------------------------------------------- table


def result_rows(sweep: Sweep, study, optuna) -> list[dict]:
    """One row per trial run (the latest Optuna trial of each run directory), in trial order."""
    S = optuna.trial.TrialState
    latest: dict[str, Any] = {}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("run"):
            latest[t.user_attrs["run"]] = t
    rows = []
    for run, t in sorted(latest.items()):
        status = {S.COMPLETE: "complete", S.PRUNED: "pruned", S.RUNNING: "running", S.WAITING: "queued"}.get(t.state)
        if t.state == S.FAIL:
            # a trial that broke records its error; one without (Ctrl-C, a dead machine) is resumed by a re-run
            status = "failed" if "error" in t.user_attrs else "interrupted"
        # a pruned trial is shown with the last value it reported: the one the pruner judged
        value = t.value if t.state == S.COMPLETE else (
            t.intermediate_values[t.last_step] if t.state == S.PRUNED and t.last_step is not None else None)
        metrics = read_metrics(sweep.dir / run)
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
    """results.csv, results.md, plots/ and (once a trial completed) best.yaml. Returns the rows, best row and plots."""
    sweep.dir.mkdir(parents=True, exist_ok=True)
    rows = result_rows(sweep, study, optuna)
    best = _best(sweep, rows)
    write_text_atomic(sweep.dir / "results.csv", results_csv(rows))
    write_text_atomic(sweep.dir / "results.md", results_markdown(sweep, rows, best))
    plots = plot_sweep(sweep, rows)
    if best:
        write_best_config(sweep, {k: best[k] for k in sweep.search.space}, best)
    return {"results": rows, "best": best, "plots": plots, "dir": sweep.dir}


def results_csv(rows: list[dict]) -> str:
    """Every row with every column (an empty file before the first trial)."""
    buf = io.StringIO(newline="")
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def results_markdown(sweep: Sweep, rows: list[dict], best: dict | None) -> str:
    keys = list(sweep.search.space)
    lines = [f"# sweep {sweep.name}", "",
             f"{sweep.search.strategy} search over {', '.join(f'`{k}`' for k in keys)}; objective "
             f"`{sweep.objective}` ({'lower' if sweep.direction == 'min' else 'higher'} is better); "
             f"{sum(r['status'] in ('complete', 'pruned') for r in rows)}/{sweep.trials} trials finished"
             + (f"; trials on a {sweep.spec.subset}-row subset" if sweep.spec.subset else "") + ".", ""]
    if best:
        lines += [f"**Best: {best['trial']}** ({sweep.objective} {best['objective']:.4f}): "
                  f"{describe({k: best[k] for k in keys})}. Train it: `tunelab train {sweep.dir / 'best.yaml'}`", ""]
    header = ["trial", *keys, sweep.objective, "time (s)", "status"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        obj = "" if r["objective"] is None else f"{r['objective']:.4f}"
        mark = " ★" if best and r["trial"] == best["trial"] else ""
        status = r["status"] + (f": {r['error']}" if r["error"] else "")
        cells = [r["trial"] + mark, *(format_value(r[k]) for k in keys), obj,
                 "" if r["time_s"] is None else f"{r['time_s']:.0f}", status]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------- plots


def plot_sweep(sweep: Sweep, rows: list[dict]) -> list[Path]:
    """plots/epoch_loss_<key>.png per searched key: average training loss per epoch, one line per value of the key
    (the mean over the trials that had that value), or one line per trial colored by value for continuous ranges."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for r in rows:
        if r["status"] in ("complete", "pruned", "interrupted"):
            table = epoch_rows(sweep.dir / r["trial"])
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
                ax.plot(epochs, mean, marker="o",
                        label=f"{format_value(value)}" + (f" (mean of {n} trials)" if n > 1 else ""))
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


# ---------------------------------------------------------------------------------------------------------- best.yaml


def write_best_config(sweep: Sweep, params: dict, best: dict) -> Path:
    """best.yaml: the base config with the best parameters, the full data (no sweep subset), its own run name."""
    values = {k: decode_choice(sweep.search.space[k], v) for k, v in params.items()}
    raw = sweep.trial_raw(values, f"{sweep.name}-best", subset=False)
    # trained on its own, outside the sweep's directory: where the base config puts its runs
    raw["output"]["dir"] = sweep.raw.get("output", {}).get("dir", "runs")
    validate(raw, f"{sweep.dir / 'best.yaml'}")
    path = sweep.dir / "best.yaml"
    note = (f" The trials trained on a {sweep.spec.subset}-row subset; this config uses the base config's data."
            if sweep.spec.subset else "")
    header = (f"# tunelab train {path}\n#\n# Best trial of sweep {sweep.name}: {best['trial']} ({sweep.objective} "
              f"{best['objective']:.4f}) with {describe(values)}.{note}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, header + yaml.safe_dump(raw, sort_keys=False))
    return path
