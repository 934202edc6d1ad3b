"""Keeping secrets out of what the package writes and logs: failure messages, URIs in log lines.

A leaf: it imports nothing of ours.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

_SECRET_ENV = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL)", re.I)


def collect_secrets(*lms: Any) -> list[str]:
    """API keys held by LMs, plus values of environment variables named like secrets."""
    secrets = set()
    for lm in lms:
        kwargs = getattr(lm, "kwargs", None) or {}
        for name in ("api_key", "api_token", "token"):
            if isinstance(kwargs.get(name), str):
                secrets.add(kwargs[name])
    for name, value in os.environ.items():
        if _SECRET_ENV.search(name) and value:
            secrets.add(value)
    return sorted((s for s in secrets if len(s) >= 6), key=len, reverse=True)


def redact(text: str, secrets: list[str]) -> str:
    """Replaces every secret in text by `***`.

    >>> redact("401: key sk-abcdef rejected", ["sk-abcdef"])
    '401: key *** rejected'
    """
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def redact_uri(uri: str) -> str:
    """The URI without its query string (where a careless user might have put a key), for logs.

    >>> redact_uri("s3://b/runs?access_key=AKIA123&secret_key=xyz")
    's3://b/runs'
    """
    s = urlsplit(uri)
    return urlunsplit((s.scheme, s.netloc, s.path, "", ""))
