"""Coverage-guided fuzz target for the SIP parser (atheris; Kamailio ``fuzz_parse_msg.c``).

Not collected by pytest (no ``test_`` prefix).  Run manually::

    .venv/bin/pip install atheris
    .venv/bin/python tests/fuzz/fuzz_sipparse.py -max_total_time=300 -max_len=4096
    .venv/bin/python tests/fuzz/fuzz_sipparse.py --seeds-only     # replay the corpus once
    .venv/bin/python tests/fuzz/fuzz_sipparse.py crash-<sha>      # reproduce a finding

The corpus is seeded from ``tests/corpus/{valid,invalid}`` into ``tests/fuzz/work``
(git-ignored by the caller's choice; safe to delete).  The target asserts that only
``SipParseError`` escapes, touches every lazy accessor and ``validate()``, exercises the builders and
TCP framing, and compares the compiled parser with the Python oracle.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "unit"))

from test_sipparse_common import IMPLS, outcome  # noqa: E402

from edge.sip.errors import SipParseError  # noqa: E402

COMPARE_ORACLE = True


def one_input(data: bytes) -> None:
    results = {}
    for name, impl in IMPLS.items():
        results[name] = outcome(impl, data)  # any non-SipParseError exception is a finding
        try:
            msg = impl.parse(data)
        except SipParseError as err:
            impl.build_stateless_error(data, err)
        else:
            if msg.is_request:
                try:
                    impl.build_response(msg, 200, to_tag="t", received="192.0.2.1", rport=1)
                except SipParseError:
                    pass
        try:
            impl.frame_length(data)
        except SipParseError:
            pass
    if COMPARE_ORACLE and results["c"] != results["py"]:
        raise AssertionError(f"compiled and oracle disagree:\n{results['c']!r}\n{results['py']!r}")


def seed_dir() -> Path:
    work = HERE / "work"
    work.mkdir(exist_ok=True)
    for p in sorted((ROOT / "tests" / "corpus").glob("*/*.sip")):
        shutil.copy(p, work / f"{p.parent.name}-{p.name}")
    return work


def main() -> None:
    if "--seeds-only" in sys.argv:
        for p in sorted((ROOT / "tests" / "corpus").glob("*/*.sip")):
            one_input(p.read_bytes())
        print("corpus replay ok")
        return
    import atheris

    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):  # no corpus dir / crash file given
        argv.append(str(seed_dir()))
    atheris.instrument_all()
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
