"""Who may call a model server: an API key, sent as OpenAI clients send theirs (`Authorization: Bearer <key>`).

One rule for every server bootfinetune starts (`serve.ChatServer` and what builds on it, `bootfinetune serve`
on Ray Serve): a server listening beyond this machine (a host other than loopback) needs a key, or to be told
`insecure` in so many words (`exposure_problem`). With a key, every route but `/health` answers 401, saying
nothing else, to a request without it. The key itself is kept only as its SHA-256 digest and compared in
constant time (`KeyCheck`), so it is in no server's state, log line or Ray Serve deployment argument.

    check = KeyCheck.of(key_from(args.api_key))          # None: no key asked for
    if check and not check.allows(headers.get("authorization")): ...   # 401
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os

from starlette.responses import JSONResponse

from bootfinetune.errors import ConfigError

API_KEY_ENV = "BOOTFINETUNE_API_KEY"
"""The environment variable a server's key is read from when `--api-key` is not given (keeps it out of argv)."""
OPEN_PATHS = frozenset({"/health", "/v1/health"})
"""Routes answered without a key (a load balancer's probe; they say nothing but "ok")."""


def key_from(given: str | None) -> str | None:
    """The server's key: `given`, else `$BOOTFINETUNE_API_KEY`, else None (an empty value counts as unset)."""
    return given or os.environ.get(API_KEY_ENV) or None


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only: `localhost`, 127.0.0.0/8 or ::1.

    >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0"), is_loopback("::")
    (True, True, False, False)
    """
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_problem(host: str, api_key: str | None, insecure: bool) -> str | None:
    """Why a server on `host` must not start (off loopback, no key, not told `insecure`), or None."""
    if api_key or insecure or is_loopback(host):
        return None
    return (f"host={host!r} serves beyond this machine, and no api_key is set: anyone who reaches the port could "
            f"use the models. Give a key (--api-key, or the {API_KEY_ENV} environment variable; clients send "
            f"'Authorization: Bearer <key>', as OpenAI clients do with api_key=...), or pass --insecure "
            f"(insecure=True) to serve without one.")


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """Raises `ConfigError` (`exposure_problem`) before a server binds, when it must not start."""
    problem = exposure_problem(host, api_key, insecure)
    if problem:
        raise ConfigError(problem)


def digest(key: str) -> str:
    """The SHA-256 of a key (hex): what a server keeps of it."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class KeyCheck:
    """Whether a request's `Authorization` header carries the key whose digest this holds."""

    def __init__(self, key_digest: str):
        self.key_digest = key_digest

    @classmethod
    def of(cls, key: str | None) -> "KeyCheck | None":
        """A check for `key`, or None when there is no key (every request is let through)."""
        return cls(digest(key)) if key else None

    def allows(self, authorization: str | None) -> bool:
        """True for `Bearer <the key>` (the scheme's case does not matter); compared in constant time."""
        scheme, _, token = (authorization or "").partition(" ")
        given = digest(token.strip()) if scheme.lower() == "bearer" else "0" * 64
        return hmac.compare_digest(given.encode(), self.key_digest.encode())


def unauthorized() -> JSONResponse:
    """The 401 a request without the key gets: nothing about the server, the key or the route."""
    return JSONResponse({"error": {"message": "unauthorized", "type": "authentication_error"}}, status_code=401,
                        headers={"WWW-Authenticate": "Bearer"})
