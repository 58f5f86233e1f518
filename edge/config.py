"""The TOML configuration, decoded into msgspec structs (SPEC §2).

Unknown keys are errors that name the key; values are checked here so that a broken
config stops ``sipedge serve`` before it binds anything.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Literal

import msgspec

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]


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


class NodeConfig(Section):
    # SIP worker processes (SPEC §2.2); 0: one per core. Each takes an equal slice of media.ports.
    workers: Annotated[int, msgspec.Meta(ge=0, le=32)] = 0

    def worker_count(self) -> int:
        return self.workers or max(1, len(os.sched_getaffinity(0)))


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


class CarrierConfig(Section):
    uri: str
    priority: Annotated[int, msgspec.Meta(ge=0)] = 1
    weight: Annotated[int, msgspec.Meta(ge=0)] = 100


class InboundConfig(Section):
    trusted: list[str] = []


class CreditConfig(Section):
    slice_seconds: Annotated[int, msgspec.Meta(ge=1)] = 60
    bundle_minutes: Annotated[int, msgspec.Meta(ge=0)] = 5000
    max_call_seconds: Annotated[int, msgspec.Meta(ge=1)] = 4 * 3600


class Config(Section):
    sip: SipConfig = msgspec.field(default_factory=SipConfig)
    media: MediaConfig = msgspec.field(default_factory=MediaConfig)
    node: NodeConfig = msgspec.field(default_factory=NodeConfig)
    api: ApiConfig = msgspec.field(default_factory=ApiConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    carriers: list[CarrierConfig] = []
    inbound: InboundConfig = msgspec.field(default_factory=InboundConfig)
    credit: CreditConfig = msgspec.field(default_factory=CreditConfig)


class ConfigError(Exception):
    """The config cannot be used; the message names the file and the offending key."""


def _check_hostport(key: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: expected host:port, got {value!r}")
    return host.strip("[]"), int(port)


def parse_listen(value: str, key: str = "sip.listen") -> tuple[str, str, int]:
    """``"udp:127.0.0.1:5060"`` -> ("udp", "127.0.0.1", 5060)."""
    transport, sep, rest = value.partition(":")
    if not sep or transport not in ("udp", "tcp"):
        raise ConfigError(f"{key}: expected udp:HOST:PORT or tcp:HOST:PORT, got {value!r}")
    host, port = _check_hostport(key, rest)
    return transport, host, port


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
    for i, net in enumerate(cfg.inbound.trusted):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"inbound.trusted[{i}]: not an address or CIDR: {net!r}") from None
    for i, carrier in enumerate(cfg.carriers):
        if not carrier.uri.startswith(("sip:", "sips:")):
            raise ConfigError(f"carriers[{i}].uri: expected a sip: URI, got {carrier.uri!r}")
    if not cfg.sip.digest_algorithms:
        raise ConfigError("sip.digest_algorithms: offer at least one of SHA-256, MD5")
    if cfg.sip.min_expires > cfg.sip.max_expires:
        raise ConfigError("sip.min_expires: larger than sip.max_expires")
    return cfg


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
