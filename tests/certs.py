"""Certificates for TLS tests, made by trustme: a CA, and PEM files where a config names them."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class PemPair:
    """A certificate chain and its private key as PEM files."""

    cert: Path
    key: Path


def issue(ca: trustme.CA, directory: Path, name: str, *identities: str) -> PemPair:
    """Write ``name.crt`` (leaf, then ``ca``'s chain) and ``name.key`` for ``identities``."""
    directory.mkdir(parents=True, exist_ok=True)
    leaf = ca.issue_cert(*(identities or ("127.0.0.1", "localhost")))
    pair = PemPair(cert=directory / f"{name}.crt", key=directory / f"{name}.key")
    pair.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(pair.key))
    return pair


def write_ca(ca: trustme.CA, path: Path) -> Path:
    """``ca``'s certificate as a PEM file (a client CA file, or a client's trust anchor)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ca.cert_pem.write_to_path(str(path))
    return path


def client_context(trusted: trustme.CA, certificate: PemPair | None = None) -> ssl.SSLContext:
    """A client context that trusts ``trusted`` and presents ``certificate`` if given."""
    context = ssl.create_default_context()
    trusted.configure_trust(context)
    if certificate is not None:
        context.load_cert_chain(certificate.cert, certificate.key)
    return context
