"""Lint and types are part of the test suite (asyncpg's ``tests/test__sourcecode.py``).

ruff checks the whole tree with the settings in ``pyproject.toml``; mypy checks ``edge/``
and ``admin_api/`` (the compiled modules through their ``.pyi`` stubs, ``_rtp.pyi``
included). Either one failing fails ``make test``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> list[str]:
    exe = Path(sys.executable).with_name(name)
    if exe.exists():
        return [str(exe)]
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (it is in the [test] extra of pyproject.toml)")
    return [found]


def test_ruff() -> None:
    run = subprocess.run([*_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


def test_mypy() -> None:
    run = subprocess.run([*_tool("mypy"), "--no-incremental", "--config-file", "pyproject.toml"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr
