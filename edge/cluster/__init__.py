"""A cluster of sipedge nodes on NATS JetStream (SPEC §9, docs/cluster.md).

The engine does the distributed part -- consensus, replication, leases by key expiry,
compare-and-swap by revision and by expected subject sequence; this package only decides
what the keys and subjects mean for a trunking edge.
"""
