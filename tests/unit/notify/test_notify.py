"""Kari's Law notifications end to end against real receivers on loopback.

Each channel runs through the real :class:`Notifier` and a journaled queue: webhooks into an
aiohttp server, email into an aiosmtpd SMTP server, SMS into the Bandwidth emulator (whose
Messaging endpoint enforces the account queue and answers 429 like Bandwidth). Nothing here
asserts a timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import ssl
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email import message_from_bytes
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from aiosmtpd.smtp import SMTP, AuthResult
from bandwidth.models import MessageRequest

from e911_sip.app import notification_dropped, notification_without_target
from e911_sip.metrics import Metrics
from e911_sip.notify.channels import (
    EmailChannel,
    EmailOptions,
    SmsChannel,
    SmsOptions,
    WebhookChannel,
    WebhookOptions,
)
from e911_sip.notify.dispatch import Notifier, NotifierOptions, Publisher
from e911_sip.notify.event import CallEvent, Resolution, Targets, deliveries
from e911_sip.notify.queue import FileQueue, Queue, QueueError
from e911_sip.provisioning.bandwidth import BandwidthClient, BandwidthOptions
from e911_sip.provisioning.emulator import EmulatorOptions, build_emulator_app
from e911_sip.provisioning.messaging import BandwidthMessageSender

SECRET = b"webhook-secret-for-tests"
_OPEN: list[FileQueue] = []


def fq(path: Path) -> FileQueue:
    """A journaled queue closed after the test."""
    queue = FileQueue(path)
    _OPEN.append(queue)
    return queue


@pytest.fixture(autouse=True)
async def _close_queues() -> AsyncIterator[None]:
    yield
    while _OPEN:
        await _OPEN.pop().close()


WAIT = 20.0


def call(n: int = 0, *, dialed: str = "911") -> CallEvent:
    return CallEvent(
        call_id=f"call-{n}@softswitch",
        caller="1321551234",
        callback="1321551234",
        dialed=dialed,
        provider_endpoint="5555555/acco0123456789",
        outcome="enriched",
        received_at=time.time(),
    )


RESOLVED = Resolution(
    level="site",
    address="600 CHATHAM ST, CARY, NC 27513, US",
    name="Helpdesk 365 / CarryOffice / 1321551234",
)


@dataclass
class Receiver:
    """An aiohttp webhook receiver: records every POST, answers from ``statuses`` first."""

    url: str = ""
    posts: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    hang_on: int | None = None
    """Index of the POST that never gets an answer (a receiver stuck mid-request)."""
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.posts.append((dict(request.headers), await request.read()))
        self.arrived.set()
        if self.hang_on is not None and len(self.posts) - 1 == self.hang_on:
            await asyncio.Event().wait()
        status = self.statuses.pop(0) if self.statuses else 204
        return web.Response(status=status)

    def ids(self) -> list[str]:
        return [headers["X-E911-Delivery-Id"] for headers, _ in self.posts]

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.posts) < count:
                self.arrived.clear()
                await self.arrived.wait()


@contextlib.asynccontextmanager
async def serving_receiver() -> AsyncIterator[Receiver]:
    """A :class:`Receiver` listening on a free loopback port."""
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rec.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield rec
    finally:
        await runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with serving_receiver() as rec:
        yield rec


async def resolved(event: CallEvent) -> Resolution:
    return RESOLVED


@dataclass
class Running:
    notifier: Notifier
    stop: asyncio.Event
    task: asyncio.Task[None]
    outcomes: list[tuple[str, str]]
    latencies: list[tuple[str, float]]

    async def halt(self) -> None:
        self.stop.set()
        async with asyncio.timeout(WAIT):
            await self.task


def start(
    events: Queue,
    queue: Queue,
    channels: dict[str, Any],
    *,
    fallback: Targets,
    resolve: Callable[[CallEvent], Awaitable[Resolution]] = resolved,
    **options: Any,
) -> Running:
    outcomes: list[tuple[str, str]] = []
    latencies: list[tuple[str, float]] = []
    notifier = Notifier(
        events=events,
        deliveries=queue,
        channels=channels,
        resolve=resolve,
        options=NotifierOptions(
            fallback=fallback, poll_interval=0.05, backoff_base=0.01, backoff_cap=0.05, **options
        ),
        on_outcome=lambda c, o: outcomes.append((c, o)),
        on_latency=lambda c, s: latencies.append((c, s)),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(notifier.run(stop))
    return Running(notifier, stop, task, outcomes, latencies)


async def until(predicate: Callable[[], Awaitable[bool] | bool]) -> None:
    async with asyncio.timeout(WAIT):
        while True:
            result = predicate()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await asyncio.sleep(0.01)


# -- webhook -----------------------------------------------------------------------------


async def test_webhook_is_signed_carries_the_fields_and_is_retried(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.statuses = [503]
    events, queue = fq(tmp_path / "events"), fq(tmp_path / "deliveries")
    publisher = Publisher(events, numbers=frozenset({"911"}))
    stop_publisher = asyncio.Event()
    publishing = asyncio.create_task(publisher.run(stop_publisher))
    webhook = WebhookChannel(WebhookOptions(secret=SECRET))
    running = start(events, queue, {"webhook": webhook}, fallback=Targets(webhooks=(receiver.url,)))
    event = call(1)
    publisher.publish(event)
    await receiver.wait_for(2)
    await until(lambda: ("webhook", "delivered") in running.outcomes)
    await running.halt()
    stop_publisher.set()
    await publishing
    await webhook.close()

    first, second = receiver.posts
    assert first[0]["X-E911-Delivery-Id"] == second[0]["X-E911-Delivery-Id"]
    headers, raw = second
    expected = "sha256=" + hmac.new(SECRET, raw, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-E911-Signature"], expected)
    body = json.loads(raw)
    assert body == {
        "event": "emergency_call",
        "call_id": "call-1@softswitch",
        "caller": "1321551234",
        "callback": "1321551234",
        "dialed": "911",
        "provider_endpoint": "5555555/acco0123456789",
        "level": "site",
        "address": "600 CHATHAM ST, CARY, NC 27513, US",
        "name": "Helpdesk 365 / CarryOffice / 1321551234",
        "time": event.time,
        "outcome": "enriched",
    }
    assert body["time"].endswith("Z") and "T" in body["time"]
    assert running.outcomes == [("webhook", "retried"), ("webhook", "delivered")]
    assert [c for c, _ in running.latencies] == ["webhook"]
    assert await queue.depth() == 0 and await events.depth() == 0


async def test_933_does_not_notify_unless_configured(tmp_path: Path) -> None:
    events = fq(tmp_path / "events")
    publisher = Publisher(events, numbers=frozenset({"911"}))
    publisher.publish(call(1, dialed="933"))
    assert publisher.pending == 0
    both = Publisher(events, numbers=frozenset({"911", "933"}))
    both.publish(call(2, dialed="933"))
    assert both.pending == 1


async def test_a_refused_webhook_ends_in_the_dead_letter_list(
    receiver: Receiver, tmp_path: Path
) -> None:
    receiver.statuses = [410]
    events, queue = fq(tmp_path / "events"), fq(tmp_path / "deliveries")
    webhook = WebhookChannel(WebhookOptions())
    running = start(events, queue, {"webhook": webhook}, fallback=Targets(webhooks=(receiver.url,)))
    await events.put(call(3).to_dict())
    await until(lambda: ("webhook", "dead") in running.outcomes)
    await running.halt()
    await webhook.close()
    dead = await queue.dead_letters()
    assert len(dead) == 1 and dead[0]["reason"] == "http 410"
    assert dead[0]["item"]["body"]["call_id"] == "call-3@softswitch"
    assert await queue.depth() == 0
    # The dead-letter list survives a restart.
    assert len(await fq(tmp_path / "deliveries").dead_letters()) == 1


async def test_an_unreachable_target_is_retried_then_dead_lettered(tmp_path: Path) -> None:
    events, queue = fq(tmp_path / "events"), fq(tmp_path / "deliveries")
    webhook = WebhookChannel(WebhookOptions(timeout=1.0))
    running = start(
        events,
        queue,
        {"webhook": webhook},
        fallback=Targets(webhooks=("http://127.0.0.1:9/unreachable",)),
        max_attempts=3,
    )
    await events.put(call(4).to_dict())
    await until(lambda: ("webhook", "dead") in running.outcomes)
    await running.halt()
    await webhook.close()
    assert running.outcomes.count(("webhook", "retried")) == 2
    assert len(await queue.dead_letters()) == 1


async def test_a_restart_mid_queue_loses_nothing_and_repeats_only_the_interrupted_one(
    receiver: Receiver, tmp_path: Path
) -> None:
    await restart_mid_queue(
        receiver, lambda: (fq(tmp_path / "events"), fq(tmp_path / "deliveries"))
    )


async def restart_mid_queue(
    receiver: Receiver, open_queues: Callable[[], tuple[Queue, Queue]]
) -> None:
    """Ten calls queued; the receiver hangs on the fourth POST and the notifier stops. A new
    notifier on the same queues delivers the rest. Nothing finished before the stop is sent
    again; what was unfinished (the POST in flight, and any event taken but not yet
    acknowledged) may be, always with the same idempotency key."""
    receiver.hang_on = 3
    events, queue = open_queues()
    for n in range(10):
        await events.put(call(n).to_dict())
    webhook = WebhookChannel(WebhookOptions())
    first = start(
        events,
        queue,
        {"webhook": webhook},
        fallback=Targets(webhooks=(receiver.url,)),
        max_in_flight=1,
    )
    await receiver.wait_for(4)
    await first.halt()
    await webhook.close()
    await events.close()
    await queue.close()
    assert first.outcomes.count(("webhook", "delivered")) == 3

    receiver.hang_on = None
    events, queue = open_queues()
    assert await queue.depth() + await events.depth() > 0
    webhook = WebhookChannel(WebhookOptions())
    finished = receiver.ids()[:3]
    second = start(events, queue, {"webhook": webhook}, fallback=Targets(webhooks=(receiver.url,)))
    expected = {
        d.delivery_id
        for n in range(10)
        for d in deliveries(call(n), RESOLVED, Targets(webhooks=(receiver.url,)))
    }

    async def all_delivered() -> bool:
        # Every call's POST answered, and both queues empty: nothing left to send again.
        if not expected <= set(receiver.ids()):
            return False
        return await queue.depth() == 0 and await events.depth() == 0

    await until(all_delivered)
    await second.halt()
    await webhook.close()

    ids = receiver.ids()
    assert set(ids) == expected
    repeated = {i for i in ids if ids.count(i) > 1}
    assert ids[3] in repeated  # the POST in flight at the stop went again
    assert not repeated & set(finished)  # nothing finished before the stop went again
    assert await queue.depth() == 0 and await events.depth() == 0
    await events.close()
    await queue.close()


# -- email -------------------------------------------------------------------------------


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.arrived = asyncio.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        self.arrived.set()
        return "250 Message accepted for delivery"


async def test_email_reaches_a_real_smtp_server(tmp_path: Path) -> None:
    mailbox = Mailbox()
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(mailbox, hostname="mail.test"), "127.0.0.1", 0
    )
    try:
        port = server.sockets[0].getsockname()[1]
        email = EmailChannel(
            EmailOptions(
                smtp_url=f"smtp://127.0.0.1:{port}",
                sender="e911@example.net",
                starttls=False,
            )
        )
        events, queue = fq(tmp_path / "events"), fq(tmp_path / "deliveries")
        running = start(
            events, queue, {"email": email}, fallback=Targets(emails=("desk@example.com",))
        )
        await events.put(call(5).to_dict())
        await until(lambda: ("email", "delivered") in running.outcomes)
        await running.halt()
    finally:
        server.close()
        await server.wait_closed()
    ((sender, recipients, content),) = mailbox.messages
    assert sender == "e911@example.net" and recipients == ["desk@example.com"]
    message = message_from_bytes(content)
    assert message["Subject"] == "Emergency 911 call from 1321551234"
    delivery = deliveries(call(5), RESOLVED, Targets(emails=("desk@example.com",)))[0]
    assert message["Message-ID"] == f"<{delivery.delivery_id}@example.net>"
    text = message.get_payload(decode=True).decode()
    assert "600 CHATHAM ST, CARY, NC 27513, US" in text and "call-5@softswitch" in text


# -- SMS ---------------------------------------------------------------------------------


class TickingClock:
    """A clock that moves ``step`` seconds each time it is read, whatever the host does."""

    def __init__(self, step: float) -> None:
        self.step = step
        self.now = 0.0

    def __call__(self) -> float:
        self.now += self.step
        return self.now


async def test_sms_through_the_emulator_survives_a_429_storm(tmp_path: Path) -> None:
    """The emulated account drains 20 messages a second and queues 0.1 s worth (2); the
    sender is allowed 200 a second, so most sends meet 429
    ``max-message-queue-size-exceeded``. Every text still arrives, once, with the body the
    official SDK's model accepts.

    The emulator's clock ticks per read, not with the host: on a slow host a sender held up
    between its sends would find the queue drained by the wall clock and meet no 429. Here a
    message request drains a fraction of a message, so the queue fills at the third send and
    every later refusal still lets the account move on."""
    emulator = build_emulator_app(
        EmulatorOptions(messaging_rate=20.0, messaging_queue_seconds=0.1),
        clock=TickingClock(1 / 128),
    )
    runner = web.AppRunner(emulator)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    base = f"http://127.0.0.1:{port}"
    client = BandwidthClient(
        BandwidthOptions(
            account_id="5555555",
            client_id="e911-sip-emulator",
            client_secret="emulator-secret",
            api_base=f"{base}/api/v2",
            token_url=f"{base}/api/v1/oauth2/token",
            messaging_base=f"{base}/api/v2",
            backoff_base=0.02,
            backoff_cap=0.2,
            max_attempts=3,
        )
    )
    sender = BandwidthMessageSender(
        client,
        sender="+19195550100",
        application_id="app-e911",
        owns_client=True,
        rate_limited_pause=0.1,
    )
    sms = SmsChannel(sender, SmsOptions(rate=200.0))
    numbers = tuple(f"919555{n:04d}" for n in range(12))
    events, queue = fq(tmp_path / "events"), fq(tmp_path / "deliveries")
    running = start(events, queue, {"sms": sms}, fallback=Targets(sms=numbers), max_attempts=50)
    try:
        await events.put(call(6).to_dict())
        await until(lambda: running.outcomes.count(("sms", "delivered")) == len(numbers))
        await running.halt()
        await sms.close()
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{base}/_emulator/state") as response,
        ):
            state = await response.json()
    finally:
        await runner.cleanup()
    messages = state["messages"]
    assert sorted(m["to"][0] for m in messages) == sorted(f"+1{n}" for n in numbers)
    assert len({m["tag"] for m in messages}) == len(numbers)
    assert state["messagesRefused"] > 0
    refused = [r for r in state["requests"] if r["status"] == 429]
    assert refused and all(r["path"] == "/api/v2/users/5555555/messages" for r in refused)
    for m in messages:
        request = MessageRequest.from_dict(
            {k: m[k] for k in ("applicationId", "to", "from", "text", "tag", "priority")}
        )
        assert request is not None and request.additional_properties == {}
        assert request.application_id == "app-e911" and request.var_from == "+19195550100"
        assert m["text"].startswith(
            "911 CALL from 1321551234: 600 CHATHAM ST, CARY, NC 27513, US. Callback 1321551234."
        )
        assert len(m["text"]) <= 160
    assert await queue.depth() == 0


class Credentials:
    """An aiosmtpd authenticator that accepts one user and records who logged in."""

    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user.encode(), password.encode()
        self.logins: list[bytes] = []

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        ok = data.login == self.user and data.password == self.password
        if ok:
            self.logins.append(data.login)
        return AuthResult(success=ok)


@pytest.mark.parametrize("scheme", ["smtp", "smtps"])
async def test_email_over_tls_with_credentials(tmp_path: Path, scheme: str) -> None:
    """STARTTLS (required by the server before AUTH) on smtp://, TLS from the first byte on
    smtps://; the server's certificate is verified against the test CA."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    mailbox = Mailbox()
    credentials = Credentials("frontdesk", "pw-from-env")
    implicit = scheme == "smtps"

    def protocol() -> SMTP:
        with warnings.catch_warnings():
            # aiosmtpd cannot see TLS it did not start itself (smtps://), so it is told not
            # to insist on it there, and warns that it was told.
            warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
            return SMTP(
                mailbox,
                hostname="mail.test",
                tls_context=None if implicit else server_context,
                require_starttls=not implicit,
                authenticator=credentials,
                auth_required=True,
                auth_require_tls=not implicit,
            )

    server = await asyncio.get_running_loop().create_server(
        protocol, "127.0.0.1", 0, ssl=server_context if implicit else None
    )
    try:
        port = server.sockets[0].getsockname()[1]
        email = EmailChannel(
            EmailOptions(
                smtp_url=f"{scheme}://127.0.0.1:{port}",
                sender="e911@example.net",
                username="frontdesk",
                password="pw-from-env",
                starttls=None if implicit else True,
                tls_context=client_context,
            )
        )
        events, queue = fq(tmp_path / "events"), fq(tmp_path / "deliveries")
        running = start(
            events, queue, {"email": email}, fallback=Targets(emails=("desk@example.com",))
        )
        await events.put(call(7).to_dict())
        await until(lambda: ("email", "delivered") in running.outcomes)
        await running.halt()
    finally:
        server.close()
        await server.wait_closed()
    assert credentials.logins == [b"frontdesk"]
    ((_, recipients, content),) = mailbox.messages
    assert recipients == ["desk@example.com"]
    assert message_from_bytes(content)["Subject"] == "Emergency 911 call from 1321551234"


def test_line_contacts_replace_the_global_targets_unless_always() -> None:
    own = Resolution(targets=Targets(emails=("desk@example.com",)))
    glob = Targets(webhooks=("https://noc.example.net/e911",), emails=("desk@example.com",))
    assert [(d.channel, d.target) for d in deliveries(call(8), own, glob)] == [
        ("email", "desk@example.com")
    ]
    assert [(d.channel, d.target) for d in deliveries(call(8), Resolution(), glob)] == [
        ("webhook", "https://noc.example.net/e911"),
        ("email", "desk@example.com"),
    ]
    both = deliveries(call(8), own, glob, always=True)
    assert [(d.channel, d.target) for d in both] == [
        ("webhook", "https://noc.example.net/e911"),
        ("email", "desk@example.com"),
    ]
    assert len({d.delivery_id for d in both}) == 2


# -- publishing in batches -----------------------------------------------------------------


class CountingQueue(FileQueue):
    """An unjournaled queue that counts its writes and can be told to fail them."""

    def __init__(self) -> None:
        super().__init__(None)
        self.writes: list[int] = []
        self.failing = False
        self.refusals = 0

    async def put_many(self, items: Sequence[Mapping[str, Any]]) -> None:
        if self.failing:
            self.refusals += 1
            raise QueueError("refused")
        self.writes.append(len(items))
        await super().put_many(items)


async def test_a_burst_of_events_is_queued_in_a_few_writes_in_order() -> None:
    queue = CountingQueue()
    publisher = Publisher(queue, numbers=frozenset({"911"}), batch=256)
    for n in range(600):
        publisher.publish(call(n))
    stop = asyncio.Event()
    running = asyncio.create_task(publisher.run(stop))
    await until(lambda: publisher.pending == 0)
    stop.set()
    await running
    assert queue.writes == [256, 256, 88]
    taken = await queue.take(0.1)
    assert [item["call_id"] for _, item in taken] == [f"call-{n}@softswitch" for n in range(600)]


async def test_a_failed_batch_stays_pending_and_is_queued_once_when_the_queue_returns() -> None:
    queue = CountingQueue()
    queue.failing = True
    publisher = Publisher(queue, numbers=frozenset({"911"}), batch=4)
    for n in range(6):
        publisher.publish(call(n))
    stop = asyncio.Event()
    running = asyncio.create_task(publisher.run(stop))
    await until(lambda: queue.refusals >= 1)
    assert publisher.pending == 6
    queue.failing = False
    await until(lambda: publisher.pending == 0)
    stop.set()
    await running
    taken = await queue.take(0.1)
    assert [item["call_id"] for _, item in taken] == [f"call-{n}@softswitch" for n in range(6)]
    assert queue.writes == [4, 2]


async def test_a_journaled_batch_survives_a_restart(tmp_path: Path) -> None:
    first = FileQueue(tmp_path / "events")
    await first.put_many([{"n": n} for n in range(3)])
    await first.close()
    second = fq(tmp_path / "events")
    taken = await second.take(0.1)
    assert [item["n"] for _, item in taken] == [0, 1, 2]


async def test_a_full_backlog_hands_each_dropped_event_to_the_owner() -> None:
    dropped: list[str] = []
    publisher = Publisher(
        CountingQueue(),
        numbers=frozenset({"911"}),
        max_pending=2,
        on_dropped=lambda event: dropped.append(event.call_id),
    )
    for n in range(5):
        publisher.publish(call(n))
    assert publisher.pending == 2
    assert dropped == [f"call-{n}@softswitch" for n in (2, 3, 4)]


def test_the_edge_counts_every_dropped_event_and_logs_a_burst_of_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    dropped = notification_dropped(metrics)
    with caplog.at_level("ERROR", logger="e911_sip.app"):
        for n in range(50):
            dropped(call(n))
    assert metrics.notification_events_dropped._value.get() == 50
    lines = [r for r in caplog.records if "notification event dropped" in r.getMessage()]
    assert 1 <= len(lines) <= 5
    assert lines[0].call_id == "call-0@softswitch"


async def test_events_of_the_next_moments_join_the_first_one_in_one_write() -> None:
    queue = CountingQueue()
    publisher = Publisher(queue, numbers=frozenset({"911"}), linger=30.0)
    stop = asyncio.Event()
    running = asyncio.create_task(publisher.run(stop))
    publisher.publish(call(1))
    for _ in range(5):
        await asyncio.sleep(0)  # the publisher is lingering: nothing written alone
    assert queue.writes == []
    publisher.publish(call(2))
    stop.set()  # a stop ends the wait at once and writes what is pending
    await running
    assert queue.writes == [2]


async def test_calls_with_nobody_to_notify_are_counted_and_logged_through_a_limiter(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    events, queue = fq(tmp_path / "events"), fq(tmp_path / "deliveries")
    notifier = Notifier(
        events=events,
        deliveries=queue,
        channels={},
        resolve=lambda event: asyncio.sleep(0, Resolution()),
        options=NotifierOptions(poll_interval=0.05),
        on_no_target=notification_without_target(metrics),
    )
    counter = metrics.notifications.labels("none", "no_target")
    for n in range(40):
        await events.put(call(n).to_dict())
    stop = asyncio.Event()
    with caplog.at_level("WARNING", logger="e911_sip.app"):
        running = asyncio.create_task(notifier.run(stop))
        await until(lambda: counter._value.get() == 40)

        async def events_done() -> bool:
            return await events.depth() == 0

        await until(events_done)
        stop.set()
        await running
    assert await events.depth() == 0 and await queue.depth() == 0
    lines = [r for r in caplog.records if "no notification target" in r.getMessage()]
    assert 1 <= len(lines) <= 5  # a burst, not a line per call
    assert lines[0].call_id == "call-0@softswitch"
