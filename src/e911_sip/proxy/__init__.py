"""The stateful proxy: RFC 3261 §16 rules and the routing of each request (sans-IO)."""
