"""Command line: ``e911-sip serve | check-config | resync | calls export | coverage |
bandwidth-emulator``."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import signal
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from e911_sip import app, logs
from e911_sip.callrecords.book import CSV_COLUMNS, CallRecord, parse_time
from e911_sip.config import Config, ConfigError, load
from e911_sip.provisioning.calls import MAX_PAGE, CallQuery, CallStoreError
from e911_sip.provisioning.coverage import summary as coverage_summary
from e911_sip.provisioning.emulator import EmulatorOptions, serve_emulator


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when it is installed; the standard loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _run(coro: Coroutine[Any, Any, int]) -> int:
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(coro)


def _run_pair(
    coro: Coroutine[Any, Any, tuple[int, dict[str, object]]],
) -> tuple[int, dict[str, object]]:
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(coro)


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _time(text: str) -> float:
    try:
        return parse_time(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected ISO 8601 or epoch seconds, got {text!r}"
        ) from None


def _export_calls(args: argparse.Namespace) -> int:
    config = load(args.config, os.environ)
    query = CallQuery(since=args.since, until=args.until, caller=args.caller, limit=MAX_PAGE)
    out = args.output.open("w", encoding="utf-8", newline="") if args.output else sys.stdout
    try:
        write: Callable[[CallRecord], None]
        if args.format == "csv":
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(CSV_COLUMNS)

            def write(record: CallRecord) -> None:
                writer.writerow(record.csv_row())

        else:

            def write(record: CallRecord) -> None:
                out.write(json.dumps(record.to_dict(), separators=(",", ":"), sort_keys=True))
                out.write("\n")

        try:
            count = _run(app.export_calls(config, query, write))
        except CallStoreError as exc:
            print(f"e911-sip: call records could not be read: {exc}", file=sys.stderr)
            return 1
    finally:
        if args.output:
            out.close()
    print(f"e911-sip: exported {count} call records", file=sys.stderr)
    return 0


# --- coverage: asks the running provisioning service -------------------------------------

API_URL_ENV = "E911_SIP_API_URL"
API_TOKEN_ENV = "E911_SIP_API_TOKEN"
API_CA_FILE_ENV = "E911_SIP_API_CA_FILE"


class _ApiError(Exception):
    """The provisioning API could not be reached or refused the request."""


def _api_base(config: Config, given: str | None) -> str:
    """``--url``, else ``E911_SIP_API_URL``, else ``[provisioning] listen`` (a wildcard
    address is reached on loopback)."""
    if given:
        return given.rstrip("/")
    host, port = config.provisioning.listen
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return app.http_url(host, port, config.provisioning.tls)


def _api_token(config: Config, given: str | None, name: str | None) -> str:
    """``--token``, else ``E911_SIP_API_TOKEN``, else the ``[provisioning] tokens`` entry
    called ``--token-name`` (default: the first)."""
    if given:
        return given
    tokens = config.provisioning.tokens
    if name is not None:
        if name not in tokens:
            raise ConfigError(f"[provisioning] tokens: no token named {name!r}")
        return tokens[name]
    if not tokens:
        raise ConfigError(f"[provisioning] tokens: empty; give --token or set {API_TOKEN_ENV}")
    return next(iter(tokens.values()))


def _api_get(url: str, token: str, *, ca_file: str | None, timeout: float) -> Any:
    context = ssl.create_default_context(cafile=ca_file) if url.startswith("https:") else None
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise _ApiError(f"{url}: {exc.code} {message}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise _ApiError(f"{url}: {exc}") from None


def _coverage(args: argparse.Namespace) -> int:
    config = load(args.config, os.environ)
    base = _api_base(config, args.url or os.environ.get(API_URL_ENV))
    token = _api_token(config, args.token or os.environ.get(API_TOKEN_ENV), args.token_name)
    query = urllib.parse.urlencode({"limit": args.limit, "offset": args.offset})
    try:
        view = _api_get(
            f"{base}/v1/coverage?{query}",
            token,
            ca_file=args.ca_file or os.environ.get(API_CA_FILE_ENV),
            timeout=args.timeout,
        )
    except _ApiError as exc:
        print(f"e911-sip: coverage could not be read: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(view, indent=2, sort_keys=True))
    else:
        sys.stdout.write(coverage_summary(view))
    if args.fail_below is not None and view["share"] < args.fail_below:
        return 3
    return 0


def _coverage_parser(sub: Any) -> None:
    coverage = sub.add_parser(
        "coverage",
        help="how many lines would reach the PSAP with a location (asks the running service)",
    )
    coverage.add_argument("--config", type=Path, help="TOML file (default: built-in defaults)")
    coverage.add_argument(
        "--url", help=f"provisioning API base URL (default: ${API_URL_ENV}, else [provisioning])"
    )
    coverage.add_argument(
        "--token", help=f"bearer token (default: ${API_TOKEN_ENV}, else [provisioning] tokens)"
    )
    coverage.add_argument("--token-name", help="which [provisioning] tokens entry to use")
    coverage.add_argument(
        "--ca-file", help=f"CA certificates to trust for HTTPS (default: ${API_CA_FILE_ENV})"
    )
    coverage.add_argument(
        "--limit", type=int, default=100, help="lines without a location to list (1-1000)"
    )
    coverage.add_argument("--offset", type=int, default=0, help="skip that many of them")
    coverage.add_argument("--json", action="store_true", help="print the API's JSON")
    coverage.add_argument(
        "--fail-below",
        type=float,
        metavar="SHARE",
        help="exit 3 when the share covered is below SHARE (0 to 1)",
    )
    coverage.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="e911-sip",
        description="SIP edge that attaches the caller's dispatchable location to 911 calls.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the edge and/or the provisioning API")
    serve.add_argument("--config", type=Path, help="TOML file (default: built-in defaults)")
    serve.add_argument(
        "--role",
        choices=[r.value for r in app.Role],
        default=app.Role.ALL.value,
        help="edge, provisioning, or all in one process (default: all)",
    )

    resync = sub.add_parser(
        "resync",
        help="rebuild every line record from provisioning state; report lines without an endpoint",
    )
    resync.add_argument("--config", type=Path, help="TOML file (default: built-in defaults)")

    calls = sub.add_parser("calls", help="emergency call records")
    calls_sub = calls.add_subparsers(dest="calls_command", required=True)
    export = calls_sub.add_parser(
        "export", help="write the call records of a period as CSV or JSON lines"
    )
    export.add_argument("--config", type=Path, help="TOML file (default: built-in defaults)")
    export.add_argument(
        "--since", type=_time, required=True, help="ISO 8601 (UTC unless a zone is given)"
    )
    export.add_argument("--until", type=_time, help="ISO 8601, exclusive (default: now)")
    export.add_argument("--caller", help="only this 10-digit calling line")
    export.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    export.add_argument("--output", type=Path, help="file to write (default: standard output)")

    _coverage_parser(sub)

    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("--config", type=Path, required=True)

    defaults = EmulatorOptions()
    emulator = sub.add_parser(
        "bandwidth-emulator",
        help="serve a local emulator of Bandwidth's v2 emergency API (for tests and trials)",
    )
    emulator.add_argument(
        "--listen", type=_hostport, default=("127.0.0.1", 9300), help="HOST:PORT (127.0.0.1:9300)"
    )
    emulator.add_argument("--client-id", default=defaults.client_id)
    emulator.add_argument("--client-secret", default=defaults.client_secret)
    emulator.add_argument("--account-id", default=defaults.account_id)
    emulator.add_argument(
        "--nonexistent-street",
        action="append",
        metavar="STREET",
        help="a standardised street line that does not exist (repeatable); "
        f"default: {', '.join(defaults.nonexistent_streets)}",
    )
    emulator.add_argument("--log-level", default="INFO")

    return parser


def _bandwidth_emulator(args: argparse.Namespace) -> int:
    defaults = EmulatorOptions()
    options = EmulatorOptions(
        client_id=args.client_id,
        client_secret=args.client_secret,
        account_id=args.account_id,
        nonexistent_streets=tuple(args.nonexistent_street or defaults.nonexistent_streets),
    )
    host, port = args.listen

    async def serve() -> int:
        logs.configure(args.log_level)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve_emulator(options, host=host, port=port, stop=stop)
        return 0

    return _run(serve())


def _check_config(path: Path) -> int:
    config = load(path, os.environ)
    print(f"{path}: OK")
    print(f"  sip listen:       {', '.join(str(a) for a in config.sip.listen)}")
    print(f"  emergency trunks: {', '.join(config.emergency.trunks)}")
    print(f"  default trunks:   {', '.join(config.default.trunks) or '(none)'}")
    print(f"  store:            {config.store.url}")
    for name, listen, tls in (
        ("http", config.http.listen, config.http.tls),
        ("provisioning", config.provisioning.listen, config.provisioning.tls),
    ):
        mutual = tls is not None and tls.client_ca_file is not None
        suffix = " (client certificates required)" if mutual else ""
        print(f"  {name + ':':<18}{app.http_url(*listen, tls)}{suffix}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``e911-sip`` command."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            return _check_config(args.config)
        if args.command == "bandwidth-emulator":
            return _bandwidth_emulator(args)
        if args.command == "calls":
            return _export_calls(args)
        if args.command == "coverage":
            return _coverage(args)
        if args.command == "resync":
            config = load(args.config, os.environ)
            logs.configure(config.log.level)
            code, report = _run_pair(app.resync(config))
            print(json.dumps(report, indent=2))
            return code
        if args.command == "serve":
            config = load(args.config, os.environ)
            return _run(app.run(config, role=app.Role(args.role)))
    except ConfigError as exc:
        print(f"e911-sip: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"e911-sip: {exc}", file=sys.stderr)
        return 1
    return 2
