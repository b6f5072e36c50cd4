"""Command line: ``e911-sip serve | check-config | resync | import | calls export | coverage |
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
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from e911_sip import __version__, build
from e911_sip.roles import Role, WorkerSetup

if TYPE_CHECKING:
    from e911_sip.callrecords.book import CallRecord
    from e911_sip.config import Config

# The rest of the product is imported by the command that needs it, after the arguments are
# parsed: the service's modules take a second or more to load, which ``--help``, a mistyped
# option and the commands that only call the provisioning API have no use for.


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


def service_url(config: Config) -> str:
    """Where this host reaches the provisioning API ``config`` serves."""
    from e911_sip import app

    host, port = config.provisioning.listen
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return app.http_url(host, port, config.provisioning.tls)


def _resync(args: argparse.Namespace) -> int:
    """Ask the running service to resync; without one, resync shared stores directly, or
    refuse when the records live only inside a service process (``memory://``)."""
    from e911_sip import app, logs
    from e911_sip.config import ConfigError, load
    from e911_sip.provisioning import remote

    config = load(args.config, os.environ)
    logs.configure(config.log.level)
    tokens = config.provisioning.tokens
    url = args.url or service_url(config)
    if tokens:
        name = args.token_name or next(iter(tokens))
        if name not in tokens:
            raise ConfigError(
                f"[provisioning] tokens: no token named {name!r} (--token-name); "
                f"known: {', '.join(sorted(tokens))}"
            )
        prov_tls = config.provisioning.tls
        tls = remote.pinned_context(prov_tls.cert_file) if prov_tls and not args.url else None

        async def ask() -> dict[str, Any]:
            return await remote.post(url, "/v1/resync", token=tokens[name], tls=tls)

        try:
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                report = runner.run(ask())
        except remote.Unreachable as exc:
            why = str(exc)
        except remote.RemoteError as exc:
            print(f"e911-sip: resync failed: {exc}", file=sys.stderr)
            return 1
        else:
            print(json.dumps(report, indent=2))
            return 0 if report.get("ok") else 1
    else:
        why = "[provisioning] tokens is empty, so no provisioning API is served"
    in_memory = [
        key
        for key, value in (
            ("[store] url", config.store.url),
            ("[provisioning] state_url", config.provisioning.state_url),
            ("[provisioning] audit_url", config.provisioning.audit_url),
        )
        if value.startswith("memory://")
    ]
    if in_memory:
        print(
            f"e911-sip: resync refused: {why}, and {' and '.join(in_memory)} "
            f"{'is' if len(in_memory) == 1 else 'are'} memory://, which only a running "
            "service holds; a resync here would change nothing the edge reads. Start "
            "`e911-sip serve` with this configuration and run resync again, or name the "
            "service with --url.",
            file=sys.stderr,
        )
        return 2
    print(f"e911-sip: {why}; resyncing the shared stores directly", file=sys.stderr)
    code, direct = _run_pair(app.resync(config))
    print(json.dumps(direct, indent=2))
    return code


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _time(text: str) -> float:
    from e911_sip.callrecords.book import parse_time

    try:
        return parse_time(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected ISO 8601 or epoch seconds, got {text!r}"
        ) from None


def _export_calls(args: argparse.Namespace) -> int:
    from e911_sip import app
    from e911_sip.callrecords.book import CSV_COLUMNS
    from e911_sip.config import load
    from e911_sip.provisioning.calls import MAX_PAGE, CallQuery, CallStoreError

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


# --- import: a file through the running provisioning API ------------------------------------


def _add_import_parser(sub: Any) -> None:
    imp = sub.add_parser(
        "import",
        help="import a CSV or JSON-lines file of customers, sites and accounts through the "
        "running provisioning API, showing progress; exit 1 when rows failed",
    )
    imp.add_argument("file", type=Path, nargs="?", help="the file (omit with --job)")
    imp.add_argument("--config", type=Path, help="TOML file: API address and a token from it")
    imp.add_argument("--url", help="provisioning API base URL (default: from --config)")
    imp.add_argument(
        "--token", help="bearer token (default: $E911_SIP_TOKEN, else the first in --config)"
    )
    imp.add_argument("--format", choices=["csv", "jsonl"], help="default: from the content")
    imp.add_argument("--job", help="follow an import job already submitted, by id")
    imp.add_argument("--interval", type=float, default=0.5, help="seconds between polls")
    imp.add_argument("--cafile", type=Path, help="CA bundle that signed the API's certificate")
    imp.add_argument("--cert", type=Path, help="client certificate (mutual TLS)")
    imp.add_argument("--key", type=Path, help="client certificate's private key")


def _import_target(args: argparse.Namespace) -> tuple[str, str]:
    from e911_sip import app
    from e911_sip.config import ConfigError, load

    url, token = args.url, args.token or os.environ.get("E911_SIP_TOKEN")
    if args.config is not None:
        config = load(args.config, os.environ)
        prov = config.provisioning
        host = "127.0.0.1" if prov.listen[0] in ("0.0.0.0", "::") else prov.listen[0]
        url = url or app.http_url(host, prov.listen[1], prov.tls)
        token = token or next(iter(prov.tokens.values()), None)
    if token is None:
        raise ConfigError("import: give --token, $E911_SIP_TOKEN or a --config with tokens")
    return (url or "http://127.0.0.1:9200").rstrip("/"), token


def _progress(view: dict[str, Any], tty: bool) -> str:
    total, done, failed = view["total"], view["done"], view["failed"]
    counts = f"{done + failed}/{total} (done {done}, failed {failed}, pending {view['pending']})"
    if not tty:
        return f"import {view['id']}: {view['state']} {counts}"
    width = 30
    filled = width * (done + failed) // total if total else width
    return f"\r[{'#' * filled}{'.' * (width - filled)}] {counts} "


async def _run_import(args: argparse.Namespace, url: str, token: str) -> int:
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"}
    tty = sys.stdout.isatty()
    context = ssl.create_default_context(cafile=args.cafile)
    if args.cert is not None:
        context.load_cert_chain(args.cert, args.key)
    connector = aiohttp.TCPConnector(ssl=context)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
        if args.job:
            status_url = f"/v1/imports/{args.job}"
        else:
            kind = {"csv": "text/csv", "jsonl": "application/x-ndjson"}.get(args.format or "", "")
            data = args.file.read_bytes()
            async with session.post(
                f"{url}/v1/imports", data=data, headers={"Content-Type": kind} if kind else {}
            ) as response:
                body = await response.json(content_type=None)
                if response.status != 202:
                    error = (body or {}).get("error", {})
                    print(
                        f"e911-sip: import refused ({response.status} {error.get('code')}): "
                        f"{error.get('message')}",
                        file=sys.stderr,
                    )
                    return 2
            status_url = body["status_url"]
            print(f"import {body['id']}: {body['total']} rows accepted", file=sys.stderr)
        last = ""
        while True:
            async with session.get(f"{url}{status_url}") as response:
                view = await response.json(content_type=None)
                if response.status != 200:
                    print(f"e911-sip: {status_url}: HTTP {response.status}", file=sys.stderr)
                    return 2
            line = _progress(view, tty)
            if line != last:
                print(line, end="" if tty else "\n", flush=True)
                last = line
            if view["state"] == "completed":
                break
            await asyncio.sleep(args.interval)
    if tty:
        print()
    print(
        f"import {view['id']} completed: {view['done']} done, {view['failed']} failed "
        f"of {view['total']}"
    )
    for failure in view.get("failures", []):
        print(
            f"  line {failure['line']}: {failure['entity'] or '-'}: {failure['code']}: "
            f"{failure['message']}"
        )
    return 1 if view["failed"] else 0


def _import(args: argparse.Namespace) -> int:
    from e911_sip.config import ConfigError

    if args.file is None and not args.job:
        raise ConfigError("import: give a FILE or --job ID")
    url, token = _import_target(args)
    try:
        return _run(_run_import(args, url, token))
    except OSError as exc:
        print(f"e911-sip: cannot reach the provisioning API at {url}: {exc}", file=sys.stderr)
        return 2


# --- coverage: asks the running provisioning service -------------------------------------

API_URL_ENV = "E911_SIP_API_URL"
API_TOKEN_ENV = "E911_SIP_API_TOKEN"
API_CA_FILE_ENV = "E911_SIP_API_CA_FILE"


class _ApiError(Exception):
    """The provisioning API could not be reached or refused the request."""


def _api_base(config: Config, given: str | None) -> str:
    """``--url``, else ``E911_SIP_API_URL``, else ``[provisioning] listen`` (a wildcard
    address is reached on loopback)."""
    from e911_sip import app

    if given:
        return given.rstrip("/")
    host, port = config.provisioning.listen
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return app.http_url(host, port, config.provisioning.tls)


def _api_token(config: Config, given: str | None, name: str | None) -> str:
    """``--token``, else ``E911_SIP_API_TOKEN``, else the ``[provisioning] tokens`` entry
    called ``--token-name`` (default: the first)."""
    from e911_sip.config import ConfigError

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
    from e911_sip.config import load
    from e911_sip.provisioning.coverage import summary as coverage_summary

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


class _Version(argparse.Action):
    """``--version``: which build (compiled or pure) is only found out by importing the hot
    modules, so it is found out when asked, not for every parse."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(f"e911-sip {__version__} ({build.describe()})")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="e911-sip",
        description="SIP edge that attaches the caller's dispatchable location to 911 calls.",
    )
    parser.add_argument("--version", action=_Version, help="show the version and build, then exit")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the edge and/or the provisioning API")
    serve.add_argument("--config", type=Path, help="TOML file (default: built-in defaults)")
    serve.add_argument(
        "--role",
        choices=[r.value for r in Role],
        default=Role.ALL.value,
        help="edge, provisioning, or all in one process (default: all)",
    )
    # Set by the supervisor when it starts a worker ([sip] workers above 1), never by hand.
    serve.add_argument("--worker", type=WorkerSetup.parse, help=argparse.SUPPRESS)

    resync = sub.add_parser(
        "resync",
        help="have the running provisioning service rebuild every line record from its state "
        "(POST /v1/resync); report lines without an endpoint",
    )
    resync.add_argument("--config", type=Path, help="TOML file (default: built-in defaults)")
    resync.add_argument(
        "--url", help="the provisioning API (default: [provisioning] listen of the config)"
    )
    resync.add_argument(
        "--token-name",
        help="which [provisioning] tokens entry to use (default: the first); it is the "
        "audit trail's 'who'",
    )

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

    _add_import_parser(sub)
    _coverage_parser(sub)

    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("--config", type=Path, required=True)

    emulator = sub.add_parser(
        "bandwidth-emulator",
        help="serve a local emulator of Bandwidth's v2 emergency API (for tests and trials)",
    )
    emulator.add_argument(
        "--listen", type=_hostport, default=("127.0.0.1", 9300), help="HOST:PORT (127.0.0.1:9300)"
    )
    # No defaults here: the emulator's own (EmulatorOptions) apply to what is not given.
    emulator.add_argument("--client-id", help="the OAuth2 client id it accepts")
    emulator.add_argument("--client-secret", help="the secret that goes with it")
    emulator.add_argument("--account-id", help="the one Bandwidth account that exists")
    emulator.add_argument(
        "--nonexistent-street",
        action="append",
        metavar="STREET",
        help="a standardised street line that does not exist (repeatable); "
        "default: the emulator's own list (1 NOWHERE ST, 123 FAKE ST, 0 MAIN ST)",
    )
    emulator.add_argument("--log-level", default="INFO")

    return parser


def _bandwidth_emulator(args: argparse.Namespace) -> int:
    from e911_sip import logs
    from e911_sip.provisioning.emulator import EmulatorOptions, serve_emulator

    defaults = EmulatorOptions()
    options = EmulatorOptions(
        client_id=args.client_id or defaults.client_id,
        client_secret=args.client_secret or defaults.client_secret,
        account_id=args.account_id or defaults.account_id,
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


def redacted(url: str) -> str:
    """``url`` without the password of its user part (``redis://:***@host``)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _check_config(path: Path) -> int:
    from e911_sip import app
    from e911_sip.config import load

    config = load(path, os.environ)
    prov, bw = config.provisioning, config.bandwidth.client

    def row(label: str, value: str) -> None:
        print(f"  {label + ':':<24}{value}")

    print(f"{path}: OK")
    row("sip listen", ", ".join(str(a) for a in config.sip.listen))
    workers = config.sip.workers
    row("edge workers", "1 (in the serve process)" if workers == 1 else f"{workers}, supervised")
    row("emergency trunks", ", ".join(config.emergency.trunks))
    row("default trunks", ", ".join(config.default.trunks) or "(none)")
    row("store", redacted(config.store.url))
    for name, listen, tls in (
        ("http", config.http.listen, config.http.tls),
        ("provisioning", prov.listen, prov.tls),
    ):
        mutual = tls is not None and tls.client_ca_file is not None
        suffix = " (client certificates required)" if mutual else ""
        row(name, f"{app.http_url(*listen, tls)}{suffix}")
    # Token names only: the tokens themselves are secrets.
    row("provisioning tokens", ", ".join(prov.tokens) or "(none: the API is not served)")
    row("provisioning state", redacted(prov.state_url))
    row("audit trail", redacted(prov.audit_url))
    emulator = " (bundled emulator, in-process)" if config.bandwidth.run_emulator else ""
    row("bandwidth account", f"{bw.account_id} at {bw.api_base}{emulator}")
    secret = "set" if bw.client_secret else "NOT SET"
    row("bandwidth credentials", f"client {bw.client_id}, secret {secret}, via {bw.token_url}")
    row("bandwidth messaging", bw.messaging_base)
    return _check_schema(config, row)


def _check_schema(config: Config, row: Callable[[str, str], None]) -> int:
    """Show the data schema of each Redis database the configuration names (it is only
    read here); 1 when one would be refused at start."""
    from e911_sip import app
    from e911_sip.store.schema import CURRENT as SCHEMA_CURRENT
    from e911_sip.store.schema import SchemaRefused

    async def read() -> int:
        found = await app.schema_status(config, writer=False, provisioning=True)
        if not found:
            row("data schema", f"{SCHEMA_CURRENT} written by this release (no Redis configured)")
        for where, url, verdict in found:
            if isinstance(verdict, str):
                row("data schema", f"{where} {redacted(url)}: not read ({verdict})")
            else:
                row("data schema", f"{where} {redacted(url)}: {verdict.message}")
        return 0

    try:
        return _run(read())
    except SchemaRefused as exc:
        row("data schema", f"REFUSED: {exc}")
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``e911-sip`` command."""
    args = _parser().parse_args(argv)
    from e911_sip import app, supervisor
    from e911_sip.config import ConfigError, load

    try:
        if args.command == "check-config":
            return _check_config(args.config)
        if args.command == "bandwidth-emulator":
            return _bandwidth_emulator(args)
        if args.command == "calls":
            return _export_calls(args)
        if args.command == "import":
            return _import(args)
        if args.command == "coverage":
            return _coverage(args)
        if args.command == "resync":
            return _resync(args)
        if args.command == "serve":
            config = load(args.config, os.environ)
            role = Role(args.role)
            if args.worker is not None:
                return _run(app.run(config, role=Role.EDGE, worker=args.worker))
            if config.sip.workers > 1 and role is not Role.PROVISIONING:
                return _run(supervisor.serve(config, role=role))
            return _run(app.run(config, role=role))
    except ConfigError as exc:
        print(f"e911-sip: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"e911-sip: {exc}", file=sys.stderr)
        return 1
    return 2
