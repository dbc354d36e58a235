"""The protocol fuzzer (fuzz/protocol.py) in CI: the committed corpus, a bounded session, the harness's teeth.

The harness runs in its own process, as it does for a long run: atheris
instruments ``mediator`` as it is imported, which must not happen to the
test process, and libFuzzer owns its process (it exits on a finding).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
FUZZ = ROOT / "fuzz"
CORPUS = FUZZ / "corpus" / "protocol"
# Long enough to run thousands of inputs on a slow CI machine, short enough for every run.
SESSION_SECONDS = 20


def fuzz(*arguments: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, FUZZ / "protocol.py", *map(str, arguments)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def executed(result: subprocess.CompletedProcess[str]) -> int:
    done = re.search(r"Done (\d+) runs", result.stderr)
    assert done, result.stderr[-3000:]
    return int(done.group(1))


def test_every_input_of_the_committed_corpus_passes() -> None:
    inputs = sorted(CORPUS.iterdir())
    assert len(inputs) >= 13  # the seeds of fuzz/seeds.py, at least
    result = fuzz(*inputs)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("Executed ") == len(inputs)


def test_a_bounded_fuzz_session_finds_nothing(tmp_path: Path) -> None:
    # New inputs go to tmp_path, the first directory: the committed corpus is read, never written.
    result = fuzz(
        tmp_path,
        CORPUS,
        f"-max_total_time={SESSION_SECONDS}",
        f"-artifact_prefix={tmp_path}/",
        timeout=SESSION_SECONDS + 120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert executed(result) > 1000


def test_the_seeds_are_what_seeds_py_writes(tmp_path: Path) -> None:
    """The seeds decode to the sessions they were written as (``Tape.encoded`` checks) and are committed."""
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"import pathlib, seeds; seeds.CORPUS = pathlib.Path({str(tmp_path)!r}); seeds.main()",
        ],
        cwd=FUZZ,
        check=True,
        timeout=120,
        env={"PYTHONPATH": f"{FUZZ}:{ROOT}"},
    )
    written = {path.name: path.read_bytes() for path in Path(tmp_path).iterdir()}
    assert written
    assert {name: (CORPUS / name).read_bytes() for name in written} == written


LEAKY_SERVICE = """
    import os, protocol
    from mediator.vfio_user.service import DeviceService
    handle = DeviceService.handle
    def leaking(self, request):
        os.dup(0)
        return handle(self, request)
    DeviceService.handle = leaking
    protocol.test_one_input(open({seed!r}, "rb").read())
"""
SWALLOWING_SERVICE = """
    import protocol
    from mediator.vfio_user.service import DeviceService
    def broken(self, request):
        raise KeyError("a bug")
    DeviceService._region_read = broken
    protocol.main()
"""


@pytest.mark.parametrize(
    ("harness", "finding"),
    [(LEAKY_SERVICE, "fds left open"), (SWALLOWING_SERVICE, "reached the last resort")],
    ids=["fd-leak", "last-resort-eio"],
)
def test_the_harness_reports_what_it_guards_against(harness: str, finding: str) -> None:
    seed = CORPUS / "seed-config"
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(harness).format(seed=str(seed)), "-runs=1", seed],
        cwd=FUZZ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PYTHONPATH": f"{FUZZ}:{ROOT}"},
    )
    assert result.returncode != 0
    assert finding in result.stdout + result.stderr, result.stdout[-3000:]
