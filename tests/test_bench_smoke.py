"""The side-by-side benchmark runs end to end at a tiny size (numbers are not checked).

Every broadcaster (quotaserver, the naive Tornado baseline, websockets.broadcast) gets the
same trigger and clients over each of its transports, every event reaches every client,
and the consume runs get answers; the table and the plot are produced.
"""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import run_all  # noqa: E402
import sidebyside  # noqa: E402


def test_every_broadcaster_delivers_every_event_and_the_report_is_built(tmp_path):
    spec = {"sizes": [3, 8], "events": {3: 3, 8: 2}, "seconds": 0.5}
    results = run_all.run(spec, [1], server_cpus="0", consume_connections=(2,))

    runs = {(r["server"], r["transport"], r["clients"]) for r in results["fanout"]}
    assert runs == {
        (server, transport, size)
        for server in sidebyside.SERVERS
        for transport in sidebyside.TRANSPORTS[server]
        for size in (3, 8)
    }
    for r in results["fanout"]:
        assert r["delivered"] == r["expected"] == r["clients"] * r["events"], r
        assert r["events"] == spec["events"][r["clients"]]
    assert [(r["server"], r["connections"], r["batch"]) for r in results["consume"]] == [
        ("quotaserver", 2, None),
        ("tornado", 2, None),
        ("quotaserver", 8, run_all.BATCH),
    ]
    for r in results["consume"]:
        assert r["requests"] > 0 and set(r["status_counts"]) == {"200"}, r
    batched = results["consume"][-1]
    assert batched["decisions_per_s"] == pytest.approx(batched["requests_per_s"] * 100, 0.01)

    text = run_all.table(results)
    assert "| quotaserver | sse |" in text and "| websockets | ws |" in text
    assert "| quotaserver, batch of 100 | 8 |" in text and "decisions/s vs single" in text
    png = tmp_path / "p99.png"
    assert run_all.plot(results, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_sse_client_counts_only_complete_events_split_across_reads():
    """The generator's parser: an event split over TCP reads and chunk framing counts once."""

    async def scenario() -> dict:
        tracker = sidebyside.Tracker()
        client = sidebyside.StreamClient(tracker, "sse", b"")
        client.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        body = b"id: 7\nevent: quota_change\ndata: {}\n\n"
        chunk = b"%x\r\n%s\r\n" % (len(body), body)
        client.data_received(chunk[:20])
        client.data_received(chunk[20:] + chunk.replace(b"7", b"8")[:5])
        return tracker.arrivals

    arrivals = asyncio.run(scenario())
    assert list(arrivals) == [7] and len(arrivals[7]) == 1


def test_consume_with_two_workers_starts_and_stops_its_own_backplane():
    """`--workers 2` rows: run.py with two workers and the redis-server the bench starts."""
    result = asyncio.run(sidebyside.consume("quotaserver", 2, 0.5, "0", workers=2))
    assert result["server"] == "quotaserver x2"
    assert result["requests"] > 0 and set(result["status_counts"]) == {"200"}, result
