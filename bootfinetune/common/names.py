"""Safe folder names: the rule a model key's, an evaluation's and a run's folder name follows.

A model key is a predictor's name with `multitask=False` (`retrieve.predict`, `chains['a b']`, or
anything a dict attribute holds, `x/../../../../escaped` included), and it becomes a folder under
`data/`, `models/` and `checkpoints/`. `folder_names` maps keys to names that are safe as a folder
on any filesystem: a readable slug of `[A-Za-z0-9._-]`, no leading dot or dash, at most
`SLUG_LENGTH` characters, plus `-` and 8 hex digits of the key's sha256 when the slug differs
from the key or collides with another key's folder (compared case-insensitively, as macOS does).
A key that is already a safe name keeps it, so `all` and `answer.predict` stay as they were.
The run records the mapping (config.json's `folders`, each manifest's `folder`), and readers use
the record, never the rule.

    >>> folder_names(["all", "answer.predict", "x/../../escaped", "chains['a b']"])["answer.predict"]
    'answer.predict'
    >>> folder_names(["x/../../escaped"])["x/../../escaped"]
    'x-escaped-b32831bf'
"""

from __future__ import annotations

import hashlib
import re
from typing import Iterable

SLUG_LENGTH = 64
"""Longest readable part of a folder name (the hash suffix comes on top: 73 characters at most)."""
_SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def is_safe_name(name: str) -> bool:
    """Whether `name` can be a folder as it is: `[A-Za-z0-9._-]`, not starting with `.` or `-`, bounded.

    >>> is_safe_name("generate_answer.predict"), is_safe_name(".."), is_safe_name("a/b")
    (True, False, False)
    """
    return isinstance(name, str) and len(name) <= SLUG_LENGTH + 9 and _SAFE.fullmatch(name) is not None


NAME_RULE = (f"letters, digits, '.', '_' and '-', not starting with '.' or '-', at most {SLUG_LENGTH + 9} "
             f"characters")
"""`is_safe_name` in words, for the messages that refuse a name."""


def run_name_problem(name: object) -> str | None:
    """Why `name` cannot be a run name, or None: a run name follows the rule of model keys' folders
    (`is_safe_name`), since it is appended to the storage path (a folder, or a URI where `?`, `#`, `%`
    would change what it names).

    >>> run_name_problem("my-run_1"), run_name_problem("a?endpoint_override=evil:9000") is not None
    (None, True)
    """
    if is_safe_name(name):  # type: ignore[arg-type]
        return None
    shown = repr(name) if not isinstance(name, str) or len(name) <= 80 else repr(name[:80]) + "..."
    return (f"run_name={shown}: a run name is a folder name under storage_path: {NAME_RULE}; choose such a "
            f"name (or leave run_name unset: it is derived from the inputs).")


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def safe_name(name: str, taken: Iterable[str] = ()) -> str:
    """The folder name of `name`: itself when safe and free, else its slug with a hash of `name`.

    Args:
        name: A model key or an evaluation name (any string).
        taken: Folder names already given to other names (compared case-insensitively).

    >>> safe_name("all"), safe_name("a b"), safe_name("All", taken=["all"])
    ('all', 'a-b-c8687a08', 'All-a52ace42')
    """
    slug = re.sub(r"[-.]{2,}", "-", re.sub(r"[^A-Za-z0-9._-]+", "-", name))  # `x/../y` reads `x-y`
    slug = slug.lstrip(".-")[:SLUG_LENGTH].rstrip(".-") or "key"
    used = {t.lower() for t in taken}
    if slug == name and slug.lower() not in used:
        return slug
    folder = f"{slug}-{_digest(name)}"
    if folder.lower() in used:  # a name crafted to look like another's folder: the full hash tells them apart
        folder = f"{slug}-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()}"
    return folder


def folder_names(names: Iterable[str], recorded: dict[str, str] | None = None) -> dict[str, str]:
    """Name -> its folder for every name, in order, no two folders alike (see `safe_name`).

    Folders in `recorded` (what a run already holds) are kept; only names without one get one.
    """
    names = list(dict.fromkeys(names))
    folders: dict[str, str] = {k: v for k, v in (recorded or {}).items() if k in names}
    for name in names:
        if name not in folders:
            folders[name] = safe_name(name, taken=folders.values())
    return {name: folders[name] for name in names}


__all__ = ["NAME_RULE", "SLUG_LENGTH", "folder_names", "is_safe_name", "run_name_problem", "safe_name"]
