"""SIP protocol layer: parser (compiled ``edge._sipparse`` re-exported here), transports, transactions."""
