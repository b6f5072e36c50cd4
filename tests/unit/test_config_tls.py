"""HTTPS settings of ``[http]`` and ``[provisioning]``: plain HTTP only where no one else
listens, and every problem with a certificate named by its key."""

from __future__ import annotations

import re
import ssl
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from e911_sip.cli import main
from e911_sip.config import ConfigError, load, server_tls_context
from tests.certs import PemPair, issue, write_ca

ROOT = Path(__file__).resolve().parents[2]
CONTAINER = ROOT / "config" / "e911-sip.container.toml"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server(ca: trustme.CA, tmp_path: Path) -> PemPair:
    return issue(ca, tmp_path / "tls", "server")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "e911.toml"
    path.write_text(text)
    return path


def tls_keys(pair: PemPair, client_ca: Path | None = None) -> str:
    text = f'tls_cert_file = "{pair.cert}"\ntls_key_file = "{pair.key}"\n'
    if client_ca is not None:
        text += f'tls_client_ca_file = "{client_ca}"\n'
    return text


@pytest.mark.parametrize("section", ["http", "provisioning"])
@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "192.0.2.10", "edge.example.net"])
def test_plaintext_on_a_reachable_address_is_refused(
    tmp_path: Path, section: str, host: str
) -> None:
    path = write(tmp_path, f'[{section}]\nlisten = "{host}:9443"\n')
    with pytest.raises(ConfigError) as caught:
        load(path, {})
    message = str(caught.value)
    assert message.startswith(f"[{section}] listen: ")
    # Both ways out are named.
    assert f"[{section}] tls_cert_file" in message and "tls_key_file" in message
    assert f"[{section}] allow_plaintext = true" in message


def test_the_refusal_says_what_would_be_exposed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bearer tokens and addresses in plain HTTP"):
        load(write(tmp_path, '[provisioning]\nlisten = "0.0.0.0:9200"\n'), {})
    with pytest.raises(ConfigError, match="/metrics, /healthz and /readyz in plain HTTP"):
        load(write(tmp_path, '[http]\nlisten = "0.0.0.0:9100"\n'), {})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "[::1]", "localhost"])
def test_plaintext_on_loopback_is_allowed(tmp_path: Path, host: str) -> None:
    config = load(
        write(
            tmp_path, f'[http]\nlisten = "{host}:9100"\n[provisioning]\nlisten = "{host}:9200"\n'
        ),
        {},
    )
    assert config.http.tls is None and config.provisioning.tls is None


def test_quick_start_config_stays_plain_http_on_loopback() -> None:
    config = load(ROOT / "config" / "e911-sip.toml", {})
    assert config.http.tls is None and config.provisioning.tls is None
    assert config.http.allow_plaintext is False


def test_explicit_opt_out_allows_plaintext(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[http]\nlisten = "0.0.0.0:9100"\nallow_plaintext = true\n'
        '[provisioning]\nlisten = "0.0.0.0:9200"\n',
    )
    with pytest.raises(ConfigError, match=r"^\[provisioning\] listen"):
        load(path, {})
    config = load(path, {"E911_SIP__PROVISIONING__ALLOW_PLAINTEXT": "true"})
    assert config.http.allow_plaintext and config.provisioning.allow_plaintext
    assert config.http.tls is None and config.provisioning.tls is None


def test_https_settings_are_read_and_relative_paths_follow_the_file(
    tmp_path: Path, ca: trustme.CA, server: PemPair
) -> None:
    client_ca = write_ca(trustme.CA(), tmp_path / "tls" / "client-ca.crt")
    path = write(
        tmp_path,
        '[http]\nlisten = "0.0.0.0:9100"\n'
        'tls_cert_file = "tls/server.crt"\ntls_key_file = "tls/server.key"\n'
        f'[provisioning]\nlisten = "0.0.0.0:9200"\n{tls_keys(server, client_ca)}',
    )
    config = load(path, {})
    assert config.http.tls is not None and config.provisioning.tls is not None
    assert config.http.tls.cert_file == server.cert
    assert config.http.tls.key_file == server.key
    assert config.http.tls.client_ca_file is None
    assert config.provisioning.tls.client_ca_file == client_ca

    ops = server_tls_context(config.http.tls, "http")
    assert ops.minimum_version is ssl.TLSVersion.TLSv1_2
    assert ops.verify_mode is ssl.CERT_NONE
    provisioning = server_tls_context(config.provisioning.tls, "provisioning")
    assert provisioning.minimum_version is ssl.TLSVersion.TLSv1_2
    assert provisioning.verify_mode is ssl.CERT_REQUIRED
    assert provisioning.get_ca_certs()[0]["subject"] == ca_subject(client_ca)


def ca_subject(ca_file: Path) -> tuple[tuple[tuple[str, str], ...], ...]:
    context = ssl.create_default_context(cafile=str(ca_file))
    subject: tuple[tuple[tuple[str, str], ...], ...] = context.get_ca_certs()[0]["subject"]
    return subject


def encrypted_key(pair: PemPair, path: Path) -> Path:
    key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return path


@pytest.mark.parametrize("section", ["http", "provisioning"])
def test_certificate_problems_name_the_key(
    tmp_path: Path, ca: trustme.CA, server: PemPair, section: str
) -> None:
    other = issue(ca, tmp_path / "other", "other", "other.example.net")
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    binary = tmp_path / "binary.der"
    binary.write_bytes(b"\x30\x82\xff\xfe")
    locked = encrypted_key(server, tmp_path / "locked.key")
    missing = tmp_path / "absent.crt"
    cert, key = f'tls_cert_file = "{server.cert}"\n', f'tls_key_file = "{server.key}"\n'
    cases = [
        (
            f'tls_cert_file = "{missing}"\n{key}',
            rf"^\[{section}\] tls_cert_file: {missing} does not exist",
        ),
        (
            f'{cert}tls_key_file = "{missing}"\n',
            rf"^\[{section}\] tls_key_file: {missing} does not exist",
        ),
        (key, rf"^\[{section}\] tls_cert_file: required when tls_key_file is set"),
        (cert, rf"^\[{section}\] tls_key_file: required when tls_cert_file is set"),
        (
            f'tls_client_ca_file = "{server.cert}"\n',
            rf"^\[{section}\] tls_client_ca_file: client certificates need HTTPS",
        ),
        (
            f'tls_cert_file = "{junk}"\n{key}',
            rf"^\[{section}\] tls_cert_file: {junk} holds no PEM certificate",
        ),
        (f'tls_cert_file = "{binary}"\n{key}', rf"^\[{section}\] tls_cert_file: .* not a PEM"),
        (f'tls_cert_file = "{server.key}"\n{key}', rf"^\[{section}\] tls_cert_file: "),
        (
            f'{cert}tls_key_file = "{other.key}"\n',
            rf"^\[{section}\] tls_key_file: {other.key} is not a PEM private key of the "
            "certificate",
        ),
        (f'{cert}tls_key_file = "{server.cert}"\n', rf"^\[{section}\] tls_key_file: "),
        (f'{cert}tls_key_file = "{locked}"\n', rf"^\[{section}\] tls_key_file: .* is encrypted"),
        (
            f'{cert}{key}tls_client_ca_file = "{junk}"\n',
            rf"^\[{section}\] tls_client_ca_file: {junk} holds no PEM CA certificate",
        ),
        (
            f'{cert}{key}tls_client_ca_file = "{server.key}"\n',
            rf"^\[{section}\] tls_client_ca_file: ",
        ),
        (
            f'{cert}{key}tls_client_ca_file = "{missing}"\n',
            rf"^\[{section}\] tls_client_ca_file: {missing} does not exist",
        ),
        ('allow_plaintext = "yes"\n', rf"^\[{section}\] allow_plaintext: expected true or false"),
        ('tls_certfile = "x"\n', rf"^\[{section}\] tls_certfile: unknown key"),
    ]
    for keys, message in cases:
        path = write(tmp_path, f'[{section}]\nlisten = "127.0.0.1:9443"\n{keys}')
        with pytest.raises(ConfigError, match=message):
            load(path, {})


def test_a_certificate_replaced_after_the_check_is_reported_at_start(
    tmp_path: Path, ca: trustme.CA, server: PemPair
) -> None:
    config = load(write(tmp_path, f'[http]\nlisten = "0.0.0.0:9100"\n{tls_keys(server)}'), {})
    assert config.http.tls is not None
    server.key.write_text("not a key\n")
    with pytest.raises(ConfigError, match=r"^\[http\] tls_key_file: "):
        server_tls_context(config.http.tls, "http")


def test_check_config_reports_plaintext_and_https(
    tmp_path: Path, server: PemPair, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = write(tmp_path, '[provisioning]\nlisten = "0.0.0.0:9200"\n')
    assert main(["check-config", "--config", str(plain)]) == 2
    err = capsys.readouterr().err
    assert "configuration error: [provisioning] listen" in err
    assert "allow_plaintext = true" in err

    client_ca = write_ca(trustme.CA(), tmp_path / "client-ca.crt")
    good = write(
        tmp_path,
        f'[http]\nlisten = "0.0.0.0:9100"\n{tls_keys(server)}'
        f'[provisioning]\nlisten = "0.0.0.0:9200"\n{tls_keys(server, client_ca)}',
    )
    assert main(["check-config", "--config", str(good)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\n  http: +https://0\.0\.0\.0:9100\n", out)
    assert re.search(
        r"\n  provisioning: +https://0.0.0.0:9200 \(client certificates required\)", out
    )


def test_container_config_needs_the_mounted_certificate() -> None:
    with pytest.raises(ConfigError) as caught:
        load(CONTAINER, {"E911_SIP__SIP__ADVERTISE": "203.0.113.10"})
    assert str(caught.value) == (
        "[http] tls_cert_file: /etc/e911-sip/tls/server.crt does not exist"
    )


def test_container_config_serves_https_with_the_mounted_files(
    tmp_path: Path, server: PemPair
) -> None:
    client_ca = write_ca(trustme.CA(), tmp_path / "tls" / "client-ca.crt")
    # The container reads /etc/e911-sip/tls/; the test points the same keys at its own copy.
    mounted = {
        f"E911_SIP__{section}__{key}": str(path)
        for section in ("HTTP", "PROVISIONING")
        for key, path in (("TLS_CERT_FILE", server.cert), ("TLS_KEY_FILE", server.key))
    }
    config = load(
        CONTAINER,
        {
            "E911_SIP__SIP__ADVERTISE": "203.0.113.10",
            "E911_SIP__PROVISIONING__TLS_CLIENT_CA_FILE": str(client_ca),
            **mounted,
        },
    )
    assert config.http.listen == ("0.0.0.0", 9100)
    assert config.provisioning.listen == ("0.0.0.0", 9200)
    assert config.http.tls is not None and config.provisioning.tls is not None
    assert not config.http.allow_plaintext and not config.provisioning.allow_plaintext
    assert config.provisioning.tls.client_ca_file == client_ca
    text = CONTAINER.read_text()
    for name in ("server.crt", "server.key"):
        assert text.count(f'"/etc/e911-sip/tls/{name}"') == 2
