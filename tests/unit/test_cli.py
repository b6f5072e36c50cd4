"""The command line: ``--version`` and ``resync`` acting on the running service."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from e911_sip import __version__, build
from e911_sip.cli import main, service_url
from e911_sip.config import load
from e911_sip.provisioning.api import build_provisioning_app
from e911_sip.provisioning.audit import MemoryAuditLog
from e911_sip.provisioning.emulator import EmulatorOptions
from e911_sip.provisioning.service import ProvisioningService, ServiceOptions
from e911_sip.provisioning.state import MemoryStateStore
from e911_sip.store.memory import MemoryStore
from tests.certs import issue

TOKEN = "cli-test-token-0123456789"


class NoProvider:
    """Resync of an empty state with the provider check off never reaches Bandwidth."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"Bandwidth was called ({name})")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def write_config(tmp_path: Path, port: int, tokens: str = f'{{ ops = "{TOKEN}" }}') -> Path:
    path = tmp_path / "e911.toml"
    path.write_text(
        f"""
[provisioning]
listen = "127.0.0.1:{port}"
tokens = {tokens}
state_url = "file://{tmp_path / "state.json"}"
audit_url = "file://{tmp_path / "audit.jsonl"}"
"""
    )
    return path


@contextlib.contextmanager
def serve_api(tls: ssl.SSLContext | None = None) -> Iterator[int]:
    """A provisioning API on a loopback port, served from a thread of its own."""
    started = threading.Event()
    stop: list[asyncio.Event] = []
    port: list[int] = []
    service = ProvisioningService(
        provider=NoProvider(),  # type: ignore[arg-type]
        lines=MemoryStore(),
        state=MemoryStateStore(),
        audit=MemoryAuditLog(),
        options=ServiceOptions(resync_checks_provider=False),
    )

    async def serve() -> None:
        runner = web.AppRunner(build_provisioning_app(service, tokens={TOKEN: "ops"}))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
        await site.start()
        port.append(runner.addresses[0][1])
        stop.append(asyncio.Event())
        started.set()
        try:
            await stop[0].wait()
        finally:
            await runner.cleanup()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),))
    thread.start()
    try:
        assert started.wait(10)
        yield port[0]
    finally:
        if stop:
            loop.call_soon_threadsafe(stop[0].set)
        thread.join(10)
        loop.close()


@pytest.fixture
def running_api() -> Iterator[int]:
    with serve_api() as port:
        yield port


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    # The build that runs: compiled, pure, or which modules are compiled.
    assert capsys.readouterr().out.strip() == f"e911-sip {__version__} ({build.describe()})"


def test_help_answers_without_loading_the_service() -> None:
    # In a process of its own: this one has imported the whole product already.
    probe = (
        "import sys\n"
        "from e911_sip.cli import main\n"
        "for argv in (['--help'], ['serve', '--help'], ['bandwidth-emulator', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = ('e911_sip.app', 'e911_sip.config', 'e911_sip.proxy', 'aiohttp', 'redis')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert "usage: e911-sip" in done.stdout


def test_the_emulators_help_names_its_default_streets(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["bandwidth-emulator", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(street in text for street in EmulatorOptions().nonexistent_streets)


def test_resync_asks_the_running_service(
    tmp_path: Path, running_api: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["resync", "--config", str(write_config(tmp_path, running_api))]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["customers"] == 0
    assert report["provider_checked"] is False  # the service's own options, not the CLI's
    assert not (tmp_path / "audit.jsonl").exists()


def test_resync_reports_a_refused_token(
    tmp_path: Path, running_api: int, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, running_api, tokens='{ ops = "not-the-token-0123456" }')
    assert main(["resync", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "answered 401" in err and "not-the-token" not in err


def test_resync_refuses_when_the_records_live_only_in_a_service_that_is_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = closed_port()
    assert main(["resync", "--config", str(write_config(tmp_path, port))]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"nothing answers at http://127.0.0.1:{port}" in captured.err
    assert "[store] url is memory://" in captured.err
    assert not (tmp_path / "audit.jsonl").exists() and not (tmp_path / "state.json").exists()


def test_resync_without_tokens_cannot_reach_a_service(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["resync", "--config", str(write_config(tmp_path, closed_port(), "{}"))]) == 2
    assert "tokens is empty" in capsys.readouterr().err


def test_resync_names_an_unknown_token_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, closed_port())
    assert main(["resync", "--config", str(config), "--token-name", "nobody"]) == 2
    assert "no token named 'nobody'" in capsys.readouterr().err


def test_service_url_reaches_a_wildcard_listener_on_loopback(tmp_path: Path) -> None:
    path = tmp_path / "e911.toml"
    path.write_text('[provisioning]\nlisten = "0.0.0.0:9200"\nallow_plaintext = true\n')
    assert service_url(load(path, {})) == "http://127.0.0.1:9200"


def test_resync_reaches_an_https_service_by_its_configured_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = issue(trustme.CA(), tmp_path / "tls", "server", "provisioning.example.net")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server.cert, server.key)
    with serve_api(context) as port:
        config = write_config(tmp_path, port)
        with config.open("a") as out:
            out.write(f'tls_cert_file = "{server.cert}"\ntls_key_file = "{server.key}"\n')
        # The certificate names another host; the configured file is what is trusted.
        assert main(["resync", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
