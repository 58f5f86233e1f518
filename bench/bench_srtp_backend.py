"""What the crypto backend under libsrtp2 costs per packet: the relay's build vs the pylibsrtp wheel's.

    .venv/bin/python -m bench.bench_srtp_backend              # 65,000 packets per case, 3 repeats

The relay links the libsrtp2 that ``tools/build-libsrtp.sh`` built on OpenSSL, or, when it
could not, Debian's ``libsrtp2`` (built on NSS); ``sipedge --version`` says which. The
``pylibsrtp`` wheel (a test dependency) carries the same libsrtp2 API built on OpenSSL, as
rtpengine's SRTP uses OpenSSL: the reference. Both are driven here from Python, one packet per
call: the relay's through ``edge._rtp.SrtpContext`` (Cython, the relay's own ``srtp_apply``),
the other through cffi. Each figure includes its binding's call overhead (cffi's is the
larger). 172-byte G.711 RTP packets; protect
with a sender context, unprotect with a receiver context of the same key. Results:
``bench/results/srtp_backend.json``. CPU time of this process (``time.process_time``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import time
from pathlib import Path
from statistics import median
from typing import Any

SUITES = {"AES_CM_128_HMAC_SHA1_80": "SRTP_PROFILE_AES128_CM_SHA1_80",
          "AEAD_AES_128_GCM": "SRTP_PROFILE_AEAD_AES_128_GCM"}
KEY_LEN = {"AES_CM_128_HMAC_SHA1_80": 30, "AEAD_AES_128_GCM": 28}


def packets(n: int) -> list[bytes]:
    return [struct.pack("!BBHII", 0x80, 0, i & 0xFFFF, i * 160, 0x1234ABCD) + b"\xd5" * 160 for i in range(n)]


def per_packet(fn: Any, items: list[bytes]) -> float:
    started = time.process_time()
    for p in items:
        fn(p)
    return (time.process_time() - started) / len(items) * 1e6


def relay(suite: str, key: bytes, plain: list[bytes]) -> tuple[float, float]:
    from edge._rtp import SrtpContext

    tx, rx = SrtpContext(suite, key, inbound=False), SrtpContext(suite, key, inbound=True)
    protected = [tx.protect(p) for p in plain]
    tx = SrtpContext(suite, key, inbound=False)   # fresh: the replay window starts again
    return per_packet(tx.protect, plain), per_packet(rx.unprotect, protected)


def openssl(suite: str, key: bytes, plain: list[bytes]) -> tuple[float, float]:
    import pylibsrtp

    profile = getattr(pylibsrtp.Policy, SUITES[suite])

    def session(kind: int) -> Any:
        return pylibsrtp.Session(policy=pylibsrtp.Policy(key=key, ssrc_type=kind, srtp_profile=profile))

    tx, rx = session(pylibsrtp.Policy.SSRC_ANY_OUTBOUND), session(pylibsrtp.Policy.SSRC_ANY_INBOUND)
    protected = [tx.protect(p) for p in plain]
    tx = session(pylibsrtp.Policy.SSRC_ANY_OUTBOUND)
    return per_packet(tx.protect, plain), per_packet(rx.unprotect, protected)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packets", type=int, default=65_000, help="at most 65,000 (one sequence cycle)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output", default="srtp_backend.json", help="file name under bench/results")
    args = ap.parse_args()
    from edge._rtp import srtp_library

    library = srtp_library()
    plain = packets(min(args.packets, 65_000))   # one SSRC: stay inside one sequence-number cycle
    results: dict[str, Any] = {"relay_library": library, "packets": len(plain), "repeats": args.repeats,
                               "machine": platform.processor() or platform.machine(), "cases": {}}
    for suite in SUITES:
        key = os.urandom(KEY_LEN[suite])
        runs: dict[str, list[tuple[float, float]]] = {"relay": [], "pylibsrtp_openssl": []}
        for _ in range(args.repeats):
            runs["relay"].append(relay(suite, key, plain))
            runs["pylibsrtp_openssl"].append(openssl(suite, key, plain))
        case = {name: {"protect_us": round(median(r[0] for r in rs), 3),
                       "unprotect_us": round(median(r[1] for r in rs), 3)} for name, rs in runs.items()}
        results["cases"][suite] = case
        print(f"{suite}: protect {case['relay']['protect_us']:.2f} us (relay: {library}) vs "
              f"{case['pylibsrtp_openssl']['protect_us']:.2f} us (pylibsrtp, OpenSSL); unprotect "
              f"{case['relay']['unprotect_us']:.2f} vs {case['pylibsrtp_openssl']['unprotect_us']:.2f} us per packet")
    out = Path(__file__).parent / "results" / args.output
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
