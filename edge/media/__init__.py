"""Media anchoring: the RTP relay engine, its asyncio service, SDP rewriting, metrics.

The engine itself is the compiled ``edge._rtp`` module (packet loop off the GIL);
see docs/media.md.
"""
from edge._rtp import (
    DROP_REASONS,
    LegAddr,
    LegStats,
    Relay,
    RelayEngine,
    RelayEvent,
    RelayStats,
    StreamStats,
)
from edge.media.relay import MediaService
from edge.media.sdp import ParsedSdp, SdpError, SdpMedia, parse_sdp, parse_sdp_media, rewrite_sdp

__all__ = [
    "DROP_REASONS",
    "LegAddr",
    "LegStats",
    "MediaService",
    "ParsedSdp",
    "Relay",
    "RelayEngine",
    "RelayEvent",
    "RelayStats",
    "SdpError",
    "SdpMedia",
    "StreamStats",
    "parse_sdp",
    "parse_sdp_media",
    "rewrite_sdp",
]
