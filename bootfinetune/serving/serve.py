"""OpenAI-compatible HTTP endpoints on 127.0.0.1: the shared server, and a finetuned model behind it.

`ChatServer` is the HTTP part: `POST /v1/chat/completions`, `GET /v1/models`, `GET /v1/stats`
and `GET /health`, each request on its own thread. What answers is one method,
`complete(request) -> list[Completion]`; `ModelServer` answers with a Hugging Face model
(through `FinetunedEngine`, so concurrent requests share batched `generate` calls), and
`teacher_server.TeacherServer` with a script.

    server = serve_model("runs/Provider-1a2b/models/all")      # once per directory and process
    lm = dspy.LM("openai/bootfinetune:runs/...", api_base=server.url, api_key="local")

A request that cannot be answered as sent (bad JSON, no messages, a bad `n`) gets a 400
naming the field; a failure while answering gets a 500 with the error. A subclass answers other
failures its own way through `ChatServer.handler_class` (`bootfinetune.testing.faults` injects faults so).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

from bootfinetune.config import InferenceConfig
from bootfinetune.common.chat import first_bad_message
from bootfinetune.serving.lm import FinetunedEngine, unload_model


@dataclass(frozen=True)
class Completion:
    """One answer choice and its token counts."""

    text: str
    """The assistant's message."""
    prompt_tokens: int
    """Tokens in the prompt as the model saw it."""
    completion_tokens: int
    """Tokens generated."""
    finish_reason: str = "stop"
    """"stop" (the model ended its answer) or "length" (it hit max_tokens)."""


class BadRequest(ValueError):
    """The request cannot be answered as sent; the client gets a 400 with this message."""


def check_chat_request(request: Any) -> dict[str, Any]:
    """Checks the fields every chat server reads; raises `BadRequest` naming the field and the fix.

    Example:
        >>> check_chat_request({"messages": [{"role": "user", "content": "hi"}], "n": 2})["n"]
        2
        >>> check_chat_request({"messages": []})  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ...
        BadRequest: messages: must be a non-empty list of {"role", "content"} objects.
    """
    if not isinstance(request, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(request).__name__}.")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest('messages: must be a non-empty list of {"role", "content"} objects.')
    i = first_bad_message(messages, text_parts=True)
    if i is not None:
        raise BadRequest(f'messages[{i}]: must be an object with a string "role" and a string (or list of '
                         f'text parts) "content"; got {json.dumps(messages[i])[:200]}.')
    n = request.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 64:
        raise BadRequest(f"n={n!r}: must be an integer from 1 to 64.")
    for name in ("max_tokens", "max_completion_tokens"):
        value = request.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise BadRequest(f"{name}={value!r}: must be a positive integer (or left out).")
    temperature = request.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0 <= temperature <= 2):
        raise BadRequest(f"temperature={temperature!r}: must be a number from 0 to 2 (0 is greedy).")
    if request.get("stream"):
        raise BadRequest("stream=true: streaming is not supported here; send stream=false.")
    return {**request, "n": n}


class ChatHandler(BaseHTTPRequestHandler):
    """The HTTP side of a `ChatServer`: routes, JSON bodies and status codes.

    Each server serves a subclass bound to itself (`chat`). `send_failure` decides how a request
    whose answer raised is answered; a subclass may override it (see `ChatServer.handler_class`).
    """

    chat: ChatServer
    """The server whose `respond` answers chat requests."""
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle's algorithm on, the body waits for the
    # client's delayed ACK of the headers (about 40 ms on Linux) on every kept-alive request.
    disable_nagle_algorithm = True

    def log_message(self, *args):  # keep test and demo output clean
        pass

    def _send(self, code: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, code: int, message: str, kind: str) -> None:
        self._send(code, {"error": {"message": message, "type": kind}})

    def do_GET(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        if path.endswith("/models"):
            self._send(200, {"object": "list", "data": [{"id": self.chat.model_name, "object": "model"}]})
        elif path.endswith("/stats"):
            self._send(200, self.chat.stats())
        elif path.endswith("/health"):
            self._send(200, {"status": "ok"})
        else:
            self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)  # read it all, so the connection stays usable after an error
        if not self.path.split("?", 1)[0].rstrip("/").endswith("/chat/completions"):
            self._error(404, f"no route {self.path}; POST /v1/chat/completions", "not_found")
            return
        try:
            request = json.loads(body or b"{}")
        except ValueError as exc:
            self._error(400, f"the body is not valid JSON ({exc}); send a chat.completions request.",
                        "invalid_request_error")
            return
        try:
            payload = self.chat.respond(request)
        except Exception as exc:
            self.send_failure(exc)
        else:
            self._send(200, payload)

    def send_failure(self, exc: Exception) -> None:
        """Answers a request whose `respond` raised: a 400 for `BadRequest`, else a 500 with the error,
        as a real server would answer."""
        if isinstance(exc, BadRequest):
            self._error(400, str(exc), "invalid_request_error")
        else:
            self._error(500, f"{type(exc).__name__}: {exc}", "server_error")


class ChatServer:
    """An OpenAI-compatible chat endpoint on a background thread; `complete` decides the answers.

    Args:
        host: Address to bind; 127.0.0.1 unless you mean to expose it.
        port: 0 picks a free port.
        model_name: Name listed by `/v1/models` and reported when a request names none.
    """

    handler_class: type[ChatHandler] = ChatHandler
    """The request handler; a subclass may name its own, e.g. to answer some exceptions from
    `complete` with other status codes."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, model_name: str = "model"):
        self.model_name = model_name
        self.calls = 0
        """Chat requests accepted (a 400 does not count; a 500 does)."""
        self.requests: deque[list[dict]] = deque(maxlen=256)
        """The messages of the latest accepted requests, newest last (for tests and debugging)."""
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._httpd = ThreadingHTTPServer((host, port), type("Handler", (self.handler_class,), {"chat": self}))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    def complete(self, request: dict[str, Any]) -> list[Completion]:
        """The `n` answers to a checked request. Raise `BadRequest` for a 400; anything else is a 500."""
        raise NotImplementedError

    @property
    def url(self) -> str:
        """The OpenAI base URL (`.../v1`), as `dspy.LM(api_base=...)` takes it."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self.running:  # shutdown() waits for serve_forever, so only when it runs
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def respond(self, request: dict[str, Any]) -> dict[str, Any]:
        """The chat.completion body for a request (checks it, counts it, answers it)."""
        request = check_chat_request(request)
        with self._lock:
            self.calls += 1
            self.requests.append(request["messages"])
        choices = self.complete(request)
        return completion_body(request.get("model") or self.model_name, choices, f"chatcmpl-{next(self._ids)}")


def completion_body(model: str, choices: list[Completion], completion_id: str) -> dict[str, Any]:
    """An OpenAI `chat.completion` response body."""
    prompt_tokens = max((c.prompt_tokens for c in choices), default=0)
    completion_tokens = sum(c.completion_tokens for c in choices)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": i, "finish_reason": c.finish_reason,
                     "message": {"role": "assistant", "content": c.text}} for i, c in enumerate(choices)],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


class ModelServer(ChatServer):
    """A Hugging Face model directory (a finetuned export or a base model) behind `/v1/chat/completions`.

    Prompts are rendered as in training (`FinetunedEngine`); concurrent requests are batched.
    Requests may set `max_tokens` (or `max_completion_tokens`), `temperature` (0 = greedy)
    and `n`; usage counts are the tokenizer's.

    Args:
        model_dir: The model directory (or a hub id the machine can load).
        host: Address to bind; 127.0.0.1 unless you mean to expose it.
        port: 0 picks a free port.
        device: "cpu", "cuda", "cuda:1"...; None picks CUDA when present.
        max_tokens: New tokens per answer when a request does not say.
        batch_size: Most prompts per `generate` call.
        trust_remote_code: Allow the model repository's own code to run.
    """

    def __init__(self, model_dir: str | Path, host: str = "127.0.0.1", port: int = 0, device: str | None = None,
                 max_tokens: int = InferenceConfig.max_tokens, batch_size: int = InferenceConfig.generate_batch_size,
                 trust_remote_code: bool = False):
        super().__init__(host=host, port=port, model_name=str(model_dir))
        self.model_dir = str(model_dir)
        self.max_tokens = max_tokens
        self.engine = FinetunedEngine(self.model_dir, device=device, max_tokens=max_tokens, batch_size=batch_size,
                                      trust_remote_code=trust_remote_code)

    def start(self) -> Self:
        """Loads the model (so a bad directory fails here, not on the first request), then serves."""
        self.engine.load()
        return super().start()

    def complete(self, request: dict[str, Any]) -> list[Completion]:
        limit = request.get("max_tokens") or request.get("max_completion_tokens") or self.max_tokens
        temperature = float(request.get("temperature") or 0.0)
        out = []
        for _ in range(request["n"]):
            text, prompt_tokens, new_tokens = self.engine.answer(request["messages"], limit, temperature)
            out.append(Completion(text, prompt_tokens, new_tokens, "length" if new_tokens >= limit else "stop"))
        return out


_SERVED: dict[str, ModelServer] = {}
_SERVED_LOCK = threading.Lock()


def _served_key(model_dir: str | Path) -> str:
    path = Path(model_dir).expanduser()
    return str(path.resolve()) if path.exists() else str(model_dir)


def serve_model(model_dir: str | Path, **options: Any) -> ModelServer:
    """The running `ModelServer` for a directory, started on first use: one per directory and process.

    Args:
        model_dir: The model directory.
        **options: `ModelServer` options (host, port, device, max_tokens, batch_size,
            trust_remote_code); used when the server starts, ignored when it already runs.
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
