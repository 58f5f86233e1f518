"""Network namespaces for tests: hosts, veth links, a 1:1 NAT, and a packet capture.

A :class:`Lab` makes its namespaces with ``ip netns add`` under a prefix of its own (the
pid: other test runs on the machine make theirs), links them with veth pairs created
directly inside them (nothing is ever added to the host's namespace), and deletes them
all in :meth:`Lab.close` -- a test uses it as a context manager, so a failure cleans up
too. :meth:`Lab.inside` moves the calling thread into a namespace for a while (setns(2)):
sockets made there belong to it, and a subprocess started there (``sipedge serve``, a
pjsua2 child) lives in it for good. :class:`Capture` records every frame a namespace
sends or receives (an ``AF_PACKET`` socket), so a test can prove which addresses a peer
ever saw.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsUnavailable(RuntimeError):
    """The kernel (or our privileges) refuse network namespaces: tests skip with this reason."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def ip(*args: str) -> None:
    """Run ``ip ARGS``; a failure raises with ip's own message."""
    run("ip", *args)


def run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def check_available() -> None:
    """Raise :class:`NetnsUnavailable` unless this process can make a namespace and a veth."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root")
    if shutil.which("ip") is None:
        raise NetnsUnavailable("iproute2 (ip) is not installed")
    probe = f"se{os.getpid()}-probe"
    try:
        ip("netns", "add", probe)
        ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
    except RuntimeError as exc:
        raise NetnsUnavailable(f"the kernel refuses network namespaces or veth: {exc}") from None
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)


class Lab:
    """Namespaces named ``se<pid>-<name>``, deleted by :meth:`close` (or on leaving ``with``)."""

    def __init__(self, tag: str = "") -> None:
        self.prefix = f"se{os.getpid()}{tag}"
        self.names: list[str] = []

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def host(self, name: str) -> str:
        """A new namespace with its loopback up; returns its full name."""
        full = f"{self.prefix}-{name}"
        subprocess.run(["ip", "netns", "del", full], capture_output=True, timeout=30)  # a leftover of a killed run
        ip("netns", "add", full)
        self.names.append(full)
        ip("-n", full, "link", "set", "lo", "up")
        return full

    def link(self, a: str, a_if: str, a_addrs: list[str], b: str, b_if: str, b_addrs: list[str]) -> None:
        """A veth pair between namespaces ``a`` and ``b``, with addresses (CIDR) on each end."""
        ip("link", "add", a_if, "netns", a, "type", "veth", "peer", "name", b_if, "netns", b)
        for ns, ifname, addrs in ((a, a_if, a_addrs), (b, b_if, b_addrs)):
            for addr in addrs:
                six = ":" in addr
                ip("-n", ns, *(["-6"] if six else []), "addr", "add", addr, "dev", ifname,
                   *(["nodad"] if six else []))  # no duplicate address detection: usable at once
            ip("-n", ns, "link", "set", ifname, "up")

    def route(self, ns: str, *args: str) -> None:
        ip("-n", ns, "route", "add", *args)

    def sysctl(self, ns: str, setting: str) -> None:
        run("ip", "netns", "exec", ns, "sysctl", "-q", "-w", setting)

    def nat_1to1(self, ns: str, public: str, private: str) -> None:
        """In ``ns`` (a router): ``public`` is ``private``, both ways (a cloud VM's 1:1 NAT)."""
        self.sysctl(ns, "net.ipv4.ip_forward=1")
        rules = (f"table ip nat {{\n"
                 f" chain pre {{ type nat hook prerouting priority -100; ip daddr {public} dnat to {private}; }}\n"
                 f" chain post {{ type nat hook postrouting priority 100; ip saddr {private} snat to {public}; }}\n"
                 f"}}\n")
        done = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, capture_output=True,
                              text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"nft: {done.stderr.strip()}")

    @contextmanager
    def inside(self, ns: str) -> Iterator[None]:
        """The calling thread is in ``ns`` until the block ends (then back where it was)."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(target)
            os.close(home)

    def close(self) -> None:
        for name in reversed(self.names):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self.names.clear()


class Packet:
    """One captured IP packet: addresses and the transport payload's bytes."""

    __slots__ = ("src", "dst", "proto", "data")

    def __init__(self, src: str, dst: str, proto: int, data: bytes) -> None:
        self.src, self.dst, self.proto, self.data = src, dst, proto, data

    def __repr__(self) -> str:
        return f"<Packet {self.src} -> {self.dst} proto {self.proto} {len(self.data)} bytes>"


def _decode(frame: bytes) -> Packet | None:
    if len(frame) < 14:
        return None
    ethertype = struct.unpack("!H", frame[12:14])[0]
    body = frame[14:]
    if ethertype == 0x0800 and len(body) >= 20:
        ihl = (body[0] & 0x0F) * 4
        return Packet(str(ipaddress.IPv4Address(body[12:16])), str(ipaddress.IPv4Address(body[16:20])), body[9],
                      body[ihl:])
    if ethertype == 0x86DD and len(body) >= 40:
        return Packet(str(ipaddress.IPv6Address(body[8:24])), str(ipaddress.IPv6Address(body[24:40])), body[6],
                      body[40:])
    return None  # ARP and friends carry no address a peer could use to reach us


class Capture:
    """Every IP packet seen on the interfaces of one namespace, from start to :meth:`stop`."""

    def __init__(self, lab: Lab, ns: str) -> None:
        with lab.inside(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.settimeout(0.2)
        self.packets: list[Packet] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name=f"capture-{ns}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                frame, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if addr[0] == "lo":
                continue  # the namespace talking to itself (the pjsua child's own sockets)
            packet = _decode(frame)
            if packet is not None:
                self.packets.append(packet)

    def stop(self) -> list[Packet]:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        return self.packets

    def addresses(self) -> set[str]:
        return {a for p in self.packets for a in (p.src, p.dst)}

    def containing(self, needle: bytes) -> list[Packet]:
        return [p for p in self.packets if needle in p.data]
