"""Real clients for tests: HTTP JSON calls, a WebSocket reader and an SSE reader."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.httputil import HTTPHeaders
from tornado.websocket import WebSocketClientConnection, websocket_connect
from waits import DEFAULT_TIMEOUT, wait_until

ADMIN = "admin-token-for-tests-0123456789"
VIEWER = "viewer-token-for-tests-0123456789"
SERVICE = "service-token-for-tests-0123456789"
METRICS = "metrics-token-for-tests-0123456789"
FORM = "application/x-www-form-urlencoded"
SESSION_COOKIE = "qs_session"  # quotaserver.sessions.SESSION_COOKIE


class Response:
    def __init__(self, code: int, headers: Any, body: bytes):
        self.code = code
        self.headers = headers
        self.body = body

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.code} {self.body[:200]!r}>"


async def call(
    app: Any,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = ADMIN,
    headers: dict[str, str] | None = None,
    raw: bytes | str | None = None,
) -> Response:
    """One HTTP request to the running app; never raises for 4xx/5xx."""
    hdrs = {"Content-Type": "application/json"}
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    hdrs.update(headers or {})
    data = raw if raw is not None else (json.dumps(body) if body is not None else None)
    if data is None and method in ("POST", "PUT", "PATCH"):
        data = b""
    request = HTTPRequest(
        app.url + path,
        method=method,
        headers=hdrs,
        body=data,
        allow_nonstandard_methods=True,
        follow_redirects=False,
        request_timeout=30,
    )
    resp = await AsyncHTTPClient().fetch(request, raise_error=False)
    return Response(resp.code, resp.headers, resp.body or b"")


def cookies_of(resp: Any) -> dict[str, str]:
    """The cookies a response sets, by name."""
    jar = {}
    for header in resp.headers.get_list("Set-Cookie"):
        name, _, value = header.split(";", 1)[0].partition("=")
        jar[name.strip()] = value.strip().strip('"')
    return jar


async def login(
    app: Any, field: str, value: str, headers: dict[str, str] | None = None
) -> tuple[Response, str]:
    """The login form as a browser uses it: GET (XSRF cookie), then POST ``field``
    (``token`` or ``code``). Returns the POST's response and the XSRF token."""
    form = await call(app, "GET", "/login", token=None)
    xsrf = cookies_of(form)["_xsrf"]
    body = f"{field}={quote(value)}&_xsrf={xsrf}"
    hdrs = {"Cookie": f"_xsrf={xsrf}", "Content-Type": FORM, **(headers or {})}
    return await call(app, "POST", "/login", raw=body, token=None, headers=hdrs), xsrf


async def session_headers(app: Any, token: str) -> dict[str, str]:
    """The headers of a signed-in browser: session and XSRF cookies, the XSRF header."""
    resp, xsrf = await login(app, "token", token)
    assert resp.code == 302, resp
    jar = f"{SESSION_COOKIE}={cookies_of(resp)[SESSION_COOKIE]}; _xsrf={xsrf}"
    return {"Cookie": jar, "X-XSRFToken": xsrf}


async def consume(
    app: Any, user: str, command_type: str = "shell", count: int = 1, token: str = SERVICE
) -> Response:
    return await call(
        app, "POST", "/api/quotas/consume",
        {"user": user, "command_type": command_type, "count": count}, token=token,
    )  # fmt: skip


async def settle(app: Any, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Wait for background plugin reactions (they run after publish) to finish.

    Fails when they never do: a "nothing happened" check after a silent give-up would
    check nothing.
    """
    await wait_until(lambda: not app._tasks, "background plugin reactions to finish", timeout)


class WsClient:
    """A WebSocket client that collects parsed messages."""

    def __init__(self, conn: WebSocketClientConnection):
        self.conn = conn
        self.messages: list[dict] = []

    async def recv(self, timeout: float = 5.0) -> dict | None:
        raw = await asyncio.wait_for(self.conn.read_message(), timeout)
        if raw is None:
            return None
        msg = json.loads(raw)
        self.messages.append(msg)
        return msg

    async def recv_type(self, type: str, timeout: float = 5.0) -> dict:
        """Read until a message of ``type`` arrives (others are kept in ``messages``)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            msg = await self.recv(max(left, 0.01))
            if msg is None:
                raise ConnectionError(f"closed ({self.conn.close_code}) before {type}")
            if msg["type"] == type:
                return msg

    async def send(self, obj: Any) -> None:
        if isinstance(obj, bytes):
            await self.conn.write_message(obj, binary=True)
        else:
            await self.conn.write_message(obj if isinstance(obj, str) else json.dumps(obj))

    async def closed(self, timeout: float = 5.0) -> int | None:
        """Wait for the server to close; return the close code."""
        while True:
            raw = await asyncio.wait_for(self.conn.read_message(), timeout)
            if raw is None:
                return self.conn.close_code
            self.messages.append(json.loads(raw))

    def close(self) -> None:
        self.conn.close()


async def ws_connect(
    app: Any, query: str = "", token: str | None = ADMIN, headers: dict | None = None
) -> WsClient:
    url = app.url.replace("http://", "ws://") + "/ws/admin/quotas" + (f"?{query}" if query else "")
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    conn = await websocket_connect(HTTPRequest(url, headers=hdrs, request_timeout=10))
    return WsClient(conn)


class SseClient:
    """Reads a text/event-stream response into parsed events."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[dict] = asyncio.Queue()
        self.all: list[dict] = []
        self.comments = 0
        self.retry: int | None = None
        self._buffer = b""
        self.fetch: asyncio.Future | None = None
        self.code: int | None = None
        self.headers: Any = None

    def _header(self, line: str) -> None:
        if line.startswith("HTTP/"):
            self.code = int(line.split()[1])

    def _chunk(self, chunk: bytes) -> None:
        self._buffer += chunk
        while b"\n\n" in self._buffer:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            event: dict[str, Any] = {}
            for line in block.decode().split("\n"):
                if line.startswith(":"):
                    self.comments += 1
                elif line.startswith("retry:"):
                    self.retry = int(line[6:].strip())
                elif ":" in line:
                    field, _, value = line.partition(":")
                    event[field] = value[1:] if value.startswith(" ") else value
            if "data" in event:
                event["message"] = json.loads(event["data"])
                self.all.append(event)
                self.events.put_nowait(event)

    async def next(self, timeout: float = 5.0) -> dict:
        return await asyncio.wait_for(self.events.get(), timeout)

    async def next_type(self, type: str, timeout: float = 5.0) -> dict:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            event = await self.next(max(deadline - asyncio.get_running_loop().time(), 0.01))
            if event.get("event") == type:
                return event


async def sse_connect(
    app: Any, query: str = "", token: str | None = ADMIN, headers: dict | None = None
) -> SseClient:
    client = SseClient()
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    url = app.url + "/sse/admin/quotas" + (f"?{query}" if query else "")
    request = HTTPRequest(
        url,
        headers=hdrs,
        streaming_callback=client._chunk,
        header_callback=lambda line: client._header(line.strip()),
        request_timeout=3600,
    )
    client.fetch = asyncio.ensure_future(AsyncHTTPClient().fetch(request, raise_error=False))
    return client


class Head:
    """Status line and headers of a response; the body is never awaited (streams)."""

    def __init__(self, code: int, headers: HTTPHeaders):
        self.code = code
        self.headers = headers

    def __repr__(self) -> str:
        return f"<Head {self.code}>"


async def raw_request(
    app: Any,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    raw_headers: bytes = b"",
) -> Head:
    """Send one request on a fresh socket and read only the response head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    try:
        hdrs = {"Host": f"127.0.0.1:{app.port}", "Connection": "close"}
        hdrs.update(headers or {})
        if body or method in ("POST", "PUT", "PATCH"):
            hdrs["Content-Length"] = str(len(body))
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
        writer.write(head.encode("latin-1") + raw_headers + b"\r\n" + body)
        data = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    status_line, _, rest = data.decode("latin-1").partition("\r\n")
    return Head(int(status_line.split()[1]), HTTPHeaders.parse(rest))


async def login_post(
    app: Any, token: str, nxt: str | None = None, headers: dict[str, str] | None = None
) -> tuple[Any, str]:
    """Sign in through the login form (GET for the XSRF cookie, then POST)."""
    form = await call(app, "GET", "/login", token=None, headers=headers)
    xsrf = cookies_of(form)["_xsrf"]
    body = f"token={quote(token)}&_xsrf={xsrf}" + (f"&next={quote(nxt)}" if nxt else "")
    hdrs = {**(headers or {}), "Cookie": f"_xsrf={xsrf}", "Content-Type": FORM}
    return await call(app, "POST", "/login", raw=body, token=None, headers=hdrs), xsrf
