// The users table (search, sort, pages, utilisation bars, risk badges) and the two
// dialogs that change a user: edit limits (per-user overrides) and reset usage.
//
// The table is loaded over REST when the tab opens (or when asked), then kept current from
// the stream: `usage` events (admitted commands, coalesced by the server), `quota_change`
// (limit edits, override removals, usage resets) and `violation`. A user not on the page
// is added when it sorts into it. Rows that would move across a page boundary are exact
// again at the next reload (the Reload button, or after `recovered: false`).

import { csvUrl, get, request } from "./api.js";
import { byId, debounce, el, formatInt, formatLimit, formatPercent, setText, throttle, userLink } from "./dom.js";
import { confirmJumps, selectOnFocus } from "./edits.js";
import { actor, announce, canWrite, reportError, toast } from "./ui.js";

const RISK_TITLE = {
  elevated: "at or above 80% of a daily limit",
  high: "at or above 90% of a daily limit",
  critical: "at or above 95% of a daily limit",
};
const PER_PAGE = 25;
// Durable events kept to re-apply over a REST answer read before them (see render).
const RECENT_EVENTS = 500;
// Column headers that sort (the server's orders; per-type columns have no index to sort by).
const SORTABLE = {
  User: "username",
  Risk: "utilization",
  "Violations today": "violations",
  "Refused for load": "refused",
};
// The orders the server keeps by page number only: live events refresh them instead.
const SERVER_ORDERED = new Set(["violations", "refused"]);

/**
 * Percent of limit used, exactly as the server's ``round(100.0 * used / limit, 1)`` (null:
 * unlimited; 0 limit: 100). Only for a limit changed by an event, whose new percent the
 * server does not send; usage events carry the server's own percent, used as it is.
 *
 * Python rounds the double's exact value, ties to even. The same double here, then
 * toFixed(1) (exact value, ties up) agrees except on exact ties, which are the doubles with
 * a quarter as fraction (x.25, x.75): those go to the even tenth. (Math.round(10 * x) / 10
 * made 5/16 read 31.3 % live and 31.2 % after a reload.)
 */
export function utilization(used, limit) {
  if (limit === null || limit === undefined) return null;
  if (limit === 0) return 100;
  const x = (100.0 * used) / limit;
  const quarters = x * 4;
  if (Number.isInteger(quarters) && quarters % 2 !== 0) {
    const low = Math.floor(x * 10);
    return (low % 2 === 0 ? low : low + 1) / 10;
  }
  return Number(x.toFixed(1));
}

function byName(a, b) {
  const x = a.username.toLowerCase();
  const y = b.username.toLowerCase();
  if (x !== y) return x < y ? -1 : 1;
  return a.username < b.username ? -1 : a.username > b.username ? 1 : 0;
}

// The server's utilisation order: limited users by peak (highest first), then users of
// unlimited types only, then idle users; by name within each.
function utilizationKey(u) {
  if (u.max_percent !== null) return -u.max_percent;
  return Object.values(u.usage).some((x) => x.used > 0) ? 1 : 2;
}

function meter(percent) {
  // <meter> colours itself from low/high/optimum: no inline style needed under the CSP.
  return el("meter", {
    attrs: {
      min: 0,
      max: 100,
      low: 80,
      high: 90,
      optimum: 0,
      value: Math.min(100, percent ?? 0),
      "aria-label": percent === null ? "unlimited" : `${percent}% used`,
    },
  });
}

export class UsersTable {
  constructor({ onEdit, onReset }) {
    this.q = "";
    this.sort = "utilization";
    this.page = 1;
    this.pages = 1;
    this.commandTypes = [];
    this.onEdit = onEdit;
    this.onReset = onReset;
    this.loading = null;
    this.items = [];
    this.hasMore = false;
    this.seq = 0;
    this.recent = []; // [apply, msg] of the last durable events, oldest first
    const search = byId("users-search");
    const searchLater = debounce(() => {
      this.q = search.value.trim();
      this.page = 1;
      this.refresh();
    }, 250);
    search.addEventListener("input", searchLater);
    byId("users-sort").addEventListener("change", (event) => this.setSort(event.target.value));
    byId("users-prev").addEventListener("click", () => this.go(this.page - 1));
    byId("users-next").addEventListener("click", () => this.go(this.page + 1));
    this.refreshSoon = throttle(() => this.refresh(), 1000);
  }

  go(page) {
    if (page < 1 || page > this.pages) return;
    this.page = page;
    this.refresh();
  }

  async refresh() {
    const query = { q: this.q, sort: this.sort, page: this.page, per_page: PER_PAGE };
    this.onState?.(); // the URL follows the search, order and page
    // The download is the whole list in the same order and search.
    byId("users-csv").href = csvUrl("/users.csv", { q: this.q, sort: this.sort });
    try {
      const response = await get("/users", query);
      // A slower, older answer must not overwrite a newer one.
      if (query.q !== this.q || query.sort !== this.sort || query.page !== this.page) return;
      if (response.page > response.pages && response.pages >= 1 && this.page !== response.pages) {
        this.page = response.pages;
        return this.refresh();
      }
      this.render(response);
    } catch (err) {
      reportError(err, "Loading users");
    }
  }

  render(response) {
    this.commandTypes = response.command_types;
    this.pages = response.pages;
    this.riskLevels = response.risk_levels; // the server's thresholds, not a copy here
    this.items = response.items;
    this.seq = response.seq; // events up to this seq are already in the rows
    this.hasMore = Boolean(response.next_cursor);
    this.total = response.total;
    this.shownPage = response.page;
    // Events that arrived while the request was out but are newer than its snapshot were
    // applied to the rows it replaces: apply them again to these.
    for (const [apply, msg] of this.recent) if (msg.seq > this.seq) apply.call(this, msg);
    this._draw();
  }

  _remember(apply, msg) {
    if (typeof msg.seq !== "number") return;
    this.recent.push([apply, msg]);
    if (this.recent.length > RECENT_EVENTS) this.recent.shift();
  }

  /** A header that sorts the list by the server's order `sort` (aria-sort says which). */
  _sortHeader(label, className, title) {
    const sort = SORTABLE[label];
    const active = this.sort === sort;
    const attrs = title ? { type: "button", title } : { type: "button" };
    const button = el("button", { class: "th-sort", text: active ? `${label} ▼` : label, attrs });
    button.addEventListener("click", () => this.setSort(sort));
    return el("th", { class: className, attrs: { scope: "col", "aria-sort": active ? "descending" : "none" } }, [button]);
  }

  setSort(sort) {
    this.sort = sort;
    byId("users-sort").value = sort;
    this.page = 1;
    this.refresh();
  }

  _draw() {
    const head = byId("users-head");
    head.replaceChildren(
      this._sortHeader("User"),
      ...this.commandTypes.map((c) => el("th", { text: c, attrs: { scope: "col" } })),
      this._sortHeader("Risk"),
      this._sortHeader("Violations today", "num"),
      this._sortHeader("Refused for load", "num", "consumes answered 503 today because the throttle factor was 0"),
      canWrite ? el("th", { text: "Actions" }) : null,
    );
    const rows = this.items.map((u) => this._row(u));
    if (!rows.length) {
      const span = this.commandTypes.length + (canWrite ? 5 : 4);
      rows.push(el("tr", {}, [el("td", { class: "empty-row", text: "No users match.", attrs: { colspan: span } })]));
    }
    byId("users-body").replaceChildren(...rows);
    setText("users-page", `page ${this.shownPage} of ${this.pages}`);
    byId("users-prev").disabled = this.shownPage <= 1;
    byId("users-next").disabled = this.shownPage >= this.pages;
    setText("users-summary", `${formatInt(this.total)} users`);
  }

  // -- live updates from the stream ---------------------------------------------------
  _find(username) {
    return this.items.find((u) => u.username === username);
  }

  /** The row's peak and risk from its percents (the server's thresholds). */
  _recompute(u) {
    const percents = [];
    for (const usage of Object.values(u.usage)) {
      if (usage.percent === undefined) usage.percent = utilization(usage.used, usage.limit);
      if (usage.percent !== null) percents.push(usage.percent);
    }
    u.max_percent = percents.length ? Math.max(...percents) : null;
    const levels = this.riskLevels || [];
    const level = levels.find(([, floor]) => u.max_percent !== null && u.max_percent >= floor);
    u.risk = level ? level[0] : null;
  }

  // A command type's default daily limit, as a row without an override shows it.
  _defaultLimit(commandType) {
    for (const u of this.items) {
      const usage = u.usage[commandType];
      if (usage && !usage.overridden) return usage.limit;
    }
    return undefined; // not known on this page: shown as "–" until a reload
  }

  _compare(a, b) {
    if (this.sort === "utilization") {
      const d = utilizationKey(a) - utilizationKey(b);
      if (d !== 0) return d;
    }
    return byName(a, b);
  }

  /** Put ``u`` where the current order places it; false when that is not on this page. */
  _place(u) {
    const shown = this.items.includes(u);
    const rest = this.items.filter((x) => x !== u);
    let index = rest.findIndex((x) => this._compare(u, x) < 0);
    if (index === -1) index = rest.length;
    if (!shown && index === 0 && this.shownPage > 1) return false; // before this page
    if (!shown && index === rest.length && this.hasMore) return false; // after this page
    rest.splice(index, 0, u);
    if (rest.length > PER_PAGE) this.hasMore = true;
    this.items = rest.slice(0, PER_PAGE);
    return this.items.includes(u);
  }

  /** A `usage` event: the daily usage of users whose commands were admitted. */
  applyUsage(data) {
    if (!this.commandTypes.length) return; // not loaded yet: opening the tab loads it
    let changed = false;
    for (const row of data.users) {
      let u = this._find(row.username);
      if (!u && SERVER_ORDERED.has(this.sort)) continue; // that list holds some users only
      if (!u) {
        if (this.q && !row.username.toLowerCase().startsWith(this.q.toLowerCase())) continue;
        u = { user_id: row.user_id, username: row.username, usage: {}, violations_today: 0, created_at: null };
        for (const c of this.commandTypes) {
          u.usage[c] = { used: 0, limit: this._defaultLimit(c), percent: undefined, overridden: false };
        }
        u.isNew = true;
      }
      const usage = u.usage[row.command_type] || (u.usage[row.command_type] = { overridden: false });
      // Usage only grows (a reset comes as quota_change): a lower count is older than the
      // rows loaded over REST meanwhile.
      if (typeof usage.used === "number" && row.used < usage.used) continue;
      usage.used = row.used;
      usage.limit = row.limit;
      usage.percent = row.percent; // the server's figure, not recomputed here
      this._recompute(u);
      if (u.isNew) {
        delete u.isNew;
        if (!this._place(u)) continue;
      } else if (this.sort === "utilization") {
        this._place(u);
      }
      changed = true;
    }
    if (data.truncated) this.refreshSoon(); // the server had more changes than one event holds
    if (changed) this._draw();
  }

  /** A `quota_change` event: a limit edit, an override removed, or a usage reset. */
  applyQuotaChange(msg) {
    this._remember(this._quotaChange, msg);
    this._quotaChange(msg);
  }

  _quotaChange(msg) {
    if (typeof msg.seq === "number" && msg.seq <= this.seq) return; // already in the rows
    const data = msg.data;
    const c = data.command_type;
    const daily = data.effective ? data.effective.daily : undefined;
    const touched = [];
    if (data.action === "limits_updated" && data.limits && "daily" in data.limits) {
      const targets = data.scope === "global"
        ? this.items.filter((u) => u.usage[c] && !u.usage[c].overridden)
        : [this._find(data.username)].filter(Boolean);
      for (const u of targets) {
        u.usage[c].limit = daily;
        u.usage[c].percent = undefined; // a new limit: recomputed with the server's rounding
        if (data.scope === "user") u.usage[c].overridden = true;
        touched.push(u);
      }
    } else if (data.action === "override_removed") {
      const u = this._find(data.username);
      if (u && u.usage[c] && (!data.periods || data.periods.includes("daily"))) {
        u.usage[c].limit = daily;
        u.usage[c].percent = undefined; // a new limit: recomputed with the server's rounding
        u.usage[c].overridden = false;
        touched.push(u);
      }
    } else if (data.action === "usage_reset") {
      const u = this._find(data.username);
      if (u) {
        for (const [type, usage] of Object.entries(u.usage)) {
          if (!c || type === c) Object.assign(usage, { used: 0, percent: undefined });
        }
        touched.push(u);
      }
    } else if (data.action !== "limits_updated") {
      this.refreshSoon(); // a change this page cannot apply itself
      return;
    }
    for (const u of touched) {
      this._recompute(u);
      if (this.sort === "utilization") this._place(u);
    }
    if (touched.length) this._draw();
  }

  /** A `violation` event: one more violation today for that user. */
  applyViolation(msg) {
    this._remember(this._violation, msg);
    this._violation(msg);
  }

  _violation(msg) {
    if (typeof msg.seq === "number" && msg.seq <= this.seq) return; // already counted
    if (this.sort === "violations") {
      this.refreshSoon(); // the order (and who is listed) changed: the server sorts it
      return;
    }
    const u = this._find(msg.data.username);
    if (!u) return;
    u.violations_today += 1;
    this._draw();
  }

  _row(u) {
    const row = el("tr", { attrs: { "data-username": u.username } });
    row.append(el("td", { class: "user-cell", attrs: { "data-label": "User" } }, [
      userLink(u.username),
    ]));
    for (const c of this.commandTypes) {
      const usage = u.usage[c] || { used: 0, limit: null, percent: null, overridden: false };
        const limitText = usage.limit === undefined ? "–" : formatLimit(usage.limit);
      const label = `${formatInt(usage.used)} / ${limitText}`;
      const cell = el("td", { class: "usage-cell", attrs: { "data-label": c, "data-type": c } }, [
        el("span", { class: "usage-text", text: label }),
        usage.overridden ? el("span", { class: "override-mark", text: "override", attrs: { title: "per-user limit" } }) : null,
        meter(usage.percent),
      ]);
      row.append(cell);
    }
    const riskCell = el("td", { attrs: { "data-label": "Risk" } });
    if (u.max_percent !== null) {
      riskCell.append(el("span", { class: "pct", text: formatPercent(u.max_percent) }));
    }
    if (u.risk) {
      riskCell.append(
        el("span", { class: `badge risk risk-${u.risk}`, text: u.risk, attrs: { title: RISK_TITLE[u.risk] } }),
      );
    }
    row.append(riskCell);
    row.append(el("td", { class: "num", text: formatInt(u.violations_today), attrs: { "data-label": "Violations today" } }));
    row.append(el("td", { class: "num refused", text: formatInt(u.load_refusals_today ?? 0), attrs: { "data-label": "Refused for load" } }));
    if (canWrite) {
      const edit = el("button", { class: "btn btn-small", text: "Edit limits", attrs: { type: "button" } });
      const reset = el("button", { class: "btn btn-small btn-ghost", text: "Reset usage", attrs: { type: "button" } });
      edit.addEventListener("click", () => this.onEdit(u.username));
      reset.addEventListener("click", () => this.onReset(u.username));
      row.append(el("td", { class: "actions", attrs: { "data-label": "Actions" } }, [edit, reset]));
    }
    return row;
  }
}

/** Parse one limit field: "" inherits, "unlimited" (or ∞) is null, else a whole number. */
export function parseLimit(text) {
  const value = text.trim();
  if (value === "") return { inherit: true };
  if (/^(unlimited|∞|none)$/i.test(value)) return { limit: null };
  if (/^\d{1,13}$/.test(value)) return { limit: Number(value) };
  return { error: true };
}

export class LimitsDialog {
  constructor() {
    this.dialog = byId("limits-dialog");
    this.username = null;
    this.detail = null;
    byId("limits-cancel").addEventListener("click", () => this.dialog.close());
    byId("limits-reload").addEventListener("click", () => this.open(this.username));
    byId("limits-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.save();
    });
  }

  async open(username) {
    try {
      this.detail = await get(`/users/${encodeURIComponent(username)}`);
    } catch (err) {
      reportError(err, "Loading the user's limits");
      return;
    }
    this.username = username;
    setText("limits-user", username);
    setText("limits-error", "");
    const periods = this.detail.periods;
    byId("limits-head").replaceChildren(
      el("th", { text: "Command type" }),
      ...periods.map((p) => el("th", { text: p })),
    );
    const rows = Object.entries(this.detail.limits).map(([command, byPeriod]) => {
      const cells = periods.map((period) => {
        const info = byPeriod[period];
        const original = info.overridden ? (info.limit === null ? "unlimited" : String(info.limit)) : "";
        const input = el("input", {
          class: "limit-input",
          attrs: {
            type: "text",
            inputmode: "numeric",
            autocomplete: "off",
            "aria-label": `${command} ${period} limit`,
            placeholder: formatLimit(info.default), // greyed: the inherited default
            "data-command": command,
            "data-period": period,
            "data-original": original,
            name: `${command}.${period}`,
          },
        });
        input.value = original;
        input.dataset.current = info.limit === null ? "" : String(info.limit);
        input.dataset.default = info.default === null || info.default === undefined ? "" : String(info.default);
        selectOnFocus(input);
        const used = el("span", { class: "muted small", text: `used ${formatInt(info.used)}` });
        return el("td", { attrs: { "data-label": period } }, [input, used]);
      });
      return el("tr", {}, [el("th", { text: command, attrs: { scope: "row" } }), ...cells]);
    });
    byId("limits-body").replaceChildren(...rows);
    byId("limits-notice").hidden = true;
    if (!this.dialog.open) this.dialog.showModal();
  }

  /** A `quota_change` while the dialog is open: say so, keep what is typed. */
  noteChange(msg) {
    const d = msg.data;
    if (!this.dialog.open || (d.username !== this.username && d.scope !== "global")) return;
    if (d.actor === actor) return; // this page's own save, still on its way back
    setText("limits-notice-text", `Limits changed by ${d.actor || "another admin"} meanwhile.`);
    byId("limits-notice").hidden = false;
    announce(byId("limits-notice-text").textContent);
  }

  async save() {
    const changes = new Map(); // command -> {set: {}, remove: []}
    const jumps = [];
    for (const input of this.dialog.querySelectorAll("input.limit-input")) {
      const { command, period, original } = input.dataset;
      if (input.value.trim() === original) continue;
      const parsed = parseLimit(input.value);
      if (parsed.error) {
        setText("limits-error", `${command} ${period}: enter a whole number, "unlimited" or nothing`);
        input.focus();
        return;
      }
      const change = changes.get(command) || { set: {}, remove: [] };
      if (parsed.inherit) change.remove.push(period);
      else change.set[period] = parsed.limit;
      changes.set(command, change);
      const limitOf = (text) => (text === "" ? null : Number(text));
      const after = parsed.inherit ? limitOf(input.dataset.default) : parsed.limit;
      jumps.push({ label: `${command} ${period}`, before: limitOf(input.dataset.current), after });
    }
    if (!changes.size) {
      this.dialog.close();
      return;
    }
    if (!(await confirmJumps(jumps))) return;
    const name = encodeURIComponent(this.username);
    byId("limits-save").disabled = true;
    try {
      for (const [command, change] of changes) {
        const path = `/users/${name}/limits/${encodeURIComponent(command)}`;
        if (Object.keys(change.set).length) await request("PUT", path, { body: { limits: change.set } });
        if (change.remove.length) await request("DELETE", path, { query: { period: change.remove } });
      }
      this.dialog.close();
      toast(`Limits of ${this.username} updated`, "success", 3000);
    } catch (err) {
      setText("limits-error", err.message);
    } finally {
      byId("limits-save").disabled = false;
    }
  }
}

export class ResetDialog {
  constructor() {
    this.dialog = byId("reset-dialog");
    this.username = null;
    byId("reset-cancel").addEventListener("click", () => this.dialog.close());
    byId("reset-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.confirm();
    });
  }

  open(username, commandTypes) {
    this.username = username;
    setText("reset-user", username);
    setText("reset-error", "");
    const select = byId("reset-type");
    select.replaceChildren(
      el("option", { text: "all command types", attrs: { value: "" } }),
      ...commandTypes.map((c) => el("option", { text: c, attrs: { value: c } })),
    );
    this.dialog.showModal();
  }

  async confirm() {
    const commandType = byId("reset-type").value || null;
    byId("reset-confirm").disabled = true;
    try {
      const result = await request("POST", `/users/${encodeURIComponent(this.username)}/reset`, {
        body: { command_type: commandType },
      });
      this.dialog.close();
      toast(`Usage of ${this.username} reset (${result.counters_reset} counters)`, "success", 3000);
    } catch (err) {
      setText("reset-error", err.message);
    } finally {
      byId("reset-confirm").disabled = false;
    }
  }
}
