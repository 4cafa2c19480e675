"""report_to tensorboard / mlflow / wandb, offline: files land in the run directory (a sweep's MLflow runs in one store
beside its trials), the user's own settings win, the environment is restored after the run, and a resumed run
continues its tracker runs."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tunelab import tracking
from tunelab import load_config
from tunelab.errors import UserError
from tunelab.train import run_training

from conftest import StopAt

HAS_WANDB = importlib.util.find_spec("wandb") is not None


def _config(tmp_path, tiny_model, data, report_to, **training):
    cfg = {"model": {"source": tiny_model}, "data": {"train": data, "max_length": 96},
           "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
           "training": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3, "save_steps": 100,
                        "precision": "fp32", "report_to": report_to, **training},
           "output": {"dir": str(tmp_path / "runs"), "name": "tracked"}}
    path = tmp_path / "tracked.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


def _mlflow_runs(store: Path, experiment: str):
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # reading MLflow 3's file store back needs the same opt-in
    try:
        client = MlflowClient(tracking_uri=store.as_uri())
        exp = client.get_experiment_by_name(experiment)
        assert exp is not None, f"no MLflow experiment {experiment!r} in {store}"
        return client, client.search_runs([exp.experiment_id])
    finally:
        del os.environ["MLFLOW_ALLOW_FILE_STORE"]


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None or importlib.util.find_spec("tensorboard") is None,
                    reason="tunelab[track] is not installed")
@pytest.mark.slow  # three trackers: ~1 minute
def test_run_reports_to_tensorboard_mlflow_and_wandb_offline(tmp_path, tiny_model, tiny_chat_data, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "TENSORBOARD_LOGGING_DIR"):
        monkeypatch.delenv(var, raising=False)
    report_to = ["tensorboard", "mlflow"] + (["wandb"] if HAS_WANDB else [])
    cfg = _config(tmp_path, tiny_model, tiny_chat_data, report_to)
    before = dict(os.environ)
    with tracking.environment(cfg) as env:
        assert env.get("WANDB_MODE", "offline") == "offline"
        summary = run_training(cfg, show_progress=False)
    assert summary["status"] == "complete"
    # nothing leaks into the next run of this process (WANDB_SERVICE is wandb's handle on its own helper process;
    # DS_ACCELERATOR=cpu is set for the whole process on purpose, by distributed.name_cpu_for_deepspeed)
    ignored = ("WANDB_SERVICE", "DS_ACCELERATOR")
    assert ({k: v for k, v in os.environ.items() if k not in ignored}
            == {k: v for k, v in before.items() if k not in ignored})
    run_dir = Path(summary["run"])

    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]

    client, runs = _mlflow_runs(run_dir / "mlruns", "tracked")
    assert len(runs) == 1 and runs[0].info.run_name == "tracked" and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [1, 2]

    if HAS_WANDB:
        offline = list((run_dir / "wandb").glob("offline-run-*"))
        assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))
    # local metrics and plots whatever report_to says
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "loss.png").is_file()


TRACKER_VARS = ("WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID",
                "MLFLOW_EXPERIMENT_NAME", "TENSORBOARD_LOGGING_DIR")


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None or importlib.util.find_spec("tensorboard") is None,
                    reason="tunelab[track] is not installed")
def test_resumed_run_continues_its_tracker_runs(tmp_path, tiny_model, tiny_chat_data, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for var in TRACKER_VARS:
        monkeypatch.delenv(var, raising=False)
    report_to = ["tensorboard", "mlflow"] + (["wandb"] if HAS_WANDB else [])
    cfg = _config(tmp_path, tiny_model, tiny_chat_data, report_to, max_steps=4, save_steps=2)
    # killed during step 4: steps 1-3 reached every tracker, checkpoint-2 is the last checkpoint
    first = run_training(cfg, callbacks=[StopAt(3)], show_progress=False)
    run_dir = Path(first["run"])
    shutil.rmtree(run_dir / "final")
    (run_dir / "summary.json").unlink()
    ids = json.loads((run_dir / "trackers.json").read_text())
    second = run_training(cfg, show_progress=False)
    assert second["resumed_from"].endswith("checkpoint-2") and second["status"] == "complete"
    logged = {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if "loss" in r}
    assert sorted(logged) == [1, 2, 3, 4]

    # TensorBoard: two event files, each step once, step 3 the resumed part's value
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    scalars = acc.Scalars("train/loss")
    assert [e.step for e in scalars] == [1, 2, 3, 4]
    assert [e.value for e in scalars] == pytest.approx([logged[s] for s in (1, 2, 3, 4)], rel=1e-5)

    # MLflow: one run, continued, with every step (step 3 logged by both parts: MLflow cannot drop a value)
    client, runs = _mlflow_runs(run_dir / "mlruns", "tracked")
    assert [r.info.run_id for r in runs] == [ids["mlflow"]["run_id"]] and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted({m.step for m in history}) == [1, 2, 3, 4]
    assert max(history, key=lambda m: (m.step, m.timestamp)).value == pytest.approx(logged[4], rel=1e-5)

    if HAS_WANDB:  # one run id for both parts; offline, each part has its own directory under it
        assert json.loads((run_dir / "trackers.json").read_text())["wandb"] == ids["wandb"]
        parts = list((run_dir / "wandb").glob("offline-run-*"))
        assert len(parts) == 2 and all(p.name.endswith("-" + ids["wandb"]["run_id"]) for p in parts)


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed")
def test_run_ids_come_from_the_run_directory_unless_set_or_overwritten(tmp_path, monkeypatch):
    for var in TRACKER_VARS:
        monkeypatch.delenv(var, raising=False)
    cfg = SimpleNamespace(training=SimpleNamespace(report_to=["wandb", "tensorboard"]),
                          output=SimpleNamespace(dir=str(tmp_path), name="r"))
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "trackers.json").write_text(json.dumps({"wandb": {"run_id": "abc12345"}}))
    with tracking.environment(cfg, run_dir, same_run=True):
        assert os.environ["WANDB_RUN_ID"] == "abc12345" and os.environ["WANDB_RESUME"] == "allow"
    with tracking.environment(cfg, run_dir, same_run=False):  # --overwrite: a new W&B run
        assert len(os.environ["WANDB_RUN_ID"]) == 8 and os.environ["WANDB_RUN_ID"] != "abc12345"
    with tracking.environment(cfg, run_dir):  # an enclosing sweep's: the ids are left to run_training's own
        assert "WANDB_RUN_ID" not in os.environ
    monkeypatch.setenv("WANDB_RUN_ID", "mine")
    with tracking.environment(cfg, run_dir, same_run=True):
        assert os.environ["WANDB_RUN_ID"] == "mine"
    assert os.environ["WANDB_RUN_ID"] == "mine" and "WANDB_RESUME" not in os.environ
    # tensorboard is given to the Trainer as a callback (its writer purges what a resume logs again)
    assert tracking.report_to_argument(["tensorboard", "wandb"]) == ["wandb"]
    assert tracking.report_to_argument(["tensorboard"]) == "none"


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_sweep_trials_share_one_mlflow_experiment(tmp_path, tiny_model, tiny_chat_data, monkeypatch):
    pytest.importorskip("optuna")
    from tunelab.sweep import load_sweep, run_sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    base = {"model": {"source": tiny_model}, "data": {"train": tiny_chat_data, "max_length": 96},
            "adapter": {"type": "lora", "r": 4, "alpha": 8},
            "training": {"max_steps": 2, "batch_size": 4, "save_steps": 100, "precision": "fp32",
                         "report_to": ["mlflow", "tensorboard"]}}
    path = tmp_path / "tracked-sweep.yaml"
    path.write_text(yaml.safe_dump({"config": base, "out_dir": str(tmp_path / "sweeps"), "search": {
        "objective": "train_loss", "space": {"training.learning_rate": [1e-3, 1e-2]}}}))
    out = run_sweep(load_sweep(path), show_progress=False)
    assert [r["status"] for r in out["results"]] == ["complete", "complete"]
    sdir = tmp_path / "sweeps" / "tracked-sweep"
    client, runs = _mlflow_runs(sdir / "mlruns", "tracked-sweep")
    assert sorted(r.info.run_name for r in runs) == ["trial-000", "trial-001"]
    assert all(r.info.status == "FINISHED" for r in runs)
    for r in out["results"]:
        assert list((sdir / r["trial"] / "tensorboard").glob("events.out.tfevents.*"))


def test_users_settings_win_and_unknown_trackers_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    monkeypatch.setenv("WANDB_MODE", "online")
    cfg = SimpleNamespace(training=SimpleNamespace(report_to=["mlflow", "wandb"]),
                          output=SimpleNamespace(dir=str(tmp_path), name="r"))
    missing = [b for b in ("mlflow", "wandb") if importlib.util.find_spec(b) is None]
    if missing:
        with pytest.raises(UserError, match="not installed"):
            with tracking.environment(cfg):
                pass
        return
    with tracking.environment(cfg) as env:
        assert "MLFLOW_TRACKING_URI" not in env and os.environ["MLFLOW_TRACKING_URI"] == "http://tracking.example:5000"
        assert os.environ["WANDB_MODE"] == "online" and os.environ["WANDB_DIR"] == str((tmp_path / "r").resolve())
        assert json.loads(os.environ["MLFLOW_TAGS"])["mlflow.runName"] == "r"
    assert "WANDB_DIR" not in os.environ and os.environ["WANDB_MODE"] == "online"
    with pytest.raises(UserError, match="did you mean 'tensorboard'"):
        tracking.check(["tensorbord"])
