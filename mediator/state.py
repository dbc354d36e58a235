"""What the daemon keeps across restarts: quarantined devices and hand-off records.

The state directory holds ``quarantine/<device>.json`` (the failed hand-off
that put the device there) and ``handoffs/<device>/<time>.json`` (every
hand-off). Quarantine is a file so that it survives a restart and so that an
operator can clear it without talking to the daemon: ``vfio-mediator
release`` removes the file, and the daemon notices at the device's next
client. Files are written whole to a temporary name and renamed, so a crash
never leaves half a record. Without a state directory (a one-off ``serve``)
quarantine lives in memory and records go to the log only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

QUARANTINE = "quarantine"
HANDOFFS = "handoffs"


class StateError(Exception):
    """The state directory cannot be used."""


class StateStore:
    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._quarantined: dict[str, dict[str, Any]] = {}  # without a directory

    def prepare(self) -> None:
        """Create the directory tree; raises StateError naming the path and the reason."""
        if self.directory is None:
            return
        for folder in (self.directory / QUARANTINE, self.directory / HANDOFFS):
            try:
                folder.mkdir(parents=True, exist_ok=True, mode=0o750)
            except OSError as e:
                raise StateError(f"cannot create {folder}: {e.strerror or e}") from None

    def quarantined(self, device: str) -> dict[str, Any] | None:
        """The record that put ``device`` in quarantine, or None when it is not there."""
        if self.directory is None:
            return self._quarantined.get(device)
        path = self.directory / QUARANTINE / f"{device}.json"
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            # Unreadable is still quarantined: only an operator's release clears it.
            return {"device": device, "unreadable": f"{path}: {e}"}
        return loaded if isinstance(loaded, dict) else {"device": device, "unreadable": str(path)}

    def quarantine(self, device: str, record: dict[str, Any]) -> None:
        if self.directory is None:
            self._quarantined[device] = record
            return
        _write(self.directory / QUARANTINE / f"{device}.json", record)

    def release(self, device: str) -> bool:
        """Take ``device`` out of quarantine; False when it was not there."""
        if self.directory is None:
            return self._quarantined.pop(device, None) is not None
        try:
            (self.directory / QUARANTINE / f"{device}.json").unlink()
        except FileNotFoundError:
            return False
        return True

    def quarantine_list(self) -> list[str]:
        if self.directory is None:
            return sorted(self._quarantined)
        return sorted(p.stem for p in (self.directory / QUARANTINE).glob("*.json"))

    def keep_record(self, device: str, stamp: str, record: dict[str, Any]) -> Path | None:
        """Write a hand-off record; its path, or None without a state directory."""
        if self.directory is None:
            return None
        path = self.directory / HANDOFFS / device / f"{stamp}.json"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        _write(path, record)
        return path


def _write(path: Path, document: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, path)
