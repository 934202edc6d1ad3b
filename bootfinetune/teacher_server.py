"""A scripted teacher behind a real OpenAI-compatible HTTP endpoint on 127.0.0.1.

It stands in for a large model where none can be reached (tests, the offline demo): a
plain Python function (the *script*) answers each request, and DSPy reaches it exactly
as it reaches a hosted model, through `dspy.LM("openai/<name>", api_base=server.url)`.
It is not a language model: it reads the fields DSPy's ChatAdapter wrote into the
prompt and returns the fields the script computes, in the ChatAdapter's format.

Example:
    >>> def script(inputs, outputs):
    ...     return {name: inputs["question"].upper() for name in outputs}
    >>> with TeacherServer(script) as server:  # doctest: +SKIP
    ...     lm = dspy.LM("openai/scripted", api_base=server.url, api_key="unused", cache=False)
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Script = Callable[[dict[str, str], list[str]], dict[str, str]]
"""(input field values as the prompt shows them, output field names) -> output field values."""

_MARKER = re.compile(r"\[\[ ## (\w+) ## \]\]")
_OUTPUTS_BLOCK = re.compile(r"Your output fields are:\n(.*?)\nAll interactions", re.S)
_FIELD_LINE = re.compile(r"^\d+\. `(\w+)`", re.M)


def parse_chat_request(messages: list[dict]) -> tuple[dict[str, str], list[str]]:
    """Reads input values and output field names from ChatAdapter-formatted messages.

    Example:
        >>> system = {"role": "system", "content": "Your output fields are:\\n1. `answer` (str):\\nAll interactions"}
        >>> user = {"role": "user", "content": "[[ ## question ## ]]\\n2+2?\\n\\nRespond with ..."}
        >>> parse_chat_request([system, user])
        ({'question': '2+2?'}, ['answer'])
    """
    system = next((m["content"] for m in messages if m.get("role") == "system"), "")
    block = _OUTPUTS_BLOCK.search(system)
    outputs = _FIELD_LINE.findall(block.group(1)) if block else []
    user = next(m["content"] for m in reversed(messages) if m.get("role") == "user")
    if isinstance(user, list):  # content parts
        user = "".join(part.get("text", "") for part in user if isinstance(part, dict))
    parts = _MARKER.split(user)
    inputs = {}
    for name, value in zip(parts[1::2], parts[2::2]):
        value = value.split("\n\nRespond with the corresponding output fields", 1)[0]
        inputs[name] = value.strip("\n")
    return inputs, outputs


def format_chat_answer(outputs: dict[str, str]) -> str:
    body = "".join(f"[[ ## {name} ## ]]\n{value}\n\n" for name, value in outputs.items())
    return body + "[[ ## completed ## ]]\n"


class TeacherServer:
    """An OpenAI-compatible `/v1/chat/completions` endpoint answered by a script.

    Args:
        script: Computes the output fields from the input fields.
        host: Address to bind; 127.0.0.1 unless you mean to expose it.
        port: 0 picks a free port.
        latency: Seconds each answer waits, to stand in for a remote model.
        model_name: Name reported in responses.
    """

    def __init__(self, script: Script, host: str = "127.0.0.1", port: int = 0,
                 latency: float = 0.0, model_name: str = "scripted-teacher"):
        self.script = script
        self.latency = latency
        self.model_name = model_name
        self.calls = 0
        self.requests: deque[list[dict]] = deque(maxlen=256)
        """The messages of the latest requests, newest last (for tests and debugging)."""
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "TeacherServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="teacher-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "TeacherServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def answer(self, messages: list[dict]) -> str:
        inputs, outputs = parse_chat_request(messages)
        return format_chat_answer(self.script(inputs, outputs))

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test and demo output clean
                pass

            def _send(self, code: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": server.model_name, "object": "model"}]})
                elif self.path.rstrip("/").endswith("/stats"):
                    self._send(200, {"calls": server.calls})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                request = json.loads(self.rfile.read(length) or b"{}")
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                with server._lock:
                    server.calls += 1
                    server.requests.append(request.get("messages", []))
                if server.latency:
                    time.sleep(server.latency)
                try:
                    content = server.answer(request.get("messages", []))
                except Exception as exc:  # the script failed: a 500, as a real server would answer
                    self._send(500, {"error": {"message": f"{type(exc).__name__}: {exc}", "type": "server_error"}})
                    return
                prompt_chars = sum(len(str(m.get("content", ""))) for m in request.get("messages", []))
                self._send(200, {
                    "id": f"chatcmpl-{server.calls}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": request.get("model", server.model_name),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": prompt_chars // 4, "completion_tokens": len(content) // 4,
                              "total_tokens": (prompt_chars + len(content)) // 4},
                })

        return Handler
