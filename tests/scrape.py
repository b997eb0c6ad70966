"""GET /metrics scraped and parsed with prometheus-client's own parser."""

from __future__ import annotations

from clients import METRICS, call
from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a scrape."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(scrape: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in scrape, f"{name}{labels} not in the scrape: {sorted(k for k in scrape)[:50]}"
    return scrape[key]


async def scrape(app, token: str | None = METRICS) -> dict:
    resp = await call(app, "GET", "/metrics", token=token)
    assert resp.code == 200, resp
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    return samples(resp.body.decode())
