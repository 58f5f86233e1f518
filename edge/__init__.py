"""sipedge: a SIP/RTP trunking edge (registrar, B2BUA, prepaid credit, RTP relay)."""

__version__ = "0.1.0"
