"""The "did you mean" hint every refusal of an unknown name carries (options, job keys, teacher keys, paths).

    >>> did_you_mean("epoch", ["epochs", "lr"])
    " Did you mean 'epochs'?"
    >>> did_you_mean("zzz", ["epochs", "lr"])
    ''
"""

from __future__ import annotations

import difflib
from typing import Callable, Iterable


def did_you_mean(name: str, known: Iterable[str], shown: Callable[[str], str] = str) -> str:
    """" Did you mean X?" (X the closest of `known`, as `shown` writes it, quoted), or "" when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" Did you mean {shown(close[0])!r}?" if close else ""
