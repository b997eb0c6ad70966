"""The notify plugin: webhook, chat and email deliveries to real receivers started here.

The webhook receiver is a real HTTP server on 127.0.0.1; the SMTP server is aiosmtpd with
STARTTLS and AUTH. Signatures are checked with an HMAC computed here from the documented
rule, not with the plugin's own code.
"""

from __future__ import annotations

import asyncio
import email
import hashlib
import hmac
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections import deque
from email import policy

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web
import yaml
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from clients import ADMIN, call, consume, settle
from scrape import scrape, value
from services import free_port, make_certificate, start_server
from waits import wait_until, wait_until_async

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS_SECRET = "ops-webhook-secret-0123456789"
PAGER_SECRET = "pager-webhook-secret-0123456789"
FAST_RETRY = {"attempts": 1000, "base": 0.05, "max": 0.2}
NO_ENGINE = {"alert_engine": {"enabled": False}}


class Request:
    def __init__(self, path: str, headers: dict[str, str], body: bytes, status: int):
        self.path, self.headers, self.body, self.status = path, headers, body, status

    @property
    def json(self) -> dict:
        return json.loads(self.body)

    @property
    def delivery(self) -> str:
        return self.headers["X-Quotaserver-Delivery"]


class _Handler(tornado.web.RequestHandler):
    def initialize(self, receiver: Receiver) -> None:
        self.receiver = receiver

    async def post(self) -> None:
        rx = self.receiver
        if rx.hang:
            await rx.released.wait()  # a target that accepts and never answers
        status = rx.answers.popleft() if rx.answers else rx.status
        headers = {k: v for k, v in self.request.headers.get_all()}
        rx.requests.append(Request(self.request.path, headers, self.request.body, status))
        self.set_status(status)
        self.finish("ok" if status < 300 else "no")


class Receiver:
    """A webhook receiver: records every request, answers ``answers`` first, then ``status``."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.answers: deque[int] = deque()
        self.status = 200
        self.hang = False
        self.released = asyncio.Event()
        socks = tornado.netutil.bind_sockets(0, "127.0.0.1", family=socket.AF_INET)
        self.port = socks[0].getsockname()[1]
        self.server = tornado.httpserver.HTTPServer(
            tornado.web.Application([(r"/.*", _Handler, {"receiver": self})])
        )
        self.server.add_sockets(socks)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str, status: int | None = 200) -> list[Request]:
        return [r for r in self.requests if r.path == path and status in (None, r.status)]

    async def stop(self) -> None:
        self.released.set()
        self.server.stop()
        await self.server.close_all_connections()


@pytest.fixture
def receiver(io_loop):
    rx = Receiver()
    yield rx
    io_loop.run_sync(rx.stop)


def signed_by(secret: str, request: Request) -> bool:
    """The documented signature: sha256=<hex HMAC-SHA256 of timestamp + "." + body>."""
    stamp = request.headers["X-Quotaserver-Timestamp"]
    mac = hmac.new(secret.encode(), stamp.encode() + b"." + request.body, hashlib.sha256)
    fresh = abs(time.time() - int(stamp)) < 300  # what a receiver checks against replay
    signature = request.headers.get("X-Quotaserver-Signature", "")
    return fresh and hmac.compare_digest("sha256=" + mac.hexdigest(), signature)


async def health(app) -> dict:
    return (await call(app, "GET", "/api/ws/health", token=ADMIN)).json


async def targets(app) -> dict:
    return (await health(app))["plugins_health"]["notify"]["targets"]


async def all_done(app) -> None:
    """Every target has decided every event so far (its cursor is at the end of the log)."""
    last = app.last_seq

    async def done() -> bool:
        found = await targets(app)
        return all(t["cursor"] >= last and t["queued"] == 0 for t in found.values())

    await wait_until_async(done, "every target to reach the end of the event log")


async def target_is(app, name: str, **expected) -> None:
    async def check() -> bool:
        state = (await targets(app))[name]
        return all(state[k] == v for k, v in expected.items())

    await wait_until_async(check, f"target {name} to have {expected}")


@pytest.mark.gen_test(timeout=60)
async def test_each_alert_reaches_each_matching_route_once_signed(app_factory, receiver):
    app = await app_factory(
        plugins={
            **NO_ENGINE,
            "notify": {
                "targets": [
                    {"name": "ops", "kind": "webhook", "url": receiver.url("/ops"),
                     "secret": OPS_SECRET, "min_severity": "warning"},
                    {"name": "pager", "kind": "webhook", "url": receiver.url("/pager"),
                     "secret": PAGER_SECRET, "min_severity": "critical"},
                    {"name": "chat", "kind": "chat", "url": receiver.url("/chat"),
                     "alert_types": ["disk_full"]},
                ]
            },
        }
    )  # fmt: skip
    await app.alerts.raise_alert("disk_full", "low", "Disk <b>70%</b> full")  # chat only
    await app.alerts.raise_alert("queue_slow", "medium", "Queue slow")  # ops
    db_down = await app.alerts.raise_alert("db_down", "critical", "Database down")  # ops, pager
    await app.alerts.raise_alert("db_down", "critical", "Database down")  # a repeat: count 2
    await app.alerts.acknowledge(db_down["alert_id"], actor="ops")  # not sent again
    await app.alerts.resolve(db_down["alert_id"], actor="ops")  # sent: the alert is over
    await all_done(app)

    ops, pager, chat = receiver.at("/ops"), receiver.at("/pager"), receiver.at("/chat")
    assert [(r.json["data"]["alert_type"], r.json["data"]["status"]) for r in ops] == [
        ("queue_slow", "open"),
        ("db_down", "open"),
        ("db_down", "resolved"),
    ]
    assert [(r.json["data"]["alert_type"], r.json["data"]["status"]) for r in pager] == [
        ("db_down", "open"),
        ("db_down", "resolved"),
    ]
    assert all(signed_by(OPS_SECRET, r) for r in ops)
    assert all(signed_by(PAGER_SECRET, r) for r in pager)
    assert not any(signed_by(OPS_SECRET, r) for r in pager)  # each target its own key
    for r in ops + pager:
        assert r.json["delivery_id"] == r.delivery and r.headers["X-Quotaserver-Event"] == "alert"
        assert r.json["type"] == "alert" and r.json["seq"] >= 1
    assert len({r.delivery for r in ops + pager}) == 5  # one id per (target, event)
    assert len(receiver.requests) == 6  # nothing else was sent, to anyone
    # The chat body is what Slack-compatible incoming webhooks accept: text plus blocks.
    [message] = chat
    body = message.json
    assert body["text"] == "[LOW] disk_full: Disk <b>70%</b> full"
    assert body["blocks"][0]["type"] == "section"
    assert (
        body["blocks"][0]["text"]["text"] == "*[LOW] disk_full: Disk &lt;b&gt;70%&lt;/b&gt; full*"
    )
    assert body["blocks"][1]["type"] == "context"
    assert "X-Quotaserver-Signature" not in message.headers  # a chat target without a secret
    found = await targets(app)
    assert {n: (t["delivered"], t["failed"]) for n, t in found.items()} == {
        "ops": (3, 0),
        "pager": (2, 0),
        "chat": (1, 0),
    }
    # The dashboard's card: a plugin stats field, one line per target.
    assert app.stats_snapshot()["notifications"] == {
        "ops": "3 delivered · 0 failed · 0 queued",
        "pager": "2 delivered · 0 failed · 0 queued",
        "chat": "1 delivered · 0 failed · 0 queued",
    }


@pytest.mark.gen_test(timeout=60)
async def test_retries_with_the_same_delivery_id_until_the_receiver_answers(app_factory, receiver):
    gone = free_port()  # nothing listens there: connection refused
    app = await app_factory(
        plugins={
            **NO_ENGINE,
            "notify": {
                "retry": {"attempts": 6, "base": 0.05, "max": 0.2},
                "targets": [
                    {"name": "ops", "kind": "webhook", "url": receiver.url("/ops"),
                     "secret": OPS_SECRET},
                    {"name": "gone", "kind": "webhook", "url": f"http://127.0.0.1:{gone}/",
                     "secret": OPS_SECRET, "events": ["alert"]},
                ],
            },
        }
    )  # fmt: skip
    receiver.answers.extend([503, 503, 503])
    await app.alerts.raise_alert("db_down", "critical", "Database down")
    await wait_until(lambda: receiver.at("/ops"), "the delivery after three 503s")
    attempts = receiver.at("/ops", status=None)
    assert [r.status for r in attempts] == [503, 503, 503, 200]
    assert len({r.delivery for r in attempts}) == 1  # one delivery, four attempts
    assert all(signed_by(OPS_SECRET, r) for r in attempts)
    await target_is(app, "ops", delivered=1)
    found = await targets(app)
    assert found["ops"]["delivered"] == 1 and found["ops"]["failed"] == 0
    assert found["ops"]["last_error"] == "HTTP 503" and found["ops"]["failing"] is False

    await target_is(app, "gone", failed=1)  # after its 6 attempts
    gone_state = (await targets(app))["gone"]
    assert gone_state["failing"] is True and "Connection refused" in gone_state["last_error"]

    # A 4xx other than 408/429 is final: no retry.
    receiver.answers.append(400)
    await app.alerts.raise_alert("disk_full", "high", "Disk full")

    await target_is(app, "ops", failed=1)
    assert [r.status for r in receiver.at("/ops", status=None)][4:] == [400]
    state = await health(app)
    assert state["status"] == "degraded"  # a target whose latest delivery failed
    assert state["plugins_health"]["notify"]["targets"]["ops"]["last_error"] == "HTTP 400"
    got = await scrape(app)
    assert value(got, "quotaserver_notify_delivered_total", target="ops", kind="webhook") == 1
    assert value(got, "quotaserver_notify_failed_total", target="ops", kind="webhook") == 1
    assert value(got, "quotaserver_notify_failed_total", target="gone", kind="webhook") == 1
    assert value(got, "quotaserver_notify_failing", target="gone", kind="webhook") == 1


@pytest.mark.gen_test(timeout=120)
async def test_a_kill_9_mid_queue_loses_nothing_and_repeats_carry_the_same_id(tmp_path, receiver):
    config = {
        "quotas": {"defaults": {"shell": {"daily": 1}}},
        "plugins": {
            "system_metrics": {"enabled": False},
            **NO_ENGINE,
            "notify": {
                "retry": FAST_RETRY,
                "targets": [
                    {"name": "audit", "kind": "webhook", "url": receiver.url("/hook"),
                     "secret": {"env": "AUDIT_HOOK_SECRET"}, "events": ["violation"]},
                ],
            },
        },
    }  # fmt: skip
    env = {
        "QUOTASERVER_ADMIN_TOKEN": ADMIN,
        "QUOTASERVER_THROTTLE_SOURCE": "off",
        "AUDIT_HOOK_SECRET": OPS_SECRET,  # the YAML names the variable, not the key
    }
    receiver.status = 503  # the receiver is down: deliveries queue up
    server = await start_server(str(tmp_path), config, env=env)
    try:
        for _ in range(4):
            await consume(server, "ana", token=ADMIN)  # 1 allowed, then 3 violations
        await wait_until(
            lambda: len(receiver.at("/hook", status=503)) >= 2, "retries of the first violation"
        )

        async def all_queued() -> bool:
            return (await targets(server))["audit"]["queued"] == 3

        await wait_until_async(all_queued, "the three violations queued")
    finally:
        server.kill()  # SIGKILL: no shutdown hook, nothing flushed
    await server.wait()
    tried = {r.delivery for r in receiver.at("/hook", status=503)}
    assert len(tried) == 1  # the head of the queue, retried

    receiver.status = 200
    again = await start_server(str(tmp_path), config, env=env)
    try:
        await wait_until(lambda: len({r.delivery for r in receiver.at("/hook")}) >= 3, "3 ids")

        async def decided() -> bool:
            state = (await targets(again))["audit"]
            return state["queued"] == 0 and state["delivered"] >= 3

        await wait_until_async(decided, "the queue delivered after the restart")
    finally:
        await again.stop()
    delivered = receiver.at("/hook")
    by_id = {r.delivery: r.json for r in delivered}  # the receiver drops repeats by id
    assert len(by_id) == 3
    assert len({b["seq"] for b in by_id.values()}) == 3
    assert {(b["type"], b["data"]["username"]) for b in by_id.values()} == {("violation", "ana")}
    assert tried <= set(by_id)  # the one tried before the kill kept its id afterwards
    assert all(signed_by(OPS_SECRET, r) for r in delivered)


@pytest.mark.gen_test(timeout=60)
async def test_a_clean_restart_repeats_nothing_and_a_new_target_gets_no_history(
    app_factory, receiver
):
    def notify(*names: str) -> dict:
        return {
            **NO_ENGINE,
            "notify": {
                "targets": [
                    {"name": n, "kind": "webhook", "url": receiver.url(f"/{n}"),
                     "secret": OPS_SECRET}
                    for n in names
                ]
            },
        }  # fmt: skip

    app = await app_factory(plugins=notify("ops"))
    for i in range(3):
        await app.alerts.raise_alert(f"rule_{i}", "high", f"Problem {i}")
    await all_done(app)
    await app.stop()  # within the cursor's save interval: stop saves it
    again = await app_factory(plugins=notify("ops", "late"))
    await again.alerts.raise_alert("rule_3", "high", "Problem 3")
    await all_done(again)
    assert [r.json["data"]["alert_type"] for r in receiver.at("/ops")] == [
        "rule_0",
        "rule_1",
        "rule_2",
        "rule_3",
    ]
    assert [r.json["data"]["alert_type"] for r in receiver.at("/late")] == ["rule_3"]


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[int(len(ordered) * 0.99) - 1]


async def consume_latencies(app, user: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        resp = await consume(app, user)
        out.append(time.perf_counter() - started)
        assert resp.code == 429  # each one a violation, each one a delivery for the target
    return out


@pytest.mark.gen_test(timeout=120)
async def test_a_target_that_hangs_does_not_slow_consumes(app_factory, receiver):
    app = await app_factory(
        plugins={
            **NO_ENGINE,
            "notify": {
                "retry": FAST_RETRY,
                "targets": [
                    {"name": "hook", "kind": "webhook", "url": receiver.url("/hook"),
                     "secret": OPS_SECRET, "events": ["violation"], "timeout": 30},
                ],
            },
        }
    )  # fmt: skip
    await app.rules.set_global_limits("shell", {"daily": 1}, actor="t")
    await consume(app, "up")
    await consume(app, "down")
    await consume_latencies(app, "up", 30)  # warm-up
    up = await consume_latencies(app, "up", 200)  # the target answers at once
    await all_done(app)
    receiver.hang = True  # accepts, never answers: the worst kind of down
    down = await consume_latencies(app, "down", 200)
    state = (await targets(app))["hook"]
    assert state["queued"] >= 150  # the deliveries really were stuck behind the hung one
    assert len(receiver.at("/hook")) >= 230
    # Generous: the machine is shared; a consume that waited on the target would take 30 s.
    assert p99(down) <= max(5 * p99(up), p99(up) + 0.05), (p99(up), p99(down))
    await settle(app)


# -- email -------------------------------------------------------------------------------
class Mailbox:
    def __init__(self) -> None:
        self.messages: list[tuple[list[str], email.message.EmailMessage, bool]] = []
        self.logins: list[str] = []

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 - aiosmtpd's
        message = email.message_from_bytes(envelope.content, policy=policy.default)
        self.messages.append((list(envelope.rcpt_tos), message, session.ssl is not None))
        return "250 OK"

    def authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        ok = auth_data.login == b"alerts" and auth_data.password == b"mail-password-123"
        if ok:
            self.logins.append(mechanism)
        return AuthResult(success=ok)


@pytest.fixture
def smtp_server(tmp_path):
    import ssl

    cert, key = make_certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    box = Mailbox()
    controller = Controller(
        box,
        hostname="127.0.0.1",
        port=free_port(),
        tls_context=context,
        require_starttls=True,
        authenticator=box.authenticate,
        auth_require_tls=True,
    )
    controller.start()
    yield box, controller.port, cert
    controller.stop()


@pytest.mark.gen_test(timeout=60)
async def test_email_over_starttls_one_per_alert_then_a_digest(app_factory, smtp_server):
    box, port, cert = smtp_server
    app = await app_factory(
        plugins={
            **NO_ENGINE,
            "notify": {
                "smtp": {"host": "127.0.0.1", "port": port, "starttls": True,
                         "username": "alerts", "password": "mail-password-123",
                         "from": "quotaserver@example.org", "to": ["oncall@example.org"],
                         "ca_file": cert, "digest_after": 2, "digest_window": 3.0},
                "targets": [{"name": "mail", "kind": "email"}],
            },
        }
    )  # fmt: skip
    for i in range(5):  # within a second: more than digest_after in the window
        await app.alerts.raise_alert(f"rule_{i}", "high", f"Problem {i} & <more>")
    await wait_until(lambda: len(box.messages) == 3, "two emails and a digest", timeout=30)
    await all_done(app)
    assert len(box.messages) == 3
    subjects = [m["Subject"] for _, m, _ in box.messages]
    assert subjects == [
        "[HIGH] rule_0: Problem 0 & <more>",
        "[HIGH] rule_1: Problem 1 & <more>",
        "quotaserver digest: 3 alerts",
    ]
    for rcpt, message, tls in box.messages:
        assert rcpt == ["oncall@example.org"] and tls  # delivered after STARTTLS
        assert message["From"] == "quotaserver@example.org"
        assert message.get_content_type() == "multipart/alternative"
        assert message["X-Quotaserver-Delivery"]
    digest = box.messages[2][1]
    text = digest.get_body(("plain",)).get_content()
    page = digest.get_body(("html",)).get_content()
    for i in (2, 3, 4):
        assert f"rule_{i}: Problem {i} & <more>" in text
        assert f"rule_{i}: Problem {i} &amp; &lt;more&gt;" in page  # escaped in HTML
    assert "<more>" not in page
    assert len(box.logins) == 3  # authenticated each time
    assert set(app.threads.pools) == {"notify"}  # smtplib ran on the plugin's own threads
    assert (await targets(app))["mail"]["delivered"] == 5


# -- configuration -----------------------------------------------------------------------
def check_config(tmp_path, config: dict, **extra_env: str) -> subprocess.CompletedProcess:
    path = tmp_path / "notify.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTASERVER_")}
    env.update(PYTHONPATH=ROOT, **extra_env)
    return subprocess.run(
        [sys.executable, "-m", "quotaserver", "check-config", "--config", str(path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("target", "needle"),
    [
        ({"name": "a", "kind": "webhook", "url": "http://x/"}, "targets[0].secret: required"),
        ({"name": "a", "kind": "webhook", "url": "http://x/", "secret": "short"},
         "targets[0].secret: must be a string of at least 16"),
        ({"name": "a", "kind": "pager", "url": "http://x/"}, "targets[0].kind: must be one of"),
        ({"name": "a", "kind": "chat", "url": "ftp://x/"}, "targets[0].url: required"),
        ({"name": "a", "kind": "chat", "url": "http://x/", "events": ["stats"]},
         "targets[0].events: a non-empty list of alert, violation"),
        ({"name": "a", "kind": "chat", "url": "http://x/", "min_severity": "loud"},
         "targets[0].min_severity: one of"),
        ({"name": "a", "kind": "email"}, "targets[0]: an email target needs plugins.notify.smtp"),
    ],
)  # fmt: skip
def test_bad_settings_name_the_key_and_exit_2(tmp_path, target, needle):
    result = check_config(tmp_path, {"plugins": {"notify": {"targets": [target]}}})
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"plugins.notify.{needle}" in result.stderr
    assert "Traceback" not in result.stderr


def test_duplicate_names_and_clear_text_passwords_are_refused(tmp_path):
    twice = {"name": "a", "kind": "chat", "url": "http://x/"}
    result = check_config(tmp_path, {"plugins": {"notify": {"targets": [twice, twice]}}})
    assert result.returncode == 2 and "targets[1].name: 'a' is used" in result.stderr
    smtp = {"host": "mail.example.org", "starttls": False, "username": "u", "password": "p",
            "from": "a@example.org", "to": ["b@example.org"]}  # fmt: skip
    result = check_config(tmp_path, {"plugins": {"notify": {"smtp": smtp, "targets": []}}})
    assert result.returncode == 2 and "smtp.username: needs starttls: true" in result.stderr


def test_secrets_may_come_from_the_environment(tmp_path):
    target = {"name": "a", "kind": "webhook", "url": {"env": "HOOK_URL"},
              "secret": {"env": "HOOK_SECRET"}}  # fmt: skip
    config = {"plugins": {"notify": {"targets": [target]}}}
    result = check_config(tmp_path, config)
    assert result.returncode == 2
    assert "plugins.notify.targets[0].url: environment variable HOOK_URL is not set" in (
        result.stderr
    )
    result = check_config(
        tmp_path, config, HOOK_URL="https://hooks.example.org/x", HOOK_SECRET="short"
    )
    assert result.returncode == 2 and "targets[0].secret: must be a string of at least 16" in (
        result.stderr
    )
    result = check_config(
        tmp_path, config, HOOK_URL="https://hooks.example.org/x", HOOK_SECRET=OPS_SECRET
    )
    assert result.returncode == 0, result.stderr
    assert OPS_SECRET not in result.stdout


def test_the_operations_guide_example_is_accepted_and_its_secrets_redacted(tmp_path):
    with open(os.path.join(ROOT, "docs", "operations.md")) as fh:
        text = fh.read()
    section = text[text.index("## Routing alerts to chat, a pager and email") :]
    example = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    config = yaml.safe_load(example)
    assert {t["kind"] for t in config["plugins"]["notify"]["targets"]} == {
        "webhook",
        "chat",
        "email",
    }
    result = check_config(tmp_path, config)
    assert result.returncode == 0, result.stderr
    for secret in ("pager-hmac-key-change-me-0123", "smtp-password-change-me"):
        assert secret not in result.stdout + result.stderr
