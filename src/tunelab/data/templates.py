"""Named chat templates for `model.chat_template`, and the default for base models that ship none.

`model.chat_template` takes one of the names below, Jinja text, or the path of a file holding Jinja. Without it the
model's own template is used; a base model that has none (GPT-2, distilgpt2, Phi-2, most base models) gets `alpaca`,
whose assistant turn ends with the tokenizer's EOS, so the fine-tuned model learns to stop where generation stops.

Each template here is a transformers chat template (rendered by `tokenizer.apply_chat_template`, saved with the
tokenizer, so serving and export see the same text) and ends every assistant turn with one end-of-turn token:

    name        format                                         assistant turn ends with
    chatml      <|im_start|>role\\n...                          <|im_end|>       (Qwen, SmolLM2, Hermes)
    llama3      <|start_header_id|>role<|end_header_id|>...    <|eot_id|>       (Llama 3.x instruct)
    mistral     [INST] ... [/INST] reply                       EOS (</s>)       (Mistral / Mixtral instruct)
    gemma       <start_of_turn>user|model\\n...                 <end_of_turn>    (Gemma instruct)
    phi         <|user|>\\n...<|end|>\\n<|assistant|>\\n...       <|end|>          (Phi-3 / Phi-3.5 instruct)
    alpaca      ### Instruction:\\n...\\n\\n### Response:\\n...     EOS              (instruction tuning; the default)
    completion  the messages' text joined as is                EOS              (plain prompt -> completion)

Where the tokenizer lacks a template's end-of-turn token (chatml on GPT-2: `<|im_end|>` is no token of it), the
assistant turn ends with the tokenizer's EOS instead of adding `<|im_end|>` as a new token. A new token would need a
new, untrained embedding row (GPT-2 has no spare one), and models stop generating at EOS anyway; the other markers
(`<|im_start|>`, headers) are prompt text, never trained, so they may take several tokens. `describe` says so, and
`tunelab data inspect` and the run's data stats print it.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import UserError

DEFAULT = "alpaca"


@dataclass(frozen=True)
class Template:
    name: str
    end: str | None  # the end-of-turn token the format uses; None = the tokenizer's EOS
    body: str  # Jinja using `end_of_turn`, which `text()` binds to `end` (or to EOS where the tokenizer lacks it)
    about: str


# Every template renders prefix by prefix (the rendering of a conversation starts with the rendering of each of its
# prefixes, with the generation prompt before an assistant turn), which is how render.py finds the assistant spans.
# `bos_token` is guarded: tokenizers without one would otherwise print "None".
_BOS = "{%- if bos_token %}{{ bos_token }}{% endif -%}\n"

_ONLY_CHAT_ROLES = ("{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
                    "{{ raise_exception('this template has no ' + message['role'] + ' role') }}{%- endif -%}\n")

_TEMPLATES = [
    Template("chatml", "<|im_end|>", (
        "{%- for message in messages -%}\n" + _ONLY_CHAT_ROLES +
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + end_of_turn + '\\n' }}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"),
        "ChatML (Qwen, SmolLM2, OpenHermes)"),
    Template("llama3", "<|eot_id|>", _BOS + (
        "{%- for message in messages -%}\n" + _ONLY_CHAT_ROLES +
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim)"
        " + end_of_turn }}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"),
        "Llama 3 instruct"),
    # Mistral has no system role: a system message is put before the next user message, as Mistral's own template does
    Template("mistral", None, _BOS + (
        "{%- set ns = namespace(system='') -%}\n"
        "{%- for message in messages -%}\n" + _ONLY_CHAT_ROLES +
        "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] + '\\n\\n' -%}\n"
        "{%- elif message['role'] == 'user' -%}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
        "{%- set ns.system = '' -%}\n"
        "{%- else -%}{{ ' ' + message['content'] + end_of_turn }}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}"),
        "Mistral / Mixtral instruct ([INST] ... [/INST])"),
    # Gemma has no system role either (its own template prepends it to the first user turn) and calls the assistant
    # "model"
    Template("gemma", "<end_of_turn>", _BOS + (
        "{%- set ns = namespace(system='') -%}\n"
        "{%- for message in messages -%}\n" + _ONLY_CHAT_ROLES +
        "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] + '\\n\\n' -%}\n"
        "{%- elif message['role'] == 'user' -%}"
        "{{ '<start_of_turn>user\\n' + ns.system + (message['content'] | trim) + end_of_turn + '\\n' }}"
        "{%- set ns.system = '' -%}\n"
        "{%- else -%}{{ '<start_of_turn>model\\n' + (message['content'] | trim) + end_of_turn + '\\n' }}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"),
        "Gemma instruct"),
    # Phi-3's own template appends EOS after the last turn when no generation prompt is asked for; that breaks the
    # prefix-by-prefix rendering the loss mask relies on, and <|end|> already ends the reply, so it is left out
    Template("phi", "<|end|>", (
        "{%- for message in messages -%}\n" + _ONLY_CHAT_ROLES +
        "{{ '<|' + message['role'] + '|>\\n' + message['content'] + end_of_turn + '\\n' }}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"),
        "Phi-3 / Phi-3.5 instruct"),
    # Turns after the first are preceded by a blank line, so the reply ends exactly at EOS (nothing trained after it)
    Template("alpaca", None, (
        "{%- for message in messages -%}\n" + _ONLY_CHAT_ROLES +
        "{%- if not loop.first %}{{ '\\n\\n' }}{% endif -%}\n"
        "{%- if message['role'] == 'system' -%}{{ message['content'] }}\n"
        "{%- elif message['role'] == 'user' -%}{{ '### Instruction:\\n' + message['content'] }}\n"
        "{%- else -%}{{ '### Response:\\n' + message['content'] + end_of_turn }}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{ ('\\n\\n' if messages else '') + '### Response:\\n' }}{%- endif -%}"),
        "instruction/response (Alpaca style); tunelab's default for models without a chat template"),
    Template("completion", None, (
        "{%- for message in messages -%}\n"
        "{%- if message['role'] == 'assistant' -%}{{ message['content'] + end_of_turn }}\n"
        "{%- else -%}{{ message['content'] }}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}"),
        "plain completion: the prompt's text followed directly by the reply, no markers"),
]
TEMPLATES: dict[str, Template] = {t.name: t for t in _TEMPLATES}


def single_token(tok, text: str) -> int | None:
    """The id of `text` when the tokenizer reads it as one token (a special or added token), else None."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def end_token(tok, name: str) -> str | None:
    """The token `name`'s assistant turns end with under this tokenizer: its own marker, or EOS where it lacks it."""
    t = TEMPLATES[name]
    if t.end is not None and single_token(tok, t.end) is not None:
        return t.end
    return tok.eos_token


def text(name: str, tok) -> str:
    """The Jinja of template `name` for this tokenizer (end-of-turn bound to a token the tokenizer has)."""
    t = TEMPLATES[name]
    end = end_token(tok, name)
    if end is None:
        raise UserError(f"model.chat_template={name}: the tokenizer has no EOS token to end the assistant turn with; "
                        "give a Jinja template (or file) that ends it with a token the tokenizer has")
    binding = "eos_token" if end == tok.eos_token and end != t.end else json.dumps(end)
    return "{%- set end_of_turn = " + binding + " -%}\n" + t.body


def resolve(choice: str, tok) -> str:
    """`model.chat_template` (a built-in name, Jinja text, or a file) as Jinja text; a one-line error otherwise."""
    if choice in TEMPLATES:
        return text(choice, tok)
    if "{{" in choice or "{%" in choice:  # Jinja text (checked first: a long template is no valid file name)
        return _prints_messages(_compiles(choice, "model.chat_template"), "model.chat_template", tok)
    p = Path(choice).expanduser()
    if p.is_file():
        where = f"model.chat_template ({p})"
        jinja = p.read_text()
        if not jinja.strip():  # an empty template renders nothing: the tokenizer would fall back to the default
            raise UserError(f"{where}: the file is empty; put a Jinja chat template in it, or name a built-in "
                            f"template ({', '.join(TEMPLATES)})")
        return _prints_messages(_compiles(jinja, where), where, tok)
    close = difflib.get_close_matches(choice, TEMPLATES, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UserError(f"model.chat_template: '{choice}' is neither a built-in template ({', '.join(TEMPLATES)}), "
                    f"a file, nor Jinja text; {hint}see `tunelab data inspect`")


def _compiles(jinja: str, where: str) -> str:
    """`jinja` once it parses as transformers parses chat templates (a sandbox with loop controls): a syntax error is
    the template's, said once here, not blamed on the first data row it fails to render. The {% generation %} markers
    transformers adds a tag for (assistant masks) are taken out first: they change no syntax around them."""
    import re

    from jinja2 import TemplateSyntaxError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        bare = re.sub(r"{%-?\s*(end)?generation\s*-?%}", "", jinja)
        ImmutableSandboxedEnvironment(extensions=[loopcontrols]).parse(bare)
    except TemplateSyntaxError as e:
        raise UserError(f"{where}: Jinja syntax error on line {e.lineno} of the template: {e.message}") from None
    return jinja


def _prints_messages(jinja: str, where: str, tok) -> str:
    """`jinja` once a rendered user/assistant exchange shows both messages' text. Jinja renders an undefined name as
    nothing, so a misspelt field (message.contnt) trained on empty turns without a word; a template that refuses the
    exchange itself is left to the data layer, which names the row."""
    probe = [{"role": "user", "content": "tunelab probe question"},
             {"role": "assistant", "content": "tunelab probe answer"}]
    try:
        rendered = tok.apply_chat_template(probe, chat_template=jinja, tokenize=False)
    except Exception:  # noqa: BLE001  (raise_exception(), a role check: the data layer says it for the row it meets)
        return jinja
    missing = [m["content"] for m in probe if m["content"] not in str(rendered)]
    if missing:
        raise UserError(f"{where}: a user/assistant exchange renders without the text of its "
                        f"{' and '.join(m['role'] for m in probe if m['content'] in missing)} message; the template "
                        "must print each message's content (message['content']): a misspelt name renders as nothing")
    return jinja


def apply(tok, choice: str | None = None) -> None:
    """Set the tokenizer's chat template: `choice` if given, else keep the model's, else the default (alpaca)."""
    if choice:
        tok.chat_template = resolve(choice, tok)
    elif not getattr(tok, "chat_template", None):
        tok.chat_template = text(DEFAULT, tok)


def identify(tok) -> str | None:
    """The name of the built-in template the tokenizer uses, or None (its own, or the user's Jinja)."""
    current = getattr(tok, "chat_template", None)
    if not current:
        return None
    return next((name for name in TEMPLATES if current == text(name, tok)), None)


def own_end_token(tok) -> str | None:
    """The special token that ends an assistant turn under a template that is not built in (the tokenizer's own, or
    the user's Jinja): found by rendering one reply and reading the first token after its text, which must be one of
    the tokenizer's special tokens (chatml's <|im_end|>, Gemma's <end_of_turn>). None when the template ends turns
    with plain text or nothing, or cannot render a bare user/assistant exchange."""
    probe = "tunelab reply probe"
    try:
        rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}],
                                           tokenize=False)
    except Exception:  # a template that refuses this exchange (the data layer names such a template's own error)
        return None
    if not isinstance(rendered, str) or probe not in rendered:
        return None
    after = tok(rendered.split(probe, 1)[1].lstrip(" "), add_special_tokens=False)["input_ids"]
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    return tok.convert_ids_to_tokens(after[0]) if after and after[0] in special else None


def describe(tok) -> str:
    """One line naming the template in use and its end-of-turn token: what inspect and the pre-flight show."""
    current = getattr(tok, "chat_template", None)
    if not current:
        return f"none (rendered with the default '{DEFAULT}', assistant turns ending with EOS {tok.eos_token!r})"
    name = identify(tok)
    if name is None:
        end = own_end_token(tok)
        return "the tokenizer's own (or model.chat_template Jinja)" + (
            f"; assistant turns end with {end!r}" if end else "")
    t, end = TEMPLATES[name], end_token(tok, name)
    line = f"{name}: {t.about}; assistant turns end with {end!r}"
    if t.end is not None and end != t.end:
        line += f" (the tokenizer's EOS: it has no {t.end!r} token)"
    return line
