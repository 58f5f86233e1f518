from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from edgeproc import EdgeProcess


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory):
    """One real ``sipedge serve`` per test module."""
    with EdgeProcess(tmp_path_factory.mktemp("edge")) as proc:
        yield proc


@pytest.fixture
def api(edge: EdgeProcess):
    with edge.client() as client:
        yield client


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Micro-benchmarks (``-m perf`` / ``tests/perf``) are opt-in: set SIPEDGE_PERF=1 to run them."""
    import os

    if os.environ.get("SIPEDGE_PERF") == "1":
        return
    skip = pytest.mark.skip(reason="perf benchmark: set SIPEDGE_PERF=1 (timed results never gate make test)")
    for item in items:
        if "perf" in item.keywords:
            item.add_marker(skip)

sys.path.insert(0, str(Path(__file__).parent / "sip"))


def _children(pid: int) -> list[tuple[int, str]]:
    """Live child processes of ``pid`` (from /proc): (pid, command)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append((int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]))
        except (OSError, IndexError, ValueError):
            continue
    return out


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Tests leave no process behind: a child still running now is killed and fails the run."""
    import os
    import signal

    # multiprocessing's own helpers (resource tracker, forkserver) end with the interpreter
    left = [(pid, cmd) for pid, cmd in _children(os.getpid()) if "from multiprocessing." not in cmd]
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if left:
        print("\nprocesses left behind by the tests (killed):", *(f"  {p} {c}" for p, c in left), sep="\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
