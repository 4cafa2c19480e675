"""Evaluation during training, as transformers `TrainerCallback`s that any method's Trainer can take.

- `TaskMetricCallback`: at every evaluation, run GSM8K on a small held-out set and add `eval_gsm8k_accuracy` (and
  `eval_gsm8k_format_rate`) to the evaluation metrics, so `metric_for_best_model`, `load_best_model_at_end` and
  transformers' own `EarlyStoppingCallback` can use it like `eval_loss`.
- `OverfittingWarning`: warns when validation loss has risen for k evaluations in a row while training loss fell.
- `EpochTable`: per-epoch table (epoch, train loss, val loss, duration) kept up to date in RUN/epochs.json; in a
  tunelab run the durations come from the run clock of metrics.jsonl, so they add up the parts of a resumed run.
- `PlotLosses`: refreshes loss.png and loss_epoch.png at every evaluation and at the end.

Early stopping and best-checkpoint restore are transformers' (`EarlyStoppingCallback`, `load_best_model_at_end`):
maintained, and they already agree with the Trainer's checkpoint rotation, so they are used as they are.

Where the task metric goes in: the Trainer passes one dict as the evaluation's log entry (`on_log`) and, right after,
as its metrics (`on_evaluate`, best-model selection, `evaluate()`'s return value). Adding the metric to that dict when it
is logged puts it everywhere at once: metrics.jsonl (for callbacks after this one), `state.log_history`, early stopping
and best-checkpoint selection. So this callback must come before the callback that writes metrics.jsonl.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from tunelab.evaluation.report import epoch_table, plot_losses
from tunelab.evaluation.selection import TASK_METRICS
from tunelab.rundir import read_metrics, write_json_atomic

log = logging.getLogger(__name__)


def _is_eval_log(logs: dict | None) -> bool:
    return bool(logs) and any(k.startswith("eval_") and k.endswith("loss") for k in logs)




class TaskMetricCallback(TrainerCallback):
    """GSM8K accuracy on a small held-out set at every evaluation, as `eval_gsm8k_accuracy` / `eval_gsm8k_format_rate`.

    rows: GSM8K rows ({question, answer}); keep it small (e.g. 20-50): it is generated at every evaluation.
    tokenizer: defaults to the Trainer's processing_class.
    """

    def __init__(self, rows: list, tokenizer=None, *, k_shot: int = 0, shots: list | None = None,
                 max_new_tokens: int = 256, batch_size: int = 16, prefix: str = "eval_gsm8k_"):
        if not rows:
            raise ValueError("TaskMetricCallback needs at least one held-out row")
        self.rows, self.tok = rows, tokenizer
        self.k_shot, self.shots = k_shot, shots
        self.max_new_tokens, self.batch_size, self.prefix = max_new_tokens, batch_size, prefix
        self.history: list[dict] = []  # [{step, accuracy, format_rate, seconds}]

    @property
    def key(self) -> str:
        return f"{self.prefix}{TASK_METRICS[0]}"

    def _measure(self, state, model, tok) -> dict:
        from tunelab.evaluation import gsm8k

        t0 = time.time()
        res = gsm8k.evaluate(model, tok, self.rows, k_shot=self.k_shot, shots=self.shots,
                             batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
                             show_progress=False)  # inside training, whose own progress is showing
        out = {f"{self.prefix}{m}": res[m] for m in TASK_METRICS}
        self.history.append({"step": state.global_step, **{m: res[m] for m in TASK_METRICS},
                             "seconds": round(time.time() - t0, 2)})
        return out

    def on_log(self, args, state, control, logs=None, model=None, processing_class=None, **kw):
        if not _is_eval_log(logs) or self.key in logs or model is None:
            return
        found = self._measure(state, model, self.tok or processing_class)
        logs.update(found)
        # the Trainer appended a copy of this entry to log_history just before on_log: complete it there too
        if state.log_history and state.log_history[-1].get("step") == state.global_step and \
                _is_eval_log(state.log_history[-1]):
            state.log_history[-1].update(found)

    def on_evaluate(self, args, state, control, metrics=None, model=None, processing_class=None, **kw):
        # Normally on_log has added it already; this covers a Trainer that evaluates without logging.
        if metrics is not None and self.key not in metrics and model is not None:
            metrics.update(self._measure(state, model, self.tok or processing_class))


class OverfittingWarning(TrainerCallback):
    """Warn when validation loss has risen for `patience` evaluations in a row while training loss fell.

    Training loss is the mean of the losses logged since the previous evaluation. One warning per rising streak.
    notify: where the one-line warning goes (default: the `tunelab` logger and stderr).
    """

    def __init__(self, patience: int = 3, metric: str = "eval_loss", notify=None):
        if patience < 1:
            raise ValueError("patience must be >= 1")
        self.patience, self.metric = patience, metric
        self.notify = notify or self._default_notify
        self.points: list[tuple[int, float, float | None]] = []  # (step, val loss, train loss)
        self.warnings: list[str] = []
        self._warned_streak_start: int | None = None

    @staticmethod
    def _default_notify(msg: str) -> None:
        log.warning(msg)
        print(f"warning: {msg}", file=sys.stderr)

    def _train_loss_since(self, state, prev_step: int) -> float | None:
        losses = [h["loss"] for h in state.log_history if "loss" in h and prev_step < h.get("step", 0)
                  <= state.global_step]
        return sum(losses) / len(losses) if losses else None

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        if not metrics or self.metric not in metrics:
            return
        prev_step = self.points[-1][0] if self.points else 0
        train = self._train_loss_since(state, prev_step)
        if train is None and self.points:
            train = self.points[-1][2]
        self.points.append((state.global_step, float(metrics[self.metric]), train))
        k = self.patience
        if len(self.points) < k + 1:
            return
        window = self.points[-(k + 1):]
        vals = [p[1] for p in window]
        trains = [p[2] for p in window]
        val_rising = all(b > a for a, b in zip(vals, vals[1:]))
        train_falling = None not in trains and trains[-1] < trains[0]
        if not (val_rising and train_falling):
            self._warned_streak_start = None
            return
        streak_start = window[0][0]
        if self._warned_streak_start is not None:
            return  # already warned about this streak
        self._warned_streak_start = streak_start
        msg = (f"overfitting: validation loss rose for {k} evaluations ({vals[0]:.4f} at step {window[0][0]} -> "
               f"{vals[-1]:.4f} at step {window[-1][0]}) while training loss fell ({trains[0]:.4f} -> "
               f"{trains[-1]:.4f}); consider early stopping, fewer epochs, more data or a lower learning rate")
        self.warnings.append(msg)
        self.notify(msg)


class EpochTable(TrainerCallback):
    """Per-epoch table: epoch, mean train loss, validation loss at the epoch's last evaluation, wall-clock duration.

    Kept in `self.rows` and written to RUN/epochs.json (run_dir defaults to the Trainer's output_dir) whenever it
    changes, so a run stopped half way still has it; the report and loss_epoch.png read it.

    Durations: where RUN/metrics.jsonl exists (a tunelab run), from its run clock (`elapsed`), which carries on
    across resumes and has a point at each epoch's end, so an epoch split by a resume counts both parts and no
    epoch of an earlier part is lost. Elsewhere (a plain Trainer) from this callback's own timers, this process only.
    """

    def __init__(self, run_dir=None):
        self.run_dir = Path(run_dir) if run_dir else None
        self.durations: dict[int, float] = {}
        self.rows: list[dict] = []
        self._epoch_start: float | None = None

    def on_epoch_begin(self, args, state, control, **kw):
        self._epoch_start = time.time()

    def on_epoch_end(self, args, state, control, **kw):
        if self._epoch_start is not None:
            from tunelab.evaluation.report import _epoch_index

            self.durations[_epoch_index(state.epoch or 1)] = round(time.time() - self._epoch_start, 2)
        self._write(args, state)

    def on_evaluate(self, args, state, control, **kw):
        self._write(args, state)

    def on_log(self, args, state, control, **kw):
        if state.epoch and state.epoch == int(state.epoch):  # the epoch-end line reached metrics.jsonl just now:
            self._write(args, state)  # the epoch's duration is known (not at every log: _write reads the log)

    def on_train_end(self, args, state, control, **kw):
        if self._epoch_start is not None and state.epoch:  # a run stopped mid-epoch: time the partial epoch
            from tunelab.evaluation.report import _epoch_index

            self.durations.setdefault(_epoch_index(state.epoch), round(time.time() - self._epoch_start, 2))
        self._write(args, state)

    def _write(self, args, state) -> None:
        rows = epoch_table([h for h in state.log_history if "epoch" in h])
        run_dir = self.run_dir or (Path(args.output_dir) if args.output_dir else None)
        clock = {r["epoch"]: r["duration_s"] for r in epoch_table(read_metrics(run_dir))} if run_dir else {}
        for r in rows:
            r["duration_s"] = clock.get(r["epoch"]) if clock else self.durations.get(r["epoch"])
        self.rows = rows
        if run_dir is not None and state.is_world_process_zero:
            write_json_atomic(run_dir / "epochs.json", rows, indent=1)


class PlotLosses(TrainerCallback):
    """Refresh loss.png and loss_epoch.png from RUN/metrics.jsonl at every evaluation and at the end of training."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)

    def on_evaluate(self, args, state, control, **kw):
        if state.is_world_process_zero:
            plot_losses(self.run_dir)

    def on_train_end(self, args, state, control, **kw):
        if state.is_world_process_zero:
            plot_losses(self.run_dir)


def training_callbacks(run_dir, *, task_rows: list | None = None, tokenizer=None, task_max_new_tokens: int = 256,
                       task_batch_size: int = 16, early_stopping_patience: int | None = None,
                       early_stopping_min_delta: float = 0.0, overfitting_patience: int | None = 3
                       ) -> tuple[list, list]:
    """The evaluation callbacks for a training run, as (before, after) the callback that writes metrics.jsonl.

    `before` holds the task metric, which must add `eval_gsm8k_accuracy` to an evaluation's log entry before that
    entry is written; `after` holds the overfitting warning, the per-epoch table, the loss plots and early stopping.
    Early stopping needs `best_model_args(...)` in the TrainingArguments.
    """
    from transformers import EarlyStoppingCallback

    before = [TaskMetricCallback(task_rows, tokenizer, max_new_tokens=task_max_new_tokens,
                                 batch_size=task_batch_size)] if task_rows else []
    after: list = [EpochTable(run_dir), PlotLosses(run_dir)]
    if overfitting_patience:
        after.insert(0, OverfittingWarning(overfitting_patience))
    if early_stopping_patience:
        after.append(EarlyStoppingCallback(early_stopping_patience=early_stopping_patience,
                                           early_stopping_threshold=early_stopping_min_delta))
    return before, after
