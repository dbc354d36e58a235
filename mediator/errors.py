"""Errors about untrusted input: files (profiles, quirk tables, configs) and client requests.

Every file error names the file and the place in it (a key path such as
``quirk[3].match.vendor`` or ``line 12``) so that one line tells an operator
what to fix. Callers collect them and print one per line; nothing about bad
input should ever surface as a traceback. A request a client may not make,
or that the device cannot carry out, is ``Refused`` with the errno the client
gets; the layers that refuse (the protocol, the virtual device) subclass it.
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


class Refused(Exception):
    """A client's request refused; ``errno`` is what the client is told, the message what the log says."""

    def __init__(self, errno_value: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_value
