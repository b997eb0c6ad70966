"""Events from plugins: reserved core types, declared types, live-only events, threads."""

import pytest
from clients import VIEWER, call, consume, ws_connect
from plugin_files import plugin_dir
from waits import wait_until

from quotaserver.plugins import PluginError, PluginEventError

FORGER = """
import threading
from quotaserver import EventEmitter, PeriodicEmitter, hookimpl

@hookimpl
def register_emitters(app):
    state = app.plugin_state("forger")

    async def start(emit):
        state["emit"] = emit

    def from_thread(emit):  # a blocking source that emits from its own thread
        if state.get("thread_go") and not state.get("thread_done"):
            state["thread_message"] = emit("note", {"from": threading.current_thread().name})
            state["thread_done"] = True

    def blocking_start(emit):
        state["blocking_start"] = emit("note", {"from": "blocking start"}, durable=False)

    return [
        EventEmitter("forger", start, event_types=("note",)),
        EventEmitter("forger_blocking", blocking_start, blocking=True),
        PeriodicEmitter("forger_thread", 0.05, from_thread, blocking=True),
    ]

@hookimpl
async def on_event(app, message):
    if message.type == "note" and message.data.get("forge_from_hook"):
        await app.publish_event("violation", {"user_id": 1})
"""


async def wait_for(predicate) -> None:
    await wait_until(predicate, "the plugin's reaction")


async def next_note(ws, seq):
    """Read notes up to the one with ``seq`` (the plugin's thread emits one of its own)."""
    got = await ws.recv_type("note")
    while got.get("seq") != seq:
        assert got.get("seq") is None or got["seq"] < seq, got
        got = await ws.recv_type("note")
    return got


async def forger_app(app_factory, tmp_path):
    return await app_factory(plugins_dir=plugin_dir(tmp_path, forger=FORGER))


@pytest.mark.gen_test(timeout=30)
async def test_a_forged_core_event_is_refused_and_reaches_no_client(app_factory, tmp_path):
    app = await forger_app(app_factory, tmp_path)
    ws = await ws_connect(app)
    await ws.recv_type("welcome")
    emit = app.plugin_state("forger")["emit"]
    seq_before = app.hub.last_seq
    for forged in ("violation", "alert", "quota_change", "throttle", "stats", "welcome"):
        with pytest.raises(PluginEventError, match=f"plugin forger may not emit '{forged}'"):
            await emit(forged, {"user_id": 1, "username": "x"})
    assert app.hub.last_seq == seq_before  # nothing persisted
    # A hook of the same plugin cannot forge through app.publish_event either.
    trigger = await emit("note", {"forge_from_hook": True})
    await next_note(ws, trigger.seq)
    await wait_for(lambda: "forger" in app.hooks.errors)
    assert "may not emit 'violation'" in app.hooks.errors["forger"]
    legit = await emit("note", {"text": "after"})
    await next_note(ws, legit.seq)
    seen = [m["type"] for m in ws.messages]
    assert "violation" not in seen and "alert" not in seen and "quota_change" not in seen
    assert "alert_engine" not in app.hooks.errors  # its on_violation never saw a forgery
    ws.close()


@pytest.mark.gen_test(timeout=30)
async def test_an_undeclared_type_is_refused(app_factory, tmp_path):
    app = await forger_app(app_factory, tmp_path)
    emit = app.plugin_state("forger")["emit"]
    with pytest.raises(PluginEventError, match="undeclared event type 'surprise'"):
        await emit("surprise", {})


@pytest.mark.gen_test(timeout=30)
async def test_declaring_a_core_type_stops_start_up(app_factory, tmp_path):
    declares = FORGER.replace('event_types=("note",)', 'event_types=("note", "alert")')
    with pytest.raises(PluginError, match="plugin forger: event type 'alert' is reserved"):
        await app_factory(plugins_dir=plugin_dir(tmp_path, forger=declares))


@pytest.mark.gen_test(timeout=30)
async def test_live_only_events_have_no_seq_and_are_not_replayed(app_factory, tmp_path):
    app = await forger_app(app_factory, tmp_path)
    ws = await ws_connect(app, "types=note")
    await ws.recv_type("welcome")
    emit = app.plugin_state("forger")["emit"]
    seq_before = app.hub.last_seq
    live = await emit("note", {"text": "live"}, durable=False)
    assert live.seq is None
    got = await ws.recv_type("note")
    while got["data"].get("text") != "live":
        got = await ws.recv_type("note")
    assert "seq" not in got
    assert app.hub.last_seq == seq_before
    durable = await emit("note", {"text": "kept"})
    again = await ws_connect(app, f"types=note&last_seq={seq_before}")
    replayed = []
    while (msg := await again.recv())["type"] != "recovered":
        if msg["type"] == "note" and "seq" in msg:
            replayed.append(msg["data"])
    assert {"text": "kept"} in replayed and {"text": "live"} not in replayed
    assert durable.seq > seq_before
    ws.close()
    again.close()


@pytest.mark.gen_test(timeout=30)
async def test_blocking_emitters_can_emit(app_factory, tmp_path):
    app = await forger_app(app_factory, tmp_path)
    state = app.plugin_state("forger")
    state["thread_go"] = True
    await wait_for(lambda: state.get("thread_done"))
    message = state["thread_message"]
    assert message.seq is not None and message.data["from"].startswith("emitter-forger_thread")
    assert state["blocking_start"].type == "note" and state["blocking_start"].seq is None
    health = (await call(app, "GET", "/api/ws/health", token=VIEWER)).json
    sources = {s["name"]: s for s in health["sources"]}
    assert sources["forger_blocking"]["healthy"] and sources["forger_thread"]["healthy"]


@pytest.mark.gen_test(timeout=30)
async def test_declared_types_filter_streams_and_plugin_events_age_out(app_factory, tmp_path):
    from conftest import FakeClock

    from quotaserver import retention
    from quotaserver.models import Event

    clock = FakeClock()
    app = await app_factory(
        clock=clock, retention__events_days=1, plugins_dir=plugin_dir(tmp_path, forger=FORGER)
    )
    # A stream may filter on a plugin's declared type: it gets those events only.
    ws = await ws_connect(app, "types=note")
    await ws.recv_type("welcome")
    emit = app.plugin_state("forger")["emit"]
    old = await emit("note", {"text": "old"})
    assert (await next_note(ws, old.seq))["data"]["text"] == "old"
    assert "note" in (await call(app, "GET", "/api/plugins", token=VIEWER)).json["event_types"]
    clock.advance(days=2)
    new = await emit("note", {"text": "new"})
    await next_note(ws, new.seq)
    assert {m["type"] for m in ws.messages} <= {"welcome", "note", "ping", "recovered"}
    # Durable plugin events live in the event log and are pruned by retention like any.
    deleted = await retention.prune(app)
    assert deleted["events"] >= 1
    kept = await app.store.run(lambda: [e.id for e in Event.select().where(Event.type == "note")])
    assert old.seq not in kept and new.seq in kept
    ws.close()


@pytest.mark.gen_test(timeout=30)
async def test_an_event_over_64_kib_or_not_json_is_refused_and_stored_nowhere(
    app_factory, tmp_path
):
    app = await forger_app(app_factory, tmp_path)
    emit = app.plugin_state("forger")["emit"]
    seq_before = app.hub.last_seq
    with pytest.raises(PluginEventError, match=r"event data is \d+ bytes, over 65536"):
        await emit("note", {"blob": "x" * (64 * 1024)})
    with pytest.raises(PluginEventError, match="event data is not JSON"):
        await emit("note", {"at": object()})
    with pytest.raises(PluginEventError, match="must be a mapping, not list"):
        await emit("note", ["not", "a", "mapping"])
    assert app.hub.last_seq == seq_before  # nothing persisted
    fits = await emit("note", {"blob": "x" * (60 * 1024)})
    assert fits.seq == seq_before + 1


@pytest.mark.gen_test(timeout=30)
async def test_the_payload_limit_is_plugin_max_payload_bytes(app_factory, tmp_path):
    app = await app_factory(
        plugins_dir=plugin_dir(tmp_path, forger=FORGER), plugin_max_payload_bytes=2048
    )
    emit = app.plugin_state("forger")["emit"]
    with pytest.raises(PluginEventError, match=r"event data is \d+ bytes, over 2048"):
        await emit("note", {"blob": "x" * 2048})
    assert (await emit("note", {"blob": "x" * 1000})).seq is not None


SNOOP = """
from quotaserver import hookimpl

@hookimpl
def on_decision(app, decision):
    try:
        app.plugin_state("forger")["emit"] = None
    except PermissionError as exc:
        app.plugin_state("snoop")["refused"] = str(exc)
"""


@pytest.mark.gen_test(timeout=30)
async def test_a_plugin_cannot_reach_another_plugins_state(app_factory, tmp_path):
    app = await app_factory(plugins_dir=plugin_dir(tmp_path, forger=FORGER, snoop=SNOOP))
    assert (await consume(app, "ann")).code == 200
    await wait_for(lambda: "refused" in app.plugin_state("snoop"))
    assert app.plugin_state("snoop")["refused"] == (
        "plugin snoop may not use the state of plugin forger"
    )
    assert app.plugin_state("forger")["emit"] is not None
