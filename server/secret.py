"""``Secret``: a configured secret that never prints itself (settings, logs, tracebacks)."""

from __future__ import annotations

import hmac


class Secret:
    """A configured secret. ``str`` and ``repr`` show ``********`` (so ``learnloop config``, logs
    and tracebacks never print it); ``reveal()`` gives the value to the one place that needs it.

    Not a ``str`` subclass on purpose: ``json.dumps`` and f-strings would print a subclass's value.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __str__(self) -> str:
        return "********"

    def __repr__(self) -> str:
        return "Secret('********')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)
