"""The device under test: sipedge's RelayEngine in its own process.

usage: python -m bench.rtp.engine_relay PORT_MIN PORT_MAX N GEN_A GEN_B K [--srtp]
Creates N relays, sets each leg's remote like the B2BUA would from SDP, prints
one JSON line {"ports": [[a, b], ...], "pid": ...}, then runs until stdin closes
and prints the engine totals as JSON.

``--srtp``: leg a speaks SRTP (AES_CM_128_HMAC_SHA1_80) as the B2BUA sets it up from SDES:
it unprotects with the key of :func:`offer_key` and protects with a key of its own, printed
per call as "keys" (hex) for the load generator; leg b stays plain RTP.
"""
import hashlib
import json
import os
import resource
import sys

from edge._rtp import RelayEngine

SUITE = "AES_CM_128_HMAC_SHA1_80"


def offer_key(call: int) -> bytes:
    """The master key + salt side A "offers" for ``call`` (the same for every relay in the bench)."""
    return hashlib.sha256(b"bench-srtp-a-%d" % call).digest()[:30]


def main() -> None:
    pmin, pmax, n, ga, gb, k = (int(x) for x in sys.argv[1:7])
    srtp = "--srtp" in sys.argv[7:]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    eng = RelayEngine("127.0.0.1", pmin, pmax, quiet_period=0.0, timeout=60.0)
    eng.start()
    ports, keys = [], []
    for i in range(n):
        r = eng.create(f"bench-{i}")
        r.set_remote("a", "127.0.0.1", ga + i % k)
        r.set_remote("b", "127.0.0.1", gb + i % k)
        if srtp:
            own = os.urandom(30)
            r.set_srtp("a", rx=(SUITE, offer_key(i)), tx=(SUITE, own))
            keys.append(own.hex())
        ports.append([r.leg_a.rtp_port, r.leg_b.rtp_port])
    print(json.dumps({"ports": ports, "keys": keys}), flush=True)
    sys.stdin.read()                       # until the bench closes our stdin
    t = eng.totals()
    eng.stop()
    print(json.dumps(t), flush=True)


if __name__ == "__main__":
    main()
