"""`tunelab serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over one base model and its adapters.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both stream as server-sent events ending
in `data: [DONE]`), GET /health. The request's `model` picks the base or one of its adapters. Errors use OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}`, so OpenAI clients report them properly: 400 for a malformed
request (FastAPI's own answer would be 422), 401 for a missing or wrong key, 404 for an unknown model, 429 when busy.

Load is bounded: at most --max-concurrency generations run, at most --max-queue requests wait, and anything beyond
is answered 429 at once rather than piling up until clients time out.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations (Request, the bodies)
# as objects, and some are imported inside create_app so that importing this module needs no FastAPI.

import asyncio
import collections
import hmac
import json
import os
import sys
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import UserError
from tunelab.inference.engine import GenParams


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- request bodies (the subset of OpenAI's fields that a local model can honour; unknown fields are ignored) ---

class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    stream_options: dict | None = None

    def gen_params(self, max_new_tokens: int) -> GenParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4:
            raise ApiError(400, "stop: at most 4 stop sequences", param="stop")
        # OpenAI's default temperature is 1 (sampling); temperature 0 means greedy here.
        temperature = 1.0 if self.temperature is None else self.temperature
        return GenParams(max_new_tokens=max_new_tokens, temperature=temperature,
                         top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed, stop=stop)


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart] | None = None

    def as_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        # "developer" is OpenAI's newer name for the system role; chat templates know "system".
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: str | list[str] = Field(min_length=1)
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


# --- scheduling ---

class QueueFull(Exception):
    pass


class Scheduler:
    """Admission and order of generations: FIFO, at most `max_active` at once, at most `max_queue` waiting.

    Requests for the same model (adapter) may run together; a request for another one waits until the running ones
    have finished, because the active adapter is one setting of the shared base. Runs on the event loop only (no
    threads touch it), so plain counters need no lock.
    """

    def __init__(self, host, max_active: int = 1, max_queue: int = 16):
        if max_active < 1 or max_queue < 0:
            raise UserError("--max-concurrency must be >= 1 and --max-queue >= 0")
        self.host, self.max_active, self.max_queue = host, max_active, max_queue
        self.active = 0
        self._current: str | None = None
        self._queue: collections.deque = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _can_start(self, name: str) -> bool:
        return self.active < self.max_active and (self.active == 0 or self._current == name)

    def _start(self, name: str) -> None:
        if self.active == 0:
            self.host.activate(name)  # nothing is generating now: safe to switch (a no-op if already active)
            self._current = name
        self.active += 1

    def _wake(self) -> None:
        while self._queue and self._can_start(self._queue[0][0]):
            name, fut = self._queue.popleft()
            if fut.cancelled():  # its request was cancelled and has not run its cleanup yet: skip it
                continue
            self._start(name)
            fut.set_result(None)

    async def acquire(self, name: str) -> None:
        if not self._queue and self._can_start(name):
            self._start(name)
            return
        if len(self._queue) >= self.max_queue:
            raise QueueFull
        entry = (name, asyncio.get_running_loop().create_future())
        self._queue.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry[1].done() and not entry[1].cancelled():
                self.release()  # it was started just as the request was cancelled
            else:
                if entry in self._queue:
                    self._queue.remove(entry)
                self._wake()
            raise

    def release(self) -> None:
        self.active -= 1
        self._wake()


# --- the app ---

def create_app(host, api_key: str | None = None, max_concurrency: int = 1, max_queue: int = 16,
               max_tokens: int = 512):
    """The FastAPI app serving `host` (a tunelab.inference.host.Host)."""
    import anyio
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from tunelab.inference.engine import TextStream, chat_prompts, complete, count_tokens

    app = FastAPI(title="tunelab", version="1")
    sched = Scheduler(host, max_concurrency, max_queue)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        return JSONResponse(ApiError(400, f"{where}: {err['msg']}" if where else err["msg"],
                                     param=where or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body(),
                            status_code=500)

    def auth(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        if not header:
            raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):  # constant time: no timing oracle on the key
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")

    def check_model(name: str) -> None:
        if name not in host.routes:
            raise ApiError(404, f"The model '{name}' does not exist; available: {', '.join(host.names)}",
                           param="model", code="model_not_found")

    def budget(req: _Request, prompt_tokens: int, requested: int | None) -> int:
        """max_tokens for a request: what it asked (or the server default), capped by the server and the context."""
        room = host.context_length - prompt_tokens
        if room < 1:
            raise ApiError(400, f"This model's maximum context length is {host.context_length} tokens, but the "
                                f"prompt has {prompt_tokens} tokens", param="messages", code="context_length_exceeded")
        return max(1, min(requested or max_tokens, max_tokens, room))

    async def admit(name: str) -> None:
        try:
            await sched.acquire(name)
        except QueueFull:
            raise ApiError(429, f"Server busy: {sched.active} running and {sched.waiting} queued; retry shortly",
                           type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    class SlotStream(StreamingResponse):
        """SSE that holds a scheduler slot and a running generation, both released however the response ends
        (finished, client gone, server stopping) and only after the generation thread has stopped."""

        def __init__(self, events, gen: TextStream):
            super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            self._gen = gen

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                with anyio.CancelScope(shield=True):
                    await run_in_threadpool(self._gen.close)
                sched.release()

    def sse(obj) -> str:
        # One `data:` line per event; json.dumps escapes newlines, so a chunk never spans lines.
        return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"

    async def pieces(gen: TextStream):
        """The generation's text pieces, each read on a worker thread so the event loop never blocks on the model."""
        it = iter(gen)
        while True:
            piece = await run_in_threadpool(next, it, None)
            if piece is None:
                return
            yield piece

    async def run_stream(name: str, prompt: str, params: GenParams, chunk, final, include_usage: bool):
        gen = TextStream(host.model, host.tok, prompt, params)

        async def events():
            try:
                first = chunk(None)
                if first is not None:
                    yield sse(first)
                async for piece in pieces(gen):
                    yield sse(chunk(piece))
                yield sse(final(gen.finish_reason))
                if include_usage:
                    yield sse({**final(None), "choices": [], "usage": usage(gen.prompt_tokens, gen.completion_tokens)})
            except Exception as e:  # headers are sent already: report in the stream, as OpenAI does
                yield sse(ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error").body())
            yield sse("[DONE]")

        return SlotStream(events(), gen)

    async def run_batch(name: str, prompts: list[str], params: GenParams):
        try:
            return await run_in_threadpool(complete, host.model, host.tok, prompts, params)
        finally:
            sched.release()

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": host.names, "running": sched.active, "queued": sched.waiting,
                "max_concurrency": sched.max_active, "max_queue": sched.max_queue}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        return {"object": "list", "data": [_model_card(n, created) for n in host.names]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(auth)])
    async def model(name: str):
        check_model(name)
        return _model_card(name, created)

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(req: ChatRequest):
        check_model(req.model)
        if req.stream and req.n > 1:
            raise ApiError(400, "n > 1 is not supported with stream=true", param="n")
        try:
            prompt = chat_prompts(host.tok, [[m.as_dict() for m in req.messages]])[0]
        except Exception as e:  # the chat template rejects the conversation (e.g. roles out of order)
            raise ApiError(400, f"messages: the model's chat template rejected them: {e}", param="messages") from None
        n_prompt = count_tokens(host.tok, prompt)
        params = req.gen_params(budget(req, n_prompt, req.max_completion_tokens or req.max_tokens))
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        await admit(req.model)
        if req.stream:
            head = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": req.model}

            def chunk(piece):
                delta = {"role": "assistant", "content": ""} if piece is None else {"content": piece}
                return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}

            def final(reason):
                return {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}

            try:
                return await run_stream(req.model, prompt, params, chunk, final,
                                        bool((req.stream_options or {}).get("include_usage")))
            except BaseException:
                sched.release()
                raise
        outs = await run_batch(req.model, [prompt] * req.n, params)
        return {"id": cid, "object": "chat.completion", "created": now, "model": req.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason} for i, c in enumerate(outs)],
                "usage": usage(outs[0].prompt_tokens, sum(c.completion_tokens for c in outs))}

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(req: CompletionRequest):
        check_model(req.model)
        if req.logprobs is not None or req.suffix is not None:
            raise ApiError(400, "logprobs and suffix are not supported", param="logprobs" if req.logprobs else "suffix")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if req.stream and (req.n > 1 or len(prompts) > 1):
            raise ApiError(400, "stream=true takes one prompt and n=1", param="prompt")
        n_prompt = max(count_tokens(host.tok, p) for p in prompts)
        params = req.gen_params(budget(req, n_prompt, req.max_tokens))
        cid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        await admit(req.model)
        if req.stream:
            head = {"id": cid, "object": "text_completion", "created": now, "model": req.model}

            def chunk(piece):
                if piece is None:  # the opening chunk: the echoed prompt, if asked
                    return {**head, "choices": [{"index": 0, "text": prompts[0], "finish_reason": None}]} \
                        if req.echo else None
                return {**head, "choices": [{"index": 0, "text": piece, "finish_reason": None}]}

            def final(reason):
                return {**head, "choices": [{"index": 0, "text": "", "finish_reason": reason}]}

            try:
                return await run_stream(req.model, prompts[0], params, chunk, final,
                                        bool((req.stream_options or {}).get("include_usage")))
            except BaseException:
                sched.release()
                raise
        outs = await run_batch(req.model, [p for p in prompts for _ in range(req.n)], params)
        choices = [{"index": i, "text": (prompts[i // req.n] if req.echo else "") + c.text, "logprobs": None,
                    "finish_reason": c.finish_reason} for i, c in enumerate(outs)]
        return {"id": cid, "object": "text_completion", "created": now, "model": req.model, "choices": choices,
                "usage": usage(sum(c.prompt_tokens for c in outs[::req.n]), sum(c.completion_tokens for c in outs))}

    app.state.scheduler = sched
    app.state.host = host
    return app


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "tunelab"}


def main(args) -> int:
    try:
        import fastapi  # noqa: F401  (checked here for a one-line hint instead of a traceback)
        import uvicorn
    except ImportError:
        raise UserError("tunelab serve needs the serve extra: pip install 'tunelab[serve]'") from None

    from tunelab.inference.host import Host

    api_key = args.api_key or os.environ.get("TUNELAB_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this port can use it",
              file=sys.stderr)
    if args.max_tokens < 1:
        raise UserError("--max-tokens must be >= 1")
    host = Host.load(args.model, adapters=args.adapter, runs=args.run, dtype=args.dtype,
                     load_in_4bit=args.load_in_4bit, served_name=args.served_model_name)
    app = create_app(host, api_key=api_key, max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                     max_tokens=args.max_tokens)
    print(f"serving {', '.join(host.names)} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
