"""Kari's Law notifications (47 CFR 9.16): webhook, email and SMS, never on the call path."""
