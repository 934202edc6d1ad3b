"""The command-line flags of the configuration, generated from its fields (`bootfinetune.config`).

Each `Config` field is a `--flag` with the field's docstring as its help: `--zero-stage 3`,
`--bf16/--no-bf16`, `--lora-target-modules q_proj,v_proj`, `--resources-per-worker '{"A100": 1}'`.
The `bootfinetune` command and the demo build theirs with `add_config_arguments`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any, Callable, Literal

from bootfinetune.config import FIELD_HELP, FIELD_TYPES, FIELDS


def _str_or_list(text: str) -> str | list[str]:
    """A flag's value for `str | list[str]`: "a,b" is a list, "all-linear" a string."""
    return [part.strip() for part in text.split(",")] if "," in text else text


def _mapping(text: str) -> Any:
    """A flag's value for a mapping option: JSON, e.g. '{"A100": 1}' (what is not JSON is left for the checks)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def add_config_arguments(parser: argparse.ArgumentParser, names: list[str] | None = None, *,
                         defaults: dict[str, Any] | None = None,
                         aliases: dict[str, tuple[str, ...]] | None = None) -> None:
    """Adds a `--flag` per config field (`--zero-stage 3`, `--bf16/--no-bf16`), its help the field's docstring.

    A flag left out is absent from the parsed namespace (the config's default applies), unless
    `defaults` gives the caller's own default for it; `config_arguments` picks the given ones.

    Args:
        parser: The parser (or argument group) to add to.
        names: The fields to expose (default: every field).
        defaults: The caller's own defaults, e.g. the demo's {"epochs": 10}.
        aliases: Extra flag names per field, e.g. {"storage_path": ("--storage",)}.
    """
    defaults, aliases = defaults or {}, aliases or {}
    for name in names or list(FIELDS):
        hint = FIELD_TYPES[name]
        args = typing.get_args(hint)
        kwargs: dict[str, Any] = {"dest": name, "default": defaults.get(name, argparse.SUPPRESS)}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is Literal:
            kwargs.update(type=_literal_type(args), choices=list(args))
        elif hint in (int, float):
            kwargs["type"] = hint
        elif float in args:  # float | None
            kwargs["type"] = float
        elif int in args:  # int | None
            kwargs["type"] = int
        elif list[str] in args:
            kwargs["type"] = _str_or_list
        elif any(typing.get_origin(a) is dict for a in args):
            kwargs["type"] = _mapping
        shown = defaults[name] if name in defaults else _default_of(name)
        kwargs["help"] = f"{FIELD_HELP.get(name, '')} (default: {shown})".replace("%", "%%")
        parser.add_argument(f"--{name.replace('_', '-')}", *aliases.get(name, ()), **kwargs)


def _literal_type(choices: tuple) -> Callable[[str], Any]:
    """The flag's converter: the choices' type, or for mixed choices ("auto", 0, 1...) digits as int and,
    where True/False are choices, "true"/"false" as bools."""
    if len({type(c) for c in choices}) == 1:
        return type(choices[0])
    if any(isinstance(c, bool) for c in choices):
        return lambda text: {"true": True, "false": False}.get(text.lower(), text)
    return lambda text: int(text) if text.lstrip("-").isdigit() else text


def _default_of(name: str) -> Any:
    f = FIELDS[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def config_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The config options a parsed namespace holds (those given, or defaulted by the caller)."""
    return {k: v for k, v in vars(args).items() if k in FIELDS}
