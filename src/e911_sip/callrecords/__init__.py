"""Per-call records of emergency calls (RAY BAUM's Act): built at the edge, kept by provisioning."""
