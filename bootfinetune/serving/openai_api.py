"""The OpenAI chat-completions protocol as both model servers speak it: one home for its rules.

`serve.ChatServer` (in process, uvicorn) and `ray_serve.ChatDeployment` (Ray Serve) read a request
the same way (`read_json`: the body size limit while reading, one deadline for the whole body, JSON
nested at most `MAX_JSON_DEPTH` deep), check it the same
way (`check_chat_request`: 400 naming the field), pick the model the same way (`pick_model`: a
404 for a name that is not one of theirs, never echoed back), wait for answers the same way
(`await_answers`: the deadline gives a 504, a client gone stops generation) and answer in the
same shape (`completion_body`, `error_response`). An error body is one short message: no
traceback, no exception text from inside the server, no filesystem path.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from bootfinetune.common.chat import first_bad_message
from bootfinetune.serving.limits import MAX_N, Cancelled, Control, DeadlineExceeded


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
    """"stop" (the model ended its answer) or "length" (it hit max_tokens or the ceiling)."""


class BadRequest(ValueError):
    """The request cannot be answered as sent; the client gets a 400 with this message."""


class HTTPProblem(Exception):
    """A request answered with an error status and a short message (`response()`); `retry_after` (seconds)
    is sent as `Retry-After` (a 503 of a busy server)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.retry_after = status, message, kind, retry_after

    def response(self) -> JSONResponse:
        response = error_response(self.status, self.message, self.kind)
        if self.status == 408:  # the body stalled: end the connection (after a 413 uvicorn drops the rest unread)
            response.headers["Connection"] = "close"
        if self.retry_after is not None:
            response.headers["Retry-After"] = str(self.retry_after)
        return response


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    """`{"error": {"message", "type"}}` with a status, as OpenAI answers errors."""
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


DEADLINE_KEY = "bootfinetune.read_deadline"
"""The ASGI scope key under which a server's protocol hands over when a request's reading must end (the
event loop's clock: its headers and body together, from the request's first byte); see `read_json`."""


async def read_json(http: Request, max_bytes: int, read_timeout: float) -> Any:
    """The request's JSON body, read with limits; raises `HTTPProblem` (400, 408, 413) otherwise.

    A `Content-Length` above `max_bytes` is refused before reading; a body without one (chunked)
    is refused as soon as what arrived passes `max_bytes`, so nothing larger is ever held. The
    whole body must arrive by one deadline: the scope's `DEADLINE_KEY` when the server's protocol set
    one (counted from the request's first byte, headers included), else `read_timeout` from now. JSON
    nested deeper than `MAX_JSON_DEPTH` is a 400.
    """
    loop = asyncio.get_running_loop()
    deadline = http.scope.get(DEADLINE_KEY) or loop.time() + read_timeout
    length = http.headers.get("content-length")
    if length is not None and not length.strip().isdigit():
        raise HTTPProblem(400, "Content-Length: must be a non-negative integer.")
    if length is not None and int(length) > max_bytes:
        raise HTTPProblem(413, f"the body is over this server's {max_bytes} bytes; send a smaller request.",
                          "request_too_large")
    chunks, size = [], 0
    stream = http.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(deadline - loop.time(), 0.0))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise HTTPProblem(408, f"the request did not arrive within {read_timeout:g} s.", "timeout") from None
        except ClientDisconnect:
            raise HTTPProblem(400, "the client went away while sending the body.") from None
        size += len(chunk)
        if size > max_bytes:
            raise HTTPProblem(413, f"the body is over this server's {max_bytes} bytes; send a smaller request.",
                              "request_too_large")
        chunks.append(chunk)
    try:
        value = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        raise HTTPProblem(400, "the body is not valid JSON; send a chat.completions request.") from None
    except RecursionError:  # deeper than the parser goes: deeper than we allow too
        raise _too_deep() from None
    if nested_too_deep(value):
        raise _too_deep()
    return value


def _too_deep() -> HTTPProblem:
    return HTTPProblem(400, f"the body nests JSON more than {MAX_JSON_DEPTH} levels deep; send a chat.completions "
                       f"request.")


MAX_JSON_DEPTH = 32
"""The deepest JSON nesting a request body may have (a chat request needs 5): deeper is a 400, never a
`RecursionError` in whatever walks the value later."""


def nested_too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `value` (parsed JSON) nests lists and objects more than `limit` levels deep; walked without recursion.

    >>> nested_too_deep({"a": [[1]]}, limit=3), nested_too_deep({"a": [[[1]]]}, limit=3)
    (False, True)
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def check_chat_request(request: Any, max_n: int = MAX_N) -> dict[str, Any]:
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
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_n:
        raise BadRequest(f"n={str(n)[:20]}: must be an integer from 1 to {max_n}.")
    for name in ("max_tokens", "max_completion_tokens"):
        value = request.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise BadRequest(f"{name}={str(value)[:20]}: must be a positive integer (or left out).")
    temperature = request.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0 <= temperature <= 2):
        raise BadRequest(f"temperature={repr(temperature)[:20]}: must be a number from 0 to 2 (0 is greedy).")
    if request.get("stream"):
        raise BadRequest("stream=true: streaming is not supported here; send stream=false.")
    model = request.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model: must be a string (one of GET /v1/models), or left out.")
    return {**request, "n": n}


def pick_model(requested: str | None, names: dict[str, str]) -> str:
    """The served model a request names: `names` maps every accepted name to a model's id.

    A request without a model gets the only one; an unknown name a 404 listing the ids (the name
    itself is not echoed).
    """
    ids = sorted(set(names.values()))
    if requested is None and len(ids) == 1:
        return ids[0]
    if requested is not None and requested in names:
        return names[requested]
    raise HTTPProblem(404, f"model: not served here; this server has {ids}; set model to one of them.",
                      "model_not_found")


def requested_tokens(request: dict[str, Any]) -> int | None:
    """The new tokens a checked request asks for (None: the server's default)."""
    return request.get("max_tokens") or request.get("max_completion_tokens")


async def await_answers(futures: list[Future], control: Control, http: Request | None = None) -> list[Any]:
    """The answers of one request's futures, within its deadline.

    Raises `HTTPProblem` 504 when the deadline passes first. When the client goes away (`http`'s
    receive channel says so, or this task is cancelled, as Ray Serve does), the control is set so
    the answers stop generating, and `Cancelled` is raised.
    """
    gathered = asyncio.gather(*[asyncio.wrap_future(f) for f in futures])
    watcher = asyncio.ensure_future(_client_gone(http)) if http is not None else None
    try:
        left = control.left()
        waited = {gathered} | ({watcher} if watcher else set())
        done, _ = await asyncio.wait(waited, timeout=None if left is None else max(left, 0) + 0.5,
                                     return_when=asyncio.FIRST_COMPLETED)
        if gathered in done:
            return gathered.result()
        if watcher is not None and watcher in done:
            control.cancelled.set()
            raise Cancelled("the client went away")
        control.deadline = time.monotonic()  # stop generating now
        raise DeadlineExceeded("the request's deadline passed")
    except asyncio.CancelledError:
        control.cancelled.set()
        raise
    except DeadlineExceeded:
        raise HTTPProblem(504, "the answer was not done within this server's deadline; ask for fewer "
                          "max_tokens or try again later.", "timeout") from None
    finally:
        if watcher is not None:
            watcher.cancel()
        if not gathered.done():
            gathered.cancel()
        gathered.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: an abandoned answer's error is not logged as unhandled


async def _client_gone(http: Request) -> None:
    """Returns once the client has gone away (the body was read: the next message is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


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
