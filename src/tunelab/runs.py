"""Run directories, atomic checkpoints, exact resume, metrics, progress and plots: shared by every method.

Layout of runs/<name>/:
  config.yaml        the resolved config (what actually ran)
  metrics.jsonl      one JSON object per log step (step, epoch, loss, learning_rate, grad_norm, tokens, tokens_per_s, elapsed)
  checkpoints/       checkpoint-N/ directories, each complete (see below); the last K are kept
  final/             the trained adapter (PEFT format) or full model (transformers format), with the tokenizer
  summary.json       what happened: steps, losses, tokens/s, peak memory, data counts
  loss.png           training (and validation) loss against step

Checkpoints are atomic: the Trainer writes each one under .staging/, and only once it is fully written (model,
optimizer, scheduler, RNG, trainer state) is it renamed into checkpoints/. A run killed mid-save leaves garbage in
.staging/ only, which the next start deletes; everything in checkpoints/ is complete and resumable. The HF Trainer
has no such option, so this part is written here.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from tunelab.errors import UserError

STAGING = ".staging"
CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class Run:
    dir: Path
    resume_from: Path | None = None
    complete: bool = False
    overwrite: bool = False

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def staging(self) -> Path:
        return self.dir / STAGING


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """checkpoint-N directories in step order (only renamed-into-place, hence complete, ones live here)."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := CKPT_RE.match(p.name)) and p.is_dir()
             and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def _first_difference(a: dict, b: dict, prefix: str = "") -> str | None:
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            d = _first_difference(va, vb, key + ".")
            if d:
                return d
        elif va != vb:
            return f"{key}: {vb!r} in the run, {va!r} now"
    return None


def open_run(cfg, overwrite: bool = False) -> Run:
    """Decide what to do with the run directory: start, resume, or nothing (complete). Writes nothing; refuses to
    touch an existing run unless it is the same config (resume) or `overwrite` is given. `start_run` writes."""
    import yaml

    run_dir = Path(cfg.output.dir) / (cfg.output.name or "run")
    run = Run(run_dir, overwrite=overwrite)
    if run_dir.exists() and not overwrite and any(run_dir.iterdir()):
        saved = run_dir / "config.yaml"
        if cfg.output.resume == "never":
            raise UserError(f"run directory {run_dir} already exists; pass --overwrite to start over or set "
                            "output.name to a new name")
        if not saved.is_file():
            raise UserError(f"{run_dir} exists and is not a tunelab run (no config.yaml); choose another "
                            "output.name or pass --overwrite")
        old = yaml.safe_load(saved.read_text())
        new = yaml.safe_load(cfg.to_yaml())
        for d in (old, new):
            d.get("output", {}).pop("resume", None)
        diff = _first_difference(new, old)
        if diff:
            raise UserError(f"run {run_dir} exists with a different config ({diff}); resume with the same config, "
                            "pass --overwrite to start over, or set output.name to a new name")
        summary = run_dir / "summary.json"
        if (run_dir / "final").is_dir() and summary.is_file() and \
                json.loads(summary.read_text()).get("status") == "complete":
            run.complete = True
            return run
        ckpts = complete_checkpoints(run.checkpoints)
        run.resume_from = ckpts[-1] if ckpts else None
    return run


def start_run(run: Run, cfg) -> None:
    """Create (or, with overwrite, recreate) the run directory once every check has passed."""
    if run.overwrite and run.dir.exists():
        shutil.rmtree(run.dir)
    run.dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run.staging, ignore_errors=True)  # leftovers of a save that was cut off
    (run.dir / "config.yaml").write_text(cfg.to_yaml())
    _truncate_metrics(run.dir / "metrics.jsonl", _ckpt_step(run.resume_from))


def _ckpt_step(path: Path | None) -> int:
    return int(CKPT_RE.match(path.name).group(1)) if path else 0


def _truncate_metrics(path: Path, upto_step: int) -> None:
    """On resume, drop log lines past the checkpoint so the curve continues exactly from there."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= upto_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def peak_memory_mb() -> float:
    """Peak memory of this process: GPU allocator peak on CUDA, else the resident-set high-water mark."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    # Linux: VmHWM belongs to this program's own address space. getrusage's ru_maxrss survives fork+exec, so a
    # `tunelab train` started by a larger process (a test runner, a notebook) would report its parent's peak.
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AtomicCheckpoints(TrainerCallback):
    """Move each finished checkpoint from .staging/ into checkpoints/ with one rename; keep the last K (+ best)."""

    def __init__(self, run: Run, keep: int | None):
        self.run, self.keep = run, keep

    def on_save(self, args, state, control, **kw):
        staged = self.run.staging / f"checkpoint-{state.global_step}"
        if not staged.is_dir():
            return
        self.run.checkpoints.mkdir(exist_ok=True)
        target = self.run.checkpoints / staged.name
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
        if state.best_model_checkpoint and Path(state.best_model_checkpoint).name == staged.name:
            state.best_model_checkpoint = str(target)
        self._rotate(state)

    def _rotate(self, state):
        if not self.keep:
            return
        ckpts = complete_checkpoints(self.run.checkpoints)
        best = Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None
        for p in ckpts[: max(0, len(ckpts) - self.keep)]:
            if p.name != best:
                shutil.rmtree(p, ignore_errors=True)

    def on_train_begin(self, args, state, control, **kw):
        # A resumed state may name the best checkpoint by its staging path; point it at the real one.
        if state.best_model_checkpoint:
            real = self.run.checkpoints / Path(state.best_model_checkpoint).name
            if real.is_dir():
                state.best_model_checkpoint = str(real)


class GracefulStop(TrainerCallback):
    """Ctrl-C (SIGINT) or SIGTERM: finish the current step, save a checkpoint, stop; the run resumes later."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handler(self, signum, frame):
        if self.requested:  # a second Ctrl-C means: stop now
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step: saving a checkpoint (Ctrl-C again to abort without saving)", flush=True)

    def on_train_begin(self, args, state, control, **kw):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. inside a server); leave signals alone
                pass

    def on_step_end(self, args, state, control, **kw):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kw):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class MetricsLog(TrainerCallback):
    """Append every log to metrics.jsonl with tokens seen (non-padding) and tokens/s; show a progress line."""

    def __init__(self, run: Run, show_progress: bool = True):
        self.path = run.dir / "metrics.jsonl"
        self.show = show_progress
        self.t0 = self.last_t = time.time()
        self.last_tokens = 0
        self.elapsed_before = 0.0
        self.progress = None

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = self.last_t = time.time()
        self.last_tokens = state.num_input_tokens_seen or 0
        if self.path.is_file():  # resumed: elapsed time continues from the last logged line
            lines = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
            self.elapsed_before = max((x.get("elapsed", 0) for x in lines), default=0.0)
        if self.show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                     TextColumn("{task.fields[info]}"), transient=False)
            self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, info="")
            self.progress.start()

    def on_step_end(self, args, state, control, **kw):
        if self.progress:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        now = time.time()
        tokens = state.num_input_tokens_seen or 0
        rec = {"step": state.global_step, "epoch": round(state.epoch or 0, 4)}
        for k in ("loss", "learning_rate", "grad_norm", "eval_loss"):
            if k in logs:
                rec[k] = logs.pop(k)
        if "loss" in rec:
            dt = max(now - self.last_t, 1e-9)
            rec["tokens"] = tokens
            rec["tokens_per_s"] = round((tokens - self.last_tokens) / dt, 2)
            self.last_t, self.last_tokens = now, tokens
        rec["elapsed"] = round(self.elapsed_before + now - self.t0, 3)
        skip = {"num_input_tokens_seen", "train_runtime", "train_tokens_per_second", "num_tokens"}
        rec.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str)) and k not in skip})
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self.progress and "loss" in rec:
            self.progress.update(self.task, info=f"loss {rec['loss']:.4f}  {rec['tokens_per_s']:.0f} tok/s")

    def on_train_end(self, args, state, control, **kw):
        if self.progress:
            self.progress.stop()


def read_metrics(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []
