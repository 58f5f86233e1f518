"""The device under test: sipedge's RelayEngine in its own process.

usage: python -m bench.rtp.engine_relay PORT_MIN PORT_MAX N GEN_A GEN_B K [--srtp[=SUITE]]
Creates N relays, sets each leg's remote like the B2BUA would from SDP, prints
one JSON line {"ports": [[a, b], ...], "pid": ...}, then runs until stdin closes
and prints the engine totals as JSON.

``--srtp``: leg a speaks SRTP (AES_CM_128_HMAC_SHA1_80, or SUITE) as the B2BUA sets it up from SDES:
it unprotects with the key of :func:`offer_key` and protects with a key of its own, printed
per call as "keys" (hex) for the load generator; leg b stays plain RTP.
"""
import hashlib
import json
import os
import resource
import sys

from edge._rtp import SRTP_SUITES, RelayEngine

SUITE = "AES_CM_128_HMAC_SHA1_80"


def offer_key(call: int, suite: str = SUITE) -> bytes:
    """The master key + salt side A "offers" for ``call`` (the same for every relay in the bench)."""
    return hashlib.sha256(b"bench-srtp-a-%d" % call).digest()[:SRTP_SUITES[suite]]


def main() -> None:
    pmin, pmax, n, ga, gb, k = (int(x) for x in sys.argv[1:7])
    flag = next((a for a in sys.argv[7:] if a.startswith("--srtp")), "")
    suite = flag.partition("=")[2] or SUITE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    eng = RelayEngine("127.0.0.1", pmin, pmax, quiet_period=0.0, timeout=60.0)
    eng.start()
    ports, keys = [], []
    for i in range(n):
        r = eng.create(f"bench-{i}")
        r.set_remote("a", "127.0.0.1", ga + i % k)
        r.set_remote("b", "127.0.0.1", gb + i % k)
        if flag:
            own = os.urandom(SRTP_SUITES[suite])
            r.set_srtp("a", rx=(suite, offer_key(i, suite)), tx=(suite, own))
            keys.append(own.hex())
        ports.append([r.leg_a.rtp_port, r.leg_b.rtp_port])
    print(json.dumps({"ports": ports, "keys": keys}), flush=True)
    sys.stdin.read()                       # until the bench closes our stdin
    t = eng.totals()
    eng.stop()
    print(json.dumps(t), flush=True)


if __name__ == "__main__":
    main()
