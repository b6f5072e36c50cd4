"""e911-sip: a SIP edge that attaches the caller's dispatchable location to 911 calls."""

__version__ = "0.1.0"
