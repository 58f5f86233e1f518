"""The profiling tools of bench/ do what they say (no timing here: benches measure time)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench.bench_callpath import Rig, interleaved, measure
from bench.profile_serve import summarize_raw


def test_concurrent_calls_complete_and_interleave(tmp_path: Path) -> None:
    asyncio.run(_concurrent_calls(tmp_path))


async def _concurrent_calls(tmp_path: Path) -> None:
    rig = Rig(tmp_path)  # the node needs the running loop
    try:
        gens = []
        original = rig.call_steps

        def counted():  # type: ignore[no-untyped-def]
            steps = original()
            gens.append(steps)
            return steps

        rig.call_steps = counted  # type: ignore[method-assign]
        seen_live = 0
        for _ in interleaved(rig, calls=12, concurrent=4):
            seen_live = max(seen_live, len(rig.node.calls.calls))
        assert len(gens) == 12
        assert seen_live == 4          # four calls in progress at once, not one after the other
        assert not rig.node.calls.calls  # every call ended (BYE answered, settled)
    finally:
        rig.node.media.close()
        rig.store.close()


def test_measure_concurrent_leaves_no_live_call() -> None:
    out = asyncio.run(measure(10, 1, False, concurrent=5))
    assert out["calls_left_live"] == 0
    assert out["cpu_us_per_call"] > 0


def test_summarize_raw_own_and_inclusive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "spy.txt"
    raw.write_text("main (a.py:1);f (b.py:2);sendto (libc.so.6) 3\nmain (a.py:1);g (b.py:5) 1\nbroken line\n")
    summarize_raw(raw, top=5)
    out = capsys.readouterr().out
    assert "4 samples" in out
    assert " 75.0 %  sendto (libc.so.6)" in out      # own time: the leaf
    assert "100.0 %  main (a.py:1)" in out            # inclusive: on every stack
