"""Sweeps: a grid on the tiny model (table, plots, best config, a re-run that trains nothing), an Optuna study on
SQLite with pruning, a stopped trial resumed from its checkpoint, and the refusals of bad sweep files."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import pytest
import yaml
from transformers import TrainerCallback

from tunelab import load_config
from tunelab.errors import UserError
from tunelab.sweep import load_sweep, run_sweep

optuna = pytest.importorskip("optuna")
ROOT = Path(__file__).resolve().parents[1]


def write_sweep(tmp_path, tiny_model, data, search, name="s", **extra) -> Path:
    base = {
        "model": {"source": tiny_model},
        "data": {"train": data, "max_length": 96},
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"max_steps": 3, "batch_size": 4, "learning_rate": 5e-3, "save_steps": 100, "precision": "fp32"},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"base": "base.yaml", "out_dir": str(tmp_path / "sweeps"), "search": search, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_grid_runs_every_trial_writes_table_plots_best_config_and_rerun_skips(tmp_path, tiny_model, tiny_chat_data,
                                                                             capsys):
    from tunelab.cli import main
    from tunelab.sweep import describe

    path = write_sweep(tmp_path, tiny_model, tiny_chat_data, subset=16, overrides={"training.epochs": 2,
                                                                                    "training.max_steps": -1},
                       search={"strategy": "grid", "objective": "last_epoch_train_loss",
                               "space": {"training.learning_rate": ["1e-3", 1.0e-2],
                                         "training.scheduler": ["linear", "cosine"]}})
    sweep = load_sweep(path)
    assert sweep.trials == 4 and sweep.objective == "last_epoch_train_loss"
    assert main(["sweep", str(path), "--dry-run"]) == 0
    listed = [line.strip() for line in capsys.readouterr().out.splitlines() if line.startswith("  trial-")]
    out = run_sweep(sweep, show_progress=False)
    rows = out["results"]
    assert [r["status"] for r in rows] == ["complete"] * 4
    # --dry-run names each trial as the run does, though Optuna's grid sampler visits the points shuffled
    assert listed == [f"{r['trial']}  {describe({k: r[k] for k in sweep.search.space})}" for r in rows]
    assert {(r["training.learning_rate"], r["training.scheduler"]) for r in rows} == \
        {(lr, s) for lr in (1e-3, 1e-2) for s in ("linear", "cosine")}
    sdir = tmp_path / "sweeps" / "s"
    for r in rows:  # each trial is an ordinary, complete run on the 16-row subset: 2 epochs of 4 steps
        summary = json.loads((sdir / r["trial"] / "summary.json").read_text())
        assert summary["status"] == "complete" and summary["global_step"] == 8
        assert yaml.safe_load((sdir / r["trial"] / "config.yaml").read_text())["data"]["subset"] == 16
        epochs = json.loads((sdir / r["trial"] / "epochs.json").read_text())
        assert [e["epoch"] for e in epochs] == [1, 2] and r["objective"] == pytest.approx(epochs[-1]["train_loss"])
    table = list(csv.DictReader(open(sdir / "results.csv")))
    assert len(table) == 4 and {"trial", "training.learning_rate", "objective", "time_s", "status"} <= set(table[0])
    md = (sdir / "results.md").read_text()
    assert md.count("| trial-") == 4 and "★" in md
    best = min(rows, key=lambda r: r["objective"])
    assert out["best"]["trial"] == best["trial"]
    # one figure per searched key
    assert sorted(p.name for p in (sdir / "plots").iterdir()) == \
        ["epoch_loss_training_learning_rate.png", "epoch_loss_training_scheduler.png"]
    # the best config trains as it is: the best values, the full data (no sweep subset), its own run name
    text = (sdir / "best.yaml").read_text()
    assert text.startswith(f"# tunelab train {sdir / 'best.yaml'}")
    cfg = load_config(sdir / "best.yaml")
    assert cfg.training.learning_rate == best["training.learning_rate"]
    assert cfg.training.scheduler == best["training.scheduler"] and cfg.data.subset is None
    assert cfg.output.name == "s-best" and cfg.training.epochs == 2

    # a re-run trains nothing: the study knows all 4 finished ...
    stamps = {r["trial"]: (sdir / r["trial"] / "metrics.jsonl").stat().st_mtime_ns for r in rows}
    lines = []
    again = run_sweep(load_sweep(path), show_progress=False, echo=lines.append)
    assert "4/4 trials finished, 0 to run" in lines[0]
    assert [r["status"] for r in again["results"]] == ["complete"] * 4
    # ... and without the study database, each trial's complete run is found and read back, not trained again
    (sdir / "study.db").unlink()
    third = run_sweep(load_sweep(path), show_progress=False, echo=lines.append)
    assert [r["status"] for r in third["results"]] == ["complete"] * 4
    assert {r["trial"]: r["objective"] for r in third["results"]} == {r["trial"]: r["objective"] for r in rows}
    assert stamps == {r["trial"]: (sdir / r["trial"] / "metrics.jsonl").stat().st_mtime_ns for r in rows}


@pytest.mark.slow  # ~45 s; the shared-storage tests run Optuna studies in make test
def test_optuna_study_on_sqlite_runs_n_trials_and_prunes(tmp_path, tiny_model, tiny_chat_data):
    db = tmp_path / "elsewhere" / "optuna.db"
    db.parent.mkdir()
    search = {"strategy": "optuna", "trials": 3, "objective": "eval_loss", "storage": f"sqlite:///{db}",
              "space": {"training.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
                        "adapter.r": {"low": 2, "high": 8}},
              # a threshold no loss can beat: every trial is stopped at its first evaluation
              "pruning": {"pruner": "threshold", "threshold": 0.0}}
    path = write_sweep(tmp_path, tiny_model, tiny_chat_data, name="tpe", search=search,
                       overrides={"data.val_split": 0.25, "training.eval_steps": 2, "training.max_steps": 6,
                                  "training.save_steps": 2})
    out = run_sweep(load_sweep(path), show_progress=False)
    study = optuna.load_study(study_name="tpe", storage=f"sqlite:///{db}")
    assert len(study.trials) == 3
    assert all(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    assert all(t.distributions["adapter.r"].__class__.__name__ == "IntDistribution" for t in study.trials)
    for r in out["results"]:
        assert r["status"] == "pruned" and r["steps"] == 2 and r["objective"] > 0  # stopped at the first evaluation
    assert not (tmp_path / "sweeps" / "tpe" / "study.db").exists()
    assert out["best"] is None and not (tmp_path / "sweeps" / "tpe" / "best.yaml").exists()

    # the budget can grow: 2 more trials, now without pruning, continue the same study
    spec = yaml.safe_load(path.read_text())
    spec["search"]["pruning"] = {"pruner": "none"}
    path.write_text(yaml.safe_dump(spec))
    out = run_sweep(load_sweep(path, trials=5), show_progress=False)
    assert len(optuna.load_study(study_name="tpe", storage=f"sqlite:///{db}").trials) == 5
    done = [r for r in out["results"] if r["status"] == "complete"]
    assert len(done) == 2 and all(r["steps"] == 6 for r in done)
    assert out["best"]["objective"] == min(r["objective"] for r in done)


class InterruptAt(TrainerCallback):
    """Ctrl-C during step `step + 1` of the first trial (the run's GracefulStop then saves a checkpoint and stops)."""

    def __init__(self, step):
        self.step, self.fired = step, False

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step and not self.fired:
            self.fired = True
            os.kill(os.getpid(), signal.SIGINT)


def test_stopped_trial_resumes_from_its_checkpoint(tmp_path, tiny_model, tiny_chat_data):
    path = write_sweep(tmp_path, tiny_model, tiny_chat_data, name="stop", search={
        "strategy": "random", "trials": 2, "objective": "train_loss",
        "space": {"training.weight_decay": {"low": 0.0, "high": 0.1}}}, overrides={"training.max_steps": 4, "training.save_steps": 2})
    out = run_sweep(load_sweep(path), callbacks=[InterruptAt(1)], show_progress=False)
    assert out["interrupted"] == "trial-000"
    assert [r["status"] for r in out["results"]] == ["interrupted"]
    run_dir = tmp_path / "sweeps" / "stop" / "trial-000"
    assert (run_dir / "checkpoints" / "checkpoint-2").is_dir()

    out = run_sweep(load_sweep(path), show_progress=False)
    assert [(r["trial"], r["status"]) for r in out["results"]] == [("trial-000", "complete"), ("trial-002", "complete")]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 4
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4]  # the curve continues, no step twice


@pytest.mark.parametrize("search, extra, message", [
    ({"strategy": "grid", "space": {"training.learning_rat": [1e-4]}}, {}, "did you mean 'training.learning_rate'"),
    ({"strategy": "grid", "space": {"training.learning_rate": {"low": 1e-4, "high": 1e-3}}}, {}, "needs a list"),
    ({"strategy": "random", "space": {"training.learning_rate": [1e-4]}}, {}, "search.trials"),
    ({"strategy": "grid", "space": {"training.learning_rate": [1e-4]}, "objective": "eval_los"}, {},
     "did you mean 'eval_loss'"),
    ({"strategy": "grid", "space": {"training.learning_rate": [1e-4]}, "objective": "eval_loss"}, {},
     "needs evaluation during training"),
    ({"strategy": "grid", "space": {"training.scheduler": ["cosine", "cosnie"]}}, {}, "training.scheduler"),
    ({"strategy": "grid", "space": {"output.name": ["a"]}}, {}, "sets output"),
    ({"strategy": "grdi", "space": {"training.learning_rate": [1e-4]}}, {}, "search.strategy"),
    ({"strategy": "grid", "space": {"training.learning_rate": [1e-4]}}, {"serach": {}}, "did you mean 'search'"),
    ({"strategy": "grid", "space": {"training.learning_rate": [1e-4]}}, {"overrides": {"training.epoch": 2}},
     "did you mean 'training.epochs'"),
    ({"strategy": "grid", "space": {"training.learning_rate": [1e-4]}},
     {"overrides": {"training.report_to": ["tensorbord"]}}, "did you mean 'tensorboard'"),
    # what `tunelab train` refuses before its run directory, found by --dry-run too
    ({"strategy": "grid", "space": {"training.optimizer": ["adamw_torch", "adamw_torhc"]}}, {},
     "did you mean 'adamw_torch'"),
    ({"strategy": "grid", "space": {"training.scheduler_kwargs": [{}, {"power": "abc"}]}},
     {"overrides": {"training.scheduler": "polynomial"}}, "power is text"),
    # what Optuna would refuse only once the study runs, or a trial only once it is built
    ({"strategy": "optuna", "trials": 2, "space": {"training.learning_rate": {"low": 1e-5, "high": 1e-3,
                                                                              "log": True, "step": 1e-5}}}, {},
     "step cannot be combined with log"),
    ({"strategy": "random", "trials": 2, "space": {"training.batch_size": {"low": 2, "high": 8, "step": 2.5}}}, {},
     r"from search.space.training.batch_size.step: 2.5"),
    ({"strategy": "random", "trials": 2, "space": {"training.batch_size": {"low": 2, "high": 8, "step": 0}}}, {},
     "step must be above 0"),
    ({"strategy": "grid", "space": {"training.learning_rate": [1e-4, 2e-4, 0.0001]}}, {}, "lists 0.0001 twice"),
    ({"strategy": "random", "trials": 2, "spaces": {"training.learning_rate": [1e-4]}}, {},
     "unknown sweep key 'search.spaces'.*did you mean 'space'"),
    ({"strategy": "random", "trials": 2, "space": {"training.learning_rate": {"low": 1e-5, "high": 1e-3,
                                                                              "dist": "log"}}}, {},
     "search.space.training.learning_rate: unknown key 'dist'"),
])
def test_bad_sweep_files_are_refused_with_one_line(tmp_path, tiny_model, tiny_chat_data, search, extra, message):
    path = write_sweep(tmp_path, tiny_model, tiny_chat_data, search=search, **extra)
    with pytest.raises(UserError, match=message) as e:
        load_sweep(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_shipped_sweeps_parse():
    paths = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
    assert {p.name for p in paths} >= {"hparams-1k.yaml", "hparams-cpu.yaml"}
    for p in paths:
        first = p.read_text().splitlines()[0]
        assert first.startswith("# tunelab sweep configs/sweeps/"), first
        sweep = load_sweep(p)
        assert sweep.trials > 0


def test_cli_dry_run_lists_the_grid(tmp_path, tiny_model, tiny_chat_data, capsys):
    from tunelab.cli import main

    path = write_sweep(tmp_path, tiny_model, tiny_chat_data, search={
        "space": {"training.learning_rate": [1e-4, 3e-4], "training.batch_size": [4, 8]}})
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "grid, 4 trials" in out and "batch_size=8, learning_rate=0.0003" in out
    assert main(["sweep", str(tmp_path / "missing.yaml")]) == 2


def test_list_valued_choices_travel_through_optuna_into_best_config(tmp_path, tiny_model, tiny_chat_data):
    from tunelab.sweep import write_best_config
    from tunelab.sweep.study import encode_choice as _label, make_sampler as _sampler, suggest_value as _suggest

    choices = ["all-linear", ["q_proj", "v_proj"]]
    path = write_sweep(tmp_path, tiny_model, tiny_chat_data, search={
        "space": {"adapter.target_modules": choices, "adapter.r": [4, 8]}})
    sweep = load_sweep(path)
    study = optuna.create_study(sampler=_sampler(sweep, optuna, 0))
    seen = []

    def objective(trial):
        seen.append((str(_suggest(trial, "adapter.target_modules", sweep.search.space["adapter.target_modules"])),
                     _suggest(trial, "adapter.r", sweep.search.space["adapter.r"])))
        return 1.0

    study.optimize(objective, n_trials=10)  # the grid sampler stops the study when the grid is done
    assert sorted(seen) == sorted((str(t), r) for t in choices for r in (4, 8))
    # optuna stores a list choice as its JSON text; best.yaml gets the list back
    params = {"adapter.target_modules": _label(choices[1]), "adapter.r": 8}
    write_best_config(sweep, params, {"trial": "trial-001", "objective": 1.0})
    cfg = load_config(sweep.dir / "best.yaml")
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"] and cfg.adapter.r == 8


def test_a_swept_mapping_replaces_the_base_one(tmp_path, tiny_model, tiny_chat_data):
    path = write_sweep(tmp_path, tiny_model, tiny_chat_data, search={"space": {
        "method": [{"name": "sft"}], "training.scheduler_kwargs": [{}]}},
        config={"method": {"name": "sft", "loss": "nll"}, "training": {"scheduler": "cosine",
                                                                      "scheduler_kwargs": {"num_cycles": 2}}})
    sweep = load_sweep(path)
    cfg = sweep.trial_config({"method": {"name": "sft"}, "training.scheduler_kwargs": {}}, "t")
    assert cfg.method.options() == {} and cfg.training.scheduler_kwargs == {}
    assert sweep.raw["method"] == {"name": "sft", "loss": "nll"}  # the base itself is left as it was


@pytest.mark.parametrize("name", [".", "..", "a/..", "/tmp"])
def test_a_sweep_name_stays_inside_out_dir(tmp_path, tiny_model, tiny_chat_data, name):
    # the sweep's folder (out_dir/name) is what --overwrite deletes: never out_dir itself or a folder above it
    path = write_sweep(tmp_path, tiny_model, tiny_chat_data, search={"space": {"training.learning_rate": [1e-4]}})
    spec = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**spec, "name": name}))
    with pytest.raises(UserError, match="sweep key 'name': a sweep name is one folder name inside out_dir"):
        load_sweep(path)


def test_overwrite_deletes_only_a_sweep_folder(tmp_path, tiny_model, tiny_chat_data):
    """--overwrite deletes the sweep's folder whole: a folder there that holds anything else is left alone."""
    from tunelab.sweep.runner import is_sweep_dir

    path = write_sweep(tmp_path, tiny_model, tiny_chat_data, search={"space": {"training.learning_rate": [1e-4]}})
    mine = tmp_path / "sweeps" / "s"
    (mine / "notes").mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="is not a tunelab sweep, so it is left alone"):
        run_sweep(load_sweep(path), show_progress=False, overwrite=True)
    assert (mine / "thesis.tex").read_text() == "years of work"
    (mine / "thesis.tex").unlink()
    (mine / "notes").rmdir()
    for name in ("logs", "plots", "trial-000"):
        (mine / name).mkdir()
    (mine / "study.db").write_text("")
    assert is_sweep_dir(mine)  # what a sweep writes, and nothing else


@pytest.mark.parametrize("scheme, file", [("journal:", "study.journal"), ("sqlite:///", "my.db")])
def test_overwrite_restarts_a_sweep_whose_study_file_lives_in_its_folder(tmp_path, tiny_model, tiny_chat_data,
                                                                         scheme, file):
    """A journal or SQLite file kept inside the sweep's folder is the sweep's own: --overwrite deletes it with the
    folder and starts a fresh study there, with the trial budget whole again."""
    from tunelab.sweep.runner import is_sweep_dir

    mine = tmp_path / "sweeps" / "s"
    path = write_sweep(tmp_path, tiny_model, tiny_chat_data, search={
        "trials": 1, "space": {"training.learning_rate": [1e-4, 1e-3]}, "storage": f"{scheme}{mine / file}"})
    first = run_sweep(load_sweep(path), show_progress=False)
    assert [r["status"] for r in first["results"]] == ["complete"] and (mine / file).is_file()
    assert is_sweep_dir(mine, storage=load_sweep(path).storage)
    assert not is_sweep_dir(mine)  # without the storage named, its file is something else's
    again = run_sweep(load_sweep(path), show_progress=False, overwrite=True)
    assert [r["status"] for r in again["results"]] == ["complete"]  # one trial again: the study started over
    assert (mine / file).is_file()


def pairs(tmp_path) -> str:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for _ in range(4)
                            for p, c, r in [("Say hi.", "Hi there!", "No."), ("2+2?", "4.", "5."),
                                            ("A color?", "Blue.", "Seven.")]))
    return str(path)


EVAL = {"data.val_split": 0.25, "training.eval_steps": 2, "training.save_steps": 2, "training.max_steps": 2}


def test_the_objective_may_be_any_metric_the_trials_report(tmp_path, tiny_model):
    """A DPO sweep ranks its trials by the preference accuracy on held-out pairs (maximized); `auto` takes what the
    method is judged by (GRPO: its reward), and a metric no trial reports is refused when the file is read."""
    space = {"method.beta": [0.1, 0.5]}
    path = write_sweep(tmp_path, tiny_model, pairs(tmp_path), name="dpo", overrides={"method.name": "dpo", **EVAL},
                       search={"strategy": "grid", "objective": "eval_rewards/accuracies", "space": space})
    sweep = load_sweep(path)
    assert (sweep.objective, sweep.direction) == ("eval_rewards/accuracies", "max")
    out = run_sweep(sweep, show_progress=False)
    logged = [[r["eval_rewards/accuracies"] for r in map(json.loads, (out["dir"] / row["trial"] / "metrics.jsonl")
                                                         .read_text().splitlines()) if "eval_rewards/accuracies" in r]
              for row in out["results"]]
    assert [row["status"] for row in out["results"]] == ["complete"] * 2 and all(logged), out["results"]
    assert [row["objective"] for row in out["results"]] == [v[-1] for v in logged]

    grpo = {"method.name": "grpo", "method.rewards": ["format"], **EVAL}
    path = write_sweep(tmp_path, tiny_model, pairs(tmp_path), name="grpo", overrides=grpo,
                       search={"strategy": "grid", "space": space})
    assert (load_sweep(path).objective, load_sweep(path).direction) == ("eval_reward", "max")

    # DPO's reward of the rejected answers has no better side by its name: auto refuses it, a given side is taken
    search = {"strategy": "grid", "objective": "eval_rewards/rejected", "space": space}
    path = write_sweep(tmp_path, tiny_model, pairs(tmp_path), name="dpo-rejected",
                       overrides={"method.name": "dpo", **EVAL}, search=search)
    with pytest.raises(UserError, match="has no better side by its name.*set search.direction: min or max"):
        load_sweep(path)
    path = write_sweep(tmp_path, tiny_model, pairs(tmp_path), name="dpo-rejected",
                       overrides={"method.name": "dpo", **EVAL}, search={**search, "direction": "min"})
    assert load_sweep(path).direction == "min"


@pytest.mark.parametrize("objective, overrides, says", [
    ("accuracy", EVAL, "search.objective 'accuracy' is unknown"),
    ("eval_reward", EVAL, "is not reported by method 'sft'"),
    ("eval_gsm8k_accuracy", EVAL, "it needs eval.task=gsm8k"),
    ("eval_loss", {}, "needs evaluation during training"),
])
def test_an_objective_no_trial_reports_is_refused(tmp_path, tiny_model, tiny_chat_data, objective, overrides, says):
    path = write_sweep(tmp_path, tiny_model, tiny_chat_data, overrides=overrides,
                       search={"strategy": "grid", "objective": objective, "space": {"training.learning_rate": [1e-3]}})
    with pytest.raises(UserError, match=says):
        load_sweep(path)


def test_a_bad_sweep_file_is_refused_before_any_library_loads(tmp_path, tiny_model, tiny_chat_data):
    """A key that is not a config key and an objective the trials do not report: refused without importing torch,
    transformers or Optuna's training glue, so the answer comes at once."""
    import subprocess
    import sys

    paths = [write_sweep(tmp_path, tiny_model, tiny_chat_data, name="key",
                         search={"space": {"training.schedulr": ["linear"]}}),
             write_sweep(tmp_path, tiny_model, tiny_chat_data, name="objective",
                         search={"space": {"training.learning_rate": [1e-4]}, "objective": "eval_bogus"})]
    code = ("import sys\nfrom tunelab import cli\n"
            f"codes = [cli.main(['sweep', p]) for p in {[str(p) for p in paths]!r}]\n"
            "print(codes, [m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[2, 2] []", out.stdout + out.stderr[-3000:]
    errors = out.stderr.splitlines()
    assert len(errors) == 2 and "'training.schedulr' is not a config key" in errors[0], errors
    assert "search.objective 'eval_bogus'" in errors[1], errors
    assert not (tmp_path / "sweeps").exists()
