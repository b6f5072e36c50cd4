"""The SIP core: messages, URIs, framing and transactions, with no I/O and no clock."""
