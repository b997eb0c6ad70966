// One user's view (/admin/quotas/users/<name>): limits and usage per window, overrides,
// violations and alerts of that user (paged from the API), the audit of that user; kept
// live from the stream while open. Figures are the server's (percent, risk): a change this
// view hears about is loaded again over REST rather than recomputed here.

import { get } from "./api.js";
import { byId, el, formatInt, formatLimit, formatPercent, formatTime, setText, throttle } from "./dom.js";
import { describeAudit } from "./settings.js";
import { reportError } from "./ui.js";

const PER_PAGE = 20;

export class UserPage {
  constructor(username) {
    this.username = username;
    this.violationCursor = null;
    this.auditCursor = null;
    this.seen = new Set(); // violation ids shown (REST rows and live events)
    this.reloadSoon = throttle(() => this.loadDetail(), 1000);
    this.alertsSoon = throttle(() => this.loadAlerts(), 1000);
    this.auditSoon = throttle(() => this.loadAudit(false), 1000);
    byId("user-violations-more").addEventListener("click", () => this.loadViolations(true));
    byId("user-audit-more").addEventListener("click", () => this.loadAudit(true));
  }

  async start() {
    setText("user-name", this.username);
    document.title = `${this.username} · quotaserver admin`;
    const found = await this.loadDetail();
    byId("user-missing").hidden = found;
    byId("user-body").hidden = !found;
    if (!found) return;
    await Promise.all([this.loadViolations(false), this.loadAlerts(), this.loadAudit(false)]);
  }

  async loadDetail() {
    try {
      this.detail = await get(`/users/${encodeURIComponent(this.username)}`);
    } catch (err) {
      if (err.status === 404) return false;
      reportError(err, "Loading the user");
      return false;
    }
    this._drawDetail();
    return true;
  }

  _drawDetail() {
    const d = this.detail;
    const risk = d.risk ? ` · risk ${d.risk}` : "";
    setText(
      "user-summary",
      `Peak today ${formatPercent(d.max_percent)} of a daily limit${risk} · ` +
        `${formatInt(d.violations_today)} violations today · ` +
        `${formatInt(d.load_refusals_today)} refused for load today`,
    );
    byId("user-limits-head").replaceChildren(
      el("th", { text: "Command type" }),
      ...d.periods.map((p) => el("th", { text: p, attrs: { scope: "col" } })),
    );
    const rows = Object.entries(d.limits).map(([command, byPeriod]) =>
      el("tr", { attrs: { "data-command": command } }, [
        el("th", { text: command, attrs: { scope: "row" } }),
        ...d.periods.map((period) => {
          const w = byPeriod[period];
          const used = `${formatInt(w.used)} / ${formatLimit(w.limit)}`;
          const pct = w.percent === null ? "" : ` (${formatPercent(w.percent)})`;
          return el("td", { attrs: { "data-label": period, "data-period": period } }, [
            el("span", { class: "usage-text", text: used + pct }),
            w.overridden
              ? el("span", { class: "override-mark", text: "override", attrs: { title: `default ${formatLimit(w.default)}` } })
              : null,
            el("span", { class: "muted small resets", text: ` resets ${formatTime(w.resets_at)}` }),
          ]);
        }),
      ]),
    );
    byId("user-limits-body").replaceChildren(...rows);
  }

  async loadViolations(more) {
    try {
      const query = { user: this.username, per_page: PER_PAGE };
      if (more && this.violationCursor) query.cursor = this.violationCursor;
      const page = await get("/violations", query);
      if (!more) {
        byId("user-violations").replaceChildren();
        this.seen.clear();
      }
      for (const v of page.items) this._violation(v, false);
      this.violationCursor = page.next_cursor;
      this.violationTotal = page.total;
      byId("user-violations-more").hidden = !page.next_cursor;
      this._violationSummary();
    } catch (err) {
      reportError(err, "Loading the user's violations");
    }
  }

  _violation(v, live) {
    if (v.id !== undefined && this.seen.has(v.id)) return;
    if (v.id !== undefined) this.seen.add(v.id);
    const li = el("li", { class: "feed-item violation" }, [
      el("div", { class: "item-head" }, [
        el("span", { class: "badge", text: v.command_type }),
        el("time", { text: formatTime(v.created_at), attrs: { datetime: v.created_at } }),
      ]),
      el("div", { text: v.message }),
    ]);
    const list = byId("user-violations");
    if (live) list.prepend(li);
    else list.append(li);
  }

  _violationSummary() {
    setText("user-violations-total", formatInt(this.violationTotal));
    byId("user-violations-empty").hidden = this.violationTotal > 0;
  }

  async loadAlerts() {
    try {
      const page = await get("/alerts", { user: this.username, status: "all", per_page: 50 });
      const items = page.items.map((a) =>
        el("li", { class: `feed-item alert sev-${a.severity}`, attrs: { "data-status": a.status } }, [
          el("div", { class: "item-head" }, [
            el("span", { class: "badge", text: a.severity }),
            el("strong", { text: a.alert_type.replaceAll("_", " ") }),
            el("span", { class: "badge", text: a.status }),
            el("time", { text: formatTime(a.updated_at), attrs: { datetime: a.updated_at } }),
          ]),
          el("div", { text: a.message }),
        ]),
      );
      byId("user-alerts").replaceChildren(...items);
      byId("user-alerts-empty").hidden = items.length > 0;
    } catch (err) {
      reportError(err, "Loading the user's alerts");
    }
  }

  async loadAudit(more) {
    try {
      const query = { user: this.username, per_page: PER_PAGE };
      if (more && this.auditCursor) query.cursor = this.auditCursor;
      const page = await get("/audit", query);
      const rows = page.items.map((e) =>
        el("tr", {}, [
          el("td", { text: formatTime(e.created_at), attrs: { "data-label": "Time" } }),
          el("td", { text: e.actor, attrs: { "data-label": "Actor" } }),
          el("td", { text: e.action, attrs: { "data-label": "Action" } }),
          el("td", { text: e.target, attrs: { "data-label": "Target" } }),
          el("td", { class: "details", text: describeAudit(e.details), attrs: { "data-label": "Before → after" } }),
        ]),
      );
      if (more) byId("user-audit").append(...rows);
      else byId("user-audit").replaceChildren(...rows);
      if (!byId("user-audit").children.length) {
        byId("user-audit").append(el("tr", {}, [el("td", { class: "empty-row", text: "No changes audited.", attrs: { colspan: 5 } })]));
      }
      this.auditCursor = page.next_cursor;
      byId("user-audit-more").hidden = !page.next_cursor;
    } catch (err) {
      reportError(err, "Loading the user's audit");
    }
  }

  // -- live ------------------------------------------------------------------------------
  /** Every stream message; those about this user update the view. */
  apply(msg) {
    const d = msg.data || {};
    if (msg.type === "violation" && d.username === this.username) {
      this._violation({ ...d, id: undefined, created_at: msg.timestamp }, true);
      this.violationTotal = (this.violationTotal || 0) + 1;
      this._violationSummary();
      this.reloadSoon(); // usage and violations today, as the server counts them
    } else if (msg.type === "usage" && d.users?.some((u) => u.username === this.username)) {
      this.reloadSoon();
    } else if (msg.type === "quota_change" && (d.username === this.username || d.scope === "global")) {
      this.reloadSoon();
      if (d.username === this.username) this.auditSoon();
    } else if (msg.type === "alert" && d.username === this.username) {
      this.alertsSoon();
    } else if (msg.type === "stats" && this.detail && typeof d.load_refusals_today === "number") {
      // A refusal for load changes no event of its own: the stats tick says one happened.
      if (d.load_refusals_today !== this.refusedSeen) {
        if (this.refusedSeen !== undefined) this.reloadSoon();
        this.refusedSeen = d.load_refusals_today;
      }
    }
  }
}
