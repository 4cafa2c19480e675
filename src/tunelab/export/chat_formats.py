"""The chat formats llama.cpp and Ollama are given, and the BOS/EOS llama.cpp adds: shared by the GGUF writer
(its add_bos_token), the llama.cpp check and the Ollama Modelfile, below all three.

A Jinja chat template is identified by what it renders: probe conversations are rendered with it and compared with
known formats (ChatML, Llama 3, and every other built-in template of tunelab.data.templates: Mistral, Gemma, Phi,
Alpaca-style instruction/response, plain completion), each with its own end-of-turn token or the tokenizer's EOS.
In the Go templates `@END@` stands for the end-of-turn token. As in Ollama's own templates, the last assistant turn is
left open (no end-of-turn), so a reply can be continued; system messages are read from `.Messages` where the format
places them itself (Mistral and Gemma put the system text before the next user turn).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tunelab.export.common import CHAT_PROMPTS

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


# Whether BOS/EOS get added is taken from what the tokenizer actually does, not from config flags that may be absent:
# llama.cpp's defaults differ by vocabulary type and a wrong BOS shifts every logit.
def tokenizer_adds_bos(tok) -> bool:
    """True when the tokenizer puts BOS before a text it encodes with its special tokens."""
    return tok.bos_token_id is not None and tok("a").input_ids[:1] == [tok.bos_token_id]


def adds_bos(tok) -> bool:
    """The GGUF's add_bos_token: whether llama.cpp (and Ollama) put BOS before every prompt they tokenize.

    Training encodes a plain `text` sample with the tokenizer's special tokens (data.build.encode_text: a BOS where the
    tokenizer adds one) but a conversation without them (data.render.encode_conversation: a BOS only where the chat
    template writes one). llama.cpp has one switch for both and applies it to chats too: Ollama adds its BOS before
    the TEMPLATE's text, llama-server before the rendered Jinja (dropping a BOS that text starts with). So it is on
    only where a chat was also trained with a BOS first, one that the template writes before its format (an Ollama
    TEMPLATE can then leave it out: ollama.modelfile), or where there is no chat template to use. A template that
    writes none over a tokenizer that adds one gets none: chats then match training, plain text lacks its BOS
    (export_gguf says so)."""
    if not tokenizer_adds_bos(tok):
        return False
    return not tok.chat_template or template_writes_bos(tok)


def template_writes_bos(tok) -> bool:
    """True when the chat template renders BOS before the conversation's own text: before the format for a format
    ollama recognizes (SmolLM2's chatml, whose BOS is <|im_start|>, writes none), else any leading BOS."""
    name, _, _, writes = _match(tok)
    if name is not None:
        return writes
    try:
        text = tok.apply_chat_template(CHAT_PROMPTS[0], tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that rejects the probe: nothing to reproduce
        return False
    return bool(tok.bos_token) and text.startswith(tok.bos_token)


def llamacpp_ids(tok, text: str) -> list[int]:
    """The ids llama.cpp should make of `text` with its special tokens added (llama_tokenize's add_special), under
    the GGUF's add_bos_token / add_eos_token: the source's tokens, BOS and EOS as adds_bos / adds_eos say."""
    ids = tok.encode(text, add_special_tokens=False)
    return [tok.bos_token_id] * adds_bos(tok) + ids + [tok.eos_token_id] * adds_eos(tok)


def adds_eos(tok) -> bool:
    return tok.eos_token_id is not None and tok("a").input_ids[-1:] == [tok.eos_token_id]
