"""`tunelab chat`: talk to a model (and its adapter) in the terminal, with replies streamed token by token.

Commands inside the chat: /reset (forget the conversation), /system [TEXT] (show or replace the system prompt),
/set NAME VALUE (temperature, top_p, max_tokens, seed), /help, /quit. Ctrl-C stops a reply mid-way; Ctrl-D quits.
Input may be piped: one message per line.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tunelab.errors import UserError
from tunelab.inference.engine import GenParams

PERSONAS = {
    "assistant": "You are a helpful, concise assistant.",
    "tutor": "You are a patient tutor. Explain step by step, check understanding, and end with a short question.",
    "pirate": "You are a cheerful pirate. Answer helpfully, but always in pirate speak.",
    "storyteller": "You are a vivid storyteller. Answer with short, imaginative stories in the second person.",
}

HELP = """commands: /reset  /system [TEXT]  /set temperature|top_p|max_tokens|seed VALUE  /help  /quit"""

_SETTINGS = {"temperature": ("temperature", float), "top_p": ("top_p", float),
             "max_tokens": ("max_new_tokens", int), "seed": ("seed", int)}


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
        msgs, prompt = self.host.fit_messages(self.messages(user), self.params.max_new_tokens)
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
            attr, cast = _SETTINGS[key]
            try:
                setattr(self.params, attr, cast(value))
            except ValueError:
                return f"[{key} needs a {cast.__name__}, got '{value}']"
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
        out.write("\n")
        out.flush()


def main(args) -> int:
    from tunelab.inference.host import Host

    system = system_prompt(args.system, args.persona)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_tokens < 1:
        raise UserError("need --temperature >= 0, 0 < --top-p <= 1 and --max-tokens >= 1")
    adapters = [args.adapter] if args.adapter else []
    if len(adapters) + len(args.run) > 1:
        raise UserError("chat uses one adapter: pass a single --adapter or --run (`tunelab serve` hosts several)")
    host = Host.load(args.model, adapters=adapters, runs=args.run, dtype=args.dtype, load_in_4bit=args.load_in_4bit,
                     merge=args.merge)
    params = GenParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    return repl(ChatSession(host, system, params))
