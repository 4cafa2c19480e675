"""The spine: SFT with full / LoRA / QLoRA / DoRA, exact resume, atomic checkpoints, refusals, saved artifacts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import StopAt
import torch
from transformers import TrainerCallback

from tunelab import cli, load_config
from tunelab.errors import UserError
from tunelab.train import run_training

CLI = [sys.executable, "-m", "tunelab"]


def make_config(tmp_path, tiny_model, data, name="run", **sections) -> Path:
    import yaml

    cfg = {
        "model": {"source": tiny_model},
        "data": {"train": data, "max_length": 128},
        "adapter": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"max_steps": 10, "batch_size": 4, "learning_rate": 5e-3, "save_steps": 5, "logging_steps": 1,
                     "precision": "fp32"},
        "output": {"dir": str(tmp_path / "runs"), "name": name},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


class Capture(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kw):
        self.model = model


@pytest.mark.parametrize("kind", ["full", "lora", "qlora", "dora"])
def test_loss_goes_down(tmp_path, tiny_model, tiny_chat_data, kind):
    adapter = {"full": {"type": "none"}, "lora": {}, "qlora": {}, "dora": {"type": "dora"}}[kind]
    extra = {"quantization": {"bits": 4}} if kind == "qlora" else {}
    lr = {"full": 3e-3, "lora": 1e-2, "qlora": 1e-2, "dora": 1e-2}[kind]
    path = make_config(tmp_path, tiny_model, tiny_chat_data, adapter=adapter,
                       training={"max_steps": 24, "learning_rate": lr, "save_steps": 100}, **extra)
    cap = Capture()
    summary = run_training(load_config(path), callbacks=[cap], show_progress=False)
    assert summary["status"] == "complete"
    ls = list(losses(Path(summary["run"])).values())
    assert sum(ls[-4:]) / 4 < sum(ls[:4]) / 4 - 0.3, ls
    if kind == "qlora":
        import bitsandbytes as bnb

        n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in cap.model.modules())
        assert n4 >= 14, "QLoRA must hold the base linear layers in 4-bit"  # 2 layers x 7 projections
        assert any(p.dtype == torch.uint8 for p in cap.model.parameters())
    if kind == "full":
        assert summary["trainable_params"] == summary["total_params"]
    else:
        assert summary["trainable_params"] < summary["total_params"] / 4


def _adapter_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "final" / "adapter_model.safetensors")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_exact(tmp_path, tiny_model, tiny_chat_data, precision):
    # dropout on, so resume must restore RNG state as well as model, optimizer, scheduler and data position;
    # bf16 is the CPU fast path: bf16 base, float32 adapters, FastDropout, lean loss under autocast
    sections = dict(adapter={"dropout": 0.1},
                    training={"scheduler": "cosine", "warmup_steps": 2, "precision": precision})
    full = run_training(load_config(make_config(tmp_path, tiny_model, tiny_chat_data, "full", **sections)),
                        show_progress=False)
    cfg_path = make_config(tmp_path, tiny_model, tiny_chat_data, "split", **sections)
    first = run_training(load_config(cfg_path), callbacks=[StopAt(5)], show_progress=False)
    assert first["global_step"] == 5
    # the first half stopped early: its checkpoint is complete and resumable, the run is not final
    run_dir = Path(first["run"])
    assert (run_dir / "checkpoints" / "checkpoint-5" / "trainer_state.json").is_file()
    (run_dir / "final").rename(run_dir / "final-half")  # as if the process had been interrupted
    (run_dir / "summary.json").unlink()
    second = run_training(load_config(cfg_path), show_progress=False)
    assert second["resumed_from"].endswith("checkpoint-5")
    a, b = losses(Path(full["run"])), losses(run_dir)
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    wa, wb = _adapter_weights(Path(full["run"])), _adapter_weights(run_dir)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_resume_in_a_later_epoch_keeps_the_length_grouped_order(tmp_path, tiny_model):
    """training.group_by_length (the default) orders each epoch from the RNG; a run stopped in its second epoch and
    resumed must see the batches the uninterrupted run saw. One sample per step, 56 rows of many lengths: more than
    one of the sampler's megabatches (50 batches), so the epoch's draw decides which rows come first."""
    rows = tmp_path / "varied.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Count to {i}."}, {
        "role": "assistant", "content": " ".join(str(k) for k in range(i * 7 % 23 + 1))}]}) + "\n" for i in range(56)))
    sections = dict(training={"max_steps": 60, "batch_size": 1, "save_steps": 29, "group_by_length": True})
    full = run_training(load_config(make_config(tmp_path, tiny_model, str(rows), "full", **sections)),
                        show_progress=False)
    cfg_path = make_config(tmp_path, tiny_model, str(rows), "split", **sections)
    run_training(load_config(cfg_path), callbacks=[StopAt(58)], show_progress=False)  # 2 steps into epoch 2
    run_dir = Path(full["run"]).parent / "split"
    (run_dir / "summary.json").unlink()
    shutil.rmtree(run_dir / "final")
    second = run_training(load_config(cfg_path), show_progress=False)
    assert second["resumed_from"].endswith("checkpoint-58")
    a, b = losses(Path(full["run"])), losses(run_dir)
    for step in (59, 60):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def _run_cli(args, timeout=300, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env, **kw)


def test_sigkill_resumes_from_last_complete_checkpoint(tmp_path, tiny_model, tiny_chat_data):
    from tunelab.runs import complete_checkpoints

    path = make_config(tmp_path, tiny_model, tiny_chat_data, "killed",
                       training={"max_steps": 4000, "save_steps": 3, "save_total_limit": 2})
    run_dir = tmp_path / "runs" / "killed"
    log = tmp_path / "train.log"  # the run's own progress lines and errors, shown if no checkpoint appears

    def past_step_6() -> bool:  # a checkpoint from step 6 on (rotation removes each one six steps later)
        return any(int(p.name.split("-")[1]) >= 6 for p in complete_checkpoints(run_dir / "checkpoints"))

    with log.open("w") as out:
        proc = subprocess.Popen([*CLI, "train", str(path)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and not past_step_6():
            time.sleep(0.2)
        assert past_step_6() and proc.poll() is None, (
            f"no checkpoint appeared (exit code {proc.poll()}); the run's output ends:\n"
            + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
        # the same command again while the run trains: refused in one line, not a second writer of the run
        second = _run_cli(["train", str(path)])
        assert second.returncode == 2 and "in use" in second.stderr, second.stderr[-2000:]
        assert len(second.stderr.strip().splitlines()) == 1 and proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # a half-written checkpoint: left in staging by a save that was cut off, and a bogus dir without trainer state
    (run_dir / ".staging" / "checkpoint-999").mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints" / "checkpoint-998").mkdir()
    last = complete_checkpoints(run_dir / "checkpoints")[-1]
    assert len(complete_checkpoints(run_dir / "checkpoints")) <= 2  # save_total_limit
    step = int(last.name.split("-")[1])
    # resume, but stop soon: a new run of the same config would take 4000 steps, so check the resume point only
    cfg = load_config(path)
    resumed = run_training(cfg, callbacks=[StopAt(step + 1)], show_progress=False)
    assert resumed["resumed_from"] == str(last)
    assert not (run_dir / ".staging" / "checkpoint-999").exists()
    metrics_steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics_steps == sorted(metrics_steps), "metrics continue from the checkpoint without duplicated steps"


def test_ctrl_c_saves_checkpoint_and_exits_zero(tmp_path, tiny_model, tiny_chat_data):
    path = make_config(tmp_path, tiny_model, tiny_chat_data, "ctrlc", training={"max_steps": 2000, "save_steps": 1000})
    run_dir = tmp_path / "runs" / "ctrlc"
    proc = subprocess.Popen([*CLI, "train", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert (run_dir / "checkpoints" / f"checkpoint-{summary['global_step']}").is_dir()
    assert not (run_dir / "final").exists()


def test_cli_refusals_are_one_line_exit_2(tmp_path, tiny_model, tiny_chat_data, capsys):
    path = make_config(tmp_path, tiny_model, tiny_chat_data, "cli", training={"max_steps": 2})
    ok = _run_cli(["train", str(path)])
    assert ok.returncode == 0, ok.stderr[-2000:]
    # no library's log line in the run's output (DeepSpeed, where installed, says on import that it found no GPU)
    assert "[WARNING]" not in ok.stdout + ok.stderr, ok.stdout
    # same name, different config: refused by the process in one line, run untouched
    before = (tmp_path / "runs" / "cli" / "final" / "adapter_model.safetensors").read_bytes()
    r = _run_cli(["train", str(path), "training.learning_rate=0.1"])
    assert r.returncode == 2 and "different config" in r.stderr and "--overwrite" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / "runs" / "cli" / "final" / "adapter_model.safetensors").read_bytes() == before
    # the rest through the same entry point in this process (a new process costs seconds of imports each)
    capsys.readouterr()

    def cli_main(args):
        code = cli.main(args)
        out, err = capsys.readouterr()
        return code, out, err

    # same config again: already complete, nothing retrained
    code, out, _ = cli_main(["train", str(path)])
    assert code in (0, None) and "already complete" in out
    # --overwrite starts over
    code, _, err = cli_main(["train", str(path), "training.learning_rate=0.1", "--overwrite"])
    assert code in (0, None), err[-2000:]
    # unknown key: names the nearest valid key
    code, _, err = cli_main(["train", str(path), "training.lerning_rate=0.1"])
    assert code == 2 and "training.lerning_rate" in err and "learning_rate" in err
    assert len(err.strip().splitlines()) == 1
    # output.resume: never refuses an existing run
    code, _, err = cli_main(["train", str(path), "output.resume=never", "training.learning_rate=0.1"])
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1


def test_eos_never_trained_is_refused(tmp_path, tiny_model, tiny_chat_data):
    # a template that never emits the end-of-turn token: a model trained on it would never stop
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
               "{% if add_generation_prompt %}assistant: {% endif %}"
    tfile = tmp_path / "template.jinja"
    tfile.write_text(template)
    path = make_config(tmp_path, tiny_model, tiny_chat_data, "noeos", model={"chat_template": str(tfile)})
    r = _run_cli(["train", str(path)])
    assert r.returncode == 2, r.stderr[-2000:]
    assert "end-of-turn token" in r.stderr and "never trained" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "runs" / "noeos" / "checkpoints").exists()


def test_skipped_rows_and_template_refusals_name_their_rows(tmp_path, tiny_model, tiny_chat_data):
    from tunelab.errors import UserError

    good = Path(tiny_chat_data).read_text().splitlines()[:8]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(["{not json", *good]) + "\n")
    lines = []
    path = make_config(tmp_path, tiny_model, str(mixed), "skip", training={"max_steps": 1})
    run_training(load_config(path, ["data.on_invalid=skip"]), echo=lines.append, show_progress=False)
    # data.on_invalid=skip: the rows left out are said before any step, not only in summary.json
    assert any(x.startswith("warning: 1 of 9 rows were invalid and skipped") and "mixed.jsonl:1:" in x
               for x in lines), lines
    # a template that refuses system messages (as Gemma's does): the row it met is named
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                "supported') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (tmp_path / "t.jinja").write_text(template)
    with_system = json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi"}]})
    (tmp_path / "sys.jsonl").write_text("\n".join([*good, with_system]) + "\n")
    path = make_config(tmp_path, tiny_model, str(tmp_path / "sys.jsonl"), "sys",
                       model={"chat_template": str(tmp_path / "t.jinja")})
    with pytest.raises(UserError, match=r"sys\.jsonl:9: the chat template cannot render this conversation: System "
                                        r"role not supported; .*model\.chat_template"):
        run_training(load_config(path), show_progress=False)
    assert not (tmp_path / "runs" / "sys").exists()


def test_saved_artifacts_load_with_plain_libraries(tmp_path, tiny_model, tiny_chat_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lora = run_training(load_config(make_config(tmp_path, tiny_model, tiny_chat_data, "lora",
                                                training={"max_steps": 3})), show_progress=False)
    tok = AutoTokenizer.from_pretrained(lora["final"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), lora["final"])
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]

    full = run_training(load_config(make_config(tmp_path, tiny_model, tiny_chat_data, "full-ft",
                                                adapter={"type": "none"}, training={"max_steps": 3})),
                        show_progress=False)
    m = AutoModelForCausalLM.from_pretrained(full["final"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    changed = any(not torch.equal(a, b) for a, b in zip(m.state_dict().values(), base.state_dict().values()))
    assert changed, "full fine-tuning must change the saved weights"
    run_dir = Path(full["run"])
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss.png"):
        assert (run_dir / name).is_file(), name
    rec = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("step", "epoch", "loss", "learning_rate", "grad_norm", "tokens", "tokens_per_s", "elapsed"):
        assert key in rec, key


@pytest.mark.e2e
def test_quickstart_config_trains_embedded_model(tmp_path, embedded_model):
    """The shipped quickstart config, a few steps on the real SmolLM2-135M-Instruct."""
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "quickstart.yaml",
                      ["data.subset=64", "training.max_steps=3", "training.batch_size=4",
                       f"output.dir={tmp_path}", "training.save_steps=3"])
    summary = run_training(cfg, show_progress=False)
    assert summary["status"] == "complete" and summary["global_step"] == 3
    # the recipe keeps the short solutions only: rows longer than data.max_length are dropped, not cut
    d = summary["data"]
    assert d["samples"] + d["dropped"] == 64 and d["samples"] >= 12 and d["dropped"] > 0 and d["truncated"] == 0
    assert 0.2 < summary["first_loss"] < 3.0  # a real pretrained model on GSM8K text, not a random one
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(embedded_model), summary["final"])
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_eval_and_save_per_epoch_resume_exactly(tmp_path, tiny_model, tiny_chat_data):
    # 24 training rows (val_split 0.25 of 32) in batches of 4: 6 steps an epoch, checkpoints at 6 and 12
    import shutil

    sections = dict(training={"max_steps": -1, "epochs": 2, "eval_strategy": "epoch", "save_strategy": "epoch"})
    val = ["data.val_split=0.25"]
    full = run_training(load_config(make_config(tmp_path, tiny_model, tiny_chat_data, "full", **sections), val),
                        show_progress=False)
    run_dir = Path(full["run"])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-12", "checkpoint-6"]
    evals = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "eval_loss" in r]
    assert evals == [6, 12]
    path = make_config(tmp_path, tiny_model, tiny_chat_data, "split", **sections)
    run_training(load_config(path, val), callbacks=[StopAt(6)], show_progress=False)
    split = tmp_path / "runs" / "split"
    shutil.rmtree(split / "final")  # as if the process had been interrupted after the epoch's checkpoint
    (split / "summary.json").unlink()
    second = run_training(load_config(path, val), show_progress=False)
    assert second["resumed_from"].endswith("checkpoint-6")
    a, b = losses(run_dir), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def test_resume_from_another_runs_checkpoint_continues_exactly(tmp_path, tiny_model, tiny_chat_data):
    src = run_training(load_config(make_config(tmp_path, tiny_model, tiny_chat_data, "src")), show_progress=False)
    ckpt = Path(src["run"]) / "checkpoints" / "checkpoint-5"
    path = make_config(tmp_path, tiny_model, tiny_chat_data, "branch", output={"resume_from": str(ckpt)})
    branch = run_training(load_config(path), show_progress=False)
    assert branch["status"] == "complete" and branch["resumed_from"] == str(ckpt)
    a, b = losses(Path(src["run"])), losses(Path(branch["run"]))
    assert sorted(b) == list(range(6, 11))
    for step in b:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    # the same command again, or without resume_from (where the run started is not what the run is): complete,
    # nothing retrained or refused as a different config
    for overrides in ([], ["output.resume_from=null"]):
        again = run_training(load_config(path, overrides), show_progress=False)
        assert again["global_step"] == 10 and again["resumed_from"] == str(ckpt)


def test_a_run_of_two_epochs_ends_with_its_per_epoch_table(tmp_path, tiny_model, tiny_chat_data):
    lines: list[str] = []
    path = make_config(tmp_path, tiny_model, tiny_chat_data, "epochs",
                       training={"max_steps": -1, "epochs": 2, "eval_strategy": "epoch", "save_strategy": "epoch"})
    summary = run_training(load_config(path, ["data.val_split=0.25"]), echo=lines.append, show_progress=False)
    table = json.loads((Path(summary["run"]) / "epochs.json").read_text())
    assert [t["epoch"] for t in table] == [1, 2]
    done = next(i for i, line in enumerate(lines) if line.startswith("done: "))
    head, *rows = lines[done + 1:]
    assert head.split() == ["epoch", "train", "loss", "val", "loss", "duration"]
    assert len(rows) == 2
    for t, row in zip(table, rows):
        cells = row.split()
        assert int(cells[0]) == t["epoch"]
        assert float(cells[1]) == pytest.approx(t["train_loss"], abs=1e-4)
        assert float(cells[2]) == pytest.approx(t["val_loss"], abs=1e-4)
    assert table[1]["train_loss"] < table[0]["train_loss"]  # the printed figures are the run's, and it learned
    single: list[str] = []
    one = make_config(tmp_path, tiny_model, tiny_chat_data, "one", training={"max_steps": 6})  # 8 steps an epoch
    run_training(load_config(one), echo=single.append, show_progress=False)
    assert any(line.startswith("done: ") for line in single), single
    assert not any(line.split()[:3] == ["epoch", "train", "loss"] for line in single)  # one epoch: "done" says it


def test_quickstart_prints_the_time_of_each_phase(tmp_path, tiny_model, capsys):
    from argparse import Namespace

    from tunelab import quickstart

    overrides = [f"model.source={tiny_model}", f"output.dir={tmp_path / 'runs'}", "data.subset=16",
                 "training.max_steps=2", "training.precision=fp32"]
    assert quickstart.main(Namespace(config=None, overrides=overrides, eval_n=2, overwrite=False)) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("time per phase: "))
    for phase in ("1/3 score the base model", "2/3 fine-tune", "3/3 score the fine-tuned model", "total"):
        assert phase in line
    report = json.loads((tmp_path / "runs" / "quickstart" / "quickstart.json").read_text())
    assert list(report["phase_seconds"]) == ["1/3 score the base model", "2/3 fine-tune",
                                             "3/3 score the fine-tuned model"]
    assert all(v > 0 for v in report["phase_seconds"].values())
    # the same run name under other settings: refused before the base model is scored again (minutes), not after
    capsys.readouterr()
    with pytest.raises(UserError, match="exists with a different config"):
        quickstart.main(Namespace(config=None, overrides=[*overrides[:-2], "training.max_steps=3",
                                                          "training.precision=fp32"], eval_n=2, overwrite=False))
    assert "scoring the base model" not in capsys.readouterr().out


@pytest.mark.parametrize("where", ["train", "validation"])
def test_samples_longer_than_the_models_positions_are_refused_before_the_run(tmp_path, tiny_model, tiny_chat_data,
                                                                              where):
    """A GPT-2-style model (learned positions) failed the first batch holding a sample longer than its positions with
    an index error, after the run directory was written; the tiny Llama has 512 positions too: refused in one line
    that names the fix. Cut at the model's positions by data.max_length, the same data trains."""
    long = tmp_path / "long.jsonl"
    rows = [json.loads(x) for x in Path(tiny_chat_data).read_text().splitlines()]
    rows[0] = {"messages": [{"role": "user", "content": "word " * 700}, {"role": "assistant", "content": "ok"}]}
    long.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = str(long) if where == "train" else tiny_chat_data
    path = make_config(tmp_path, tiny_model, train, "long", training={"max_steps": 1})
    over = ["data.max_length=1024"] + (["data.validation=" + str(long)] if where == "validation" else [])
    cfg = load_config(path, over)
    with pytest.raises(UserError, match=r"^data.max_length: the longest training sample has 7\d\d tokens, more than "
                                        r"the 512 positions of .*; set data.max_length: 512 or less"):
        run_training(cfg, show_progress=False)
    assert not (tmp_path / "runs").exists()
    cfg = load_config(path, [*over, "data.max_length=512"])
    assert run_training(cfg, show_progress=False)["status"] == "complete"


def test_tokens_without_embedding_rows_are_refused_before_the_run(tmp_path, tiny_model, tiny_chat_data):
    """Special tokens added to the tokenizer alone (embeddings never resized) crashed the first forward pass that met
    one (an index error) after the run directory was written; refused in one line before it."""
    from transformers import AutoTokenizer

    model = tmp_path / "added"
    shutil.copytree(tiny_model, model)
    tok = AutoTokenizer.from_pretrained(model)
    rows = json.loads((model / "config.json").read_text())["vocab_size"]  # may exceed len(tok): padded rows
    tok.add_special_tokens({"additional_special_tokens": [f"<|extra_{i}|>" for i in range(len(tok), rows + 2)]})
    tok.save_pretrained(model)
    cfg = load_config(make_config(tmp_path, str(model), tiny_chat_data, "added"))
    with pytest.raises(UserError, match=rf"tokenizer has {rows + 2} tokens but the model's embeddings have {rows} "
                                        r"rows: '<\|extra_"):
        run_training(cfg, show_progress=False)
    assert not (tmp_path / "runs").exists()
