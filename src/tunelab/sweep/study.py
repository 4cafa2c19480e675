"""Optuna glue: the study a sweep lives in, and how trials are drawn, pruned, named and recovered.

Optuna does the searching for all three strategies (GridSampler, RandomSampler, TPESampler) and keeps the study in a
database, so a re-run (or another machine on the same storage) continues it. Optuna is imported lazily: it is an
extra (`tunelab[sweep]`), and `import_optuna` turns its absence into one line. Functions take the `optuna` module
as an argument rather than importing it themselves, so that check happens once.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from tunelab.errors import UserError
from tunelab.sweep.spec import Range, Sweep, sample_points


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("tunelab sweep needs Optuna: pip install 'tunelab[sweep]'") from None
    # each trial gets one line from us instead (a failed trial's traceback goes to its log file)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna


# ---------------------------------------------------------------------------------------------------------- values


def encode_choice(value):
    """Optuna's categorical choices must be None/bool/int/float/str: other values (lists) travel as JSON text."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def decode_choice(dom, stored):
    """A trial's stored parameter back to the config value (JSON text of a list choice -> the list)."""
    if isinstance(dom, list):
        return dom[[encode_choice(v) for v in dom].index(stored)]
    return stored


def suggest_value(trial, key: str, dom) -> Any:
    """The trial's value for one searched key: drawn from a range, or one of the listed choices (decoded)."""
    if isinstance(dom, Range):
        if dom.is_int:
            return trial.suggest_int(key, int(dom.low), int(dom.high), step=int(dom.step or 1), log=dom.log)
        return trial.suggest_float(key, float(dom.low), float(dom.high), step=dom.step, log=dom.log)
    labels = [encode_choice(v) for v in dom]
    return dom[labels.index(trial.suggest_categorical(key, labels))]


# ---------------------------------------------------------------------------------------------------------- study


def make_sampler(sweep: Sweep, optuna, n_existing: int):
    s = sweep.search
    # A re-run continues the study in a new process; seeding with the number of trials already there keeps it
    # reproducible without drawing the first session's points again.
    seed = s.seed + n_existing
    if s.strategy == "grid":
        return optuna.samplers.GridSampler({k: [encode_choice(v) for v in dom] for k, dom in s.space.items()},
                                           seed=s.seed)
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


def safe_url(url: str) -> str:
    """A storage URL without its password, for printing."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


JOURNAL = "journal:"


def storage_file(url: str) -> Path | None:
    """The file a `journal:PATH` or `sqlite:///PATH` storage keeps the study in (absolute); None for a server."""
    for scheme in (JOURNAL, "sqlite:///"):
        if url.startswith(scheme):
            return Path(url[len(scheme):]).expanduser().resolve()
    return None


def database_url(url: str) -> str:
    """`postgresql://` names SQLAlchemy's psycopg2 driver; the sweep extra installs psycopg (3), so such a URL is
    pointed at it when psycopg2 is absent (an explicit `postgresql+driver://` is kept)."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg2") is None \
            and importlib.util.find_spec("psycopg") is not None:
        return "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def open_storage(sweep: Sweep, optuna):
    """The study's storage, with a heartbeat: trials of a worker that died (kill -9, a lost machine) are marked
    failed once silent for 4 heartbeats, and RetryHeartbeatStaleTrialCallback queues them again with the same
    parameters, hence the same run directory (resumed from its checkpoint). Optuna flags the heartbeat as
    experimental; it is the documented way to recover such trials."""
    file = storage_file(sweep.storage)
    if file is not None and file.parent == sweep.dir.resolve():  # the default study.db, or a file kept there
        sweep.dir.mkdir(parents=True, exist_ok=True)
    beat = sweep.search.heartbeat
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if sweep.storage.startswith(JOURNAL):
                return _journal_storage(optuna)(sweep.storage[len(JOURNAL):], beat, 4 * beat, _retry(optuna, 3))
            return _rdb_storage(optuna, database_url(sweep.storage), beat)
    except Exception as e:  # a bad URL, a missing database driver, an unreachable server
        hint = "; pip install 'tunelab[sweep]' for PostgreSQL's driver" if isinstance(e, ImportError) else ""
        raise UserError(f"search.storage {safe_url(sweep.storage)!r}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}{hint}") from None


def _rdb_storage(optuna, url: str, beat: int):
    """RDBStorage, retried when another worker is creating the same fresh database's tables at this moment: both
    run CREATE TABLE and PostgreSQL fails the later one (a unique violation in its catalog); once the first is done,
    the tables exist and opening succeeds."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=beat, grace_period=4 * beat,
                                              heartbeat_stale_trial_callback=_retry(optuna, max_retry=3))
        except (IntegrityError, ProgrammingError):
            if attempt == 4:
                raise
            time.sleep(1 + attempt)


def _journal_storage(optuna):
    """Optuna's journal-file storage (one append-only file, e.g. on a shared disk; no database server) with the
    heartbeat RDBStorage has. Optuna's JournalStorage has none, so a killed worker's trial would stay RUNNING for
    good: this adds it through Optuna's own extension point (BaseHeartbeat, beside BaseStorage, as RDBStorage does),
    so optimize() records the beats and fail_stale_trials() reads them. A beat is the worker's clock time, kept as a
    system attribute of the trial: machines sharing the file need synchronized clocks (NTP), as usual."""
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.storages.journal import JournalFileBackend

    class JournalStorageWithHeartbeat(optuna.storages.JournalStorage, BaseHeartbeat):
        def __init__(self, path, interval, grace, callback):
            super().__init__(JournalFileBackend(path))
            self._beat, self._grace, self._callback = interval, grace, callback

        def record_heartbeat(self, trial_id: int) -> None:
            self.set_trial_system_attr(trial_id, "tunelab:heartbeat", time.time())

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            now = time.time()
            running = self.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            return [t._trial_id for t in running
                    if now - t.system_attrs.get("tunelab:heartbeat", t.datetime_start.timestamp()) > self._grace]

        def get_heartbeat_interval(self) -> int:
            return self._beat

        def get_heartbeat_stale_trial_callback(self):
            return self._callback

    return JournalStorageWithHeartbeat


def open_study(sweep: Sweep, storage, optuna):
    """Create the study or continue it; refuse one that was made for another direction or objective."""
    direction = "minimize" if sweep.direction == "min" else "maximize"
    study = optuna.create_study(study_name=sweep.study_name, storage=storage, direction=direction,
                                pruner=_pruner(sweep, optuna), load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise UserError(f"study '{sweep.study_name}' in {safe_url(sweep.storage)} was created to "
                        f"{study.direction.name.lower()}; this sweep would {direction}: set search.study to a new "
                        "name or pass --overwrite")
    known = study.user_attrs.get("objective")
    if known and known != sweep.objective:
        raise UserError(f"study '{sweep.study_name}' optimizes {known}, this sweep {sweep.objective}: set "
                        "search.study to a new name or pass --overwrite")
    study.set_user_attr("objective", sweep.objective)
    return study


# ---------------------------------------------------------------------------------------------------------- trials


def finished_trials(study, optuna) -> list:
    """Trials that count against the budget: complete, pruned, or failed by their own error (not interrupted)."""
    S = optuna.trial.TrialState
    return [t for t in study.get_trials(deepcopy=False)
            if t.state in (S.COMPLETE, S.PRUNED) or (t.state == S.FAIL and "error" in t.user_attrs)]


def _retry(optuna, max_retry: int | None):
    """Optuna's own re-queueing of a trial (same parameters, `run` user attribute copied, retry history kept)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)


def _in_space(sweep: Sweep, params: dict) -> bool:
    space = sweep.search.space
    if set(params) != set(space):
        return False
    for k, v in params.items():
        dom = space[k]
        if isinstance(dom, Range) and not dom.low <= v <= dom.high:
            return False
        if isinstance(dom, list) and v not in [encode_choice(x) for x in dom]:
            return False
    return True


def requeue_unfinished(study, sweep: Sweep, optuna) -> list[str]:
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


def grid_run_names(sweep: Sweep) -> list[tuple[str, dict]]:
    """Every grid point with its run directory: trial-<its index in the grid's fixed order>. GridSampler visits the
    points in a shuffled order and a retried trial gets a new number, so naming by trial number would not match
    what --dry-run lists; naming by grid point does, whatever the order and however often a point is retried."""
    return [(f"trial-{i:03d}", p) for i, p in enumerate(sample_points(sweep.search.space, "grid"))]


def run_name_for(study, trial, optuna, sweep: Sweep, params: dict) -> str:
    """The run directory of a trial: a re-queued trial keeps its run; a grid point has its own (grid_run_names);
    parameters identical to a complete trial's reuse that run (run_training skips it: the value is read back,
    nothing trains); else trial-<number>."""
    if trial.user_attrs.get("run"):
        return trial.user_attrs["run"]
    if sweep.search.strategy == "grid":
        return next(name for name, p in grid_run_names(sweep) if p == params)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.params == trial.params and t.user_attrs.get("run"):
            return t.user_attrs["run"]
    return f"trial-{trial.number:03d}"


# ---------------------------------------------------------------------------------------------------------- workers


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def claim(trial) -> None:
    """Record which process runs this trial (machine, boot, pid, trial number), so a re-run on the same machine can
    tell that the process is gone. The trial number is part of it because a retry copies its user attributes: a
    copied claim names another trial and is ignored."""
    trial.set_user_attr("worker", [socket.gethostname(), _boot_id(), os.getpid(), trial.number])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def fail_dead_local_trials(study, storage, optuna) -> None:
    """Fail the RUNNING trials claimed by a process of this machine that no longer exists (a SIGKILL, a crash), so
    requeue_unfinished queues them again now. The heartbeat would find them only after its grace period, and in
    the meantime the sweep would count them as running elsewhere. Trials of other machines are left to it."""
    me = [socket.gethostname(), _boot_id()]
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if not worker or worker[:2] != me or worker[3] != t.number:
            continue  # another machine's (its heartbeat tells), or not claimed yet
        if worker[2] != os.getpid() and _alive(worker[2]):  # our own pid: reused, this process runs no trial yet
            continue
        try:
            storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another process on this machine got there first


def running_trials(study, optuna) -> list:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
