"""The broadcaster over real WebSocket and SSE connections."""

import asyncio
import base64
import os
import socket

import pytest
from clients import ADMIN, consume, sse_connect, ws_connect
from tornado.httpclient import HTTPClientError
from waits import wait_until

from quotaserver.realtime.messages import CLOSE_SLOW_CONSUMER

FAST = {"realtime__stats_interval": 0.1, "realtime__heartbeat_interval": 60.0}


async def limited_app(app_factory, limit=1, **overrides):
    # No alert engine here: its alerts would interleave with the violations under test.
    app = await app_factory(plugins={"alert_engine": {"enabled": False}}, **{**FAST, **overrides})
    await app.rules.set_global_limits("shell", {"daily": limit}, actor="test")
    return app


async def violations(app, user, n):
    """Make ``n`` violations through the real HTTP API; return their responses."""
    return [await consume(app, user, "shell", 100) for _ in range(n)]


@pytest.mark.gen_test(timeout=30)
async def test_a_consume_violation_reaches_every_websocket_and_sse_client(app_factory):
    app = await limited_app(app_factory)
    ws1, ws2 = await ws_connect(app), await ws_connect(app)
    sse = await sse_connect(app)
    for ws in (ws1, ws2):
        welcome = await ws.recv()
        assert welcome["type"] == "welcome"
        assert welcome["data"]["client_id"] and "seq" in welcome["data"]
        assert welcome["data"]["intervals"]["stats"] == 0.1
    assert (await sse.next())["event"] == "welcome"
    assert sse.retry == app.config["realtime.sse_retry_ms"]

    resp = await consume(app, "alice", "shell", 5)
    assert resp.code == 429
    for ws in (ws1, ws2):
        msg = await ws.recv_type("violation")
        assert msg["seq"] >= 1
        assert msg["timestamp"].endswith("Z")
        data = msg["data"]
        assert data["username"] == "alice" and data["command_type"] == "shell"
        assert (data["period"], data["limit"], data["attempted"]) == ("daily", 1, 5)
        assert {"user_id", "message"} <= set(data)
    event = await sse.next_type("violation")
    assert int(event["id"]) == event["message"]["seq"]
    assert event["message"]["data"]["attempted"] == 5
    ws1.close()
    ws2.close()


@pytest.mark.gen_test(timeout=30)
async def test_full_stats_snapshot_then_only_changed_fields(app_factory):
    app = await app_factory(**FAST)
    await consume(app, "bo", "code", 1)
    await wait_until(
        lambda: app.hub.stats.current.get("commands_today") == 1, "a stats tick with the consume"
    )
    ws = await ws_connect(app)
    assert (await ws.recv())["type"] == "welcome"
    snapshot = await ws.recv()
    assert snapshot["type"] == "stats" and "seq" not in snapshot
    assert snapshot["data"]["delta"] is False
    for field in (
        "total_users",
        "active_users_today",
        "commands_today",
        "violations_today",
        "high_utilization_count",
        "average_throttle_factor",
        "system_load",
    ):
        assert field in snapshot["data"], field
    assert snapshot["data"]["commands_today"] == 1

    # Quiet: stats ticks with nothing changed send nothing. The pong answers a message sent
    # after those ticks, so anything they had sent would arrive before it.
    app.broadcast_stats()
    app.broadcast_stats()
    await ws.send({"type": "ping"})
    assert (await ws.recv())["type"] == "pong"
    await consume(app, "bo", "code", 4)
    delta = await ws.recv_type("stats", timeout=3)
    assert delta["data"]["delta"] is True
    assert delta["data"]["commands_today"] == 5
    assert "total_users" not in delta["data"]  # unchanged: bo already existed
    assert "system_load" not in delta["data"]
    ws.close()


async def collect_durable(ws, until_type="recovered", timeout=5.0):
    out = []
    while True:
        msg = await ws.recv(timeout)
        if msg is None:
            raise ConnectionError("closed")
        if msg["type"] == until_type:
            return out, msg
        if "seq" in msg:
            out.append(msg)


@pytest.mark.gen_test(timeout=30)
async def test_websocket_recovery_replays_exactly_the_missed_events(app_factory):
    app = await limited_app(app_factory)
    ws = await ws_connect(app)
    await violations(app, "cy", 2)
    seen = [(await ws.recv_type("violation"))["seq"] for _ in range(2)]
    ws.close()
    missed = [r.json["violation"]["attempted"] for r in await violations(app, "cy", 3)]
    assert len(missed) == 3

    again = await ws_connect(app, f"last_seq={seen[-1]}")
    replayed, recovered = await collect_durable(again)
    assert [m["type"] for m in replayed] == ["violation"] * 3
    seqs = [m["seq"] for m in replayed]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3 and seqs[0] > seen[-1]
    assert recovered["data"]["recovered"] is True and recovered["data"]["missed"] == 3
    # Then live events, with no duplicate of the replayed ones.
    await violations(app, "cy", 1)
    live = await again.recv_type("violation")
    assert live["seq"] > seqs[-1]
    again.close()


@pytest.mark.gen_test(timeout=30)
async def test_sse_recovery_with_last_event_id_header_and_query(app_factory):
    app = await limited_app(app_factory)
    sse = await sse_connect(app)
    await violations(app, "di", 1)
    first = await sse.next_type("violation")
    sse.fetch.cancel()
    await violations(app, "di", 2)

    resumed = await sse_connect(app, headers={"Last-Event-ID": first["id"]})
    got = [await resumed.next_type("violation"), await resumed.next_type("violation")]
    assert [int(e["id"]) for e in got] == [int(first["id"]) + 1, int(first["id"]) + 2]
    recovered = await resumed.next_type("recovered")
    assert recovered["message"]["data"] == {
        "recovered": True,
        "missed": 2,
        "seq": int(got[-1]["id"]),
    }

    by_query = await sse_connect(app, f"last_event_id={first['id']}")
    assert int((await by_query.next_type("violation"))["id"]) == int(first["id"]) + 1


@pytest.mark.gen_test(timeout=40)
async def test_recovery_works_across_a_server_restart(app_factory):
    app = await limited_app(app_factory)
    ws = await ws_connect(app)
    await violations(app, "ed", 1)
    last = (await ws.recv_type("violation"))["seq"]
    await violations(app, "ed", 2)  # missed after the stream broke below
    await app.stop()
    app2 = await app_factory(plugins={"alert_engine": {"enabled": False}}, **FAST)  # same DB
    await violations(app2, "ed", 1)
    resumed = await ws_connect(app2, f"last_seq={last}")
    # ws saw only the first before reading; events 2 and 3 (before restart) + 4 (after).
    replayed, recovered = await collect_durable(resumed)
    assert [m["seq"] for m in replayed] == [last + 1, last + 2, last + 3]
    assert recovered["data"]["missed"] == 3
    sse = await sse_connect(app2, f"last_event_id={last}")
    ids = [int((await sse.next_type("violation"))["id"]) for _ in range(3)]
    assert ids == [last + 1, last + 2, last + 3]


@pytest.mark.parametrize(("cursor", "reason"), [("abc", "invalid_cursor"), ("-4", "invalid_cursor"),
                                                ("999999", "unknown_cursor")])  # fmt: skip
@pytest.mark.gen_test(timeout=30)
async def test_garbage_cursor_fails_closed(app_factory, cursor, reason):
    app = await limited_app(app_factory)
    await violations(app, "fi", 1)
    ws = await ws_connect(app, f"last_seq={cursor}")
    replayed, recovered = await collect_durable(ws)
    assert replayed == []
    assert recovered["data"]["recovered"] is False
    assert recovered["data"]["reason"] == reason
    sse = await sse_connect(app, headers={"Last-Event-ID": cursor})
    event = await sse.next_type("recovered")
    assert event["message"]["data"]["recovered"] is False
    assert event["message"]["data"]["reason"] == reason


@pytest.mark.gen_test(timeout=30)
async def test_more_missed_than_replay_limit_is_not_recovered(app_factory):
    app = await limited_app(app_factory, realtime__replay_limit=3, realtime__ring_size=0)
    ws = await ws_connect(app)
    welcome = await ws.recv()
    start = welcome["data"]["seq"]
    ws.close()
    await violations(app, "gu", 5)
    again = await ws_connect(app, f"last_seq={start}")
    replayed, recovered = await collect_durable(again)
    assert replayed == []
    assert recovered["data"]["recovered"] is False
    assert recovered["data"]["reason"] == "too_many_missed"
    # Live events still flow after a failed recovery.
    await violations(app, "gu", 1)
    assert (await again.recv_type("violation"))["seq"] == start + 6


@pytest.mark.gen_test(timeout=30)
async def test_connection_past_the_limit_gets_503_on_both_transports(app_factory):
    app = await app_factory(**FAST, realtime__max_connections=2)
    a, b = await ws_connect(app), await ws_connect(app)
    await a.recv_type("welcome")
    await b.recv_type("welcome")
    with pytest.raises(HTTPClientError) as refused:  # before the upgrade, like SSE
        await ws_connect(app)
    assert refused.value.code == 503
    sse = await sse_connect(app)
    await sse.fetch
    assert sse.code == 503
    a.close()
    await wait_until(lambda: app.hub.count() == 1, "the closed client to leave the hub")
    d = await ws_connect(app)
    assert (await d.recv())["type"] == "welcome"


async def raw_websocket(
    port: int, token: str = ADMIN, pause: bool = True
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket client that completes the handshake, then never answers a ping and (with
    ``pause``) never reads again."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            "GET /ws/admin/quotas HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert b" 101 " in head.split(b"\r\n")[0], head
    if pause:
        writer.transport.pause_reading()  # stop reading: the server's writes back up
    return reader, writer


async def read_close_frame(reader: asyncio.StreamReader) -> tuple[int, str]:
    """Skip server frames (pings included, never answered) up to the close frame."""
    while True:
        b0, b1 = await reader.readexactly(2)
        length = b1 & 0x7F
        if length == 126:
            length = int.from_bytes(await reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await reader.readexactly(8), "big")
        payload = await reader.readexactly(length)
        if b0 & 0x0F == 0x8:
            return int.from_bytes(payload[:2], "big"), payload[2:].decode()


@pytest.mark.gen_test(timeout=60)
async def test_a_client_that_stops_reading_delays_no_one_and_memory_stays_bounded(app_factory):
    app = await app_factory(**FAST, realtime__client_queue=20, realtime__client_queue_bytes=65536)
    _, stuck = await raw_websocket(app.port)
    healthy = await ws_connect(app)
    await healthy.recv_type("welcome")
    await wait_until(lambda: app.hub.count("websocket") == 2, "both clients in the hub")
    payload = {"note": "x" * 8000}
    peak = 0
    sent = 0
    # Up to ~24 MB, more than loopback socket buffers hold; it stops once the stuck one is
    # closed, so a busy machine costs rounds, not a timeout.
    while app.hub.slow_closed == 0 and sent < 3000:
        message = await app.publish_event("quota_change", {**payload, "i": sent})
        sent += 1
        got = await healthy.recv_type("quota_change", timeout=20)
        assert got["seq"] == message.seq  # the healthy client keeps pace, in order
        for client in app.hub.clients:
            peak = max(peak, client.pending_bytes)
    assert app.hub.slow_closed == 1, f"the stuck client was never closed after {sent} events"
    assert app.hub.count("websocket") == 1  # only the healthy one is left
    assert peak <= 65536 + 8200  # bounded by the byte cap (+ one message)
    stuck.close()
    healthy.close()


@pytest.mark.gen_test(timeout=30)
async def test_slow_consumer_close_code_is_documented(app_factory):
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "protocol.md")) as fh:
        assert f"| {CLOSE_SLOW_CONSUMER} |" in fh.read()


@pytest.mark.gen_test(timeout=30)
async def test_idle_clients_survive_longer_than_the_timeout(app_factory):
    app = await app_factory(
        realtime__stats_interval=60.0,
        realtime__heartbeat_interval=0.2,
        realtime__client_timeout=0.5,
    )
    ws = await ws_connect(app)
    sse = await sse_connect(app)
    await ws.recv_type("welcome")
    # Four timeouts in which the client sends nothing (but reads, as browsers do).
    deadline = asyncio.get_running_loop().time() + 2.0
    while asyncio.get_running_loop().time() < deadline:
        await ws.recv(timeout=1.0)
    assert app.hub.count("websocket") == 1 and app.hub.count("sse") == 1
    ping = await ws.recv_type("ping")
    assert "seq" not in ping
    assert (await sse.next_type("ping"))["message"]["type"] == "ping"
    assert sse.comments >= 1  # SSE heartbeats are also comment lines
    ws.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_dead_peer_is_dropped_after_the_timeout(app_factory):
    app = await app_factory(
        realtime__stats_interval=60.0,
        realtime__heartbeat_interval=60.0,
        realtime__client_timeout=0.5,
    )
    reader, dead = await raw_websocket(app.port, pause=False)  # reads, never answers pings
    # The reaper's own close frame proves it was admitted and then dropped for silence.
    code, reason = await asyncio.wait_for(read_close_frame(reader), 20)
    assert (code, reason) == (1001, "ping timeout")
    await wait_until(lambda: app.hub.count("websocket") == 0, "the dead peer to leave the hub")
    dead.close()


@pytest.mark.gen_test(timeout=40)
async def test_a_dead_peer_goes_at_the_documented_timeout_not_a_third_later(app_factory):
    # The bound issue 22 asks for: closed at client_timeout (docs/protocol.md: within 1 s
    # after it), where a reaper every timeout / 3 closed a peer up to 1.33 s late.
    app = await app_factory(
        realtime__stats_interval=60.0,
        realtime__heartbeat_interval=60.0,
        realtime__client_timeout=4.0,
    )
    loop = asyncio.get_running_loop()
    # The first peer's close marks a reaper run; the second connects right after it, the
    # phase where a reaper every timeout / 3 is latest (it next looks 1.33 s past 4 s).
    first, first_writer = await raw_websocket(app.port, pause=False)
    await asyncio.wait_for(read_close_frame(first), 20)
    first_writer.close()
    started = loop.time()
    reader, dead = await raw_websocket(app.port, pause=False)
    code, _ = await asyncio.wait_for(read_close_frame(reader), 20)
    elapsed = loop.time() - started
    dead.close()
    assert code == 1001
    assert 4.0 * 0.9 <= elapsed < 4.0 * 1.25, elapsed


@pytest.mark.gen_test(timeout=30)
async def test_type_filters_by_query_and_subscribe_message(app_factory):
    app = await limited_app(app_factory)
    only_alerts = await ws_connect(app, "types=alert")
    everything = await ws_connect(app)
    await only_alerts.recv_type("welcome")
    await violations(app, "hu", 1)
    await everything.recv_type("violation")
    await app.alerts.raise_alert("test", "high", "filtered alert")
    alert = await only_alerts.recv_type("alert")
    assert alert["data"]["message"] == "filtered alert"
    assert not [m for m in only_alerts.messages if m["type"] in ("violation", "stats")]

    await everything.send({"type": "subscribe", "types": ["violation"]})
    subscribed = await everything.recv_type("subscribed")
    assert subscribed["data"]["types"] == ["violation"]
    await app.alerts.raise_alert("test2", "low", "not for you")
    await violations(app, "hu", 1)
    got = await everything.recv_type("violation")
    assert got["data"]["username"] == "hu"
    since = everything.messages[everything.messages.index(subscribed) :]
    assert [m["type"] for m in since if m["type"] in ("alert", "stats")] == []
    bad = await sse_connect(app, "types=Not-A-Type")
    await bad.fetch
    assert bad.code == 400


@pytest.mark.gen_test(timeout=30)
async def test_bad_client_messages_get_errors_then_a_policy_close(app_factory):
    app = await app_factory(**FAST)
    other = await ws_connect(app)
    ws = await ws_connect(app)
    await ws.recv_type("welcome")
    await ws.send("this is not json")
    assert (await ws.recv_type("error"))["data"]["code"] == "invalid_json"
    await ws.send({"type": "launch_missiles"})
    assert (await ws.recv_type("error"))["data"]["code"] == "unknown_type"
    await ws.send({"type": "subscribe", "types": "violation"})
    assert (await ws.recv_type("error"))["data"]["code"] == "invalid_subscribe"
    await ws.send({"type": "ping"})
    assert (await ws.recv_type("pong"))["type"] == "pong"
    for _ in range(5):
        await ws.send("{")
    assert await ws.closed() == 1008
    # The other client is unaffected.
    await app.publish_event("quota_change", {"after": "abuse"})
    assert (await other.recv_type("quota_change"))["data"]["after"] == "abuse"

    binary = await ws_connect(app)
    await binary.recv_type("welcome")
    await binary.send(b"\x00\x01")
    assert await binary.closed() == 1003


@pytest.mark.gen_test(timeout=30)
async def test_shutdown_closes_websockets_with_the_given_code_and_ends_sse(app_factory):
    app = await app_factory(**FAST)
    ws = await ws_connect(app)
    sse = await sse_connect(app)
    await ws.recv_type("welcome")
    await sse.next_type("welcome")
    await app.stop(code=1012, reason="restart")
    assert await ws.closed() == 1012
    await asyncio.wait_for(sse.fetch, 5)
    assert app.hub.count() == 0


@pytest.mark.gen_test(timeout=30)
async def test_prebuilt_frames_of_every_length_class_reach_clients_intact(app_factory):
    app = await app_factory(**FAST)
    ws = await ws_connect(app, "types=quota_change")
    await ws.recv_type("welcome")
    # Payload lengths around the 7-bit, 16-bit and 64-bit frame-length encodings.
    for size in (1, 40, 126 - 90, 200, 65535 - 120, 65536, 200_000):
        message = await app.publish_event("quota_change", {"note": "é" * (size // 2)})
        got = await ws.recv_type("quota_change")
        assert got["seq"] == message.seq
        assert got["data"]["note"] == "é" * (size // 2)
    ws.close()


@pytest.mark.gen_test(timeout=30)
async def test_simultaneous_handshakes_cannot_exceed_max_connections(app_factory):
    app = await app_factory(**FAST, realtime__max_connections=2)
    attempts = await asyncio.gather(*(ws_connect(app) for _ in range(8)), return_exceptions=True)
    clients = [c for c in attempts if not isinstance(c, BaseException)]
    # Admission and registration run without a pause between them (Tornado calls open()
    # right after get() admitted): the other six are refused 503 before the upgrade.
    refusals = [e for e in attempts if isinstance(e, BaseException)]
    assert len(refusals) == 6 and all(
        isinstance(e, HTTPClientError) and e.code == 503 for e in refusals
    ), refusals
    firsts = await asyncio.gather(*(c.recv(timeout=5) for c in clients))
    assert [m and m["type"] for m in firsts] == ["welcome"] * 2
    assert app.hub.count() == 2


@pytest.mark.gen_test(timeout=30)
async def test_events_published_out_of_order_reach_live_and_resuming_clients(app_factory):
    from quotaserver.realtime.messages import Message

    app = await app_factory(**FAST)
    ws = await ws_connect(app, "types=quota_change")
    start = (await ws.recv_type("welcome"))["data"]["seq"]
    # Two worker threads committed start+1 and start+2; the second one was published first.
    second = Message("quota_change", {"n": 2}, seq=start + 2)
    first = Message("quota_change", {"n": 1}, seq=start + 1)
    app.hub.publish(second)
    app.hub.publish(first)
    got = [(await ws.recv_type("quota_change"))["seq"] for _ in range(2)]
    assert got == [start + 1, start + 2]  # held back until the gap closed: seq order
    resumed = await ws_connect(app, f"last_seq={start}&types=quota_change")
    replayed, recovered = await collect_durable(resumed)
    assert [m["seq"] for m in replayed] == [start + 1, start + 2]  # in order, from the ring
    assert recovered["data"]["missed"] == 2
    ws.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_committed_event_is_published_even_if_its_caller_is_cancelled(app_factory):
    from quotaserver.events import last_seq

    app = await app_factory(**FAST)
    ws = await ws_connect(app, "types=quota_change")
    await ws.recv_type("welcome")
    # An emitter timing out (or a shutdown) cancels the coroutine mid-write.
    task = asyncio.ensure_future(app.publish_event("quota_change", {"cancelled": True}))
    await asyncio.sleep(0)
    task.cancel()
    got = await ws.recv_type("quota_change")
    assert got["data"] == {"cancelled": True}
    assert app.hub.last_seq == await app.store.run(last_seq) == got["seq"]
    assert task.cancelled()
    ws.close()
