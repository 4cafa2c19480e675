"""Reading and writing a run directory's files: the one place that does it (re-exported by `tunelab.runs`).

Train writes a run; eval, export, serve/chat, sweeps and `models.load_for_inference` read it. They all go through
these functions, so a file written here is never half-written (temp file + os.replace) and a file read here is read
the same way everywhere (a metrics line cut off by a killed run is dropped by every reader alike).

Light on purpose (no transformers import): `tunelab --help`, report writing and sweep tables import it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import UserError

RUNS_ROOT = Path("runs")  # where `tunelab train` puts runs by default: `NAME` alone means runs/NAME


# --------------------------------------------------------------------------------------------------- atomic writes

@contextlib.contextmanager
def atomic_path(target, is_dir: bool = False, suffix: str = ".tmp", reclaim: bool = False):
    """Yield a temporary sibling of `target` (an empty directory, or a file path) to write into; on success it is
    renamed into place (replacing what was there), on failure removed. A reader or a crash therefore sees the old
    `target` or the new one, never half of one. Creates the parent directory.

    reclaim=True (large outputs: exports): the temporary is locked while it is written, and the temporaries of
    earlier writes of `target` that a killed process left behind (unlocked) are removed first, so a SIGKILLed export
    does not keep gigabytes under a hidden name. Every writer of such a target must pass it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if reclaim:
        _remove_abandoned(target, is_dir, suffix)
    tmp = _create_temp(target, is_dir, suffix)
    held = _lock_temp(tmp) if reclaim else None
    try:
        yield tmp
        # os.replace puts a file over a file (atomically) but nothing over a directory, nor a directory over a link
        if target.is_symlink() and tmp.is_dir():
            target.unlink()
        elif target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if held is not None:
            os.close(held)


def _lock_temp(tmp: Path) -> int:
    """An open descriptor holding an exclusive flock on `tmp` (a file or a directory) until closed: the kernel drops
    it when the process dies however it dies, which is what marks a temporary as abandoned (_remove_abandoned)."""
    fd = os.open(tmp, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


# a temporary made in the same second by another writer may not hold its lock yet: younger ones are left alone
ABANDONED_AFTER_S = 30


def _remove_abandoned(target: Path, is_dir: bool, suffix: str) -> None:
    """Remove the temporaries of `target` (_create_temp's names) that no live process holds locked."""
    import re
    import sys
    import time

    name = re.compile(rf"\.{re.escape(target.name)}\.[0-9a-f]{{8}}{'' if is_dir else re.escape(suffix)}")
    for p in target.parent.iterdir():
        if not name.fullmatch(p.name) or p.is_symlink() or p.is_dir() != is_dir:
            continue
        try:
            if time.time() - p.stat().st_mtime < ABANDONED_AFTER_S:
                continue
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue  # gone meanwhile, or not ours to open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # being written by a live process
        finally:
            os.close(fd)
        shutil.rmtree(p, ignore_errors=True) if is_dir else p.unlink(missing_ok=True)
        print(f"removed {p}: a partial write of {target} left by a process that was stopped", file=sys.stderr)


def _create_temp(target: Path, is_dir: bool, suffix: str) -> Path:
    """A new, uniquely named sibling of `target` with the permissions a plain open()/mkdir would give it.

    tempfile.mkstemp/mkdtemp create 0600 files and 0700 directories: renamed into place, a run's files and its exports
    (a GGUF or an Ollama directory that a service account reads) would be private to the user. Creating with
    0666/0777 lets the kernel apply the umask, as for any other file the user writes; O_EXCL keeps the name ours.
    """
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}{'' if is_dir else suffix}"
        try:
            if is_dir:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name next to {target}")


class RunLock:
    """An exclusive lock on a run directory, held by the one process that trains it (rank 0) while it trains.

    Two jobs on one run directory (the same command run twice, a second `--nproc` job) would both resume from the
    same checkpoint and rotate, rename and append over each other's checkpoints and metrics. flock on the directory
    itself writes nothing into it, and the kernel drops it with the process (SIGKILL too), so a killed run never
    leaves a stale lock behind. Neither the Trainer nor accelerate locks its output_dir; written here."""

    def __init__(self):
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, directory: Path) -> None:
        if self._fd is not None or not directory.is_dir():
            return
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"run {directory} is in use: another tunelab process is training it; wait for that job "
                            "to end (or stop it), or set output.name to a new name") from None
        except OSError:  # a filesystem without flock (some network mounts): train unlocked rather than not at all
            os.close(fd)
            return
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    __del__ = release  # a Run dropped without release (Python API use) does not keep its directory locked

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_writable(directory: Path, flag: str, target) -> None:
    """Refuse an output (`flag` `target`) whose nearest existing folder at or above `directory` cannot take it, now
    rather than after minutes of work: it must be a directory in which something can be created (tried, then removed:
    permission bits say nothing for root or on read-only and virtual filesystems)."""
    directory = Path(directory)
    existing = next(p for p in [directory, *directory.parents] if p.exists() or p.is_symlink())
    if not existing.is_dir():
        raise UserError(f"{flag} {target}: {existing} is a file, not a directory; pass {flag} a path in a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".tunelab-write-check-", dir=existing))
    except OSError as e:
        raise UserError(f"{flag} {target}: cannot write in {existing} ({e.strerror}); pass {flag} a path in a "
                        "directory you can write to") from None


def write_text_atomic(path, text: str) -> Path:
    """Write `text` to `path` through a temp file in the same directory and one rename (atomic_path)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path, obj, indent: int | None = 2) -> Path:
    """`obj` as JSON (values JSON cannot hold, e.g. Paths, written as strings), atomically as `write_text_atomic`."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, default=str))


# --------------------------------------------------------------------------------------------------------- readers

def read_json(path, default=None):
    """The JSON in `path`, or `default` when the file is missing or damaged (e.g. written by hand and cut off)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def parse_metrics(text: str) -> list[dict]:
    """metrics.jsonl records from its text. A line that does not parse is dropped: a killed run cuts off its last
    line mid-write, and what was logged before it is still worth plotting and resuming from."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            rows.append(rec)
    return rows


def read_metrics(run_dir) -> list[dict]:
    """RUN/metrics.jsonl as a list of records ([] when there is none); a cut-off line is dropped (parse_metrics)."""
    p = Path(run_dir) / "metrics.jsonl"
    return parse_metrics(p.read_text(errors="replace")) if p.is_file() else []


def train_loss(rows: list[dict]) -> float | None:
    """The whole run's training loss from metrics.jsonl records: the mean of every step's loss.

    Each logged `loss` is the Trainer's mean over the steps since the previous logged loss, so it is weighted by that
    step count. runs.MetricsLog also logs at every checkpoint, evaluation, epoch end and the last step, so the logged
    losses cover every step of every part of a resumed run, and for an uninterrupted run this equals the Trainer's own
    `train_loss`. (The Trainer's value after a resume covers only the part after the resume.)
    """
    total = steps = 0.0
    prev = 0
    for r in sorted((r for r in rows if "loss" in r and "step" in r), key=lambda r: r["step"]):
        n = r["step"] - prev
        if n <= 0:  # two records of one step (should not happen): count it once
            continue
        total, steps, prev = total + r["loss"] * n, steps + n, r["step"]
    return total / steps if steps else None


def train_seconds(rows: list[dict]) -> float | None:
    """Wall-clock seconds of training over every part of a resumed run: the run clock (`elapsed`) that metrics.jsonl
    carries on across resumes, at its last record."""
    times = [r["elapsed"] for r in rows if isinstance(r.get("elapsed"), (int, float))]
    return max(times) if times else None


# ----------------------------------------------------------------------------------------------- a finished run

@dataclass
class FinishedRun:
    """A run directory that `tunelab train` finished: what every reader of a run needs, read once, checked once."""

    path: Path
    config: dict  # the resolved config the run trained with (config.yaml)
    final: Path  # final/: a PEFT adapter or a full transformers model, with the tokenizer
    is_adapter: bool
    base: str | None  # model.source: the base model (hub id, local dir or embedded:NAME) the run started from
    summary: dict | None = None  # summary.json (None when missing or damaged)
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def adapter_type(self) -> str:
        return (self.config.get("adapter") or {}).get("type") or ("lora" if self.is_adapter else "none")

    @property
    def quant_bits(self) -> int | None:
        return (self.config.get("quantization") or {}).get("bits")

    @property
    def model_source(self) -> str:
        """What to load as the model: the base for an adapter run (then apply `adapter`), else final/ itself."""
        return self.base if self.is_adapter else str(self.final)

    @property
    def adapter(self) -> str | None:
        """final/ when it is an adapter over `base`, else None."""
        return str(self.final) if self.is_adapter else None


def find_run(spec) -> Path | None:
    """The run directory `spec` names (a path, or NAME under runs/), or None. A run directory holds config.yaml or,
    for a run whose config.yaml is missing, final/."""
    for p in (Path(spec), RUNS_ROOT / str(spec)):
        if p.is_dir() and ((p / "config.yaml").is_file() or (p / "final").is_dir()):
            return p
    return None


def read_run_config(run_dir) -> dict | None:
    """RUN/config.yaml as a dict; None when it is missing, empty, unparsable or not a mapping (damaged)."""
    import yaml

    p = Path(run_dir) / "config.yaml"
    try:
        cfg = yaml.safe_load(p.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return cfg if isinstance(cfg, dict) and cfg else None


def open_finished_run(spec, need_final: bool = True) -> FinishedRun:
    """Open the finished run `spec` (a run directory, or NAME under runs/): its config, base model, final/ and
    summary. Raises UserError (one line, says how to fix) for anything missing or unreadable.

    need_final=False opens a run that has not written final/ yet (e.g. to name its base model); `final` then points
    where final/ will be, `is_adapter` follows the config's adapter type and `base` may be None.
    """
    p = find_run(spec)
    if p is None and Path(spec).name == "final" and find_run(Path(spec).parent):
        raise UserError(f"{spec} is the final model of the run {Path(spec).parent}: pass the run itself")
    if p is None:
        also = "" if Path(spec).is_absolute() else f", nor as {RUNS_ROOT / str(spec)}"
        raise UserError(f"run {spec} does not exist (not found as a run directory{also}), so there is no final "
                        "model to use; pass a run directory written by `tunelab train`, e.g. runs/NAME")
    cfg_file, final = p / "config.yaml", p / "final"
    cfg = read_run_config(p)
    if cfg is None and cfg_file.is_file():
        raise UserError(f"{cfg_file} is empty or unreadable (cut off by a crash?): it names the run's base model; "
                        "restore it from the config that trained the run")
    cfg = cfg or {}
    if need_final and not final.is_dir():
        raise UserError(f"run {p} has no final model yet (train it to the end: re-running the same `tunelab train` "
                        "resumes it; chat, serve and eval also take one of its checkpoints: "
                        f"--adapter {p}/checkpoints/checkpoint-N)")
    if final.is_dir():
        is_adapter = (final / "adapter_config.json").is_file()
        if not is_adapter and not (final / "config.json").is_file():
            raise UserError(f"{final} holds neither a PEFT adapter (adapter_config.json) nor a model (config.json)")
    else:
        is_adapter = ((cfg.get("adapter") or {}).get("type") or "none") != "none"
    base = (cfg.get("model") or {}).get("source")
    if is_adapter and final.is_dir() and not base:
        what = "no config.yaml" if not cfg_file.is_file() else "no model.source in config.yaml"
        raise UserError(f"run {p} has {what}: it names the base model the run was trained from; restore it "
                        "(model.source: BASE)")
    return FinishedRun(path=p, config=cfg, final=final, is_adapter=is_adapter, base=base,
                       summary=read_json(p / "summary.json"))
