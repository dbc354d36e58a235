"""What the daemon keeps across restarts, so that a restart never strands a device or a partition.

The state directory holds:

- ``quarantine/<device>.json``: the failed hand-off that put the device
  there. A file, so that it survives a restart and an operator can clear it
  without talking to the daemon (``vfio-mediator release`` removes it; the
  daemon notices at the device's next client);
- ``handoffs/<device>/<time>.json``: every hand-off;
- ``sessions/<device>.json``: a client is attached. Left behind by a daemon
  that died with a client, it makes the next start hand the device off as a
  recovery;
- ``owners.json``: the tenant each device was last handed to, so the hand-off
  after a config change names the tenant it takes the device from;
- ``fabric.json``: the active fabric partitions, so the next start
  deactivates what a dead daemon left active.

Files are written whole to a temporary name and renamed, so a crash never
leaves half a record. Without a state directory (a one-off ``serve``) all of
it lives in memory and records go to the log only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

QUARANTINE = "quarantine"
HANDOFFS = "handoffs"
SESSIONS = "sessions"
OWNERS = "owners.json"
FABRIC = "fabric.json"


class StateError(Exception):
    """The state directory cannot be used."""


class StateStore:
    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        # without a directory
        self._quarantined: dict[str, dict[str, Any]] = {}
        self._memory: dict[str, Any] = {OWNERS: {}, FABRIC: {"active": []}}

    def prepare(self) -> None:
        """Create the directory tree; raises StateError naming the path and the reason."""
        if self.directory is None:
            return
        for folder in (self.directory / QUARANTINE, self.directory / HANDOFFS, self.directory / SESSIONS):
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

    def keep_record(self, device: str, stamp: str, record: dict[str, Any]) -> Path | None:
        """Write a hand-off record; its path, or None without a state directory."""
        if self.directory is None:
            return None
        path = self.directory / HANDOFFS / device / f"{stamp}.json"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        _write(path, record)
        return path

    # sessions
    def session_started(self, device: str, client: dict[str, Any]) -> None:
        if self.directory is not None:
            _write(self.directory / SESSIONS / f"{device}.json", client)

    def session_ended(self, device: str) -> None:
        if self.directory is not None:
            (self.directory / SESSIONS / f"{device}.json").unlink(missing_ok=True)

    def left_sessions(self) -> dict[str, dict[str, Any]]:
        """Sessions a previous daemon did not end (it died with a client attached)."""
        if self.directory is None:
            return {}
        found = {}
        for path in (self.directory / SESSIONS).glob("*.json"):
            try:
                found[path.stem] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                found[path.stem] = {"unreadable": str(e)}
        return found

    # owners
    def owners(self) -> dict[str, str | None]:
        loaded = self._load(OWNERS, {})
        return {str(k): v if isinstance(v, str) else None for k, v in loaded.items()}

    def set_owner(self, device: str, tenant: str | None) -> None:
        owners = self.owners()
        if owners.get(device, "") != tenant:
            owners[device] = tenant
            self._store(OWNERS, owners)

    # fabric
    def fabric_active(self) -> list[int]:
        active = self._load(FABRIC, {}).get("active", [])
        return sorted(p for p in active if isinstance(p, int)) if isinstance(active, list) else []

    def set_fabric_active(self, partitions: list[int]) -> None:
        self._store(FABRIC, {"active": sorted(partitions)})

    def _load(self, name: str, empty: dict[str, Any]) -> dict[str, Any]:
        if self.directory is None:
            return dict(self._memory[name])
        try:
            loaded = json.loads((self.directory / name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return empty
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StateError(f"{self.directory / name} is unreadable ({e}); fix or remove it") from None
        return loaded if isinstance(loaded, dict) else empty

    def _store(self, name: str, document: dict[str, Any]) -> None:
        if self.directory is None:
            self._memory[name] = document
        else:
            _write(self.directory / name, document)


def _write(path: Path, document: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, path)
