"""Fabric partitions: chosen from tenancy, activated and released once, re-synced, fail closed."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from mediator.fabric import Fabric, FabricError
from mediator.settings import FabricSpec, PartitionSpec
from tests.support import StandIn

TENANTS = {"gpu0": "alice", "gpu1": "alice", "gpu2": "bob", "gpu3": "carol", "gpu4": "carol", "pcie": None}
PARTITIONS = [
    PartitionSpec(0, ["gpu0", "gpu1", "gpu2", "gpu3"]),
    PartitionSpec(1, ["gpu0", "gpu1"]),
    PartitionSpec(2, ["gpu2"]),
    PartitionSpec(3, ["gpu3", "gpu2"]),
]


def fabric(folder: Path, tenants: dict[str, str | None] = TENANTS) -> tuple[Fabric, StandIn]:
    fm = StandIn(folder)
    spec = FabricSpec(
        activate=fm.command("activate", "{partition}"),
        deactivate=fm.command("deactivate", "{partition}"),
        resync=fm.command("resync", "{partitions}"),
        partition=PARTITIONS,
    )
    return Fabric(spec, tenants), fm


def test_the_partition_is_the_one_holding_exactly_the_tenants_gpus(tmp_path: Path) -> None:
    fab, _ = fabric(tmp_path)
    assert fab.partition_for("gpu0") == 1
    assert fab.partition_for("gpu2") == 2
    assert fab.partition_for("gpu4") is None  # not on the fabric
    with pytest.raises(FabricError, match=r"no fabric partition holds exactly tenant carol's GPUs \(gpu3\)"):
        fab.partition_for("gpu3")
    no_tenant, _ = fabric(tmp_path, TENANTS | {"gpu1": None})
    with pytest.raises(FabricError, match="gpu1 has no tenant"):
        no_tenant.partition_for("gpu1")


def test_activated_by_the_first_gpu_and_deactivated_after_the_last(tmp_path: Path) -> None:
    fab, fm = fabric(tmp_path)
    assert fab.acquire("gpu0") == "partition 1 activated"
    assert fab.acquire("gpu1") == "partition 1 already active"
    assert fab.release("gpu0") == "partition 1 stays active for its other GPUs"
    assert fab.active == {1}
    assert fab.release("gpu1") == "partition 1 deactivated"
    assert fab.release("gpu1") == "no partition held"
    assert fm.calls() == [("activate", ["1"]), ("deactivate", ["1"])]
    assert fab.acquire("gpu4") == "not on the fabric"


def test_a_failed_activation_refuses_and_is_audited(tmp_path: Path) -> None:
    fab, fm = fabric(tmp_path)
    fm.fail("activate", "partition 1 is not supported")
    with capture_logs() as logs, pytest.raises(FabricError, match="partition 1 is not supported"):
        fab.acquire("gpu0")
    assert fab.active == set()
    call = next(e for e in logs if e["event"] == "operator command")
    assert call["purpose"] == "fabric activate" and call["partition"] == 1 and call["ok"] is False
    assert call["argv"][-2:] == ["activate", "1"] and "exit 1" in call["result"] and call["seconds"] >= 0


def test_a_failed_deactivation_keeps_the_partition_for_the_resync(tmp_path: Path) -> None:
    fab, fm = fabric(tmp_path)
    fab.acquire("gpu2")
    fm.fail("deactivate")
    with pytest.raises(FabricError, match="deactivate of partition 2 failed"):
        fab.release("gpu2")
    assert fab.active == {2}


def test_resync_sends_the_active_list_and_a_failure_stops_new_sessions(tmp_path: Path) -> None:
    fab, fm = fabric(tmp_path)
    fab.acquire("gpu0")
    fab.acquire("gpu2")
    assert fab.resync() == "active partitions set: 1,2"
    fm.fail("resync", "Fabric Manager is not running")
    with pytest.raises(FabricError, match="Fabric Manager is not running"):
        fab.resync()
    fab.release("gpu2")
    with pytest.raises(FabricError, match="out of sync"):
        fab.acquire("gpu2")
    fm.succeed("resync")
    assert fab.resync() == "active partitions set: 1"
    assert fab.acquire("gpu2") == "partition 2 activated"
    assert [c for c in fm.calls() if c[0] == "resync"] == [
        ("resync", ["1,2"]),
        ("resync", ["1,2"]),
        ("resync", ["1"]),
    ]
