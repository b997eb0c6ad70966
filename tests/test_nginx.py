"""deploy/nginx-quotaserver.conf, run by real nginx with TLS in front of a real server.

The certificate is made by the test with ``openssl``; ports are free ones on 127.0.0.1. The
file is used as shipped, with only its ports, certificate and log paths replaced (each
replacement must match, so the test follows the file). Through nginx: a login, a WebSocket
and an SSE stream that both receive a live violation, and an access log without the token.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from services import Server, free_port, make_certificate, needs, start_server
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = os.path.join(ROOT, "deploy", "nginx-quotaserver.conf")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
TOKEN = "nginx-test-admin-token-0123456789abcdef"

pytestmark = needs(os.path.exists(NGINX), reason=f"no nginx at {NGINX} (apt-get install nginx)")


def replace(text: str, old: str, new: str) -> str:
    assert old in text, f"{old!r} is no longer in {SITE}: update the test"
    return text.replace(old, new)


def nginx_config(tmp, backend: int, tls: int, plain: int) -> str:
    with open(SITE) as fh:
        site = fh.read()
    site = replace(site, "server 127.0.0.1:8888;", f"server 127.0.0.1:{backend};")
    site = replace(site, "listen 443 ssl http2;", f"listen 127.0.0.1:{tls} ssl http2;")
    site = replace(site, "listen 80;", f"listen 127.0.0.1:{plain};")
    site = replace(site, "/etc/ssl/quotas.example.com/fullchain.pem", f"{tmp}/cert.pem")
    site = replace(site, "/etc/ssl/quotas.example.com/privkey.pem", f"{tmp}/key.pem")
    site = replace(site, "/var/log/nginx/quotaserver.access.log", f"{tmp}/access.log")
    (tmp / "site.conf").write_text(site)
    temp_paths = "\n".join(
        f"    {name}_temp_path {tmp}/{name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root, nginx workers would run as nobody and could not enter the private tmp dir.
    user = "user root;" if os.geteuid() == 0 else ""
    main = f"""
{user}
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 256; }}
http {{
{temp_paths}
    include {tmp}/site.conf;
}}
"""
    (tmp / "nginx.conf").write_text(main)
    return str(tmp / "nginx.conf")


async def start_quotaserver(tmp) -> Server:
    env = {
        "QUOTASERVER_ADMIN_TOKEN": TOKEN,
        "QUOTASERVER_SERVER_XHEADERS": "true",
        "QUOTASERVER_THROTTLE_SOURCE": "off",
    }
    return await start_server(str(tmp), {}, env=env)


async def wait_listening(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            assert proc.poll() is None, log.read_text() if log.exists() else "nginx died"
            assert asyncio.get_running_loop().time() < deadline, "nginx never listened"
            await asyncio.sleep(0.05)


@pytest.mark.gen_test(timeout=120)
async def test_login_websocket_and_sse_through_nginx_with_tls(tmp_path):
    make_certificate(tmp_path)  # cert.pem and key.pem, which the config names
    tls, plain = free_port(), free_port()
    server = await start_quotaserver(tmp_path)
    conf = nginx_config(tmp_path, server.port, tls, plain)
    check = subprocess.run([NGINX, "-t", "-p", str(tmp_path), "-c", conf], capture_output=True)
    assert check.returncode == 0, check.stderr.decode()
    nginx = subprocess.Popen(
        [NGINX, "-p", str(tmp_path), "-c", conf, "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_listening(tls, nginx, tmp_path / "error.log")
        await _exercise(tmp_path, tls, plain)
    finally:
        nginx.terminate()
        nginx.wait(timeout=15)
        assert await server.stop(timeout=15) == 0
    log = (tmp_path / "access.log").read_text()
    assert "GET /login HTTP/1.1" in log
    assert TOKEN not in log and "token=" not in log


async def _exercise(tmp_path, tls: int, plain: int) -> None:
    base = f"https://127.0.0.1:{tls}"
    ca = str(tmp_path / "cert.pem")
    http = AsyncHTTPClient()

    async def fetch(path: str, **kw):
        request = HTTPRequest(base + path, ca_certs=ca, follow_redirects=False, **kw)
        return await http.fetch(request, raise_error=False)

    # Plain HTTP is sent to HTTPS.
    resp = await http.fetch(f"http://127.0.0.1:{plain}/admin/quotas", follow_redirects=False,
                            raise_error=False)  # fmt: skip
    assert resp.code == 301 and resp.headers["Location"].startswith("https://")

    # Login through the form: the token becomes a Secure session cookie (nginx said the
    # scheme was https), and so does the XSRF cookie.
    form = await fetch("/login")
    xsrf_cookie = next(c for c in form.headers.get_list("Set-Cookie") if c.startswith("_xsrf="))
    assert "Secure" in xsrf_cookie
    xsrf = xsrf_cookie.split(";")[0].split("=", 1)[1]
    resp = await fetch(
        "/login",
        method="POST",
        body=f"token={TOKEN}&_xsrf={xsrf}",
        headers={
            "Cookie": f"_xsrf={xsrf}",
            "Origin": base,
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )
    assert resp.code == 302, resp.body
    cookies = resp.headers.get_list("Set-Cookie")
    session = next(c for c in cookies if c.startswith("qs_session="))
    assert "Secure" in session
    cookie = "; ".join(c.split(";")[0] for c in cookies)
    browser = {"Cookie": cookie, "Origin": base}
    page = await fetch("/admin/quotas", headers={"Cookie": cookie})
    assert page.code == 200 and b"<html" in page.body.lower()

    # A WebSocket with the browser's Origin: the Host nginx forwards keeps the port, so the
    # origin check passes (with $host it would be 403 forbidden_origin).
    ws = await websocket_connect(
        HTTPRequest(f"wss://127.0.0.1:{tls}/ws/admin/quotas", headers=browser, ca_certs=ca)
    )
    welcome = json.loads(await asyncio.wait_for(ws.read_message(), 10))
    assert welcome["type"] == "welcome" and welcome["data"]["transport"] == "websocket"

    # An SSE stream, read as it arrives (nginx must not buffer it).
    events: asyncio.Queue = asyncio.Queue()
    buffer = bytearray()

    def chunk(data: bytes) -> None:
        buffer.extend(data)
        while b"\n\n" in buffer:
            block, _, rest = bytes(buffer).partition(b"\n\n")
            buffer[:] = rest
            for line in block.decode().split("\n"):
                if line.startswith("data: "):
                    events.put_nowait(json.loads(line[6:]))

    sse = asyncio.ensure_future(
        http.fetch(
            HTTPRequest(base + "/sse/admin/quotas", headers=browser, ca_certs=ca,
                        streaming_callback=chunk, request_timeout=60),
            raise_error=False,
        )
    )  # fmt: skip
    assert (await asyncio.wait_for(events.get(), 10))["type"] == "welcome"

    # A refused consume through nginx reaches both streams live.
    bearer = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    limits = json.dumps({"limits": {"daily": 0}})
    resp = await fetch("/api/admin/quotas/users/proxied-pat/limits/shell", method="PUT",
                       headers=bearer, body=limits)  # fmt: skip
    assert resp.code == 200, resp.body
    body = json.dumps({"user": "proxied-pat", "command_type": "shell"})
    resp = await fetch("/api/quotas/consume", method="POST", headers=bearer, body=body)
    assert resp.code == 429, resp.body
    while True:
        message = json.loads(await asyncio.wait_for(ws.read_message(), 10))
        if message["type"] == "violation":
            break
    assert message["data"]["username"] == "proxied-pat"
    while (event := await asyncio.wait_for(events.get(), 10))["type"] != "violation":
        pass
    assert event["seq"] == message["seq"]
    ws.close()
    sse.cancel()
