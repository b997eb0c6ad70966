"""Connection hygiene: one client cannot take every file descriptor or the accept loop.

* **Per-address cap** (``server.max_connections_per_ip``): a connection beyond the cap is
  closed as soon as it is accepted, before a byte is read, so a single address holds at most
  that many descriptors.
* **Header and idle timeouts**: a new connection has ``server.header_timeout`` seconds to
  send a complete request head (and a request its body); a keep-alive connection gets
  ``server.idle_timeout`` seconds to send its next one. Half-finished requests do not
  linger. Each request being read has a deadline, and one sweep (a few times per timeout)
  closes the connections past theirs: Tornado's own timeouts cost a future and a timer
  per head and per body, a measurable share of a small request's work.
* **Accept errors** (``EMFILE`` and the like): logged at most once per
  :data:`ACCEPT_LOG_INTERVAL` with a count of the rest, and accepting pauses briefly instead
  of spinning on a listening socket that stays readable.
* **Open-files limit**: :func:`raise_open_files_limit` lifts the soft ``RLIMIT_NOFILE`` to the
  hard limit at start-up and warns if it stays low.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

import tornado.httpserver
import tornado.httputil
import tornado.iostream
from tornado.ioloop import IOLoop, PeriodicCallback

log = logging.getLogger(__name__)

ACCEPT_LOG_INTERVAL = 10.0  # seconds between two log lines about the same trouble
ACCEPT_PAUSE = 0.1  # seconds without accepting after an accept error
RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
LOW_OPEN_FILES = 4096


class ThrottledLog:
    """One warning per interval; the ones in between are counted, not written."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self._last = -interval
        self._suppressed = 0

    def warning(self, message: str, *args: Any) -> None:
        now = self.clock()
        if now - self._last < self.interval:
            self._suppressed += 1
            return
        if self._suppressed:
            message += " (and %d similar in the last %.0f s)"
            args = (*args, self._suppressed, now - self._last)
        self._last, self._suppressed = now, 0
        log.warning(message, *args)


class GuardedHTTPServer(tornado.httpserver.HTTPServer):
    """Tornado's HTTPServer with the limits of this module."""

    def initialize(  # type: ignore[override]
        self,
        request_callback: Any,
        *,
        max_connections_per_ip: int,
        header_timeout: float,
        idle_timeout: float,
        **kwargs: Any,
    ) -> None:
        super().initialize(request_callback, **kwargs)
        # The deadlines below replace Tornado's per-read timeouts (None: no timer per read).
        self.conn_params.header_timeout = None
        self.conn_params.body_timeout = None
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.max_connections_per_ip = max_connections_per_ip
        self._deadlines: dict[Any, float] = {}  # request connection -> monotonic deadline
        self._sweeper: PeriodicCallback | None = None
        self._open: dict[str, list[tornado.iostream.IOStream]] = {}
        self._served: set[int] = set()  # ids of server connections past their first request
        self._accepted = 0
        self.refused = 0
        self._accept_log = ThrottledLog(ACCEPT_LOG_INTERVAL)
        self._cap_log = ThrottledLog(ACCEPT_LOG_INTERVAL)

    # -- accepting ---------------------------------------------------------------------
    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = self._accept_on(sock)

    def _accept_on(self, sock: socket.socket) -> Callable[[], None]:
        """Tornado's add_accept_handler, with accept errors throttled (see module doc)."""
        io_loop = IOLoop.current()
        state = {"removed": False, "listening": True}

        def resume() -> None:
            if not state["removed"] and not state["listening"]:
                state["listening"] = True
                io_loop.add_handler(sock, accept, IOLoop.READ)

        def accept(fd: Any, events: int) -> None:
            for _ in range(128):
                if state["removed"]:
                    return
                try:
                    connection, address = sock.accept()
                except BlockingIOError:
                    return
                except ConnectionAbortedError:
                    continue
                except OSError as exc:
                    kind = "out of resources" if exc.errno in RESOURCE_ERRORS else "failed"
                    self._accept_log.warning("accept %s: %s", kind, exc.strerror or exc)
                    # The listening socket stays readable: retrying now would spin.
                    state["listening"] = False
                    io_loop.remove_handler(sock)
                    io_loop.call_later(ACCEPT_PAUSE, resume)
                    return
                self._admit(connection, address)

        def remove() -> None:
            if state["listening"]:
                io_loop.remove_handler(sock)
            state["removed"] = True

        io_loop.add_handler(sock, accept, IOLoop.READ)
        return remove

    def _admit(self, connection: socket.socket, address: Any) -> None:
        ip = address[0] if isinstance(address, tuple) else str(address)
        if self.open_connections(ip) >= self.max_connections_per_ip:
            self.refused += 1
            self._cap_log.warning(
                "closed a connection from %s: %d open (server.max_connections_per_ip)",
                ip,
                self.max_connections_per_ip,
            )
            connection.close()
            return
        self._handle_connection(connection, address)

    def open_connections(self, ip: str) -> int:
        streams = self._open.get(ip)
        if not streams:
            return 0
        streams[:] = [s for s in streams if not s.closed()]
        if not streams:
            del self._open[ip]
        return len(streams)

    def handle_stream(self, stream: tornado.iostream.IOStream, address: Any) -> None:
        ip = address[0] if isinstance(address, tuple) else str(address)
        # A stream stays counted until it closes, also after a WebSocket upgrade.
        self._open.setdefault(ip, []).append(stream)
        self._accepted += 1
        if self._accepted % 1024 == 0:  # forget addresses whose connections all closed
            for known in list(self._open):
                self.open_connections(known)
        super().handle_stream(stream, address)

    # -- timeouts ----------------------------------------------------------------------
    def start_request(
        self, server_conn: object, request_conn: tornado.httputil.HTTPConnection
    ) -> tornado.httputil.HTTPMessageDelegate:
        # The first request's head gets the header timeout, a keep-alive connection's next
        # ones the idle timeout; the body then gets the header timeout again.
        key = id(server_conn)
        if key in self._served:
            timeout = self.idle_timeout
        else:
            self._served.add(key)
            timeout = self.header_timeout
        self._deadlines[request_conn] = time.monotonic() + timeout
        if self._sweeper is None:
            every = min(1.0, max(0.05, min(self.header_timeout, self.idle_timeout) / 4))
            self._sweeper = PeriodicCallback(self._sweep, every * 1000)
            self._sweeper.start()
        delegate = super().start_request(server_conn, request_conn)
        return _Deadlined(delegate, self, request_conn)

    def read(self, request_conn: Any) -> None:
        """The head is in: the body (if any) has the header timeout."""
        if request_conn in self._deadlines:
            self._deadlines[request_conn] = time.monotonic() + self.header_timeout

    def done_reading(self, request_conn: Any) -> None:
        self._deadlines.pop(request_conn, None)

    def _sweep(self) -> None:
        now = time.monotonic()
        late = [conn for conn, deadline in self._deadlines.items() if deadline <= now]
        for conn in late:
            del self._deadlines[conn]
            if conn.stream is not None:  # None: detached (a WebSocket), not ours to close
                conn.close()

    def on_close(self, server_conn: object) -> None:
        self._served.discard(id(server_conn))
        super().on_close(server_conn)

    async def close_all_connections(self) -> None:
        if self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper = None
        await super().close_all_connections()


class _Deadlined(tornado.httputil.HTTPMessageDelegate):
    """Tells the server when a request's head and body have been read (its deadlines)."""

    __slots__ = ("delegate", "server", "conn")

    def __init__(self, delegate: Any, server: GuardedHTTPServer, conn: Any):
        self.delegate = delegate
        self.server = server
        self.conn = conn

    def headers_received(self, start_line: Any, headers: Any) -> Any:
        self.server.read(self.conn)
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Any:
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        self.server.done_reading(self.conn)
        self.delegate.finish()

    def on_connection_close(self) -> None:
        self.server.done_reading(self.conn)
        self.delegate.on_connection_close()


def raise_open_files_limit(wanted: int = LOW_OPEN_FILES) -> int | None:
    """Lift the soft open-files limit to the hard one; warn if below ``wanted``.

    Returns the soft limit now in force (None where there is no such limit).
    """
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d: %s", soft, exc)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "the open-files limit is %d (hard limit %s): fewer than %d connections and files "
            "can be open at once; raise it (ulimit -n, LimitNOFILE=) for a busy server",
            soft,
            "unlimited" if hard == resource.RLIM_INFINITY else hard,
            wanted,
        )
    return soft


def make_http_server(request_callback: Any, config: Any, max_body_size: int) -> GuardedHTTPServer:
    """The HTTP server of a QuotaApp, configured from ``server.*`` settings."""
    return GuardedHTTPServer(
        request_callback,
        xheaders=config["server.xheaders"],
        max_body_size=max_body_size,
        max_connections_per_ip=config["server.max_connections_per_ip"],
        header_timeout=config["server.header_timeout"],
        idle_timeout=config["server.idle_timeout"],
    )
