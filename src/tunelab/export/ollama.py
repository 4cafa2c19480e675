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
warning: Ollama then falls back to its own detection from the chat template stored in the GGUF.

In the Go templates `@END@` stands for the end-of-turn token. As in Ollama's own templates, the last assistant turn is
left open (no end-of-turn), so a reply can be continued; system messages are read from `.Messages` where the format
places them itself (Mistral and Gemma put the system text before the next user turn).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tunelab.export.common import Run, atomic_path, check_target

CHATML_GO = """{{- if .System }}<|im_start|>system
{{ .System }}@END@
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}@END@
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}@END@
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""

LLAMA3_GO = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}@END@
{{- end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if or (eq .Role "user") (eq .Role "assistant") }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}@END@{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}"""

MISTRAL_GO = """{{- $sys := "" }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "system" }}{{ $sys = printf "%s\\n\\n" .Content }}
{{- else if eq .Role "user" }}[INST] {{ $sys }}{{ .Content }} [/INST]{{ $sys = "" }}
{{- else if eq .Role "assistant" }} {{ .Content }}{{ if not $last }}@END@{{ end }}
{{- end }}
{{- end }}"""

GEMMA_GO = """{{- $sys := "" }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "system" }}{{ $sys = printf "%s\\n\\n" .Content }}
{{- else if eq .Role "user" }}<start_of_turn>user
{{ $sys }}{{ .Content }}@END@
{{ $sys = "" }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}@END@
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<start_of_turn>model
{{ end }}
{{- end }}"""

PHI_GO = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if ne .Role "assistant" }}<|{{ .Role }}|>
{{ .Content }}@END@
{{ else }}<|assistant|>
{{ .Content }}{{ if not $last }}@END@
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|assistant|>
{{ end }}
{{- end }}"""

ALPACA_GO = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if $i }}

{{ end }}
{{- if eq .Role "system" }}{{ .Content }}
{{- else if eq .Role "user" }}### Instruction:
{{ .Content }}
{{- else if eq .Role "assistant" }}### Response:
{{ .Content }}{{ if not $last }}@END@{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}

### Response:
{{ end }}
{{- end }}"""

COMPLETION_GO = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- .Content }}{{ if and (eq .Role "assistant") (not $last) }}@END@{{ end }}
{{- end }}"""


# Reference renderers: what each format's Jinja template renders (BOS aside), with `end` ending the turns.
def _chatml(msgs, gen: bool, end: str) -> str:
    s = "".join(f"<|im_start|>{m['role']}\n{m['content']}{end}\n" for m in msgs)
    return s + ("<|im_start|>assistant\n" if gen else "")


def _llama3(msgs, gen: bool, end: str) -> str:
    s = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}{end}" for m in msgs)
    return s + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if gen else "")


def _mistral(msgs, gen: bool, end: str) -> str:
    s, system = "", ""
    for m in msgs:
        if m["role"] == "system":
            system = m["content"] + "\n\n"
        elif m["role"] == "user":
            s, system = s + f"[INST] {system}{m['content']} [/INST]", ""
        else:
            s += f" {m['content']}{end}"
    return s


def _gemma(msgs, gen: bool, end: str) -> str:
    s, system = "", ""
    for m in msgs:
        if m["role"] == "system":
            system = m["content"] + "\n\n"
        elif m["role"] == "user":
            s, system = s + f"<start_of_turn>user\n{system}{m['content']}{end}\n", ""
        else:
            s += f"<start_of_turn>model\n{m['content']}{end}\n"
    return s + ("<start_of_turn>model\n" if gen else "")


def _phi(msgs, gen: bool, end: str) -> str:
    s = "".join(f"<|{m['role']}|>\n{m['content']}{end}\n" for m in msgs)
    return s + ("<|assistant|>\n" if gen else "")


def _alpaca(msgs, gen: bool, end: str) -> str:
    parts = [m["content"] if m["role"] == "system" else f"### Instruction:\n{m['content']}" if m["role"] == "user"
             else f"### Response:\n{m['content']}{end}" for m in msgs]
    return "\n\n".join(parts) + (("\n\n" if msgs else "") + "### Response:\n" if gen else "")


def _completion(msgs, gen: bool, end: str) -> str:
    return "".join(m["content"] + (end if m["role"] == "assistant" else "") for m in msgs)


@dataclass(frozen=True)
class Format:
    render: Callable  # (messages, add_generation_prompt, end-of-turn) -> text
    go: str  # the Ollama template, @END@ standing for the end-of-turn token
    native_end: str | None  # the format's own end-of-turn token (None: the tokenizer's EOS)
    markers: tuple = ()  # format text that must stop generation too
    system: tuple | None = None  # (open, close) around a system turn, to read a default system prompt


FORMATS = {
    "chatml": Format(_chatml, CHATML_GO, "<|im_end|>", ("<|im_start|>",), ("<|im_start|>system\n", "\n")),
    "llama3": Format(_llama3, LLAMA3_GO, "<|eot_id|>", ("<|start_header_id|>", "<|end_header_id|>"),
                     ("<|start_header_id|>system<|end_header_id|>\n\n", "")),
    "mistral": Format(_mistral, MISTRAL_GO, None, ("[INST]",)),
    "gemma": Format(_gemma, GEMMA_GO, "<end_of_turn>", ("<start_of_turn>",)),
    "phi": Format(_phi, PHI_GO, "<|end|>", ("<|user|>", "<|assistant|>", "<|system|>")),
    "alpaca": Format(_alpaca, ALPACA_GO, None, ("### Instruction:",)),
    "completion": Format(_completion, COMPLETION_GO, None),
}

_PROBE = [{"role": "system", "content": "SYS-1"}, {"role": "user", "content": "USER-1"},
          {"role": "assistant", "content": "ASSISTANT-1"}, {"role": "user", "content": "USER-2"}]


def _detect(tok) -> tuple[str | None, str | None, str | None]:
    """(format name, default system prompt, end-of-turn token); (None, None, None) when unrecognized."""
    return _match(tok)[:3]


def _match(tok) -> tuple[str | None, str | None, str | None, bool]:
    """_detect's answer, plus whether the template writes BOS before the format's own text (the built-in gemma,
    llama3 and mistral templates start with {{ bos_token }})."""
    if not tok.chat_template:
        return None, None, None, False

    def renders(msgs) -> list[str]:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        # A template may write BOS as text before the format (Llama 3), but a BOS that is also part of the format
        # must stay (SmolLM2's BOS is <|im_start|>): try both readings, the text as rendered first.
        if tok.bos_token and text.startswith(tok.bos_token):
            return [text, text[len(tok.bos_token):]]
        return [text]

    try:
        fulls, bares = renders(_PROBE), renders(_PROBE[1:2])
    except Exception:  # a template that rejects the probe (e.g. one that allows no system message)
        return None, None, None, False
    for name, f in FORMATS.items():
        for end in dict.fromkeys(e for e in (f.native_end, tok.eos_token) if e):
            full = f.render(_PROBE, True, end)
            if full not in fulls:
                continue
            writes_bos = fulls.index(full) == 1
            for bare in bares:
                if bare == f.render(_PROBE[1:2], True, end):
                    return name, None, end, writes_bos
                if f.system:  # a system prompt the template adds when the conversation has none
                    sys_open, sys_close = f.system
                    close = end + sys_close
                    if bare.startswith(sys_open) and close in bare:
                        default = bare[len(sys_open):bare.index(close)]
                        if bare == f.render([{"role": "system", "content": default}] + _PROBE[1:2], True, end):
                            return name, default, end, writes_bos
    return None, None, None, False


def detect_template(tok) -> tuple[str | None, str | None]:
    """(format name, default system prompt) for the tokenizer's chat template; (None, None) when unrecognized."""
    name, default, _ = _detect(tok)
    return name, default


def go_template(name: str, end: str) -> str:
    """The Ollama (Go) template of format `name`, its turns ending with `end`."""
    return FORMATS[name].go.replace("@END@", end)


def _quote(text: str) -> str:
    if '"""' in text:
        raise ValueError("text contains a triple quote")
    return f'"""{text}"""'


def modelfile(tok, gguf_name: str) -> tuple[str, str | None]:
    """(Modelfile text, detected template format or None)."""
    from tunelab.export.gguf import adds_bos

    fmt, default_system, end, writes_bos = _match(tok)
    lines = [f"FROM ./{gguf_name}"]
    stops: list[str] = []
    if fmt:
        template = go_template(fmt, end)
        if writes_bos and not adds_bos(tok):
            # Training saw the BOS the Jinja template writes. llama.cpp adds BOS on its own only where the GGUF says
            # add_bos_token, which needs a tokenizer that adds one too (gguf.adds_bos; a GPT-2-style one adds none):
            # the prompt Ollama renders then needs the BOS as text, which it tokenizes as the special token.
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
