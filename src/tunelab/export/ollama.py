"""Ollama export: a verified GGUF plus a Modelfile (FROM, TEMPLATE, SYSTEM, PARAMETER stop).

Ollama templates are Go templates, not Jinja, so the model's chat template cannot be copied over. Instead the Jinja
template is identified by what it renders: a few probe conversations are rendered with it and compared with known
formats: ChatML, Llama 3, and every other built-in template of tunelab.data.templates (Mistral, Gemma, Phi,
Alpaca-style instruction/response, plain completion), each with its own end-of-turn token or the tokenizer's EOS
(what a built-in template ends turns with when the tokenizer lacks the format's token). When one matches exactly, its
Go equivalent is written with that end-of-turn token, the token is a stop parameter, and a system prompt the template
inserts on its own (SmolLM2 does) becomes the Modelfile's SYSTEM. A BOS the Jinja template writes before the format
is written into the Go template too unless the GGUF has llama.cpp add it (add_bos_token), so the prompt Ollama
tokenizes is the one training saw. An unrecognized template gets no TEMPLATE line and a
warning: Ollama then falls back to its own detection from the chat template stored in the GGUF. The formats and their
Go templates are in tunelab.export.chat_formats.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.export.chat_formats import FORMATS, _detect, _match, adds_bos, detect_template, go_template  # noqa: F401
from tunelab.export.common import Run, atomic_path, check_target

def _quote(text: str) -> str:
    if '"""' in text:
        raise ValueError("text contains a triple quote")
    return f'"""{text}"""'


def modelfile(tok, gguf_name: str) -> tuple[str, str | None]:
    """(Modelfile text, detected template format or None)."""
    fmt, default_system, end, writes_bos = _match(tok)
    lines = [f"FROM ./{gguf_name}"]
    stops: list[str] = []
    if fmt:
        template = go_template(fmt, end)
        if writes_bos and not adds_bos(tok):
            # Training saw the BOS the Jinja template writes. llama.cpp adds BOS on its own only where the GGUF says
            # add_bos_token, which needs a tokenizer that adds one too (chat_formats.adds_bos; a GPT-2-style one
            # adds none): the prompt Ollama renders then needs the BOS as text, which it tokenizes as the special
            # token.
            template = tok.bos_token + template
        lines.append(f"TEMPLATE {_quote(template)}")
        if default_system:
            lines.append(f"SYSTEM {_quote(default_system)}")
        stops += [*FORMATS[fmt].markers, end]
    if tok.eos_token and tok.eos_token not in stops:
        stops.append(tok.eos_token)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n", fmt


def _reuse_gguf(existing: Path, dest: Path, model, tok, qtype: str) -> bool:
    """Put the GGUF that `--to gguf` already wrote for this run and type at `dest`, when it still reproduces the run's
    model (the same checks as a fresh export: it may predate a retraining); False when there is none or it fails.

    Converting and quantizing again costs minutes on a 1B model; checking the file costs a load and a few prompts.
    """
    import os
    import shutil

    from tunelab.export import llamacpp
    from tunelab.export.gguf import verify_gguf

    if not existing.is_file():
        return False
    print(f"found {existing}: checking it against the run's model before reusing it")
    if not (verify_gguf(existing, model, tok, qtype)["ok"] and llamacpp.verify(existing, model, tok, qtype)):
        print(f"{existing} does not reproduce the run's model (exported before a retraining?): converting again")
        return False
    try:  # a hard link costs no disk; both names are only ever replaced whole (atomic_path), never written in place
        os.link(existing, dest)
    except OSError:  # another filesystem, or one without links
        shutil.copy2(existing, dest)
    print(f"reusing {existing} (GGUF {qtype}, checked)")
    return True


def export_ollama(run: Run, out: Path, qtype: str = "q8_0", overwrite: bool = False) -> Path:
    from tunelab.export.gguf import export_gguf
    from tunelab.export.merge import merged_model

    from tunelab.export.gguf import check_exportable

    check_target(out, overwrite, "ollama")
    check_exportable(run)  # before the merge: an architecture GGUF export cannot write is refused at once
    model, tok, _ = merged_model(run)
    name = run.name.lower()
    gguf_name = f"{name}-{qtype}.gguf"
    with atomic_path(out, overwrite, "ollama") as tmp:
        if not _reuse_gguf(run.path / "export" / gguf_name, tmp / gguf_name, model, tok, qtype):
            export_gguf(model, tok, tmp / gguf_name, qtype, name=run.name, shown=out / gguf_name)
        text, fmt = modelfile(tok, gguf_name)
        (tmp / "Modelfile").write_text(text)
    if fmt:
        print(f"Modelfile: chat template recognized as {fmt}; TEMPLATE and stop parameters written")
    else:
        print("warning: the chat template is not one tunelab can translate to an Ollama TEMPLATE "
              f"({', '.join(FORMATS)}); "
              "the Modelfile has none, so Ollama will use its own detection from the GGUF's chat template")
    print(f"Ollama files written to {out}; load with: ollama create {name} -f {out / 'Modelfile'}")
    return out
