"""`tunelab eval` and `tunelab compare`: evaluate one model, or several side by side, on the evaluation tasks.

    tunelab eval --run runs/gsm8k-sft --task gsm8k --n 50
    tunelab compare runs/gsm8k-sft                 # the run's base model vs the run
    tunelab compare runs/a runs/b --task gsm8k --task perplexity
    tunelab eval --run runs/gsm8k-sft --task lm-eval:arc_easy      # lm-evaluation-harness (evaluation/lmeval.py)

Models are loaded one at a time and freed before the next, so comparing two 1B models needs the memory of one.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from types import SimpleNamespace

from tunelab.errors import UserError
from tunelab.evaluation.lmeval import is_lmeval
from tunelab.evaluation.report import format_duration
from tunelab.rundir import check_writable, open_finished_run

TASKS = ("gsm8k", "summarization", "perplexity", "prompts")
DEFAULT_DATA = {"gsm8k": "bundled:gsm8k/test", "perplexity": "bundled:gsm8k/test"}
# what --data takes for a task without a default, said when it is missing
DATA_HINT = {"summarization": "e.g. a DialogSum .jsonl, or conversations whose last reply is the reference",
             "prompts": "a .txt file with one prompt per line, or a .jsonl of prompts or conversations"}


# --------------------------------------------------------------------------------------------------- model specs

def resolve_run(run: str, flag: str = "--run ") -> Path:
    """A run directory with its final model, given as a path or as a name under runs/ (its config read and checked:
    tunelab.rundir), before any data or model loads: a run still training is said at once, not after the models
    before it have been scored. A model or adapter directory given as a run is said to be one (`flag`: how the user
    gave it, for the message)."""
    from tunelab.rundir import find_run, open_finished_run

    if find_run(run) is None and not (Path(run).name == "final" and find_run(Path(run).parent)):
        _not_a_run(run, flag)  # rundir says "does not exist" of anything but a run, which misleads for these
    return open_finished_run(run).path


def _not_a_run(path: str, flag: str) -> None:
    """UserError for an existing model or adapter directory given where a run was expected."""
    p = Path(path)
    owner = next((str(a) for a in p.parents if a != Path(".") and _is_run(str(a))), None)
    of_run = f" (of the run {owner}; --run {owner} evaluates the run's final model)" if owner else ""
    if (p / "config.json").is_file():
        raise UserError(f"{flag}{path} is a model directory (a merged export?), not a run{of_run}: pass it with "
                        f"--model {path}")
    if (p / "adapter_config.json").is_file():
        raise UserError(f"{flag}{path} is a PEFT adapter, not a run{of_run}: pass it with --adapter {path} "
                        f"--model {_adapter_base(p) or 'BASE'}")


def _adapter_base(adapter: Path) -> str | None:
    """The base model an adapter directory names (adapter_config.json's base_model_name_or_path), if readable."""
    import json

    try:
        return json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path") or None
    except (OSError, ValueError, AttributeError):
        return None


def check_model(model: str, where: str) -> None:
    """A model given by path is a transformers model directory; a PEFT adapter given as a model is said to be one,
    with the flag (or run) that takes it, before anything loads (the loader would only say "no config.json")."""
    from tunelab.models import check_source

    p = Path(model).expanduser()
    if p.is_dir() and not (p / "config.json").is_file() and (p / "adapter_config.json").is_file():
        owner = str(p.parent) if p.name == "final" and _is_run(str(p.parent)) else None
        if where == "compare":
            how = (f"pass the run itself: {owner}" if owner else "compare takes models and runs; score the adapter "
                   f"with `tunelab eval --model {_adapter_base(p) or 'BASE'} --adapter {model}`")
            raise UserError(f"compare {model}: a PEFT adapter, not a model: {how}")
        how = f"--run {owner}, or --adapter {model}" if owner else f"--adapter {model}"
        raise UserError(f"--model {model} is a PEFT adapter, not a model: pass {how} with --model "
                        f"{_adapter_base(p) or 'BASE'} (its base)")
    check_source(model)


def run_base_model(run_dir: Path) -> str:
    """The base model a run was trained from (what `compare RUN` evaluates as "base")."""
    from tunelab.rundir import open_finished_run

    base = open_finished_run(run_dir, need_final=False).base
    if not base:
        raise UserError(f"{run_dir}/config.yaml has no model.source; cannot tell the run's base model")
    return base


def _is_run(spec: str) -> bool:
    from tunelab.rundir import find_run

    return find_run(spec) is not None


def model_specs(args) -> list[dict]:
    """What `compare` evaluates: [{label, model, adapter, run}] from its positional arguments."""
    items = list(args.models)
    specs = []
    if len(items) == 1 and _is_run(items[0]):  # one run: its base vs the run
        run = resolve_run(items[0], "compare ")
        specs.append({"label": "base", "model": run_base_model(run), "adapter": None, "run": None})
        specs.append({"label": run.name, "model": None, "adapter": None, "run": str(run)})
    else:
        if len(items) < 2:
            raise UserError(f"compare {items[0]}: not a run directory; compare needs a run (its base vs the run) or "
                            "two or more models/runs")
        for it in items:
            if _is_run(it):
                run = resolve_run(it, "compare ")
                specs.append({"label": run.name, "model": None, "adapter": None, "run": str(run)})
            else:
                check_model(it, "compare")  # a missing local model is said before the first model is evaluated
                specs.append({"label": it, "model": it, "adapter": None, "run": None})
    seen: dict[str, int] = {}
    for s in specs:  # the same run twice, or two runs with one name: keep labels apart
        n = seen[s["label"]] = seen.get(s["label"], 0) + 1
        if n > 1:
            s["label"] = f"{s['label']} ({n})"
    return specs


def describe(spec: dict) -> str:
    if spec.get("run"):
        return f"run {spec['run']}"
    return spec["model"] + (f" + adapter {spec['adapter']}" if spec.get("adapter") else "")


def load(spec: dict, load_in_4bit: bool = False):
    """The model of `spec`; `load_in_4bit`: its base in 4 bits (bitsandbytes NF4), an adapter over it as trained."""
    from tunelab.models import load_for_inference

    if spec.get("run"):
        return load_for_inference(run=spec["run"], load_in_4bit=load_in_4bit)
    return load_for_inference(spec["model"] or "embedded:smollm2-135m-instruct", adapter=spec.get("adapter"),
                              load_in_4bit=load_in_4bit)


# ---------------------------------------------------------------------------------------------------- settings

def gen_params(args):
    from tunelab.inference.engine import GenParams

    if args.temperature < 0:
        raise UserError("--temperature must be >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        raise UserError("--top-p must be in (0, 1]")
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    return GenParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                     seed=args.seed)


def _check(args) -> None:
    if getattr(args, "lm_eval_fewshot", None) is not None and args.lm_eval_fewshot < 0:
        raise UserError("--lm-eval-fewshot must be >= 0")
    if args.n is not None and args.n < 1:
        raise UserError("--n must be at least 1")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if args.k_shot < 0:
        raise UserError("--k-shot must be >= 0")
    gen_params(args)  # settings are checked before any model is loaded


def check_tasks(tasks: list[str], args) -> None:
    """Task names (tunelab's own, or lm-eval:NAME with the harness installed), before any data or model loads."""
    from tunelab.evaluation import lmeval

    for t in tasks:
        if not is_lmeval(t) and t not in TASKS:
            raise UserError(f"unknown task '{t}'; one of {', '.join(TASKS)}, or {lmeval.PREFIX}NAME "
                            "(an lm-evaluation-harness task or task YAML)")
    lmeval.check(tasks, _include(args))


def harness_tasks(tasks: list[str], args):
    """The lm-evaluation-harness tasks among `tasks`, indexed and their data read (None when there are none)."""
    if not any(is_lmeval(t) for t in tasks):
        return None
    from tunelab.evaluation import lmeval

    return lmeval.Tasks(tasks, _include(args))


def _include(args) -> list[str]:
    """--lm-eval-include folders (from Python, one folder may be given as a string)."""
    given = getattr(args, "lm_eval_include", None) or []
    return [given] if isinstance(given, str) else list(given)


def columns(args) -> dict[str, str]:
    """--column YOURS=EXPECTED flags (or, from Python, a {yours: expected} dict) as a rename map (data.columns of a
    training config)."""
    given = getattr(args, "column", None) or []
    if isinstance(given, dict):
        return dict(given)
    out = {}
    for item in [given] if isinstance(given, str) else given:
        if "=" not in item:
            raise UserError(f"--column '{item}' is not yours=expected (e.g. --column summaries=references)")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def task_data(task: str, args):
    """The rows a task evaluates (loaded once, shared by every model of a comparison)."""
    from tunelab.evaluation.common import load_records

    spec = args.data or DEFAULT_DATA.get(task)
    if spec is None:
        raise UserError(f"--task {task} needs --data ({DATA_HINT.get(task, 'a file the data layer reads')})")
    if task == "gsm8k":
        from tunelab.evaluation.gsm8k import read_questions

        return read_questions(spec, args.n)
    return load_records(spec, getattr(args, "format", "auto") or "auto", args.n, columns(args))


def run_task(task: str, model, tok, data, args) -> dict:
    params = gen_params(args)
    if task == "gsm8k":
        from tunelab.evaluation import gsm8k

        return gsm8k.evaluate(model, tok, data, k_shot=args.k_shot, batch_size=args.batch_size, params=params)
    if task == "summarization":
        from tunelab.evaluation import summarization

        return summarization.evaluate(model, tok, data, batch_size=args.batch_size, params=params)
    if task == "perplexity":
        from tunelab.evaluation import perplexity

        return perplexity.evaluate(model, tok, data, batch_size=args.batch_size)
    if task == "prompts":
        from tunelab.evaluation import prompts

        return prompts.evaluate(model, tok, data, batch_size=args.batch_size, params=params)
    raise UserError(f"unknown task '{task}'; one of {', '.join(TASKS)}")


def run_model(spec: dict, tasks: list[str], data: dict, harness, args, echo=None, load_in_4bit: bool = False) -> dict:
    """{task: result} of one model: tunelab's own tasks on one load of it, then the lm-evaluation-harness tasks
    through the harness' own model loading (evaluation/lmeval.py); each load is freed before the next.
    load_in_4bit: the base in 4 bits (bitsandbytes NF4) for both."""
    results = {}
    own = [t for t in tasks if not is_lmeval(t)]
    if own:
        model, tok = load(spec, load_in_4bit)
        for t in own:
            t0 = time.time()
            results[t] = run_task(t, model, tok, data[t], args)
            results[t]["seconds"] = round(time.time() - t0, 2)
            if echo:
                echo(summary_line(t, results[t]) + f"  ({format_duration(results[t]['seconds'])})")
        del model, tok
        _free_memory()
    if harness is not None:
        from tunelab.evaluation import lmeval

        model, model_args = lmeval.hf_model(spec, args.batch_size, load_in_4bit)
        t0 = time.time()
        found = lmeval.evaluate(model, model_args, harness, n=args.n, batch_size=args.batch_size,
                                num_fewshot=getattr(args, "lm_eval_fewshot", None),
                                chat_template=getattr(args, "lm_eval_chat_template", False), seed=args.seed)
        seconds = round(time.time() - t0, 2)
        for t, res in found.items():
            res["seconds"] = seconds  # the harness runs its tasks together: the time of all of them
            results[t] = res
            if echo:
                echo(summary_line(t, res))
        if echo:
            echo(f"lm-eval tasks: {format_duration(seconds)}")
        del model
        _free_memory()
    return results


def summary_line(task: str, res: dict) -> str:
    from tunelab.evaluation.report import fmt, task_metrics

    keys = [k for k, _ in task_metrics(task, [res])]
    skipped = res.get("skipped") or {}
    why = {"no_reply": "without an assistant reply", "reply_past_max_length":
           f"with the reply past {res.get('max_length')} tokens"}
    note = ("  (not scored: " + ", ".join(f"{n} {why.get(k, k)}" for k, n in skipped.items()) + ")") if skipped else ""
    return f"{task}: n={res['n']}" + "".join(f"  {k}={fmt(res[k])}" for k in keys if k in res) + note


def _settings(args, tasks) -> dict:
    return {"tasks": ",".join(tasks), "data": args.data, "n": args.n,
            "k_shot": args.k_shot if "gsm8k" in tasks else None, "temperature": args.temperature,
            "top_p": args.top_p if args.temperature > 0 else None, "seed": args.seed,
            "max_new_tokens": args.max_new_tokens if any(not is_lmeval(t) for t in tasks) else None,
            "load_in_4bit": getattr(args, "load_in_4bit", None) or None,
            # lm-eval tasks generate with their own lengths; these change their numbers
            "lm_eval_fewshot": getattr(args, "lm_eval_fewshot", None) if any(map(is_lmeval, tasks)) else None,
            "lm_eval_chat_template": (getattr(args, "lm_eval_chat_template", False) or None)
            if any(map(is_lmeval, tasks)) else None}


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------ commands

# Settings of `evaluate` (and of the CLI's flags, which document them in `tunelab eval --help`).
SETTINGS = {"data": None, "format": "auto", "n": None, "k_shot": 0, "temperature": 0.0, "top_p": 1.0, "seed": None,
            "max_new_tokens": 256, "batch_size": 16, "load_in_4bit": False, "column": None, "lm_eval_include": None,
            "lm_eval_fewshot": None, "lm_eval_chat_template": False}


def evaluate(task: str, model: str | None = None, adapter: str | None = None, run: str | None = None,
             **settings) -> dict:
    """Score one model (a base, a base + adapter, or a run's final model) on `task`; returns the task's metrics and
    examples. Python entry point behind `tunelab eval` (settings: see SETTINGS). An lm-eval:NAME task that the
    harness expands into several (a group) returns {"tasks": {name: result}}."""
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise UserError(f"unknown evaluation setting(s) {', '.join(sorted(unknown))}; known: {', '.join(SETTINGS)}")
    args = SimpleNamespace(**{**SETTINGS, **settings})
    _check(args)
    check_tasks([task], args)
    if adapter and run:
        raise UserError("give --adapter or --run, not both (a run already names its adapter)")
    if model:
        check_model(model, "eval")
    spec = {"label": "model", "model": model if model or run else "embedded:smollm2-135m-instruct",
            "adapter": adapter, "run": str(resolve_run(run)) if run else None}
    data = {} if is_lmeval(task) else {task: task_data(task, args)}
    harness = harness_tasks([task], args)
    res = run_model(spec, [task], data, harness, args, load_in_4bit=bool(args.load_in_4bit))
    return next(iter(res.values())) if len(res) == 1 else {"tasks": res}


def check_out(out: str | None) -> None:
    """--out (FILE.json, or a directory for report.md/.html) is checked before anything is evaluated: a path that
    cannot be written would lose the results after the work."""
    if not out:
        return
    p = Path(out)
    if out.endswith(".json") and p.is_dir():
        raise UserError(f"--out {out} is a directory; name a file (FILE.json) or a directory without .json")
    if not out.endswith(".json") and p.exists() and not p.is_dir():
        raise UserError(f"--out {out} is a file; name a directory for report.md/report.html, or FILE.json")
    check_writable(p.parent if out.endswith(".json") else p, "--out", out)


def _file_name(tasks: list[str]) -> str:
    """RUN/eval/<this>.json: the task names, a harness task file by its stem, joined by '+'."""
    import re

    def one(t: str) -> str:
        if is_lmeval(t) and t.endswith((".yaml", ".yml")):
            t = "lm-eval_" + Path(t.split(":", 1)[1]).stem
        return re.sub(r"[^\w.+-]+", "_", t)

    return "+".join(one(t) for t in tasks)


def run_result_path(run: Path, tasks: list[str]) -> Path:
    """Where `eval --run` saves: RUN/eval/TASKS.json, or TASKS-2.json, -3, ... beside earlier results. An earlier
    result is never replaced: it may have been scored on other data, samples or precision (the name does not say; the
    file's "settings" do), and a run's results are as much its record as its checkpoints."""
    d, name = run / "eval", _file_name(tasks)
    p, i = d / f"{name}.json", 1
    while p.exists():
        i += 1
        p = d / f"{name}-{i}.json"
    return p


def main(args) -> int:
    """tunelab eval: one model on one or more tasks; prints the metrics and a few examples, writes results if asked."""
    tasks = list(dict.fromkeys(args.task))
    _check(args)
    check_tasks(tasks, args)
    check_out(args.out)
    if args.adapter and args.run:
        raise UserError("give --adapter or --run, not both (a run already names its adapter)")
    if args.model:
        check_model(args.model, "eval")
    spec = {"label": "model", "model": args.model, "adapter": args.adapter,
            "run": str(resolve_run(args.run)) if args.run else None}
    data = {t: task_data(t, args) for t in tasks if not is_lmeval(t)}
    harness = harness_tasks(tasks, args)
    all_res = run_model(spec, tasks, data, harness, args)
    print(f"{describe(spec)}")
    out = args.out or (str(run_result_path(Path(spec["run"]), tasks)) if spec["run"] else None)
    for task, res in all_res.items():
        print(summary_line(task, res) + f"  ({format_duration(res['seconds'])})")
        examples = res.get("examples", [])
        for ex in examples[:SHOWN_EXAMPLES]:
            prompt = (ex.get("question") or ex.get("prompt") or "").strip().replace("\n", " ")
            text = (ex.get("output") or "").strip().replace("\n", " ")
            print(f"- {prompt[:100]}{'…' if len(prompt) > 100 else ''}\n  → {text[:200]}"
                  f"{'…' if len(text) > 200 else ''}")
        hidden = len(examples) - SHOWN_EXAMPLES
        if hidden > 0:  # say where the rest are: the output file (written below) or how to get one
            print(f"({hidden} more output{'s' if hidden > 1 else ''} not shown: "
                  + (f"all {len(examples)} are in {out})" if out else "pass --out FILE.json to keep them all)"))
    if out:
        results = [{"label": spec["label"] if not spec["run"] else Path(spec["run"]).name, "model": describe(spec),
                    "tasks": all_res}]
        if out.endswith(".json"):
            from tunelab.rundir import write_json_atomic

            p = write_json_atomic(out, {"settings": _settings(args, tasks), "results": results}, indent=1)
            kept = not args.out and Path(out).name != f"{_file_name(tasks)}.json"
            print(f"results: {p}" + (" (earlier results kept beside it)" if kept else ""))
        else:
            from tunelab.evaluation.report import write_report

            paths = write_report(out, results, title=f"tunelab eval: {', '.join(tasks)}",
                                 settings=_settings(args, tasks), include_training=False)
            print(f"report: {paths['md']} and {paths['html']}")
    return 0


COMPARE_N = 50  # samples per task `compare` evaluates unless --n is given
SHOWN_EXAMPLES = 3  # outputs `eval` prints; the results file keeps them all


def compare_defaults(run_cfg: dict, tasks: list[str] | None, data: str | None) -> tuple[list, dict, str | None]:
    """(tasks, {task: data}, why) for `compare`: what was asked, else what the run itself was evaluated on.

    A run that scored a task during training (eval.task) is compared on that task and its held-out data; one with
    validation data, on perplexity over that data (comparable with its eval_loss); otherwise on GSM8K. `why` says
    which default applied, None when --task and --data said it all.
    """
    ev, val = run_cfg.get("eval") or {}, (run_cfg.get("data") or {}).get("validation")
    own = {}
    if ev.get("task"):
        own[ev["task"]] = ev.get("task_data") or DEFAULT_DATA.get(ev["task"])
    if val is not None and isinstance(val, str):  # a list/mapping of sources is the data layer's to mix, not ours
        own.update({t: val for t in ("perplexity", "summarization", "prompts")})
    why = []
    if not tasks:
        tasks = [ev["task"]] if ev.get("task") else ["perplexity"] if "perplexity" in own else ["gsm8k"]
        why.append(f"--task {tasks[0]}: " + ("the run's eval.task" if ev.get("task") else "the run's validation data"
                                             if "perplexity" in own else "the default"))
    spec = {t: data or own.get(t) for t in tasks}
    if not data and any(own.get(t) for t in tasks):
        why.append("data: the run's own")
    return list(dict.fromkeys(tasks)), spec, "; ".join(why) or None


def four_bit_models(args, specs: list[dict]) -> set[str]:
    """Labels of the models `compare` loads with a 4-bit base: all with a bare --load-in-4bit, else those named
    (as given on the command line), so an adapter on the 4-bit base and the merged model can be scored side by side."""
    named = getattr(args, "load_in_4bit", None)
    if named is None:
        return set()
    if not named:
        return {s["label"] for s in specs}
    given = dict(zip(args.models, specs)) if len(args.models) == len(specs) else {}
    unknown = [m for m in named if m not in given]
    if unknown:
        raise UserError(f"--load-in-4bit {unknown[0]}: not one of the models compared ({', '.join(args.models)})")
    return {given[m]["label"] for m in named}


def compare(args) -> int:
    """tunelab compare: the same tasks and data for each model; a metric table and per-example side by side."""
    from tunelab.evaluation.report import write_report

    _check(args)
    check_out(args.out)
    specs = model_specs(args)
    four_bit = four_bit_models(args, specs)  # a mistyped name is refused before any data or model loads
    run_cfg = open_finished_run(next(s["run"] for s in specs if s["run"]), need_final=False).config \
        if any(s["run"] for s in specs) else {}
    tasks, data_spec, why = compare_defaults(run_cfg, args.task, args.data)
    check_tasks(tasks, args)
    # all 1,319 GSM8K questions take hours on a CPU for a first look: a sample, unless --n says otherwise
    args = SimpleNamespace(**{**vars(args), "n": args.n or COMPARE_N})
    where = {t: "its own data" if is_lmeval(t) else data_spec.get(t) or DEFAULT_DATA.get(t) for t in tasks}
    print(f"comparing on {', '.join(f'{t} ({where[t]})' for t in tasks)}, "
          f"{'first ' + str(args.n) if args.n else 'all'} samples" + (f" ({why})" if why else ""))
    data = {t: task_data(t, SimpleNamespace(**{**vars(args), "data": data_spec.get(t)})) for t in tasks
            if not is_lmeval(t)}
    harness = harness_tasks(tasks, args)
    args.data = args.data or "; ".join(f"{t}: {d}" for t, d in data_spec.items() if d) or None  # for the report
    runs = [s["run"] for s in specs if s["run"]]
    out = Path(args.out) if args.out else (Path(runs[-1]) if runs else None)
    if out is None:
        raise UserError("compare of models without a run needs --out DIR for the report")
    results = []
    for spec in specs:
        print(f"evaluating {spec['label']}: {describe(spec)}"
              + (" (base in 4 bits)" if spec["label"] in four_bit else ""))
        tasks_res = run_model(spec, tasks, data, harness, args, echo=lambda line: print("  " + line),
                              load_in_4bit=spec["label"] in four_bit)
        results.append({"label": spec["label"], "model": describe(spec), "tasks": tasks_res})
    paths = write_report(out, results, title="tunelab compare: " + " vs ".join(s["label"] for s in specs),
                         settings=_settings(args, tasks))
    print(f"report: {paths['md']} and {paths['html']}")
    return 0
