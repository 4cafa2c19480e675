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
    (["--temperature", "-1"], "--temperature >= 0"),
    (["--system", "@/nonexistent/prompt.txt"], "no such file"),
])
def test_cli_chat_user_errors_are_one_line(argv, message, tiny_model, adapter, capsys):
    from tunelab.cli import main

    assert main(["chat", "--model", tiny_model, *[a.format(adapter=adapter) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
