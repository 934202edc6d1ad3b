"""Keeping secrets out of what the package writes and logs: LM arguments, failure messages, URLs and URIs.

What an LM is described by (config.json, the report, the trace identity) is an allow-list of its
arguments (`LM_PUBLIC_ARGS`): anything else (headers, tokens, cloud keys, arguments we have never
seen) keeps its name but not its value. URLs keep their host and path, never their user info or
query values. A command line (who holds a run's lock) is shown by the same rule (`public_command`).
A leaf: it imports nothing of ours.

User info is everything between `://` and the last `@` of the authority, whatever it holds: a secret
with an unencoded `/`, `?` or `#` (AWS secret keys often have a `/`) hides the `@` from `urllib.parse`,
so the split is made by hand (`split_userinfo`). An `@` in a path is read the same way (what comes before
it is masked): a URL is shown with too little rather than with a credential.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

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

_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]+)(:\d*)?")
_SECRET_ENV = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL)", re.I)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def split_userinfo(url: str) -> tuple[str, str | None, str]:
    """(`scheme://`, the user info or None, the rest of the URL).

    The user info runs to the last `@` that a host (`name[:port]`) follows, unless every `@` is in the query
    or fragment of a URL whose authority parses as a plain host (no port: `user:123?x@h` would read as host
    `user`, port 123).

    >>> split_userinfo("s3://AKIA:wJal/K7M@bucket/runs")
    ('s3://', 'AKIA:wJal/K7M', 'bucket/runs')
    >>> split_userinfo("s3://b/runs?endpoint_override=u:p@h:9")
    ('s3://', None, 'b/runs?endpoint_override=u:p@h:9')
    """
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return scheme + sep, None, rest
    try:
        s = urlsplit(url)
        plain_host = "@" not in s.netloc and "@" not in s.path and s.port is None
    except ValueError:  # `user:p/ss@host` reads as a bad port: a password with a separator in it
        plain_host = False
    if plain_host:
        return scheme + sep, None, rest
    ats = [i for i, c in enumerate(rest) if c == "@"]
    hosts = [i for i in ats if _HOST.fullmatch(re.split(r"[/?#]", rest[i + 1:], maxsplit=1)[0])]
    at = (hosts or ats)[-1]  # the last '@' a host follows: an '@' inside a query option's value is not it
    return scheme + sep, rest[:at], rest[at + 1:]


def _public_value(value: str) -> str:
    """A public query option's value: shown, but a URL or `user:pw@host` in it loses its user info."""
    if "://" in value:
        return redact_url(value)
    return MASK + "@" + value.rpartition("@")[2] if "@" in value else value


def redact_url(url: str) -> str:
    """The URL with its user info and query values masked (but `PUBLIC_QUERY_NAMES`); host, port, path kept.

    >>> redact_url("https://user:pw@host:8000/v1?key=sk-1&region=eu")
    'https://***@host:8000/v1?key=***&region=eu'
    >>> redact_url("s3://AKIA:wJal/K7M#x@bucket/runs")
    's3://***@bucket/runs'
    >>> redact_url("s3://bucket/runs")
    's3://bucket/runs'
    >>> redact_url("/local/runs")
    '/local/runs'
    """
    if "://" not in url:  # a local path: nothing to hide, and '?' or '#' may be part of its name
        return url
    scheme, userinfo, rest = split_userinfo(url)
    try:
        s = urlsplit(scheme + rest)
        netloc = s.netloc if userinfo is None else MASK + "@" + s.netloc
        query = "&".join(f"{MASK if '@' in k else k}={_public_value(v) if k in PUBLIC_QUERY_NAMES else MASK}"
                         for k, v in parse_qsl(s.query, keep_blank_values=True))
        if s.query and not query:
            query = MASK
        return urlunsplit((s.scheme, netloc, s.path, query, MASK if s.fragment else ""))
    except ValueError:  # not parseable as a URL (a bad port, say): show only its scheme
        return scheme + MASK


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


LM_OPTION_PUBLIC_ARGS = frozenset({
    # launch_kwargs (where and how a provider serves the model)
    "host", "port", "device", "max_tokens", "max_tokens_ceiling", "batch_size", "request_timeout",
    "trust_remote_code",
    # train_kwargs (DSPy 2.4 / 3.x / TRL names of training options)
    "bsize", "accumsteps", "lr", "epochs", "bf16", "learning_rate", "num_train_epochs", "per_device_train_batch_size",
    "gradient_accumulation_steps", "max_seq_length", "max_length", "packing", "use_peft", "seed", "warmup_ratio",
    "weight_decay", "lr_scheduler_type", "lora_r", "lora_alpha", "lora_dropout",
})
"""Keys of an LM's `launch_kwargs` and `train_kwargs` whose values are shown; every other key's value is masked."""
_LM_STATE_PUBLIC = frozenset({"_dspy_lm_class"})
"""Private (`_`) parts of an LM's state that are shown: the class DSPy rebuilds it as."""
_LM_STATE_SHAPED = frozenset({"engine", "async_engine", "prompt_cache"})
"""Parts of an LM's state loading needs as they are (a custom engine's record): kept, URLs redacted."""
_LM_OPTION_PARTS = frozenset({"launch_kwargs", "train_kwargs"})


def redact_urls_deep(value: Any) -> Any:
    """`value` (JSON-like) with `redact_urls_in` applied to every string in it, dict keys included.

    >>> redact_urls_deep({"run": {"storage_path": "s3://k:s@b/r", "epochs": 2}, "tags": ["http://u:p@h"]})
    {'run': {'storage_path': 's3://***@b/r', 'epochs': 2}, 'tags': ['http://***@h']}
    """
    if isinstance(value, str):
        return redact_urls_in(value)
    if isinstance(value, dict):
        return {redact_urls_deep(k): redact_urls_deep(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_urls_deep(v) for v in value]
    return value


def public_options(options: dict[str, Any], public: frozenset[str]) -> dict[str, Any]:
    """Options as they may be shown: values of `public` keys kept (URLs redacted), the rest masked."""
    return {k: redact_urls_deep(v) if k in public else _masked(v) for k, v in options.items()}


def public_lm_state(state: dict[str, Any]) -> dict[str, Any]:
    """An LM's `dump_state()` as program.json may hold it: `public_lm_args` on its arguments, the allow-list
    `LM_OPTION_PUBLIC_ARGS` inside `launch_kwargs` and `train_kwargs`, the engine's record kept in shape
    with URLs redacted, and every private (`_`) part but the LM's class masked.

    >>> public_lm_state({"_dspy_lm_class": "dspy.LM", "model": "openai/x", "extra_headers": {"A": "b"},
    ...                  "engine": {"source": "s3://k:s@b/m"}, "train_kwargs": {"lr": 1e-4, "hf_token": "t"}})
    {'_dspy_lm_class': 'dspy.LM', 'model': 'openai/x', 'extra_headers': {'A': '***'}, \
'engine': {'source': 's3://***@b/m'}, 'train_kwargs': {'lr': 0.0001, 'hf_token': '***'}}
    """
    parts = _LM_STATE_SHAPED | _LM_OPTION_PARTS
    args = public_lm_args({k: v for k, v in state.items() if not k.startswith("_") and k not in parts})
    shown: dict[str, Any] = {}
    for name, value in state.items():
        if name in args:
            shown[name] = args[name]
        elif name in _LM_OPTION_PARTS and isinstance(value, dict):
            shown[name] = public_options(value, LM_OPTION_PUBLIC_ARGS)
        elif name in _LM_STATE_SHAPED or name in _LM_STATE_PUBLIC:
            shown[name] = redact_urls_deep(value)
        else:
            shown[name] = _masked(value)
    return shown


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [s for v in value for s in _strings(v)]
    return []


def _url_secrets(url: str) -> list[str]:
    """The user info of a URL (whole, and its user and password, as written and decoded) and its query values."""
    scheme, userinfo, rest = split_userinfo(url)
    found = []
    if userinfo:
        user, _, password = userinfo.partition(":")
        found = [userinfo, user, password, unquote(userinfo), unquote(user), unquote(password)]
    try:
        query = urlsplit(scheme + rest).query
    except ValueError:
        return found
    return found + [v for k, v in parse_qsl(query) if k not in PUBLIC_QUERY_NAMES]


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
    secrets.update(env_secrets())
    return sorted((s for s in secrets if len(s) >= 6), key=len, reverse=True)


def env_secrets() -> set[str]:
    """Values of environment variables named like secrets (`*KEY*`, `*TOKEN*`, `*SECRET*`, ...), 6 characters or more."""
    return {value for name, value in os.environ.items() if _SECRET_ENV.search(name) and len(value) >= 6}


_SECRET_FLAG = re.compile(r"key|token|secret|passw|auth|header|cookie|credential|bearer", re.I)
_PLAIN_ARG = re.compile(r"[\w.,:/+=@%~-]{1,200}")
_CREDENTIAL_SHAPE = re.compile(r"(^|[=:])(sk-|sk_|AKIA|ASIA|ghp_|gho_|github_pat_|xox[abpr]-|hf_|AIza|eyJ)"
                               r"|[A-Za-z0-9+_-]{32,}")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _public_arg(value: str, flag: str | None, secrets: set[str]) -> str:
    """One command-line value as `public_command` shows it."""
    if (flag is not None and _SECRET_FLAG.search(flag)) or value in secrets:
        return MASK
    if "://" in value:
        return redact_url(value)
    name, eq, rest = value.partition("=")
    if eq and _SECRET_FLAG.search(name):  # `api_key=...` handed to a script's own parser
        return f"{name}={MASK}"
    if _NUMBER.fullmatch(value) or (_PLAIN_ARG.fullmatch(value) and not _CREDENTIAL_SHAPE.search(value)):
        return value
    return MASK


def public_command(argv: list[str]) -> str:
    """A command line as it may be shown to others (the run lock names its writer by it): an allow-list.

    The program's file name and every flag's name are shown. A value (a flag's, or a positional one) is
    shown only when it is a number, or a plain word or path (letters, digits, `._-/:,=+@%~`) that does
    not look like a credential (`sk-...`, `AKIA...`, `hf_...`, a run of 32 letters and digits); a URL
    through `redact_url`. The value of a flag named like a secret (`--api-key`, `--token`, `-H`/`--header`
    are masked whole, with anything that has a space), and any value an environment variable named like a
    secret holds, is masked.

    >>> public_command(["train.py", "--api-key", "sk-0123456789", "--lr=1e-4", "-H", "Authorization: Bearer x"])
    'train.py --api-key *** --lr=1e-4 -H ***'
    """
    secrets = env_secrets()
    shown = [os.path.basename(argv[0])] if argv else []
    flag: str | None = None
    for token in argv[1:]:
        if token.startswith("-") and len(token) > 1 and not _NUMBER.fullmatch(token):
            name, eq, value = token.partition("=")
            shown.append(name + (eq + _public_arg(value, name, secrets) if eq else ""))
            flag = None if eq else name
            continue
        shown.append(_public_arg(token, flag, secrets))
        flag = None
    return " ".join(shown)


def redact(text: str, secrets: list[str]) -> str:
    """Replaces every secret in text by `***`, and masks the credentials of every URL in it.

    >>> redact("401: key sk-abcdef rejected", ["sk-abcdef"])
    '401: key *** rejected'
    """
    for secret in secrets:
        text = text.replace(secret, MASK)
    return redact_urls_in(text)
