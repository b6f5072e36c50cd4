"""Location records: where the edge reads a caller's provisioned endpoint, and where the
provisioning side writes it."""
