"""Chat records: what a message list must hold, for training, for rendering and for serving;
and the placeholder key clients of our OpenAI-compatible chat servers send.

A message is `{"role": str, "content": str}`; a training record's messages end with the
assistant's answer after at least one prompt message. Each caller words the problem for its
reader (a provider's `train_data[i]`, a data file's line, an HTTP 400); the rule lives here.

A leaf: it imports nothing of ours.
"""

from __future__ import annotations

from typing import Any, Sequence

ROLES = ("system", "user", "assistant")
"""The roles DSPy's adapters write into finetuning data."""
LOCAL_API_KEY = "local"
"""The api_key a client of our own chat servers sends: they check none, and LiteLLM wants one set
(too short to be taken for a secret and redacted)."""


def is_message(m: Any, *, roles: Sequence[str] | None = None, text_parts: bool = False) -> bool:
    """Whether `m` is `{"role": str, "content": str}`.

    Args:
        roles: The roles allowed; None allows any string.
        text_parts: Let `content` also be a list of text parts (OpenAI chat requests).

    >>> is_message({"role": "user", "content": "hi"}), is_message({"role": "robot", "content": "hi"}, roles=ROLES)
    (True, False)
    """
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        return False
    if roles is not None and m["role"] not in roles:
        return False
    return isinstance(m.get("content"), (str, list) if text_parts else str)


def first_bad_message(messages: Sequence[Any], *, roles: Sequence[str] | None = None,
                      text_parts: bool = False) -> int | None:
    """The index of the first item of `messages` that is not a message (see `is_message`), or None."""
    for i, m in enumerate(messages):
        if not is_message(m, roles=roles, text_parts=text_parts):
            return i
    return None


def plain_messages(messages: list[Any]) -> list[dict[str, str]]:
    """Messages as `{"role": str, "content": str}` dicts, for the renderer: text parts joined, objects read.

    >>> plain_messages([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    [{'role': 'user', 'content': 'hi'}]
    """
    plain = []
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else getattr(m, "role", "user")
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", "")
        if isinstance(content, list):  # content parts: keep the text
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        plain.append({"role": str(role), "content": str(content)})
    return plain


def ends_with_answer(messages: Sequence[Any]) -> bool:
    """Whether there is a prompt and a final assistant message: the answer a model learns.

    >>> ends_with_answer([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])
    True
    """
    return len(messages) >= 2 and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant"
