"""Teacher LMs as the CLI, the demo and the Ray jobs build them: a hosted model named by flags or
a job's `teacher:` mapping, or a scripted stand-in served by `bootfinetune.testing.teacher_server`.

Teacher calls are never cached by DSPy: a rerun that should not call the teacher again finds the
run's own traces instead (`bootfinetune.stages.traces`). The API key is read from the environment
variable the user names; neither the key nor its value is written anywhere.
"""

from __future__ import annotations

import os
from typing import Any

from bootfinetune.common.chat import LOCAL_API_KEY
from bootfinetune.config import DEFAULT_TEACHER_TIMEOUT
from bootfinetune.errors import ConfigError


SCRIPTED_MODEL = "openai/scripted-teacher"
"""The model name a scripted teacher's LM carries (the server answers any name)."""


def api_key_from(api_key_env: str | None, *, option: str = "api_key_env") -> str | None:
    """The value of the environment variable `api_key_env` names (None when it names none).

    Raises:
        ConfigError: the variable is named but not set; `option` is how the caller spells the setting.
    """
    if not api_key_env:
        return None
    key = os.environ.get(api_key_env)
    if not key:
        raise ConfigError(f"{option}: {api_key_env} is not set in the environment; set it there "
                          f"(export {api_key_env}=...) or name the variable that holds the key.")
    return key


def teacher_lm(model: str, *, api_base: str | None = None, api_key_env: str | None = None,
               default_key: str | None = None, option: str = "api_key_env",
               timeout: float | None = DEFAULT_TEACHER_TIMEOUT, **options: Any) -> Any:
    """A `dspy.LM` on a hosted (or any OpenAI-compatible) teacher model, uncached.

    Args:
        model: The LiteLLM model name, e.g. "openai/gpt-4o-mini".
        api_base: The endpoint's base URL; None for the provider's own.
        api_key_env: The name of the environment variable holding the API key.
        default_key: The key when no variable is named (None lets LiteLLM look for its own).
        option: How the caller spells `api_key_env` in an error (a flag, a YAML key).
        timeout: Seconds each attempt of a call may wait (None: the client's own default). With the LM's retries
            (`num_retries`, 3 by default) a call takes at most about (num_retries + 1) x timeout plus backoff.
        **options: More LM options (temperature, max_tokens, num_retries...).

    Raises:
        ConfigError: `api_key_env` names a variable that is not set.
    """
    import dspy

    key = api_key_from(api_key_env, option=option)
    return dspy.LM(model, api_base=api_base, api_key=key or default_key, cache=False,
                   **_with_timeout(timeout), **options)


def scripted_teacher_lm(url: str, *, timeout: float | None = DEFAULT_TEACHER_TIMEOUT, **options: Any) -> Any:
    """A `dspy.LM` on a scripted teacher server at `url` (`TeacherServer.url`), uncached."""
    import dspy

    return dspy.LM(SCRIPTED_MODEL, api_base=url, api_key=LOCAL_API_KEY, cache=False, **_with_timeout(timeout),
                   **options)


def _with_timeout(timeout: float | None) -> dict[str, float]:
    """`timeout=` for dspy.LM (which hands it to LiteLLM or lm15 as the read, write and pool timeouts)."""
    if timeout is None:
        return {}
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ConfigError(f"teacher timeout={timeout!r}: give a number of seconds > 0, e.g. 120.")
    return {"timeout": float(timeout)}
