import pytest
from clients import consume


@pytest.mark.gen_test
async def test_consume_counts(app_factory):
    app = await app_factory()
    resp = await consume(app, "alice")
    assert resp.code == 200, resp
    assert resp.json["periods"]["daily"]["used"] == 1
