"""What the benchmarks share: the C clients they build and the figures they print."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def build(folder: Path, *names: str) -> list[Path]:
    """Compile bench/NAME.c for each name into ``folder``; the binaries, in order."""
    binaries = []
    for name in names:
        binary = folder / name
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(HERE / f"{name}.c")], check=True)
        binaries.append(binary)
    return binaries


def number(pattern: str, text: str) -> float:
    """The figure ``pattern``'s group captures in a client's output."""
    found = re.search(pattern, text)
    if not found:
        raise SystemExit(f"unexpected output: {text!r}")
    return float(found.group(1))


def guest_figures(output: str) -> list[dict[str, Any]]:
    """The ``FIGURE {...}`` lines a guest half printed, which must end with ``{"case": "done"}``."""
    figures = [
        json.loads(line[len("FIGURE ") :]) for line in output.splitlines() if line.startswith("FIGURE ")
    ]
    if not figures or figures[-1].get("case") != "done":
        raise SystemExit(f"the guest did not finish:\n{output[-3000:]}")
    return figures
