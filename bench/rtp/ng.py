"""Minimal rtpengine ng control protocol client: bencode over UDP.

A request is ``<cookie> <bencoded dict>``; the reply echoes the cookie.
Only offer / answer / delete / ping are used by the benchmark.
"""
from __future__ import annotations

import os
import socket


def bencode(x) -> bytes:
    if isinstance(x, bytes):
        return b"%d:%s" % (len(x), x)
    if isinstance(x, str):
        return bencode(x.encode())
    if isinstance(x, int):
        return b"i%de" % x
    if isinstance(x, list):
        return b"l" + b"".join(bencode(i) for i in x) + b"e"
    if isinstance(x, dict):
        return b"d" + b"".join(bencode(k) + bencode(v) for k, v in sorted(x.items())) + b"e"
    raise TypeError(type(x))


def bdecode(b: bytes):
    def dec(i: int):
        c = b[i:i + 1]
        if c == b"i":
            j = b.index(b"e", i)
            return int(b[i + 1:j]), j + 1
        if c in (b"l", b"d"):
            i += 1
            items = []
            while b[i:i + 1] != b"e":
                v, i = dec(i)
                items.append(v)
            if c == b"l":
                return items, i + 1
            return {items[k].decode(): items[k + 1] for k in range(0, len(items), 2)}, i + 1
        j = b.index(b":", i)
        n = int(b[i:j])
        return b[j + 1:j + 1 + n], j + 1 + n

    return dec(0)[0]


class NgClient:
    def __init__(self, addr: tuple[str, int], timeout: float = 2.0) -> None:
        self.addr = addr
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(timeout)

    def close(self) -> None:
        self.sock.close()

    def call(self, command: str, **kw) -> dict:
        cookie = os.urandom(6).hex().encode()
        msg = {"command": command}
        msg.update({k.replace("_", "-"): v for k, v in kw.items()})
        for _ in range(3):                      # bounded retries
            self.sock.sendto(cookie + b" " + bencode(msg), self.addr)
            try:
                while True:
                    data, _ = self.sock.recvfrom(65535)
                    ck, _, body = data.partition(b" ")
                    if ck == cookie:
                        reply = bdecode(body)
                        if reply.get("result") not in (b"ok", b"pong"):
                            raise RuntimeError(f"rtpengine {command}: {reply!r}")
                        return reply
            except TimeoutError:
                continue
        raise TimeoutError(f"rtpengine did not answer {command}")
