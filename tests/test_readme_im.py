"""The README's IM channel setup works as written: its TOML tables load, its setWebhook call, Slack manifest and
Standard Webhooks example run against a real App. Only hosts differ: the hosted platforms cannot be reached from
tests, so Telegram's and Slack's APIs are the local stand-ins of ``tests/im_standins.py``."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from server.app import App
from server.settings import load_settings
from tests.im_standins import SlackStandIn, TelegramStandIn, WebhookReceiver
from tests.im_support import eventually, slack_headers, tg_message

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = README.read_text().split("## IM channels", 1)[1].split("\n## ", 1)[0]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", SECTION, re.S)


def readme_settings(tiny_model: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """The README's TOML tables as written, in one config file, on ports 0 with the tiny model."""
    config = tmp_path / "learnloop.toml"
    config.write_text("\n".join(blocks("toml")))
    return load_settings(
        config,
        env={},
        data_dir=tmp_path / "data",
        overrides={
            "console": {"enabled": False},
            "channels": {"port": 0},
            "server": {"port": 0},
            "model": {"name": str(tiny_model), "max_new_tokens": 4, "dtype": "float32"},
            "schedule": {"enabled": False},
        },
    )


async def test_readme_tables_and_telegram_setwebhook_call(tiny_model: Path, tmp_path: Path) -> None:
    settings = readme_settings(tiny_model, tmp_path)
    assert (
        set(settings.telegram) == {"support"}
        and set(settings.slack) == {"support"}
        and set(settings.webhooks) == {"helpdesk"}
    )
    [call] = [b for b in blocks("sh") if "setWebhook" in b]
    bot = settings.telegram["support"]
    assert bot.token is not None and bot.secret_token is not None
    telegram = TelegramStandIn(bot.token.reveal())
    await telegram.start()
    try:
        env = {**os.environ, "TELEGRAM_TOKEN": bot.token.reveal(), "TELEGRAM_SECRET_TOKEN": bot.secret_token.reveal()}
        script = call.replace("https://api.telegram.org", telegram.url)
        proc = await asyncio.create_subprocess_exec("bash", "-c", script, env=env, stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        assert proc.returncode == 0 and json.loads(out)["ok"] is True
        [registered] = telegram.calls_of("setWebhook")
        assert registered["url"] == "https://chat.example.com/hooks/telegram/support"
        assert registered["allowed_updates"] == ["message", "callback_query"]

        # the server takes the updates Telegram would now send: to that path, with that secret token
        only_telegram = dataclasses.replace(
            settings, telegram={"support": dataclasses.replace(bot, api_base=telegram.url)}, slack={}, webhooks={}
        )
        app = App(only_telegram)
        async with app.lifespan(), httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.channels_port}") as http:
            headers = {"X-Telegram-Bot-Api-Secret-Token": registered["secret_token"]}
            path = urlsplit(registered["url"]).path
            assert (await http.post(path, json=tg_message(1, "hello"), headers=headers)).status_code == 200
            await eventually(lambda: telegram.calls_of("sendMessage"), what="the reply")
    finally:
        await telegram.stop()


async def test_readme_slack_manifest_urls_and_scopes(tiny_model: Path, tmp_path: Path) -> None:
    settings = readme_settings(tiny_model, tmp_path)
    [manifest] = [json.loads(b) for b in blocks("json") if "event_subscriptions" in b]
    scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    assert {"chat:write", "app_mentions:read", "im:history", "channels:history"} <= scopes
    events = manifest["settings"]["event_subscriptions"]
    assert {"app_mention", "message.im"} <= set(events["bot_events"])
    assert manifest["settings"]["interactivity"]["is_enabled"] is True
    app_config = settings.slack["support"]
    assert app_config.signing_secret is not None and app_config.bot_token is not None
    slack = SlackStandIn(app_config.bot_token.reveal())
    await slack.start()
    try:
        only_slack = dataclasses.replace(
            settings, slack={"support": dataclasses.replace(app_config, api_base=slack.url)}, telegram={}, webhooks={}
        )
        app = App(only_slack)
        async with app.lifespan(), httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.channels_port}") as http:
            secret = app_config.signing_secret.reveal()
            check = json.dumps({"token": "t", "challenge": "c-123", "type": "url_verification"}).encode()
            response = await http.post(
                urlsplit(events["request_url"]).path, content=check, headers=slack_headers(check, secret=secret)
            )
            assert response.json() == {"challenge": "c-123"}
            dm = {
                "type": "message",
                "channel": "D1",
                "channel_type": "im",
                "user": "U1",
                "text": "hi",
                "ts": f"{time.time():.6f}",
            }
            event = json.dumps({"type": "event_callback", "team_id": "T1", "event_id": "Ev1", "event": dm}).encode()
            await http.post(
                urlsplit(events["request_url"]).path, content=event, headers=slack_headers(event, secret=secret)
            )
            [post] = await eventually(lambda: slack.posts, what="the reply")
            press = {"type": "block_actions", "user": {"id": "U1", "team_id": "T1"}, "team": {"id": "T1"},
                     "channel": {"id": "D1"}, "container": {"message_ts": post["ts"], "channel_id": "D1"},
                     "message": {"ts": post["ts"], "thread_ts": post["thread_ts"]},
                     "actions": [{"action_id": "learnloop_up", "value": post["blocks"][-1]["elements"][0]["value"], "action_ts": "1.1"}]}  # fmt: skip
            form = ("payload=" + json.dumps(press)).encode()
            path = urlsplit(manifest["settings"]["interactivity"]["request_url"]).path
            response = await http.post(
                path,
                content=form,
                headers=slack_headers(form, secret=secret) | {"content-type": "application/x-www-form-urlencoded"},
            )
            assert response.status_code == 200
            await eventually(lambda: slack.updates, what="the vote shown")
    finally:
        await slack.stop()


async def test_readme_standard_webhooks_example(tiny_model: Path, tmp_path: Path) -> None:
    settings = readme_settings(tiny_model, tmp_path)
    [example] = [b for b in blocks("python") if "webhook-signature" in b]
    sender = settings.webhooks["helpdesk"]
    assert sender.secret is not None and f'SECRET = "{sender.secret.reveal()}"' in example  # the table's secret
    receiver = WebhookReceiver(sender.secret.reveal())
    await receiver.start()
    try:
        only_webhooks = dataclasses.replace(
            settings,
            webhooks={"helpdesk": dataclasses.replace(sender, outbound_url=receiver.url + "/")},
            telegram={},
            slack={},
        )
        app = App(only_webhooks)
        async with app.lifespan():
            script = tmp_path / "send.py"
            script.write_text(example.replace("https://chat.example.com", f"http://127.0.0.1:{app.channels_port}"))
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(script), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode()
            assert out.decode().strip() == "{'status': 'accepted'}"
            [(webhook_id, event)] = await eventually(lambda: receiver.received, what="reply.created")
            assert event["type"] == "reply.created" and webhook_id == f"msg_{event['data']['message_id']}"
            assert event["data"]["thread"] == "t-42"
    finally:
        await receiver.stop()
