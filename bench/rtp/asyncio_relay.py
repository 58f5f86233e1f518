"""Peer (a): a plain asyncio DatagramProtocol relay, the 'pure Python' baseline.

usage: python -m bench.rtp.asyncio_relay BASE N GEN_A GEN_B K
Call i: port BASE+4i (A side) <-> BASE+4i+2 (B side), fixed destinations like
the C limit. Prints "ready", runs until stdin closes.
"""
import asyncio
import sys


class Leg(asyncio.DatagramProtocol):
    __slots__ = ("peer", "dest", "transport")

    def __init__(self, dest):
        self.dest = dest
        self.peer = None
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.peer.transport.sendto(data, self.dest)


async def main() -> None:
    base, n, ga, gb, k = (int(x) for x in sys.argv[1:6])
    loop = asyncio.get_running_loop()
    for i in range(n):
        a = Leg(("127.0.0.1", gb + i % k))    # received on A, sent out of B to gen B
        b = Leg(("127.0.0.1", ga + i % k))
        a.peer, b.peer = b, a
        await loop.create_datagram_endpoint(lambda a=a: a, local_addr=("127.0.0.1", base + 4 * i))
        await loop.create_datagram_endpoint(lambda b=b: b, local_addr=("127.0.0.1", base + 4 * i + 2))
    print("ready", flush=True)
    done = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), lambda: done.set() if not sys.stdin.readline() else None)
    await done.wait()


if __name__ == "__main__":
    asyncio.run(main())
