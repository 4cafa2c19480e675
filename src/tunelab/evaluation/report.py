"""Reports: metric tables and per-example side by side (report.md + report.html), per-epoch tables and loss plots.

A report describes one or more evaluated models ("base" and "run", or two runs) on one or more tasks. Written into a run
directory, it also carries what training recorded there: the per-epoch table and the loss plots. Markdown is for
reading in a terminal or on GitHub; the HTML file is the same content, self-contained, for a browser.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

# the run directory's one reader of metrics.jsonl (a cut-off last line dropped) and its atomic writer
from tunelab.rundir import read_json, read_metrics, write_text_atomic  # noqa: F401 (read_metrics: report's API too)

# metric keys shown per task, in order, and whether higher is better
METRICS = {
    "gsm8k": [("accuracy", True), ("format_rate", True)],
    "summarization": [("rouge1", True), ("rouge2", True), ("rougeL", True)],
    "perplexity": [("loss", False), ("perplexity", False)],
    "prompts": [],
}
MAX_EXAMPLES = 50  # per task in a report; the JSON next to it keeps them all
MAX_OUTPUT_CHARS = 2000


def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def format_duration(seconds) -> str:
    """Seconds as people read them: 42s, 5m 35s, 2h 03m (a duration printed as 334.5800 says neither unit nor size)."""
    if seconds is None:
        return "–"
    s = int(round(float(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


# ---------------------------------------------------------------------------------------------- training records

def _epoch_index(epoch: float) -> int:
    """Epoch 0.25 and 1.0 belong to epoch 1, 1.5 to epoch 2 (the Trainer logs fractional epochs)."""
    return max(1, math.ceil(round(epoch, 6)))


def epoch_table(rows: list[dict]) -> list[dict]:
    """Per-epoch rows {epoch, train_loss (mean of logged losses), val_loss (last evaluation), duration_s} from
    metrics.jsonl records (which carry step, epoch, loss / eval_loss and elapsed seconds)."""
    groups: dict[int, dict] = {}
    for r in rows:
        if "epoch" not in r:
            continue
        g = groups.setdefault(_epoch_index(r["epoch"]), {"losses": [], "val": None, "end": None})
        if "loss" in r:
            g["losses"].append(r["loss"])
        if "eval_loss" in r:
            g["val"] = r["eval_loss"]
        if "elapsed" in r:
            g["end"] = max(g["end"] or 0.0, r["elapsed"])
    table, prev_end = [], 0.0
    for e in sorted(groups):
        g = groups[e]
        duration = None if g["end"] is None else round(g["end"] - prev_end, 2)
        prev_end = g["end"] if g["end"] is not None else prev_end
        table.append({"epoch": e, "train_loss": sum(g["losses"]) / len(g["losses"]) if g["losses"] else None,
                      "val_loss": g["val"], "duration_s": duration})
    return table


def load_epoch_table(run_dir) -> list[dict]:
    """The run's per-epoch table: epochs.json written during training, else computed from metrics.jsonl."""
    rows = read_json(Path(run_dir) / "epochs.json")
    return rows if isinstance(rows, list) else epoch_table(read_metrics(run_dir))


def _plot(path: Path, series: list[tuple[list, str | None, str]], xlabel: str, title: str, xticks=None) -> Path:
    """One line chart of loss curves: series are (points, marker, label); empty series are left out."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for points, marker, label in series:
        if points:
            ax.plot(*zip(*points), marker=marker, label=label)
    ax.set(xlabel=xlabel, ylabel="loss", title=title)
    if xticks is not None:
        ax.set_xticks(xticks)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_losses(run_dir) -> list[Path]:
    """loss.png (train and validation loss against step) and loss_epoch.png (per-epoch averages) from metrics.jsonl.

    Returns the files written (none when nothing was logged yet).
    """
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
    val = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r and "step" in r]
    written = []
    if train or val:
        written.append(_plot(run_dir / "loss.png", [(train, None, "train loss"), (val, "o", "validation loss")],
                             "step", run_dir.name))
    table = epoch_table(rows)
    if table:
        tr = [(t["epoch"], t["train_loss"]) for t in table if t["train_loss"] is not None]
        va = [(t["epoch"], t["val_loss"]) for t in table if t["val_loss"] is not None]
        written.append(_plot(run_dir / "loss_epoch.png", [(tr, "o", "train loss (epoch mean)"),
                                                          (va, "s", "validation loss (end of epoch)")],
                             "epoch", f"{run_dir.name}: per epoch", xticks=[t["epoch"] for t in table]))
    return written


# ------------------------------------------------------------------------------------------------- metric tables

def task_metrics(task: str, task_results: list[dict]) -> list[tuple[str, bool | None]]:
    """(metric key, higher is better) of a task, in order: what its results declare under "metrics" (lm-evaluation
    -harness tasks, summarization scored against several references), else the task's entry in METRICS."""
    declared: dict[str, bool | None] = {}
    for res in task_results:
        for key, higher in res.get("metrics") or []:
            declared.setdefault(key, higher)
    return list(declared.items()) if declared else METRICS.get(task, [])


def metric_rows(results: list[dict]) -> list[dict]:
    """[{task, metric, values: [per model], better}] for every task any model was evaluated on."""
    tasks = []
    for r in results:
        tasks += [t for t in r["tasks"] if t not in tasks]
    out = []
    for t in tasks:
        for key, higher in task_metrics(t, [r["tasks"].get(t, {}) for r in results]):
            out.append({"task": t, "metric": key, "higher_is_better": higher,
                        "values": [r["tasks"].get(t, {}).get(key) for r in results]})
        out.append({"task": t, "metric": "n", "higher_is_better": None,
                    "values": [r["tasks"].get(t, {}).get("n") for r in results]})
    return out


def _delta(values: list, higher) -> str:
    a, b = values[0], values[-1]
    if higher is None or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return ""
    d = b - a
    if math.isnan(d) or math.isinf(d):
        return ""
    better = (d > 0) == higher and d != 0
    return f"{d:+.4f}" + (" ▲" if better else (" ▼" if d != 0 else ""))


# ----------------------------------------------------------------------------------------------- side by side

def _example_key(task: str, ex: dict) -> str:
    return ex.get("question") or ex.get("prompt") or ""


def side_by_side(results: list[dict], task: str, limit: int = MAX_EXAMPLES) -> list[dict]:
    """Examples of one task aligned across models: [{prompt, reference, outputs: [per model example or None]}]."""
    per_model = [r["tasks"].get(task, {}).get("examples", []) for r in results]
    first = next((exs for exs in per_model if exs), [])
    rows = []
    for i, ex in enumerate(first[:limit]):
        key = _example_key(task, ex)
        outs = []
        for exs in per_model:
            match = exs[i] if i < len(exs) and _example_key(task, exs[i]) == key else \
                next((e for e in exs if _example_key(task, e) == key), None)
            outs.append(match)
        rows.append({"prompt": key, "reference": ex.get("gold", ex.get("reference")), "outputs": outs})
    return rows


def _verdict(task: str, ex: dict | None) -> str:
    if ex is None:
        return "not evaluated"
    if ex.get("verdict"):  # examples that say how they scored (lm-evaluation-harness tasks)
        return ex["verdict"]
    if task == "gsm8k":
        return f"pred {fmt(ex.get('pred'))} {'✓' if ex.get('correct') else '✗'}" + \
            ("" if ex.get("formatted") else " (no ####)")
    if task == "summarization":
        if "rougeL_best_ref" in ex:
            return f"ROUGE-L best ref {fmt(ex['rougeL_best_ref'])}, mean over refs {fmt(ex['rougeL_mean_ref'])}"
        return f"ROUGE-L {fmt(ex.get('rougeL'))}"
    return ""


def _clip(text: str | None) -> str:
    text = text or ""
    return text if len(text) <= MAX_OUTPUT_CHARS else text[:MAX_OUTPUT_CHARS] + " …"


# ------------------------------------------------------------------------------------------------------ writers

def _md_cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _fence(text: str) -> str:
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}text\n{text}\n{ticks}"


def to_markdown(results: list[dict], title: str, run_dir: Path | None = None, settings: dict | None = None) -> str:
    labels = [r["label"] for r in results]
    lines = [f"# {title}", ""]
    for r in results:
        lines.append(f"- **{r['label']}**: {r.get('model', '')}")
    if settings:
        lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None)]
    rows = metric_rows(results)
    if rows:
        delta = len(results) >= 2
        head = ["task", "metric", *labels] + ([f"Δ ({labels[-1]} − {labels[0]})"] if delta else [])
        lines += ["", "## Metrics", "", "| " + " | ".join(map(_md_cell, head)) + " |",
                  "|" + "---|" * len(head)]
        for m in rows:
            cells = [m["task"], m["metric"], *[fmt(v) for v in m["values"]]]
            if delta:
                cells.append(_delta(m["values"], m["higher_is_better"]))
            lines.append("| " + " | ".join(map(_md_cell, cells)) + " |")
    if run_dir is not None:
        lines += _training_md(run_dir)
    for task in {t: None for r in results for t in r["tasks"]}:
        sbs = side_by_side(results, task)
        if not sbs:
            continue
        lines += ["", f"## {task}: examples side by side", ""]
        for i, row in enumerate(sbs, 1):
            ref = f" — reference: {_md_cell(row['reference'])}" if task == "gsm8k" and row["reference"] else ""
            lines += [f"### {i}{ref}", "", "**Prompt**", "", _fence(_clip(row["prompt"])), ""]
            if row["reference"] is not None and task != "gsm8k":
                lines += ["**Reference**", "", _fence(_clip(row["reference"])), ""]
            for label, ex in zip(labels, row["outputs"]):
                verdict = _verdict(task, ex)
                lines += [f"**{label}**" + (f" — {verdict}" if verdict else ""), "",
                          _fence(_clip(ex.get("output") if ex else "")), ""]
    return "\n".join(lines).rstrip() + "\n"


def _training_md(run_dir: Path) -> list[str]:
    lines = []
    s = read_json(run_dir / "summary.json")
    if isinstance(s, dict):
        keys = ("method", "base_model", "adapter", "global_step", "epoch", "first_loss", "last_loss",
                "tokens_per_s", "train_seconds", "status")
        lines += ["", "## Training", ""] + [f"- {k}: {format_duration(s[k]) if k == 'train_seconds' else fmt(s[k])}"
                                            for k in keys if k in s]
    table = load_epoch_table(run_dir)
    if table:
        if not lines:
            lines += ["", "## Training", ""]
        lines += ["", "| epoch | train loss | val loss | duration |", "|---|---|---|---|"]
        lines += [f"| {t['epoch']} | {fmt(t['train_loss'])} | {fmt(t['val_loss'])} | "
                  f"{format_duration(t['duration_s'])} |" for t in table]
    for img in ("loss.png", "loss_epoch.png"):
        if (run_dir / img).is_file():
            lines += ["", f"![{img}]({img})"]
    return lines


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}th{background:#f4f4f4}
pre{white-space:pre-wrap;margin:0;font-size:0.9em}.up{color:#070}.down{color:#b00}.ok{color:#070}.bad{color:#b00}
img{max-width:48%;margin-right:1%}"""


def to_html(results: list[dict], title: str, run_dir: Path | None = None, settings: dict | None = None) -> str:
    e = html.escape
    labels = [r["label"] for r in results]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style>"
             f"</head><body><h1>{e(title)}</h1><ul>"]
    parts += [f"<li><b>{e(r['label'])}</b>: {e(str(r.get('model', '')))}</li>" for r in results]
    parts.append("</ul>")
    if settings:
        parts.append("<p>Settings: " + e(", ".join(f"{k}={v}" for k, v in settings.items() if v is not None))
                     + "</p>")
    rows = metric_rows(results)
    if rows:
        delta = len(results) >= 2
        parts.append("<h2>Metrics</h2><table><tr><th>task</th><th>metric</th>" +
                     "".join(f"<th>{e(x)}</th>" for x in labels) + ("<th>Δ</th>" if delta else "") + "</tr>")
        for m in rows:
            d = _delta(m["values"], m["higher_is_better"]) if delta else ""
            cls = "up" if "▲" in d else ("down" if "▼" in d else "")
            parts.append(f"<tr><td>{e(m['task'])}</td><td>{e(m['metric'])}</td>" +
                         "".join(f"<td>{e(fmt(v))}</td>" for v in m["values"]) +
                         (f"<td class='{cls}'>{e(d)}</td>" if delta else "") + "</tr>")
        parts.append("</table>")
    if run_dir is not None:
        table = load_epoch_table(run_dir)
        if table:
            parts.append("<h2>Training</h2><table><tr><th>epoch</th><th>train loss</th><th>val loss</th>"
                         "<th>duration</th></tr>")
            parts += [f"<tr><td>{t['epoch']}</td><td>{fmt(t['train_loss'])}</td><td>{fmt(t['val_loss'])}</td>"
                      f"<td>{format_duration(t['duration_s'])}</td></tr>" for t in table]
            parts.append("</table>")
        imgs = [i for i in ("loss.png", "loss_epoch.png") if (run_dir / i).is_file()]
        parts += [f"<img src='{i}' alt='{i}'>" for i in imgs]
    for task in {t: None for r in results for t in r["tasks"]}:
        sbs = side_by_side(results, task)
        if not sbs:
            continue
        parts.append(f"<h2>{e(task)}: examples side by side</h2><table><tr><th>#</th><th>prompt</th>"
                     "<th>reference</th>" + "".join(f"<th>{e(x)}</th>" for x in labels) + "</tr>")
        for i, row in enumerate(sbs, 1):
            cells = []
            for ex in row["outputs"]:
                v = _verdict(task, ex)
                cls = "ok" if "✓" in v else ("bad" if "✗" in v else "")
                cells.append(f"<td><div class='{cls}'>{e(v)}</div><pre>{e(_clip(ex.get('output') if ex else ''))}"
                             "</pre></td>")
            ref = row["reference"]
            parts.append(f"<tr><td>{i}</td><td><pre>{e(_clip(row['prompt']))}</pre></td>"
                         f"<td><pre>{e(_clip(ref if ref is not None else ''))}</pre></td>{''.join(cells)}</tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(out_dir, results: list[dict], title: str = "tunelab evaluation", settings: dict | None = None,
                 include_training: bool = True) -> dict[str, Path]:
    """report.md, report.html and report.json in `out_dir`; a run directory's training records are included.

    results: [{"label": "base", "model": "what was loaded", "tasks": {task: result of that task's evaluate}}]
    """
    out = Path(out_dir)
    run_dir = out if include_training and ((out / "metrics.jsonl").is_file() or (out / "summary.json").is_file()) \
        else None
    paths = {"md": out / "report.md", "html": out / "report.html", "json": out / "report.json"}
    write_text_atomic(paths["md"], to_markdown(results, title, run_dir, settings))
    write_text_atomic(paths["html"], to_html(results, title, run_dir, settings))
    write_text_atomic(paths["json"], json.dumps({"title": title, "settings": settings or {}, "results": results},
                                            indent=1, default=str))
    return paths
