"""Distillation's report: teacher vs student on held-out rows before and after training (distill_report.md/json:
size, forward speed, held-out perplexity, KL(teacher || student))."""

from __future__ import annotations


def compare(teacher, student, rows: list[dict], temperature: float = 1.0, batch_size: int = 1) -> dict:
    """Teacher vs student on held-out rows: parameters, forward tokens/s, perplexity on the trained tokens, and the
    mean per-token KL(teacher || student) at temperature 1 (what distillation minimizes, on unseen text).

    Each batch goes through both models before the next, so one batch's logits are alive at a time (keeping every
    row's logits for the KL at the end held ~2.4 GB for 20 GSM8K rows with a 49k vocabulary). One row a batch: both
    models' logits, their log-softmaxes and the KL terms of 4 rows still came to ~2 GB at the end of a run, over the
    optimizer state, and set the run's peak."""
    import math
    import time

    import torch

    from trl.experimental.gkd import GKDTrainer

    models = {"teacher": teacher, "student": student}
    totals = {name: {"nll": 0.0, "tokens": 0, "secs": 0.0} for name in models}
    kl, count = 0.0, 0
    was_training = student.training
    student.eval()
    try:
        for b in range(0, len(rows), batch_size):
            batch = rows[b: b + batch_size]
            width = max(len(r["input_ids"]) for r in batch)
            pad = [width - len(r["input_ids"]) for r in batch]
            ids = torch.tensor([r["input_ids"] + [0] * n for r, n in zip(batch, pad)], device=student.device)
            mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * n for r, n in zip(batch, pad)],
                                device=student.device)
            lab = torch.tensor([r["labels"] + [-100] * n for r, n in zip(batch, pad)], device=student.device)[:, 1:]
            logits = {}
            for name, model in models.items():
                t0 = time.perf_counter()
                # no_grad, not inference_mode: under ZeRO-3 the student's small weights stay gathered after this
                # forward, and as inference tensors its training steps could not use them
                with torch.no_grad():
                    logits[name] = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                totals[name]["secs"] += time.perf_counter() - t0
                totals[name]["tokens"] += int(mask.sum())
                totals[name]["nll"] += float(torch.nn.functional.cross_entropy(
                    logits[name].flatten(0, 1), lab.flatten(), ignore_index=-100, reduction="sum"))
            n = int((lab != -100).sum())
            # beta=0 is KL(teacher || student) per trained token: the method's forward_kl loss at temperature 1
            kl += float(GKDTrainer.generalized_jsd_loss(logits["student"], logits["teacher"], labels=lab,
                                                        beta=0.0, temperature=1.0)) * n
            count += n
            del logits
    finally:
        student.train(was_training)

    def stats(name):
        t = totals[name]
        return {"params_m": round(sum(p.numel() for p in models[name].parameters()) / 1e6, 2),
                "tokens_per_s": round(t["tokens"] / max(t["secs"], 1e-9), 1),
                "perplexity": round(math.exp(t["nll"] / max(count, 1)), 3)}

    return {"teacher": stats("teacher"), "student": stats("student"),
            "kl_teacher_student": round(kl / max(count, 1), 4), "held_out_rows": len(rows)}


def report_callback(teacher, rows):
    """Compares teacher and student on held-out rows before and after training; writes distill_report.md/json."""
    from pathlib import Path

    from transformers import TrainerCallback

    from tunelab.rundir import write_json_atomic, write_text_atomic

    class Report(TrainerCallback):
        before = None

        def on_train_begin(self, args, state, control, model=None, **kw):
            if state.global_step == 0:  # not when resuming: the student has trained already
                self.before = compare(teacher, model, rows)

        def on_train_end(self, args, state, control, model=None, **kw):
            after = compare(teacher, model, rows)  # on every process: under ZeRO-3 the student's forward is collective
            if not state.is_world_process_zero:  # one process writes
                return
            run_dir = Path(args.output_dir).parent  # output_dir is the run's staging directory
            write_json_atomic(run_dir / "distill_report.json", {"before": self.before, "after": after})
            t, s = after["teacher"], after["student"]
            kl_before = self.before["kl_teacher_student"] if self.before else "n/a"
            lines = ["# Distillation report", "", f"Held-out rows: {after['held_out_rows']}", "",
                     "| | parameters (M) | forward tokens/s | held-out perplexity |", "|---|---|---|---|",
                     f"| teacher | {t['params_m']} | {t['tokens_per_s']} | {t['perplexity']} |",
                     f"| student | {s['params_m']} | {s['tokens_per_s']} | {s['perplexity']} |", "",
                     f"KL(teacher || student) per token: {kl_before} before training -> "
                     f"{after['kl_teacher_student']} after"]
            if self.before:
                lines.append(f"Student perplexity before training: {self.before['student']['perplexity']}")
            write_text_atomic(run_dir / "distill_report.md", "\n".join(lines) + "\n")

    return Report()
