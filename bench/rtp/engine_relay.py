"""The device under test: sipedge's RelayEngine in its own process.

usage: python -m bench.rtp.engine_relay PORT_MIN PORT_MAX N GEN_A GEN_B K
Creates N relays, sets each leg's remote like the B2BUA would from SDP, prints
one JSON line {"ports": [[a, b], ...], "pid": ...}, then runs until stdin closes
and prints the engine totals as JSON.
"""
import json
import resource
import sys

from edge._rtp import RelayEngine


def main() -> None:
    pmin, pmax, n, ga, gb, k = (int(x) for x in sys.argv[1:7])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    eng = RelayEngine("127.0.0.1", pmin, pmax, quiet_period=0.0, timeout=60.0)
    eng.start()
    ports = []
    for i in range(n):
        r = eng.create(f"bench-{i}")
        r.set_remote("a", "127.0.0.1", ga + i % k)
        r.set_remote("b", "127.0.0.1", gb + i % k)
        ports.append([r.leg_a.rtp_port, r.leg_b.rtp_port])
    print(json.dumps({"ports": ports}), flush=True)
    sys.stdin.read()                       # until the bench closes our stdin
    t = eng.totals()
    eng.stop()
    print(json.dumps(t), flush=True)


if __name__ == "__main__":
    main()
