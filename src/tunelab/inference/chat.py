"""`tunelab chat`: talk to a model (and its adapter) in the terminal, with replies streamed token by token.

Commands inside the chat: /reset (forget the conversation), /system [TEXT] (show or replace the system prompt),
/set NAME VALUE (temperature, top_p, max_tokens, seed), /help, /quit. Ctrl-C stops a reply mid-way; Ctrl-D quits.
Input may be piped: one message per line.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from tunelab.errors import UserError
from tunelab.inference.engine import GenParams
from tunelab.inference.host import Host, PromptTooLong

PERSONAS = {
    "assistant": "You are a helpful, concise assistant.",
    "tutor": "You are a patient tutor. Explain step by step, check understanding, and end with a short question.",
    "pirate": "You are a cheerful pirate. Answer helpfully, but always in pirate speak.",
    "storyteller": "You are a vivid storyteller. Answer with short, imaginative stories in the second person.",
}

HELP = """commands: /reset  /system [TEXT]  /set temperature|top_p|max_tokens|seed VALUE  /help  /quit"""

# /set NAME -> (GenParams field, type, valid?, the rule). The same rules check the CLI flags, so a value /set takes
# is one the flag takes: anything else would only fail (or sample nonsense) at the next message.
_SETTINGS = {
    "temperature": ("temperature", float, lambda v: 0 <= v < math.inf, ">= 0 and finite"),
    "top_p": ("top_p", float, lambda v: 0 < v <= 1, "in (0, 1]"),
    "max_tokens": ("max_new_tokens", int, lambda v: v >= 1, ">= 1"),
    # torch.manual_seed's range
    "seed": ("seed", int, lambda v: -2**63 <= v < 2**64, "a 64-bit integer"),
}


def _setting_error(key: str, value) -> str | None:
    """What is wrong with `value` for the setting `key`, or None."""
    _, _, valid, rule = _SETTINGS[key]
    return None if valid(value) else f"must be {rule}"


def system_prompt(system: str | None, persona: str | None) -> str | None:
    """--system TEXT (or @FILE) wins over --persona NAME; neither: the model's own default (its chat template's)."""
    if system:
        if system.startswith("@"):
            p = Path(system[1:])
            if not p.is_file():
                raise UserError(f"--system {system}: no such file {p}")
            return p.read_text().strip()
        return system
    if persona:
        if persona not in PERSONAS:
            from tunelab.errors import suggest

            raise UserError(f"unknown persona '{persona}'{suggest(persona, PERSONAS)}; "
                            f"available: {', '.join(PERSONAS)} (or pass --system TEXT)")
        return PERSONAS[persona]
    return None


class ChatSession:
    """A conversation with a Host: history, system prompt and generation settings."""

    def __init__(self, host, system: str | None = None, params: GenParams | None = None, name: str | None = None):
        self.host = host
        self.name = name or host.default_name
        self.system = system
        self.params = params or GenParams(max_new_tokens=256, temperature=0.7, top_p=0.9)
        self.history: list[dict] = []

    def messages(self, user: str) -> list[dict]:
        sys_msgs = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msgs + self.history + [{"role": "user", "content": user}]

    def reply(self, user: str):
        """Yield the reply to `user` piece by piece; the exchange joins the history when the reply ends or stops."""
        msgs, prompt = self.host.fit_messages(self.messages(user), self.params.max_new_tokens, self.name)
        text = ""
        pieces = self.host.stream(self.name, prompt, self.params)
        try:
            for piece in pieces:
                text += piece
                yield piece
        finally:
            pieces.close()  # ends the generation and frees the model now, not when garbage is collected
            self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]

    def command(self, line: str) -> str | None:
        """Run a /command; returns text to show, or None to quit."""
        cmd, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if cmd in ("quit", "exit", "q"):
            return None
        if cmd == "reset":
            self.history.clear()
            return "[conversation reset]"
        if cmd == "system":
            if not arg:
                return f"[system prompt: {self.system or '(model default)'}]"
            self.system = arg
            return "[system prompt set]"
        if cmd == "set":
            key, _, value = arg.partition(" ")
            if key not in _SETTINGS:
                return f"[unknown setting '{key}'; one of {', '.join(_SETTINGS)}]"
            attr, cast, _, _ = _SETTINGS[key]
            try:
                v = cast(value)
            except ValueError:
                return f"[{key} needs a {cast.__name__}, got '{value}']"
            problem = _setting_error(key, v)
            if problem:
                return f"[{key} {problem}, got {value}; unchanged]"
            setattr(self.params, attr, v)
            return f"[{key} = {value}]"
        if cmd == "help":
            return f"[{HELP}]"
        return f"[unknown command /{cmd}; {HELP}]"


def repl(session: ChatSession, inp=None, out=None) -> int:
    inp, out = inp or sys.stdin, out or sys.stdout
    interactive = inp.isatty()
    if interactive:
        out.write(f"chatting with {session.name} ({HELP}; Ctrl-D quits)\n")
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = inp.readline()
        if not line:  # EOF (Ctrl-D, or the end of piped input)
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            msg = session.command(line)
            if msg is None:
                return 0
            out.write(msg + "\n")
            out.flush()
            continue
        gen = session.reply(line)
        try:
            for piece in gen:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:  # stop this reply, keep the chat
            gen.close()
            out.write(" [stopped]")
        except PromptTooLong as e:  # raised before anything was generated: the conversation is as it was
            out.write(f"[{e}]")
        out.write("\n")
        out.flush()


def main(args) -> int:
    system = system_prompt(args.system, args.persona)
    for key in _SETTINGS:
        value = getattr(args, key)
        problem = None if value is None else _setting_error(key, value)  # --seed may be left out
        if problem:
            raise UserError(f"--{key.replace('_', '-')} {problem}, got {value}")
    adapters = [args.adapter] if args.adapter else []
    if len(adapters) + len(args.run) > 1:
        raise UserError("chat uses one adapter: pass a single --adapter or --run (`tunelab serve` hosts several)")
    host = Host.load(args.model, adapters=adapters, runs=args.run, dtype=args.dtype, load_in_4bit=args.load_in_4bit,
                     merge=args.merge)
    params = GenParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    return repl(ChatSession(host, system, params))
