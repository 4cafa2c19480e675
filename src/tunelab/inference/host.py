"""One loaded base model with any number of named adapters over it: what chat, the server and the web UI serve.

Adapters share the base's weights (PEFT multi-adapter: `load_adapter` for each, `set_adapter` to pick one,
`disable_adapter` for the plain base), so N fine-tunes of one model cost one model's memory plus N small adapters.
Each route keeps its own tokenizer: a run saves the tokenizer it trained with, chat template included, next to its
adapter, and two runs over one base may have used different templates (and so end their turns on different tokens).
The vocabularies must agree, since the routes share one embedding matrix.
Which adapter is active is one setting of the whole model, so callers must not generate with two different names at
once: the terminal chat and the UI take `lock`; the server's scheduler lets same-name requests run together and
switches only when the model is idle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from pathlib import Path

from tunelab.errors import UserError

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"


class PromptTooLong(UserError):
    """A prompt that leaves no room in the model's context for a reply: chat and the UI say so and carry on."""


def run_artifact(run: str) -> tuple[str, str | None]:
    """(base model source, adapter dir or None) for a finished run directory (tunelab.rundir.open_finished_run)."""
    from tunelab.rundir import open_finished_run

    r = open_finished_run(run)
    return r.model_source, r.adapter


def _default_name(source: str) -> str:
    p = Path(source).expanduser()
    return p.name if p.exists() else source


def _parse_adapter(spec: str) -> tuple[str, str]:
    """`NAME=PATH` or `PATH` (named after its directory) -> (name, path)."""
    name, sep, path = spec.partition("=")
    if not sep or Path(spec).exists():
        path = spec
        name = Path(spec.rstrip("/")).name
    if not (Path(path) / "adapter_config.json").is_file():
        raise UserError(f"--adapter {spec}: {path} is not a PEFT adapter directory (no adapter_config.json)")
    return name, path


def _adapter_tokenizer(path: str, base_tok):
    """The tokenizer a run saved beside its adapter (the one it trained with), else the base's."""
    if not (Path(path) / "tokenizer_config.json").is_file():
        return base_tok
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _same_vocab(toks: dict[str, tuple[str, object]]) -> None:
    """Refuse adapters trained with different tokenizers: the routes share one model, so one vocabulary."""
    (first, (first_path, first_tok)), *rest = toks.items()
    for name, (path, tok) in rest:
        if tok is not first_tok and tok.get_vocab() != first_tok.get_vocab():
            raise UserError(f"adapters {first} ({first_path}, {len(first_tok)} tokens) and {name} ({path}, "
                            f"{len(tok)} tokens) were trained with different tokenizers: serve each in its own process")


class Host:
    def __init__(self, model, tok, base_name: str, adapters: dict[str, str] | None = None,
                 tokenizers: dict[str, object] | None = None):
        """`tok` is the base's tokenizer; `tokenizers` maps a served name to the tokenizer it renders prompts and
        stops with (a route not in it uses `tok`)."""
        self.model, self.tok = model, tok
        self.base_name = base_name
        # served name -> PEFT adapter name inside the model (None: the base, adapters disabled)
        self.routes: dict[str, str | None] = {base_name: None, **(adapters or {})}
        self._toks = {name: (tokenizers or {}).get(name, tok) for name in self.routes}
        self.lock = threading.Lock()
        self._base_ctx: contextlib.ExitStack | None = None
        self._active: str | None = None
        from tunelab.inference.engine import context_length

        self.context_length = context_length(model, tok)
        if adapters:
            self.activate(next(iter(adapters)))

    @property
    def names(self) -> list[str]:
        return list(self.routes)

    def tokenizer(self, name: str):
        """The tokenizer `name` was trained with: its chat template and end-of-turn token are the ones it answers to."""
        return self._toks[name]

    @property
    def default_name(self) -> str:
        """The first adapter when there is one (what `--adapter`/`--run` asked for), else the base."""
        return self.names[1] if len(self.names) > 1 else self.base_name

    @classmethod
    def load(cls, model: str | None = None, adapters: list[str] | tuple = (), runs: list[str] | tuple = (),
             dtype: str = "float32", load_in_4bit: bool = False, merge: bool = False,
             served_name: str | None = None) -> Host:
        """Load a base once and every adapter over it.

        `adapters` are `NAME=PATH` or `PATH`; `runs` are run directories (a run with an adapter adds it, named after
        the run; a run with a full model is the base). `merge` folds a single adapter into the base weights (faster
        generation, no adapter switching).
        """
        from tunelab.models import load_for_inference, load_tokenizer

        named = [_parse_adapter(a) for a in adapters]
        bases = [model] if model else []
        labels = {}  # a run's full model is served under the run's name
        for run in runs:
            base, adapter = run_artifact(run)
            bases.append(base)
            if adapter:
                named.append((Path(run.rstrip("/")).name, adapter))
            else:
                labels[base] = Path(run.rstrip("/")).name
        if len({str(b) for b in bases}) > 1:
            raise UserError(f"adapters must share one base model, got {', '.join(sorted(set(map(str, bases))))} "
                            "(serve each base in its own process)")
        base = bases[0] if bases else DEFAULT_MODEL
        names = [n for n, _ in named]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise UserError(f"two adapters are named {dupes[0]}: name them with --adapter NAME=PATH")
        if served_name in names:
            raise UserError(f"--served-model-name {served_name} is also an adapter's name: pick another, or name "
                            "the adapter with --adapter NAME=PATH")
        if not served_name:
            served_name = labels.get(base) or _default_name(base)
            # A run is often named after its base (runs/tiny over models/tiny): the name goes to the run's adapter,
            # what the user asked for, and the base gets a distinct one (listed by serve, offered by the UI).
            while served_name in names:
                served_name += "-base"
        if merge and len(named) != 1:
            raise UserError("--merge needs exactly one adapter (--adapter or --run)")
        if merge and load_in_4bit:
            raise UserError("--merge folds the adapter into full-precision weights: drop --load-in-4bit")

        m, tok = load_for_inference(base, adapter=named[0][1] if named else None, dtype=dtype,
                                    load_in_4bit=load_in_4bit)
        if merge:
            return cls(m.merge_and_unload(), tok, f"{served_name}+{named[0][0]}")
        # load_for_inference hands back the first adapter's tokenizer; the base route is prompted with the base's
        # own template (or tunelab's default for a base without one), as training would have rendered it.
        base_tok = load_tokenizer(base) if named else tok
        toks = {name: (path, _adapter_tokenizer(path, base_tok)) for name, path in named}
        if len(toks) > 1:
            _same_vocab(toks)
        routes = {}
        for i, (name, path) in enumerate(named):
            # load_for_inference loads the first adapter under PEFT's name "default"; the rest get their own.
            internal = "default" if i == 0 else f"adapter_{i}"
            if i:
                m.load_adapter(path, adapter_name=internal)
            routes[name] = internal
        return cls(m, base_tok, served_name, routes, {name: t for name, (_, t) in toks.items()})

    def activate(self, name: str) -> None:
        """Make the model answer as `name` (an adapter, or the base). Only call while no generation is running."""
        if name not in self.routes:
            raise KeyError(name)
        if name == self._active or len(self.routes) == 1:
            self._active = name
            return
        internal = self.routes[name]
        if internal is None:
            # disable_adapter() is PEFT's own way to run the bare base (it also covers prompt-learning adapters);
            # it is a context manager, held open for as long as the base stays selected.
            self._base_ctx = contextlib.ExitStack()
            self._base_ctx.enter_context(self.model.disable_adapter())
        else:
            if self._base_ctx is not None:
                self._base_ctx.close()
                self._base_ctx = None
            self.model.set_adapter(internal)
        self._active = name

    def stream(self, name: str, prompt: str, params):
        """Text pieces of one completion as `name` (an iterator that holds `lock` until the generation has ended or
        been closed). The reply is cut where the context ends; a prompt that leaves no room for one raises
        PromptTooLong here, before anything is generated."""
        from tunelab.inference.engine import count_tokens

        n = count_tokens(self.tokenizer(name), prompt)
        room = self.context_length - n
        if room < 1:
            raise PromptTooLong(f"message too long: its prompt (system prompt included) is {n} tokens and the "
                                f"model's context holds {self.context_length}; send a shorter message")
        return self._stream(name, prompt, dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, room)))

    def _stream(self, name: str, prompt: str, params):
        from tunelab.inference.engine import TextStream

        with self.lock:
            self.activate(name)
            s = TextStream(self.model, self.tokenizer(name), prompt, params)
            try:
                yield from s
            finally:
                s.close()

    def fit_messages(self, messages: list[dict], max_new_tokens: int,
                     name: str | None = None) -> tuple[list[dict], str]:
        """Drop the oldest turns (keeping system prompts and the last message) until prompt + reply fit the context.

        Returns the kept messages and their prompt, rendered with the chat template of `name` (default_name if None).
        """
        from tunelab.inference.engine import chat_prompts, count_tokens

        tok = self.tokenizer(name or self.default_name)
        msgs = list(messages)
        while True:
            prompt = chat_prompts(tok, [msgs])[0]
            if count_tokens(tok, prompt) + max_new_tokens <= self.context_length:
                return msgs, prompt
            droppable = [i for i, m in enumerate(msgs[:-1]) if m["role"] != "system"]
            if not droppable:
                return msgs, prompt
            first = droppable[0]
            del msgs[first]
            # the replies to a dropped message go with it: a history opening on an assistant turn breaks templates
            # that require user/assistant alternation (Llama 2's, Mistral's, Gemma's)
            while first < len(msgs) - 1 and msgs[first]["role"] not in ("user", "system"):
                del msgs[first]
