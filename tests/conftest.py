from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from edgeproc import EdgeProcess  # noqa: E402


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
