"""Command line: a table of subcommands, each mapped to `module:function`.

Only argparse is imported here, so `tunelab --help` answers instantly; the module behind a subcommand (and torch) is
imported when that subcommand runs. Each target function takes the parsed `argparse.Namespace` and returns an exit
code (or None for 0). A `UserError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

A = lambda *flags, **kw: (flags, kw)  # noqa: E731  (an argument spec: flags + argparse kwargs)


def _positive(kind, zero_ok: bool = False):
    """An argparse type: a number of `kind` above zero (a count of trials or processes, a memory budget), or with
    zero_ok at least zero (a count of examples or of waiting requests)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value < 0 or not (zero_ok or value > 0):
            raise argparse.ArgumentTypeError(f"must be {'0 or more' if zero_ok else 'above 0'}, got {text}")
        return value
    parse.__name__ = f"{'non-negative' if zero_ok else 'positive'} {kind.__name__}"
    return parse


positive_int, positive_float, count = _positive(int), _positive(float), _positive(int, zero_ok=True)

OVERRIDES = A("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. training.learning_rate=1e-4")
MODEL_ARGS = [
    A("--model", default="embedded:smollm2-135m-instruct", help="hub id, local dir or embedded:NAME"),
    A("--adapter", default=None, help="a PEFT adapter directory to apply over --model"),
    A("--run", default=None, help="a run directory: use its final model/adapter (and its base model)"),
]

# Shared by chat / serve / ui. --model has no default here so that --run can bring its own base model.
INFER_ARGS = [
    A("--model", default=None, help="base model: hub id, local dir or embedded:NAME (default: the --run's base, "
      "else embedded:smollm2-135m-instruct)"),
    A("--run", action="append", default=[], help="a run directory: its final adapter (over its base) or full model"),
    A("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype of the base"),
    A("--load-in-4bit", action="store_true",
      help="load the base in 4 bits (bitsandbytes NF4); adapters stay full precision"),
]

# `tunelab eval` / `tunelab compare`: data, size and generation settings shared by both (plain ints: their ranges
# are checked by evaluation.main, which the Python API `evaluate` shares)
EVAL_ARGS = [
    A("--data", default=None, help="evaluation data: a file the data layer reads or bundled:NAME "
      "(default for gsm8k and perplexity: bundled:gsm8k/test)"),
    A("--format", default="auto", help="data format when detection is not enough (see tunelab data inspect)"),
    A("--column", action="append", metavar="YOURS=EXPECTED",
      help="rename a data field (repeatable), e.g. --column summaries=references"),
    A("--n", type=int, default=None, help="evaluate only the first N samples (default: all for eval, 50 for compare)"),
    A("--k-shot", type=int, default=0, help="gsm8k: solved training examples shown as earlier chat turns"),
    A("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples"),
    A("--top-p", type=float, default=1.0, help="nucleus sampling when --temperature > 0"),
    A("--seed", type=int, default=None, help="seed for sampling"),
    A("--max-new-tokens", type=int, default=256, help="longest generation per sample"),
    A("--batch-size", type=int, default=16, help="samples generated (or scored) together"),
    A("--lm-eval-include", action="append", metavar="DIR",
      help="lm-eval tasks: a folder of task YAMLs whose tasks --task lm-eval:NAME can name (repeatable)"),
    A("--lm-eval-fewshot", type=int, default=None, metavar="K",
      help="lm-eval tasks: few-shot examples (default: each task's own)"),
    A("--lm-eval-chat-template", action="store_true",
      help="lm-eval tasks: render prompts with the model's chat template"),
]
TASK_HELP = ("gsm8k, summarization, perplexity, prompts, or lm-eval:NAME (an lm-evaluation-harness task or group, "
             "or lm-eval:path/to/task.yaml; needs the lmeval extra)")

# name -> (target, help, [argument specs])
COMMANDS: dict[str, tuple[str, str, list]] = {
    "train": ("tunelab.train:main", "train from a YAML config", [
        A("config", help="path to a YAML config (see configs/)"),
        OVERRIDES,
        A("--overwrite", action="store_true", help="delete an existing run directory of the same name and start over"),
        A("--nproc", type=positive_int, default=1,
          help="processes on this machine (data-parallel through torchrun; one per "
          "GPU, or CPU processes over gloo); the config's distributed: section picks DDP, FSDP or DeepSpeed"),
    ]),
    "sweep": ("tunelab.sweep:main", "search hyper-parameters: grid / random / Optuna trials, results table, plots", [
        A("sweep", help="a sweep YAML (see configs/sweeps/)"),
        A("--trials", type=positive_int, default=None, help="trial budget (overrides search.trials)"),
        A("--storage", default=None, metavar="URL", help="the study's storage, shared by every worker pointed at it "
          "(overrides search.storage): postgresql://USER:PASS@HOST/DB or journal:PATH"),
        A("--dry-run", action="store_true", help="check the sweep and list its trials; train nothing"),
        A("--overwrite", action="store_true", help="delete the sweep's trials and study and start over"),
    ]),
    "estimate": ("tunelab.estimate:main", "predict a run's peak memory (by part), FLOPs and time before loading it", [
        A("config", help="path to a YAML config (see configs/)"), OVERRIDES,
        A("--device", default="cpu", choices=["cpu", "h100", "h200", "a100", "4090", "t4"],
          help="device to estimate for"),
        A("--budget-gb", type=positive_float, default=None, help="memory budget (default: the GPU's memory)"),
        A("--nproc", type=positive_int, default=1,
          help="data-parallel processes (one per GPU): memory per device under the "
          "config's distributed.strategy (ddp / fsdp / deepspeed shard different parts)"),
        A("--price-per-hour", type=float, default=None, help="USD per device-hour for the cost per step and per "
          "run (default: a typical on-demand price for --device, shown with the estimate)"),
        A("--json", action="store_true", help="print the estimate as JSON"),
    ]),
    "quickstart": ("tunelab.quickstart:main", "fine-tune the embedded model on bundled GSM8K and show before/after", [
        A("--config", default=None, help="config to use (default: configs/quickstart.yaml, or the packaged copy)"),
        OVERRIDES,
        A("--eval-n", type=positive_int, default=50, help="held-out questions scored before and after"),
        A("--overwrite", action="store_true", help="start the quickstart run over"),
    ]),
    "data": {"help": "look at a dataset the way training will see it", "commands": {
        "inspect": ("tunelab.data.inspection:main", "detected format, counts, token lengths, the first sample with its "
                    "trained tokens highlighted, and warnings", [
            A("source", help="a file, directory, glob, bundled:NAME or hub dataset id"),
            A("--model", default="embedded:smollm2-135m-instruct", help="whose tokenizer and chat template to use"),
            A("--chat-template", default=None, metavar="NAME|JINJA|FILE",
              help="the template a run's model.chat_template gives (default: the model's own)"),
            A("--system-prompt", default=None, help="as data.system_prompt: added to conversations that have none"),
            A("--json", action="store_true", help="print the report as JSON"),
            A("--format", default="auto", help="the data format (default: detect)"),
            A("--column", action="append", metavar="YOURS=EXPECTED", help="rename a field (repeatable)"),
            A("--max-length", type=positive_int, default=1024, help="count samples longer than this many tokens"),
            A("--split", default=None, help="hub dataset split (default train)"),
            A("--name", default=None, help="hub dataset config name"),
            A("--limit", type=positive_int, default=None, help="measure token lengths on the first N samples only"),
            A("--strict", action="store_true", help="stop at the first invalid row instead of counting them"),
        ]),
    }},
    "chat": ("tunelab.inference.chat:main", "chat with a model (and adapter) in the terminal, streaming replies", [
        *INFER_ARGS,
        A("--adapter", default=None, help="a PEFT adapter directory to apply over --model"),
        A("--merge", action="store_true", help="merge the adapter into the base weights first (faster replies)"),
        A("--system", default=None, help="system prompt text, or @FILE"),
        A("--persona", default=None, help="a built-in system prompt: assistant, tutor, pirate, storyteller"),
        A("--temperature", type=float, default=0.7, help="0 = greedy"),
        A("--top-p", type=float, default=0.9, help="nucleus sampling: keep the most likely tokens up to this mass"),
        A("--max-tokens", type=positive_int, default=256, help="longest reply, in tokens"),
        A("--seed", type=int, default=None, help="seed for sampling (default: a different reply each time)"),
    ]),
    "serve": ("tunelab.inference.server:main", "OpenAI-compatible API: one base, any number of adapters", [
        *INFER_ARGS,
        A("--adapter", action="append", default=[], metavar="[NAME=]PATH",
          help="an adapter to serve as model NAME (default: its directory name); repeat for more"),
        A("--served-model-name", default=None, help="the base model's name in the API (default: its dir name or id)"),
        A("--host", default="127.0.0.1", help="address to bind (default loopback only; 0.0.0.0 exposes it)"),
        A("--port", type=int, default=8000, help="port to listen on"),
        A("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $TUNELAB_API_KEY if set)"),
        A("--max-concurrency", type=positive_int, default=1, help="generations running at once"),
        A("--max-queue", type=count, default=16, help="requests waiting beyond those; more get 429"),
        A("--max-tokens", type=positive_int, default=512, help="default and largest max_tokens per request"),
        A("--max-choices", type=positive_int, default=16,
          help="most completions one request may ask for: prompts x n (more get 400)"),
        A("--max-body-bytes", type=positive_int, default=4 * 1024 * 1024,
          help="largest request body in bytes (default 4 MiB; larger get 413 before being read)"),
    ]),
    "ui": ("tunelab.inference.webui:main", "web UI (Gradio): Chatbot and Storymaker tabs", [
        *INFER_ARGS,
        A("--adapter", action="append", default=[], metavar="[NAME=]PATH", help="an adapter to offer; repeatable"),
        A("--host", default="127.0.0.1", help="address to bind (default loopback only)"),
        A("--port", type=int, default=7860, help="port to listen on"),
    ]),
    "export": ("tunelab.export:main", "export a run: merged model, verified GGUF, Ollama Modelfile, or Hub push", [
        A("run", help="a run directory (runs/NAME) or run name"),
        A("--to", required=True, choices=["merged", "gguf", "ollama", "hub"], help="what to produce"),
        A("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="merged: weight dtype (default fp32)"),
        A("--type", default=None, help="gguf/ollama: f32 f16 bf16 q8_0 q4_0 (Python) or q4_k_m ... (llama.cpp); "
          "default q8_0"),
        A("--out", default=None, help="output path (default: RUN/export/...)"),
        A("--repo", default=None, help="hub: repository id, e.g. you/my-model"),
        A("--private", action="store_true", help="hub: create the repository private"),
        A("--dry-run", action="store_true", help="hub: list exactly the files that would be uploaded, upload nothing"),
        A("--overwrite", action="store_true", help="replace an existing export output"),
        A("--verbose", action="store_true", help="gguf/ollama: show llama.cpp's own log (quantization, loading)"),
    ]),
    "infer": ("tunelab.export:infer", "CPU inference on a GGUF file through llama.cpp (needs llama-cpp-python)", [
        A("--gguf", required=True, help="the GGUF file"),
        A("--prompt", default=None, help="one prompt; without it, read prompts from stdin"),
        A("--system", default=None, help="system prompt"),
        A("--max-new-tokens", type=positive_int, default=256, help="longest reply, in tokens"),
        A("--n-ctx", type=positive_int, default=2048, help="context window in tokens"),
        A("--threads", type=positive_int, default=None, help="CPU threads (default: llama.cpp's choice)"),
    ]),
    "eval": ("tunelab.evaluation.main:main", "evaluate a model, adapter or run on gsm8k, summarization, perplexity, "
             "a prompts file or lm-evaluation-harness tasks", [
        *MODEL_ARGS,
        A("--task", required=True, action="append", metavar="TASK", help=TASK_HELP + "; repeatable"),
        *EVAL_ARGS,
        A("--load-in-4bit", action="store_true", help="load the base in 4 bits (bitsandbytes NF4); an adapter stays "
          "as trained"),
        A("--out", default=None, help="write results: FILE.json, or a directory for report.md/.html "
          "(default with --run: RUN/eval/TASK.json)"),
    ]),
    "compare": ("tunelab.evaluation.main:compare", "compare models side by side (a run's base vs the run, or runs): "
                "metric table and examples in report.md/report.html", [
        A("models", nargs="+", metavar="RUN_OR_MODEL", help="one run (its base vs it), or two or more runs/models"),
        A("--task", action="append", metavar="TASK",
          help=TASK_HELP + "; repeatable (default: the run's eval.task, else perplexity on its validation "
          "data, else gsm8k)"),
        *EVAL_ARGS,
        A("--load-in-4bit", nargs="*", default=None, metavar="MODEL", help="load bases in 4 bits (bitsandbytes NF4): "
          "every model's, or only those named (as given), e.g. a run (adapter on the 4-bit base) beside its merged "
          "export"),
        A("--out", default=None, help="report directory (default: the last run given)"),
    ]),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after each option's help, except where it says nothing (no default, a flag that is
    off) or where the help text already explains its default in words."""

    def _get_help_string(self, action):
        off = action.default is None or action.default is False or action.default == [] or \
            action.default == argparse.SUPPRESS
        if off or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add(sub, name: str, spec) -> None:
    target, help_text, args = spec
    p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
    for flags, kw in args:
        p.add_argument(*flags, **kw)
    p.set_defaults(_target=target)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab", description="Fine-tune open LLMs end to end.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, spec in COMMANDS.items():
        if isinstance(spec, dict):  # a command group, e.g. `tunelab data inspect`
            group = sub.add_parser(name, help=spec["help"], description=spec["help"], formatter_class=HelpFormatter)
            gsub = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            for sub_name, sub_spec in spec["commands"].items():
                _add(gsub, sub_name, sub_spec)
        else:
            _add(sub, name, spec)
    return parser


def _subparser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command `args` ran, for its own usage line in an error."""
    for name in (getattr(args, "command", None), getattr(args, "subcommand", None)):
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not name or not actions:
            break
        parser = actions[0].choices.get(name, parser)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, except that key=value overrides may also follow a flag (`train my.yaml --overwrite k=v`): argparse
    ends a positional nargs='*' list at the first flag, and leaves what comes after it unparsed."""
    args, rest = parser.parse_known_args(argv)
    if rest:
        overrides = [x for x in rest if "=" in x and not x.startswith("-")]
        wrong = [x for x in rest if x not in overrides]
        sub = _subparser(parser, args)
        if wrong or not hasattr(args, "overrides"):
            sub.error(f"unrecognized arguments: {' '.join(wrong or rest)}")
        args.overrides = [*(args.overrides or []), *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    if args.version:
        from tunelab import __version__

        print(__version__)
        return 0
    if not getattr(args, "_target", None):
        parser.print_help()
        return 0
    import logging

    # bitsandbytes warns at import on CPUs with AVX512-BF16 that an optional hub kernel is missing; the built-in
    # kernel is used instead, so the warning is noise in front of every command's output. With HF_HUB_OFFLINE=1 the
    # `kernels` package it asks adds a note of its own (no publisher check offline) before that same failure.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("kernels._internals.hf_hub").setLevel(logging.ERROR)
    module_name, func_name = args._target.split(":")
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        # one process of a torchrun job: a crash's traceback goes to the launcher's error file, so the job's failure
        # summary shows it under "Root Cause" (the failing rank's error, not only its exit code) at the end of stderr
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(_call)(module_name, func_name, args)
    return _call(module_name, func_name, args)


def _call(module_name: str, func_name: str, args) -> int:
    from tunelab.errors import UserError

    try:
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(args) or 0)
    except UserError as e:
        from tunelab import distributed

        if not distributed.record_refusal(str(e)):  # one of `--nproc`'s processes: the launcher prints it once
            print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `tunelab ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
