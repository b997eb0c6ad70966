"""GET /api/openapi.json: a valid OpenAPI 3.1 document of every route, and a property-based
run of the real server from it (schemathesis): no 5xx, every answer matches its schema."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys

import pytest
import schemathesis
import tornado.web
from clients import ADMIN, call
from conftest import TOKENS
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate
from schemathesis.config import SchemathesisConfig
from services import ROOT, write_config
from waits import wait_until_sync

from quotaserver import urls
from quotaserver.handlers import api


@pytest.mark.gen_test
async def test_the_document_is_public_valid_and_covers_every_route_and_role(app_factory):
    app = await app_factory(dev=True)
    resp = await call(app, "GET", "/api/openapi.json", token=None)
    assert resp.code == 200 and resp.headers["Content-Type"].startswith("application/json")
    document = resp.json
    validate(document)  # raises on anything that is not OpenAPI 3.1
    operations = {
        (path, method): op for path, ops in document["paths"].items() for method, op in ops.items()
    }
    expected = 0
    for pattern, handler in urls.ROUTES + urls.DEV_ROUTES:
        for method in ("get", "post", "put", "patch", "delete"):
            if getattr(handler, method) is getattr(tornado.web.RequestHandler, method):
                continue
            expected += 1
            names = [p for p in inspect.signature(getattr(handler, method)).parameters][1:]
            path = pattern
            for name in names:
                if name in ("args", "kwargs"):
                    continue
                path = path.replace(path[path.index("(") : path.index(")") + 1], f"{{{name}}}", 1)
            op = operations[(path, method)]
            roles = getattr(handler, "method_roles", {}).get(method.upper(), handler.roles)
            assert op["x-roles"] == (["public"] if roles is None else sorted(roles | {"admin"}))
            assert "default" in op["responses"]  # the error envelope
    assert len(operations) == expected
    # The request bodies name exactly the fields the handlers accept.
    consume = operations[("/api/quotas/consume", "post")]
    body = consume["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == api.REQUEST_FIELDS
    assert body["properties"]["count"]["maximum"] == app.config["quotas.max_count"]
    assert {p["name"] for p in consume["parameters"]} == {"Idempotency-Key"}
    assert set(consume["responses"]) >= {"200", "409", "422", "429", "503", "default"}
    refund = operations[("/api/quotas/refund", "post")]
    refund_body = refund["requestBody"]["content"]["application/json"]["schema"]
    assert set(refund_body["properties"]) == set(refund_body["required"]) == api.REFUND_FIELDS
    headers = consume["responses"]["200"]["headers"]
    assert headers["RateLimit-Limit"]["deprecated"] is True
    assert "deprecated" not in headers["RateLimit-Policy"]
    # Public routes say so: no security requirement.
    assert operations[("/api/health", "get")]["security"] == []
    assert operations[("/api/openapi.json", "get")]["security"] == []


# -- the property-based run --------------------------------------------------------------
@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """One real server process for the whole run (schemathesis calls it synchronously)."""
    cwd = tmp_path_factory.mktemp("openapi")
    config = {
        "auth": {
            "tokens": TOKENS,
            "token_file": str(cwd / "admin_token"),
            # Schemathesis checks that routes refuse missing and wrong credentials; those
            # count as failed authentications, which must not lock the run out.
            "failed_attempts_per_ip": 1_000_000,
        },
        "throttle": {"cpu_bands": [[100, 1.0]], "memory_bands": [[100, 1.0]]},
        "plugins": {"system_metrics": {"enabled": False}},
        "server": {"log_level": "warning"},
    }
    # A plain process writing to a file: nothing has to drain its output while the
    # synchronous run blocks this thread.
    log = cwd / "server.log"
    path = write_config(str(cwd / "config.yaml"), config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTASERVER_")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "run.py"), "--config", path, "--port", "0"],
            cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until_sync(lambda: "listening on" in log.read_text(), "the server to listen", 60)
        yield re.search(r"http://[0-9.:]+", log.read_text()).group(0)
    finally:
        proc.kill()
        proc.wait()


def test_the_running_server_matches_its_document(server_url):
    # The Python API rather than schemathesis.pytest.from_fixture, which pytest 9 breaks.
    # Beyond the default statuses a valid request may get: 422, the documented answer to an
    # Idempotency-Key reused with another body (generated keys repeat: "0", "A"...).
    accepted = ["2xx", "3xx", "401", "403", "404", "409", "422", "429"]
    config = SchemathesisConfig.from_dict(
        {"checks": {"positive_data_acceptance": {"expected-statuses": accepted}}}
    )
    url = server_url + "/api/openapi.json"
    schema = schemathesis.openapi.from_url(url, config=config).exclude(
        tag=["pages", "session", "streams"]  # HTML, the login form, endless streams
    )
    ran = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
        def run(case):
            case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN}"})

        run()
        ran.append(operation.label)
    assert "POST /api/quotas/consume" in ran and "POST /api/quotas/refund" in ran
    assert len(ran) >= 25, ran
