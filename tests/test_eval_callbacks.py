"""Evaluation during training with a plain transformers Trainer on the tiny model: early stopping on eval_loss and on
the GSM8K task metric, best checkpoint restored, overfitting warning, per-epoch table and loss plots."""

import json
from pathlib import Path

import pytest

from tunelab.evaluation import callbacks as cb
from tunelab.evaluation.report import epoch_table, plot_losses

TRAIN = [("What is 2+2?", "2+2 = 4.\n#### 4"), ("What is 3+5?", "3+5 = 8.\n#### 8"),
         ("Say hi.", "Hi there!"), ("Name a color.", "Blue.")]
VAL = [("Who wrote Hamlet?", "William Shakespeare wrote it around 1600."),
       ("Describe the sea.", "The ocean is vast, deep and salty, full of fish and whales."),
       ("What is rain?", "Water falling from clouds in drops.")]


def _rows(tok, pairs, repeat):
    from tunelab.data.render import encode_conversation

    out = []
    for i in range(repeat * len(pairs)):
        q, a = pairs[i % len(pairs)]
        enc = encode_conversation(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        out.append({"input_ids": enc.input_ids, "labels": enc.labels})
    return out


def _trainer(tiny_model, out_dir, *, callbacks, max_steps, eval_steps, lr, **extra):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=8, per_device_eval_batch_size=8,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        eval_strategy="steps", eval_steps=eval_steps, save_strategy="steps", save_steps=eval_steps,
        logging_steps=1, load_best_model_at_end=True, report_to="none", use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, save_only_model=True, **extra)
    return Trainer(model=model, args=args, train_dataset=_rows(tok, TRAIN, 8), eval_dataset=_rows(tok, VAL, 1),
                   data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
                   processing_class=tok, callbacks=callbacks)


def _expected_stop(values, patience, greater_is_better=False):
    """Index of the evaluation at which transformers' EarlyStoppingCallback stops (None: never)."""
    best, bad = None, 0
    for i, v in enumerate(values):
        if best is None or (v > best if greater_is_better else v < best):
            bad = 0
        else:
            bad += 1
            if bad >= patience:
                return i
        best = v if best is None or (v > best if greater_is_better else v < best) else best
    return None


def test_early_stopping_on_eval_loss_restores_best_checkpoint(tiny_model, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import EarlyStoppingCallback

    warnings = []
    table = cb.EpochTable(tmp_path)
    overfit = cb.OverfittingWarning(patience=2, notify=warnings.append)
    trainer = _trainer(tiny_model, tmp_path, max_steps=80, eval_steps=4, lr=1e-2,
                       callbacks=[overfit, table, EarlyStoppingCallback(early_stopping_patience=3)],
                       metric_for_best_model="eval_loss", greater_is_better=False)
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h and "train_runtime" not in h]
    losses = [h["eval_loss"] for h in evals]
    stop = _expected_stop(losses, patience=3)
    assert stop is not None, f"the tiny run did not overfit: {losses}"
    assert len(evals) == stop + 1  # it stopped at exactly that evaluation
    assert trainer.state.global_step == evals[stop]["step"] < 80
    best_i = min(range(len(losses)), key=losses.__getitem__)
    best_step = evals[best_i]["step"]
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    saved = load_file(str(Path(trainer.state.best_model_checkpoint) / "model.safetensors"))
    current = trainer.model.state_dict()
    for name, t in saved.items():
        assert torch.equal(current[name].cpu(), t), name
    assert trainer.evaluate()["eval_loss"] == pytest.approx(losses[best_i], rel=1e-4)
    # validation loss rose while the training loss fell: the overfitting warning fired once for that streak
    assert warnings and "overfitting" in warnings[0]
    rows = json.loads((tmp_path / "epochs.json").read_text())
    assert rows == table.rows and rows[0]["epoch"] == 1 and rows[0]["train_loss"] is not None


def test_task_metric_drives_early_stopping(tiny_model, tmp_path):
    from transformers import EarlyStoppingCallback, TrainerCallback

    class Seen(TrainerCallback):  # stands for the metrics.jsonl writer that comes after the task metric
        logs = []

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "eval_loss" in logs:
                self.logs.append(dict(logs))

    rows = [{"question": "What is 2+2?", "answer": "#### 987654"}, {"question": "Say a number.", "answer": "#### 13579"}]
    task = cb.TaskMetricCallback(rows, max_new_tokens=4, batch_size=2)
    trainer = _trainer(tiny_model, tmp_path, max_steps=40, eval_steps=2, lr=1e-3,
                       callbacks=[task, Seen(), EarlyStoppingCallback(early_stopping_patience=1)],
                       metric_for_best_model="eval_gsm8k_accuracy", greater_is_better=True)
    trainer.train()
    # accuracy stays 0.0: the first evaluation sets the best, the second does not beat it, patience 1 stops there
    assert trainer.state.global_step == 4
    assert [h["step"] for h in task.history] == [2, 4]
    assert all(h["accuracy"] == 0.0 for h in task.history)
    assert all("eval_gsm8k_accuracy" in x and "eval_gsm8k_format_rate" in x for x in Seen.logs)
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert all(h["eval_gsm8k_accuracy"] == 0.0 for h in evals)
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")


def test_overfitting_warning_logic():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    got = []
    w = cb.OverfittingWarning(patience=2, notify=got.append)
    state = TrainerState()
    args = TrainingArguments(output_dir="/tmp/unused", report_to="none")
    # (train loss logged before the eval, val loss): val falls, then rises twice while train falls, then rises on
    series = [(2.0, 1.5), (1.5, 1.2), (1.0, 1.3), (0.8, 1.4), (0.6, 1.5), (0.5, 1.1), (0.4, 1.2), (0.3, 1.3)]
    for i, (tr, va) in enumerate(series, 1):
        state.global_step = i * 10
        state.log_history.append({"loss": tr, "step": state.global_step})
        w.on_evaluate(args, state, TrainerControl(), metrics={"eval_loss": va})
    # warned once for the streak ending at step 40 (not again at 50: same streak), and again for the new streak at 80
    assert len(got) == 2
    assert "step 20" in got[0] and "step 40" in got[0]
    assert "step 60" in got[1] and "step 80" in got[1]


def test_epoch_table_and_plots_from_metrics(tmp_path):
    lines = [{"step": 1, "epoch": 0.5, "loss": 2.0, "elapsed": 1.0}, {"step": 2, "epoch": 1.0, "loss": 1.0, "elapsed": 2.0},
             {"step": 2, "epoch": 1.0, "eval_loss": 1.5, "elapsed": 2.5},
             {"step": 3, "epoch": 1.5, "loss": 0.8, "elapsed": 3.5}, {"step": 4, "epoch": 2.0, "loss": 0.6, "elapsed": 4.0},
             {"step": 4, "epoch": 2.0, "eval_loss": 1.4, "elapsed": 4.6}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken")
    table = epoch_table(lines)
    assert table == [{"epoch": 1, "train_loss": 1.5, "val_loss": 1.5, "duration_s": 2.5},
                     {"epoch": 2, "train_loss": pytest.approx(0.7), "val_loss": 1.4, "duration_s": 2.1}]
    written = plot_losses(tmp_path)
    assert [p.name for p in written] == ["loss.png", "loss_epoch.png"]
    assert all(p.stat().st_size > 1000 for p in written)
    assert plot_losses(tmp_path / "missing") == []


def test_training_callbacks_and_best_model_args(tmp_path):
    from transformers import EarlyStoppingCallback

    from tunelab.evaluation.selection import best_model_args

    before, after = cb.training_callbacks(tmp_path, task_rows=[{"question": "q", "answer": "#### 1"}],
                                          early_stopping_patience=2, early_stopping_min_delta=0.01)
    assert [type(c) for c in before] == [cb.TaskMetricCallback]
    assert [type(c) for c in after] == [cb.OverfittingWarning, cb.EpochTable, cb.PlotLosses, EarlyStoppingCallback]
    assert after[-1].early_stopping_threshold == 0.01
    assert best_model_args("loss") == {"load_best_model_at_end": True, "metric_for_best_model": "eval_loss",
                                       "greater_is_better": False}
    assert best_model_args("eval_gsm8k_accuracy")["greater_is_better"] is True
    assert best_model_args("eval_loss", "max")["greater_is_better"] is True
