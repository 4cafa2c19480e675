"""`tunelab chat`: the real CLI driven through piped stdin, and the session logic (history, commands, context fit)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import make_adapter

from tunelab.inference.chat import ChatSession, repl
from tunelab.inference.engine import GenParams


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    return make_adapter(tiny_model, tmp_path_factory.mktemp("chat") / "lora", seed=3)


@pytest.fixture(scope="module")
def host(tiny_model, adapter):
    from tunelab.inference.host import Host

    return Host.load(tiny_model, adapters=[adapter])


def test_cli_chat_piped_over_4bit_base(tiny_model, adapter):
    """The adapter over a 4-bit (bitsandbytes NF4) base, as a user would pipe a conversation into it."""
    script = ("Hello there\n/system Be brief.\n/system\n/set temperature 0\n/oops\nAnd again?\n/reset\nHi\n"
              "/quit\nignored\n")
    r = subprocess.run([sys.executable, "-m", "tunelab", "chat", "--model", tiny_model, "--adapter", adapter,
                        "--load-in-4bit", "--max-tokens", "6", "--temperature", "0", "--persona", "pirate"],
                       input=script, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Loading weights" not in r.stderr  # no library progress bar before the conversation
    lines = r.stdout.splitlines()
    assert "[system prompt set]" in lines and "[system prompt: Be brief.]" in lines
    assert "[temperature = 0]" in lines and "[conversation reset]" in lines
    assert any(ln.startswith("[unknown command /oops") for ln in lines)
    # a reply per message: before the first command, after "/oops" (And again?), after the reset (Hi); a random
    # model's greedy reply may hold a newline token, so replies are the text between the command lines
    at = {key: next(i for i, ln in enumerate(lines) if ln.startswith(key))
          for key in ("[system prompt set]", "[unknown command", "[conversation reset]")}
    replies = ["\n".join(lines[a:b]) for a, b in ((0, at["[system prompt set]"]),
                                                   (at["[unknown command"] + 1, at["[conversation reset]"]),
                                                   (at["[conversation reset]"] + 1, len(lines)))]
    assert all(reply.strip() for reply in replies), r.stdout
    commands = lines[at["[system prompt set]"]:at["[unknown command"] + 1]  # four commands, no message between
    assert len(commands) == 4 and all(ln.startswith("[") for ln in commands), r.stdout


def test_session_history_reset_and_system(host):
    s = ChatSession(host, system="You are terse.", params=GenParams(max_new_tokens=5))
    first = "".join(s.reply("Hi"))
    assert first and [m["role"] for m in s.history] == ["user", "assistant"]
    assert s.history[1]["content"] == first
    "".join(s.reply("More"))
    msgs = s.messages("Last")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert s.command("/system Speak like a poet.") == "[system prompt set]"
    assert s.messages("x")[0] == {"role": "system", "content": "Speak like a poet."}
    assert s.command("/reset") == "[conversation reset]" and s.history == []
    assert s.command("/set max_tokens 3") == "[max_tokens = 3]" and s.params.max_new_tokens == 3
    assert s.command("/set top_p x").startswith("[top_p needs a float")
    assert s.command("/quit") is None


def test_stopped_reply_is_kept_and_model_freed(host):
    s = ChatSession(host, params=GenParams(max_new_tokens=200))
    gen = s.reply("Tell me everything.")
    part = next(gen)
    gen.close()  # what Ctrl-C does in the terminal
    assert s.history[-1] == {"role": "assistant", "content": part}
    assert host.lock.acquire(blocking=False)
    host.lock.release()


def test_long_history_is_trimmed_to_fit_the_context(host):
    s = ChatSession(host, system="sys", params=GenParams(max_new_tokens=100))
    for i in range(12):
        s.history += [{"role": "user", "content": f"question {i} " + "word " * 30},
                      {"role": "assistant", "content": "answer " * 30}]
    msgs, prompt = host.fit_messages(s.messages("final question"), 100)
    assert msgs[0]["role"] == "system" and msgs[-1]["content"] == "final question"
    assert len(msgs) < len(s.messages("final question"))
    assert len(host.tok(prompt)["input_ids"]) + 100 <= host.context_length
    # whole exchanges are dropped: after the system prompt the history still opens on a user turn and alternates
    # (templates such as Llama 2's, Mistral's and Gemma's refuse anything else)
    roles = [m["role"] for m in msgs[1:]]
    assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"], roles
    s.history = [{"role": "user", "content": "word " * host.context_length}, {"role": "assistant", "content": "ok"},
                 {"role": "user", "content": "and?"}, {"role": "assistant", "content": "done"}]
    msgs, _ = host.fit_messages(s.messages("final question"), 100)  # the long question goes, and its answer with it
    assert [m["content"] for m in msgs] == ["sys", "and?", "done", "final question"]


def test_repl_reads_until_eof(host):
    import io

    out = io.StringIO()
    s = ChatSession(host, params=GenParams(max_new_tokens=3))
    assert repl(s, io.StringIO("/help\nhello\n"), out) == 0
    assert out.getvalue().startswith("[commands:") and len(s.history) == 2


def test_merged_adapter_answers_like_the_adapter(tiny_model, adapter, host):
    from tunelab.inference.host import Host

    merged = Host.load(tiny_model, adapters=[adapter], merge=True)
    params = GenParams(max_new_tokens=8)
    want = "".join(ChatSession(host, params=params).reply("Hi"))
    assert "".join(ChatSession(merged, params=params).reply("Hi")) == want
    assert "".join(ChatSession(host, params=params, name=host.base_name).reply("Hi")) != want


@pytest.mark.parametrize("argv, message", [
    (["--persona", "pirat"], "unknown persona 'pirat' (did you mean 'pirate'?)"),
    (["--adapter", "{adapter}", "--merge", "--load-in-4bit"], "--merge folds the adapter into full-precision"),
    (["--adapter", "/nonexistent/lora"], "not a PEFT adapter directory"),
    (["--temperature", "-1"], "--temperature must be >= 0 and finite, got -1.0"),
    (["--top-p", "7"], "--top-p must be in (0, 1], got 7.0"),
    (["--seed", str(2**64)], "--seed must be a 64-bit integer"),
    (["--system", "@/nonexistent/prompt.txt"], "no such file"),
])
def test_cli_chat_user_errors_are_one_line(argv, message, tiny_model, adapter, capsys):
    from tunelab.cli import main

    assert main(["chat", "--model", tiny_model, *[a.format(adapter=adapter) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_set_refuses_what_the_flags_refuse_and_the_chat_goes_on(host):
    """/set takes only values its CLI flag would: a refused one leaves the setting as it was, so the next message
    is answered (max_tokens 0 used to be taken, and the next reply crashed with a traceback)."""
    s = ChatSession(host, params=GenParams(max_new_tokens=4, temperature=0.7, top_p=0.9))
    for line, message in [("/set max_tokens 0", "[max_tokens must be >= 1, got 0; unchanged]"),
                          ("/set top_p 7", "[top_p must be in (0, 1], got 7; unchanged]"),
                          ("/set top_p 0", "[top_p must be in (0, 1], got 0; unchanged]"),
                          ("/set temperature -3", "[temperature must be >= 0 and finite, got -3; unchanged]"),
                          ("/set temperature nan", "[temperature must be >= 0 and finite, got nan; unchanged]"),
                          ("/set seed 99999999999999999999999", "[seed must be a 64-bit integer, got "
                                                                 "99999999999999999999999; unchanged]")]:
        assert s.command(line) == message
    assert (s.params.max_new_tokens, s.params.temperature, s.params.top_p, s.params.seed) == (4, 0.7, 0.9, None)
    assert "".join(s.reply("Hi")) and len(s.history) == 2


def test_message_longer_than_the_context_is_refused_and_the_chat_goes_on(host):
    """A message whose prompt alone fills the context gets one line and no reply; the conversation stays as it was
    and the next message is answered."""
    import io

    out = io.StringIO()
    s = ChatSession(host, params=GenParams(max_new_tokens=3))
    assert repl(s, io.StringIO("Hi\n" + "hello " * 3000 + "\nAgain\n"), out) == 0
    lines = out.getvalue().splitlines()
    refusal = [ln for ln in lines if ln.startswith("[message too long")]
    assert len(refusal) == 1 and f"context holds {host.context_length}" in refusal[0], lines
    assert [m["content"] for m in s.history if m["role"] == "user"] == ["Hi", "Again"]


def test_reply_stops_where_the_context_ends(host):
    """A reply longer than the room the prompt leaves is cut at the end of the context, not generated past it."""
    from tunelab.inference.engine import count_tokens, stop_token_ids

    s = ChatSession(host, params=GenParams(max_new_tokens=200, logit_bias={t: -100 for t in
                                                                           stop_token_ids(host.tok, host.model)}))
    user = "hello " * 460  # a prompt of some 470 tokens: less than 200 left for the reply
    _, prompt = host.fit_messages(s.messages(user), 1)
    room = host.context_length - count_tokens(host.tok, prompt)
    assert 0 < room < 200
    positions = []
    hook = host.model.get_base_model().register_forward_pre_hook(
        lambda m, a, kw: positions.append(int(kw["position_ids"].max())), with_kwargs=True)
    try:
        "".join(s.reply(user))
    finally:
        hook.remove()
    # the last step feeds every token but the one it writes (positions from 0): the sequence ends at the context's end
    assert max(positions) == host.context_length - 2


def test_chat_with_a_run_named_like_its_base(tiny_model, adapter, tmp_path, monkeypatch, capsys):
    """runs/tiny over models/tiny: chat needs no names and answers; serve and the UI name the base apart."""
    import io
    import shutil
    from pathlib import Path

    from tunelab.cli import main
    from tunelab.errors import UserError
    from tunelab.inference.host import Host

    name = Path(tiny_model).name
    run = tmp_path / name
    (run / "final").parent.mkdir()
    shutil.copytree(adapter, run / "final")
    (run / "config.yaml").write_text(f"model:\n  source: {tiny_model}\nadapter:\n  type: lora\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    assert main(["chat", "--run", str(run), "--max-tokens", "3"]) == 0, capsys.readouterr().err
    host = Host.load(runs=[str(run)])
    assert host.names == [f"{name}-base", name] and host.default_name == name
    with pytest.raises(UserError, match="--served-model-name"):
        Host.load(runs=[str(run)], served_name=name)
