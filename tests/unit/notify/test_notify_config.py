"""``[notify]``: defaults, the environment for secrets, errors that name the key, and the
channels the app builds from it (an unreachable target is not an error at start)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from e911_sip.app import build_notify, notify_channels
from e911_sip.config import ConfigError, StartTls, load
from e911_sip.notify.queue import FileQueue, RedisStreamQueue
from e911_sip.provisioning.emulator import EmulatorOptions, build_emulator_app


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "e911.toml"
    path.write_text(text)
    return path


def test_defaults_notify_911_only_with_no_targets() -> None:
    notify = load(None, {}).notify
    assert notify.enabled and notify.numbers == ("911",)
    assert notify.delivery.fallback.empty and notify.smtp_url is None and notify.sms_from is None
    assert notify.sms_rate == 1.0 and notify.smtp_starttls is StartTls.AUTO


def test_secrets_come_from_the_environment(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[notify]\nwebhook_urls = ["https://desk.example.com/hook"]\n'
        'smtp_url = "smtps://mail.example.com"\nqueue_file = "q/notify.jsonl"\n',
    )
    config = load(
        path,
        {
            "E911_SIP__NOTIFY__WEBHOOK_SECRET": "s3cret",
            "E911_SIP__NOTIFY__SMTP_PASSWORD": "pw",
        },
    )
    assert config.notify.webhook_secret == "s3cret" and config.notify.smtp_password == "pw"
    assert config.notify.queue_file == tmp_path / "q" / "notify.jsonl"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('numbers = ["9-1-1"]', r"\[notify\] numbers: expected dialled digits"),
        ('webhook_urls = ["desk.example.com"]', r"\[notify\] webhook_urls: expected http"),
        ('smtp_url = "mail.example.com:25"', r"\[notify\] smtp_url: expected smtp://"),
        ('smtp_starttls = "maybe"', r"\[notify\] smtp_starttls: expected auto, always or never"),
        ("sms_rate = 0", r"\[notify\] sms_rate: must be more than 0"),
        ('sms = ["front desk"]', r"\[notify\] sms: expected a phone number"),
        ('sms_from = "+19195550100"', r"\[notify\] sms_application_id: required with sms_from"),
        ("max_attempts = 0", r"\[notify\] max_attempts: must be at least 1"),
        ("pager = true", r"\[notify\] pager: unknown key"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, f"[notify]\n{text}\n"), {})


async def test_unreachable_targets_build_without_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[notify]\nwebhook_urls = ["http://192.0.2.1:9/never"]\n'
        'smtp_url = "smtp://192.0.2.1:2525"\nsms_from = "+19195550100"\n'
        'sms_application_id = "app"\n'
        f'queue_file = "{tmp_path / "queue"}"\n',
    )
    config = load(path, {})
    channels = notify_channels(config)
    assert sorted(channels) == ["email", "sms", "webhook"]
    for channel in channels.values():
        await channel.close()
    parts = build_notify(config, edge=True)
    assert parts is not None and parts.publisher is not None
    assert isinstance(parts.events, FileQueue)
    await parts.close()
    redis = load(None, {"E911_SIP__STORE__URL": "redis://127.0.0.1:1/0"})
    parts = build_notify(redis, edge=False)
    assert parts is not None and parts.publisher is None
    assert isinstance(parts.deliveries, RedisStreamQueue)
    await parts.close()
    disabled = load(None, {"E911_SIP__NOTIFY__ENABLED": "false"})
    assert build_notify(disabled, edge=True) is None


async def test_the_emulator_refuses_a_full_message_queue_with_bandwidths_body() -> None:
    clock = [100.0]
    app = build_emulator_app(
        EmulatorOptions(messaging_rate=1.0, messaging_queue_seconds=2.0), clock=lambda: clock[0]
    )
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        token = await client.post(
            "/api/v1/oauth2/token",
            data={"grant_type": "client_credentials"},
            headers={
                "Authorization": "Basic "
                + base64.b64encode(b"e911-sip-emulator:emulator-secret").decode()
            },
        )
        bearer = {"Authorization": f"Bearer {(await token.json())['access_token']}"}
        message = {
            "applicationId": "app",
            "to": ["+19195550111"],
            "from": "+19195550100",
            "text": "EMERGENCY",
        }
        path = "/api/v2/users/5555555/messages"
        statuses = []
        for _ in range(3):
            response = await client.post(path, json=message, headers=bearer)
            statuses.append(response.status)
        assert statuses == [202, 202, 429]
        assert await response.json() == {
            "type": "max-message-queue-size-exceeded",
            "description": "The SMS queue for your account is full and cannot accept more "
            "messages right now. Your allowed rate is 60 messages per minute. The capacity of "
            "this queue is 2 messages (0.0333333 minutes). Reduce your message sending rate, "
            "or contact support to increase your allowed rate.",
        }
        clock[0] += 1.0  # one message dequeued
        assert (await client.post(path, json=message, headers=bearer)).status == 202
        bad = await client.post(path, json={**message, "to": ["9195550111"]}, headers=bearer)
        assert bad.status == 400
        assert (await bad.json())["fieldErrors"][0]["fieldName"] == "to"
        assert (await client.post(path, json=message)).status == 401
