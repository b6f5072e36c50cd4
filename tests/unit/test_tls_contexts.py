"""The TLS contexts the app builds from [tls]."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from e911_sip.app import tls_contexts
from e911_sip.config import ConfigError, TlsConfig


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    return paths


def test_defaults_require_client_certificates_and_tls_1_2(files: dict[str, Path]) -> None:
    server, client = tls_contexts(
        TlsConfig(certificate=files["cert"], private_key=files["key"], ca_file=files["ca"])
    )
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    assert server.minimum_version == client.minimum_version == ssl.TLSVersion.TLSv1_2


def test_optional_client_certificates_and_tls_1_3(files: dict[str, Path]) -> None:
    server, client = tls_contexts(
        TlsConfig(
            certificate=files["cert"],
            private_key=files["key"],
            ca_file=files["ca"],
            verify_client=False,
            minimum_version="1.3",
        )
    )
    assert server.verify_mode == ssl.CERT_OPTIONAL
    assert client.minimum_version == ssl.TLSVersion.TLSv1_3


def test_a_key_that_does_not_load_is_a_config_error(files: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"\[tls\] certificate"):
        tls_contexts(TlsConfig(certificate=files["cert"], private_key=files["ca"]))
