"""The TOML configuration, decoded into msgspec structs (SPEC §2).

Unknown keys are errors that name the key; values are checked here so that a broken
config stops ``sipedge serve`` before it binds anything.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Literal

import msgspec

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]

DEFAULT_CONFIG_PATH = "/etc/sipedge/sipedge.toml"  # SPEC §2.3; env SIPEDGE_CONFIG moves it


def default_config_path() -> str:
    """The config file used when ``--config`` is not given: ``$SIPEDGE_CONFIG`` or /etc/sipedge/sipedge.toml."""
    return os.environ.get("SIPEDGE_CONFIG") or DEFAULT_CONFIG_PATH


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class SipConfig(Section):
    listen: list[str] = msgspec.field(default_factory=lambda: ["udp:127.0.0.1:5060", "tcp:127.0.0.1:5060"])
    domain: str = "sip.edge.test"
    nonce_ttl: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 300
    # offered in this order (RFC 8760 §2.4: strongest first); old UAs (SIPp 3.6) may need ["MD5"]
    digest_algorithms: list[Literal["SHA-256", "MD5"]] = msgspec.field(default_factory=lambda: ["SHA-256", "MD5"])
    max_expires: Annotated[int, msgspec.Meta(ge=60)] = 3600
    min_expires: Annotated[int, msgspec.Meta(ge=1)] = 60
    tcp_max_connections: Annotated[int, msgspec.Meta(ge=1)] = 4096
    # a TCP message must complete from its first octet: head, then body (Kamailio tcp_msg_read_timeout)
    tcp_header_timeout: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    tcp_body_timeout: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    setup_timeout: Annotated[float, msgspec.Meta(gt=0)] = 180.0  # seconds a call may ring (RFC 3261 Timer C)
    # flood protection (SPEC §7); trusted carrier sources are exempt
    rate_limit: Annotated[float, msgspec.Meta(ge=0)] = 200.0     # requests/s per source; 0 = off
    rate_burst: Annotated[float, msgspec.Meta(ge=1)] = 400.0
    profile_rate_limit: Annotated[float, msgspec.Meta(ge=0)] = 100.0  # call attempts/s per profile; 0 = off
    auth_block_threshold: Annotated[int, msgspec.Meta(ge=1)] = 20  # auth failures in 60 s that block a source
    auth_block_seconds: Annotated[float, msgspec.Meta(ge=0)] = 120.0


class MediaConfig(Section):
    address: str = "127.0.0.1"
    ports: tuple[Port, Port] = (20000, 29999)
    rtp_timeout: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    quiet_period: Annotated[float, msgspec.Meta(ge=0)] = 2.0


class ApiConfig(Section):
    listen: str = "127.0.0.1:8080"
    token: str = ""                 # empty: generated once and kept under the data directory
    # control API v2 (docs/api.md, docs/operations.md)
    metrics_listen: str = ""        # host:port of a listener of its own for /metrics ("": on api.listen)
    metrics_auth: bool = False      # /metrics needs a metrics (or admin) key
    metrics_per_profile: bool = True  # per-profile series; false: node totals only (10k+ profiles)
    key_rate_limit: Annotated[float, msgspec.Meta(ge=0)] = 100.0   # requests/s per API key; 0 = off
    key_rate_burst: Annotated[float, msgspec.Meta(ge=1)] = 200.0
    webhook_retry_hours: Annotated[float, msgspec.Meta(gt=0, le=168)] = 24.0
    webhook_backoff_seconds: Annotated[float, msgspec.Meta(gt=0)] = 5.0     # first retry; doubles
    webhook_backoff_max_seconds: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    webhook_timeout: Annotated[float, msgspec.Meta(gt=0, le=60)] = 10.0
    webhook_deliver: bool = True    # false: events stay in the outbox (a node that must not call out)


class StorageConfig(Section):
    path: str = "var/edge.lmdb"
    map_size_mb: Annotated[int, msgspec.Meta(ge=16)] = 4096


Seconds = Annotated[float, msgspec.Meta(gt=0, le=3600)]
ProbeCount = Annotated[int, msgspec.Meta(ge=1, le=100)]


class CarrierHealthOverride(Section):
    """``[carriers.health]``: any key of ``[health]`` for this carrier only; unset keys follow ``[health]``."""

    enabled: bool | None = None
    interval: Seconds | None = None
    timeout: Annotated[float, msgspec.Meta(gt=0, le=60)] | None = None
    threshold: ProbeCount | None = None
    recovery: ProbeCount | None = None


class CarrierConfig(Section):
    # an IP address, or a host name resolved per RFC 3263 (NAPTR -> SRV -> A/AAAA, edge/calls/dns.py)
    uri: str
    priority: Annotated[int, msgspec.Meta(ge=0)] = 1
    weight: Annotated[int, msgspec.Meta(ge=0)] = 100
    health: CarrierHealthOverride | None = None


class DnsConfig(Section):
    """How carriers given by host name are resolved (edge/calls/dns.py, docs/network.md)."""

    servers: list[str] = []      # "IP" or "IP:port" ("[v6]:port"); empty: the nameservers of /etc/resolv.conf
    timeout: Annotated[float, msgspec.Meta(gt=0, le=30)] = 2.0   # seconds one lookup may take, retries included
    retry: Seconds = 5.0         # seconds between attempts after a failed resolution
    grace: Annotated[float, msgspec.Meta(ge=0, le=86400)] = 300.0  # the last good answer outlives its TTL this long
    min_ttl: Annotated[float, msgspec.Meta(ge=0.1, le=3600)] = 1.0   # TTLs are clamped into [min_ttl, max_ttl]
    max_ttl: Annotated[float, msgspec.Meta(ge=1, le=86400)] = 3600.0


class SideConfig(Section):
    """One network side (SPEC §2.1). Empty values take the defaults of :func:`resolve_sides`."""

    listen: list[str] = []
    advertise: str = ""          # host (IP or DNS name) written into Via/Contact instead of the listener's
    media: str = ""              # relay ports of this side bind here
    media_advertise: str = ""    # written into SDP c=/o=/a=rtcp instead of ``media`` (1:1 NAT)
    srtp: Literal["off", "optional", "mandatory"] = "off"   # SDES-SRTP on this side's media (SPEC §4.6)


class SidesConfig(Section):
    customer: SideConfig | None = None   # the PBXs
    carrier: SideConfig | None = None    # the upstream carriers and [inbound] trusted sources


class HealthConfig(Section):
    """OPTIONS probing of the carriers (edge/calls/carriers.py); a carrier's ``[carriers.health]`` overrides it."""

    enabled: bool = False                                             # as Kamailio's ds_ping_interval = 0
    interval: Seconds = 30.0                                          # seconds between probes of a target
    timeout: Annotated[float, msgspec.Meta(gt=0, le=60)] = 4.0       # seconds a probe may wait for its answer
    threshold: ProbeCount = 3                                         # failed probes in a row: down
    recovery: ProbeCount = 2                                          # answered probes in a row: up again


def carrier_health(settings: HealthConfig, carrier: CarrierConfig) -> HealthConfig:
    """The probing of ``carrier``: ``[health]`` with the carrier's own ``[carriers.health]`` keys on top."""
    if carrier.health is None:
        return settings
    own = {k: v for k, v in msgspec.structs.asdict(carrier.health).items() if v is not None}
    return msgspec.structs.replace(settings, **own) if own else settings


class TlsConfig(Section):
    """Certificates of every ``tls:`` listener and of connections toward carriers with
    ``transport=tls`` (SPEC §2.1, docs/security.md). Paths to PEM files."""

    cert: str = ""                      # the edge's certificate chain (leaf first)
    key: str = ""                       # its private key (unencrypted PEM, readable by the edge only)
    ca: str = ""                        # trust anchors for carrier certificates ("": the system's)
    verify_carriers: bool = True        # check a carrier's certificate chain and host name
    client_cert_carriers: bool = False  # present cert/key to carriers (mutual TLS)


class InboundConfig(Section):
    trusted: list[str] = []


class CreditConfig(Section):
    slice_seconds: Annotated[int, msgspec.Meta(ge=1)] = 60
    bundle_minutes: Annotated[int, msgspec.Meta(ge=0)] = 5000
    max_call_seconds: Annotated[int, msgspec.Meta(ge=1)] = 4 * 3600


class NodeConfig(Section):
    """The node's own lifecycle (SPEC §2.2)."""

    drain_timeout: Annotated[float, msgspec.Meta(ge=0)] = 600.0  # seconds live calls may run on after SIGTERM
    # None: the --log-level of `sipedge serve` (info); a value here is applied again by every reload
    log_level: Literal["debug", "info", "warning", "error"] | None = None
    # SIP worker processes (docs/architecture.md "Processes"); 0: one per core. Each takes an equal
    # slice of media.ports. 1: the single process of earlier builds (SIP, calls and the API on one loop).
    workers: Annotated[int, msgspec.Meta(ge=0, le=32)] = 0
    # seconds a worker or the API process may go without its heartbeat before the supervisor
    # kills and restarts it (its calls are settled as after a crash); 0: never
    hang_timeout: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 30.0

    def worker_count(self) -> int:
        return self.workers or max(1, len(os.sched_getaffinity(0)))


class ClusterConfig(Section):
    """Several nodes on one distributed engine (SPEC §9, docs/cluster.md). No engine: one node alone."""

    node: str = ""                 # unique name of this node in the cluster
    engine: list[str] = []         # NATS JetStream members: "nats://host:port" (or tls://)
    lease_seconds: Annotated[float, msgspec.Meta(ge=1, le=60)] = 5.0

    @property
    def enabled(self) -> bool:
        return bool(self.engine)


class Config(Section):
    node: NodeConfig = msgspec.field(default_factory=NodeConfig)
    sip: SipConfig = msgspec.field(default_factory=SipConfig)
    media: MediaConfig = msgspec.field(default_factory=MediaConfig)
    api: ApiConfig = msgspec.field(default_factory=ApiConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    carriers: list[CarrierConfig] = []
    sides: SidesConfig = msgspec.field(default_factory=SidesConfig)
    health: HealthConfig = msgspec.field(default_factory=HealthConfig)
    dns: DnsConfig = msgspec.field(default_factory=DnsConfig)
    inbound: InboundConfig = msgspec.field(default_factory=InboundConfig)
    credit: CreditConfig = msgspec.field(default_factory=CreditConfig)
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)


class ConfigError(Exception):
    """The config cannot be used; the message names the file and the offending key."""


def _check_hostport(key: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: expected host:port, got {value!r}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ConfigError(f"{key}: an IPv6 address goes in brackets ([2001:db8::1]:5060), got {value!r}")
    return host.strip("[]"), int(port)


def parse_listen(value: str, key: str = "sip.listen") -> tuple[str, str, int]:
    """``"udp:127.0.0.1:5060"`` -> ("udp", "127.0.0.1", 5060); ``"udp:[::1]:5060"`` -> ("udp", "::1", 5060)."""
    transport, sep, rest = value.partition(":")
    if not sep or transport not in ("udp", "tcp", "tls"):
        raise ConfigError(f"{key}: expected udp:HOST:PORT, tcp:HOST:PORT or tls:HOST:PORT, got {value!r}")
    host, port = _check_hostport(key, rest)
    return transport, host, port


SIDE_NAMES = ("customer", "carrier")


class Side(msgspec.Struct, frozen=True):
    """One side as the node uses it: every default of SPEC §2.1 applied.

    :param listeners: (proto, host, port) the side listens on.
    :param advertise: host written into Via/Contact/Record-Route ("" = the listener's own address).
    :param media: address the side's relay ports bind to.
    :param media_advertise: address written into the SDP sent toward the side.
    :param srtp: ``"off"``, ``"optional"`` or ``"mandatory"`` (SPEC §4.6).
    """

    name: str
    listeners: tuple[tuple[str, str, int], ...]
    advertise: str
    media: str
    media_advertise: str
    srtp: Literal["off", "optional", "mandatory"] = "off"

    @property
    def families(self) -> frozenset[int]:
        """The address families of the side's listeners (``socket.AF_INET``/``AF_INET6``)."""
        return frozenset(socket.AF_INET6 if ":" in host else socket.AF_INET for _, host, _ in self.listeners)


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def resolve_sides(cfg: Config) -> dict[str, Side]:
    """The customer and the carrier side, with the defaults of SPEC §2.1: a side without
    ``[sides.X]`` (or without its ``listen``) uses ``[sip] listen``; ``media`` defaults to
    the side's first listener when the side has listeners of its own, else to ``[media]
    address``; ``media_advertise`` to ``media``."""
    out: dict[str, Side] = {}
    for name in SIDE_NAMES:
        side = getattr(cfg.sides, name) or SideConfig()
        own = bool(side.listen)
        specs = side.listen if own else cfg.sip.listen
        key = f"sides.{name}.listen" if own else "sip.listen"
        listeners = tuple(parse_listen(item, f"{key}[{i}]") for i, item in enumerate(specs))
        media = side.media or (listeners[0][1] if own and listeners else cfg.media.address)
        out[name] = Side(name, listeners, side.advertise, media, side.media_advertise or media, side.srtp)
    return out


def _validate_side(name: str, side: SideConfig | None, resolved: Side) -> None:
    key = f"sides.{name}"
    listen_key = f"{key}.listen" if side is not None and side.listen else "sip.listen"
    if side is not None:
        if side.advertise and _ip(side.advertise) is None and not _hostname(side.advertise):
            raise ConfigError(f"{key}.advertise: not an IP address or host name: {side.advertise!r}")
    for i, (_, host, _) in enumerate(resolved.listeners):
        addr = _ip(host)
        if addr is not None and addr.is_unspecified and not resolved.advertise:
            raise ConfigError(f"{listen_key}[{i}]: listening on {host!r} needs {key}.advertise "
                              f"(the address written into Via and Contact)")
    media = _ip(resolved.media)
    media_key = f"{key}.media" if side is not None and side.media else (
        f"{key}.listen[0]" if side is not None and side.listen else "media.address")
    if media is None:
        raise ConfigError(f"{media_key}: not an IP address: {resolved.media!r}")
    adv = _ip(resolved.media_advertise)
    if adv is None:
        raise ConfigError(f"{key}.media_advertise: not an IP address: {resolved.media_advertise!r}")
    if adv.version != media.version:
        raise ConfigError(f"{key}.media_advertise: IPv{adv.version} address for an IPv{media.version} relay "
                          f"({resolved.media!r}); the SDP would name a family the relay does not speak")
    if adv.is_unspecified:
        raise ConfigError(f"{key}.media_advertise: needed when the relay binds to {resolved.media!r} "
                          f"(the address peers send media to)")


def _hostname(value: str) -> bool:
    labels = value.rstrip(".").split(".")
    return bool(value) and len(value) <= 253 and all(
        0 < len(lb) <= 63 and lb.replace("-", "").isalnum() and not lb.startswith("-") for lb in labels)


def _validate_carrier_uri(key: str, value: str) -> None:
    from edge.sip import SipParseError, parse_uri  # edge.sip does not import this module: no cycle

    if not value.startswith(("sip:", "sips:")):
        raise ConfigError(f"{key}: expected a sip: URI, got {value!r}")
    try:
        host = parse_uri(value).host.strip("[]")
    except SipParseError as exc:
        raise ConfigError(f"{key}: not a SIP URI ({exc.reason}): {value!r}") from None
    if _ip(host) is None and not _hostname(host):
        raise ConfigError(f"{key}: the host is not an IP address or a host name: {value!r}")


def dns_server(value: str, key: str = "dns.servers") -> tuple[str, int]:
    """``"192.0.2.53"`` -> ("192.0.2.53", 53); ``"127.0.0.1:5353"``, ``"[::1]:5353"`` with their port."""
    if _ip(value) is not None:
        return value, 53
    if value.startswith("[") and value.endswith("]") and _ip(value[1:-1]) is not None:
        return value[1:-1], 53
    host, port = _check_hostport(key, value)
    if _ip(host) is None:
        raise ConfigError(f"{key}: a name server is an IP address (optionally with :port), got {value!r}")
    return host, port


def validate(cfg: Config) -> Config:
    """Checks msgspec cannot express: addresses, CIDRs, ranges."""
    if not cfg.sip.listen:
        raise ConfigError("sip.listen: at least one listener is required")
    for i, item in enumerate(cfg.sip.listen):
        parse_listen(item, f"sip.listen[{i}]")
    _check_hostport("api.listen", cfg.api.listen)
    if cfg.api.metrics_listen:
        _check_hostport("api.metrics_listen", cfg.api.metrics_listen)
    lo, hi = cfg.media.ports
    if lo % 2 or hi - lo < 3:
        raise ConfigError(f"media.ports: need an even first port and at least 4 ports, got [{lo}, {hi}]")
    if (hi - lo + 1) // cfg.node.worker_count() < 4:
        raise ConfigError(f"media.ports: [{lo}, {hi}] leaves fewer than 4 ports to each of "
                          f"{cfg.node.worker_count()} node.workers")
    try:
        ipaddress.ip_address(cfg.media.address)
    except ValueError:
        raise ConfigError(f"media.address: not an IP address: {cfg.media.address!r}") from None
    sides = resolve_sides(cfg)
    for name in SIDE_NAMES:
        _validate_side(name, getattr(cfg.sides, name), sides[name])
    for i, net in enumerate(cfg.inbound.trusted):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"inbound.trusted[{i}]: not an address or CIDR: {net!r}") from None
    for i, carrier in enumerate(cfg.carriers):
        _validate_carrier_uri(f"carriers[{i}].uri", carrier.uri)
    for i, server in enumerate(cfg.dns.servers):
        dns_server(server, f"dns.servers[{i}]")
    if cfg.dns.min_ttl > cfg.dns.max_ttl:
        raise ConfigError("dns.min_ttl: larger than dns.max_ttl")
    uses_tls = any(proto == "tls" for side in sides.values() for proto, _, _ in side.listeners)
    carriers_tls = any(carrier_uses_tls(c.uri) for c in cfg.carriers)
    if uses_tls or carriers_tls:
        from .sip.tls import check_tls_config  # ssl and cryptography only when TLS is configured

        check_tls_config(cfg.tls, listeners=uses_tls, carriers=carriers_tls)
    if not cfg.sip.digest_algorithms:
        raise ConfigError("sip.digest_algorithms: offer at least one of SHA-256, MD5")
    if cfg.sip.min_expires > cfg.sip.max_expires:
        raise ConfigError("sip.min_expires: larger than sip.max_expires")
    _validate_cluster(cfg.cluster)
    return cfg


_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


def _validate_cluster(cluster: ClusterConfig) -> None:
    if not cluster.enabled:
        if cluster.node:
            raise ConfigError("cluster.engine: cluster.node is set but no engine member is named")
        return
    # The name is a NATS subject and key token: no dots, wildcards or spaces.
    if not _NODE_NAME.fullmatch(cluster.node):
        raise ConfigError(f"cluster.node: a name of letters, digits, '-' and '_' is required, got {cluster.node!r}")
    for i, url in enumerate(cluster.engine):
        scheme, sep, rest = url.partition("://")
        if scheme not in ("nats", "tls") or not sep:
            raise ConfigError(f"cluster.engine[{i}]: expected nats://HOST:PORT or tls://HOST:PORT, got {url!r}")
        _check_hostport(f"cluster.engine[{i}]", rest)


def carrier_uses_tls(uri: str) -> bool:
    """A ``sips:`` URI (RFC 5630) or one with ``transport=tls`` is reached over TLS."""
    params = uri.partition(">")[0].split(";")[1:]
    return uri.lower().startswith("sips:") or any(p.strip().lower() == "transport=tls" for p in params)


def load(path: str | os.PathLike[str] | None) -> Config:
    """Read and validate a config file (``None``: the built-in defaults).

    ``SIPEDGE_ADMIN_TOKEN`` in the environment overrides ``api.token``.
    :raises ConfigError: naming the key at fault.
    """
    if path is None:
        cfg = Config()
    else:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}") from None
        try:
            cfg = msgspec.toml.decode(raw, type=Config)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{path}: {_friendly(str(exc))}") from None
        except msgspec.DecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{path or '<defaults>'}: {exc}") from None
    token = os.environ.get("SIPEDGE_ADMIN_TOKEN")
    if token:
        cfg.api.token = token
    return cfg


# What `sipedge reload` applies to a running node (docs/deployment.md); every other key keeps its
# running value until the next start, and a reload that changes one says so.
RELOADABLE = frozenset({
    "carriers", "inbound.trusted", "node.log_level", "node.drain_timeout",
    "sip.rate_limit", "sip.rate_burst", "sip.profile_rate_limit", "sip.auth_block_threshold",
    "sip.auth_block_seconds", "sip.tcp_max_connections", "sip.setup_timeout", "sip.min_expires",
    "sip.max_expires", "credit.max_call_seconds",
    # new handshakes use the new files; established TLS connections keep theirs (edge/sip/tls.py)
    "tls.cert", "tls.key", "tls.ca", "tls.verify_carriers", "tls.client_cert_carriers",
})


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The keys that differ between ``old`` and ``new`` but are not in :data:`RELOADABLE`.

    Compared section by section, key by key, so sections added later (``[sides]``, ``[tls]``)
    are covered without being listed here.
    """
    before, after = msgspec.to_builtins(old), msgspec.to_builtins(new)
    changed: list[str] = []
    for section in sorted(set(before) | set(after)):
        a, b = before.get(section), after.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            keys = [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            keys = [section] if a != b else []
        changed += [k for k in keys if k not in RELOADABLE]
    return changed


def _friendly(message: str) -> str:
    """msgspec says "... - at `$.sip.listen[0]`"; operators know keys as ``sip.listen[0]``."""
    text, sep, where = message.rpartition(" - at `")
    if not sep:
        text, where = message, ""
    key = where.rstrip("`").removeprefix("$").lstrip(".")
    unknown = text.removeprefix("Object contains unknown field `")
    if unknown != text:
        return f"{key + '.' if key else ''}{unknown.rstrip('`')}: unknown key"
    return f"{key or '<top level>'}: {text}"
