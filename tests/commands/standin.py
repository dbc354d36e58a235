"""A stand-in for an operator command (Fabric Manager's fmpm, a GPU wipe tool) in tests.

    python tests/commands/standin.py CALLS ACTION [ARG...]

Appends ``{"action": ACTION, "args": [...]}`` to the JSON-lines file CALLS,
then exits 1 with the contents of ``fail-ACTION`` (next to CALLS) on stderr
when that file exists, else 0. Tests tell it to fail by creating the file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    calls, action, args = Path(argv[0]), argv[1], argv[2:]
    with calls.open("a", encoding="utf-8") as log:
        log.write(json.dumps({"action": action, "args": args}) + "\n")
    failure = calls.parent / f"fail-{action}"
    if failure.exists():
        print(failure.read_text(encoding="utf-8"), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
