"""Kari's Law notifications through the real edge process and a real redis-server.

A SIPp caller dials 911 through the edge; the edge queues the call in a Redis stream and the
notifier in the same process (role ``all``) posts the signed webhook to a receiver started
here. The Redis queue's restart behaviour is checked against redis-server directly.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from e911_sip.notify.queue import QueueError, RedisStreamQueue
from tests.integration.harness import (
    DEFAULT_CALLER,
    DEFAULT_ENDPOINT,
    EdgeProcess,
    RedisServer,
    Sipp,
    api,
    call_and_check,
    edge_config,
    free_port,
    serve,
    trunk_uri,
)
from tests.integration.test_end_to_end import CUSTOMER_ADDRESS, provisioning_tables
from tests.unit.notify.test_notify import restart_mid_queue, serving_receiver

SECRET = "integration-webhook-secret"


class WebhookReceiver:
    """A threaded HTTP server on loopback that queues every POST it receives."""

    def __init__(self) -> None:
        self.posts: queue.Queue[tuple[float, dict[str, str], bytes]] = queue.Queue()
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                posts.put((time.time(), dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/kari"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as rec:
        yield rec


def test_a_911_call_through_the_edge_posts_the_signed_webhook(
    edge_factory: Callable[..., EdgeProcess],
    sipp: Sipp,
    redis_server: RedisServer,
    receiver: WebhookReceiver,
) -> None:
    redis_server.client().hset(
        f"e911:line:{DEFAULT_CALLER}",
        mapping={"provider_endpoint": DEFAULT_ENDPOINT, "updated_at": "2026-11-01T12:00:00Z"},
    )
    trunk = free_port("udp")
    uas = sipp.uas("uas_emergency.xml", port=trunk)
    config = edge_config(
        sip_port=free_port("both"),
        http_port=free_port("tcp"),
        emergency_trunks=[trunk_uri(trunk)],
        default_trunks=[trunk_uri(free_port("udp"))],
        store_url=redis_server.url,
        notify={
            "webhook_urls": [receiver.url, "http://127.0.0.1:9/unreachable-at-start"],
            "webhook_secret": SECRET,
            "backoff_base": 30.0,
        },
    )
    edge = edge_factory(config)
    started = time.time()
    caller = sipp.uac("uac_911.xml", edge.sip_target)
    assert caller.ok, caller.summary()
    assert uas.wait().ok
    arrived, headers, raw = receiver.posts.get(timeout=20)
    body = json.loads(raw)
    assert body["event"] == "emergency_call"
    assert body["caller"] == DEFAULT_CALLER and body["callback"] == DEFAULT_CALLER
    assert body["dialed"] == "911"
    assert body["provider_endpoint"] == DEFAULT_ENDPOINT
    assert body["outcome"] == "enriched"
    # No provisioning API in this process: the level and address are unknown here.
    assert body["level"] is None and body["address"] is None
    assert body["call_id"] and body["time"].endswith("Z")
    expected = "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-E911-Signature"], expected)
    assert len(headers["X-E911-Delivery-Id"]) == 32
    # Reported, not asserted: the first notification's delay from the call's start.
    print(f"webhook arrived {arrived - started:.3f}s after the caller started")

    def delivered() -> float:
        return (
            edge.metric("e911_sip_notifications_total", channel="webhook", outcome="delivered")
            or 0.0
        )

    deadline = time.monotonic() + 10
    while delivered() < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert delivered() == 1
    assert edge.metric("e911_sip_notification_latency_seconds_count", channel="webhook") == 1
    # The unreachable target did not stop the process; it is being retried.
    assert (
        edge.metric("e911_sip_notifications_total", channel="webhook", outcome="retried") or 0
    ) >= 1


def test_a_911_call_while_redis_is_down_is_notified_once_it_returns(
    edge_factory: Callable[..., EdgeProcess],
    sipp: Sipp,
    redis_server: RedisServer,
    receiver: WebhookReceiver,
) -> None:
    """The notification queue lives on the store's Redis. With that Redis stopped, the call
    is still placed (enriched from the edge's copy of the records), the event waits in the
    edge, and it is queued and delivered once Redis is back."""
    redis_server.client().hset(
        f"e911:line:{DEFAULT_CALLER}",
        mapping={"provider_endpoint": DEFAULT_ENDPOINT, "updated_at": "2026-11-01T12:00:00Z"},
    )
    trunk = free_port("udp")
    config = edge_config(
        sip_port=free_port("both"),
        http_port=free_port("tcp"),
        emergency_trunks=[trunk_uri(trunk)],
        default_trunks=[trunk_uri(free_port("udp"))],
        store_url=redis_server.url,
        notify={"webhook_urls": [receiver.url], "webhook_secret": SECRET},
    )
    edge = edge_factory(config)
    status, body = edge.http_get("/readyz")
    assert status == 200 and '"loaded": true' in body
    redis_server.stop()
    call_and_check(sipp, edge, trunk, DEFAULT_CALLER, DEFAULT_ENDPOINT)
    assert edge.metric("e911_sip_emergency_calls_total", outcome="enriched") == 1
    # Nothing could be queued, so nothing was sent, and nothing was dropped either.
    assert receiver.posts.empty()
    assert not edge.metric("e911_sip_notification_events_dropped_total")
    redis_server.start()
    _, headers, raw = receiver.posts.get(timeout=30)
    body = json.loads(raw)
    assert body["caller"] == DEFAULT_CALLER and body["provider_endpoint"] == DEFAULT_ENDPOINT
    assert body["outcome"] == "enriched"
    expected = "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-E911-Signature"], expected)
    # Once only: the event was queued once, not once per retry of the write.
    with pytest.raises(queue.Empty):
        receiver.posts.get(timeout=2)


def test_split_roles_notify_the_provisioned_contacts_with_the_address(
    tmp_path: Path,
    processes: list[EdgeProcess],
    sipp: Sipp,
    redis_server: RedisServer,
    receiver: WebhookReceiver,
) -> None:
    """The edge (its own process) queues the call in Redis; the provisioning process resolves
    the customer-level contacts and the standardised address and posts the webhook."""
    api_port, emulator_port, trunk = free_port("tcp"), free_port("tcp"), free_port("udp")
    line = "3215551234"
    provisioning_config = edge_config(
        sip_port=free_port("both"),
        http_port=free_port("tcp"),
        emergency_trunks=[trunk_uri(trunk)],
        default_trunks=[trunk_uri(free_port("udp"))],
        store_url=redis_server.url,
        **provisioning_tables(
            api_port, emulator_port, state_url=redis_server.url, audit_url=redis_server.url
        ),
    )
    serve(tmp_path, processes, provisioning_config, "provisioning")
    edge = serve(
        tmp_path,
        processes,
        edge_config(
            sip_port=free_port("both"),
            http_port=free_port("tcp"),
            emergency_trunks=[trunk_uri(trunk)],
            default_trunks=[trunk_uri(free_port("udp"))],
            store_url=redis_server.url,
        ),
        "edge",
    )
    status, body = api(
        api_port,
        "PUT",
        "/v1/customers/helpdesk365",
        {
            "name": "Helpdesk 365",
            "address": CUSTOMER_ADDRESS,
            "contacts": {"webhooks": [receiver.url]},
        },
    )
    assert status == 201, body
    status, account = api(api_port, "PUT", f"/v1/accounts/{line}", {"customer_id": "helpdesk365"})
    assert status == 201, account
    assert account["effective_contacts"] == {
        "emails": [],
        "sms": [],
        "webhooks": [receiver.url],
        "level": "customer",
    }
    endpoint = account["effective"]["provider_endpoint"]
    call_and_check(sipp, edge, trunk, line, endpoint)
    _, _, raw = receiver.posts.get(timeout=20)
    body = json.loads(raw)
    assert body["caller"] == line and body["provider_endpoint"] == endpoint
    assert body["level"] == "customer"
    assert body["address"] == "900 MAIN CAMPUS DR, STE 500, RALEIGH, NC 27606-5177, US"
    assert body["name"] == f"Helpdesk 365 / {line}"


async def test_the_redis_queue_hands_back_what_a_consumer_took_and_did_not_finish(
    redis_server: RedisServer,
) -> None:
    def open_queue() -> RedisStreamQueue:
        return RedisStreamQueue.from_url(
            redis_server.url, stream="t:deliveries", dead_list="t:dead", consumer="box1"
        )

    first = open_queue()
    for n in range(5):
        await first.put({"n": n})
    taken = await first.take(0.5)
    assert [item["n"] for _, item in taken] == [0, 1, 2, 3, 4]
    await first.done(taken[0][0])
    await first.dead(taken[1][0], taken[1][1], "http 410")
    await first.close()  # a restart with three taken and unfinished

    second = open_queue()
    again = await second.take(0.5)
    assert [item["n"] for _, item in again] == [2, 3, 4]
    assert await second.take(0.1) == []  # nothing new, nothing handed out twice
    await second.put({"n": 5})
    fresh = await second.take(1.0)
    assert [item["n"] for _, item in fresh] == [5]
    for entry, _ in again + fresh:
        await second.done(entry)
    assert await second.depth() == 0
    assert await second.dead_letters() == [{"item": {"n": 1}, "reason": "http 410"}]
    await second.close()


async def test_the_redis_queue_makes_its_group_again_when_redis_lost_it(
    redis_server: RedisServer,
) -> None:
    queue = RedisStreamQueue.from_url(
        redis_server.url, stream="g:events", dead_list="g:dead", consumer="box1"
    )
    await queue.put({"n": 0})
    (entry, item), *_ = await queue.take(0.5)
    await queue.done(entry)
    # Restarted without persistence: the stream and its consumer group are gone.
    redis_server.stop()
    redis_server.start()
    # Written while no group exists; the first command may meet the pooled connection the
    # old server closed, which the publisher treats as any failed write: it tries again.
    for _ in range(3):
        try:
            await queue.put({"n": 1})
            break
        except QueueError:
            continue
    else:
        pytest.fail("the queue never wrote to the restarted server")
    with pytest.raises(QueueError, match="NOGROUP"):
        await queue.take(0.1)
    # The next read makes the group from the stream's start: the entry is not skipped.
    taken = await queue.take(0.5)
    assert [item["n"] for _, item in taken] == [1]
    await queue.close()


async def test_the_redis_queue_stores_a_batch_in_order_and_reports_a_refused_one(
    redis_server: RedisServer,
) -> None:
    queue = RedisStreamQueue.from_url(
        redis_server.url, stream="b:events", dead_list="b:dead", consumer="box1"
    )
    await queue.put_many([{"n": n} for n in range(300)])
    assert await queue.depth() == 300
    seen: list[int] = []
    while len(seen) < 300:
        taken = await queue.take(0.5)
        assert taken, "the queue handed out fewer items than were put"
        seen += [item["n"] for _, item in taken]
    assert seen == list(range(300))
    # A batch Redis refuses (the key holds a string: every XADD fails with WRONGTYPE) is
    # reported as a QueueError, which makes the publisher keep it and try again.
    redis_server.client().set("b:wrongtype", "x")
    wrong = RedisStreamQueue.from_url(
        redis_server.url, stream="b:wrongtype", dead_list="b:dead2", consumer="box1"
    )
    with pytest.raises(QueueError):
        await wrong.put_many([{"n": 1}, {"n": 2}])
    assert redis_server.client().get("b:wrongtype") in (b"x", "x")
    await wrong.close()
    await queue.close()


async def test_the_redis_queue_acknowledges_a_batch_in_one_go(
    redis_server: RedisServer,
) -> None:
    def open_queue() -> RedisStreamQueue:
        return RedisStreamQueue.from_url(
            redis_server.url, stream="a:events", dead_list="a:dead", consumer="box1"
        )

    first = open_queue()
    await first.put_many([{"n": n} for n in range(6)])
    taken = await first.take(0.5)
    await first.done_many([entry for entry, item in taken if item["n"] % 2 == 0])
    await first.done_many([taken[0][0]])  # again: harmless
    await first.done_many([])
    assert await first.depth() == 3
    await first.close()  # a restart with the odd ones taken and unfinished

    second = open_queue()
    again = await second.take(0.5)
    assert [item["n"] for _, item in again] == [1, 3, 5]
    await second.done_many([entry for entry, _ in again])
    assert await second.depth() == 0
    assert redis_server.client().xpending("a:events", "notifier")["pending"] == 0
    await second.close()


async def test_the_redis_queue_acknowledges_after_the_server_forgot_its_scripts(
    redis_server: RedisServer,
) -> None:
    queue = RedisStreamQueue.from_url(
        redis_server.url, stream="f:events", dead_list="f:dead", consumer="box1"
    )
    await queue.put_many([{"n": n} for n in range(2500)])
    taken: list[str] = []
    while len(taken) < 2500:
        batch = await queue.take(0.5)
        assert batch, "the queue handed out fewer items than were put"
        taken += [entry for entry, _ in batch]
    await queue.done_many(taken[:10])
    # As after a restart or a failover of the server: the script is loaded again.
    redis_server.client().script_flush()
    # More ids than one call of Lua's unpack spreads.
    await queue.done_many(taken[10:])
    assert await queue.depth() == 0
    assert redis_server.client().xpending("f:events", "notifier")["pending"] == 0
    await queue.close()


async def test_a_notifier_restart_on_redis_streams_loses_nothing(
    redis_server: RedisServer,
) -> None:
    """The same restart as with journal files, on Redis streams and their consumer group."""

    def open_queues() -> tuple[RedisStreamQueue, RedisStreamQueue]:
        return (
            RedisStreamQueue.from_url(
                redis_server.url, stream="n:events", dead_list="n:dead", consumer="box1"
            ),
            RedisStreamQueue.from_url(
                redis_server.url, stream="n:deliveries", dead_list="n:dead", consumer="box1"
            ),
        )

    async with serving_receiver() as receiver:
        await restart_mid_queue(receiver, open_queues)
