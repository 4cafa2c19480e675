"""What every export shares: reading a run directory, writing output atomically, and comparing logits.

A run directory (written by `tunelab train`) holds `config.yaml` (the resolved config) and `final/`, which is either a
PEFT adapter (adapter_config.json) over the base model named in `model.source`, or a full transformers model.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import UserError

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


@dataclass
class Run:
    """A finished run: where its final artifact is and what it was trained from."""

    path: Path
    config: dict
    final: Path
    is_adapter: bool
    base: str | None  # model.source for adapter runs (hub id, local dir or embedded:NAME)
    adapter_type: str = "none"
    quant_bits: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    def tokenizer(self):
        """The tokenizer the run trained with: final/'s when it saved one (it may carry a changed chat template),
        else the base model's. Loaded as saved: no pad token is invented, so what gets exported is what was trained."""
        from transformers import AutoTokenizer

        from tunelab.models import resolve_source

        src = str(self.final) if (self.final / "tokenizer_config.json").is_file() else resolve_source(self.base)
        return AutoTokenizer.from_pretrained(src)


def load_run(run: str) -> Run:
    import yaml

    p = Path(run)
    if not p.is_dir() and Path("runs", run).is_dir():  # `tunelab export NAME` as well as a path
        p = Path("runs", run)
    if not p.is_dir():
        raise UserError(f"run directory {run} does not exist (pass runs/<name>, as written by `tunelab train`)")
    cfg_file = p / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"{p} has no config.yaml: not a tunelab run directory")
    final = p / "final"
    if not final.is_dir():
        raise UserError(f"run {p} has no final/ model yet (train it to the end first)")
    try:
        cfg = yaml.safe_load(cfg_file.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{cfg_file}: invalid YAML ({str(e).splitlines()[0]})") from None
    is_adapter = (final / "adapter_config.json").is_file()
    if not is_adapter and not (final / "config.json").is_file():
        raise UserError(f"{final} holds neither a PEFT adapter (adapter_config.json) nor a model (config.json)")
    base = (cfg.get("model") or {}).get("source")
    if is_adapter and not base:
        raise UserError(f"{cfg_file}: model.source is missing; it names the base model the adapter was trained on")
    return Run(path=p, config=cfg, final=final, is_adapter=is_adapter, base=base,
               adapter_type=(cfg.get("adapter") or {}).get("type") or ("lora" if is_adapter else "none"),
               quant_bits=(cfg.get("quantization") or {}).get("bits"))


def check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it (or --out to write elsewhere)")


@contextlib.contextmanager
def atomic_path(target: Path, overwrite: bool, is_dir: bool, suffix: str = ".partial"):
    """Yield a temporary sibling of `target`; on success it is renamed into place, on failure removed.

    A crash or a failed parity check therefore never leaves a half-written export under the final name, and an
    existing export is only replaced (with --overwrite) once the new one is complete.
    """
    target = Path(target)
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if target.exists():  # only reachable with overwrite=True
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()


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
                [[r.prompt, r.tokens, f"{r.max_abs:.3g}", f"{r.rel:.3g}", f"{r.top1:.0%}", "yes" if r.rel <= tol else "NO"]
                 for r in rows])
    return all(r.rel <= tol for r in rows)


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    print(title)
    print("  " + "  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
