"""What every export shares: opening a finished run, writing output atomically, and comparing logits.

A run directory (written by `tunelab train`) holds `config.yaml` (the resolved config) and `final/`, which is either a
PEFT adapter (adapter_config.json) over the base model named in `model.source`, or a full transformers model. It is
opened by tunelab.rundir.open_finished_run, as eval, serve and chat open it.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import UserError
from tunelab.rundir import FinishedRun, check_writable, find_run, open_finished_run
from tunelab.rundir import atomic_path as rundir_atomic_path

Run = FinishedRun  # a finished run as the exporters take it (path, config, final, is_adapter, base, summary)

# GGUF types: written in Python (gguf-py), or made by llama.cpp's quantizer from an f32 file
PYTHON_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
LLAMACPP_TYPES = ("q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q3_k_m", "q2_k")
TYPES = PYTHON_TYPES + LLAMACPP_TYPES

# Two logit checks when the GGUF is read back (relative error = RMS of the difference / std of the reference logits):
# - against the source with the file's own rounding applied in memory (rounded_reference): the file must reproduce
#   it to float precision, whatever the type, so a wrong layout, a lost tensor or bad metadata cannot hide;
# - against the float32 source: the quality budget of the type. Measured with the prompts below on a tiny
#   random Llama / on SmolLM2-135M-Instruct: f16 1e-3 / -, q8_0 0.014 / 0.026-0.043, q4_0 0.16 / 0.29-0.57
#   (a 135M model loses a lot at 4 bits: prefer q8_0 for it). The budgets sit above those values.
EXACT_TOLERANCE = 1e-3
TOLERANCE = {"f32": 1e-4, "f16": 1e-2, "bf16": 5e-2, "q8_0": 0.08, "q4_0": 0.75,
             "q6_k": 0.15, "q5_k_m": 0.3, "q5_k_s": 0.3, "q4_k_m": 0.6, "q4_k_s": 0.6, "q3_k_m": 0.9, "q2_k": 1.5}

# Prompts for the parity checks: chat turns (rendered with the model's own template, so special tokens are exercised)
# and plain text with digits, punctuation, unicode and odd whitespace (where tokenizers usually disagree).
CHAT_PROMPTS = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a primary colour."}],
]
TEXT_PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In 2024, 3.14159 x 1000 = 3141.59; café, naïve, 日本語 🙂\n\n  indented\ttab",
]


class ParityError(Exception):
    """An export does not reproduce its source (logits or tokenization): the CLI prints it and exits 1."""


def load_run(run: str) -> FinishedRun:
    """The finished run to export (a path, or NAME under runs/)."""
    p = Path(run)
    if p.is_dir() and find_run(run) is None and any((p / f).is_file() for f in ("config.json", "adapter_config.json")):
        # a model directory (a base, or an earlier --to merged) exists, so "does not exist" would mislead: export
        # reads the run's config.yaml and final/, which a model directory lacks
        raise UserError(f"{run} is a model directory, not a tunelab run: export takes a run directory written by "
                        f"`tunelab train` (e.g. runs/NAME), such as one trained with model.source={run}")
    r = open_finished_run(run, need_final=False)
    if not r.final.is_dir():
        # said here rather than by open_finished_run: its advice is for the commands that also take a checkpoint,
        # and export takes only a finished run
        raise UserError(f"run {r.path} has no final model yet, and export writes a run's final model: train it to "
                        "the end first (re-running the same `tunelab train` resumes it from its last checkpoint)")
    return r


# What an earlier export looks like, per target: --overwrite replaces only such a path, so that a mistaken --out (a
# folder of notes, a folder holding other models) is refused instead of deleted. A merged model is recognized by
# holding only what save_pretrained writes for a model and its tokenizer: no marker file is added to the model.
MERGED_FILES = re.compile(r"(config|generation_config|model\.safetensors\.index|tokenizer|tokenizer_config|"
                          r"special_tokens_map|added_tokens|vocab|chat_template)\.json|"
                          r"model(-\d+-of-\d+)?\.safetensors|chat_template\.jinja|merges\.txt|vocab\.txt|"
                          r"tokenizer\.model")


def is_gguf_file(path: Path) -> bool:
    """A file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return path.is_file() and f.read(4) == b"GGUF"
    except OSError:
        return False


def is_merged_model(path: Path) -> bool:
    """A directory as export --to merged writes it: config.json, safetensors weights, tokenizer files, nothing else."""
    if not path.is_dir():
        return False
    entries = list(path.iterdir())
    names = {p.name for p in entries}
    return ("config.json" in names and any(n.endswith(".safetensors") for n in names)
            and all(p.is_file() and MERGED_FILES.fullmatch(p.name) for p in entries))


def is_ollama_export(path: Path) -> bool:
    """A directory as export --to ollama writes it: a Modelfile and its GGUF, nothing else."""
    if not path.is_dir():
        return False
    entries = list(path.iterdir())
    return (any(p.name == "Modelfile" for p in entries)
            and all((p.name == "Modelfile" and p.is_file()) or is_gguf_file(p) for p in entries))


OUTPUTS = {"merged": ("a merged model (only config.json, *.safetensors and tokenizer files)", is_merged_model),
           "gguf": ("a GGUF file", is_gguf_file),
           "ollama": ("an Ollama export (only a Modelfile and its GGUF)", is_ollama_export)}


def check_target(path: Path, overwrite: bool, kind: str) -> None:
    """Refuse an existing `path` unless it is an earlier `kind` export (merged | gguf | ollama) and --overwrite is
    given: whatever else is there is the user's, and replacing it would delete it."""
    if not (path.exists() or path.is_symlink()):
        return
    what, is_export = OUTPUTS[kind]
    if not is_export(path):
        raise UserError(f"{path} already exists and is not {what}, so export will not replace it, even with "
                        "--overwrite; pass --out a path that does not exist yet")
    if not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it (or --out to write elsewhere)")


def output_path(run: Run, to: str, out, qtype: str, overwrite: bool) -> Path:
    """Where `export --to {merged,gguf,ollama}` writes, checked before any model is loaded: the default under
    RUN/export/, or --out. Refuses a path that is, holds or is part of the run, a place that cannot be written, and an
    existing path that is not an earlier export of the same kind (check_target)."""
    name = {"merged": "merged", "gguf": f"{run.name}-{qtype}.gguf", "ollama": "ollama"}[to]
    if out is None:
        target = run.path / "export" / name
    else:
        target = Path(out)
        # A GGUF is one file: a directory (existing, or written with a trailing slash) is where to put it, under the
        # default name. An Ollama export is itself a directory, so only an existing directory that is not one gets
        # the export inside it.
        if to == "gguf" and (str(out).endswith(("/", os.sep)) or target.is_dir()):
            target = target / name
        elif to == "ollama" and target.is_dir() and not is_ollama_export(target):
            target = target / name
    _check_outside_run(run, target)
    check_writable(target.parent, "--out", target)
    check_target(target, overwrite, to)
    return target


def _check_outside_run(run: Run, target: Path) -> None:
    """Refuse an output that would replace the run or sit among its own files (final/, checkpoints/, ...): exports of
    a run belong under RUN/export/ or outside the run."""
    r, t = run.path.resolve(), target.resolve()
    exports = r / "export"
    if t == r or t in r.parents:
        raise UserError(f"--out {target} {'is' if t == r else 'holds'} the run {run.path}, which export never "
                        f"replaces; leave --out out (exports go to {run.path / 'export'}) or pass a path outside it")
    if r in t.parents and t != exports and exports not in t.parents:
        raise UserError(f"--out {target} is among the run's own files in {run.path}; leave --out out (exports go to "
                        f"{run.path / 'export'}) or pass a path outside the run")


@contextlib.contextmanager
def atomic_path(target: Path, overwrite: bool, kind: str, suffix: str = ".partial"):
    """Yield a temporary sibling of `target` (a file for a GGUF, else a directory); on success it is renamed into
    place, on failure removed (tunelab.rundir.atomic_path), once `target` is checked free or an earlier `kind` export
    that --overwrite may replace (check_target).

    A crash or a failed parity check therefore never leaves a half-written export under the final name, and an
    existing export is only replaced (with --overwrite) once the new one is complete; the hidden partial one that a
    killed export leaves is removed by the next export to that target.
    """
    check_target(Path(target), overwrite, kind)
    with rundir_atomic_path(target, is_dir=kind != "gguf", suffix=suffix, reclaim=True) as tmp:
        yield tmp
        _usual_modes(tmp)


def _umask() -> int:
    """The process umask. Linux reports it in /proc; elsewhere reading it means setting it, briefly, for all threads."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        old = os.umask(0o022)
        os.umask(old)
        return old


def _usual_modes(root: Path) -> None:
    """Give an export the permissions a plain `cp` would: 0666/0777 less the umask (0644/0755 under umask 022).

    Exports are read by other accounts (an Ollama service, a shared model directory), but some writers create private
    files (transformers writes model.safetensors through a 0600 temporary file), so the modes are set once, here."""
    mask = _umask()
    for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def run_tokenizer(run: Run):
    """The tokenizer the run trained with: final/'s when it saved one (it carries the chat template it rendered with),
    else the base model's with the run's `model.chat_template` (or the default for a base without one) set as
    training set it. Loaded as saved: no pad token is invented, so what gets exported is what was trained."""
    from transformers import AutoTokenizer

    from tunelab.data import templates
    from tunelab.models import resolve_source

    if (run.final / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(run.final))
    tok = AutoTokenizer.from_pretrained(resolve_source(run.base))
    templates.apply(tok, (run.config.get("model") or {}).get("chat_template"))
    return tok


def trained_end_of_turn(tok) -> int | None:
    """The token the run's chat template ends assistant turns with, when it is not the tokenizer's EOS (chatml's
    <|im_end|> over a base whose EOS is <|endoftext|>); None when turns end with EOS. Taken from the data layer,
    which knows what was trained."""
    from tunelab.data.render import end_of_turn_ids

    others = end_of_turn_ids(tok) - {tok.eos_token_id}
    return min(others) if others else None


def trained_stop_ids(tok, model) -> list[int]:
    """The ids generation must stop on: the model's generation EOS (or the tokenizer's) first, then every other
    end-of-turn id the run trained. transformers' `generate` and vLLM stop on generation_config.eos_token_id, so a
    trained end of turn missing from it lets the exported model talk past its own reply. Narrower than
    rollout.stop_token_ids, which tunelab's own generation stops on (any known end-of-turn token in the vocabulary):
    what is written into a shipped model's metadata is what the run trained, nothing more."""
    from tunelab.data.render import end_of_turn_ids

    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    first = [gen] if isinstance(gen, int) else list(gen or [])
    if not first and tok.eos_token_id is not None:
        first = [tok.eos_token_id]
    return first + sorted(end_of_turn_ids(tok, model) - set(first))


# Texts whose tokenization must be identical between the source tokenizer and the one rebuilt from the GGUF (by
# transformers and by llama.cpp).
TOKENIZER_TEXTS = [
    "Hello world",
    " leading space, then  two spaces and a\ttab\n\nnew lines",
    "Digits: 1234567890, 3.14159, -42, 2024-06-01",
    "Unicode: café naïve Ωmega 日本語 한국어 🙂👍",
    "code: def f(x):\n    return x ** 2  # square",
]


def prompt_ids(tokenizer) -> list[list[int]]:
    """Token ids of the parity prompts (chat prompts only when the tokenizer has a chat template)."""
    out = []
    if tokenizer.chat_template:
        for msgs in CHAT_PROMPTS:
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            out.append(tokenizer.encode(text, add_special_tokens=False))
    out += [tokenizer.encode(t) for t in TEXT_PROMPTS]
    return out


def all_logits(model, ids_list: list[list[int]]) -> list:
    """Float32 logits of every prompt (one forward pass each, no batching: prompts differ in length)."""
    import torch

    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].float() for ids in ids_list]


@dataclass
class LogitRow:
    prompt: int
    tokens: int
    max_abs: float
    rel: float  # RMS error relative to the reference logits' standard deviation
    top1: float  # fraction of positions whose arg-max token agrees


def compare_logits(ref: list, other: list) -> list[LogitRow]:
    """Per prompt: how far `other`'s logits are from `ref`'s.

    The gate is a relative error (RMS of the difference over the spread of the reference logits), so one tolerance
    means the same thing for a random tiny model with logits near 0 and a trained model with logits near 20.
    """
    rows = []
    for i, (a, b) in enumerate(zip(ref, other)):
        d = a - b
        rel = float(d.pow(2).mean().sqrt() / a.std().clamp_min(1e-12))
        top1 = float((a.argmax(-1) == b.argmax(-1)).float().mean())
        rows.append(LogitRow(i, a.shape[0], float(d.abs().max()), rel, top1))
    return rows


def logit_table(title: str, rows: list[LogitRow], tol: float) -> bool:
    """Print the comparison; True when every prompt is within `tol`."""
    print_table(title, ["prompt", "tokens", "max|diff|", "rel err", "top-1 agree", f"ok (rel <= {tol:g})"],
                [[r.prompt, r.tokens, f"{r.max_abs:.3g}", f"{r.rel:.3g}", f"{r.top1:.0%}",
                  "yes" if r.rel <= tol else "NO"] for r in rows])
    return all(r.rel <= tol for r in rows)


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    print(title)
    print("  " + "  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
