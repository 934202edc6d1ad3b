"""A scripted teacher behind a real OpenAI-compatible HTTP endpoint on 127.0.0.1.

It stands in for a large model where none can be reached (tests, the offline demo): a
plain Python function (the *script*) answers each request, and DSPy reaches it exactly
as it reaches a hosted model, through `dspy.LM("openai/<name>", api_base=server.url)`.
It is not a language model: it reads the fields a DSPy adapter (ChatAdapter, JSONAdapter
or XMLAdapter) wrote into the prompt and returns the fields the script computes, in the
format that adapter asked for.
The HTTP side (routes, limits, 400s for bad requests, 500 naming the script's error when it
raises) is `serve.ChatServer`, shared with the server of finetuned models; any model name a client
gives is answered. Tests that play a flaky hosted
model use `bootfinetune.testing.faults.FaultyTeacherServer`, a subclass that injects faults.

Example:
    >>> def script(inputs, outputs):
    ...     return {name: inputs["question"].upper() for name in outputs}
    >>> with TeacherServer(script) as server:  # doctest: +SKIP
    ...     lm = dspy.LM("openai/scripted", api_base=server.url, api_key="unused", cache=False)
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Callable

from starlette.requests import Request
from starlette.responses import Response

from bootfinetune.serving.openai_api import BadRequest, Completion, error_response
from bootfinetune.serving.serve import ChatServer

Script = Callable[[dict[str, str], list[str]], dict[str, str]]
"""(input field values as the prompt shows them, output field names) -> output field values."""

_MARKER = re.compile(r"\[\[ ## (\w+) ## \]\]")
_XML_FIELD = re.compile(r"<(\w+)>\n(.*?)\n</\1>", re.S)
_OUTPUTS_BLOCK = re.compile(r"Your output fields are:\n(.*?)\nAll interactions", re.S)
_FIELD_LINE = re.compile(r"^\d+\. `(\w+)`", re.M)
# The last line of the main user message names the answer format (`user_message_output_requirements`).
_REQUIREMENTS = {"json": "Respond with a JSON object",
                 "xml": "Respond with the corresponding output fields wrapped in XML tags"}


def _text(content: str | list) -> str:
    if isinstance(content, list):  # content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content


def answer_format(messages: list[dict]) -> str:
    """"chat", "json" or "xml": the DSPy adapter (ChatAdapter, JSONAdapter, XMLAdapter) that wrote the request.

    Read from the last user message, where each adapter asks for its own answer format.
    """
    user = _text(next(m["content"] for m in reversed(messages) if m.get("role") == "user"))
    return next((style for style, marker in _REQUIREMENTS.items() if marker in user), "chat")


def parse_chat_request(messages: list[dict]) -> tuple[dict[str, str], list[str]]:
    """Reads input values and output field names from messages that a DSPy adapter formatted.

    ChatAdapter and JSONAdapter write inputs as `[[ ## name ## ]]` sections, XMLAdapter as
    `<name>` elements; all three list the output fields in the system message.

    Example:
        >>> system = {"role": "system", "content": "Your output fields are:\\n1. `answer` (str):\\nAll interactions"}
        >>> user = {"role": "user", "content": "[[ ## question ## ]]\\n2+2?\\n\\nRespond with ..."}
        >>> parse_chat_request([system, user])
        ({'question': '2+2?'}, ['answer'])
    """
    system = _text(next((m["content"] for m in messages if m.get("role") == "system"), ""))
    block = _OUTPUTS_BLOCK.search(system)
    outputs = _FIELD_LINE.findall(block.group(1)) if block else []
    user = _text(next(m["content"] for m in reversed(messages) if m.get("role") == "user"))
    if answer_format(messages) == "xml":
        return {name: value for name, value in _XML_FIELD.findall(user)}, outputs
    # The closing "Respond with ..." line names the output markers too: cut it before reading inputs.
    parts = _MARKER.split(user.split("\n\nRespond with ", 1)[0])
    return {name: value.strip("\n") for name, value in zip(parts[1::2], parts[2::2])}, outputs


def format_answer(outputs: dict[str, str], style: str = "chat") -> str:
    """The answer as the adapter that asked expects it (see `answer_format`).

    >>> print(format_answer({"answer": "a < b"}, "xml"))
    <answer>
    a &lt; b
    </answer>
    """
    if style == "json":
        return json.dumps(outputs, indent=2, ensure_ascii=False)
    if style == "xml":  # XMLAdapter parses the answer as XML: escape what XML reserves in text
        return "\n\n".join(f"<{name}>\n{str(value).replace('&', '&amp;').replace('<', '&lt;')}\n</{name}>"
                           for name, value in outputs.items())
    body = "".join(f"[[ ## {name} ## ]]\n{value}\n\n" for name, value in outputs.items())
    return body + "[[ ## completed ## ]]\n"


class TeacherServer(ChatServer):
    """An OpenAI-compatible `/v1/chat/completions` endpoint answered by a script.

    Args:
        script: Computes the output fields from the input fields.
        host: Address to bind; 127.0.0.1 unless you mean to expose it.
        port: 0 picks a free port.
        latency: Seconds each answer waits, to stand in for a remote model.
        model_name: Name reported in responses.
        **options: `ChatServer` limits (max_body_bytes, read_timeout, limit_concurrency, backlog, threads).
    """

    def __init__(self, script: Script, host: str = "127.0.0.1", port: int = 0,
                 latency: float = 0.0, model_name: str = "scripted-teacher", **options: Any):
        super().__init__(host=host, port=port, model_name=model_name, **options)
        self.script = script
        self.latency = latency

    def model_names(self) -> None:
        return None  # a stand-in teacher answers whatever model the client names

    async def failure_response(self, exc: Exception, http: Request) -> Response:
        """A failing script's error by type and message (the script is the caller's own code), as a 500."""
        if isinstance(exc, BadRequest):
            return await super().failure_response(exc, http)
        return error_response(500, f"{type(exc).__name__}: {str(exc)[:500]}", "server_error")

    def answer(self, messages: list[dict]) -> str:
        """The assistant's message for a request's messages (a subclass may answer otherwise)."""
        inputs, outputs = parse_chat_request(messages)
        return format_answer(self.script(inputs, outputs), answer_format(messages))

    def complete(self, request: dict) -> list[Completion]:
        if self.latency:
            time.sleep(self.latency)
        messages = request["messages"]
        content = self.answer(messages)  # a failing script becomes a 500, as a real server would answer
        # Rough counts (4 characters a token): the script has no tokenizer.
        prompt_chars = sum(len(str(m.get("content", ""))) for m in messages)
        return [Completion(content, prompt_chars // 4, len(content) // 4)] * request["n"]

