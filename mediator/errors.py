"""Errors about untrusted input: profiles, quirk tables, config dumps.

Every such error names the file and the place in it (a key path such as
``quirk[3].match.vendor`` or ``line 12``) so that one line tells an operator
what to fix. Callers collect them and print one per line; nothing about bad
input should ever surface as a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class InputError(Exception):
    """One problem in one input file."""

    def __init__(self, source: str, where: str, message: str) -> None:
        super().__init__(f"{source}: {where}: {message}" if where else f"{source}: {message}")
        self.source = source
        self.where = where
        self.message = message


class InputErrors(Exception):
    """Every problem found in a set of inputs, reported together."""

    def __init__(self, errors: Iterable[InputError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))
