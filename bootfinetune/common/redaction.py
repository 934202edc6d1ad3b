"""Keeping secrets out of what the package writes and logs: LM arguments, failure messages, URLs and URIs.

What an LM is described by (config.json, the report, the trace identity) is an allow-list of its
arguments (`LM_PUBLIC_ARGS`): anything else (headers, tokens, cloud keys, arguments we have never
seen) keeps its name but not its value. URLs keep their host and path, never their user info or
query values. A leaf: it imports nothing of ours.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

MASK = "***"

LM_PUBLIC_ARGS = frozenset({
    # dspy.LM's own arguments
    "model", "model_type", "temperature", "max_tokens", "cache", "num_retries", "rollout_id",
    "use_developer_role", "finetuning_model",
    # generation options LiteLLM and OpenAI-compatible servers take
    "top_p", "top_k", "n", "stop", "seed", "max_completion_tokens", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logit_bias", "logprobs", "top_logprobs", "response_format", "reasoning_effort",
    "tools", "tool_choice", "parallel_tool_calls", "modalities", "timeout",
    # where requests go (api_base and its aliases are shown without user info or query values)
    "api_base", "base_url", "api_version", "custom_llm_provider", "deployment_id", "region_name",
})
"""LM arguments whose values are shown as they are (URL-valued ones through `redact_url`)."""
_URL_ARGS = ("api_base", "base_url")

PUBLIC_QUERY_NAMES = frozenset({"endpoint_override", "scheme", "region", "allow_bucket_creation",
                                "allow_bucket_deletion", "project_id", "api-version", "api_version"})
"""URL query parameters whose values are shown (pyarrow's storage-URI options, Azure's api-version), so a
printed run URI can be passed back as it is; every other query value is masked."""

_SECRET_ENV = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL)", re.I)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """The URL with its user info and query values masked (but `PUBLIC_QUERY_NAMES`); host, port, path kept.

    >>> redact_url("https://user:pw@host:8000/v1?key=sk-1&region=eu")
    'https://***@host:8000/v1?key=***&region=eu'
    >>> redact_url("s3://bucket/runs")
    's3://bucket/runs'
    >>> redact_url("/local/runs")
    '/local/runs'
    """
    if "://" not in url:  # a local path: nothing to hide, and '?' or '#' may be part of its name
        return url
    try:
        s = urlsplit(url)
        netloc = s.netloc
        if "@" in netloc:
            netloc = MASK + "@" + netloc.rpartition("@")[2]
        query = "&".join(f"{k}={v if k in PUBLIC_QUERY_NAMES else MASK}"
                         for k, v in parse_qsl(s.query, keep_blank_values=True))
        if s.query and not query:
            query = MASK
        return urlunsplit((s.scheme, netloc, s.path, query, MASK if s.fragment else ""))
    except ValueError:  # not parseable as a URL (a bad port, say): show only its scheme
        return url.partition("://")[0] + "://" + MASK


redact_uri = redact_url
"""Storage URIs are shown the same way as any URL."""


def redact_urls_in(text: str) -> str:
    """Every URL inside free text (a log line, an exception message) through `redact_url`.

    >>> redact_urls_in("cannot reach http://u:pw@h/v1: refused")
    'cannot reach http://***@h/v1: refused'
    """
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def _masked(value: Any) -> Any:
    """A value of a non-public argument: dicts keep their keys (header names), everything else is masked."""
    if isinstance(value, dict):
        return {str(k): _masked(v) for k, v in value.items()}
    return MASK


def public_lm_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The LM arguments as they may be shown: allow-listed values kept (URLs redacted), the rest masked.

    >>> public_lm_args({"temperature": 0.7, "api_base": "http://u:p@h/v1",
    ...                 "extra_headers": {"Authorization": "Bearer sk"}, "aws_secret_access_key": "x"})
    {'temperature': 0.7, 'api_base': 'http://***@h/v1', 'extra_headers': {'Authorization': '***'}, \
'aws_secret_access_key': '***'}
    """
    shown: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name in _URL_ARGS and isinstance(value, str):
            shown[name] = redact_url(value)
        elif name in LM_PUBLIC_ARGS:
            shown[name] = value
        else:
            shown[name] = _masked(value)
    return shown


_LM_STATE_PARTS = frozenset({"engine", "async_engine", "launch_kwargs", "train_kwargs", "prompt_cache", "callbacks"})


def _urls_redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact_urls_in(value)
    if isinstance(value, dict):
        return {k: _urls_redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_urls_redacted(v) for v in value]
    return value


def public_lm_state(state: dict[str, Any]) -> dict[str, Any]:
    """An LM's `dump_state()` as program.json may hold it: `public_lm_args` on its arguments, while
    DSPy's own parts (`_dspy_lm_class`, the engine's state, ...) keep their shape with URLs redacted.

    >>> public_lm_state({"_dspy_lm_class": "dspy.LM", "model": "openai/x", "extra_headers": {"A": "b"},
    ...                  "engine": {"source": "s3://k:s@b/m"}})
    {'_dspy_lm_class': 'dspy.LM', 'model': 'openai/x', 'extra_headers': {'A': '***'}, 'engine': {'source': 's3://***@b/m'}}
    """
    args = public_lm_args({k: v for k, v in state.items() if not k.startswith("_") and k not in _LM_STATE_PARTS})
    return {k: args[k] if k in args else _urls_redacted(v) for k, v in state.items()}


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [s for v in value for s in _strings(v)]
    return []


def _url_secrets(url: str) -> list[str]:
    try:
        s = urlsplit(url)
    except ValueError:
        return []
    found = [s.password or "", s.username or ""] if "@" in s.netloc else []
    return found + [v for k, v in parse_qsl(s.query) if k not in PUBLIC_QUERY_NAMES]


def collect_secrets(*lms: Any) -> list[str]:
    """Every value an LM holds outside the allow-list (keys, tokens, header values), the user info and
    query values of its URLs, and values of environment variables named like secrets; longest first."""
    secrets: set[str] = set()
    for lm in lms:
        kwargs = getattr(lm, "kwargs", None) or {}
        for name, value in kwargs.items():
            if name in _URL_ARGS and isinstance(value, str):
                secrets.update(_url_secrets(value))
            elif name not in LM_PUBLIC_ARGS:
                for text in _strings(value):
                    secrets.add(text)
                    if text.lower().startswith(("bearer ", "basic ", "token ")):
                        secrets.add(text.split(None, 1)[1])
    for name, value in os.environ.items():
        if _SECRET_ENV.search(name) and value:
            secrets.add(value)
    return sorted((s for s in secrets if len(s) >= 6), key=len, reverse=True)


def redact(text: str, secrets: list[str]) -> str:
    """Replaces every secret in text by `***`, and masks the credentials of every URL in it.

    >>> redact("401: key sk-abcdef rejected", ["sk-abcdef"])
    '401: key *** rejected'
    """
    for secret in secrets:
        text = text.replace(secret, MASK)
    return redact_urls_in(text)
