"""Ollama export: a verified GGUF plus a Modelfile (FROM, TEMPLATE, SYSTEM, PARAMETER stop).

Ollama templates are Go templates, not Jinja, so the model's chat template cannot be copied over. Instead the Jinja
template is identified by what it renders: a few probe conversations are rendered with it and compared with known
formats (ChatML, Llama 3). When one matches exactly, its Go equivalent is written, and a system prompt the template
inserts on its own (SmolLM2 does) becomes the Modelfile's SYSTEM. An unrecognized template gets no TEMPLATE line and a
warning: Ollama then falls back to its own detection from the chat template stored in the GGUF.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.export.common import Run, atomic_path, check_target

CHATML_GO = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""

LLAMA3_GO = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if or (eq .Role "user") (eq .Role "assistant") }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|eot_id|>{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}"""


def _chatml(msgs, gen: bool) -> str:
    s = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
    return s + ("<|im_start|>assistant\n" if gen else "")


def _llama3(msgs, gen: bool) -> str:
    s = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in msgs)
    return s + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if gen else "")


# name -> (reference renderer, Go template, stop strings, how a default system prompt is delimited)
FORMATS = {
    "chatml": (_chatml, CHATML_GO, ["<|im_start|>", "<|im_end|>"], ("<|im_start|>system\n", "<|im_end|>\n")),
    "llama3": (_llama3, LLAMA3_GO, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>")),
}

_PROBE = [{"role": "system", "content": "SYS-1"}, {"role": "user", "content": "USER-1"},
          {"role": "assistant", "content": "ASSISTANT-1"}, {"role": "user", "content": "USER-2"}]


def detect_template(tok) -> tuple[str | None, str | None]:
    """(format name, default system prompt) for the tokenizer's chat template; (None, None) when unrecognized."""
    if not tok.chat_template:
        return None, None

    def renders(msgs) -> list[str]:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        # A template that writes BOS itself (Llama 3) renders it as text, while llama.cpp adds BOS on its own; but
        # a BOS that is also part of the format (SmolLM2's BOS is <|im_start|>) must stay: try both readings.
        if tok.bos_token and text.startswith(tok.bos_token):
            return [text, text[len(tok.bos_token):]]
        return [text]

    try:
        fulls, bares = renders(_PROBE), renders(_PROBE[1:2])
    except Exception:  # a template that rejects the probe (e.g. one that allows no system message)
        return None, None
    for name, (ref, _, _, (sys_open, sys_close)) in FORMATS.items():
        if ref(_PROBE, True) not in fulls:
            continue
        for bare in bares:
            if bare == ref(_PROBE[1:2], True):
                return name, None
            if bare.startswith(sys_open) and sys_close in bare:
                default = bare[len(sys_open):bare.index(sys_close)]
                if bare == ref([{"role": "system", "content": default}] + _PROBE[1:2], True):
                    return name, default
    return None, None


def _quote(text: str) -> str:
    if '"""' in text:
        raise ValueError("text contains a triple quote")
    return f'"""{text}"""'


def modelfile(tok, gguf_name: str) -> tuple[str, str | None]:
    """(Modelfile text, detected template format or None)."""
    fmt, default_system = detect_template(tok)
    lines = [f"FROM ./{gguf_name}"]
    stops: list[str] = []
    if fmt:
        _, go, fmt_stops, _ = FORMATS[fmt]
        lines.append(f"TEMPLATE {_quote(go)}")
        if default_system:
            lines.append(f"SYSTEM {_quote(default_system)}")
        stops += fmt_stops
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

    check_target(out, overwrite)
    model, tok, _ = merged_model(run)
    name = run.name.lower()
    gguf_name = f"{name}-{qtype}.gguf"
    with atomic_path(out, overwrite, is_dir=True) as tmp:
        if not _reuse_gguf(run.path / "export" / gguf_name, tmp / gguf_name, model, tok, qtype):
            export_gguf(model, tok, tmp / gguf_name, qtype, name=run.name)
        text, fmt = modelfile(tok, gguf_name)
        (tmp / "Modelfile").write_text(text)
    if fmt:
        print(f"Modelfile: chat template recognized as {fmt}; TEMPLATE and stop parameters written")
    else:
        print("warning: the chat template is not one tunelab can translate to an Ollama TEMPLATE (ChatML, Llama 3); "
              "the Modelfile has none, so Ollama will use its own detection from the GGUF's chat template")
    print(f"Ollama files written to {out}; load with: ollama create {name} -f {out / 'Modelfile'}")
    return out
