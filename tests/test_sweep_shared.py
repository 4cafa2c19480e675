"""Several `tunelab sweep` workers on one Optuna study: against a real PostgreSQL server (started here in a temp
directory) and against Optuna's journal file. Two workers share the trial budget without running a trial twice, and
a worker killed with SIGKILL mid-trial leaves its trial to the other, which resumes it from its checkpoint."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")

CLI = [sys.executable, "-m", "tunelab", "sweep"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(dirs[-1]).parent if dirs else None


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server on a free port (as user postgres when the tests run as root: the server refuses
    to run as root); its URL. Stopped and removed afterwards."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'tunelab[sweep]')")
    bindir = _pg_bindir()
    if bindir is None or not (bindir / "initdb").exists():
        pytest.skip("PostgreSQL's initdb/pg_ctl are not installed (Debian: apt-get install postgresql)")
    as_user = []
    data = Path(tempfile.mkdtemp(prefix="tunelab-pg-"))
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: PostgreSQL cannot be started as another user")
        try:
            shutil.chown(data, "postgres")
        except (LookupError, PermissionError) as e:
            pytest.skip(f"PostgreSQL refuses to run as root and there is no usable postgres user: {e}")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    pgdata = data / "db"
    try:
        init = subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(pgdata), "-U", "tunelab", "--auth=trust",
                               "-E", "UTF8"], capture_output=True, text=True)
        if init.returncode != 0:
            pytest.skip(f"initdb failed: {init.stderr.strip().splitlines()[-1:]}")
        start = subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(pgdata), "-l", str(data / "log"), "-w",
                                "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"],
                               capture_output=True, text=True)
        if start.returncode != 0:
            pytest.skip(f"pg_ctl start failed: {(data / 'log').read_text()[-500:] if (data / 'log').exists() else ''}")
        yield f"postgresql://tunelab@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(pgdata), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


# the journal file runs in the quick suite; the database server's start-up makes its runs the slower ones
@pytest.fixture(params=[pytest.param("postgresql", marks=pytest.mark.e2e), "journal"])
def storage(request, tmp_path):
    if request.param == "journal":
        return f"journal:{tmp_path / 'study.journal'}"
    return request.getfixturevalue("postgres_url")


def write_sweep(tmp_path, tiny_model, data, storage, study, trials, max_steps=2, heartbeat=30) -> Path:
    sweep = {"name": "shared", "out_dir": str(tmp_path / "sweeps"),
             "config": {"model": {"source": tiny_model}, "data": {"train": data, "max_length": 64},
                        "adapter": {"type": "lora", "r": 4, "alpha": 8},
                        "training": {"max_steps": max_steps, "batch_size": 4, "precision": "fp32", "save_steps": 1,
                                     "logging_steps": 1}},
             "search": {"strategy": "random", "trials": trials, "objective": "train_loss", "study": study,
                        "heartbeat": heartbeat,
                        "space": {"training.learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}}}}
    if storage:
        sweep["search"]["storage"] = storage
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def worker(path, *args) -> subprocess.Popen:
    return subprocess.Popen([*CLI, str(path), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def killed_once(path, ready) -> None:
    """A worker on the sweep `path`, SIGKILLed as soon as `ready()` holds (e.g. a trial's checkpoint exists)."""
    a = worker(path)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and a.poll() is None and not ready():
            time.sleep(0.05)
        assert a.poll() is None, "the worker finished before it could be killed: " + a.communicate()[0][-2000:]
        os.kill(a.pid, signal.SIGKILL)
        a.wait(timeout=60)
    finally:
        if a.poll() is None:
            a.kill()


def load(storage: str, study: str):
    from tunelab.sweep.study import JOURNAL, _journal_storage, database_url

    if storage.startswith(JOURNAL):
        store = _journal_storage(optuna)(storage[len(JOURNAL):], 30, 120, None)
    else:
        store = database_url(storage)
    return optuna.load_study(study_name=study, storage=store)


def test_two_workers_share_one_study(tmp_path, tiny_model, tiny_chat_data, storage):
    # the storage given on the command line, as on several machines sharing one sweep file
    path = write_sweep(tmp_path, tiny_model, tiny_chat_data, None, f"share-{tmp_path.name}", trials=2)
    a, b = worker(path, "--storage", storage), worker(path, "--storage", storage)
    out_a, out_b = a.communicate(timeout=600)[0], b.communicate(timeout=600)[0]
    assert a.returncode == 0 and b.returncode == 0, out_a[-3000:] + out_b[-3000:]
    study = load(storage, f"share-{tmp_path.name}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # the budget is the study's: the workers stop once 2 are done (one more may be running in the other by then)
    assert 2 <= len(done) <= 3 and len(study.trials) == len(done)
    runs = [t.user_attrs["run"] for t in done]
    assert len(set(runs)) == len(runs)  # no trial trained twice
    assert "[trial-" in out_a and "[trial-" in out_b  # both workers took trials
    for run in runs:
        summary = json.loads((tmp_path / "sweeps" / "shared" / run / "summary.json").read_text())
        assert summary["status"] == "complete" and summary["global_step"] == 2


@pytest.mark.e2e  # two workers one after the other, with a grace period between them
@pytest.mark.slow
def test_a_killed_workers_trial_is_resumed_by_another(tmp_path, tiny_model, tiny_chat_data, storage):
    study_name = f"kill-{tmp_path.name}"
    path = write_sweep(tmp_path, tiny_model, tiny_chat_data, storage, study_name, trials=2, max_steps=8, heartbeat=1)
    first = tmp_path / "sweeps" / "shared" / "trial-000"
    killed_once(path, lambda: (first / "checkpoints" / "checkpoint-2").is_dir())
    time.sleep(5)  # past the grace period (4 heartbeats of 1 s): the trial is stale
    b = worker(path)
    out = b.communicate(timeout=600)[0]
    assert b.returncode == 0, out[-3000:]

    trials = load(storage, study_name).trials
    S = optuna.trial.TrialState
    assert trials[0].state == S.FAIL and "error" not in trials[0].user_attrs  # the killed one: not a failure of its own
    retried = [t for t in trials if t.state == S.COMPLETE and t.user_attrs["run"] == "trial-000"]
    assert len(retried) == 1 and retried[0].system_attrs["failed_trial"] == trials[0].number
    assert retried[0].params == trials[0].params
    done = [t for t in trials if t.state == S.COMPLETE]
    assert len(done) == 2 and len({t.user_attrs["run"] for t in done}) == 2  # the budget, nothing counted twice
    assert "resuming from" in (tmp_path / "sweeps" / "shared" / "logs" / "trial-000.log").read_text()
    rows = [json.loads(x) for x in (first / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # resumed from its checkpoint, each step logged once


def test_workers_opening_a_fresh_database_at_once_all_get_the_study(postgres_url):
    """Workers started together on an empty database all create its tables; PostgreSQL fails all but one CREATE
    TABLE, and the others open the tables that one made."""
    import threading

    import psycopg

    from tunelab.sweep.study import _rdb_storage, database_url

    name = f"fresh_{os.getpid()}_{int(time.time())}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = database_url(postgres_url.rsplit("/", 1)[0] + "/" + name)
    opened, errors = [], []

    def open_one():
        try:
            opened.append(_rdb_storage(optuna, url, 30))
        except Exception as e:  # noqa: BLE001  (reported by the assertion below)
            errors.append(repr(e))

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(opened) == 4
    study = optuna.create_study(study_name="s", storage=opened[0])
    assert optuna.load_study(study_name="s", storage=opened[3])._study_id == study._study_id


def test_a_rerun_after_its_own_kill_resumes_the_killed_trial_at_once(tmp_path, tiny_model, tiny_chat_data):
    """One worker, SIGKILLed mid-trial, then the same command again right away (well inside the heartbeat's grace):
    the killed trial resumes from its checkpoint in its own run directory; nothing trains twice, no row is left
    running or queued."""
    from tunelab.sweep import load_sweep, run_sweep

    spec = {"name": "grid", "out_dir": str(tmp_path / "sweeps"),
            "config": {"model": {"source": tiny_model}, "data": {"train": tiny_chat_data, "max_length": 64},
                       "adapter": {"type": "lora", "r": 4, "alpha": 8},
                       "training": {"max_steps": 8, "batch_size": 4, "precision": "fp32", "save_steps": 1,
                                    "logging_steps": 1}},
            "search": {"strategy": "grid", "objective": "train_loss",
                       "space": {"training.learning_rate": [1e-3, 1e-2]}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    sdir = tmp_path / "sweeps" / "grid"
    killed_once(path, lambda: glob.glob(f"{sdir}/trial-*/checkpoints/checkpoint-2"))
    killed = Path(glob.glob(f"{sdir}/trial-*/checkpoints/checkpoint-2")[0]).parents[1]

    lines = []
    out = run_sweep(load_sweep(path), show_progress=False, echo=lines.append)
    assert f"continuing {killed.name}" in lines[0], lines[0]
    assert [r["status"] for r in out["results"]] == ["complete"] * 2, out["results"]
    assert sorted(p.name for p in sdir.glob("trial-*")) == sorted(r["trial"] for r in out["results"])
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from"] and summary["global_step"] == 8
    steps = [r["step"] for r in map(json.loads, (killed / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, 9))  # resumed from its checkpoint, each step logged once
