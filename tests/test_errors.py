"""Domain errors carry their HTTP status and code; one place (BaseHandler.write_error via
error_envelope) renders them. Request bodies go through one json_body helper."""

import pytest
from clients import ADMIN, SERVICE, call

from quotaserver.alerts import AlertNotFound
from quotaserver.auth import AuthError
from quotaserver.db import DatabaseBusy
from quotaserver.errors import DomainError, error_id
from quotaserver.handlers.base import ApiError, error_envelope, json_body
from quotaserver.quota import QuotaError, UnknownCommandType
from quotaserver.rules import UnknownUser

API = "/api/admin/quotas"


def assert_error(resp, status, code):
    assert resp.code == status, (resp.code, resp.body)
    assert resp.json == {"error": {"code": code, "message": resp.json["error"]["message"]}}
    assert resp.json["error"]["message"]


class Teapot(DomainError):
    status = 418
    code = "teapot"
    default_message = "short and stout"


def test_domain_errors_carry_status_code_and_headers():
    cases = [
        (Teapot(), 418, "teapot", "short and stout", {}),
        (UnknownUser(), 404, "unknown_user", "no such user", {}),
        (AlertNotFound(), 404, "unknown_alert", "no such alert", {}),
        (QuotaError("invalid_field", "bad"), 400, "invalid_field", "bad", {}),
        (UnknownCommandType("x", 422), 422, "unknown_command_type", "unknown command type 'x'", {}),
        (AuthError(503, "unavailable", "later"), 503, "unavailable", "later", {"Retry-After": "5"}),
        (ApiError(429, "slow", "slow down", {"Retry-After": "3"}), 429, "slow", "slow down",
         {"Retry-After": "3"}),
    ]  # fmt: skip
    for exc, status, code, message, headers in cases:
        # The status Tornado passes in (500 for a non-HTTPError) is replaced by the error's.
        assert error_envelope(exc, 500, "Internal Server Error") == (
            status,
            headers,
            {"error": {"code": code, "message": message}},
        ), exc
    # Plugins calling services still catch the familiar bases.
    assert isinstance(UnknownUser(), LookupError) and isinstance(QuotaError("a", "b"), ValueError)
    # A database error: a generic message and the id of the log line that has the details.
    busy = DatabaseBusy('could not connect to server at "db.internal" (10.0.0.5), port 5432')
    status, headers, body = error_envelope(busy, 500, "x")
    assert (status, headers) == (503, {"Retry-After": "1"})
    assert body == {
        "error": {
            "code": "database_busy",
            "message": "the database is busy; retry",
            "error_id": error_id(busy),
        }
    }
    # Anything else is a bare 500 with an error id, never its text.
    bug = RuntimeError("secret")
    assert error_envelope(bug, 500, "x") == (
        500,
        {},
        {
            "error": {
                "code": "internal_error",
                "message": "internal server error",
                "error_id": error_id(bug),
            }
        },
    )
    assert len({error_id(bug), error_id(busy), error_id(RuntimeError())}) == 3


@pytest.mark.gen_test
async def test_service_domain_errors_render_through_the_one_place(app_factory):
    app = await app_factory(quotas__unknown_command_status=422)
    # RuleService raises UnknownUser: no handler translates it.
    assert_error(await call(app, "POST", f"{API}/users/nobody/reset", {}), 404, "unknown_user")
    # AlertService raises AlertNotFound.
    assert_error(await call(app, "POST", f"{API}/alerts/999/acknowledge"), 404, "unknown_alert")
    # Auth raises AuthError(409).
    body = {"name": "dup", "role": "viewer"}
    assert (await call(app, "POST", "/api/admin/tokens", body)).code == 201
    assert_error(await call(app, "POST", "/api/admin/tokens", body), 409, "conflict")
    # QuotaService raises UnknownCommandType with the configured status.
    body = {"user": "alice", "command_type": "nope"}
    assert_error(
        await call(app, "POST", "/api/quotas/consume", body, token=SERVICE),
        422,
        "unknown_command_type",
    )
    # RuleService validation: QuotaError (400).
    resp = await call(app, "PUT", f"{API}/rules/shell", {"limits": {"daily": -1}}, token=ADMIN)
    assert_error(resp, 400, "invalid_field")


def test_json_body_checks_fields_required_and_control_characters():
    assert json_body({"a": 1}, {"a", "b"}, ("a",)) == {"a": 1}
    for body, code in [
        ([1], "invalid_json"),
        ({"a": 1, "zz": 2}, "unknown_field"),
        ({"b": 1}, "missing_field"),
        ({"a": "x\x00y"}, "invalid_field"),
        ({"a": {"k\x1b": 1}}, "invalid_field"),
        ({"a": ["ok", "\x7f"]}, "invalid_field"),
    ]:
        with pytest.raises(ApiError) as caught:
            json_body(body, {"a", "b"}, ("a",))
        assert (caught.value.status, caught.value.code) == (400, code), body


@pytest.mark.gen_test
async def test_every_json_body_is_checked_the_same_way(app_factory):
    app = await app_factory()
    service = SERVICE
    posts = [  # (method, path, a valid body, a required field or None, token)
        ("POST", "/api/quotas/consume", {"user": "al", "command_type": "shell"}, "user", service),
        ("POST", "/api/quotas/check", {"user": "al", "command_type": "shell"}, "command_type",
         service),
        ("PUT", f"{API}/rules/shell", {"limits": {"daily": 5}}, "limits", ADMIN),
        ("POST", f"{API}/rules", {"command_type": "shell", "limits": {"daily": 5}}, "limits",
         ADMIN),
        ("PUT", f"{API}/users/al/limits/shell", {"limits": {"daily": 5}}, "limits", ADMIN),
        ("POST", f"{API}/users/al/reset", {"command_type": "shell"}, None, ADMIN),
        ("POST", "/api/admin/tokens", {"name": "t1", "role": "viewer"}, None, ADMIN),
    ]  # fmt: skip
    for method, path, body, required, token in posts:
        resp = await call(app, method, path, {**body, "extra": 1}, token=token)
        assert_error(resp, 400, "unknown_field")
        if required is not None:
            missing = {k: v for k, v in body.items() if k != required}
            assert_error(await call(app, method, path, missing, token=token), 400, "missing_field")
        key = next((k for k, v in body.items() if isinstance(v, str)), None)
        bad = {**body, key: "a\x01b"} if key else {**body, "limits": {"da\x01ily": 5}}
        assert_error(await call(app, method, path, bad, token=token), 400, "invalid_field")
        assert_error(await call(app, method, path, raw=b"[1]", token=token), 400, "invalid_json")


@pytest.mark.gen_test
async def test_a_bug_hit_in_a_loop_logs_its_traceback_once_then_one_short_line(
    app_factory, monkeypatch, caplog
):
    app = await app_factory()

    async def broken(user: str) -> None:
        raise RuntimeError("a bug, not bad input")

    monkeypatch.setattr(app.quota, "user_status", broken)  # fault injection: a server bug
    answers = [await call(app, "GET", "/api/quotas/users/lee", token=SERVICE) for _ in range(3)]
    assert [a.code for a in answers] == [500] * 3
    ids = [a.json["error"]["error_id"] for a in answers]
    records = [r for r in caplog.records if r.getMessage().startswith("uncaught exception")]
    assert len(records) == 3  # one per request
    assert [r.exc_info is not None for r in records] == [True, False, False]
    for record, ident in zip(records, ids, strict=True):
        assert f"(error {ident})" in record.getMessage()
    assert "RuntimeError at test_errors.py:" in records[1].getMessage()
