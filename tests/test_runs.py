"""The run directory: one reader/writer (tunelab.rundir via tunelab.runs), resumes that start at the last step, a
cut-off metrics line or config.yaml, and summaries that cover every part of a resumed run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import StopAt
from test_train import make_config
from transformers import TrainerCallback

from tunelab import runs
from tunelab import load_config
from tunelab.errors import UserError
from tunelab.train import run_training


def _config(tmp_path, tiny_model, chat, name, subset=8, data=(), **sections) -> Path:
    """test_train's tiny config, by default on 8 rows: 2 steps per epoch at batch size 4 (32 rows: 8 steps)."""
    import yaml

    path = make_config(tmp_path, tiny_model, chat, name, **sections)
    cfg = yaml.safe_load(path.read_text())
    cfg["data"].update(subset=subset, **dict(data))
    path.write_text(yaml.safe_dump(cfg))
    return path


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    final = run_dir / "final"
    return load_file(final / "adapter_model.safetensors" if (final / "adapter_config.json").is_file()
                     else final / "model.safetensors")


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]  # every line parses


def _unfinish(run_dir: Path, status: str | None = None) -> None:
    """What a kill during the final save (status None) or a Ctrl-C at the last step leaves: no final/."""
    import shutil

    shutil.rmtree(run_dir / "final")
    if status is None:
        (run_dir / "summary.json").unlink()
    else:
        s = json.loads((run_dir / "summary.json").read_text())
        runs.write_json_atomic(run_dir / "summary.json", {**s, "status": status})


# ------------------------------------------------------------------------------------------------ rundir unit tests

def test_a_killed_writers_partial_output_is_removed_by_the_next_writer(tmp_path, capsys):
    """atomic_path(reclaim=True), as exports use it: the hidden temporary a SIGKILLed writer leaves is removed by the
    next write of the same target; one that a live writer holds, a young one and any other file are left alone."""
    import subprocess
    import sys

    from tunelab import rundir

    target = tmp_path / "model.gguf"
    writer = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from tunelab.rundir import atomic_path
with atomic_path({str(target)!r}, suffix=".partial", reclaim=True) as tmp:
    tmp.write_bytes(b"half a model")
    print(tmp, flush=True)
    time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    abandoned = Path(writer.stdout.readline().strip())
    writer.kill()
    writer.wait()
    live = subprocess.Popen([sys.executable, "-c", f"""
import time
from tunelab.rundir import atomic_path
with atomic_path({str(target)!r}, suffix=".partial", reclaim=True) as tmp:
    print(tmp, flush=True)
    time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        busy = Path(live.stdout.readline().strip())
        young = tmp_path / ".model.gguf.0badc0de.partial"
        young.write_bytes(b"")
        other = tmp_path / ".model.gguf.notes"
        other.write_text("mine")
        old = time.time() - 2 * rundir.ABANDONED_AFTER_S
        for p in (abandoned, busy, other):
            os.utime(p, (old, old))
        with rundir.atomic_path(target, suffix=".partial", reclaim=True) as tmp:
            tmp.write_bytes(b"a model")
        assert target.read_bytes() == b"a model" and not abandoned.exists()
        assert busy.exists() and young.exists() and other.read_text() == "mine"
        assert f"removed {abandoned}: a partial write of {target}" in capsys.readouterr().err
    finally:
        live.kill()
        live.wait()


def test_read_metrics_drops_a_cut_off_line_and_writes_are_atomic(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n{"step": 3, "lo')
    assert runs.read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
    assert runs.read_metrics(tmp_path / "missing") == []
    # the whole run's loss weights each logged mean by the steps it covers: (2*1 + 1*3) / 4
    assert runs.train_loss([{"step": 1, "loss": 2.0}, {"step": 4, "loss": 1.0}, {"step": 4, "eval_loss": 9}]) == 1.25

    target = tmp_path / "sub" / "a.json"
    runs.write_json_atomic(target, {"x": Path("p")})
    assert json.loads(target.read_text()) == {"x": "p"}
    with pytest.raises(TypeError):  # a failed write leaves the old file and no temp file behind
        runs.write_text_atomic(target, 1)
    assert json.loads(target.read_text()) == {"x": "p"} and os.listdir(target.parent) == ["a.json"]


def test_open_finished_run(tmp_path, tiny_model):
    run = tmp_path / "r"
    with pytest.raises(UserError, match="does not exist"):
        runs.open_finished_run(run)
    (run / "final").mkdir(parents=True)
    (run / "final" / "adapter_config.json").write_text("{}")
    (run / "config.yaml").write_text("")
    with pytest.raises(UserError, match="empty or unreadable"):
        runs.open_finished_run(run)
    (run / "config.yaml").write_text(f"model:\n  source: {tiny_model}\nadapter:\n  type: dora\n")
    (run / "summary.json").write_text('{"status": "compl')  # damaged: read as missing
    r = runs.open_finished_run(run)
    assert (r.is_adapter, r.base, r.model_source, r.adapter, r.adapter_type, r.summary) == \
        (True, tiny_model, tiny_model, str(run / "final"), "dora", None)
    (run / "final" / "adapter_config.json").unlink()
    with pytest.raises(UserError, match="neither a PEFT adapter"):
        runs.open_finished_run(run)
    (run / "final" / "config.json").write_text("{}")
    assert runs.open_finished_run(run).model_source == str(run / "final")
    with pytest.raises(UserError, match=r"final is the final model of the run .*/r: pass the run itself"):
        runs.open_finished_run(run / "final")  # a run's final/ given where the run is asked for
    shutil.rmtree(run / "final")
    with pytest.raises(UserError, match=r"no final model yet .* --adapter .*/r/checkpoints/checkpoint-N"):
        runs.open_finished_run(run)


# ------------------------------------------------------------------------------------- resume at the last step

class SigintAt(TrainerCallback):
    """Ctrl-C while step `step` runs: runs.GracefulStop gets the signal as from a terminal."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGINT)


# max_steps inside an epoch (2 of 8 steps): the Trainer trained step 3 from checkpoint-2; at an epoch's end (the
# epochs schedule) it trained nothing but reported a train_loss of 0
@pytest.mark.parametrize("subset,schedule,adapter", [(None, {"max_steps": 2}, "lora"),
                                                     (8, {"max_steps": -1, "epochs": 1}, "lora"),
                                                     (None, {"max_steps": 2}, "none")])
def test_resume_at_the_last_step_trains_nothing(tmp_path, tiny_model, tiny_chat_data, subset, schedule, adapter):
    path = _config(tmp_path, tiny_model, tiny_chat_data, "last", subset, training=schedule,
                   adapter={"type": adapter})
    first = run_training(load_config(path), show_progress=False)
    assert first["status"] == "complete" and first["global_step"] == 2
    run_dir, want = Path(first["run"]), _weights(Path(first["run"]))
    for status in (None, "interrupted"):  # killed while final/ was saved; Ctrl-C at the last step
        _unfinish(run_dir, status)
        again = run_training(load_config(path), show_progress=False)
        assert again["status"] == "complete" and again["global_step"] == 2, again
        assert again["resumed_from"].endswith("checkpoint-2")
        _assert_same_weights(want, _weights(run_dir))
        assert [r["step"] for r in _lines(run_dir) if "loss" in r] == [1, 2]
        assert again["train_loss"] == pytest.approx(first["train_loss"], abs=1e-6)
    if schedule["max_steps"] > 0 and adapter == "lora":
        # Ctrl-C during the last step: that step completes, so the run is complete, not interrupted
        other = _config(tmp_path, tiny_model, tiny_chat_data, "sigint", subset, training=schedule)
        stopped = run_training(load_config(other), callbacks=[SigintAt(2)], show_progress=False)
        assert stopped["status"] == "complete" and stopped["global_step"] == 2
        _assert_same_weights(want, _weights(Path(stopped["run"])))


# -------------------------------------------------------------------- cut-off metrics, whole-run summaries

class Sleep(TrainerCallback):
    """Each step takes at least `s` seconds, so per-epoch durations have a floor to check."""

    def __init__(self, s):
        self.s = s

    def on_step_end(self, args, state, control, **kw):
        time.sleep(self.s)


class TrainerLoss(TrainerCallback):
    """The Trainer's own train_loss (its final log, before tunelab rewrites it for metrics.jsonl)."""

    value = None

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "train_loss" in logs:
            self.value = logs["train_loss"]


def test_resume_repairs_cut_off_metrics_and_summaries_cover_every_part(tmp_path, tiny_model, tiny_chat_data):
    # 8 rows, batch 4: 2 steps per epoch, 2 epochs; a checkpoint every step
    sections = dict(training={"max_steps": -1, "epochs": 2, "save_steps": 1})
    seen = TrainerLoss()
    whole = run_training(load_config(_config(tmp_path, tiny_model, tiny_chat_data, "whole", **sections)),
                         callbacks=[seen], show_progress=False)
    assert whole["global_step"] == 4
    assert whole["train_loss"] == pytest.approx(seen.value, abs=1e-7)  # uninterrupted: the Trainer's own value

    path = _config(tmp_path, tiny_model, tiny_chat_data, "parts", **sections)
    # stopped in epoch 1 (a resume inside a later epoch is not exact in transformers 5.24: step 4 differs)
    run_training(load_config(path), callbacks=[StopAt(1), Sleep(0.3)], show_progress=False)
    run_dir = tmp_path / "runs" / "parts"
    _unfinish(run_dir)
    with open(run_dir / "metrics.jsonl", "a") as fh:  # killed mid-write: a cut-off last line
        fh.write('{"step": 4, "epoch": 2.0, "lo')
    second = run_training(load_config(path), callbacks=[Sleep(0.3)], show_progress=False)
    assert second["status"] == "complete" and second["resumed_from"].endswith("checkpoint-1")

    lines = _lines(run_dir)
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]
    assert [i for i, r in enumerate(lines) if "train_loss" in r] == [len(lines) - 1]  # only the final record
    # the whole run's loss, not the last part's (steps 2-4): equal to the uninterrupted run's
    assert second["train_loss"] == pytest.approx(whole["train_loss"], abs=1e-5)
    assert lines[-1]["train_loss"] == pytest.approx(second["train_loss"])
    _assert_same_weights(_weights(Path(whole["run"])), _weights(run_dir))
    # epoch 1 ran in both parts, epoch 2 in the second: each took two 0.3 s steps in all
    epochs = json.loads((run_dir / "epochs.json").read_text())
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(e["duration_s"] is not None and e["duration_s"] >= 0.6 for e in epochs), epochs
    assert second["train_seconds"] >= 4 * 0.3


# ----------------------------------------------------------------------------------------- damaged config.yaml

def test_damaged_config_yaml_keeps_the_checkpoints(tmp_path, tiny_model, tiny_chat_data):
    path = _config(tmp_path, tiny_model, tiny_chat_data, "cfg", training={"max_steps": 2, "save_steps": 1})
    run_training(load_config(path), callbacks=[StopAt(1)], show_progress=False)
    run_dir = tmp_path / "runs" / "cfg"
    _unfinish(run_dir)
    cfg, saved = load_config(path), run_dir / "config.yaml"
    text = saved.read_text()
    assert text == cfg.to_yaml() and (run_dir / "checkpoints" / "checkpoint-1" / runs.CONFIG_COPY).read_text() == text

    for damaged in ("", text[: len(text) // 2], "model: [\n"):  # empty, cut off mid-file, unparsable
        saved.write_text(damaged)
        run = runs.open_run(cfg)
        assert run.resume_from.name == "checkpoint-1" and "rewritten" in run.notice
        other = load_config(path, ["training.learning_rate=0.1"])
        with pytest.raises(UserError, match=r"different config \(training.learning_rate.*run_config.yaml"):
            runs.open_run(other)
    # checkpoints from before config copies: what their trainer state records is checked instead
    (run_dir / "checkpoints" / "checkpoint-1" / runs.CONFIG_COPY).unlink()
    saved.write_text("")
    assert runs.open_run(cfg).resume_from.name == "checkpoint-1"
    with pytest.raises(UserError, match="training.save_steps: 1 in checkpoint-1, 2 now"):
        runs.open_run(load_config(path, ["training.save_steps=2"]))

    done = run_training(cfg, show_progress=False)  # resumes; config.yaml written whole again
    assert done["status"] == "complete" and done["resumed_from"].endswith("checkpoint-1")
    assert saved.read_text() == text

    # nothing to resume: one line that names the way out
    empty = tmp_path / "runs" / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text("")
    with pytest.raises(UserError, match="no checkpoint to resume; pass --overwrite"):
        runs.open_run(load_config(path, ["output.name=empty"]))


def test_resume_at_the_last_step_restores_the_best_checkpoint(tmp_path, tiny_model, tiny_chat_data):
    # other texts to validate on and a learning rate too high for them: the best checkpoint is not the last one
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                           + "\n" for q, a in [("Who wrote Hamlet?", "William Shakespeare wrote it around 1600."),
                                               ("What is rain?", "Water falling from clouds in drops.")]))
    path = _config(tmp_path, tiny_model, tiny_chat_data, "best", None, adapter={"type": "none"},
                   data={"validation": str(val)}, training={"max_steps": 6, "eval_steps": 2, "save_steps": 2,
                                                            "learning_rate": 0.1})
    first = run_training(load_config(path), show_progress=False)
    run_dir, want = Path(first["run"]), _weights(Path(first["run"]))
    best_step = min((r["eval_loss"], r["step"]) for r in _lines(run_dir) if "eval_loss" in r)[1]
    assert best_step < 6 and first["best_checkpoint"].endswith(f"checkpoints/checkpoint-{best_step}")
    _unfinish(run_dir)  # killed while final/ was saved
    again = run_training(load_config(path), show_progress=False)
    assert again["global_step"] == 6 and again["best_checkpoint"] == first["best_checkpoint"]
    assert again["best_metric"] == first["best_metric"]
    _assert_same_weights(want, _weights(run_dir))


def test_every_reader_opens_a_run_the_same_way(tmp_path, tiny_model, capsys):
    """eval, export, serve/chat and load_for_inference all go through runs.open_finished_run: one message each."""
    from tunelab import cli
    from tunelab.inference.host import Host
    from tunelab.models import load_for_inference

    run = tmp_path / "r"
    (run / "final").mkdir(parents=True)
    (run / "final" / "adapter_config.json").write_text("{}")
    (run / "config.yaml").write_text("")  # cut off by a crash
    for call in (lambda: Host.load(runs=[str(run)]), lambda: load_for_inference(run=str(run))):
        with pytest.raises(UserError, match="config.yaml is empty or unreadable"):
            call()
    assert cli.main(["export", str(run), "--to", "merged"]) == 2
    assert cli.main(["eval", "--run", str(run), "--task", "gsm8k", "--n", "1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("config.yaml is empty or unreadable" in e for e in err), err


def test_overwrite_deletes_only_a_run(tmp_path, tiny_model, tiny_chat_data, capsys):
    """--overwrite deletes the run directory whole: never a folder of runs, nor a folder that is not a run."""
    from tunelab import cli

    path = make_config(tmp_path, tiny_model, tiny_chat_data, "r", training={"max_steps": 1})
    parent = tmp_path / "runs"
    (parent / "kept").mkdir(parents=True)
    (parent / "kept" / "notes.txt").write_text("mine")
    (parent / "kept" / "config.yaml").write_text("learning_rate: 1\n")  # a config.yaml, but not a run's
    # a name that reaches the parent folder, or past it, is refused before anything is looked at
    for name in (".", "..", "kept/..", str(parent)):
        assert cli.main(["train", str(path), f"output.name={name}", "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "output.name" in err and len(err.strip().splitlines()) == 1, err
    # a folder that is not a run: refused with and without --overwrite, and the refusal does not suggest it
    for flag in (["--overwrite"], []):
        assert cli.main(["train", str(path), "output.name=kept", *flag]) == 2
        err = capsys.readouterr().err
        assert "not a tunelab run" in err and "pass --overwrite" not in err, err
    assert (parent / "kept" / "notes.txt").read_text() == "mine"
    # a run is a run: an empty config.yaml left by a crash (nothing but run files beside it) may be started over
    cut = parent / "cut"
    cut.mkdir()
    (cut / "config.yaml").write_text("")
    (cut / "metrics.jsonl").write_text("")
    assert runs.is_run_dir(cut) and not runs.is_run_dir(parent) and not runs.is_run_dir(parent / "kept")
    assert runs.open_run(load_config(path, ["output.name=cut"]), overwrite=True).overwrite
    (cut / "mine.txt").write_text("x")
    assert not runs.is_run_dir(cut)


def test_a_run_killed_before_its_config_was_written_may_be_started_over(tmp_path, tiny_model, tiny_chat_data):
    """The Trainer creates .staging/ when it is built, just before the run's config.yaml is written: a run killed in
    between holds .staging/ alone. It is a run: refused with a pointer to --overwrite, which then starts it over."""
    path = make_config(tmp_path, tiny_model, tiny_chat_data, "k", training={"max_steps": 1})
    (tmp_path / "runs" / "k" / runs.STAGING).mkdir(parents=True)
    with pytest.raises(UserError, match="config.yaml was never written .* pass --overwrite"):
        runs.open_run(load_config(path))
    assert runs.open_run(load_config(path), overwrite=True).overwrite


def test_one_job_per_run_directory(tmp_path, tiny_model, tiny_chat_data):
    """A run directory is locked by the job that trains it: a second job is refused (resume or --overwrite alike),
    and a job that found no run but meets one another job created while it was checked does not start it over."""
    cfg = load_config(make_config(tmp_path, tiny_model, tiny_chat_data, "locked", training={"max_steps": 1}))
    first = runs.open_run(cfg)
    runs.start_run(first, cfg)  # a new run: locked once created
    assert first.lock.held
    for overwrite in (False, True):
        with pytest.raises(UserError, match="is in use: another tunelab process is training it"):
            runs.open_run(cfg, overwrite=overwrite).claim()
    first.lock.release()
    runs.open_run(cfg).claim()  # free again: the job has ended
    # both found no run; the first created it, so the second must not rewrite its config and log
    cfg2 = load_config(make_config(tmp_path, tiny_model, tiny_chat_data, "raced", training={"max_steps": 1}))
    a, b = runs.open_run(cfg2), runs.open_run(cfg2)
    runs.start_run(a, cfg2)
    (a.dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    a.lock.release()
    with pytest.raises(UserError, match="was started by another tunelab process meanwhile"):
        runs.start_run(b, cfg2)
    assert (a.dir / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_trackers_are_not_part_of_what_a_run_is(tmp_path, tiny_model, tiny_chat_data):
    """Adding a tracker when resuming (or spelling none as []) resumes the run; changing what trains is refused."""
    path = make_config(tmp_path, tiny_model, tiny_chat_data, "tracked", training={"max_steps": 1})
    cfg = load_config(path, ["training.report_to=none"])
    runs.start_run(runs.open_run(cfg), cfg)
    runs.open_run(load_config(path, ["training.report_to=tensorboard"]))
    runs.open_run(load_config(path))
    with pytest.raises(UserError, match="different config"):
        runs.open_run(load_config(path, ["training.seed=7"]))
