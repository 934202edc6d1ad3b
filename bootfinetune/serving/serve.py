"""OpenAI-compatible HTTP endpoints on 127.0.0.1: the shared server, and a finetuned model behind it.

`ChatServer` is the HTTP part, a FastAPI app run by uvicorn on a background thread (its own
event loop): `POST /v1/chat/completions`, `GET /v1/models`, `GET /v1/stats` and `GET /health`.
What answers is one method, `complete(request) -> list[Completion]` (run on the server's thread
pool), or `choices` where a server awaits its answers itself; `ModelServer` answers with a
Hugging Face model (through `FinetunedEngine`, so concurrent requests share batched `generate`
calls), and `teacher_server.TeacherServer` with a script.

    server = serve_model("runs/Provider-1a2b/models/all")      # once per directory and process
    lm = dspy.LM("openai/bootfinetune:runs/...", api_base=server.url, api_key="local")

Who may call it (`auth`): with an `api_key`, every route but `/health` answers 401 to a request without
`Authorization: Bearer <key>`; a server on a host other than loopback does not start without a key unless
told `insecure=True`.

What one request cannot do (see `limits`): send a body over `max_body_bytes` (413, refused
while reading), take over `read_timeout` to send its headers and body (one deadline for both, from its
first byte: 408, or the connection closed while the headers are not in), ask for more than `MAX_N`
answers (400), nest its JSON deeper than `MAX_JSON_DEPTH` (400), wait in a full queue (503 with
Retry-After at once, `max_queue`), or hold the model past its deadline (504, generation stopped). A
model name that is not one of the server's ids gets a 404 (names are compared as strings, never looked up
on disk); `/v1/models` lists ids, never filesystem paths. A request that cannot be answered as sent gets
a 4xx naming the field and one log line; a failure while answering a 500 with a short message (the
details go to the log). A subclass answers other failures its own way through `failure_response`
(`bootfinetune.testing.faults` injects faults so).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from bootfinetune.common.targets import model_path
from bootfinetune.config import InferenceConfig
from bootfinetune.serving.auth import OPEN_PATHS, KeyCheck, check_exposure, unauthorized
from bootfinetune.serving.batching import QueueFull
from bootfinetune.serving.limits import DEADLINE_S, MAX_BODY_BYTES, QUEUED_BATCHES, READ_TIMEOUT_S, Cancelled, Control
from bootfinetune.serving.lm import FinetunedEngine, unload_model
from bootfinetune.serving.openai_api import (DEADLINE_KEY, BadRequest, Completion, HTTPProblem, await_answers,
                                             check_chat_request, completion_body, error_response, pick_model,
                                             read_json, requested_tokens)

__all__ = ["BadRequest", "ChatServer", "Completion", "ModelServer", "check_chat_request", "completion_body",
           "serve_model", "served_model", "stop_model"]

log = logging.getLogger(__name__)


class _Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with one deadline per request for its headers and body together.

    The clock starts at the request's first byte (a new connection's: when it opens) and runs `read_timeout`
    seconds: a request whose headers are not in by then has its connection closed here; one whose headers are
    in gets what is left in its scope (`openai_api.DEADLINE_KEY`) for `read_json` to read the body by. uvicorn
    itself times out only idle kept-alive connections, and a body per chunk.
    """

    read_timeout = READ_TIMEOUT_S
    _deadline: float | None = None
    _timer: Any = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._start_clock()

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._start_clock()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle and self._deadline is not None:  # its headers are in: the body has the rest
            self.cycle.scope[DEADLINE_KEY] = self._deadline
            self._deadline = None
            self._timer.cancel()

    def _start_clock(self) -> None:
        self._deadline = self.loop.time() + self.read_timeout
        self._timer = self.loop.call_at(self._deadline, self._headers_late)

    def _headers_late(self) -> None:
        if self._deadline is not None and not self.transport.is_closing():
            self._deadline = None
            log.info("a request's headers did not arrive within %gs: connection from %s closed", self.read_timeout,
                     self.client[0] if self.client else "?")
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        super().connection_lost(exc)


class ChatServer:
    """An OpenAI-compatible chat endpoint on a background thread; `complete` decides the answers.

    Args:
        host: Address to bind; 127.0.0.1 unless you mean to expose it.
        port: 0 picks a free port.
        model_name: The model id `/v1/models` lists and responses carry.
        max_body_bytes: Largest request body read; a larger one gets a 413.
        read_timeout: Seconds a client may take to send a request, its headers and body together (one
            deadline from the request's first byte); kept-alive connections idle that long are closed.
        limit_concurrency: Most connections and requests at once; more get a 503.
        backlog: Connections the OS queues before the server accepts them.
        threads: Most `complete` calls running at once (more wait for a thread).
        api_key: The key every request but `/health` must send as `Authorization: Bearer <key>` (401
            otherwise); only its digest is kept. None: no key.
        insecure: Serve on a host other than loopback without a key (refused otherwise, before binding).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, model_name: str = "model", *,
                 max_body_bytes: int = MAX_BODY_BYTES, read_timeout: float = READ_TIMEOUT_S,
                 limit_concurrency: int = 1024, backlog: int = 2048, threads: int = 128,
                 api_key: str | None = None, insecure: bool = False):
        check_exposure(host, api_key, insecure)
        self.key_check = KeyCheck.of(api_key)
        self.model_name = model_name
        self.max_body_bytes = max_body_bytes
        self.read_timeout = read_timeout
        self.calls = 0
        """Chat requests accepted (a 4xx before answering does not count; a 500 does)."""
        self.requests: deque[list[dict]] = deque(maxlen=64)
        """The messages of the latest accepted requests, newest last (for tests and debugging)."""
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._socket = socket.create_server((host, port), reuse_port=False)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=type(self).__name__)
        protocol = type("_Protocol", (_Protocol,), {"read_timeout": read_timeout})
        self._config = uvicorn.Config(self._asgi, http=protocol, interface="asgi3", lifespan="off", log_level="warning",
                                      access_log=False, backlog=backlog, limit_concurrency=limit_concurrency,
                                      timeout_keep_alive=max(1, round(read_timeout)),
                                      timeout_graceful_shutdown=1)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._app = self.app()

    async def _asgi(self, scope, receive, send) -> None:
        scope["bootfinetune.send"] = send  # uvicorn's own, for `drop_connection`
        if self.key_check is not None and scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            headers = dict(scope.get("headers") or [])
            if not self.key_check.allows(headers.get(b"authorization", b"").decode("latin-1")):
                log.info("refused a request to %s from %s: 401 (no valid API key)", scope["path"][:100],
                         (scope.get("client") or ("?",))[0])
                await unauthorized()(scope, receive, send)
                return
        await self._app(scope, receive, send)

    # -- what a subclass decides ------------------------------------------------------------------
    def complete(self, request: dict[str, Any]) -> list[Completion]:
        """The `n` answers to a checked request. Raise `BadRequest` for a 400; anything else is a 500."""
        raise NotImplementedError

    async def choices(self, request: dict[str, Any], http: Request) -> list[Completion]:
        """The answers, awaited on the server's loop: by default `complete` on the thread pool."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.complete, request)

    def model_names(self) -> dict[str, str] | None:
        """Every model name a request may give -> the model id it names; None: any name is answered
        (a stand-in such as the scripted teacher), as `model_name`."""
        return {self.model_name: self.model_name}

    def pick(self, requested: str | None) -> str:
        """The model id a request's `model` names; raises `HTTPProblem` 404 for a name not served here."""
        names = self.model_names()
        return pick_model(requested, names) if names is not None else self.model_name

    async def failure_response(self, exc: Exception, http: Request) -> Response:
        """The answer to a request whose `choices` raised: a 400 for `BadRequest`, else a 500 that
        names no internals (the error goes to the log)."""
        if isinstance(exc, BadRequest):
            return error_response(400, str(exc), "invalid_request_error")
        log.error("answering a chat request failed", exc_info=exc)
        return error_response(500, "the server failed to answer this request; see the server's log.",
                              "server_error")

    def stats(self) -> dict[str, Any]:
        return {"calls": self.calls}

    async def drop_connection(self, http: Request) -> None:
        """Closes the request's connection at once, with no answer (how a crashed upstream looks)."""
        transport = getattr(getattr(http.scope.get("bootfinetune.send"), "__self__", None), "transport", None)
        if transport is not None:
            transport.abort()
            await asyncio.sleep(0.01)  # let uvicorn see the connection lost before the app returns

    # -- HTTP ------------------------------------------------------------------------------------
    def app(self) -> FastAPI:
        """The ASGI app: routes, JSON errors for unknown routes and methods, no tracebacks."""
        api = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

        @api.exception_handler(StarletteHTTPException)
        async def http_error(http: Request, exc: StarletteHTTPException):
            return error_response(exc.status_code, "no such route; POST /v1/chat/completions, GET /v1/models.",
                                  "not_found" if exc.status_code == 404 else "invalid_request_error")

        @api.exception_handler(RequestValidationError)
        async def invalid(http: Request, exc: RequestValidationError):
            return error_response(400, "the request is not valid here.", "invalid_request_error")

        @api.exception_handler(Exception)
        async def failed(http: Request, exc: Exception):
            log.error("serving %s failed", http.url.path, exc_info=exc)
            return error_response(500, "the server failed; see its log.", "server_error")

        async def models():
            ids = sorted(set((self.model_names() or {self.model_name: self.model_name}).values()))
            return {"object": "list", "data": [{"id": i, "object": "model", "owned_by": "bootfinetune"}
                                               for i in ids]}

        async def stats():
            return self.stats()

        async def health():
            return {"status": "ok"}

        for prefix in ("/v1", ""):
            api.add_api_route(f"{prefix}/models", models, methods=["GET"])
            api.add_api_route(f"{prefix}/stats", stats, methods=["GET"])
            api.add_api_route(f"{prefix}/health", health, methods=["GET"])
            api.add_api_route(f"{prefix}/chat/completions", self._chat, methods=["POST"])
        return api

    async def _chat(self, http: Request) -> Response:
        try:
            request = check_chat_request(await read_json(http, self.max_body_bytes, self.read_timeout))
            model = self.pick(request.get("model"))
        except HTTPProblem as problem:
            return _refused(http, problem)
        except BadRequest as exc:
            return _refused(http, HTTPProblem(400, str(exc)))
        with self._lock:
            self.calls += 1
            self.requests.append(request["messages"])
        try:
            choices = await self.choices({**request, "model": model}, http)
        except HTTPProblem as problem:
            return _refused(http, problem)
        except Cancelled:  # nobody is left to read an answer
            return Response(status_code=499)
        except Exception as exc:
            return await self.failure_response(exc, http)
        return JSONResponse(completion_body(model, choices, f"chatcmpl-{next(self._ids)}"))

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the server listens on."""
        return self._socket.getsockname()[:2]

    @property
    def url(self) -> str:
        """The OpenAI base URL (`.../v1`), as `dspy.LM(api_base=...)` takes it."""
        host, port = self.address
        return f"http://{host}:{port}/v1"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Self:
        self._server = uvicorn.Server(self._config)  # off the main thread it installs no signal handlers
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name=type(self).__name__, daemon=True)
        self._thread.start()
        while not self._server.started and self._thread.is_alive():
            threading.Event().wait(0.01)
        if not self._server.started:
            raise RuntimeError(f"the {type(self).__name__} on {self.url} did not start; see the log above.")
        return self

    def stop(self) -> None:
        if self.running:
            self._server.should_exit = True
            self._thread.join(10)
        self._socket.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _refused(http: Request, problem: HTTPProblem) -> Response:
    """The answer to a request refused as sent (4xx) or for now (503, 504), after one log line saying why."""
    log.info("chat request from %s: %d %s", (http.client.host if http.client else "?"), problem.status,
             problem.message[:200])
    return problem.response()


def public_id(model: str | Path) -> str:
    """The id a model directory is listed under: no filesystem path (`{run}/{key}` for a run's export).

    >>> public_id("/data/runs/TwoStep-1a2b/models/all"), public_id("/models/tiny-llama"), public_id("org/m")
    ('TwoStep-1a2b/all', 'tiny-llama', 'org/m')
    """
    path = Path(model)
    if path.parent.name == "models":
        return f"{path.parent.parent.name}/{path.name}"
    return path.name if path.is_absolute() or path.is_dir() else str(model)


class ModelServer(ChatServer):
    """A Hugging Face model directory (a finetuned export or a base model) behind `/v1/chat/completions`.

    Prompts are rendered as in training (`FinetunedEngine`); concurrent requests are batched,
    those with very different `max_tokens` apart. Requests may set `max_tokens` (or
    `max_completion_tokens`: clamped to the ceiling), `temperature` (0 = greedy) and `n`
    (at most `limits.MAX_N`); usage counts are the tokenizer's. The model answers to its id
    (`public_id`) and to the names DSPy gives it (`openai/bootfinetune:{dir}` sends `bootfinetune:{dir}`).

    Args:
        model_dir: The model directory (or a hub id the machine can load).
        host: Address to bind; 127.0.0.1 unless you mean to expose it.
        port: 0 picks a free port.
        device: "cpu", "cuda", "cuda:1"...; None picks CUDA when present.
        max_tokens: New tokens per answer when a request does not say (at most the ceiling).
        max_tokens_ceiling: Most new tokens an answer may have; None derives it from training
            (see `limits.token_ceiling`).
        batch_size: Most prompts per `generate` call.
        trust_remote_code: Allow the model repository's own code to run.
        request_timeout: Seconds a request may take, queueing included, before its 504.
        max_queue: Most answers waiting for a batch; a request that would pass it gets a 503 with Retry-After
            at once. None: `QUEUED_BATCHES` batches' worth.
        **options: `ChatServer` options (max_body_bytes, read_timeout, limit_concurrency, backlog, api_key, insecure).
    """

    def __init__(self, model_dir: str | Path, host: str = "127.0.0.1", port: int = 0, device: str | None = None,
                 max_tokens: int = InferenceConfig.max_tokens, batch_size: int = InferenceConfig.generate_batch_size,
                 trust_remote_code: bool = False, max_tokens_ceiling: int | None = None,
                 request_timeout: float = DEADLINE_S, max_queue: int | None = None, **options: Any):
        super().__init__(host=host, port=port, model_name=public_id(model_dir), **options)
        self.model_dir = str(model_dir)
        self.request_timeout = request_timeout
        self.engine = FinetunedEngine(self.model_dir, device=device, max_tokens=max_tokens, batch_size=batch_size,
                                      trust_remote_code=trust_remote_code, max_tokens_ceiling=max_tokens_ceiling)
        self.engine.batcher.max_pending = max_queue or QUEUED_BATCHES * batch_size
        self.max_tokens = self.engine.limit()
        self._paths = {os.path.abspath(self.model_dir), os.path.realpath(self.model_dir)}

    def start(self) -> Self:
        """Loads the model (so a bad directory fails here, not on the first request), then serves."""
        self.engine.load()
        return super().start()

    def pick(self, requested: str | None) -> str:
        """Its id, or a DSPy model string naming its folder (`bootfinetune:{dir}`, relative or not).

        Names are compared as strings (made absolute against the working folder), never looked up on disk:
        whatever a client sends, nothing but an equal string names the model.
        """
        if requested is not None and requested != self.model_name and "\0" not in requested and len(requested) < 4096:
            named = model_path(requested)
            if os.path.normpath(os.path.join(os.getcwd(), named)) in self._paths:
                return self.model_name
        return super().pick(requested)

    def stats(self) -> dict[str, Any]:
        sizes = list(self.engine.batcher.batch_sizes)
        return {"calls": self.calls, "batches": len(sizes), "largest_batch": max(sizes, default=0),
                "steps": self.engine.steps, "max_tokens": self.max_tokens, "max_tokens_ceiling": self.engine.ceiling}

    async def choices(self, request: dict[str, Any], http: Request) -> list[Completion]:
        limit = self.engine.limit(requested_tokens(request))
        temperature = float(request.get("temperature") or 0.0)
        control = Control.within(self.request_timeout)
        try:
            futures = self.engine.submit_all(request["messages"], limit, temperature, control, n=request["n"])
        except QueueFull as full:
            raise HTTPProblem(503, "the server is busy: its queue is full; retry after the seconds Retry-After "
                              "says.", "overloaded", retry_after=full.retry_after) from None
        answers = await await_answers(futures, control, http)
        return [Completion(text, p, c, "length" if c >= limit else "stop") for text, p, c in answers]


_SERVED: dict[str, ModelServer] = {}
_SERVED_LOCK = threading.Lock()


def _served_key(model_dir: str | Path) -> str:
    path = Path(model_dir).expanduser()
    return str(path.resolve()) if path.exists() else str(model_dir)


def serve_model(model_dir: str | Path, **options: Any) -> ModelServer:
    """The running `ModelServer` for a directory, started on first use: one per directory and process.

    Args:
        model_dir: The model directory.
        **options: `ModelServer` options (host, port, device, max_tokens, max_tokens_ceiling, batch_size,
            trust_remote_code, request_timeout); used when the server starts, ignored when it already runs.
    """
    key = _served_key(model_dir)
    with _SERVED_LOCK:  # held while the model loads, so two callers never start two servers
        server = _SERVED.get(key)
        if server is None or not server.running:
            server = ModelServer(key, **options).start()
            _SERVED[key] = server
        return server


def served_model(model_dir: str | Path) -> ModelServer | None:
    """The running server for a directory, or None."""
    server = _SERVED.get(_served_key(model_dir))
    return server if server is not None and server.running else None


def stop_model(model_dir: str | Path) -> bool:
    """Stops a directory's server and frees its weights; False when none was running."""
    key = _served_key(model_dir)
    with _SERVED_LOCK:
        server = _SERVED.pop(key, None)
    if server is None:
        return False
    server.stop()
    unload_model(server.model_dir)
    return True
