"""lm-evaluation-harness tasks in `tunelab eval` and `tunelab compare`: `--task lm-eval:NAME`.

    tunelab eval --run runs/gsm8k-sft --task lm-eval:arc_easy --task gsm8k
    tunelab eval --model embedded:smollm2-135m-instruct --task lm-eval:path/to/my_task.yaml
    tunelab compare runs/a --task lm-eval:my_task --lm-eval-include my_tasks/

NAME is a task (or group) of the harness' registry, whose data it downloads; a task YAML file, whose data can be
local files (`dataset_path: json` + `dataset_kwargs.data_files`, read from the directory the command runs in, as
`lm_eval` itself reads them); or a task of a folder of YAMLs given with --lm-eval-include.

The model goes through the harness' own `hf` model (`pretrained=`, `peft=` for an adapter or a run's adapter), so a
score here is the score `lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER` prints. Each harness metric
becomes a row of tunelab's report ("acc", "acc stderr", a non-default filter as "exact_match (strict-match)"), and
the harness' per-sample records become the report's examples.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from tunelab.errors import UserError, suggest

PREFIX = "lm-eval:"
INSTALL = "pip install -e '.[lmeval]'"
# The harness estimates the standard error of non-mean metrics (BLEU, F1...) by bootstrap; its CLI default is
# 100,000 resamples, minutes of CPU for a first look. Mean metrics (acc, exact_match) have a closed form either way.
BOOTSTRAP_ITERS = 1000


def is_lmeval(task: str) -> bool:
    return task.startswith(PREFIX)


def _name(task: str) -> str:
    return task[len(PREFIX):]


def _is_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml"))


def require() -> None:
    """Refuse, in one line, a harness task when the harness is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(f"lm-eval tasks need lm-evaluation-harness, which is not installed: {INSTALL}") from None


def _check_data_files(path: Path) -> None:
    """A local task's data files must exist (checked before any model loads; the harness would fail mid-run)."""
    import yaml

    class Loader(yaml.SafeLoader):
        """Safe loading that reads the harness' `!function module.name` tags as nothing: they name code, and only
        the data section is wanted here."""

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        cfg = yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 (a SafeLoader subclass)
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: not a readable task YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: a task YAML is a mapping (task:, dataset_path:, ...)")
    files = ((cfg.get("dataset_kwargs") or {}).get("data_files")) if isinstance(cfg.get("dataset_kwargs"), dict) \
        else None
    names = files.values() if isinstance(files, dict) else [files] if files else []
    for f in names:
        for one in f if isinstance(f, list) else [f]:
            if isinstance(one, str) and "://" not in one and not any(c in one for c in "*?[") \
                    and not Path(one).expanduser().exists():
                raise UserError(f"{path}: dataset_kwargs.data_files names {one}, which does not exist (relative paths "
                                f"are read from the directory the command runs in, {Path.cwd()}; or give it "
                                "absolute)")


def datasets_offline_where_the_hub_is_unreachable() -> None:
    """The harness loads its tasks' data itself (`datasets.load_dataset` of a hub id), and where the Hub cannot be
    reached `datasets` retries it for half a minute, printing each retry, before it fails. Its own offline switch
    (HF_DATASETS_OFFLINE) makes it read its cache at once, or fail in one line; `datasets` reads the switch once, when
    it is imported, so this runs before the harness (which imports it) does."""
    if "HF_DATASETS_OFFLINE" in os.environ or "HF_HUB_OFFLINE" in os.environ or "datasets" in sys.modules:
        return
    from tunelab.models import hub_reachable

    if not hub_reachable():
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        print("note: the Hub cannot be reached; the harness' datasets are read from the Hugging Face cache",
              file=sys.stderr)


def check(tasks: list[str], include: list[str] | None = None) -> None:
    """What can be checked of harness tasks before a model loads: installed, names given, files and folders there."""
    if not any(is_lmeval(t) for t in tasks):
        return
    datasets_offline_where_the_hub_is_unreachable()
    require()
    for d in include or []:
        if not Path(d).is_dir():
            raise UserError(f"--lm-eval-include {d}: not a folder (give a folder of task YAMLs)")
    for t in filter(is_lmeval, tasks):
        name = _name(t)
        if not name:
            raise UserError(f"--task {t}: name a harness task after '{PREFIX}' (e.g. {PREFIX}arc_easy or "
                            f"{PREFIX}path/to/task.yaml)")
        if _is_file(name):
            if not Path(name).is_file():
                raise UserError(f"--task {t}: task file {name} does not exist")
            _check_data_files(Path(name))


class Tasks:
    """The harness tasks of one command: its task index, built once, and the specs `simple_evaluate` takes."""

    def __init__(self, tasks: list[str], include: list[str] | None = None):
        from lm_eval.tasks import TaskManager

        self.names = [_name(t) for t in tasks if is_lmeval(t)]
        self.specs = [str(Path(n).resolve()) if _is_file(n) else n for n in self.names]
        registry = [n for n in self.names if not _is_file(n)]
        include = [str(Path(d).resolve()) for d in include or []] or None
        # local tasks need no registry; indexing the harness' own (thousands of YAMLs) takes tens of seconds on a CPU
        self.manager = TaskManager(include_path=include, include_defaults=False)
        if any(n not in self.manager.all_tasks for n in registry):
            self.manager = TaskManager(include_path=include)
            for n in registry:
                if n not in self.manager.all_tasks:
                    raise UserError(f"--task {PREFIX}{n}: not a task of lm-evaluation-harness"
                                    f"{suggest(n, self.manager.all_tasks)}; give a task YAML file or a folder of them "
                                    "with --lm-eval-include")
        self.load()  # the data is read now, before any model loads: an unreachable dataset fails first

    def load(self):
        try:
            return self.manager.load(self.specs)
        # the harness passes on whatever `datasets` raised (no network, no such file, a bad config)
        except Exception as e:  # noqa: BLE001
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"lm-eval task(s) {', '.join(self.names)}: could not be loaded: {first[:300]} (offline, a "
                            "task YAML with local data files works: dataset_path: json, dataset_kwargs.data_files)") \
                from None


# ------------------------------------------------------------------------------------------------------ the model

def hf_model(spec: dict, batch_size: int, load_in_4bit: bool = False):
    """(model, model_args) for `simple_evaluate`: the harness' `hf` model over tunelab's model spec."""
    import torch

    from tunelab.models import resolve_source

    if spec.get("run"):
        from tunelab.rundir import open_finished_run

        finished = open_finished_run(spec["run"])
        base, adapter = finished.model_source, finished.adapter
    else:
        base, adapter = spec.get("model") or "embedded:smollm2-135m-instruct", spec.get("adapter")
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"{adapter} is not a PEFT adapter directory (no adapter_config.json)")
    if load_in_4bit:
        # transformers 5 no longer takes from_pretrained(load_in_4bit=True), the harness' own 4-bit argument: the
        # base is quantized by tunelab's loader (bitsandbytes NF4, the adapter applied by PEFT as the harness would)
        # and handed to the harness' HF model ready-made.
        from lm_eval.models.huggingface import HFLM

        from tunelab.models import load_for_inference

        model, tok = load_for_inference(base, adapter=adapter, load_in_4bit=True)
        return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size), None
    path = resolve_source(base)
    # a run's adapter directory carries the tokenizer (and chat template) it was trained with
    tokenizer = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else path
    args = {"pretrained": path, "tokenizer": tokenizer, "dtype": "float32",
            "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if adapter:
        args["peft"] = adapter
    return "hf", args


# ---------------------------------------------------------------------------------------------------- evaluating

def evaluate(model, model_args, tasks: Tasks, *, n: int | None = None, batch_size: int = 16,
             num_fewshot: int | None = None, chat_template: bool = False, seed: int | None = None) -> dict[str, dict]:
    """Run the harness on one model; returns {"lm-eval:TASK": result} in tunelab's result shape (see `results`)."""
    from lm_eval import simple_evaluate

    seeds = {} if seed is None else {"random_seed": seed, "numpy_random_seed": seed, "torch_random_seed": seed,
                                     "fewshot_random_seed": seed}
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its INFO lines would bury tunelab's summary
    out = simple_evaluate(model=model, model_args=model_args, tasks=tasks.specs, task_manager=tasks.manager,
                          num_fewshot=num_fewshot, batch_size=batch_size, limit=n, log_samples=True,
                          bootstrap_iters=BOOTSTRAP_ITERS, apply_chat_template=chat_template, **seeds)
    return results(out)


def _metric_label(key: str) -> tuple[str, str, str] | None:
    """'acc,none' -> (label 'acc', metric 'acc', filter 'none'); 'exact_match,strict-match' -> 'exact_match
    (strict-match)'. None for keys that are not metrics (alias, name, sample_len)."""
    if "," not in key:
        return None
    metric, filt = key.split(",", 1)
    return (metric if filt == "none" else f"{metric} ({filt})"), metric, filt


def results(out: dict) -> dict[str, dict]:
    """The harness' results as tunelab task results: {"lm-eval:TASK": {"n", <metric>: value, "<metric> stderr",
    "metrics": [(key, higher_is_better)], "examples": [...]}} for each task and group it reports."""
    higher = out.get("higher_is_better") or {}
    counts = out.get("n-samples") or {}
    configs = out.get("configs") or {}
    samples = out.get("samples") or {}
    converted = {}
    for task, row in {**(out.get("results") or {}), **(out.get("groups") or {})}.items():
        res: dict = {"metrics": []}
        for key, value in row.items():
            parsed = _metric_label(key)
            if parsed is None or parsed[1].endswith("_stderr"):
                continue
            label, metric, filt = parsed
            res[label] = value if isinstance(value, (int, float)) else None
            res["metrics"].append((label, (higher.get(task) or {}).get(metric, True)))
            stderr = row.get(f"{metric}_stderr,{filt}")
            if isinstance(stderr, (int, float)):
                res[f"{label} stderr"] = stderr
                res["metrics"].append((f"{label} stderr", None))
        res["n"] = (counts.get(task) or {}).get("effective", row.get("sample_len"))
        output_type = (configs.get(task) or {}).get("output_type")
        res["examples"] = [_example(s, output_type) for s in samples.get(task, [])]
        converted[PREFIX + task] = res
    return converted


def _example(sample: dict, output_type: str | None) -> dict:
    """One harness sample record as a report example: {prompt, reference, output, verdict, <metrics>}."""
    from tunelab.evaluation.report import fmt

    args = sample.get("arguments") or [[""]]
    resps = sample.get("filtered_resps") or []
    target = sample.get("target")
    scores = {m: sample[m] for m in sample.get("metrics") or [] if isinstance(sample.get(m), (int, float))}
    ex = {"doc_id": sample.get("doc_id"), "prompt": str(args[0][0])}
    if output_type == "multiple_choice":
        # one log-likelihood request per choice: the model's answer is the likeliest continuation
        lls = [r[0] if isinstance(r, (list, tuple)) else r for r in resps]
        best = max(range(len(lls)), key=lambda i: lls[i]) if lls else None
        choices = [str(a[1]).strip() for a in args]
        ex["output"] = choices[best] if best is not None else ""
        ex["reference"] = choices[target] if isinstance(target, int) and 0 <= target < len(choices) else str(target)
        ex["choices"], ex["loglikelihoods"] = choices, lls
    else:
        ex["output"] = str(resps[0]) if resps else ""
        ex["reference"] = str(target) if target is not None else None
    ex.update(scores)
    ex["verdict"] = ", ".join(f"{k} {fmt(float(v))}" for k, v in scores.items())
    first = next(iter(scores.values()), None)
    if first in (0, 1):  # a right-or-wrong sample (acc, exact_match): marked as the report marks GSM8K answers
        ex["verdict"] += " ✓" if first == 1 else " ✗"
    return ex
