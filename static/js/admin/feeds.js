// The two live feeds. Violations are keyed by their event seq, so an event that arrives
// twice (replay after a reconnect overlapping a REST reload) is shown once. Alerts are
// keyed by id and carry the seq of the state shown, so an older state never wins.

import { get, request } from "./api.js";
import { byId, formatTime, fromTemplate, setText, throttle, userLink } from "./dom.js";
import { canWrite, reportError, toast } from "./ui.js";

const MAX_VIOLATIONS = 100;

export class ViolationFeed {
  constructor() {
    this.list = byId("violations-feed");
    this.items = new Map(); // seq -> envelope
    this.nodes = new Map(); // seq -> <li>
  }

  /** Replace the feed with a REST page (newest first), keeping newer live items. */
  load(response) {
    const keep = [...this.items.values()].filter((m) => m.seq > response.seq);
    this.items.clear();
    for (const m of [...response.items, ...keep]) this.items.set(m.seq, m);
    this._trim();
    this.render();
  }

  /** Forget every item (their seqs belong to another event log). */
  reset() {
    this.items.clear();
    this.render();
  }

  /** Add one event; false if it was already shown. */
  add(msg) {
    if (this.items.has(msg.seq)) return false;
    this.items.set(msg.seq, msg);
    const node = this._node(msg);
    // Newest first: find the first shown item with a lower seq.
    const before = [...this.nodes.entries()]
      .filter(([seq]) => seq < msg.seq)
      .sort((a, b) => b[0] - a[0])[0];
    if (before) this.list.insertBefore(node, before[1]);
    else this.list.append(node);
    this.nodes.set(msg.seq, node);
    this._trim();
    this._summary();
    return true;
  }

  render() {
    this.nodes.clear();
    const ordered = [...this.items.values()].sort((a, b) => b.seq - a.seq);
    this.list.replaceChildren(
      ...ordered.map((m) => {
        const node = this._node(m);
        this.nodes.set(m.seq, node);
        return node;
      }),
    );
    this._summary();
  }

  _trim() {
    if (this.items.size <= MAX_VIOLATIONS) return;
    const seqs = [...this.items.keys()].sort((a, b) => a - b);
    for (const seq of seqs.slice(0, this.items.size - MAX_VIOLATIONS)) {
      this.items.delete(seq);
      const node = this.nodes.get(seq);
      if (node) node.remove();
      this.nodes.delete(seq);
    }
  }

  _summary() {
    setText("violations-count", this.items.size);
    byId("violations-empty").hidden = this.items.size > 0;
  }

  _node(msg) {
    const d = msg.data;
    const li = fromTemplate("tpl-violation");
    li.dataset.seq = String(msg.seq);
    li.dataset.period = d.period || "";
    li.querySelector(".v-user").replaceChildren(userLink(d.username, "user-link"));
    setText(li.querySelector(".v-type"), d.command_type);
    const time = li.querySelector(".v-time");
    time.setAttribute("datetime", msg.timestamp);
    setText(time, formatTime(msg.timestamp));
    setText(li.querySelector(".v-message"), d.message);
    return li;
  }
}

const STATUS_ORDER = { open: 0, acknowledged: 1, resolved: 2 };
const FILTERS = {
  active: ["open", "acknowledged"],
  open: ["open"],
  acknowledged: ["acknowledged"],
  resolved: ["resolved"],
  all: ["open", "acknowledged", "resolved"],
};

export class AlertFeed {
  constructor() {
    this.list = byId("alerts-feed");
    this.filter = "active";
    this.alerts = new Map(); // alert_id -> {alert, seq}
    this.counts = null;
    this.refreshCounts = throttle(() => this._loadCounts(), 1000);
    byId("alerts-filter").addEventListener("change", (event) => {
      this.filter = event.target.value;
      this.reload().catch((err) => reportError(err, "Loading alerts"));
    });
  }

  async reload() {
    const response = await get("/alerts", { status: this.filter, per_page: 100 });
    this.load(response);
    return response;
  }

  /** A REST snapshot: each alert is as recent as the response's seq. */
  load(response) {
    const newer = [...this.alerts.values()].filter((a) => a.seq !== null && a.seq > response.seq);
    this.alerts.clear();
    for (const alert of response.items) this.alerts.set(alert.alert_id, { alert, seq: response.seq });
    for (const entry of newer) this._put(entry.alert, entry.seq);
    this.counts = response.counts;
    this.render();
  }

  reset() {
    this.alerts.clear();
    this.render();
  }

  /** An `alert` event from the stream. */
  apply(msg) {
    const changed = this._put(msg.data, msg.seq);
    if (changed) this.render();
    this.refreshCounts();
    return changed;
  }

  _put(alert, seq) {
    const known = this.alerts.get(alert.alert_id);
    if (known && known.seq !== null && seq !== null && seq <= known.seq) return false;
    if (FILTERS[this.filter].includes(alert.status)) {
      this.alerts.set(alert.alert_id, { alert, seq });
    } else {
      this.alerts.delete(alert.alert_id);
    }
    return true;
  }

  async _loadCounts() {
    try {
      const response = await get("/alerts", { per_page: 1 });
      this.counts = response.counts;
      this._summary();
    } catch (err) {
      /* the counts stay as they were; the next event retries */
    }
  }

  render() {
    const ordered = [...this.alerts.values()]
      .map((e) => e.alert)
      .sort(
        (a, b) =>
          STATUS_ORDER[a.status] - STATUS_ORDER[b.status] ||
          (b.updated_at > a.updated_at ? 1 : b.updated_at < a.updated_at ? -1 : b.alert_id - a.alert_id),
      );
    this.list.replaceChildren(...ordered.map((a) => this._node(a)));
    this._summary();
  }

  _summary() {
    const open = this.counts ? this.counts.open : 0;
    setText("alerts-count", open);
    byId("alerts-count").classList.toggle("count-hot", open > 0);
    const c = this.counts;
    setText("alerts-summary", c ? `${c.open} open · ${c.acknowledged} acknowledged` : "");
    byId("alerts-empty").hidden = this.alerts.size > 0;
  }

  _node(a) {
    const li = fromTemplate("tpl-alert");
    li.dataset.alertId = String(a.alert_id);
    li.dataset.status = a.status;
    li.classList.add(`sev-${a.severity}`, `status-${a.status}`);
    setText(li.querySelector(".a-severity"), a.severity);
    li.querySelector(".a-severity").classList.add(`sev-badge-${a.severity}`);
    setText(li.querySelector(".a-type"), a.alert_type.replaceAll("_", " "));
    setText(li.querySelector(".a-count"), a.count > 1 ? `×${a.count}` : "");
    setText(li.querySelector(".a-status"), a.status);
    const time = li.querySelector(".a-time");
    time.setAttribute("datetime", a.updated_at);
    setText(time, formatTime(a.updated_at));
    setText(li.querySelector(".a-message"), a.message);
    const action = li.querySelector(".a-action");
    action.hidden = !a.action_needed || a.status === "resolved";
    setText(li.querySelector(".a-action-text"), a.action || "");
    const meta = [];
    if (a.acknowledged_by) meta.push(`acknowledged by ${a.acknowledged_by}`);
    if (a.resolved_by) meta.push(`resolved by ${a.resolved_by}`);
    const metaNode = li.querySelector(".a-meta");
    setText(metaNode, meta.join(" · "));
    if (a.username) metaNode.prepend("user ", userLink(a.username, "user-link"), meta.length ? " · " : "");
    const ack = li.querySelector(".a-ack");
    const resolve = li.querySelector(".a-resolve");
    ack.hidden = !canWrite || a.status !== "open";
    resolve.hidden = !canWrite || a.status === "resolved";
    li.querySelector(".a-buttons").hidden = !canWrite || a.status === "resolved";
    ack.addEventListener("click", () => this._act(a, "acknowledge", ack));
    resolve.addEventListener("click", () => this._act(a, "resolve", resolve));
    return li;
  }

  async _act(alert, action, button) {
    button.disabled = true;
    try {
      const updated = await request("POST", `/alerts/${encodeURIComponent(alert.alert_id)}/${action}`);
      // Show it now; the `alert` event that follows (higher seq) updates every page.
      const known = this.alerts.get(updated.alert_id);
      if (FILTERS[this.filter].includes(updated.status)) {
        this.alerts.set(updated.alert_id, { alert: updated, seq: known ? known.seq : null });
      } else {
        this.alerts.delete(updated.alert_id);
      }
      this.render();
      this.refreshCounts();
      toast(`Alert ${action === "acknowledge" ? "acknowledged" : "resolved"}`, "success", 3000);
    } catch (err) {
      button.disabled = false;
      reportError(err, `Could not ${action} the alert`);
    }
  }
}
