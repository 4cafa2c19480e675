"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official `openai` client and by raw HTTP.

One tiny base with two LoRA adapters is loaded once per module; each test talks to a real uvicorn server on a free
loopback port (in a thread of the test process, so start-up costs no second model load).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import make_adapter

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "test-key-123"


class LiveServer:
    """uvicorn serving `app` on a free 127.0.0.1 port, in a daemon thread; start-up and shutdown are bounded."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("server did not start in 10 s")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return make_adapter(tiny_model, d / "alpha", seed=1), make_adapter(tiny_model, d / "beta", seed=2)


@pytest.fixture(scope="module")
def host(tiny_model, adapters):
    from tunelab.inference.host import Host

    return Host.load(tiny_model, adapters=[f"alpha={adapters[0]}", adapters[1]], served_name="tiny")


@pytest.fixture(scope="module")
def server(host):
    from tunelab.inference.server import create_app

    with LiveServer(create_app(host, api_key=KEY, max_concurrency=1, max_queue=8, max_tokens=64)) as s:
        yield s


@pytest.fixture()
def client(server):
    # max_retries=0: the client would otherwise retry 429/5xx and hide what the server answered.
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy_chat(client, model, text="Tell me a story.", n=8):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                       max_tokens=n, temperature=0)
    return r.choices[0].message.content


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny", "alpha", "beta"]
    assert client.models.retrieve("alpha").id == "alpha"
    h = httpx.get(server.url + "/health")  # no key needed: a liveness probe
    assert h.status_code == 200 and h.json()["status"] == "ok"


def test_chat_completion(client):
    r = client.chat.completions.create(model="tiny", max_tokens=6, temperature=0,
                                       messages=[{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Hi!"}])
    assert r.object == "chat.completion" and r.model == "tiny"
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str) and c.message.content
    assert c.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_and_batch(client):
    r = client.completions.create(model="alpha", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    assert r.choices[0].finish_reason in ("stop", "length")
    # A list of prompts is one batched generate (left padding): each answer equals its single-prompt answer.
    batch = client.completions.create(model="alpha", prompt=["Once upon a time", "The capital of France is"],
                                      max_tokens=5, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == r.choices[0].text


def test_streaming_matches_non_streaming(client):
    want = greedy_chat(client, "beta", n=10)
    chunks = list(client.chat.completions.create(model="beta", max_tokens=10, temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": "Tell me a story."}],
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals and finals[-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 10

    stream = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream) == \
        client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0).choices[0].text


def test_sse_wire_format_ends_with_done(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    json.loads(lines[0][6:])  # every event before [DONE] is one JSON chunk


def test_bad_requests_are_400_in_openai_shape(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[])
    assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=7)
    assert "temperature" in e.value.body["param"]
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for raw in (b"{not json", b"[1, 2]", b'{"model": "tiny"}', b'{"model": "tiny", "messages": [{"role": "x"}]}'):
        r = httpx.post(server.url + "/v1/chat/completions", content=raw, headers=auth)
        assert r.status_code == 400, raw
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    # A prompt longer than the context (512 tokens for the tiny model) is refused; a huge max_tokens is capped.
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="word " * 600, max_tokens=5)
    assert e.value.code == "context_length_exceeded"
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=100000, temperature=0)
    assert r.usage.completion_tokens <= 64  # the server's --max-tokens in this fixture


def test_values_that_used_to_crash_are_400_and_keep_the_connection(server):
    """A seed past 2^64, a lone surrogate, an empty prompt: each a 400 in OpenAI's shape naming the field, streamed
    or not, on one kept-alive connection (a 500 made the server drop it)."""
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    cases = [("/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "seed": 2**64}, "seed"),
             ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "\ud800"}]},
              "messages.0.content"),
             ("/v1/completions", {"model": "tiny", "prompt": [""], "max_tokens": 2}, "prompt.0"),
             ("/v1/completions", {"model": "tiny", "prompt": [""], "max_tokens": 2, "stream": True}, "prompt.0"),
             ("/v1/completions", {"model": "tiny", "prompt": [], "max_tokens": 2}, "prompt")]
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        for path, body, param in cases:
            # json.dumps writes the lone surrogate as the escape "\ud800", as a client's JSON would
            r = c.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert err["param"] == param and err["type"] == "invalid_request_error" and param in err["message"]
            assert r.headers.get("connection") != "close"
        assert c.post("/v1/chat/completions", json=chat).status_code == 200


def test_chat_refuses_fields_it_cannot_honour(client):
    """Fields that change what the answer must hold (log probabilities, JSON, tool calls) are refused with a 400
    naming the field, rather than ignored; the values that ask for nothing more than plain text are accepted."""
    msgs = [{"role": "user", "content": "Hi"}]
    refused = [("logprobs", {"logprobs": True}), ("top_logprobs", {"top_logprobs": 3}),
               ("response_format", {"response_format": {"type": "json_object"}}),
               ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
               ("tool_choice", {"tool_choice": "auto"}),
               ("functions", {"functions": [{"name": "f", "parameters": {}}]}),
               ("function_call", {"function_call": "auto"})]
    for field, kw in refused:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, **kw)
        assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"
        assert e.value.body["param"].startswith(field) and "not supported" in e.value.body["message"], field
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, logprobs=False, tools=[],
                                       tool_choice="none", response_format={"type": "text"})
    assert r.choices[0].message.content and r.choices[0].message.tool_calls is None


def test_sampling_fields_it_cannot_honour_are_refused(client):
    """OpenAI's presence/frequency penalties and best_of are refused with a 400 naming the field unless they ask for
    nothing (0, best_of 1, null): transformers has no such penalties (its repetition penalty is another setting) and
    best_of ranks by log probabilities, which the server does not compute. The neutral values tools send work."""
    msgs = [{"role": "user", "content": "Hi"}]
    for field, value in (("presence_penalty", 0.5), ("frequency_penalty", -1), ("best_of", 2)):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, extra_body={field: value})
        assert e.value.body["param"] == field and "not supported" in e.value.body["message"], field
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="Hi", max_tokens=2, extra_body={field: value})
        assert e.value.body["param"] == field and "not supported" in e.value.body["message"], field
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, presence_penalty=0,
                                       frequency_penalty=0.0)
    assert r.choices[0].message.content
    r = client.completions.create(model="tiny", prompt="Hi", max_tokens=2, presence_penalty=0.0, frequency_penalty=0,
                                  best_of=1, extra_body={"logit_bias": None})
    assert r.choices[0].text


def test_logit_bias_is_added_to_the_logits(client, host):
    """logit_bias (ids of the model's tokenizer, as with vLLM) is honoured: +100 makes a token the greedy choice
    every step, -100 bans the one greedy decoding would pick; an id outside the vocabulary is a 400."""
    token = host.tok.convert_tokens_to_ids("Ġcat")
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=4, temperature=0,
                                  logit_bias={str(token): 100})
    assert r.choices[0].text == " cat" * 4
    streamed = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=3, temperature=0, logit_bias={str(token): 100}, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == " cat" * 3
    plain = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=1, temperature=0)
    first = host.tok(plain.choices[0].text, add_special_tokens=False)["input_ids"][0]
    banned = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=1, temperature=0,
                                       logit_bias={str(first): -100})
    assert banned.choices[0].text != plain.choices[0].text
    for bias, param in (({str(len(host.tok))}, "logit_bias"), ({"cat": 1}, "logit_bias.cat")):
        body = {str(len(host.tok)): 5} if isinstance(bias, set) else bias
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="Hi", max_tokens=1, logit_bias=body)
        assert e.value.body["param"] == param, e.value.body


def test_token_id_prompts(client, host):
    """/v1/completions takes token-id prompts (OpenAI's and vLLM's API; lm-eval's local-completions sends them):
    fed as given, answering as the text that tokenizes to them; echo gives their text back."""
    texts = ["Once upon a time", "The capital of France is"]
    ids = [host.tok(t)["input_ids"] for t in texts]  # as the server tokenizes a text prompt
    want = client.completions.create(model="alpha", prompt=texts, max_tokens=5, temperature=0)
    one = client.completions.create(model="alpha", prompt=ids[0], max_tokens=5, temperature=0)
    assert one.choices[0].text == want.choices[0].text and one.usage.prompt_tokens == len(ids[0])
    both = client.completions.create(model="alpha", prompt=ids, max_tokens=5, temperature=0)
    assert [c.text for c in both.choices] == [c.text for c in want.choices]
    assert both.usage == want.usage
    streamed = client.completions.create(model="alpha", prompt=ids[1], max_tokens=5, temperature=0, stream=True,
                                         echo=True)
    assert "".join(c.choices[0].text for c in streamed) == texts[1] + want.choices[1].text
    for prompt, param in (([len(host.tok)], "prompt"), ([[1, 2], [-1]], "prompt.1.0"), ([[]], "prompt.0"),
                          ([1, "a"], "prompt.1")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="alpha", prompt=prompt, max_tokens=1)
        assert e.value.body["param"] == param, (prompt, e.value.body)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="alpha", prompt=[1] * 600, max_tokens=1)
    assert e.value.code == "context_length_exceeded"


def test_explicit_null_means_the_default(server):
    """n, stream, echo and stream_options.include_usage may be null, as with OpenAI (clients that send every field
    do): the answer is the default's."""
    auth = {"Authorization": f"Bearer {KEY}"}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
    want = httpx.post(server.url + "/v1/chat/completions", json=chat, headers=auth, timeout=60).json()
    r = httpx.post(server.url + "/v1/chat/completions", headers=auth, timeout=60,
                   json={**chat, "n": None, "stream": None, "stream_options": {"include_usage": None}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"] == want["choices"] and r.json()["usage"] == want["usage"]
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": None}, "echo": None, "n": None}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=auth, timeout=60) as r:
        assert r.status_code == 200
        events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    assert all(ev.get("usage") is None for ev in events)  # include_usage null: no usage chunk
    text = "".join(ev["choices"][0]["text"] for ev in events)
    plain = httpx.post(server.url + "/v1/completions", headers=auth, timeout=60,
                       json={k: v for k, v in body.items() if k not in ("stream", "stream_options")}).json()
    assert text == plain["choices"][0]["text"] and not text.startswith("Once")  # echo null: no echo


def test_text_parts_are_joined_with_newlines(client):
    """Content given as several text parts reads as their texts on separate lines, as with vLLM (not fused)."""
    def ask(content):
        return client.chat.completions.create(model="tiny", max_tokens=4, temperature=0,
                                              messages=[{"role": "user", "content": content}])

    parts = ask([{"type": "text", "text": "Name a color."}, {"type": "text", "text": "Say hi."}])
    joined = ask("Name a color.\nSay hi.")
    assert parts.usage.prompt_tokens == joined.usage.prompt_tokens != ask("Name a color.Say hi.").usage.prompt_tokens
    assert parts.choices[0].message.content == joined.choices[0].message.content


def test_raw_completion_prompts_start_with_bos(tiny_model):
    """/v1/completions tokenizes its raw prompt as the tokenizer does by default (BOS first, for a tokenizer that adds
    one), as vLLM does and as text is tokenized for training; a chat prompt is tokenized as its template wrote it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.inference.host import Host
    from tunelab.inference.server import create_app

    tok = AutoTokenizer.from_pretrained(tiny_model, add_bos_token=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    firsts = []
    model.register_forward_pre_hook(lambda m, a, kw: firsts.append(kw["input_ids"][:, 0].tolist()), with_kwargs=True)
    prompt = "Once upon a time"
    with LiveServer(create_app(Host(model, tok, "bos"))) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = c.completions.create(model="bos", prompt=prompt, max_tokens=2, temperature=0)
        assert r.usage.prompt_tokens == len(tok(prompt)["input_ids"]) == len(tok(prompt, add_special_tokens=False)
                                                                             ["input_ids"]) + 1
        assert firsts[0] == [tok.bos_token_id]
        streamed = list(c.completions.create(model="bos", prompt=prompt, max_tokens=2, temperature=0, stream=True,
                                             stream_options={"include_usage": True}))
        assert streamed[-1].usage.prompt_tokens == r.usage.prompt_tokens and firsts[-2] == [tok.bos_token_id]
        msgs = [{"role": "user", "content": "Hi"}]
        r = c.chat.completions.create(model="bos", messages=msgs, max_tokens=2, temperature=0)
        templated = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert r.usage.prompt_tokens == len(tok(templated, add_special_tokens=False)["input_ids"])


def test_api_key_missing_or_wrong_is_401(server):
    for key in ("wrong-key",):
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": []})  # no header at all
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
    assert e.value.status_code == 404 and e.value.code == "model_not_found"


def test_adapters_answer_differently_from_each_other_and_the_base(client):
    answers = {m: greedy_chat(client, m) for m in ("tiny", "alpha", "beta")}
    assert len(set(answers.values())) == 3, answers
    # Switching back and forth does not leak one adapter into another.
    assert greedy_chat(client, "alpha") == answers["alpha"]
    assert greedy_chat(client, "tiny") == answers["tiny"]


PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant:{% endif %}")
TAGGED_TEMPLATE = ("{% for m in messages %}<<turn role={{ m['role'] }}>> {{ m['content'] }} <</turn>>\n{% endfor %}"
                   "{% if add_generation_prompt %}<<turn role=assistant>>{% endif %}")


def adapter_with_template(base: str, path: Path, seed: int, template: str, **tok_kw) -> str:
    """An adapter directory as a run leaves it: the adapter and the tokenizer it was trained with, template included."""
    from transformers import AutoTokenizer

    make_adapter(base, path, seed)
    tok = AutoTokenizer.from_pretrained(base, **tok_kw)
    tok.chat_template = template
    tok.save_pretrained(path)
    return str(path)


def test_each_route_is_prompted_with_its_own_chat_template(tiny_model, tmp_path):
    """Two runs over one base trained with different chat templates: each route renders (and stops) as its run was
    trained, and the base route as the base model's own template, whichever adapter is listed first."""
    from transformers import AutoTokenizer

    from tunelab.errors import UserError
    from tunelab.inference.engine import stop_token_ids
    from tunelab.inference.host import Host
    from tunelab.inference.server import create_app

    plain = adapter_with_template(tiny_model, tmp_path / "plain", 1, PLAIN_TEMPLATE)
    # this run also ended its turns on <|endoftext|> rather than the base's <|im_end|>
    tagged = adapter_with_template(tiny_model, tmp_path / "tagged", 2, TAGGED_TEMPLATE, eos_token="<|endoftext|>")
    host = Host.load(tiny_model, adapters=[f"plain={plain}", f"tagged={tagged}"], served_name="base")
    msgs = [{"role": "user", "content": "Name a color."}]
    base_tok = AutoTokenizer.from_pretrained(tiny_model)
    expected = {"plain": "user: Name a color.\nassistant:",
                "tagged": "<<turn role=user>> Name a color. <</turn>>\n<<turn role=assistant>>",
                "base": base_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)}
    assert "<|im_start|>" in expected["base"]
    with LiveServer(create_app(host)) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for name, prompt in expected.items():
            r = c.chat.completions.create(model=name, messages=msgs, max_tokens=1, temperature=0)
            assert r.usage.prompt_tokens == len(base_tok(prompt, add_special_tokens=False)["input_ids"]), name
    for name, prompt in expected.items():  # what chat and the web UI send
        assert host.fit_messages(msgs, 1, name)[1] == prompt, name
    endoftext = base_tok.convert_tokens_to_ids("<|endoftext|>")
    assert endoftext in stop_token_ids(host.tokenizer("tagged"), host.model)
    assert endoftext not in stop_token_ids(host.tokenizer("plain"), host.model)

    # A run whose tokenizer gained a token cannot share the model's embeddings with the others.
    grown = adapter_with_template(tiny_model, tmp_path / "grown", 3, PLAIN_TEMPLATE,
                                  additional_special_tokens=["<|new|>"])
    with pytest.raises(UserError, match=r"adapters plain .* and grown .* different tokenizers"):
        Host.load(tiny_model, adapters=[f"plain={plain}", f"grown={grown}"])


def test_client_gone_mid_stream_frees_the_slot(server):
    body = {"model": "alpha", "prompt": "Once", "max_tokens": 64, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        next(r.iter_lines())
    for _ in range(100):  # bounded: the generation is cancelled at its next token
        h = httpx.get(server.url + "/health").json()
        if h["running"] == 0 and h["queued"] == 0:
            break
        time.sleep(0.1)
    assert h["running"] == 0 and h["queued"] == 0


def test_load_is_bounded_200_or_429(host):
    """20 parallel requests, 1 running + 4 queued at most: each gets 200 or a prompt 429; nothing hangs."""
    from tunelab.inference.server import create_app

    with LiveServer(create_app(host, max_concurrency=1, max_queue=4, max_tokens=16)) as s:
        def one(i):
            body = {"model": ["tiny", "alpha", "beta"][i % 3], "max_tokens": 16, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Count to {i}"}], "stream": i % 2 == 0}
            r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60)
            return r.status_code, r.text

        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(one, range(20), timeout=120))
        codes = [c for c, _ in results]
        assert set(codes) <= {200, 429}, results
        assert codes.count(200) >= 5 and codes.count(429) >= 1, codes
        for code, text in results:
            if code == 429:
                assert json.loads(text)["error"]["code"] == "rate_limit_exceeded"
            elif text.startswith("data:"):
                assert text.rstrip().endswith("data: [DONE]")
        h = httpx.get(s.url + "/health").json()
        assert h["status"] == "ok" and h["running"] == 0 and h["queued"] == 0
        ok = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200


def test_parallel_requests_across_adapters_get_their_own_answers(host, client):
    """With 2 generations at a time, same-model requests run together and a switch waits for the model to idle:
    every answer is exactly what that model says alone."""
    from tunelab.inference.server import create_app

    models = ["tiny", "alpha", "beta", "alpha", "alpha", "tiny", "beta", "beta"]
    want = {m: greedy_chat(client, m) for m in set(models)}
    with LiveServer(create_app(host, max_concurrency=2, max_queue=16)) as s:
        par = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        with ThreadPoolExecutor(len(models)) as pool:
            got = list(pool.map(lambda m: greedy_chat(par, m), models, timeout=180))
    assert got == [want[m] for m in models]


def test_cli_serve_binds_loopback(tiny_model, adapters, tmp_path):
    """`tunelab serve` as a user runs it: loads, answers on 127.0.0.1, refuses a missing key."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", "--model", tiny_model, "--adapter",
                             f"alpha={adapters[0]}", "--port", str(port), "--api-key", KEY],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):  # bounded: up to 60 s for imports and loading on a busy machine
            if proc.poll() is not None:
                pytest.fail(proc.stdout.read())
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.25)
        else:
            pytest.fail("tunelab serve did not come up in 60 s")
        assert httpx.get(url + "/v1/models").status_code == 401
        models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert [m["id"] for m in models["data"]] == [Path(tiny_model).name, "alpha"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("where, message", [
    (["--port", "99999"], "--port 99999: a TCP port is 1 to 65535"),
    (["--port", "{busy}"], "--port {busy}: already in use on 127.0.0.1"),
    (["--host", "nonexistent.invalid"], "--host nonexistent.invalid: not an address or a name this machine"),
])
@pytest.mark.parametrize("command", ["serve", "ui"])
def test_cli_serve_and_ui_check_where_they_listen_before_loading(command, where, message, tmp_path, capsys):
    """A bad port or address is one line and exit 2 before the model loads (the model here does not exist: had it
    been loaded first, its error would show instead), not uvicorn's exit code 3 or Gradio's traceback."""
    from tunelab.cli import main

    if command == "ui":
        pytest.importorskip("gradio")

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        argv = [a.format(busy=port) for a in where]
        assert main([command, "--model", str(tmp_path / "no-such-model"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.format(busy=port)) and err.count("\n") == 1, err


def test_ui_port_taken_while_the_model_loads_is_one_line(tiny_model, capsys, monkeypatch):
    """The port is free when checked, then taken by another program while the model loads: one line, exit 2."""
    pytest.importorskip("gradio")
    from tunelab.cli import main
    from tunelab.inference.host import Host

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    thief = socket.socket()
    load = Host.load

    def load_while_another_takes_the_port(*args, **kwargs):
        thief.bind(("127.0.0.1", port))
        thief.listen()
        return load(*args, **kwargs)

    monkeypatch.setattr(Host, "load", load_while_another_takes_the_port)
    try:
        assert main(["ui", "--model", tiny_model, "--port", str(port)]) == 2
    finally:
        thief.close()
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"error: --port {port}: taken on 127.0.0.1 while the model loaded"), err
    assert not any("Traceback" in line for line in err)


def test_cli_serve_user_errors(tiny_model, tmp_path):
    r = subprocess.run([sys.executable, "-m", "tunelab", "serve", "--model", tiny_model, "--adapter", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a PEFT adapter directory" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.e2e
def test_embedded_model_answers_through_the_api(embedded_model):
    """The real SmolLM2-135M-Instruct behind the API: a factual question gets the right answer, streamed or not."""
    from tunelab.inference.host import Host
    from tunelab.inference.server import create_app

    with LiveServer(create_app(Host.load(embedded_model, served_name="smollm2"))) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        r = c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=12, temperature=0)
        assert "Paris" in r.choices[0].message.content
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="smollm2", messages=msgs, max_tokens=12, temperature=0, stream=True))
        assert streamed == r.choices[0].message.content


@pytest.mark.e2e
def test_embedded_model_stop_strings_match_the_reply_only(embedded_model):
    """A few-shot prompt ending in a newline with stop "\nA:": the stop is matched in the reply, not across the
    prompt's end, so the model writes its answer line before stopping, streamed or not."""
    from tunelab.inference.host import Host
    from tunelab.inference.server import create_app

    prompt = "Q: What is 2+2?\nA: 4\nQ: What is 3+3?\nA: 6\n"
    with LiveServer(create_app(Host.load(embedded_model, served_name="smollm2"))) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = c.completions.create(model="smollm2", prompt=prompt, max_tokens=30, temperature=0, stop=["\nA:"])
        text = r.choices[0].text
        assert text.startswith("A: ") and len(text) > 3 and "\n" not in text, text
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens > 2
        streamed = list(c.completions.create(model="smollm2", prompt=prompt, max_tokens=30, temperature=0,
                                             stop=["\nA:"], stream=True))
        assert "".join(ch.choices[0].text for ch in streamed) == text
        assert streamed[-1].choices[0].finish_reason == "stop"
