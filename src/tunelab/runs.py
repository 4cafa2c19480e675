"""Run directories, atomic checkpoints, exact resume, metrics, progress and plots: shared by every method.

Layout of runs/<name>/:
  config.yaml        the resolved config (what actually ran)
  metrics.jsonl      one JSON object per log step (step, epoch, loss, learning_rate, grad_norm, tokens, tokens_per_s, elapsed)
  checkpoints/       checkpoint-N/ directories, each complete (see below); the last K are kept
  final/             the trained adapter (PEFT format) or full model (transformers format), with the tokenizer
  summary.json       what happened: steps, losses, tokens/s, peak memory, data counts; train_loss, train_seconds and
                     tokens/s cover every part of a resumed run (train_loss: rundir.train_loss)
  loss.png           training (and validation) loss against step

Checkpoints are atomic: the Trainer writes each one under .staging/, and only once it is fully written (model,
optimizer, scheduler, RNG, trainer state, and a copy of the run's config as run_config.yaml) is it renamed into
checkpoints/. A run killed mid-save leaves garbage in .staging/ only, which the next start deletes; everything in
checkpoints/ is complete and resumable. The HF Trainer has no such option, so this part is written here.

Every file of the run directory is read and written through tunelab.rundir (re-exported here): atomic writes, the
one metrics reader, and `open_finished_run` for eval, export, serve/chat and models.load_for_inference.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from tunelab import distributed
from tunelab.errors import UserError
from tunelab.rundir import (FinishedRun, RunLock, find_run, open_finished_run, parse_metrics, read_json,  # noqa: F401
                            read_metrics, read_run_config, train_loss, train_seconds, write_json_atomic,
                            write_text_atomic)  # the run directory's readers and writers live there, used via runs.*

STAGING = ".staging"
CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
# what a run directory holds (the layout above), for telling a run from another folder before --overwrite deletes it
RUN_ENTRIES = {"config.yaml", "metrics.jsonl", "summary.json", "epochs.json", "loss.png", "loss_epoch.png",
               "checkpoints", "final", STAGING, ".final.tmp", "eval", "export", "tensorboard", "mlruns", "wandb",
               "trackers.json", "distill_report.md", "distill_report.json"}
CONFIG_COPY = "run_config.yaml"  # the run's resolved config inside each checkpoint: what those weights trained with


@dataclass
class Run:
    dir: Path
    resume_from: Path | None = None
    complete: bool = False
    overwrite: bool = False
    config_text: str | None = None  # the resolved config (start_run), copied into each checkpoint
    notice: str | None = None  # one line for the user about a repair open_run decided on
    lock: RunLock = field(default_factory=RunLock)  # held by the process that trains the run (see claim)

    def claim(self) -> None:
        """Lock the run directory for this job (rank 0 holds it for all processes), or refuse in one line while
        another job trains it. A run directory that does not exist yet is locked by start_run once created."""
        if distributed.is_main():
            self.lock.acquire(self.dir)

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


def _config_dict(cfg) -> dict:
    import yaml

    d = yaml.safe_load(cfg.to_yaml())
    _drop_start_settings(d)
    return d


def _drop_start_settings(d: dict) -> None:
    # how to treat an existing run, the checkpoint it started from (output.resume_from, used only until the run has
    # checkpoints of its own) and where it reports its metrics besides metrics.jsonl (training.report_to) are not
    # part of what the run is: changing them must not refuse a resume
    for key in ("resume", "resume_from"):
        d.get("output", {}).pop(key, None)
    d.get("training", {}).pop("report_to", None)


def _saved_config(path: Path) -> dict | None:
    """A config.yaml (the run's, or a checkpoint's copy) as a dict, None when missing or damaged. tunelab writes it
    ending with a newline, so a file without one was cut off, even where the part left still parses."""
    if not path.is_file() or not path.read_bytes().endswith(b"\n"):
        return None
    d = _yaml_file(path)
    if d is not None:
        _drop_start_settings(d)
    return d


def _yaml_file(path: Path) -> dict | None:
    import yaml

    try:
        d = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return d if isinstance(d, dict) and d else None


def _state_difference(cfg, ckpt: Path) -> str | None:
    """What the checkpoint's trainer state records of the schedule (steps, epochs, save and log intervals) against
    the config; the fallback check for checkpoints written before they carried a copy of the config."""
    state = read_json(ckpt / "trainer_state.json", {})
    t = cfg.training
    now = {"save_steps": t.save_steps, "logging_steps": t.logging_steps}
    now.update({"max_steps": t.max_steps} if t.max_steps and t.max_steps > 0 else {"num_train_epochs": t.epochs})
    for k, v in now.items():
        if k in state and state[k] != v:
            return f"training.{k.replace('num_train_', '')}: {state[k]!r} in {ckpt.name}, {v!r} now"
    return None


def open_run(cfg, overwrite: bool = False) -> Run:
    """Decide what to do with the run directory: start, resume, or nothing (complete). Writes nothing; refuses to
    touch an existing run unless it is the same config (resume) or `overwrite` is given. `start_run` writes.

    The config a run is checked against is its config.yaml or, where that is missing, damaged or differs, the copy
    in its last checkpoint (what those weights trained with): a crash that cut config.yaml off then costs nothing,
    and the user is never sent to --overwrite (which deletes the checkpoints) for a file tunelab can rewrite.
    """
    run_dir = Path(cfg.output.dir) / (cfg.output.name or "run")
    run = Run(run_dir, overwrite=overwrite)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} exists and is not a directory; choose another output.name or output.dir")
    if any(run_dir.iterdir() if run_dir.exists() else ()) and not is_run_dir(run_dir):
        # --overwrite deletes the folder whole: only ever a run's, never a folder of runs or of anything else
        raise UserError(f"{run_dir} exists and is not a tunelab run (no run config.yaml or checkpoints/), so it is "
                        "left alone (--overwrite too); choose another output.name or output.dir")
    if run_dir.exists() and not overwrite and any(run_dir.iterdir()):
        saved = run_dir / "config.yaml"
        if cfg.output.resume == "never":
            raise UserError(f"run directory {run_dir} already exists; pass --overwrite to start over or set "
                            "output.name to a new name")
        ckpts = complete_checkpoints(run.checkpoints)
        new, old = _config_dict(cfg), _saved_config(saved)
        if old is None and not ckpts:  # a run (is_run_dir) without checkpoints whose config.yaml is damaged or absent
            what = "is empty or cut off" if saved.is_file() else "was never written"
            raise UserError(f"{saved} {what} (a crash while the run started?) and the run has no checkpoint to "
                            "resume; pass --overwrite to start over (or restore the file)")
        diff, where = (_first_difference(new, old), None) if old is not None else ("damaged", None)
        if diff and ckpts:
            copy = _saved_config(ckpts[-1] / CONFIG_COPY)
            if copy is not None:
                diff, where = _first_difference(new, copy), f"{ckpts[-1].name}/{CONFIG_COPY}"
            elif old is None:  # checkpoints from before config copies: check what their trainer state records
                diff, where = _state_difference(cfg, ckpts[-1]), f"{ckpts[-1].name}/trainer_state.json"
            if not diff:
                run.notice = (f"{saved} was missing, cut off or changed; the current config agrees with {where}, "
                              "so config.yaml is rewritten from it and the run resumes")
        if diff:
            per = f", per {where}" if where else ""
            raise UserError(f"run {run_dir} exists with a different config ({diff}{per}); resume with the same "
                            "config, pass --overwrite to start over, or set output.name to a new name")
        summary = read_json(run_dir / "summary.json", {})
        if (run_dir / "final").is_dir() and isinstance(summary, dict) and summary.get("status") == "complete":
            run.complete = True
            return run
        run.resume_from = ckpts[-1] if ckpts else None
    return run


def is_run_dir(path: Path) -> bool:
    """Whether `path` holds a tunelab run: checkpoints/ with a checkpoint in it, or a config.yaml whose top-level keys
    are run config sections (read line by line, so one cut off by a crash still counts), or else nothing but what a
    run writes (a run killed before its config.yaml was written holds only .staging/). A folder of runs, or any
    other folder that merely has a config.yaml, is not one."""
    from tunelab.config import RunConfig

    if complete_checkpoints(path / "checkpoints"):
        return True
    try:
        text = (path / "config.yaml").read_text()
    except (OSError, UnicodeDecodeError):  # missing, unreadable, not text
        text = ""
    keys = re.findall(r"^([A-Za-z_]\w*):", text, re.M)
    if keys:
        return all(k in RunConfig.model_fields for k in keys)
    return all(p.name in RUN_ENTRIES for p in path.iterdir())


def start_run(run: Run, cfg) -> None:
    """Create (or, with overwrite, recreate) the run directory once every check has passed."""
    if run.overwrite and run.dir.exists():
        run.lock.release()  # the lock is the directory's: the new one is locked below
        shutil.rmtree(run.dir)
    fresh = not run.lock.held  # open_run found no run directory to lock: none existed
    run.dir.mkdir(parents=True, exist_ok=True)
    run.lock.acquire(run.dir)
    if fresh and (complete_checkpoints(run.checkpoints) or (run.dir / "config.yaml").exists()):
        # another job created the same run while this one was being checked: starting it over would wipe its log
        raise UserError(f"run {run.dir} was started by another tunelab process meanwhile; re-run the command to "
                        "resume it once that job ends, or set output.name to a new name")
    shutil.rmtree(run.staging, ignore_errors=True)  # leftovers of a save that was cut off
    run.config_text = cfg.to_yaml()
    write_text_atomic(run.dir / "config.yaml", run.config_text)  # rewritten at every start: never half of it
    _truncate_metrics(run.dir / "metrics.jsonl", _ckpt_step(run.resume_from))


def _ckpt_step(path: Path | None) -> int:
    return int(CKPT_RE.match(path.name).group(1)) if path else 0


def training_finished(ckpt: Path | None) -> bool:
    """Whether checkpoint `ckpt` was saved at the run's last step (its global_step reached max_steps).

    The Trainer checks max_steps only after a step, so resuming from such a checkpoint would train one step past
    the end (`9/8`); train writes final/ from it instead."""
    if ckpt is None:
        return False
    state = read_json(Path(ckpt) / "trainer_state.json", {})
    return bool(state.get("max_steps")) and state.get("global_step", 0) >= state["max_steps"]


def load_finished_checkpoint(trainer, run: Run) -> None:
    """Put the run's last-step checkpoint (run.resume_from, see training_finished) into `trainer` as training would
    have left it, without training: its TrainerState (steps, epoch, tokens, best checkpoint) and its weights, or the
    best checkpoint's where the run restores the best model at the end (load_best_model_at_end)."""
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(Path(run.resume_from) / "trainer_state.json"))
    if state.best_model_checkpoint:  # saved under its staging name (AtomicCheckpoints renames it afterwards)
        real = run.checkpoints / Path(state.best_model_checkpoint).name
        state.best_model_checkpoint = str(real) if real.is_dir() else None
    trainer.state = state
    best = state.best_model_checkpoint if trainer.args.load_best_model_at_end else None
    # the loader train(resume_from_checkpoint=...) itself uses: adapters or full weights, sharded or not, and what a
    # method's trainer adds (PPO's value head)
    trainer._load_from_checkpoint(best or str(run.resume_from))


def _truncate_metrics(path: Path, upto_step: int) -> None:
    """On resume, keep what the checkpoint covers, so the curve continues exactly from there: log lines up to its
    step, without a line cut off by a kill (it would glue onto the next append) and without the end-of-part record
    (`train_loss`, the Trainer's summary of that part only: the finished run logs its own at the end)."""
    if not path.is_file():
        return
    keep = [r for r in read_metrics(path.parent) if r.get("step", 0) <= upto_step and "train_loss" not in r]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))


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
    """Move each finished checkpoint from .staging/ into checkpoints/ with one rename; keep the last K (+ best).

    trainable_weights: also write the trainable weights as model.safetensors, for adapters whose saved form is not
    what trains. A prompt-learning adapter saves the virtual tokens its encoder computes (prefix projection, P-tuning's
    MLP), not the encoder: resumed from those, training would continue another model (P-tuning) or fail on the shapes
    (prefix projection). On resume the Trainer loads model.safetensors before any adapter file, non-strict, so the
    trainable weights come back as they were and the frozen base stays as loaded."""

    def __init__(self, run: Run, keep: int | None, trainable_weights: bool = False):
        self.run, self.keep, self.trainable_weights = run, keep, trainable_weights

    def on_save(self, args, state, control, model=None, **kw):
        staged = self.run.staging / f"checkpoint-{state.global_step}"
        if self.trainable_weights and model is not None and distributed.is_main() and staged.is_dir():
            from safetensors.torch import save_file

            save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                      str(staged / "model.safetensors"))
        # several processes: every rank has written its part (its RNG state, a shard) before rank 0 renames
        distributed.barrier()
        if distributed.is_main():
            self._commit(state)
        distributed.barrier()
        staged = f"checkpoint-{state.global_step}"
        if state.best_model_checkpoint and Path(state.best_model_checkpoint).name == staged:
            state.best_model_checkpoint = str(self.run.checkpoints / staged)  # on every rank: where it now is

    def _commit(self, state):
        staged = self.run.staging / f"checkpoint-{state.global_step}"
        if not staged.is_dir():
            return
        self.run.checkpoints.mkdir(exist_ok=True)
        if self.run.config_text is not None:
            # inside the checkpoint before the rename, so it is as complete as the weights: what they trained with,
            # and what open_run checks a resume against when config.yaml is missing or cut off
            write_text_atomic(staged / CONFIG_COPY, self.run.config_text)
        target = self.run.checkpoints / staged.name
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
        self._rotate(state)

    def _rotate(self, state):
        if not self.keep:
            return
        ckpts = complete_checkpoints(self.run.checkpoints)
        best = Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None
        for p in ckpts[: max(0, len(ckpts) - self.keep)]:
            if p.name != best:
                shutil.rmtree(p, ignore_errors=True)

    def on_train_end(self, args, state, control, **kw):
        # TRL writes a model card into output_dir (.staging/) at every checkpoint ("Model Card for .staging"); what is
        # left there after training is never part of the run (complete checkpoints were moved out as they were saved).
        # Several processes: the Trainer lists .staging/'s checkpoints on every process just before this callback, and
        # a listing of a folder deleted meanwhile raises (Path.glob); so all have listed it before rank 0 alone deletes.
        distributed.barrier()
        if distributed.is_main():
            shutil.rmtree(self.run.staging, ignore_errors=True)

    def on_train_begin(self, args, state, control, **kw):
        # A resumed state may name the best checkpoint by its staging path; point it at the real one.
        if state.best_model_checkpoint:
            real = self.run.checkpoints / Path(state.best_model_checkpoint).name
            if real.is_dir():
                state.best_model_checkpoint = str(real)


class EpochSeededLengthGroups(TrainerCallback):
    """Draw each epoch's length-grouped order from its own seed (training.seed + epoch).

    transformers' LengthGroupedSampler draws the order from the global RNG when an epoch starts. A run resumed in the
    middle of epoch 2 or later starts that epoch from the RNG as setup left it, not as epoch 1's steps left it, so the
    resumed epoch would see other batches (epoch 1 alone happened to match). The Trainer builds the sampler without a
    generator; the sampler reads its `generator` attribute on each pass, set here before the pass starts."""

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kw):
        import torch
        from transformers.trainer_pt_utils import LengthGroupedSampler

        sampler, seen = train_dataloader, 0
        while sampler is not None and not isinstance(sampler, LengthGroupedSampler) and seen < 4:
            # accelerate's DataLoaderShard -> (BatchSamplerShard ->) BatchSampler -> sampler
            sampler = getattr(sampler, "batch_sampler", None) or getattr(sampler, "sampler", None)
            seen += 1
        if isinstance(sampler, LengthGroupedSampler):
            epoch = int((state.epoch or 0) + 1e-6)  # a resumed state's epoch is fractional: the epoch it resumes
            sampler.generator = torch.Generator().manual_seed(args.seed + epoch)


class GracefulStop(TrainerCallback):
    """Ctrl-C (SIGINT) or SIGTERM: finish the current step, save a checkpoint, stop; the run resumes later.

    every: the method's resume interval (Method.resume_interval): the stop waits for the next step that is a
    multiple of it, where a checkpoint resumes exactly."""

    def __init__(self, every: int = 1):
        self.requested = False
        self.every = every
        self._old = {}

    def _handler(self, signum, frame):
        if self.requested:  # a second Ctrl-C means: stop now
            raise KeyboardInterrupt
        self.requested = True
        if distributed.is_main():  # every process gets the signal; the job says it once
            when = "this step" if self.every == 1 else f"the step that ends this group of {self.every}"
            print(f"\nstopping after {when}: saving a checkpoint (Ctrl-C again to abort without saving)", flush=True)

    def on_train_begin(self, args, state, control, **kw):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. inside a server); leave signals alone
                pass

    def on_step_end(self, args, state, control, **kw):
        if self.requested and state.global_step % self.every == 0:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kw):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class MetricsLog(TrainerCallback):
    """Append every log to metrics.jsonl with tokens seen (non-padding) and tokens/s; show progress.

    Besides every `logging_steps`, it logs at every checkpoint, evaluation, epoch end and the last step. A resume
    starts at a checkpoint, so the logged losses then cover every step of every part (the whole run's train_loss is
    their step-weighted mean, rundir.train_loss), and the run clock (`elapsed`, carried on across resumes) has a
    point at each epoch's end (per-epoch durations that sum the parts).

    Progress: in a terminal, a rich bar (steps, ETA, loss, tokens/s) with evaluation results printed above it. When
    output is not a terminal (`> log`, nohup, CI, a notebook), rich draws the bar only once, at the end, so a plain
    line is printed per log instead: step, loss, tokens/s, elapsed and ETA, and each evaluation's results.
    """

    def __init__(self, run: Run, show_progress: bool = True, console=None):
        self.path = run.dir / "metrics.jsonl"
        self.show = show_progress
        self.console = console  # a rich Console; default: stdout's (which decides terminal or not)
        self.t0 = self.last_t = time.time()
        self.last_tokens = 0
        self.first_step = 0
        self.elapsed_before = 0.0
        self.progress = None

    def on_train_begin(self, args, state, control, **kw):
        from rich.console import Console

        self.t0 = self.last_t = time.time()
        self.last_tokens = state.num_input_tokens_seen or 0
        self.first_step = state.global_step  # a resumed part's speed (for the ETA) counts its own steps only
        # resumed: the run clock continues from the last logged line (start_run cut the log at the checkpoint)
        self.elapsed_before = train_seconds(read_metrics(self.path.parent)) or 0.0
        self.show = self.show and state.is_world_process_zero
        if self.show:
            self.console = self.console or Console()
        if self.show and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                     TextColumn("{task.fields[info]}"), transient=False, console=self.console)
            self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, info="")
            self.progress.start()

    def on_step_end(self, args, state, control, **kw):
        # runs after the Trainer's flow callback and GracefulStop, which decide on saving, evaluating and stopping
        if control.should_save or control.should_evaluate or control.should_training_stop:
            control.should_log = True
        if self.progress:
            self.progress.update(self.task, completed=state.global_step)

    def on_epoch_end(self, args, state, control, **kw):
        control.should_log = True  # the Trainer logs right after, unless this step was logged already

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
        if "train_loss" in rec:  # the Trainer's covers this part only (since the last resume): the whole run's
            whole = train_loss(read_metrics(self.path.parent))
            rec["train_loss"] = rec["train_loss"] if whole is None else whole
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self.show:
            self._show(state, rec, now)

    def _show(self, state, rec: dict, now: float) -> None:
        from tunelab.evaluation.report import format_duration

        evals = {k: v for k, v in rec.items() if k.startswith("eval_") and isinstance(v, (int, float))
                 and not k.endswith(("_runtime", "_per_second"))}
        if self.progress:
            if "loss" in rec:
                self.progress.update(self.task, info=f"loss {rec['loss']:.4f}  {rec['tokens_per_s']:.0f} tok/s")
            if evals:  # above the bar, and kept in the scrollback
                self.progress.console.print(f"step {rec['step']}/{state.max_steps}  " + _metrics_text(evals),
                                            markup=False, highlight=False)
            return
        head = f"step {rec['step']}/{state.max_steps}"
        if "loss" in rec:
            done = state.global_step - self.first_step
            left = max(state.max_steps - state.global_step, 0)
            eta = format_duration((now - self.t0) / done * left) if done > 0 else "?"
            print(f"{head}  loss {rec['loss']:.4f}  {rec['tokens_per_s']:.0f} tok/s  "
                  f"elapsed {format_duration(rec['elapsed'])}  ETA {eta}", flush=True)
        if evals:
            print(f"{head}  " + _metrics_text(evals), flush=True)

    def on_train_end(self, args, state, control, **kw):
        if self.progress:
            self.progress.stop()


def _metrics_text(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
