"""report_to tensorboard / mlflow / wandb, offline: files land in the run directory (a sweep's MLflow runs in one store
beside its trials), the user's own settings win, and the environment is restored after the run."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tunelab import tracking
from tunelab import load_config
from tunelab.errors import UserError
from tunelab.train import run_training

HAS_WANDB = importlib.util.find_spec("wandb") is not None


def _config(tmp_path, tiny_model, data, report_to):
    cfg = {"model": {"source": tiny_model}, "data": {"train": data, "max_length": 96},
           "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
           "training": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3, "save_steps": 100,
                        "precision": "fp32", "report_to": report_to},
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
    # nothing leaks into the next run of this process (WANDB_SERVICE is wandb's handle on its own helper process)
    assert {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} == before
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
