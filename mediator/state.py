"""What the daemon keeps across restarts, so that a restart never strands a device or a partition.

The state directory holds:

- ``quarantine/<device>.json``: the failed hand-off that put the device
  there. A file, so that it survives a restart and an operator can clear it
  without talking to the daemon (``vfio-mediator release`` removes it; the
  daemon notices at the device's next client);
- ``handoffs/<device>/<time>.json``: every hand-off, the time in UTC to the
  microsecond so that names sort as the hand-offs happened. After each one
  the device's records past the ``[handoff] keep`` limits (``Retention``:
  the newest N, younger than an age, or both) are removed; by default every
  record stays. Nothing else in the folder and nothing in ``quarantine/`` is
  ever removed;
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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

QUARANTINE = "quarantine"
HANDOFFS = "handoffs"
SESSIONS = "sessions"
OWNERS = "owners.json"
FABRIC = "fabric.json"
RECORD_STAMP = "%Y%m%dT%H%M%S.%fZ"  # a hand-off record's name: when it started, in UTC


@dataclass(frozen=True)
class Retention:
    """Which of a device's hand-off records stay; a record past either limit goes."""

    newest: int | None = None  # the newest N
    within: timedelta | None = None  # those that started no longer ago than this

    def expired(self, stamps: list[datetime], now: datetime) -> list[datetime]:
        """Of ``stamps`` (in order, oldest first), those past a limit."""
        gone = set(stamps[: -self.newest]) if self.newest is not None else set()
        if self.within is not None:
            gone |= {stamp for stamp in stamps if now - stamp > self.within}
        return sorted(gone)


KEEP_EVERY_RECORD = Retention()


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

    def keep_record(self, device: str, started: datetime, record: dict[str, Any]) -> Path | None:
        """Write the record of a hand-off that ``started`` (UTC); its path, or None without a state
        directory."""
        if self.directory is None:
            return None
        path = self.directory / HANDOFFS / device / f"{started.strftime(RECORD_STAMP)}.json"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        _write(path, record)
        return path

    def prune_records(self, device: str, retention: Retention, now: datetime) -> int:
        """Remove ``device``'s hand-off records past ``retention``'s limits, their ages counted to
        ``now``; how many went."""
        if self.directory is None or retention == KEEP_EVERY_RECORD:
            return 0
        records = self._records(device)
        expired = retention.expired(sorted(records), now)
        for stamp in expired:
            records[stamp].unlink(missing_ok=True)
        return len(expired)

    def records(self, device: str) -> list[dict[str, Any]]:
        """``device``'s readable hand-off records, oldest first."""
        if self.directory is None:
            return []
        found = []
        for _, path in sorted(self._records(device).items()):
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(loaded, dict):
                found.append(loaded)
        return found

    def _records(self, device: str) -> dict[datetime, Path]:
        """``device``'s hand-off records by when they started; files named otherwise are not ours."""
        assert self.directory is not None
        found = {}
        for path in (self.directory / HANDOFFS / device).glob("*.json"):
            try:
                stamp = datetime.strptime(path.stem, RECORD_STAMP).replace(tzinfo=UTC)
            except ValueError:
                continue
            found[stamp] = path
        return found

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
