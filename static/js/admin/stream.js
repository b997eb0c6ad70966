// The live connection of the dashboard: WebSocket first, Server-Sent Events when a
// WebSocket cannot be opened, exponential back-off with jitter, an honest status.
//
// Status values: connecting, connected, reconnecting (with seconds left and the attempt
// number), disconnected (gave up, or the session ended), stale (connected, but no message
// for more than STALE_AFTER ms).

export const MAX_ATTEMPTS = 10;
export const MAX_DELAY = 30; // seconds
export const STALE_AFTER = 30000; // ms without any message (heartbeats come every 10 s)
export const RETRY_GIVEN_UP = 5 * 60 * 1000; // ms: after giving up, try again this often
const DEAD_AFTER = 60000; // ms without any message: the connection is presumed dead
const CLOSE_POLICY = 1008; // credentials revoked (logout elsewhere) or policy violation


/** Seconds to wait before attempt `attempt` (1-based): 1, 2, 4 ... capped, +/- 20 %. */
export function backoffDelay(attempt, random = Math.random) {
  const base = Math.min(MAX_DELAY, 2 ** (attempt - 1));
  const jittered = base * (0.8 + 0.4 * random());
  return Math.min(MAX_DELAY, Math.max(0.5, jittered));
}

export class LiveStream {
  /**
   * @param {object} options
   * @param {string} options.wsPath   e.g. "/ws/admin/quotas"
   * @param {string} options.ssePath  e.g. "/sse/admin/quotas"
   * @param {(msg: object, info: object) => void} options.onMessage  every envelope, in
   *   order; info.resumed tells whether the connection was opened with a cursor
   * @param {(status: object) => void} options.onStatus
   * @param {string[]} options.serverTypes  the types the server sends of its own (the page
   *   gets them from the server): an EventSource hears only named events it listens to
   */
  constructor({ wsPath, ssePath, onMessage, onStatus, serverTypes }) {
    this.wsPath = wsPath;
    this.ssePath = ssePath;
    this.serverTypes = serverTypes;
    this.onMessage = onMessage;
    this.onStatus = onStatus;
    this.lastSeq = null; // resume cursor: the highest seq handed to onMessage
    this.attempt = 0; // failed attempts since the last successful connection
    this.wsBroken = false; // WebSocket failed where SSE worked: stay on SSE
    this.current = null; // {kind, conn, welcomed}
    this.timer = null;
    this.countdown = null;
    this.lastMessageAt = 0;
    this.status = { state: "connecting" };
    this.lastLiveAt = null; // Date.now() of the last message while connected
    this.watchdog = setInterval(() => this._checkStale(), 1000);
    // Giving up is not for good: the network, the tab or the clock may bring it back.
    window.addEventListener("online", () => this.wake("network back"));
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") this.wake("tab visible again");
    });
    setInterval(() => this.wake("periodic retry"), RETRY_GIVEN_UP);
  }

  /** Try again now if the stream gave up or is waiting out a back-off (not when the
   * session ended: that needs a new sign-in). */
  wake(cause) {
    const state = this.status.state;
    if (this.status.sessionEnded) return;
    if (state !== "disconnected" && !(state === "reconnecting" && cause === "network back")) return;
    this.wakeCause = cause;
    this.reconnectNow();
  }

  start() {
    this.attempt = 0;
    this._connect();
  }

  /** The Reconnect button: drop whatever is going on and connect now. */
  reconnectNow() {
    this._clearTimers();
    this._drop();
    this.attempt = 0;
    this.wsBroken = false;
    this._connect();
  }

  get transport() {
    return this.current && this.current.welcomed ? this.current.kind : null;
  }

  // -- connecting ------------------------------------------------------------------
  _connect() {
    this._setStatus({ state: "connecting", attempt: this.attempt || null });
    if (this.wsBroken || typeof WebSocket === "undefined") {
      this._openSse(false);
    } else {
      this._openWs();
    }
  }

  _query(name) {
    return this.lastSeq === null ? "" : `?${name}=${encodeURIComponent(this.lastSeq)}`;
  }

  _openWs() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    let ws;
    try {
      ws = new WebSocket(`${scheme}//${location.host}${this.wsPath}${this._query("last_seq")}`);
    } catch (err) {
      this._openSse(true);
      return;
    }
    const entry = { kind: "websocket", conn: ws, welcomed: false, resumed: this.lastSeq !== null };
    this.current = entry;
    ws.onmessage = (event) => {
      if (this.current !== entry) return;
      let msg;
      try {
        msg = JSON.parse(event.data);
      } catch (err) {
        return;
      }
      this._receive(entry, msg);
    };
    ws.onclose = (event) => {
      if (this.current !== entry) return;
      this.current = null;
      if (!entry.welcomed) {
        // The WebSocket could not be used at all (refused, blocked by a proxy, closed
        // before the welcome): try Server-Sent Events within the same attempt.
        this._openSse(true);
      } else {
        this._lost(event.code);
      }
    };
  }

  _openSse(afterWsFailure) {
    if (typeof EventSource === "undefined") {
      this._failed();
      return;
    }
    const es = new EventSource(`${this.ssePath}${this._query("last_event_id")}`);
    const entry = {
      kind: "sse",
      conn: es,
      welcomed: false,
      afterWsFailure,
      resumed: this.lastSeq !== null,
    };
    this.current = entry;
    const handle = (event) => {
      if (this.current !== entry) return;
      let msg;
      try {
        msg = JSON.parse(event.data);
      } catch (err) {
        return;
      }
      if (msg.type === "close") {
        // The server ended the stream on purpose and says why, with a WebSocket close code.
        es.close();
        this.current = null;
        this._lost(msg.data && msg.data.code);
        return;
      }
      if (msg.type === "welcome") {
        // An EventSource hears only the named events it listens to: add the plugins' types.
        for (const type of msg.data.plugin_types || []) {
          if (!listening.has(type)) {
            listening.add(type);
            es.addEventListener(type, handle);
          }
        }
      }
      this._receive(entry, msg);
    };
    const listening = new Set(this.serverTypes);
    for (const type of listening) es.addEventListener(type, handle);
    es.onmessage = handle;
    es.addEventListener("error", (event) => {
      if (this.current !== entry) return;
      if (event.data) {
        handle(event); // an "error" message of the protocol, not a connection error
        return;
      }
      // EventSource would retry on its own; our back-off and status decide instead.
      es.close();
      this.current = null;
      if (entry.welcomed) this._lost(0);
      else this._failed();
    });
  }

  _receive(entry, msg) {
    this.lastMessageAt = Date.now();
    this.lastLiveAt = this.lastMessageAt;
    if (msg.type === "welcome") {
      entry.welcomed = true;
      if (entry.kind === "sse" && entry.afterWsFailure) this.wsBroken = true;
      if (this.lastSeq === null && typeof msg.data.seq === "number") {
        this.lastSeq = msg.data.seq; // nothing loaded before: start from now
      }
      this.attempt = 0;
      this._setStatus({ state: "connected", transport: entry.kind });
    } else if (this.status.state === "stale") {
      this._setStatus({ state: "connected", transport: entry.kind });
    }
    if (msg.type === "recovered" && typeof msg.data.seq === "number") {
      const foreign = ["unknown_cursor", "invalid_cursor"].includes(msg.data.reason);
      // A cursor the server never issued (its database was replaced): start over at its head.
      this.lastSeq = foreign ? msg.data.seq : Math.max(this.lastSeq ?? 0, msg.data.seq);
    }
    try {
      this.onMessage(msg, { transport: entry.kind, resumed: entry.resumed });
    } catch (err) {
      console.error("dashboard failed to apply a message", msg.type, err);
    }
    if (typeof msg.seq === "number") {
      this.lastSeq = Math.max(this.lastSeq ?? 0, msg.seq);
    }
  }

  // -- losing it -------------------------------------------------------------------
  _lost(code) {
    if (code === CLOSE_POLICY) {
      this._setStatus({ state: "disconnected", reason: "session ended: sign in again", sessionEnded: true });
      return;
    }
    this._schedule();
  }

  _failed() {
    this._schedule();
  }

  _schedule() {
    this._clearTimers();
    this.attempt += 1;
    if (this.attempt > MAX_ATTEMPTS) {
      this.attempt = MAX_ATTEMPTS;
      this._setStatus({
        state: "disconnected",
        reason: `gave up after ${MAX_ATTEMPTS} attempts; retrying when the network or tab comes back, or in 5 min`,
      });
      return;
    }
    const delay = backoffDelay(this.attempt);
    const due = Date.now() + delay * 1000;
    const tick = () => {
      const left = Math.max(0, Math.ceil((due - Date.now()) / 1000));
      this._setStatus({ state: "reconnecting", retryIn: left, attempt: this.attempt });
    };
    tick();
    this.countdown = setInterval(tick, 250);
    this.timer = setTimeout(() => {
      this._clearTimers();
      this._connect();
    }, delay * 1000);
  }

  _checkStale() {
    const entry = this.current;
    if (!entry || !entry.welcomed) return;
    const silent = Date.now() - this.lastMessageAt;
    if (silent > DEAD_AFTER) {
      // A half-open connection never reports its end: give up on it ourselves.
      this._drop();
      this._schedule();
    } else if (silent > STALE_AFTER) {
      this._setStatus({ state: "stale", transport: entry.kind, silentFor: silent });
    }
  }

  _drop() {
    const entry = this.current;
    this.current = null;
    if (entry) entry.conn.close();
  }

  _clearTimers() {
    clearTimeout(this.timer);
    clearInterval(this.countdown);
    this.timer = null;
    this.countdown = null;
  }

  _setStatus(status) {
    const same = ["state", "retryIn", "attempt", "transport", "reason"].every(
      (k) => this.status[k] === status[k],
    );
    this.status = status;
    if (!same || status.state === "stale") this.onStatus(status);
  }
}

/** The indicator text of a status. */
export function describeStatus(status) {
  switch (status.state) {
    case "connected":
      return "connected";
    case "reconnecting":
      return `reconnecting in ${status.retryIn} s (attempt ${status.attempt} of ${MAX_ATTEMPTS})`;
    case "disconnected":
      return status.reason ? `disconnected: ${status.reason}` : "disconnected";
    case "stale":
      return `stale: no message for ${Math.round((status.silentFor || STALE_AFTER) / 1000)} s`;
    default:
      return status.attempt ? `connecting (attempt ${status.attempt} of ${MAX_ATTEMPTS})` : "connecting";
  }
}
