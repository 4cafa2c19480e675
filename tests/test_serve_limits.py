"""Work per request is bounded: body size (413), completions per request (400), and requests whose client left are
dropped from the queue or stopped mid-generation; big bodies never stall the event loop (/health stays quick).

Each test runs a real uvicorn server over a tiny model (see test_serve.LiveServer).
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_serve import LiveServer  # noqa: E402


@pytest.fixture(scope="module")
def host(tiny_model):
    from tunelab.inference.host import Host

    return Host.load(tiny_model, served_name="tiny")


def health_latencies(url: str, stop: threading.Event) -> list[float]:
    """Times of GET /health, one after another, until `stop` is set."""
    times = []
    with httpx.Client(timeout=30) as c:
        while not stop.is_set():
            t = time.monotonic()
            assert c.get(url + "/health").status_code == 200
            times.append(time.monotonic() - t)
            time.sleep(0.02)
    return times


def while_polling_health(url: str, action):
    stop = threading.Event()
    out: dict = {}
    poller = threading.Thread(target=lambda: out.setdefault("t", health_latencies(url, stop)))
    poller.start()
    try:
        time.sleep(0.2)
        result = action()
    finally:
        stop.set()
        poller.join(60)
    return result, out["t"]


def test_body_over_the_limit_is_413_at_once(host):
    from tunelab.inference.server import create_app

    with LiveServer(create_app(host, max_body_bytes=1024 * 1024)) as s:
        big = b'{"model": "tiny", "prompt": "' + b"word " * (6 * 1024 * 1024) + b'"}'  # 30 MB
        t = time.monotonic()
        # Announced by Content-Length: refused from the headers, before the body is read (raw socket: a client
        # library would insist on sending all 30 MB first).
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(big) + big[:1024])
            answer = b""
            while b"}}" not in answer:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413"), answer
        assert "1048576 bytes" in json.loads(payload)["error"]["message"]

        def chunks():  # no Content-Length (chunked): refused once the bytes received pass the limit
            for i in range(0, len(big), 64 * 1024):
                yield big[i: i + 64 * 1024]

        def post():
            try:
                return httpx.post(s.url + "/v1/completions", content=chunks(), timeout=30,
                                  headers={"Content-Type": "application/json"})
            except httpx.TransportError as e:  # the server may close the connection while the client still sends
                return e

        r, latencies = while_polling_health(s.url, post)
        if isinstance(r, httpx.Response):
            assert r.status_code == 413 and r.json()["error"]["message"].startswith("Request body too large")
        assert time.monotonic() - t < 10
        assert max(latencies) < 1.0, latencies
        assert httpx.get(s.url + "/health").json()["running"] == 0


def test_tokenizing_a_big_body_does_not_block_the_server(host):
    """A prompt just under the body limit takes seconds to tokenize; /health keeps answering meanwhile."""
    from tunelab.inference.server import create_app

    with LiveServer(create_app(host)) as s:
        body = {"model": "tiny", "prompt": "word " * (800 * 1024), "max_tokens": 1}  # 4 MB, default limit 4 MiB
        r, latencies = while_polling_health(s.url, lambda: httpx.post(s.url + "/v1/completions", json=body,
                                                                      timeout=120))
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert len(latencies) > 3 and max(latencies) < 1.0, latencies


def test_completions_per_request_are_bounded(host):
    from tunelab.inference.server import create_app

    with LiveServer(create_app(host, max_choices=8)) as s:
        t = time.monotonic()
        r = httpx.post(s.url + "/v1/completions", timeout=30,
                       json={"model": "tiny", "prompt": ["Hi"] * 100, "n": 16, "max_tokens": 4})
        assert r.status_code == 400 and time.monotonic() - t < 5
        err = r.json()["error"]
        assert "1600 completions" in err["message"] and "at most 8" in err["message"] and err["param"] == "prompt"
        r = httpx.post(s.url + "/v1/chat/completions", timeout=30,
                       json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "n": 9})
        assert r.status_code == 400 and "at most 8" in r.json()["error"]["message"]
        r = httpx.post(s.url + "/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": ["Hi", "Ho"], "n": 4, "max_tokens": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 8


def test_n_is_bounded_by_the_servers_limit_only(host):
    """n above the default limit of 16 is accepted when --max-choices allows it, and refused past it."""
    from tunelab.inference.server import create_app

    with LiveServer(create_app(host, max_choices=20)) as s:
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        r = httpx.post(s.url + "/v1/chat/completions", timeout=60, json={**chat, "n": 20})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 20
        r = httpx.post(s.url + "/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": "Hi", "max_tokens": 1, "n": 21})
        assert r.status_code == 400 and "at most 20" in r.json()["error"]["message"]


def test_abandoned_requests_are_not_generated(host):
    """Clients that give up (a running request and two queued behind it) free the slot and the queue at once,
    instead of the server generating ~20 s of answers nobody reads."""
    from tunelab.inference.server import create_app

    with LiveServer(create_app(host, max_concurrency=1, max_queue=2, max_tokens=448)) as s:
        long = {"model": "tiny", "prompt": ["Once upon a time"] * 16, "max_tokens": 448, "temperature": 0}

        def give_up(body):
            try:
                httpx.post(s.url + "/v1/completions", json=body, timeout=4)
            except httpx.TimeoutException:
                return
            pytest.fail("the request finished before the client gave up: make it longer")

        def health_until(running: int, queued: int) -> dict:
            # bounded wait: on a busy machine a request can take longer than a fixed sleep to reach the server
            for _ in range(30):
                h = httpx.get(s.url + "/health").json()
                if (h["running"], h["queued"]) == (running, queued):
                    break
                time.sleep(0.05)
            return h

        threads = [threading.Thread(target=give_up, args=(long,))]
        threads[0].start()
        health_until(1, 0)
        threads += [threading.Thread(target=give_up, args=(long,)) for _ in range(2)]
        for t in threads[1:]:
            t.start()
        h = health_until(1, 2)
        assert h["running"] == 1 and h["queued"] == 2  # all three are in before their clients leave
        for t in threads:
            t.join(30)
        for _ in range(40):  # bounded: a generation stops at its next token, a queued request leaves at once
            h = httpx.get(s.url + "/health").json()
            if h["running"] == 0 and h["queued"] == 0:
                break
            time.sleep(0.1)
        assert h["running"] == 0 and h["queued"] == 0, h
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2}, timeout=10)
        assert r.status_code == 200
