"""Provisioning: customer, site and account addresses into Bandwidth emergency endpoints,
and the line records the edge reads."""
