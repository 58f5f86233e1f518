"""``sipedge cluster status``: members, leases and profile homes, read from the engine itself.

No running node is needed: the command connects to the engine named by ``[cluster]`` of the config,
reads both membership buckets (the last entry of every key, one watch each) and times one round trip.
Lease age and time left come from the engine's timestamp of each node's last renewal against this
machine's clock (so they carry the clock offset between the two; NTP keeps it to milliseconds).
A home is *valid* while its holder's lease with that epoch lives; a stale one is taken over by a
survivor (or by the next acquire) -- see docs/cluster.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any, TextIO

import msgspec

from .membership import NAMESPACE, Home, NodeLease, last_entries


class MemberView(msgspec.Struct):
    node: str
    epoch: str
    started_at: float
    sip: list[str]
    api: str
    renewed_at: float | None       # unix seconds, the engine's clock: when it stored the last renewal
    lease_age: float | None        # seconds since then (this machine's clock)
    lease_left: float | None       # seconds until the engine ages the lease out unless renewed
    profiles: int                  # valid homes it holds


class HomeView(msgspec.Struct):
    profile: str
    node: str
    epoch: str
    since: float
    generation: int                # handovers so far + 1
    valid: bool                    # the holder's lease with this epoch lives


class ReplicaView(msgspec.Struct):
    server: str
    current: bool                  # caught up with the leader
    lag: int                       # operations behind the leader
    active_seconds: float | None   # since the leader last heard from it
    offline: bool


class StreamView(msgspec.Struct):
    name: str                      # KV_<namespace>_nodes / _homes
    leader: str                    # the member that orders its writes (its loss pauses them: an election)
    replicas: list[ReplicaView]    # the followers


class EngineView(msgspec.Struct):
    servers: list[str]
    connected: bool
    connected_url: str
    rtt_seconds: float
    replicas: int


class ChannelsView(msgspec.Struct):
    profile: str
    open: int                      # reservations open in the profile's journal, across the cluster
    holders: dict[str, int]        # "<node>.<epoch>" -> its open reservations


class ClusterSnapshot(msgspec.Struct):
    taken_at: float
    namespace: str
    lease_seconds: float | None    # the lease bucket's ttl (None: no node joined yet)
    members: list[MemberView]
    homes: list[HomeView]
    stale_homes: int
    engine: EngineView
    streams: list[StreamView]
    channels: list[ChannelsView] = []   # with --profiles: every profile a node ever reserved for


async def _channels(engine: Any, namespace: str) -> list[ChannelsView]:
    """Open reservations per profile, folded from the journals of the profiles in the holders' index."""
    from nats.js.errors import BucketNotFoundError, NoKeysError

    from .journal import ProfileJournal

    try:
        keys = await (await engine.js.key_value(f"{namespace}_reserved")).keys()
    except (BucketNotFoundError, NoKeysError):
        return []
    views = []
    for profile in sorted({key.split(".")[2] for key in keys if key.count(".") == 2}):
        journal = await ProfileJournal.open(engine, profile, snapshot=True)
        holders: dict[str, int] = {}
        for call in journal.state.calls.values():
            holders[call.node] = holders.get(call.node, 0) + 1
        views.append(ChannelsView(profile=profile, open=journal.state.channels_in_use, holders=holders))
    return views


async def _entries(js: Any, bucket: str, timeout: float) -> list[Any] | None:
    """The last entry of every key of ``bucket`` (None: the bucket does not exist yet)."""
    from nats.js.errors import BucketNotFoundError

    try:
        kv = await js.key_value(bucket)
    except BucketNotFoundError:
        return None
    return await last_entries(kv, timeout=timeout)


async def collect(cluster: Any, *, namespace: str = NAMESPACE, timeout: float = 5.0,
                  channels: bool = False) -> ClusterSnapshot:
    from nats.js.errors import NotFoundError

    from .engine import Engine

    engine = await Engine.connect(cluster, name=f"sipedge-cli-{cluster.node or 'status'}", connect_timeout=2,
                                  wait=timeout)
    try:
        rtt = await engine.round_trip()
        nodes = await _entries(engine.js, f"{namespace}_nodes", timeout)
        homes = await _entries(engine.js, f"{namespace}_homes", timeout)
        ttl = None
        if nodes is not None:
            ttl = (await (await engine.js.key_value(f"{namespace}_nodes")).status()).ttl
        now = time.time()
        members: list[MemberView] = []
        for entry in nodes or []:
            lease = msgspec.json.decode(entry.value or b"", type=NodeLease)
            renewed = entry.created.timestamp() if entry.created is not None else None
            age = now - renewed if renewed is not None else None
            left = max(0.0, ttl - age) if ttl and age is not None else None
            members.append(MemberView(node=lease.node, epoch=lease.epoch, started_at=lease.started_at, sip=lease.sip,
                                      api=lease.api, renewed_at=renewed, lease_age=age, lease_left=left, profiles=0))
        alive = {(m.node, m.epoch): m for m in members}
        newest: dict[str, tuple[int, Home]] = {}     # home.<profile>.<generation>: the highest counts
        for entry in homes or []:
            parts = entry.key.split(".")
            if len(parts) != 3 or not parts[2].isdigit():
                continue
            gen = int(parts[2])
            if gen > newest.get(parts[1], (0, None))[0]:
                newest[parts[1]] = (gen, msgspec.json.decode(entry.value or b"", type=Home))
        views = []
        for profile, (gen, home) in newest.items():
            holder = alive.get(home.holder)
            if holder is not None:
                holder.profiles += 1
            views.append(HomeView(profile=profile, node=home.node, epoch=home.epoch, since=home.since,
                                  generation=gen, valid=holder is not None))
        streams = []
        for kind in ("nodes", "homes"):
            name = f"KV_{namespace}_{kind}"
            try:
                si = await engine.js.stream_info(name)
            except NotFoundError:
                continue
            c = si.cluster
            streams.append(StreamView(name=name, leader=(c.leader if c else None) or "", replicas=[
                ReplicaView(server=r.name or "", current=bool(r.current), lag=r.lag or 0, offline=bool(r.offline),
                            active_seconds=r.active / 1e9 if r.active is not None else None)
                for r in ((c.replicas or []) if c else [])]))
        url = engine.nc.connected_url
        return ClusterSnapshot(
            taken_at=now, namespace=namespace, lease_seconds=ttl,
            members=sorted(members, key=lambda m: m.node), homes=sorted(views, key=lambda h: h.profile),
            stale_homes=sum(1 for h in views if not h.valid),
            engine=EngineView(servers=list(cluster.engine), connected=engine.connected,
                              connected_url=f"{url.scheme}://{url.netloc}" if url else "", rtt_seconds=rtt,
                              replicas=engine.replicas),
            streams=streams, channels=await _channels(engine, namespace) if channels else [])
    finally:
        await engine.close()


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def render(snap: ClusterSnapshot, out: TextIO, *, profiles: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out, width=None if out.isatty() else 250, highlight=False, soft_wrap=False)
    e = snap.engine
    console.print(f"engine  {e.connected_url or 'not connected'} of {len(e.servers)} named, {e.replicas} replicas, "
                  f"round trip {e.rtt_seconds * 1000:.2f} ms; lease {_secs(snap.lease_seconds)}")
    if snap.lease_seconds is None:
        console.print(f"(no node has joined: bucket {snap.namespace}_nodes does not exist yet)")
    members = Table(title=None, box=None, header_style="bold", pad_edge=False)
    for col in ("NODE", "EPOCH", "LEASE AGE", "LEASE LEFT", "PROFILES", "SIP", "API", "UP"):
        members.add_column(col, no_wrap=True, justify="right" if col in ("LEASE AGE", "LEASE LEFT", "PROFILES")
                           else "left")
    for m in snap.members:
        members.add_row(m.node, m.epoch, _secs(m.lease_age), _secs(m.lease_left), str(m.profiles), ", ".join(m.sip),
                        m.api, _secs(snap.taken_at - m.started_at))
    console.print(members)
    if not snap.members:
        console.print("(no members)")
    for st in snap.streams:
        followers = ", ".join(f"{r.server} {'current' if r.current else 'BEHIND'} lag {r.lag}"
                              + (" OFFLINE" if r.offline else "") for r in st.replicas)
        console.print(f"stream  {st.name}: leader {st.leader or 'NONE'}; {followers or 'no followers'}")
    console.print(f"homes   {len(snap.homes)} profiles, {snap.stale_homes} stale (holder's lease ended; "
                  "taken over by a survivor or the next acquire)")
    if profiles and snap.homes:
        table = Table(box=None, header_style="bold", pad_edge=False)
        for col in ("PROFILE", "NODE", "EPOCH", "SINCE", "VALID"):
            table.add_column(col, no_wrap=True)
        for h in snap.homes:
            table.add_row(h.profile, h.node, h.epoch, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.since)),
                          "yes" if h.valid else "STALE")
        console.print(table)
    if profiles:
        console.print(f"channels {sum(c.open for c in snap.channels)} open across {len(snap.channels)} profiles "
                      "(reservations in the journals)")
        table = Table(box=None, header_style="bold", pad_edge=False)
        for col in ("PROFILE", "OPEN", "BY HOLDER (NODE.EPOCH)"):
            table.add_column(col, no_wrap=True, justify="right" if col == "OPEN" else "left")
        for c in snap.channels:
            table.add_row(c.profile, str(c.open), ", ".join(f"{h} {n}" for h, n in sorted(c.holders.items())))
        if snap.channels:
            console.print(table)


def register(sub: Any) -> argparse.ArgumentParser:
    """Add ``cluster status`` to ``sipedge``'s subparsers (``edge/cli.py``)."""
    parser = sub.add_parser("cluster", help="the cluster of nodes on the engine ([cluster]): members, leases, homes")
    actions = parser.add_subparsers(dest="action", required=True)
    status = actions.add_parser("status", help="members, their leases and profile homes, from the engine")
    status.add_argument("--config", help="TOML config file with [cluster] (default: $SIPEDGE_CONFIG, else "
                                         "/etc/sipedge/sipedge.toml)")
    status.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    status.add_argument("--profiles", action="store_true",
                        help="list the home of every profile and its channels open in the journal")
    status.add_argument("--namespace", default=NAMESPACE, help=argparse.SUPPRESS)   # tests: one engine, many
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the engine")
    status.set_defaults(fn=run)
    return parser


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Exit 0 with the snapshot; 2 for a config without [cluster]; 1 when the engine does not answer."""
    import logging

    from nats.errors import Error as NatsError

    from ..config import ConfigError, default_config_path, load
    from .engine import EngineUnavailable

    out = out or sys.stdout
    path = args.config or default_config_path()
    try:
        cfg = load(path)
    except ConfigError as exc:
        print(f"sipedge: invalid config: {exc}", file=sys.stderr)
        return 2
    if not cfg.cluster.enabled:
        print(f"sipedge: {path}: [cluster] engine is not set (this node runs alone)", file=sys.stderr)
        return 2
    logging.getLogger("sipedge.cluster").setLevel(logging.ERROR)   # a one-shot client: no reconnect chatter
    try:
        snap = asyncio.run(collect(cfg.cluster, namespace=args.namespace, timeout=args.timeout,
                                   channels=args.profiles))
    except EngineUnavailable as exc:
        print(f"sipedge: {exc}", file=sys.stderr)
        return 1
    except (TimeoutError, OSError, NatsError) as exc:
        print(f"sipedge: cluster engine: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        out.write(msgspec.json.format(msgspec.json.encode(snap), indent=2).decode() + "\n")
    else:
        render(snap, out, profiles=args.profiles)
    return 0
