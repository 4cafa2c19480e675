"""`tunelab ui`: a Gradio web app over the same engine: a Chatbot tab and a Storymaker tab, with a settings panel.

Storymaker is a choose-your-own-adventure: the user picks a title, a system prompt makes the model the narrator, and
every turn ends with numbered choices that become buttons (or the reader writes their own action). Both tabs stream.
The app runs fully offline: no analytics, and system fonts instead of the web fonts Gradio's theme would fetch.
"""

from __future__ import annotations

import os
import re
import sys

from tunelab.errors import UserError
from tunelab.inference.engine import GenParams
from tunelab.inference.host import PromptTooLong

STORY_SYSTEM = (
    'You are the narrator of an interactive choose-your-own-adventure story titled "{title}". You tell it to the '
    'reader in the second person ("you"), a short part at a time. Each part follows from the reader\'s last choice '
    "and ends with three numbered choices of what to do next, one per line. Never make the choice for the reader."
)
STORY_START = "Begin the story."
# Small models follow the latest user turn far better than the system prompt, so each turn restates the format;
# the story panel shows only the reader's own words.
TURN_FORMAT = "\n\n(Continue the story in one short paragraph, then list three numbered choices for what I do next.)"
CHOICE_PROMPT = "\n\nWhat do you do next?\n1."
CHOICE_TOKENS = 64
# Offered when the model's turn has no numbered choices (small models often forget them): the story can go on.
FALLBACK_CHOICES = ["Go on", "Look around carefully", "Turn back"]
_CHOICE = re.compile(r"^\s*(?:\d+[.)]|[-*])\s+(.+?)\s*$", re.M)


def parse_choices(text: str, limit: int = 4) -> list[str]:
    """The numbered (or bulleted) choices at the end of a story turn."""
    return [c for c in _CHOICE.findall(text) if c][:limit]


def _text(content) -> str:
    """A chat message's text: Gradio hands content over as a string or as a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") or ""
    if isinstance(content, (list, tuple)):
        return "".join(_text(c) for c in content)
    return ""


def build_app(host, defaults: GenParams | None = None):
    """The Gradio Blocks app serving `host` (a tunelab.inference.host.Host)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    d = defaults or GenParams(max_new_tokens=256, temperature=0.7, top_p=0.9)

    def gen_params(temperature, top_p, max_tokens) -> GenParams:
        return GenParams(max_new_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p))

    def reply(name, prompt, params, text=""):
        """The growing text of one streamed reply, starting from `text`."""
        try:
            pieces = host.stream(name, prompt, params)
        except PromptTooLong as e:  # shown in the page (a user mistake: no console traceback); the chat goes on
            raise gr.Error(str(e), print_exception=False) from None
        for piece in pieces:
            text += piece
            yield text

    def chat_fn(message, history, name, system, temperature, top_p, max_tokens):
        messages = [{"role": "system", "content": system}] if system.strip() else []
        messages += [{"role": m["role"], "content": _text(m["content"])} for m in history]
        messages.append({"role": "user", "content": _text(message)})
        params = gen_params(temperature, top_p, max_tokens)
        yield from reply(name, host.fit_messages(messages, params.max_new_tokens, name)[1], params)

    def story_turn(state, action, name, temperature, top_p, max_tokens):
        """Stream one narrator turn after `action`; yields (chatbot, state, choices)."""
        messages = state["messages"] + [{"role": "user", "content": action + TURN_FORMAT}]
        shown = list(state["shown"])
        if action != STORY_START:
            shown.append({"role": "user", "content": action})
        params = gen_params(temperature, top_p, max_tokens)
        messages, prompt = host.fit_messages(messages, params.max_new_tokens + CHOICE_TOKENS, name)
        text = ""
        for text in reply(name, prompt, params):
            yield shown + [{"role": "assistant", "content": text}], state, gr.skip()
        text = text.rstrip()
        choices = parse_choices(text)
        if not choices:
            # No choices in the turn (small models drift away from the format): continue the narrator's own message
            # from a numbered list's first line, which even a 135M model completes into choices.
            head = text + CHOICE_PROMPT
            cp = GenParams(max_new_tokens=CHOICE_TOKENS, temperature=params.temperature or 0.7, top_p=params.top_p,
                           stop=["\n\n"])
            for text in reply(name, prompt + head, cp, text=head):
                yield shown + [{"role": "assistant", "content": text}], state, gr.skip()
            narrative, text = head[:-len(CHOICE_PROMPT)], text.rstrip()
            choices = list(dict.fromkeys(parse_choices(text[len(narrative):])))
            if len(choices) < 2:  # nothing usable: keep the story clean and offer generic moves
                text, choices = narrative, FALLBACK_CHOICES
        new_state = {"messages": messages + [{"role": "assistant", "content": text}],
                     "shown": shown + [{"role": "assistant", "content": text}]}
        yield new_state["shown"], new_state, gr.update(choices=choices, value=None, interactive=True)

    def story_begin(title, name, temperature, top_p, max_tokens):
        title = title.strip()
        if not title:
            raise gr.Error("Give your story a title first.", print_exception=False)
        state = {"messages": [{"role": "system", "content": STORY_SYSTEM.format(title=title)}], "shown": []}
        yield from story_turn(state, STORY_START, name, temperature, top_p, max_tokens)

    def story_choose(state, choice, own, name, temperature, top_p, max_tokens):
        action = (own or "").strip() or choice
        if not state or not state.get("messages"):
            raise gr.Error("Start a story first: pick a title and press Begin.", print_exception=False)
        if not action:
            raise gr.Error("Pick one of the choices, or write what you do.", print_exception=False)
        yield from story_turn(state, action, name, temperature, top_p, max_tokens)

    with gr.Blocks(title="tunelab", analytics_enabled=False) as demo:
        gr.Markdown("## tunelab")
        with gr.Row():
            with gr.Column(scale=1, min_width=240, elem_id="settings"):
                gr.Markdown("### Settings")
                model = gr.Dropdown(host.names, value=host.default_name, label="Model / adapter",
                                    interactive=len(host.names) > 1)
                system = gr.Textbox("You are a helpful, concise assistant.", label="System prompt (Chatbot)",
                                    lines=3)
                temperature = gr.Slider(0, 2, value=d.temperature, step=0.05, label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1, value=d.top_p, step=0.05, label="Top-p")
                max_tokens = gr.Slider(8, max(8, min(2048, host.context_length - 64)), step=8,
                                       value=min(d.max_new_tokens, max(8, host.context_length - 64)),
                                       label="Max new tokens")
            with gr.Column(scale=3):
                with gr.Tabs():
                    with gr.Tab("Chatbot", elem_id="tab-chatbot"):
                        gr.ChatInterface(chat_fn, additional_inputs=[model, system, temperature, top_p, max_tokens],
                                         chatbot=gr.Chatbot(height=420, elem_id="chatbot"),
                                         textbox=gr.Textbox(placeholder="Type a message and press Enter",
                                                            elem_id="chat-input", show_label=False),
                                         fill_height=False)
                    with gr.Tab("Storymaker", elem_id="tab-story"):
                        state = gr.State({})
                        with gr.Row():
                            title = gr.Textbox(label="Story title", placeholder="The Lighthouse at the End of Time",
                                               scale=4, elem_id="story-title")
                            begin = gr.Button("Begin", variant="primary", scale=1, elem_id="story-begin")
                        story = gr.Chatbot(height=380, label="Story", elem_id="story")
                        choice = gr.Radio([], label="What do you do?", interactive=False, elem_id="story-choices")
                        with gr.Row():
                            own = gr.Textbox(placeholder="...or write your own action", show_label=False, scale=4)
                            go = gr.Button("Continue", scale=1, elem_id="story-go")
        settings = [model, temperature, top_p, max_tokens]
        begin.click(story_begin, [title, *settings], [story, state, choice], concurrency_id="model")
        title.submit(story_begin, [title, *settings], [story, state, choice], concurrency_id="model")
        go.click(story_choose, [state, choice, own, *settings], [story, state, choice],
                 concurrency_id="model").then(lambda: "", None, own)
        own.submit(story_choose, [state, choice, own, *settings], [story, state, choice],
                   concurrency_id="model").then(lambda: "", None, own)
    return demo


def theme():
    import gradio as gr

    # System font stacks: the default theme pulls web fonts from the internet, which an offline machine cannot reach.
    return gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])


def launch(demo, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    # One generation at a time: every event shares the model (and its active adapter); more wait in a bounded queue.
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo.launch(server_name=host, server_port=port, theme=theme(), prevent_thread_lock=not block,
                       quiet=True, footer_links=[])


def main(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("tunelab ui needs the ui extra: pip install 'tunelab[ui]'") from None
    from tunelab.inference.host import Host
    from tunelab.inference.listen import bind

    # Before the model loads: a port in use or a bad address is one line at once. Gradio binds the port itself (its
    # launch takes no socket), so the check's socket is closed again.
    bind(args.host, args.port).close()
    host = Host.load(args.model, adapters=args.adapter, runs=args.run, dtype=args.dtype,
                     load_in_4bit=args.load_in_4bit)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: the UI on {args.host} is open to anyone who can reach this port", file=sys.stderr)
    demo = build_app(host)
    print(f"tunelab ui: http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    try:
        launch(demo, args.host, args.port)
    except OSError as e:
        if "port" not in str(e).lower():
            raise
        # taken while the model loaded: Gradio says so in a traceback ("Cannot find empty port in range")
        raise UserError(f"--port {args.port}: taken on {args.host} while the model loaded "
                        f"({str(e).splitlines()[0][:120]}); pick another --port") from None
    return 0
