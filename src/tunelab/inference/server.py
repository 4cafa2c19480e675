"""`tunelab serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over one base model and its adapters.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both stream as server-sent events ending
in `data: [DONE]`), GET /health. The request's `model` picks the base or one of its adapters. Errors use OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}`, so OpenAI clients report them properly: 400 for a malformed
request (FastAPI's own answer would be 422), 401 for a missing or wrong key, 404 for an unknown model, 413 for a body
over --max-body-bytes, 429 when busy. /openapi.json documents exactly these.

Load is bounded: at most --max-concurrency generations run, at most --max-queue requests wait, and anything beyond
is answered 429 at once rather than piling up until clients time out. Work per request is bounded too: a body of at
most --max-body-bytes, at most --max-choices completions (prompts x n), each at most --max-tokens long. A request
whose client disconnects leaves the queue, and its generation stops at the next token.
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
import threading
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

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


class ClientGone(Exception):
    """The client disconnected before its answer was ready: nobody reads what the server would send."""


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """What every error answer carries (OpenAI's shape); documented in the schema for each status it is sent with."""
    error: ErrorBody


# --- request bodies (the subset of OpenAI's fields that a local model can honour; unknown fields are ignored, known
# ones this server cannot honour are refused) ---

def _unicode(s: str) -> str:
    # JSON may carry a lone UTF-16 surrogate ("\ud800"); Python keeps it in the str, but it is not text: the
    # tokenizer and the UTF-8 encoder of every answer fail on it. Refuse it here, where the error can name the field.
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("invalid Unicode: a lone surrogate escape such as \\ud800 (send valid UTF-16 pairs)") from None
    return s


def _integral(v):
    # JSON has one number type: 2.0 is an integer to JSON Schema (and to OpenAI), but not to strict pydantic.
    return int(v) if isinstance(v, float) and v.is_integer() else v


Text = Annotated[str, AfterValidator(_unicode)]
NonEmptyText = Annotated[str, Field(min_length=1), AfterValidator(_unicode)]
# Bounds come before the validator: after it, pydantic writes them into the JSON schema as "ge"/"le", which JSON
# Schema does not know, so the published schema would not bound them.
TokenCount = Annotated[int, Field(ge=1), BeforeValidator(_integral)]
# JSON's interoperable integers (RFC 7493: beyond 2^53 a JSON number loses digits in many parsers); well inside
# torch.manual_seed's range, outside which generation would fail.
Seed = Annotated[int, Field(ge=-(2**53 - 1), le=2**53 - 1), BeforeValidator(_integral)]
# A token id; its upper bound is the served model's vocabulary, checked in create_app (check_tokens).
TokenId = Annotated[int, Field(ge=0), BeforeValidator(_integral)]
# JSON object keys are strings: logit_bias names tokens by their ids in decimal. Nine digits is beyond any vocabulary;
# additionalProperties makes the schema say that other keys are refused.
LogitBias = Annotated[dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100, le=100)]],
                      Field(json_schema_extra={"additionalProperties": False})]


def _unsupported(v):
    if v is not None:
        raise ValueError("not supported by this server (send null or leave it out)")
    return v


# A field OpenAI defines that this server cannot honour: null only, so the schema says what the server accepts.
Unsupported = Annotated[None, BeforeValidator(_unsupported)]


def _same(v, a) -> bool:
    # By type as well as value: False == 0 in Python, but not in JSON; 0.0 is JSON's 0 (one number type).
    return v == a and (type(v) is type(a) or {type(v), type(a)} <= {int, float})


def _only(*allowed):
    """A validator that lets through null and the `allowed` values of a field whose other values this server cannot
    honour (they change what the answer must contain: log probabilities, JSON, tool calls; or how it is sampled),
    and refuses the rest with a message naming what it accepts; the field's type puts the same values in the
    schema."""
    def check(v):
        if v is None:
            return v
        for a in allowed:
            if _same(v, a):
                return a
        raise ValueError(f"not supported by this server (send {' or '.join(map(json.dumps, allowed))}, null "
                         "or leave it out)")
    return BeforeValidator(check)


def _default(value):
    """Explicit null means the field's default, as OpenAI reads it (clients that serialize every field send it)."""
    return AfterValidator(lambda v: value if v is None else v)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: Annotated[bool | None, _default(False)] = False


class _Request(BaseModel):
    # strict: a JSON string is not a number or a boolean ("stream": "false" is an error, as with OpenAI), so the
    # server accepts exactly what its published schema allows.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: Text
    max_tokens: TokenCount | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    # No upper bound of its own: the server's --max-choices bounds prompts x n (check_choices in create_app).
    n: Annotated[Annotated[int, Field(ge=1), BeforeValidator(_integral)] | None,
                 Field(description="completions per prompt; 1 with stream=true, and at most the server's "
                                   "--max-choices (default 16) completions per request in all (prompts x n)"),
                 _default(1)] = 1
    stream: Annotated[bool | None, _default(False)] = False
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None
    # transformers' generate samples from torch's process-wide RNG (it takes no per-call torch.Generator): a seed
    # reproduces an answer only while no other generation samples beside it.
    seed: Annotated[Seed | None, Field(description="reproducible sampling when the server runs one generation at a "
                                                   "time (--max-concurrency 1, the default)")] = None
    stream_options: StreamOptions | None = None
    # Added to the logits before sampling, as OpenAI does (transformers' sequence_bias); keys are ids of this
    # model's tokenizer, as with vLLM (create_app checks them against its vocabulary).
    logit_bias: Annotated[LogitBias | None, Field(description="token id (of this model's tokenizer) -> bias added "
                                                              "to its logit, -100 to 100")] = None
    # OpenAI's penalties count a token's earlier occurrences in the reply; transformers' repetition penalty scales
    # logits instead, so it would be a different setting under OpenAI's name: only "no penalty" is accepted.
    presence_penalty: Annotated[Literal[0] | None, _only(0)] = None
    frequency_penalty: Annotated[Literal[0] | None, _only(0)] = None
    # best_of > 1 ranks candidates by log probability, which this server does not compute.
    best_of: Annotated[Literal[1] | None, _only(1)] = None

    def gen_params(self, max_new_tokens: int) -> GenParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        # OpenAI's default temperature is 1 (sampling); temperature 0 means greedy here.
        temperature = 1.0 if self.temperature is None else self.temperature
        return GenParams(max_new_tokens=max_new_tokens, temperature=temperature,
                         top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed, stop=stop,
                         logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()})


class _TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[_TextPart] | None = None

    def as_dict(self) -> dict:
        # Text parts are joined with newlines, as vLLM does: joined with nothing, "Hello" and "world" fuse.
        content = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content or [])
        # "developer" is OpenAI's newer name for the system role; chat templates know "system".
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class _TextFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Annotated[Literal["text"], _only("text")]


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: TokenCount | None = None
    # Fields that would change what the answer holds are refused unless they ask for nothing beyond plain text:
    # ignored, a client asking for log probabilities, JSON or tool calls would get an answer without them.
    logprobs: Annotated[Literal[False] | None, _only(False)] = None
    top_logprobs: Annotated[Literal[0] | None, _only(0)] = None
    response_format: _TextFormat | None = None
    tools: Annotated[list[dict] | None, Field(max_length=0), _only([])] = None
    tool_choice: Annotated[Literal["none"] | None, _only("none")] = None
    functions: Annotated[list[dict] | None, Field(max_length=0), _only([])] = None
    function_call: Annotated[Literal["none"] | None, _only("none")] = None


TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class CompletionRequest(_Request):
    # Every prompt needs at least one token to continue from: an empty one has nothing for the model to attend to.
    # Token ids are what OpenAI's API and vLLM also accept (lm-eval's local-completions sends them): fed as given.
    prompt: (NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1)] | TokenIds
             | Annotated[list[TokenIds], Field(min_length=1)]) = Field(
        description="a prompt, a list of them, or token ids: a list of ids (one prompt) or a list of such lists; "
                    "stream=true takes one prompt")
    echo: Annotated[bool | None, _default(False)] = False
    logprobs: Unsupported = None
    suffix: Unsupported = None

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts, each text or token ids."""
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)


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

def _validation_error(exc) -> ApiError:
    """One 400 from FastAPI's RequestValidationError: the most telling of pydantic's errors, at a clean location.

    A value that fits no member of a union (`prompt: str | list[str]`) gets one error per member, each located under
    the member's label ('str', 'list[...]', 'function-after[...]'), which is no field of the request. The label is
    dropped by following the location through the request body, and the error that got deepest into the value, or
    failing that one that is not a plain type mismatch, then the one furthest along a list, is the one reported
    ("prompt.0: String should have at least 1 character" rather than "Input should be a valid string"; for [1, "a"],
    "prompt.1: Input should be a valid integer").
    """
    errors = exc.errors()
    if not errors:
        return ApiError(400, "invalid request")
    if errors[0].get("type") == "json_invalid":
        return ApiError(400, f"body is not valid JSON: {errors[0].get('ctx', {}).get('error', errors[0]['msg'])}")

    def path(err) -> list[str]:
        loc, node, out = err.get("loc", ()), exc.body, []
        for i, key in enumerate(loc[1:] if loc[:1] == ("body",) else loc):
            if isinstance(node, dict) and key in node:
                node = node[key]
            elif isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
                node = node[key]
            elif not (err["type"] == "missing" and i == len(loc) - 2):  # a missing field is named, though absent
                continue
            out.append(str(key))
        return out

    err = min(errors, key=lambda e: (-len(path(e)), e["type"].endswith("_type"),
                                     [-int(k) if k.isdigit() else 0 for k in path(e)]))
    where = ".".join(path(err))
    msg = err["msg"].removeprefix("Value error, ")
    return ApiError(400, f"{where}: {msg}" if where else msg, param=where or None)


class BodyLimit:
    """ASGI middleware: 413 for a request body over `max_bytes`, decided before the body is parsed or tokenized:
    at once from Content-Length, else as soon as the bytes received pass the limit.

    Written by hand because Starlette's own limit (FastAPI's `max_body_size`) answers a too-large Content-Length with
    a plain-text 413 that replaces the app's answer, and OpenAI clients read errors from the JSON error shape.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _error(self) -> ApiError:
        return ApiError(413, f"Request body too large: this server accepts at most {self.max_bytes} bytes "
                             "(--max-body-bytes)")

    async def __call__(self, scope, receive, send):
        from fastapi.responses import JSONResponse
        from starlette.datastructures import Headers
        from starlette.exceptions import HTTPException

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            err = self._error()
            return await JSONResponse(err.body(), status_code=413)(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised into the app's body read: FastAPI passes an HTTPException on (anything else would
                    # become its 400 "error parsing the body") and the app's handler answers it in the error shape.
                    raise HTTPException(413, self._error().message)
            return message

        await self.app(scope, limited, send)


# Server defaults, also the CLI's (documented in the README's serve section).
MAX_BODY_BYTES = 4 * 1024 * 1024  # ample for a full context of text (even JSON-escaped), small enough to parse at once
MAX_CHOICES = 16  # completions per request (prompts x n): one batch of the engine's generate
DISCONNECT_POLL_S = 0.25  # how often a queued or generating request checks that its client is still there

_ERRORS = {
    400: "Malformed request, or one the server cannot honour (a limit, the model's context length)",
    401: "Missing or wrong API key (only when the server was started with one)",
    404: "No such model",
    413: "Request body over the server's --max-body-bytes",
    429: "Busy: every generation slot and queue place is taken; retry after Retry-After seconds",
    # FastAPI documents a 422 for every route with parameters unless a 4XX (or 422) response is declared; this
    # server answers 400 instead, so declaring 4XX both drops the false 422 and says every other 4xx (e.g. 405) has
    # the same error shape.
    "4XX": "Any other client error, in the same shape",
}


def _responses(*codes) -> dict:
    out = {code: {"model": ErrorResponse, "description": _ERRORS[code]} for code in (*codes, "4XX")}
    if 429 in out:
        out[429]["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
    return out


# The generation endpoints answer JSON, or server-sent events when the request says "stream": true.
_GENERATION_RESPONSES = {
    200: {"description": "The completion (JSON), or with stream=true its chunks as server-sent events ending in "
                         "`data: [DONE]`",
          # Each event: its `data` is one JSON chunk, or [DONE] last.
          "content": {"text/event-stream": {"schema": {"type": "object", "required": ["data"],
                                                       "properties": {"data": {"type": "string"}}}}}},
    **_responses(400, 401, 404, 413, 429),
}


def _check_limits(max_tokens: int, max_body_bytes: int, max_choices: int) -> None:
    for flag, value in (("--max-tokens", max_tokens), ("--max-body-bytes", max_body_bytes),
                        ("--max-choices", max_choices)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")


def create_app(host, api_key: str | None = None, max_concurrency: int = 1, max_queue: int = 16,
               max_tokens: int = 512, max_body_bytes: int = MAX_BODY_BYTES, max_choices: int = MAX_CHOICES):
    """The FastAPI app serving `host` (a tunelab.inference.host.Host).

    `max_tokens` is the default and largest max_tokens of a request (larger asks are capped); `max_body_bytes` the
    largest request body (413 beyond); `max_choices` the most completions one request may ask for, prompts x n (400
    beyond). Together they bound the work one request can take.
    """
    import anyio
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from tunelab.inference.engine import TextStream, chat_prompts, complete, count_tokens

    _check_limits(max_tokens, max_body_bytes, max_choices)
    app = FastAPI(title="tunelab", version="1")
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    sched = Scheduler(host, max_concurrency, max_queue)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ClientGone)
    async def _client_gone(request, exc: ClientGone):
        # Nobody reads this answer; 499 ("client closed request", nginx's code) is what the access log then shows.
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return JSONResponse(_validation_error(exc).body(), status_code=400)

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

    def check_choices(prompts: int, n: int) -> None:
        if prompts * n > max_choices:
            raise ApiError(400, f"{prompts} prompt(s) x n={n} asks for {prompts * n} completions; this server "
                                f"generates at most {max_choices} per request (--max-choices)",
                           param="n" if prompts == 1 else "prompt")

    def check_tokens(ids, param: str) -> None:
        """Token ids (of a token prompt, or logit_bias keys) must be in the model's vocabulary."""
        vocab = len(host.tok)
        bad = next((int(t) for t in ids if int(t) >= vocab), None)
        if bad is not None:
            raise ApiError(400, f"{param}: token id {bad} is not in the model's vocabulary (ids 0-{vocab - 1})",
                           param=param)

    def budget(prompt_tokens: int, requested: int | None, param: str) -> int:
        """max_tokens for a request: what it asked (or the server default), capped by the server and the context."""
        room = host.context_length - prompt_tokens
        if room < 1:
            raise ApiError(400, f"This model's maximum context length is {host.context_length} tokens, but the "
                                f"prompt has {prompt_tokens} tokens", param=param, code="context_length_exceeded")
        return max(1, min(requested or max_tokens, max_tokens, room))

    async def admit(name: str) -> None:
        try:
            await sched.acquire(name)
        except QueueFull:
            raise ApiError(429, f"Server busy: {sched.active} running and {sched.waiting} queued; retry shortly",
                           type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None

    async def while_connected(request: Request, work, cancel: threading.Event | None = None):
        """Await the coroutine `work` while the client stays connected; if it leaves first, cancel `work` and raise
        ClientGone, so an abandoned request neither keeps its queue place nor goes on generating.

        Written by hand because Starlette watches for a disconnect only while a StreamingResponse is being sent;
        before a response starts, Request.is_disconnected is the way to ask, so it is polled here.
        """
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected() and not task.done():
                    raise ClientGone
        finally:
            if not task.done():
                if cancel is not None:
                    cancel.set()  # a running generation stops at its next token
                task.cancel()  # a request waiting in the queue leaves it
                with anyio.CancelScope(shield=True):  # return only once the slot is free again
                    await asyncio.wait({task})
                if not task.cancelled():
                    task.exception()  # retrieved: an abandoned request's outcome is of no interest

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

    async def stream(request: Request, name: str, prompt: str | list[int], params: GenParams, chunk, final,
                     include_usage: bool, raw: bool = False):
        """Queue (leaving the queue if the client does), then answer with the generation as server-sent events.
        `raw`: the prompt is plain text, not chat-templated (tokenized with the tokenizer's special tokens), or
        token ids."""
        await while_connected(request, admit(name))
        try:
            gen = TextStream(host.model, host.tokenizer(name), prompt, params, add_special_tokens=raw)
        except BaseException:
            sched.release()
            raise

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

    async def batch(request: Request, name: str, prompts: list[str | list[int]], params: GenParams,
                    raw: bool = False):
        """Queue, generate and return the completions; abandoned as soon as the client disconnects. `raw`: as in
        `stream`."""
        cancel = threading.Event()

        async def work():
            await admit(name)
            try:
                return await run_in_threadpool(complete, host.model, host.tokenizer(name), prompts, params,
                                               cancel=cancel, add_special_tokens=raw)
            finally:
                sched.release()  # after the generation thread has returned: the model is free

        return await while_connected(request, work(), cancel)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": host.names, "running": sched.active, "queued": sched.waiting,
                "max_concurrency": sched.max_active, "max_queue": sched.max_queue}

    @app.get("/v1/models", dependencies=[Depends(auth)], responses=_responses(401))
    async def models():
        return {"object": "list", "data": [_model_card(n, created) for n in host.names]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(auth)], responses=_responses(401, 404))
    async def model(name: str):
        check_model(name)
        return _model_card(name, created)

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)], responses=_GENERATION_RESPONSES)
    async def chat_completions(req: ChatRequest, request: Request):
        check_model(req.model)
        if req.stream and req.n > 1:
            raise ApiError(400, "n > 1 is not supported with stream=true", param="n")
        check_choices(1, req.n)
        check_tokens(req.logit_bias or {}, "logit_bias")

        tok = host.tokenizer(req.model)  # the route's own chat template and end-of-turn token

        def render() -> tuple[str, int]:
            try:
                prompt = chat_prompts(tok, [[m.as_dict() for m in req.messages]])[0]
            except Exception as e:  # the chat template rejects the conversation (e.g. roles out of order)
                raise ApiError(400, f"messages: the model's chat template rejected them: {e}",
                               param="messages") from None
            return prompt, count_tokens(tok, prompt)

        # Templating and tokenizing take time in proportion to the body: on a worker thread, so that the event loop
        # keeps serving everyone else (/health included) meanwhile.
        prompt, n_prompt = await run_in_threadpool(render)
        params = req.gen_params(budget(n_prompt, req.max_completion_tokens or req.max_tokens, "messages"))
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            head = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": req.model}

            def chunk(piece):
                delta = {"role": "assistant", "content": ""} if piece is None else {"content": piece}
                return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}

            def final(reason):
                return {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}

            return await stream(request, req.model, prompt, params, chunk, final,
                                bool(req.stream_options and req.stream_options.include_usage))
        outs = await batch(request, req.model, [prompt] * req.n, params)
        return {"id": cid, "object": "chat.completion", "created": now, "model": req.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason} for i, c in enumerate(outs)],
                "usage": usage(outs[0].prompt_tokens, sum(c.completion_tokens for c in outs))}

    @app.post("/v1/completions", dependencies=[Depends(auth)], responses=_GENERATION_RESPONSES)
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        prompts = req.prompts()
        if req.stream and (req.n > 1 or len(prompts) > 1):
            raise ApiError(400, "stream=true takes one prompt and n=1", param="prompt")
        check_choices(len(prompts), req.n)
        check_tokens((t for p in prompts if not isinstance(p, str) for t in p), "prompt")
        check_tokens(req.logit_bias or {}, "logit_bias")
        tok = host.tokenizer(req.model)
        # echo gives a token prompt back as its text, as vLLM does
        echoed = [p if isinstance(p, str) else tok.decode(p) for p in prompts] if req.echo else None
        # On a worker thread, as in chat_completions. A raw prompt is tokenized with the tokenizer's special tokens
        # (BOS first, for models that have one), as vLLM does and as text is tokenized for training: without its BOS
        # such a model continues a prompt unlike anything it was trained on. Token ids are fed as given.
        counts = await run_in_threadpool(lambda: [count_tokens(tok, p, add_special_tokens=True) for p in prompts])
        # A prompt of only characters the tokenizer drops (e.g. "\x06") has nothing to continue from; as OpenAI does
        # for an empty prompt, the model then starts as at the beginning of a document (its BOS/EOS token).
        start = tok.bos_token or tok.eos_token
        if min(counts) == 0 and not start:
            raise ApiError(400, "prompt: a prompt must have at least one token to continue from", param="prompt")
        inputs = [p if c else start for p, c in zip(prompts, counts)]
        params = req.gen_params(budget(max(counts), req.max_tokens, "prompt"))
        cid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            head = {"id": cid, "object": "text_completion", "created": now, "model": req.model}

            def chunk(piece):
                if piece is None:  # the opening chunk: the echoed prompt, if asked
                    return {**head, "choices": [{"index": 0, "text": echoed[0], "finish_reason": None}]} \
                        if req.echo else None
                return {**head, "choices": [{"index": 0, "text": piece, "finish_reason": None}]}

            def final(reason):
                return {**head, "choices": [{"index": 0, "text": "", "finish_reason": reason}]}

            return await stream(request, req.model, inputs[0], params, chunk, final,
                                bool(req.stream_options and req.stream_options.include_usage), raw=True)
        outs = await batch(request, req.model, [p for p in inputs for _ in range(req.n)], params, raw=True)
        choices = [{"index": i, "text": (echoed[i // req.n] if req.echo else "") + c.text, "logprobs": None,
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
    from tunelab.inference.listen import bind

    _check_limits(args.max_tokens, args.max_body_bytes, args.max_choices)  # before the slow model load
    # Bound before the model loads, and handed to uvicorn: a port in use or a bad address is one line at once, and
    # nothing can take the port while the model loads.
    sock = bind(args.host, args.port)
    api_key = args.api_key or os.environ.get("TUNELAB_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this port can use it",
              file=sys.stderr)
    with sock:
        host = Host.load(args.model, adapters=args.adapter, runs=args.run, dtype=args.dtype,
                         load_in_4bit=args.load_in_4bit, served_name=args.served_model_name)
        app = create_app(host, api_key=api_key, max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                         max_tokens=args.max_tokens, max_body_bytes=args.max_body_bytes, max_choices=args.max_choices)
        print(f"serving {', '.join(host.names)} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down cleanly and re-raised it (as uvicorn.run, exit 0)
            pass
    # as uvicorn.run: 3 when the server did not start (e.g. the app failed at start-up)
    return 0 if server.started else 3
