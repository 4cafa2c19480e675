"""`tunelab train`: config -> data -> model -> pre-flight -> method's trainer -> run directory.

The flow is the same for every method; a method only builds its trainer (methods/<name>.py). Loading, pre-flight,
checkpointing, resume, logging, plots and saving happen here and in runs.py, once.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunelab import autoplan, distributed, estimate, tracking
from tunelab.adapters import ADAPTERS
from tunelab.config import RunConfig
from tunelab.errors import UserError, suggest


@dataclass
class TrainData:
    train: list[dict]
    validation: list[dict]
    stats: dict = field(default_factory=dict)


def training_arguments(cfg: RunConfig, run: runs.Run, precision: str) -> dict:
    """TrainingArguments shared by every method (each method adds its own TRL config fields)."""
    import torch

    t = cfg.training
    strategy = cfg.eval_schedule()
    # Settings a method (or a plugin method) may set in its own TRL config too: passed only when the config moves
    # them off TrainingArguments' defaults, so a method that sets one keeps working until the user sets it as well
    optional = {k: v for k, v, default in (
        ("lr_scheduler_kwargs", dict(t.scheduler_kwargs), {}), ("adam_beta1", t.adam_beta1, 0.9),
        ("adam_beta2", t.adam_beta2, 0.999), ("adam_epsilon", t.adam_epsilon, 1e-8),
        ("label_smoothing_factor", t.label_smoothing, 0.0), ("torch_compile", t.torch_compile, False)) if v != default}
    return dict(
        **optional,
        output_dir=str(run.staging),  # checkpoints are staged here and renamed into checkpoints/ when complete
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_steps if t.warmup_steps else t.warmup_ratio,
        weight_decay=t.weight_decay,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        optim=t.optimizer,
        max_grad_norm=t.max_grad_norm,
        gradient_checkpointing=t.gradient_checkpointing,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy=strategy,
        eval_steps=t.eval_steps if strategy == "steps" else None,
        save_strategy=t.save_strategy,
        save_steps=t.save_steps,
        save_total_limit=None,  # rotation happens after the atomic rename (runs.AtomicCheckpoints)
        seed=t.seed,
        data_seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        report_to=tracking.report_to_argument(t.report_to),  # tensorboard: tracking.callbacks
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,  # runs.MetricsLog shows progress with tokens/s
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),  # bf16 autocast on CPU is allowed only when asked for explicitly
        **distributed.training_arguments(cfg.distributed),  # FSDP / DeepSpeed when several processes run
    )


def prepare_data(cfg: RunConfig, kind: str, tokenizer) -> TrainData:
    """The rows of the kind of data the method declares (tunelab.data.build prepares each kind)."""
    from tunelab.data import build

    train, val, stats = build.prepare(kind, cfg.data, tokenizer)
    return TrainData(train, val, stats)


def evaluation_settings(cfg: RunConfig) -> dict:
    """TrainingArguments for evaluation during training: schedule, best checkpoint, checked before anything loads."""
    from tunelab.evaluation.selection import best_model_args

    t, e = cfg.training, cfg.eval
    has_val = bool(cfg.data.validation or cfg.data.val_split)
    if t.eval_strategy == "no" and t.eval_steps:
        raise UserError("training.eval_steps is set but training.eval_strategy is 'no'; remove one of them")
    if not has_val:
        if t.eval_steps or t.eval_strategy == "epoch" or e.task or e.early_stopping_patience:
            raise UserError("evaluation during training needs validation data: set data.val_split (e.g. 0.1) or "
                            "data.validation")
        return {}
    if cfg.eval_schedule() == "no":
        if e.task or e.early_stopping_patience:
            raise UserError("eval.task / eval.early_stopping_patience need evaluations: set training.eval_steps "
                            "(every N steps) or training.eval_strategy=epoch")
        return {}
    keeps_best = e.load_best or e.early_stopping_patience
    if keeps_best and t.eval_strategy != t.save_strategy:
        # the Trainer can only pick the best checkpoint when every evaluation has a checkpoint beside it
        raise UserError(f"training.eval_strategy ({t.eval_strategy}) and training.save_strategy ({t.save_strategy}) "
                        f"must match to keep the best checkpoint; set training.save_strategy={t.eval_strategy} "
                        "(or eval.load_best=false)")
    if keeps_best and t.eval_strategy == "steps" and t.save_steps % t.eval_steps:
        raise UserError(f"training.save_steps ({t.save_steps}) must be a multiple of training.eval_steps "
                        f"({t.eval_steps}) to keep the best checkpoint; e.g. set training.save_steps={t.eval_steps}")
    if not (e.load_best or e.early_stopping_patience):
        return {}
    check_metric(cfg)
    args = best_model_args(e.metric, None if e.direction == "auto" else e.direction)
    if ADAPTERS[cfg.adapter.type].prompt_learning:
        # A prompt-learning checkpoint holds the computed virtual tokens, not the trainable encoder (prefix
        # projection, P-tuning's MLP), so transformers cannot load it back into the training model (it raises at the
        # end of the run). The best checkpoint is still tracked; final/ is copied from it (_save_final).
        args["load_best_model_at_end"] = False
    return args


def reported_metrics(cfg: RunConfig) -> list[str]:
    """What the run's evaluation during training reports (Method.eval_metrics, and the task's metrics, which join an
    evaluation that logs a loss); the first is what the method is judged by."""
    from tunelab import methods
    from tunelab.evaluation.selection import TASK_METRICS

    method, opts = methods.options(cfg)
    reported = list(method.eval_metrics(opts))
    if cfg.eval.task and any(m.endswith("loss") for m in reported):  # the task joins an entry with a loss (on_log)
        reported += [f"eval_{cfg.eval.task}_{m}" for m in TASK_METRICS]
    return reported


def unreported(cfg: RunConfig, metric: str, reported: list[str] | None = None) -> str | None:
    """None when the run's evaluation reports `metric` (eval_ prefix optional); else why not, in a phrase.
    `reported`: reported_metrics(cfg), when the caller has it."""
    from tunelab.evaluation.selection import eval_name

    reported = reported_metrics(cfg) if reported is None else reported
    metric = eval_name(metric)
    if any(metric.startswith(m) and len(metric) > len(m) if m.endswith("/") else metric == m for m in reported):
        return None
    names = [m + "*" if m.endswith("/") else m for m in reported]  # a family: eval_rewards/ -> eval_rewards/*
    task = "" if cfg.eval.task or not metric.startswith("eval_gsm8k_") else "; it needs eval.task=gsm8k"
    return (f"is not reported by method '{cfg.method.name}' here{suggest(metric, names)}{task}; its evaluation "
            f"reports {', '.join(names)}")


def check_metric(cfg: RunConfig) -> None:
    """eval.metric names something the run's evaluation reports: otherwise the Trainer finds out at the first
    evaluation, after the run directory is written and a checkpoint interval has been trained; and, with
    eval.direction auto, that its name says which side is better."""
    from tunelab.evaluation.selection import NO_SIDE, natural_direction

    reported = reported_metrics(cfg)
    why = unreported(cfg, cfg.eval.metric, reported)
    if why:
        raise UserError(f"eval.metric '{cfg.eval.metric}' {why}: set eval.metric to one of them (e.g. eval.metric="
                        f"{reported[0]}), or eval.load_best=false without early stopping")
    if cfg.eval.direction == "auto" and natural_direction(cfg.eval.metric) is None:
        raise UserError(f"eval.metric '{cfg.eval.metric}' {NO_SIDE}: set eval.direction=min or "
                        "eval.direction=max")


def task_rows(cfg: RunConfig) -> list | None:
    """The held-out questions of eval.task, read and checked before the run directory is written."""
    if not (cfg.eval.task and cfg.eval_schedule() != "no"):
        return None
    from tunelab.evaluation.gsm8k import read_questions

    return read_questions(cfg.eval.task_data, cfg.eval.task_samples, key="eval.task_data")


def evaluation_callbacks(cfg: RunConfig, run: runs.Run, tokenizer, task_rows: list | None) -> tuple[list, list]:
    from tunelab.evaluation.callbacks import training_callbacks

    return training_callbacks(run.dir, task_rows=task_rows, tokenizer=tokenizer,
                              task_max_new_tokens=cfg.eval.task_max_new_tokens,
                              early_stopping_patience=cfg.eval.early_stopping_patience,
                              early_stopping_min_delta=cfg.eval.early_stopping_min_delta,
                              overfitting_patience=cfg.eval.overfitting_patience)


def preflight(cfg: RunConfig, tokenizer, model, data: TrainData, echo=print) -> None:
    """Render the first sample, show what is trained, and refuse runs that cannot learn to answer or to stop."""
    from tunelab.data.render import IGNORE, end_of_turn_ids, show_mask

    first = data.train[0]
    from tunelab.data.render import Encoded

    if data.stats.get("template"):
        echo(f"pre-flight: chat template: {data.stats['template']}")
    echo("pre-flight: first training sample as the model sees it ([[trained]] tokens in double brackets):")
    echo(show_mask(tokenizer, Encoded(first["input_ids"], first["labels"])))
    trained = sum(sum(1 for x in r["labels"] if x != IGNORE) for r in data.train)
    total = sum(len(r["input_ids"]) for r in data.train)
    if trained == 0:
        raise UserError("pre-flight: no token is trained (every label is masked); check that the data has "
                        "assistant replies and that data.max_length does not cut them off")
    eot = end_of_turn_ids(tokenizer, model)
    if not any(x in eot for r in data.train for x in r["labels"]):
        names = ", ".join(repr(tokenizer.convert_ids_to_tokens(i)) for i in sorted(eot))
        raise UserError(f"pre-flight: the end-of-turn token ({names}) is never trained, so the model would never "
                        "learn to stop; use a chat template that ends assistant turns with it (model.chat_template)")
    s = data.stats
    echo(f"pre-flight: {len(data.train)} training samples ({s.get('truncated', 0)} truncated, "
         f"{s.get('dropped', 0)} dropped), {len(data.validation)} validation; {trained}/{total} tokens trained "
         f"({100 * trained / max(total, 1):.0f}%); end-of-turn token trained: yes")


def _save_final(trainer, tokenizer, run: runs.Run, merge_adapter: bool = False,
                adapter_from: Path | None = None) -> Path:
    """Write final/ atomically: the trained model, or (adapter_from) the adapter files of a checkpoint. With several
    processes every one calls the Trainer's save (a sharded state is gathered there); rank 0 writes the files."""
    from tunelab.methods.standalone import standalone_model

    final, tmp = run.dir / "final", run.dir / ".final.tmp"
    main = distributed.is_main()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier()
    if adapter_from is not None:
        if main:
            tmp.mkdir(parents=True)
            for f in Path(adapter_from).glob("adapter_*"):
                shutil.copy2(f, tmp / f.name)
    elif merge_adapter and hasattr(trainer.model, "merge_and_unload"):
        if main:  # a standalone model, loadable without PEFT (over a 4-bit base: merged into its de-quantized weights)
            standalone_model(trainer.model).save_pretrained(str(tmp))
    else:
        trainer.save_model(str(tmp))
    if main:
        tokenizer.save_pretrained(str(tmp))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    distributed.barrier()
    return final


def check_run_config(cfg: RunConfig, nproc: int | None = None) -> tuple:
    """The refusals that need the config alone (keys and values, method/adapter pair, evaluation schedule, tracker,
    distributed strategy for `nproc` processes): (method, its options, evaluation TrainingArguments).

    They import no transformers or PEFT (seconds; torch only to ask whether FSDP has accelerators), so a refused run
    answers at once; and they all come before the run directory is touched, or before `--nproc` starts any process."""
    from tunelab import methods
    from tunelab.checks import check_config

    check_config(cfg)  # a RunConfig built in code has not been checked against the method table and data layer
    method, opts = methods.options(cfg)
    eval_args = evaluation_settings(cfg)
    tracking.check(cfg.training.report_to)
    distributed.check(cfg, method, nproc=nproc)
    return method, opts, eval_args


def run_training(cfg: RunConfig, overwrite: bool = False, callbacks=(), echo=print, show_progress=True,
                 quiet: bool = False) -> dict:
    """Train per `cfg` into its run directory; returns the summary. Python entry point behind `tunelab train`.
    quiet: silence the libraries' progress bars and advisory warnings (quiet_libraries), as the CLI does."""
    from tunelab.checks import check_training

    method, opts, eval_args = check_run_config(cfg)
    if quiet:
        quiet_libraries()
    check_training(cfg)  # optimizer, scheduler, attention: checked against transformers' own tables

    from tunelab import runs

    echo = distributed.quiet_unless_main(echo)  # several processes: rank 0 prints and writes
    if distributed.unused_strategy(cfg.distributed):
        echo(distributed.unused_strategy(cfg.distributed))
    run = runs.open_run(cfg, overwrite=overwrite)
    with run.lock:  # released when training ends, however it ends
        with distributed.main_first():  # rank 0 locks; a run in use stops every process with its one line
            run.claim()
        return _train(cfg, run, method, opts, eval_args, callbacks, echo, show_progress)


def _train(cfg: RunConfig, run: runs.Run, method, opts, eval_args: dict, callbacks, echo, show_progress) -> dict:
    """run_training's work once the run directory is decided on and locked."""
    import torch
    from transformers import PrinterCallback, set_seed

    from tunelab import models, runs
    from tunelab.checks import check_arguments, check_target_modules, resume_point
    from tunelab.data.build import check_end_of_turn

    if run.complete:
        echo(f"run {run.dir} is already complete (final model in {run.dir / 'final'}); --overwrite retrains it")
        return json.loads((run.dir / "summary.json").read_text())
    started_from = resume_point(cfg, run)  # output.resume_from, while the run has no checkpoint of its own
    precision = models.resolve_precision(cfg.training.precision)
    set_seed(cfg.training.seed)

    tokenizer = models.load_tokenizer(cfg.model.source, cfg.model.revision, cfg.model.trust_remote_code,
                                      cfg.model.chat_template)
    with distributed.main_first():  # rank 0 fills the tokenized-data cache, the others read it
        data = prepare_data(cfg, method.data, tokenizer)
    if not data.validation and cfg.eval_schedule() != "no":
        where = f"data.validation ({cfg.data.validation})" if cfg.data.validation else "data.val_split"
        raise UserError(f"{where}: no validation sample is left after filtering (over-long or unanswered rows "
                        "dropped); raise data.max_length, use data.overlong=truncate, or give other validation data")
    method.check(cfg, opts, data)  # the method's own refusals, before the model loads or the run dir is written
    questions = task_rows(cfg)
    # rows data.on_invalid=skip left out, then samples whose end of turn max_length cut off: said before any step
    for warning in (data.stats.get("invalid_summary"),
                    check_end_of_turn(data.stats, cfg.data.max_length, cfg.data.allow_truncated_eos)):
        if warning:
            echo(f"warning: {warning}")
    # `auto` settings (gradient checkpointing, SFT's loss) chosen for this machine's free memory; the run directory
    # keeps the user's config, the run uses run_cfg
    # the token lengths the memory plan and the estimate count (every kind of data, tokenized here if TRL tokenizes)
    stats = estimate.token_stats(cfg, method.data, data.train, tokenizer)
    run_cfg, opts, plan = autoplan.resolve(cfg, method, opts, stats, echo)
    # before the weights load; compared with the peak in summary.json
    est = estimate.for_run(run_cfg, stats, echo, lean_loss=plan.lean_loss)
    model = models.load_model(cfg, precision=precision, task=method.task, float32_base=method.float32_base)
    models.check_vocabulary(tokenizer, model)
    longest = max([stats.get("max_tokens", 0), *(len(r["input_ids"]) for r in data.validation or []
                                                  if "input_ids" in r)])
    models.check_context(cfg, longest, model)
    model = method.prepare_model(cfg, opts, model)  # e.g. distill: a smaller student
    # models a method needs besides the trained one (distill: the teacher), passed to build() by keyword
    extra = method.extra_models(cfg, opts, precision)
    if method.data == "conversation":
        preflight(cfg, tokenizer, model, data, echo)
    check_target_modules(cfg, model)
    model = models.attach_adapter(model, run_cfg, run_cfg.training.gradient_checkpointing, tokenizer,
                                  task=method.task)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    echo(f"model: {cfg.model.source} ({total / 1e6:.1f}M params, {trainable / 1e6:.2f}M trainable), "
         f"adapter: {cfg.adapter.type}, quantization: {cfg.quantization.bits or 'none'}, precision: {precision}")

    args = {**training_arguments(run_cfg, run, precision), **eval_args}
    check_arguments(args)
    # trackers (tensorboard / wandb / mlflow) write offline into the run directory, not into .staging/
    with tracking.environment(cfg, run.dir, same_run=not run.overwrite):
        # the trainer is built before the run directory is written, so a mistake it finds leaves nothing on disk
        new_dir = not run.dir.exists()
        try:
            trainer = method.build(run_cfg, opts, model, tokenizer, data, args, **extra)
        except BaseException:
            if new_dir and distributed.is_main():  # the Trainer creates its output_dir (.staging/) when built
                shutil.rmtree(run.dir, ignore_errors=True)
            raise
        distributed.barrier()  # every process has looked at the run directory (open_run) before rank 0 writes it
        with distributed.main_first():  # a refusal while rank 0 writes it stops every process with its one line
            if distributed.is_main():
                runs.start_run(run, cfg)  # every check has passed: only now is the run directory written
            else:
                run.config_text = cfg.to_yaml()
        if started_from is not None:
            run.resume_from = started_from
        trainer.remove_callback(PrinterCallback)  # metrics go to metrics.jsonl and the progress line instead
        stop = runs.GracefulStop(every=method.resume_interval(opts))
        # order matters: the task metric joins an evaluation's log entry before MetricsLog writes it to metrics.jsonl
        before, after = evaluation_callbacks(cfg, run, tokenizer, questions)
        checkpoints = runs.AtomicCheckpoints(run, cfg.training.save_total_limit,
                                             trainable_weights=ADAPTERS[cfg.adapter.type].prompt_learning)
        for cb in (*tracking.callbacks(cfg.training.report_to, run.dir, run.resume_from, main=distributed.is_main()),
                   checkpoints, runs.EpochSeededLengthGroups(), stop, *before,
                   *([runs.MetricsLog(run, show_progress=show_progress), *after] if distributed.is_main() else []),
                   *callbacks):
            trainer.add_callback(cb)
        if run.notice:
            echo(run.notice)
        # earlier parts' training time: the run clock of the log, which start_run cut at the checkpoint
        seconds_before = (runs.train_seconds(runs.read_metrics(run.dir)) or 0.0) if run.resume_from else 0.0
        t0 = time.time()
        result = None
        if runs.training_finished(run.resume_from):
            # stopped or killed after the last step's checkpoint: the Trainer would train a step past the end from
            # it, so it is loaded as it stands and only final/ and the summary are written
            echo(f"{run.resume_from} holds the last step: writing the final model from it")
            runs.load_finished_checkpoint(trainer, run)
        else:
            if run.resume_from:
                echo(f"resuming from {run.resume_from}")
            result = trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
        elapsed = time.time() - t0

    rows = runs.read_metrics(run.dir)
    train_loss = runs.train_loss(rows)  # the whole run's, every resumed part (the Trainer's: since the last resume)
    seconds = seconds_before + elapsed  # likewise: train() wall time summed over the parts
    summary = {
        "run": str(run.dir), "method": cfg.method.name, "base_model": cfg.model.source,
        "adapter": cfg.adapter.type, "quantization": cfg.quantization.bits, "precision": precision,
        "global_step": trainer.state.global_step, "epoch": trainer.state.epoch,
        "train_loss": result.training_loss if train_loss is None and result else train_loss,
        "tokens": trainer.state.num_input_tokens_seen,
        "tokens_per_s": round((trainer.state.num_input_tokens_seen or 0) / max(seconds, 1e-9), 2),
        "train_seconds": round(seconds, 2), "peak_memory_mb": round(runs.peak_memory_mb(), 1),
        "trainable_params": trainable, "total_params": total, "data": data.stats,
        "resumed_from": str(run.resume_from) if run.resume_from else None,
        "memory_plan": {"gradient_checkpointing": plan.gradient_checkpointing, "lean_loss": plan.lean_loss,
                        "activation_offloading": plan.activation_offloading, "reason": plan.reason},
    }
    if est is not None:
        summary["memory_estimate"] = {**est.to_dict(), "measured_peak_mb": summary["peak_memory_mb"],
                                      "measured_over_estimate": round(summary["peak_memory_mb"] / est.total_mb, 3),
                                      "measured_over_run_peak": round(summary["peak_memory_mb"] / est.run_peak_mb, 3)}
    losses = [r["loss"] for r in rows if "loss" in r]
    if losses:
        summary["first_loss"], summary["last_loss"] = losses[0], losses[-1]
    if stop.requested and trainer.state.global_step < trainer.state.max_steps:  # at the last step: it is done
        summary["status"] = "interrupted"
        if distributed.is_main():
            runs.write_json_atomic(run.dir / "summary.json", summary)
        echo(f"stopped at step {trainer.state.global_step}; checkpoint saved. Re-run the same command to resume.")
        return summary
    # a method whose artifact is read by plain transformers (reward: AutoModelForSequenceClassification) merges it
    best = trainer.state.best_model_checkpoint if eval_args.get("metric_for_best_model") else None
    final = _save_final(trainer, tokenizer, run, merge_adapter=method.merges_final(opts),
                        adapter_from=best if best and ADAPTERS[cfg.adapter.type].prompt_learning else None)
    summary["status"] = "complete"
    if best:
        summary["best_checkpoint"] = best
        summary["best_metric"] = {eval_args["metric_for_best_model"]: trainer.state.best_metric}
    summary["final"] = str(final)
    if distributed.is_main():
        runs.write_json_atomic(run.dir / "summary.json", summary)
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    echo(f"done: {final} (loss {summary.get('first_loss', float('nan')):.4f} -> "
         f"{summary.get('last_loss', float('nan')):.4f}, {summary['tokens_per_s']:.0f} tokens/s)")
    if distributed.is_main():
        for line in epoch_lines(run.dir):
            echo(line)
    return summary


def epoch_lines(run_dir) -> list[str]:
    """The per-epoch table (train loss, validation loss, duration) as printed at the end of a run of more than one
    epoch; [] for a single epoch, whose figures the "done" line already gives."""
    from tunelab.evaluation.report import fmt, format_duration, load_epoch_table

    table = load_epoch_table(run_dir)
    if len(table) < 2:
        return []
    rows = [(str(t["epoch"]), fmt(t.get("train_loss")), fmt(t.get("val_loss")), format_duration(t.get("duration_s")))
            for t in table]
    head = ("epoch", "train loss", "val loss", "duration")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    return ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head, *rows]]


def quiet_libraries() -> None:
    """Library progress bars and advisory warnings drown the pre-flight and progress output of a CLI run."""
    import warnings

    import datasets
    import transformers

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def main(args) -> int:
    from tunelab.checks import check_training
    from tunelab.config import read_config

    cfg = read_config(args.config, args.overrides)  # run_training checks it against the method table and data layer
    if args.nproc > 1 and distributed.world_size() == 1:  # start the processes; each runs this command again
        # a config mistake or a strategy that cannot run here: one line before any process starts, not one per rank
        check_run_config(cfg, nproc=args.nproc)
        check_training(cfg)
        argv = ["train", args.config, *args.overrides, *(["--overwrite"] if args.overwrite else [])]
        return distributed.launch(argv, args.nproc)
    distributed.exit_with_launcher()
    summary = run_training(cfg, overwrite=args.overwrite, quiet=True)
    return 0 if summary.get("status") in ("complete", "interrupted") else 1
