// The two live feeds. Violations are keyed by their event seq, so an event that arrives
// twice (replay after a reconnect overlapping a REST reload) is shown once. A filter (user,
// command type) shows the API's matching violations (GET /violations, newest 100) and the
// live ones that match and are newer than that answer. Alerts are
// keyed by id and carry the seq of the state shown, so an older state never wins.

import { csvUrl, get, request } from "./api.js";
import { byId, debounce, el, formatTime, fromTemplate, setText, throttle, userLink } from "./dom.js";
import { canWrite, reportError, toast } from "./ui.js";

const MAX_VIOLATIONS = 100;

export class ViolationFeed {
  constructor() {
    this.list = byId("violations-feed");
    this.items = new Map(); // seq -> envelope
    this.nodes = new Map(); // seq -> <li>
    this.filter = { user: "", type: "" };
    this.view = null; // while filtered: key -> envelope (REST "v<id>", live <seq>)
    this.viewSeq = 0; // the filtered REST answer's seq
    const user = byId("violations-user");
    const type = byId("violations-type");
    const apply = () => this.setFilter({ user: user.value.trim(), type: type.value });
    user.addEventListener("input", debounce(apply, 300));
    type.addEventListener("change", apply);
    byId("violations-clear").addEventListener("click", () => {
      user.value = "";
      type.value = "";
      apply();
    });
    byId("violations-filter").addEventListener("submit", (event) => event.preventDefault());
  }

  /** The command types the filter offers (the server's list, in its order). */
  setTypes(types) {
    const select = byId("violations-type");
    const chosen = select.value;
    select.replaceChildren(
      el("option", { text: "all", attrs: { value: "" } }),
      ...types.map((t) => el("option", { text: t, attrs: { value: t } })),
    );
    select.value = chosen;
  }

  matches(msg) {
    const d = msg.data;
    return (!this.filter.user || d.username === this.filter.user) && (!this.filter.type || d.command_type === this.filter.type);
  }

  /** Show only the violations of a user and/or a command type ("" = any). */
  async setFilter(filter) {
    this.filter = filter;
    this.onState?.();
    byId("violations-csv").href = csvUrl("/violations.csv", { user: filter.user, command_type: filter.type });
    byId("violations-clear").hidden = !filter.user && !filter.type;
    if (!filter.user && !filter.type) {
      this.view = null;
      this.render();
      return;
    }
    try {
      const page = await get("/violations", {
        user: filter.user || undefined,
        command_type: filter.type || undefined,
        per_page: MAX_VIOLATIONS,
      });
      if (filter !== this.filter) return; // a newer filter was chosen meanwhile
      this.view = new Map();
      this.viewSeq = page.seq;
      for (const v of page.items) {
        this.view.set(`v${v.id}`, { type: "violation", seq: null, timestamp: v.created_at, data: v });
      }
      // Live ones newer than the answer that match (the answer could not have them).
      for (const m of this.items.values()) if (m.seq > page.seq && this.matches(m)) this.view.set(m.seq, m);
      this.total = page.total;
      this.render();
    } catch (err) {
      reportError(err, "Filtering violations");
    }
  }

  /** Replace the feed with a REST page (newest first), keeping newer live items. */
  load(response) {
    const keep = [...this.items.values()].filter((m) => m.seq > response.seq);
    this.items.clear();
    for (const m of [...response.items, ...keep]) this.items.set(m.seq, m);
    this._trim();
    if (this.view) this.setFilter(this.filter); // a reload reloads the filtered answer too
    else this.render();
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
    if (this.view) {
      this._trim();
      if (msg.seq > this.viewSeq && this.matches(msg)) {
        this.view.set(msg.seq, msg);
        this.total = (this.total || 0) + 1;
        this.render();
      }
      return true;
    }
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
    if (this.view) {
      // Newest first by time (REST rows carry no seq); live rows are newer than all of them.
      const ordered = [...this.view.values()].sort((a, b) => (b.seq ?? 0) - (a.seq ?? 0) || (b.timestamp > a.timestamp ? 1 : b.timestamp < a.timestamp ? -1 : 0));
      this.list.replaceChildren(...ordered.slice(0, MAX_VIOLATIONS).map((m) => this._node(m)));
      setText("violations-count", this.total);
      byId("violations-empty").hidden = ordered.length > 0;
      return;
    }
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
    if (this.view) {
      // Not shown while filtered: just bounded.
      const seqs = [...this.items.keys()].sort((a, b) => a - b);
      for (const seq of seqs.slice(0, this.items.size - MAX_VIOLATIONS)) this.items.delete(seq);
      return;
    }
    const seqs = [...this.items.keys()].sort((a, b) => a - b);
    for (const seq of seqs.slice(0, this.items.size - MAX_VIOLATIONS)) {
      this.items.delete(seq);
      const node = this.nodes.get(seq);
      if (node) node.remove();
      this.nodes.delete(seq);
    }
  }

  _summary() {
    if (this.view) return; // the filtered view counts itself (render)
    setText("violations-count", this.items.size);
    byId("violations-empty").hidden = this.items.size > 0;
  }

  _node(msg) {
    const d = msg.data;
    const li = fromTemplate("tpl-violation");
    if (msg.seq !== null) li.dataset.seq = String(msg.seq);
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
