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
